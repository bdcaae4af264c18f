"""Pipeline contracts, builders (golden ovs-ofctl text), cookies and the diff: no switch needed."""

from __future__ import annotations

import pytest
from flowcni.flows import cookie as ck
from flowcni.flows.diff import diff, index
from flowcni.flows.model import CT, Conjunction, Flow, Move, SetField
from flowcni.flows.node import Gateway, node_flows
from flowcni.flows.pod import LocalPod, pod_flows
from flowcni.flows.tables import DEFAULT, PIPELINE, Pipeline, Table, _t

GW = Gateway("10.244.1.1", "02:00:00:00:00:01", 1, "10.244.1.0/24")
POD = LocalPod("c0ffee/eth0", 3, "10.244.1.5", "0A:58:0A:F4:01:05")


def test_tables_numbered_in_declaration_order() -> None:
    assert [DEFAULT.id(t.name) for t in PIPELINE] == list(range(len(PIPELINE)))
    assert DEFAULT.name(0) == "Classifier"
    assert DEFAULT.names_by_id()[DEFAULT.id("Output")] == "Output"


def test_pipeline_rejects_undeclared_or_backward_goto() -> None:
    with pytest.raises(ValueError, match="undeclared"):
        Pipeline.build((_t("A", "", [], ["Nope"]),))
    with pytest.raises(ValueError, match="backwards"):
        Pipeline.build((_t("A", "", [], []), _t("B", "", [], ["A"])))
    with pytest.raises(ValueError, match="duplicate"):
        Pipeline.build((Table("A", "", frozenset()), Table("A", "", frozenset())))


def test_flow_contract_violations_fail_at_build_time() -> None:
    kw = dict(feature=ck.Feature.POD, owner="pod:x")
    with pytest.raises(ValueError, match="may not match on ipv4_dst"):
        Flow.make("Classifier", 1, {"ipv4_dst": "10.0.0.1"}, **kw)
    with pytest.raises(ValueError, match="may not go to"):
        Flow.make("Classifier", 1, {"in_port": 1}, goto="Output", **kw)
    with pytest.raises(ValueError, match="may not recirculate"):
        Flow.make("Classifier", 1, {"in_port": 1}, [CT(table="Output")], **kw)
    with pytest.raises(ValueError, match="cannot go anywhere"):
        Flow.make("EgressRule", 1, {"ipv4_src": "10.0.0.1"}, [Conjunction(1, 1, 2)],
                  goto="L3Forwarding", **kw)
    with pytest.raises(ValueError, match="unknown flag"):
        Flow.make("ConntrackState", 1, {"ct_state": "+trk+bogus"}, **kw)
    with pytest.raises(ValueError, match="needs eth_type"):
        Flow.make("SpoofGuard", 1, {"eth_type": 0x0806, "ipv4_src": "10.0.0.1"}, **kw)
    with pytest.raises(ValueError, match="host bits"):
        Flow.make("L3Forwarding", 1, {"ipv4_dst": "10.0.0.1/24"}, **kw)
    with pytest.raises(ValueError, match="priority"):
        Flow.make("Classifier", 70000, {}, **kw)
    with pytest.raises(ValueError, match="widths differ"):
        Move("eth_src", "arp_spa")


def test_prerequisites_added() -> None:
    f = Flow.make("SpoofGuard", 5, {"arp_spa": "10.0.0.1"}, feature=ck.Feature.POD, owner="p")
    assert dict(f.match)["eth_type"] == 0x0806
    assert f.match_text() == "arp,arp_spa=10.0.0.1"


def test_pod_flows_golden() -> None:
    got = [f.ofctl(names=True) for f in pod_flows(POD, GW)]
    assert got == [
        "table=Classifier,priority=200,in_port=3,"
        "actions=load:0x1->NXM_NX_REG0[0..3],goto_table:SpoofGuard",
        "table=SpoofGuard,priority=200,ip,in_port=3,dl_src=0a:58:0a:f4:01:05,"
        "nw_src=10.244.1.5,actions=goto_table:ConntrackZone",
        "table=SpoofGuard,priority=200,arp,in_port=3,dl_src=0a:58:0a:f4:01:05,"
        "arp_spa=10.244.1.5,arp_sha=0a:58:0a:f4:01:05,actions=goto_table:ARPResponder",
        "table=L3Forwarding,priority=200,ip,nw_dst=10.244.1.5,"
        "actions=set_field:02:00:00:00:00:01->eth_src,set_field:0a:58:0a:f4:01:05->eth_dst,"
        "goto_table:L3DecTTL",
        "table=L2ForwardingCalc,priority=100,dl_dst=0a:58:0a:f4:01:05,"
        "actions=load:0x3->NXM_NX_REG1[0..31],goto_table:AdminIngress",
    ]


def test_node_flows_golden_and_numbered_rendering() -> None:
    flows = {f.ofctl(names=True) for f in node_flows(GW)}
    assert ("table=ARPResponder,priority=200,arp,arp_op=1,arp_tpa=10.244.1.1,actions="
            "move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],set_field:02:00:00:00:00:01->eth_src,"
            "set_field:2->arp_op,move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],"
            "set_field:02:00:00:00:00:01->arp_sha,move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],"
            "set_field:10.244.1.1->arp_spa,IN_PORT") in flows
    assert "table=L3DecTTL,priority=200,reg0=0x2/0xf,actions=goto_table:L2ForwardingCalc" \
        in flows
    assert "table=Output,priority=0,actions=output:NXM_NX_REG1[0..31]" in flows
    # every table but Output has a miss flow, Output has its output flow at priority 0
    misses = [f for f in node_flows(GW) if f.priority == 0]
    assert sorted(f.table for f in misses) == sorted(t.name for t in PIPELINE)
    numbered = node_flows(GW)[3].ofctl(cookie=0x10)  # ConntrackZone's miss
    assert numbered == (f"cookie=0x10,table={DEFAULT.id('ConntrackZone')},priority=0,"
                        f"actions=goto_table:{DEFAULT.id('L3Forwarding')}")


def test_flows_per_pod_is_constant() -> None:
    other = LocalPod("b/eth0", 4, "10.244.1.6", "0a:58:0a:f4:01:06")
    assert len(pod_flows(POD, GW)) == len(pod_flows(other, GW)) == 5


def test_cookie_layout() -> None:
    c = ck.make(7, ck.Feature.POD, "pod:x")
    assert ck.round_of(c) == 7
    assert ck.feature_of(c) is ck.Feature.POD
    assert ck.owner_of(c) == ck.owner_id("pod:x")
    assert ck.next_round(0xFFFF) == 1
    with pytest.raises(ValueError):
        ck.make(0, ck.Feature.POD, "x")
    cookie, mask = ck.round_match(7)
    assert c & mask == cookie


def test_diff_adds_changed_and_deletes_gone() -> None:
    a = pod_flows(POD, GW)
    moved = LocalPod(POD.key, 9, POD.ip, POD.mac)  # same pod, new ofport
    b = pod_flows(moved, GW)
    adds, dels = diff(index(a), index(b))
    # in_port changes the match of 3 flows (delete + add); the L2 flow only changes actions
    assert len(dels) == 3 and all(dict(f.match).get("in_port") == 3 for f in dels)
    assert len(adds) == 4
    assert diff(index(a), index(a)) == ([], [])


def test_index_rejects_conflicting_owners() -> None:
    f1 = Flow.make("L2ForwardingCalc", 100, {"eth_dst": "0a:00:00:00:00:01"},
                   [SetField("eth_dst", "0a:00:00:00:00:02")], goto="AdminIngress",
                   feature=ck.Feature.POD, owner="pod:a")
    f2 = Flow.make("L2ForwardingCalc", 100, {"eth_dst": "0a:00:00:00:00:01"},
                   goto="AdminIngress", feature=ck.Feature.POD, owner="pod:b")
    with pytest.raises(ValueError, match="two flows claim"):
        index([f1, f2])


def test_osken_rendering_builds_valid_messages() -> None:
    """Every builder's flows serialise to OpenFlow 1.3 FlowMods."""
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as parser

    class DP:
        ofproto, ofproto_parser = ofp, parser

    from flowcni.flows.policy import PolicyEngine
    from flowcni.flows.tunnel import RemoteNode, remote_node_flows, tunnel_flows

    eng = PolicyEngine("n1")
    owners, _ = eng.load([], [{"namespace": "d", "name": "p", "labels": {"a": "b"},
                               "ip": "10.244.1.5", "node": "n1"}],
                         [{"namespace": "d", "name": "x", "spec": {
                             "podSelector": {}, "ingress": [{"from": [{"podSelector": {}}],
                                                             "ports": [{"port": 80}]}]}}])
    policy_flows = [f for fl in owners.values() for f in fl]
    assert any(isinstance(a, CT) for f in policy_flows for a in f.actions)
    assert any(isinstance(a, Conjunction) for f in policy_flows for a in f.actions)
    from flowcni.flows.services import gateway_reply_flows

    for f in (node_flows(GW) + pod_flows(POD, GW) + tunnel_flows(2, GW) + policy_flows
              + gateway_reply_flows(GW)
              + remote_node_flows(RemoteNode("n2", "192.168.77.2", "10.244.2.0/24"), GW, 2)):
        m = parser.OFPFlowMod(DP(), cookie=f.cookie(1), table_id=DEFAULT.id(f.table),
                              command=ofp.OFPFC_ADD, priority=f.priority,
                              match=f.osken_match(parser),
                              instructions=f.osken_instructions(parser, ofp, DEFAULT))
        m.set_xid(1)
        m.serialize()
        assert len(m.buf) > 48


def test_tunnel_hands_the_gateway_address_to_the_gateway_port() -> None:
    """Replies to the node's own host traffic come back through the tunnel addressed to
    the gateway IP; only tunnel traffic is re-addressed (pods already use the gateway MAC)."""
    from flowcni.flows.tunnel import tunnel_flows
    flows = [f.ofctl(names=True) for f in tunnel_flows(2, GW)]
    assert ("table=L3Forwarding,priority=200,ip,reg0=0x3/0xf,nw_dst=10.244.1.1,"
            "actions=set_field:aa:bb:cc:dd:ee:ff->eth_src,"
            "set_field:02:00:00:00:00:01->eth_dst,goto_table:L3DecTTL") in flows


def test_own_node_addresses_bypass_policy_only_from_the_gateway_port() -> None:
    with_ip = Gateway(GW.ip, GW.mac, GW.ofport, GW.pod_cidr, "192.168.77.1")
    host = {f.ofctl(names=True) for f in node_flows(with_ip) if f.table in
            ("IngressRule", "EgressRule") and f.priority}
    assert host == {
        f"table=IngressRule,priority=205,ip,reg0=0x2/0xf,nw_src={ip},"
        "actions=goto_table:ConntrackCommit" for ip in ("10.244.1.1", "192.168.77.1")} | {
        f"table=EgressRule,priority=205,ip,nw_dst={ip},actions=goto_table:L3Forwarding"
        for ip in ("10.244.1.1", "192.168.77.1")}
    # without a node IP only the gateway address is the node's
    assert sum(f.table == "IngressRule" and f.priority > 0 for f in node_flows(GW)) == 1


def test_gateway_reply_flows_golden() -> None:
    """Connections entering from the gateway are marked; their replies go back to it."""
    from flowcni.flows.services import gateway_reply_flows
    got = [f.ofctl(names=True) for f in gateway_reply_flows(GW)]
    assert got == [
        "table=ConntrackCommit,priority=210,ip,reg0=0x2/0xf,ct_state=+new+trk,"
        "actions=ct(commit,zone=65520,exec(set_field:0x1->ct_mark)),goto_table:Output",
        "table=L3Forwarding,priority=210,ip,ct_state=+rpl+trk,ct_mark=0x1/0x1,"
        f"actions=set_field:{GW.mac}->eth_dst,goto_table:L3DecTTL",
    ]
    # Above the policy engine's commit and every forwarding flow of pods and nodes.
    others = node_flows(GW) + pod_flows(POD, GW)
    for f in gateway_reply_flows(GW):
        assert all(o.priority < f.priority for o in others if o.table == f.table)


def test_ct_mark_needs_commit() -> None:
    with pytest.raises(ValueError, match="commit"):
        CT(mark=1)
    with pytest.raises(ValueError):
        CT(commit=True, mark=0)


def test_group_with_nat_serialises_to_whole_words() -> None:
    """OVS refuses a group mod whose length is not a multiple of 8 (os-ken's nat() alone
    comes out 4 bytes short)."""
    from flowcni.flows.model import Group
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as parser

    class DP:
        ofproto, ofproto_parser = ofp, parser

    g = Group.make(5, [[CT(commit=True, table="AdminEgress", nat="10.244.1.3:80")]] * 3,
                   owner="service:d/s", table="ServiceLB")
    m = parser.OFPGroupMod(DP(), command=0x8000, type_=ofp.OFPGT_SELECT, group_id=5,
                           buckets=g.osken_buckets(parser, ofp, DEFAULT))
    m.serialize()
    assert len(m.buf) % 8 == 0 and len(m.buf) == 16 + 3 * (16 + 56)


def test_gc_paused_holds_the_collector_and_promotes_a_load_only() -> None:
    """The collector is off inside, back on after the outermost pause only; a
    load's objects go to the oldest generation, a small change's stay young."""
    import gc

    from flowcni.flows.model import gc_paused
    assert gc.isenabled()
    with gc_paused(promote=True):
        assert not gc.isenabled()
        with gc_paused():
            kept = [object()]
        assert not gc.isenabled()  # the inner pause left it off
    assert gc.isenabled()
    assert any(o is kept for o in gc.get_objects(generation=2))
    with gc_paused():
        young = [object()]
    assert gc.isenabled()
    assert not any(o is young for o in gc.get_objects(generation=2))
    gc.disable()
    try:
        with gc_paused(promote=True):
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
