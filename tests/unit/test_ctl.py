"""flowctl's pure parts and the agent API's wire schema: no root, no switch.

The trace parser reads ofproto/trace text as OVS 3.1 prints it; the verdict
logic runs over canned agent replies (the datapath tests run it against
real agents); the cluster transport runs `flowctl call` through the fake API
server's pod exec for real.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from flowcni.api import schema as api
from flowcni.api.schema import APIError, FlowRow, Request, TraceResult, TraceStep
from flowcni.controller.apiserver import APIServer, render_actions
from flowcni.controller.ofproto_trace import parse
from flowcni.ctl import flowctl
from flowcni.ctl.client import AgentClient, AgentError
from flowcni.ctl.providers import ClusterProvider, NodeAgent, ProviderError, select
from flowcni.ctl.trace import (
    LEFT_NODE,
    NOWHERE,
    TraceError,
    Tracer,
    check_request,
    packet,
    story,
)
from flowcni.flows.tables import DEFAULT as PIPELINE

from tests.support.fakeapi import FakeAPIServer, pod_obj, write_kubeconfig

NAMES = {i: n for n, i in PIPELINE.ids.items()}

# ofproto/trace of a TCP SYN from a pod to a remote node's pod (OVS 3.1 layout):
# conntrack recirculates ("Resuming ..."), then the tunnel leaves through br-phy.
TRACE = """\
Flow: tcp,in_port=3,vlan_tci=0x0000,nw_src=10.244.1.2,nw_dst=10.244.2.3,tp_dst=80

bridge("br-int")
----------------
 0. in_port=3, priority 200, cookie 0x1000400000003
    load:0x1->NXM_NX_REG0[0..3]
    goto_table:1
 1. ip,reg0=0x1/0xf,in_port=3,nw_src=10.244.1.2, priority 200, cookie 0x1000400000003
    goto_table:3
 3. ip, priority 200, cookie 0x1000100000001
    ct(table=4,zone=65520,nat)
    nat
     -> A clone of the packet is forked to recirculate.
     -> Sets the packet to an untracked state, and clears all the conntrack fields.

Final flow: unchanged
Megaflow: recirc_id=0,ct_state=-trk,eth,tcp,in_port=3
Datapath actions: ct(zone=65520,nat),recirc(0x12)

===============================================================================
recirc(0x12) - resume conntrack with default ct_state=trk|new (use --ct-next to customize)
===============================================================================

Flow: recirc_id=0x12,ct_state=new|trk,tcp,in_port=3

bridge("br-int")
----------------
    thaw
        Resuming from table 4
 4. priority 0, cookie 0x1000100000001
    goto_table:7
 7. ip,nw_dst=10.244.2.0/24, priority 150, cookie 0x1000500000007
    set_field:192.168.77.2->tun_dst
    goto_table:13
13. priority 0, cookie 0x1000100000001
    output:NXM_NX_REG1[]
     -> output port is 9
     -> output to native tunnel
     -> tunneling to 192.168.77.2 via br-phy

bridge("br-phy")
----------------
 0. priority 0
    NORMAL
     -> forwarding to learned port

Final flow: unchanged
Megaflow: recirc_id=0x12,ct_state=+new-est+trk,eth,tcp,in_port=3,nw_dst=10.244.2.0/24
Datapath actions: tnl_push(tnl_port(genev_sys_6081)),out_port(br-phy)),1
"""


def test_trace_parser_reads_steps_of_every_resumed_pipeline_of_the_bridge() -> None:
    r = parse(TRACE, "br-int", NAMES, "node1")
    assert [s.table_id for s in r.steps] == [0, 1, 3, 4, 7, 13]
    assert r.steps[0].table == NAMES[0] and r.steps[0].priority == 200
    assert r.steps[0].cookie == "0x1000400000003"
    assert r.steps[0].actions == ["load:0x1->NXM_NX_REG0[0..3]", f"goto_table:{NAMES[1]}"]
    assert r.steps[2].actions == ["ct(table=4,zone=65520,nat)", "nat"]
    assert r.steps[4].actions == ["set_field:192.168.77.2->tun_dst", f"goto_table:{NAMES[13]}"]
    assert r.output_port == 9 and r.tunnel
    assert r.datapath_actions.startswith("tnl_push(")
    assert all(s.node == "node1" for s in r.steps)
    # br-phy's NORMAL is not a step of br-int
    assert not any("NORMAL" in a for s in r.steps for a in s.actions)


def test_trace_parser_no_match_and_drop() -> None:
    out = ('bridge("br-int")\n----------------\n 0. No match.\n    drop\n\n'
           "Final flow: unchanged\nDatapath actions: drop\n")
    r = parse(out, "br-int", NAMES)
    assert len(r.steps) == 1 and r.steps[0].no_match and r.datapath_actions == "drop"
    assert story(r.steps[0]) == f"{NAMES[0]}: no flow matched, dropped"
    assert parse(out, "br-other", NAMES).steps == []  # --bridge is honoured


def test_stories() -> None:
    s = TraceStep("n", "IngressRule", 10, owner="rule:default/p/ingress/0",
                  actions=["conjunction(5,1/2)"])
    assert story(s) == "IngressRule: allowed by default/p/ingress/0"
    s = TraceStep("n", "IngressDefault", 11, owner="isolation:default/b",
                  object="pod default/b (isolated)", actions=["drop"])
    assert story(s) == "IngressDefault: dropped by pod default/b (isolated)"


def test_trace_request_checks() -> None:
    with pytest.raises(TraceError, match="icmp has no ports"):
        check_request("icmp", 80)
    with pytest.raises(TraceError, match="out of range"):
        check_request("tcp", 70000)
    check_request("udp", 53)
    src = {"mac": "0a:58:0a:f4:01:02", "ip": "10.244.1.2"}
    gw = {"ip": "10.244.1.1", "mac": "aa:bb:cc:dd:ee:ff"}
    assert "dl_dst=aa:bb:cc:dd:ee:ff" in packet(src, "8.8.8.8", gw, "10.244.1.0/24", "icmp",
                                                None)
    assert "tcp_dst=80" in packet(src, "10.244.1.3", gw, "10.244.1.0/24", "tcp", None)


# -- verdicts over canned agent replies ---------------------------------------------------


class CannedAgent:
    """Stands for one node's agent: status, pods and one trace reply per destination."""

    def __init__(self, name: str, pod_cidr: str, pods: list[dict[str, Any]],
                 traces: dict[str, TraceResult]) -> None:
        self.name, self.traces = name, traces
        self.status = {"node": name, "pod_cidr": pod_cidr, "node_ip": "192.168.77.1",
                       "cluster_cidr": "10.244.0.0/16", "ip_masq": True, "tunnel_ofport": 9,
                       "gateway": {"ip": pod_cidr.replace(".0/24", ".1"),
                                   "mac": "aa:bb:cc:dd:ee:ff", "ofport": 2}}
        self.pods = pods

    def call(self, verb: str, **args: Any) -> dict[str, Any]:
        if verb == "status":
            return self.status
        if verb == "pods":
            return {"pods": self.pods}
        if verb == "policy":
            return {"rules": [], "isolation": {}}
        if verb == "services":
            return {"proxy": "flowcni", "services": []}
        if verb == "trace":
            dst = args["flow"].split("nw_dst=")[1].split(",")[0]
            return self.traces[dst].to_dict()
        raise AssertionError(verb)


class Canned:
    def __init__(self, *agents: CannedAgent) -> None:
        self._a = [NodeAgent(a.name, a) for a in agents]

    def agents(self) -> list[NodeAgent]:
        return self._a


POD_A = {"namespace": "default", "name": "a", "ip": "10.244.1.2", "mac": "0a:58:0a:f4:01:02",
         "ofport": 3, "key": "c-a/eth0"}


def _to_gateway(node: str) -> TraceResult:
    return TraceResult(node, [TraceStep(node, "Output", 13, actions=["output:2"])], "1", 2,
                       "gateway")


def test_outside_the_cluster_leaves_the_node_masqueraded() -> None:
    t = Tracer(Canned(CannedAgent("node1", "10.244.1.0/24", [POD_A],
                                  {"8.8.8.8": _to_gateway("node1")})))
    v = t.trace("a", "8.8.8.8", "tcp", 443)
    assert v.delivered and v.outcome == LEFT_NODE
    assert "masqueraded to the node's address 192.168.77.1" in v.detail


def test_cluster_address_nobody_has_goes_nowhere() -> None:
    drop = TraceResult("node1", [TraceStep("node1", "L3Forwarding", 7, owner="tunnel",
                                           actions=["drop"])], "drop", None, "")
    t = Tracer(Canned(CannedAgent("node1", "10.244.1.0/24", [POD_A],
                                  {"10.244.1.200": drop, "10.244.9.9": drop})))
    v = t.trace("default/a", "10.244.1.200", "udp", 53)
    assert not v.delivered and v.outcome == NOWHERE and "no pod has it" in v.detail
    v = t.trace("default/a", "10.244.9.9", "udp", 53)
    assert v.outcome == NOWHERE and "in no node's pod CIDR" in v.detail


class TenantAgent(CannedAgent):
    """A canned agent that also knows one tenant network and counts "tenants" calls."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.tenant_calls = 0

    def call(self, verb: str, **args: Any) -> dict[str, Any]:
        if verb == "tenants":
            self.tenant_calls += 1
            return {"tenants": [{"name": "blue", "slices": {"node1": "10.50.1.0/24",
                                                            "node2": "10.50.2.0/24"}}]}
        return super().call(verb, **args)


def test_a_tenant_trace_asks_each_agent_for_tenants_at_most_once() -> None:
    blue_a = {**POD_A, "ip": "10.50.1.2", "tenant": "blue", "tenant_vni": 4100}
    blue_b = {**POD_A, "name": "b", "ip": "10.50.2.2", "tenant": "blue", "tenant_vni": 4100,
              "key": "c-b/eth0"}
    tunnel = TraceResult("node1", [TraceStep("node1", "Output", 13, actions=["output:9"])],
                         "1", 9, "tunnel", tunnel_dst="192.168.77.2")
    arrive = TraceResult("node2", [TraceStep("node2", "Output", 13, actions=["output:3"])],
                         "3", 3, "pod default/b")
    n1 = TenantAgent("node1", "10.244.1.0/24", [blue_a],
                     {"10.50.2.2": tunnel, "10.50.9.9": _to_gateway("node1")})
    n2 = TenantAgent("node2", "10.244.2.0/24", [blue_b], {"10.50.2.2": arrive})
    t = Tracer(Canned(n1, n2))
    v = t.trace("default/a", "10.50.2.2", "tcp", 80)
    assert v.delivered and v.node == "node2" and v.tenant == "blue"
    assert n1.tenant_calls + n2.tenant_calls == 1
    # the gateway verdict looks the destination node up twice (hop, then verdict)
    v = t.trace("default/a", "10.50.9.9", "tcp", 80)
    assert v.node == "node1"
    assert n1.tenant_calls + n2.tenant_calls == 2  # once more: each trace asks afresh


def test_unknown_pod_is_an_error() -> None:
    t = Tracer(Canned(CannedAgent("node1", "10.244.1.0/24", [POD_A], {})))
    with pytest.raises(TraceError, match="no pod default/zz on any node"):
        t.trace("zz", "a")


# -- schema, rendering, tables --------------------------------------------------------------


def test_requests_are_checked_and_errors_name_the_field() -> None:
    with pytest.raises(APIError, match="unknown verb 'nope'") as e:
        Request.decode(b'{"verb": "nope"}')
    assert e.value.code == api.UNKNOWN_VERB
    with pytest.raises(APIError, match="not JSON"):
        Request.decode(b"{")
    with pytest.raises(APIError, match="'args' must be an object"):
        Request.decode(b'{"verb": "flows", "args": 3}')
    req = Request.decode(Request("trace", {"flow": 5}).encode())
    with pytest.raises(APIError, match="argument 'flow' must be str"):
        api.arg(req, "flow", str)
    with pytest.raises(APIError, match="argument 'flow' is required"):
        api.arg(Request("trace"), "flow", str)
    assert api.decode_reply(api.encode_reply({"x": 1})) == {"x": 1}
    with pytest.raises(APIError, match="gone") as e:
        api.decode_reply(api.encode_reply(error=APIError(api.NOT_FOUND, "gone")))
    assert e.value.code == api.NOT_FOUND


def test_flow_row_round_trip_ignores_unknown_fields() -> None:
    r = FlowRow("Classifier", 0, 200, "in_port=3", "goto_table:SpoofGuard", "0x1", 1, "pod",
                "0x3", owner="pod:c/eth0", object="pod default/a", n_packets=4)
    assert FlowRow.from_dict({**r.to_dict(), "added_later": 1}) == r
    assert "table=Classifier priority=200 in_port=3" in r.text()


def test_actions_render_without_failing_on_nicira_actions() -> None:
    from os_ken.ofproto import nicira_ext
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as p
    ins = [p.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, [
        p.NXActionRegMove(src_field="eth_src", dst_field="eth_dst", n_bits=48),
        p.NXActionOutputReg(ofs_nbits=nicira_ext.ofs_nbits(0, 31), src="reg1", max_len=0)]),
        p.OFPInstructionGotoTable(PIPELINE.id("Output"))]
    text = render_actions(ins, NAMES)
    assert text.endswith("goto_table:Output") and "NXActionOutputReg(" in text
    assert "_nxm" not in text
    assert render_actions([], NAMES) == "drop"


def test_status_and_policy_rows_show_errors_and_isolation() -> None:
    rows = flowctl.status_rows([{"node": "n1", "connected": True, "synced": False,
                                 "change_failures": [{"kind": "Pod", "name": "bad"}]},
                                {"node": "n2", "error": "unreachable"}])
    assert rows[0]["connected"] == "yes" and rows[0]["synced"] == "no"
    assert rows[0]["change_failures"] == 1  # changes the agent skipped (--json names them)
    assert rows[1] == {"node": "n2", "connected": "ERROR", "synced": "unreachable"}
    rep = {"rules": [], "isolation": {"default/b": {"ingress": ["default/deny"],
                                                    "egress": []}}}
    rows = flowctl.policy_rows("n1", rep, None)
    assert [(r["policy"], r["rule"], r["pods"]) for r in rows] == [
        ("default/deny", "ingress: isolates", 1)]
    assert flowctl.policy_rows("n1", rep, "default/other") == []


def test_every_option_names_its_default_or_choices() -> None:
    parser = flowctl.build_parser(extra={})
    sub = next(a for a in parser._actions if a.dest == "cmd")
    fl = sub.choices["flows"]  # type: ignore[attr-defined]
    table = next(a for a in fl._actions if a.dest == "table")
    assert table.choices == list(PIPELINE.ids) and "Classifier" in table.help
    tr = sub.choices["trace"]  # type: ignore[attr-defined]
    proto = next(a for a in tr._actions if a.dest == "proto")
    assert proto.choices == ("tcp", "udp", "icmp", "sctp") and "default" in proto.help


def test_no_node_of_that_name() -> None:
    class One:
        kind = "local"

        def agents(self) -> list[NodeAgent]:
            return [NodeAgent("n1", AgentClient("/nonexistent"))]

        def describe(self) -> str:
            return "one"

    with pytest.raises(ProviderError, match="no node 'n9' .*nodes: n1"):
        select(One(), "n9")
    with pytest.raises(AgentError, match="no agent API socket at /nonexistent") as e:
        AgentClient("/nonexistent").call("status")
    assert e.value.code == "unreachable"


# -- sockets and the cluster transport -------------------------------------------------------


class Answers:
    """A stand-in for the agent's handlers: the transport under test is the socket and the
    pod exec, not the agent (the datapath tests drive the real one)."""

    def __init__(self, node: str) -> None:
        self.node = node

    def handle(self, req: Request) -> dict[str, Any]:
        if req.verb == "status":
            return {"node": self.node}
        raise APIError(api.NOT_FOUND, f"{req.verb}: nothing here")


def test_api_socket_modes(tmp_path: Path) -> None:
    s = APIServer(str(tmp_path / "a" / "api.sock"), Answers("n1"))  # type: ignore[arg-type]
    s.start()
    try:
        assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o600
    finally:
        s.stop()
    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name
    s = APIServer(str(tmp_path / "b" / "api.sock"), Answers("n1"),  # type: ignore[arg-type]
                  group=group)
    s.start()
    try:
        st = os.stat(s.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
        assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o710
    finally:
        s.stop()
    with pytest.raises(ValueError, match="no such group"):
        APIServer(str(tmp_path / "c" / "api.sock"), Answers("n1"),  # type: ignore[arg-type]
                  group="no-such-group-here")


def test_cluster_provider_fans_out_through_pod_exec(tmp_path: Path) -> None:
    """Agent pods found by label on the API server; each call is `flowctl call` run by
    the pod's exec, reaching that node's agent socket."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flowctl").write_text(f"#!/bin/sh\nexec {sys.executable} -m "
                                     "flowcni.ctl.flowctl \"$@\"\n")
    (bin_dir / "flowctl").chmod(0o755)
    servers = []
    with FakeAPIServer() as fake:
        try:
            for node in ("n1", "n2"):
                sock = str(tmp_path / node / "api.sock")
                srv = APIServer(sock, Answers(node))  # type: ignore[arg-type]
                srv.start()
                servers.append(srv)
                fake.put("pods", pod_obj("flowcni-system", f"flowcni-agent-{node}", node,
                                         None, {"app": "flowcni-agent"}, container="agent"))
                fake.set_exec("flowcni-system", f"flowcni-agent-{node}", [
                    "env", f"PATH={bin_dir}:{os.environ['PATH']}",
                    f"FLOWCNI_AGENT_SOCKET={sock}", f"PYTHONPATH={os.getcwd()}"])
            fake.put("pods", pod_obj("flowcni-system", "flowcni-agent-n3", "n3", None,
                                     {"app": "flowcni-agent"}, phase="Pending",
                                     container="agent"))
            fake.put("pods", pod_obj("default", "web", "n1", None, {"app": "web"}))
            kc = write_kubeconfig(str(tmp_path / "kubeconfig"), fake.url)
            p = ClusterProvider(kc, None)
            agents = select(p, None)
            assert [a.name for a in agents] == ["n1", "n2"]  # n3 is not running
            assert [a.call("status")["node"] for a in agents] == ["n1", "n2"]
            with pytest.raises(AgentError, match="groups: nothing here") as e:
                agents[1].call("groups")
            assert e.value.code == api.NOT_FOUND
            with pytest.raises(ProviderError, match="no node 'n9'"):
                select(p, "n9")
            assert any(r["path"].endswith("/pods/flowcni-agent-n2/exec")
                       for r in fake.requests())
        finally:
            for s in servers:
                s.stop()


def test_exec_of_a_missing_pod_is_an_error(tmp_path: Path) -> None:
    from flowcni.ctl.providers import ExecClient
    from kubernetes import client, config
    with FakeAPIServer() as fake:
        kc = write_kubeconfig(str(tmp_path / "kubeconfig"), fake.url)
        core = client.CoreV1Api(config.new_client_from_config(config_file=kc))
        with pytest.raises(AgentError, match="exec in agent pod flowcni-system/gone"):
            ExecClient(core, "flowcni-system", "gone", "agent", "/x").call("status")


def test_call_prints_the_raw_reply(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert flowctl.main(["call", "--agent-socket", str(tmp_path / "none"), "status"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["error"]["code"] == "unreachable"


def test_provider_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--kubeconfig/--context: the cluster; --agent-socket or $FLOWCNI_AGENT_SOCKET: this
    node; --lab: the lab (an error when none is up); nothing: a lab that is up, else the
    default socket, else a message naming all three."""
    from flowcni.ctl.providers import LocalProvider, from_args
    monkeypatch.setenv("FLOWCNI_LAB_DIR", str(tmp_path / "no-lab"))
    monkeypatch.delenv(api.SOCKET_ENV, raising=False)
    parser = flowctl.build_parser()

    def choose(*argv: str) -> Any:
        return from_args(parser.parse_args([*argv, "status"]))

    assert isinstance(choose("--kubeconfig", "k"), ClusterProvider)
    assert isinstance(choose("--context", "c"), ClusterProvider)
    p = choose("--agent-socket", "/x.sock")
    assert isinstance(p, LocalProvider) and p.path == "/x.sock"
    monkeypatch.setenv(api.SOCKET_ENV, "/env.sock")
    p = choose()
    assert isinstance(p, LocalProvider) and p.path == "/env.sock"
    monkeypatch.delenv(api.SOCKET_ENV)
    with pytest.raises(RuntimeError, match="--lab: no lab in"):
        choose("--lab")
    if not os.path.exists(api.DEFAULT_SOCKET):
        with pytest.raises(ProviderError, match="--agent-socket PATH, --kubeconfig/--context "
                                                "or --lab"):
            choose()
    (tmp_path / "no-lab").mkdir()
    (tmp_path / "no-lab" / "lab.json").write_text('{"nodes": [], "pods": []}')
    p = choose()
    assert p.kind == "lab" and str(tmp_path / "no-lab") in p.describe()
    # options after the command count too
    p = from_args(parser.parse_args(["status", "--agent-socket", "/y.sock"]))
    assert isinstance(p, LocalProvider) and p.path == "/y.sock"
