"""Inspection: drift detection and repair, and the Prometheus endpoint, on a real lab."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from flowcni.ctl.client import AgentClient
from flowcni.ctl.flowctl import main as flowctl
from flowcni.flows.tables import DEFAULT as PIPELINE
from flowcni.lab import netns
from flowcni.lab.lab import Lab
from prometheus_client.parser import text_string_to_metric_families

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually, ping


@pytest.fixture(scope="module")
def ilab() -> Iterator[Lab]:
    with running_lab("insp", nodes=2, pods=[("a", "node1", {"app": "a"}),
                                            ("b", "node2", {"app": "b"})]) as lab:
        yield lab


def stale(lab: Lab, node: str) -> dict[str, list[str]]:
    st = AgentClient(lab.node(node).api_socket).call("stale")
    return {"missing": st["missing"], "unexpected": st["unexpected"]}


def test_stale_empty_then_lists_and_repairs_hand_edits(ilab: Lab,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    node = ilab.node("node1")
    a = ilab.pod("a")
    assert stale(ilab, "node1") == {"missing": [], "unexpected": []}
    l3 = PIPELINE.id("L3Forwarding")
    node.ovs.ofctl("del-flows", "--strict", "br-int", f"table={l3},priority=200,ip,nw_dst={a.ip}")
    node.ovs.ofctl("add-flow", "br-int", f"table={l3},priority=300,ip,nw_dst=10.9.9.9,"
                   "actions=drop")
    st = stale(ilab, "node1")
    assert len(st["missing"]) == 1 and f"nw_dst={a.ip}" in st["missing"][0]
    assert len(st["unexpected"]) == 1 and "10.9.9.9" in st["unexpected"][0]
    # the CLI shows the same, as JSON
    import os
    os.environ["FLOWCNI_LAB_DIR"], os.environ["FLOWCNI_LAB_PREFIX"] = ilab.base, ilab.prefix
    try:
        assert flowctl(["flows", "--node", "node1", "--stale", "--json"]) == 0
    finally:
        del os.environ["FLOWCNI_LAB_DIR"], os.environ["FLOWCNI_LAB_PREFIX"]
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["missing"]) == 1 and len(out[0]["unexpected"]) == 1
    # the agent repairs both within its resync period (10 s in the lab)
    assert eventually(lambda: stale(ilab, "node1") == {"missing": [], "unexpected": []},
                      timeout=25)
    assert ping(ilab, "b", a.ip, count=2)


def scrape(lab: Lab, node: str) -> dict[str, float]:
    out = subprocess.run(netns.exec_argv(lab.node(node).netns, [
        "python3", "-c", "import urllib.request;print(urllib.request.urlopen("
        "'http://127.0.0.1:9153/metrics', timeout=5).read().decode())"]),
        capture_output=True, text=True, check=True).stdout
    values = {}
    for fam in text_string_to_metric_families(out):
        for s in fam.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            values[key] = s.value
    return values


def test_metrics_parse_and_move(ilab: Lab) -> None:
    before = scrape(ilab, "node1")
    assert before["flowcni_openflow_connected"] == 1
    assert before["flowcni_flows,table=Classifier"] >= 3
    adds = before.get("flowcni_cni_request_seconds_count,command=ADD,result=ok", 0)
    ilab.pod_add("c", "node1", labels={"app": "c"})
    ilab.store().put("NetworkPolicy", "default", "m", {
        "namespace": "default", "name": "m",
        "spec": {"podSelector": {"matchLabels": {"app": "c"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}})
    ilab.wait_realized()
    after = scrape(ilab, "node1")
    assert after["flowcni_cni_request_seconds_count,command=ADD,result=ok"] == adds + 1
    assert after["flowcni_datastore_events_total,kind=NetworkPolicy,op=put"] >= 1
    assert after["flowcni_policy_realization_seconds_count"] > before.get(
        "flowcni_policy_realization_seconds_count", 0)
    assert after["flowcni_flows,table=IngressRule"] > before["flowcni_flows,table=IngressRule"]
    assert after["flowcni_datastore_applied_revision"] > before[
        "flowcni_datastore_applied_revision"]


def test_live_traceflow_cross_node_and_denied(ilab: Lab) -> None:
    from flowcni.ctl.trace import Tracer
    a, b = ilab.pod("a"), ilab.pod("b")
    r = Tracer(ilab).live(a.ref, b.ref, "tcp", 80)
    assert r["nodes"] == ["node1", "node2"], r["observations"]
    assert r["delivered"] and r["output"] == f"pod {b.ref}", r
    assert r["observations"][0]["output"] == "tunnel"
    assert r["matches_trace"], r
    ilab.store().put("NetworkPolicy", "default", "deny-b", {
        "namespace": "default", "name": "deny-b",
        "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}})
    ilab.wait_realized()
    try:
        r = Tracer(ilab).live(a.ref, b.ref, "udp", 53)
        assert not r["delivered"] and r["node"] == "node2", r
        assert r["table"] == "IngressDefault" and r["owner"] == f"isolation:{b.ref}", r
        assert r["matches_trace"] and "default/deny-b" in r["trace"]["policies"], r
        # the observation points are gone afterwards
        flows = ilab.node("node2").ovs.ofctl("dump-flows", "br-int")
        assert "ip_dscp" not in flows
    finally:
        ilab.store().delete("NetworkPolicy", "default", "deny-b")
        ilab.wait_realized()


def lab_flowctl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    import os
    import sys
    env = {**os.environ, "FLOWCNI_LAB_DIR": lab.base, "FLOWCNI_LAB_PREFIX": lab.prefix}
    env.pop("FLOWCNI_AGENT_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_flowctl_on_the_lab(ilab: Lab) -> None:
    """The same commands as on a plain node, with the lab as node provider."""
    p = lab_flowctl(ilab, "--lab", "status")
    assert p.returncode == 0, p.stderr
    assert [ln.split()[:3] for ln in p.stdout.splitlines()[1:]] == [
        ["node1", "yes", "yes"], ["node2", "yes", "yes"]]
    p = lab_flowctl(ilab, "status", "--json")  # no option: the lab is found, and said so
    assert p.returncode == 0 and "using the lab in " + ilab.base in p.stderr
    p = lab_flowctl(ilab, "flows", "--node", "node1", "--pod", "default/a", "--json")
    rows = json.loads(p.stdout)[0]["flows"]
    assert rows and {r["object"] for r in rows} == {"pod default/a"}
    p = lab_flowctl(ilab, "flows", "--node", "node1", "--pod", "default/nosuch")
    assert p.returncode == 1 and "no such pod" in p.stderr
    p = lab_flowctl(ilab, "--lab", "--node", "node3", "flows")
    assert p.returncode == 1 and "no node 'node3'" in p.stderr
    p = lab_flowctl(ilab, "trace", "--from", "a", "--to", "b", "--dport", "80")
    assert p.returncode == 0 and "delivered to pod default/b on node2" in p.stdout
    p = lab_flowctl(ilab, "policy", "default/none")
    assert p.returncode == 1 and "not realized" in p.stderr
    p = lab_flowctl(ilab, "tables")
    assert p.returncode == 0 and "Classifier" in p.stdout
    # A policy's flows under their owners' names, read back from the cookies: its
    # rule, and each clause flow named after the one value it matches (clause flows
    # own themselves: the agent keeps no name per flow, it makes them when asked).
    b_ip = ilab.pod("b").ip
    ilab.store().put("NetworkPolicy", "default", "from-x", {
        "namespace": "default", "name": "from-x", "spec": {
            "podSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.7/32"}}],
                         "ports": [{"port": 8080}]}]}})
    ilab.wait_realized()
    try:
        p = lab_flowctl(ilab, "flows", "--node", "node2", "--policy", "default/from-x", "--json")
        assert p.returncode == 0, p.stderr
        rows = json.loads(p.stdout)[0]["flows"]
        pre = "policy-match:IngressRule:200:"
        assert {(r["owner"], r["object"]) for r in rows if not r["owner"].startswith("rule:")} \
            == {(pre + m, "policy match (shared)") for m in (
                f"ipv4_dst={b_ip}", "ipv4_src=192.0.2.7", "port=TCP/8080")}, rows
        assert [r["object"] for r in rows if r["owner"].startswith("rule:default/from-x/")] \
            == ["policy rule default/from-x/ingress/0"], rows
    finally:
        ilab.store().delete("NetworkPolicy", "default", "from-x")
        ilab.wait_realized()
    p = lab_flowctl(ilab, "groups", "--json")
    assert p.returncode == 0 and [g["node"] for g in json.loads(p.stdout)] == ["node1", "node2"]
