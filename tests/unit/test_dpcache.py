"""The datapath guard's parsing: dumps and traces as OVS 3.1 prints them."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from typing import Any

import pytest
from flowcni.controller.dpcache import (
    DpFlow,
    Unixctl,
    UnixctlError,
    flow_addresses,
    in_scope,
    parse_dump,
    same_actions,
    traced_actions,
    vswitchd_target,
)
from flowcni.flows.cookie import Feature
from flowcni.flows.model import Conjunction, Flow

# Captured from `ovs-appctl dpctl/dump-flows -m --no-names` on a lab node (OVS 3.1.0).
SYN_DROP = (
    "ufid:b4ad1fe0-4eac-4800-b842-053dbe31bb44, skb_priority(0/0),tunnel(tun_id=0x0,"
    "src=192.168.77.3,dst=192.168.77.2,ttl=64/0,tp_src=39819/0,tp_dst=6081/0,geneve(),"
    "flags(-df-csum+key)),skb_mark(0/0),ct_state(0x21/0x31),ct_zone(0xfff0/0),ct_mark(0/0),"
    "ct_label(0/0),ct_tuple4(src=10.244.3.2/0.0.0.0,dst=10.244.2.2/0.0.0.0,proto=6/0,"
    "tp_src=48068/0,tp_dst=8080/0),recirc_id(0x3),dp_hash(0/0),in_port(5),"
    "packet_type(ns=0,id=0),eth(src=3e:a6:9c:e2:69:9b,dst=aa:bb:cc:dd:ee:ff),"
    "eth_type(0x0800),ipv4(src=10.244.3.2,dst=10.244.2.2,proto=6,tos=0/0,ttl=63,frag=no),"
    "tcp(src=48068/0,dst=8080),tcp_flags(0/0), packets:2, bytes:148, used:0.308s, flags:S, "
    "dp:ovs, actions:drop, dp-extra-info:miniflow_bits(10,3)")
FIRST_PASS = (
    "ufid:32ff39be-bf75-4191-8937-06ea5e6c11f0, skb_priority(0/0),skb_mark(0/0),"
    "ct_state(0/0),ct_zone(0/0),ct_mark(0/0),ct_label(0/0),recirc_id(0),dp_hash(0/0),"
    "in_port(6),packet_type(ns=0,id=0),eth(src=e6:79:68:d5:fa:2d,"
    "dst=32:01:f0:ca:8b:76/00:00:00:00:00:00),eth_type(0x0800),ipv4(src=10.244.2.2,"
    "dst=10.244.3.2/0.0.0.0,proto=6/0,tos=0/0,ttl=64/0,frag=no),tcp(src=8080/0,dst=34420/0),"
    "tcp_flags(0/0), packets:0, bytes:0, used:never, dp:ovs, actions:ct(zone=65520),"
    "recirc(0x2), dp-extra-info:miniflow_bits(4,1)")
ESTABLISHED = (
    "ufid:0a8b2f4e-1111-4222-8333-944455556666, skb_priority(0/0),skb_mark(0/0),"
    "ct_state(0x22/0x33),ct_zone(0xfff0/0),recirc_id(0x2),dp_hash(0/0),in_port(6),"
    "packet_type(ns=0,id=0),eth(src=66:47:04:be:f8:cf,dst=56:1a:13:de:2a:c8),"
    "eth_type(0x0800),ipv4(src=10.244.2.2/0.0.0.0,dst=10.244.3.0/255.255.255.0,proto=6,"
    "tos=0/0x3,ttl=64,frag=no), packets:503, bytes:34766, used:4.072s, flags:SF., dp:ovs, "
    "actions:set(eth(src=56:1a:13:de:2a:c8,dst=aa:bb:cc:dd:ee:ff)),set(ipv4(ttl=63)),"
    "tnl_push(tnl_port(5),header(size=50,type=5),out_port(1)),1")
TRACE = """Flow: tcp,in_port=2
bridge("br-int")
 3. ip, priority 200, cookie 0x105a98b1a8203
    ct(table=4,zone=65520)
Megaflow: recirc_id=0,eth,ip,in_port=2,nw_frag=no
Datapath actions: ct(zone=65520),recirc(0x1)
===============================================================================
recirc(0x1) - resume conntrack with default ct_state=trk|new (use --ct-next to customize)
===============================================================================
11. ip,nw_dst=10.244.2.2, priority 200, cookie 0x105c17c9cce5b
    drop
Datapath actions: drop
"""


def test_parse_dump_splits_ufid_key_and_actions() -> None:
    text = "\n".join(["flow-dump from the main thread:", SYN_DROP, FIRST_PASS, ESTABLISHED])
    flows = parse_dump(text)
    assert [f.ufid for f in flows] == ["ufid:b4ad1fe0-4eac-4800-b842-053dbe31bb44",
                                       "ufid:32ff39be-bf75-4191-8937-06ea5e6c11f0",
                                       "ufid:0a8b2f4e-1111-4222-8333-944455556666"]
    assert flows[0].actions == "drop"
    assert flows[1].actions == "ct(zone=65520),recirc(0x2)"
    assert flows[2].actions.endswith("out_port(1)),1")
    assert flows[0].key.startswith("skb_priority(0/0),tunnel(")
    assert flows[0].key.endswith("tcp_flags(0/0)")
    assert "packets:" not in flows[0].key


def test_post_conntrack_needs_the_tracked_bit_in_value_and_mask() -> None:
    syn, first, est = parse_dump("\n".join([SYN_DROP, FIRST_PASS, ESTABLISHED]))
    assert syn.post_conntrack and est.post_conntrack
    assert not first.post_conntrack  # ct_state(0/0): before ct()


def test_addresses_follow_masks() -> None:
    syn, first, est = parse_dump("\n".join([SYN_DROP, FIRST_PASS, ESTABLISHED]))
    assert syn.addresses() == ("10.244.3.2/32", "10.244.2.2/32")
    assert first.addresses() == ("10.244.2.2/32", None)  # dst masked out entirely
    assert est.addresses() == (None, "10.244.3.0/24")


def test_scope_by_address() -> None:
    syn, first, est = parse_dump("\n".join([SYN_DROP, FIRST_PASS, ESTABLISHED]))
    assert in_scope(syn, frozenset({"10.244.3.2"}))
    assert not in_scope(syn, frozenset({"10.244.3.3"}))
    assert in_scope(est, frozenset({"10.244.9.9"}))  # src wildcarded: any address
    assert in_scope(syn, None)
    assert not in_scope(first, None)  # first pass never meets the policy tables
    assert in_scope(first, None, post_ct_only=False)


def test_new_connection_flows_only_when_asked() -> None:
    syn, first, est = parse_dump("\n".join([SYN_DROP, FIRST_PASS, ESTABLISHED]))
    assert syn.new_connections and not est.new_connections
    assert first.new_connections  # ct_state wildcarded: any packet
    assert in_scope(syn, None, new_only=True)
    assert not in_scope(est, None, new_only=True) and in_scope(est, None)


def test_traced_actions_are_the_keys_own_not_the_resumed_ones() -> None:
    assert traced_actions(TRACE) == "ct(zone=65520),recirc(0x1)"
    assert traced_actions("no translation") is None
    assert same_actions("ct(commit,zone=65520), 6", "ct(commit,zone=65520),6")
    assert not same_actions("ct(commit,zone=65520),6", "drop")


def _flow(match: dict[str, Any], actions: Any = ()) -> Flow:
    return Flow.make("IngressRule", 200, {"eth_type": 0x0800, **match}, list(actions),
                     feature=Feature.POLICY, owner="t")


def test_flow_addresses_targets_single_addresses_only() -> None:
    a = _flow({"ipv4_src": "10.244.3.3"}, [Conjunction(2, 2, 3)])
    b = _flow({"ipv4_dst": "10.244.2.2"}, [Conjunction(2, 1, 3)])
    conj = Flow.make("IngressRule", 200, {"conj_id": 2, "eth_type": 0x0800},
                     goto="ConntrackCommit", feature=Feature.POLICY, owner="t")
    assert flow_addresses([a, b, conj]) == frozenset({"10.244.3.3", "10.244.2.2"})
    port = _flow({"ip_proto": 6, "tcp_dst": 8080}, [Conjunction(2, 3, 3)])
    assert flow_addresses([a, port]) is None  # a port clause: every flow is in scope
    block = _flow({"ipv4_src": "10.0.0.0/8"}, [Conjunction(2, 2, 3)])
    assert flow_addresses([block]) is None


def test_vswitchd_target_next_to_the_db_socket(tmp_path: Any) -> None:
    assert vswitchd_target(f"unix:{tmp_path}/db.sock") == f"{tmp_path}/ovs-vswitchd.ctl"
    (tmp_path / "ovs-vswitchd.pid").write_text("4242\n")
    assert vswitchd_target(f"unix:{tmp_path}/db.sock") == f"{tmp_path}/ovs-vswitchd.4242.ctl"
    (tmp_path / "ovs-vswitchd.ctl").write_text("")
    assert vswitchd_target(f"unix:{tmp_path}/db.sock") == f"{tmp_path}/ovs-vswitchd.ctl"


def test_unixctl_json_rpc_round_trip_and_errors() -> None:
    """The JSON-RPC framing: replies may arrive split or glued; errors raise."""
    path = os.path.join(tempfile.mkdtemp(), "ctl")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        buf = ""
        dec = json.JSONDecoder()
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    req, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                if req["method"] == "fail":
                    reply = {"id": req["id"], "result": None, "error": "unknown command\n"}
                else:
                    reply = {"id": req["id"], "result": " ".join(req["params"]), "error": None}
                raw = json.dumps(reply).encode()
                conn.sendall(raw[:5])  # split: the client must wait for the rest
                conn.sendall(raw[5:])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    u = Unixctl(path, timeout=5)
    try:
        assert u.call("echo", "a", "b") == "a b"
        with pytest.raises(UnixctlError, match="unknown command"):
            u.call("fail")
        assert u.call("echo", "again") == "again"  # the connection survives an error
        got = u.call_many("echo", [["x"], ["y"], ["z"]], chunk=2)
        assert got == ["x", "y", "z"]
        mixed = u.call_many("fail", [["x"]])
        assert isinstance(mixed[0], UnixctlError)
    finally:
        u.close()
        srv.close()


def test_dpflow_without_ipv4_has_no_addresses() -> None:
    f = DpFlow("ufid:x", "recirc_id(0),in_port(1),eth_type(0x86dd),ipv6(frag=no)", "drop")
    assert f.addresses() == (None, None) and not f.post_conntrack
