"""Cluster policy truth table (Admin tier, NetworkPolicy, Baseline tier) on a 2-node lab.

Each case in cluster_policy_cases.yaml is written as v1alpha2 ClusterNetworkPolicy
documents; the test also translates them, document for document, into the v1alpha1 form
(AdminNetworkPolicy, BaselineAdminNetworkPolicy `default`) and runs the case again: both
must give the case's one table. Probes are real connections (TCP 80, TCP 81, UDP 53)
between every pair of pods, to node2's node IP and to the external host, all at once, so
every denied cell is shown next to allowed cells probed at the same time. Each probe runs
once. `flowctl trace` must agree with every cell, and name tier, priority, policy and rule
for every drop a cluster policy makes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from flowcni.ctl.trace import Tracer
from flowcni.datastore.manifests import load
from flowcni.flows.clusterpolicy import KINDS, V1ALPHA1, V1ALPHA2
from flowcni.lab.lab import EXTERNAL_IP, Lab

from tests.datapath.conftest import make_lab
from tests.datapath.test_policy import PODS, PolicyLab
from tests.support import reach
from tests.support.reach import PROBE_PACKET, PROBES, differing, matrix, start_netns_server

CASES = yaml.safe_load(open(os.path.join(os.path.dirname(__file__),
                                         "cluster_policy_cases.yaml")))
NAMESPACES = {"default": {"kubernetes.io/metadata.name": "default"},
              "prod": {"kubernetes.io/metadata.name": "prod", "env": "prod"},
              "dev": {"kubernetes.io/metadata.name": "dev", "env": "dev"}}
NODE = "node2"  # a destination: the node IP of node2, a server in its netns
DESTS = [*PODS, NODE, "ext"]


# -- v1alpha2 -> v1alpha1, as a user would rewrite the documents -----------------------------


def _ports_v1alpha1(protocols: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in protocols:
        if "destinationNamedPort" in p:
            out.append({"namedPort": p["destinationNamedPort"]})
            continue
        (proto, attrs), = p.items()
        dp = attrs["destinationPort"]
        if "number" in dp:
            out.append({"portNumber": {"protocol": proto.upper(), "port": dp["number"]}})
        else:
            out.append({"portRange": {"protocol": proto.upper(), **dp["range"]}})
    return out


def to_v1alpha1(doc: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(doc["spec"])
    tier = spec.pop("tier")
    if tier == "Baseline":
        kind, name = "BaselineAdminNetworkPolicy", "default"
        spec.pop("priority")
    else:
        kind, name = "AdminNetworkPolicy", doc["metadata"]["name"]
    for d in ("ingress", "egress"):
        for r in spec.get(d) or []:
            r["action"] = {"Accept": "Allow"}.get(r["action"], r["action"])
            if "protocols" in r:
                r["ports"] = _ports_v1alpha1(r.pop("protocols"))
    return {"apiVersion": V1ALPHA1, "kind": kind, "metadata": {"name": name}, "spec": spec}


def manifests(case: dict[str, Any], version: str) -> str:
    docs = [d for d in yaml.safe_load_all(case["cnp"]) if d]
    if version == "v1alpha2":
        docs = [{"apiVersion": V1ALPHA2, **d} for d in docs]
    else:
        docs = [to_v1alpha1(d) for d in docs]
    return yaml.safe_dump_all(docs)


# -- the lab -------------------------------------------------------------------------------


class ClusterPolicyLab(PolicyLab):
    def reset(self) -> None:
        """No policy of any kind, namespaces as NAMESPACES; writes only what differs (a
        namespace write makes every agent recompute every cluster policy)."""
        store = self.lab.store()
        changed = False
        for kind in ("NetworkPolicy", *KINDS):
            for p in store.objects(kind):
                changed |= store.delete(kind, p.get("namespace", ""), p["name"])
        for ns, labels in NAMESPACES.items():
            body = store.get("Namespace", "", ns)
            if body is None or body.get("labels") != labels:
                self.set_namespace(ns, labels)
                changed = True
        if changed:
            self.lab.wait_realized()

    def node_ip(self) -> str:
        return next(n.node_ip for n in self.lab.nodes() if n.name == NODE)

    def observed(self) -> dict[str, dict[str, set[str]]]:
        dests = {n: self.lab.pod(self.ref(n)).ip for n in PODS}
        dests[NODE] = self.node_ip()
        got = matrix(self.lab, [self.ref(n) for n in PODS], dests, (EXTERNAL_IP, "80"))
        return {s.split("/")[1]: row for s, row in got.items()}


@pytest.fixture(scope="module")
def clab() -> Iterator[ClusterPolicyLab]:
    lab: Lab = make_lab("cnp")
    lab.down()
    pl = ClusterPolicyLab(lab)
    servers: list[subprocess.Popen[str]] = []
    try:
        lab.up(nodes=2, encap="geneve")
        for ns, labels in NAMESPACES.items():
            pl.set_namespace(ns, labels)
        for name in PODS:
            pl.add_pod(name)
        servers.append(start_netns_server(lab.external_ns, ["80"]))
        node = next(n for n in lab.nodes() if n.name == NODE)
        servers.append(start_netns_server(node.netns, PROBES))
        yield pl
    finally:
        for s in [*pl.servers.values(), *servers]:
            s.kill()
            s.wait()
        lab.down()


def expected(spec: dict[str, Any]) -> dict[str, dict[str, set[str]]]:
    """The full matrix of a case's `expect`: pods to pods, node2's IP and the external host."""
    return reach.expected(spec, list(PODS), DESTS)


def check_traces(pl: ClusterPolicyLab, got: dict[str, dict[str, set[str]]]) -> list[str]:
    """flowctl trace agrees with every probed cell; a tier's drop names tier, priority,
    policy and rule."""
    tracer = Tracer(pl.lab)
    wrong = []
    for s, row in got.items():
        for d in DESTS:
            if d == s:
                continue
            target = (EXTERNAL_IP if d == "ext" else pl.node_ip() if d == NODE
                      else pl.ref(d))
            for probe in (["80"] if d == "ext" else PROBES):
                proto, port = PROBE_PACKET[probe]
                v = tracer.trace(pl.ref(s), target, proto, port)
                if v.delivered != (probe in row.get(d, set())):
                    wrong.append(f"{s} -> {d} {probe}: trace says {v.detail}")
                elif not v.delivered and v.table.startswith(("Admin", "Baseline")) and not (
                        v.policies and " tier, priority " in v.policies[0]
                        and " rule " in v.policies[0]):
                    wrong.append(f"{s} -> {d} {probe}: drop names no tier/rule: {v.detail}")
    return wrong


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert len({c["name"] for c in CASES}) == len(CASES)


def test_translation_covers_both_versions() -> None:
    """Every case loads in both versions (the same validation `flowctl apply -f` runs)."""
    for c in CASES:
        for version in ("v1alpha1", "v1alpha2"):
            kinds = {k for k, _, _, _ in load(manifests(c, version))}
            assert kinds <= set(KINDS), (c["name"], version, kinds)
            assert ("ClusterNetworkPolicy" in kinds) == (version == "v1alpha2")


@pytest.mark.parametrize("version", ["v1alpha2", "v1alpha1"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cluster_policy_case(clab: ClusterPolicyLab, case: dict[str, Any],
                             version: str) -> None:
    clab.reset()
    store = clab.lab.store()
    try:
        for text in ([case["np"]] if case.get("np") else []) + [manifests(case, version)]:
            for kind, ns, name, body in load(text):
                store.put(kind, ns, name, body)
        clab.lab.wait_realized()
        want = expected(case["expect"])
        got = clab.observed()
        diff = differing(want, got)
        assert not diff, f"{version}:\n" + "\n".join(diff)
        if version == "v1alpha2":  # the tables are equal; trace one of them
            wrong = check_traces(clab, got)
            assert not wrong, "\n".join(wrong)
    finally:
        clab.reset()


def test_flowctl_policy_shows_tier_priority_rules_and_packets(
        clab: ClusterPolicyLab, capsys: pytest.CaptureFixture[str]) -> None:
    """`flowctl policy` lists cluster policies in evaluation order with tier, priority and,
    per rule and node, flows and the packets its conjunctions matched; `flowctl trace` of a
    dropped packet names tier, priority, policy and rule."""
    from flowcni.ctl.flowctl import show_policy
    case = next(c for c in CASES if c["name"] == "admin-pass-hands-to-networkpolicy")
    clab.reset()
    store = clab.lab.store()
    try:
        for text in (case["np"], manifests(case, "v1alpha2")):
            for kind, ns, name, body in load(text):
                store.put(kind, ns, name, body)
        clab.lab.wait_realized()
        got = clab.observed()
        assert got["api"]["web"] == set() and got["tool"]["web"] == set(PROBES), got
        show_policy(clab.lab.agents(), as_json=True)
        rows = [r for r in json.loads(capsys.readouterr().out) if "tier" in r]
        node1 = [r for r in rows if r["node"] == "node1"]
        assert [(r["policy"], r["priority"], r["rule"], r["action"]) for r in node1] == [
            ("ClusterNetworkPolicy/pass-dev", 5, "ingress[0]", "pass"),
            ("ClusterNetworkPolicy/deny-everyone", 20, "ingress[0]", "deny")]
        # web (node1) was probed from dev (passed: 3 probes) and from api/client (denied)
        assert all(r["flows"] > 0 and r["packets"] > 0 for r in node1), node1
        assert node1[0]["of_priority"] > node1[1]["of_priority"]
        v = Tracer(clab.lab).trace(clab.ref("api"), clab.ref("web"), "tcp", 80)
        assert not v.delivered and v.table == "AdminIngress"
        assert v.policies == ["Admin tier, priority 20, ClusterNetworkPolicy deny-everyone, "
                              "ingress rule 0"], v.policies
        assert "denied by Admin tier, priority 20" in v.detail, v.detail
        v = Tracer(clab.lab).trace(clab.ref("tool"), clab.ref("web"), "tcp", 80)
        assert v.delivered and any("passed to NetworkPolicy" in (s.story or "")
                                   for s in v.steps), [s.story for s in v.steps]
    finally:
        clab.reset()
