"""Cluster policy model and flows: both API versions, bad input, cost, order (no switch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from flowcni.datastore.manifests import ManifestError, load
from flowcni.flows.clusterpolicy import (
    PRIO_TOP,
    SLOTS,
    ClusterPolicyEngine,
    parse_cluster_policy,
)
from flowcni.flows.model import Conjunction
from flowcni.flows.policy import PolicyError

V2 = """
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: tenants}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {tenant: a}}}
  ingress:
  - name: deny-b
    action: Deny
    from: [{namespaces: {matchLabels: {tenant: b}}}]
    protocols:
    - tcp: {destinationPort: {number: 80}}
    - udp: {destinationPort: {range: {start: 1000, end: 1003}}}
    - destinationNamedPort: http
  egress:
  - action: Accept
    to: [{networks: [10.9.0.0/16]}, {nodes: {}}]
  - action: Pass
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: x}}}}]
"""
V1 = """
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: tenants}
spec:
  priority: 10
  subject: {namespaces: {matchLabels: {tenant: a}}}
  ingress:
  - name: deny-b
    action: Deny
    from: [{namespaces: {matchLabels: {tenant: b}}}]
    ports:
    - portNumber: {protocol: TCP, port: 80}
    - portRange: {protocol: UDP, start: 1000, end: 1003}
    - namedPort: http
  egress:
  - action: Allow
    to: [{networks: [10.9.0.0/16]}, {nodes: {}}]
  - action: Pass
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: x}}}}]
"""


def parsed(text: str) -> Any:
    (kind, _ns, name, body), = load(text)
    return parse_cluster_policy(kind, name, body["spec"])


def test_both_versions_give_one_model() -> None:
    a, b = parsed(V1), parsed(V2)
    assert (a.kind, b.kind) == ("AdminNetworkPolicy", "ClusterNetworkPolicy")
    assert (a.tier, a.priority, a.subject_ns, a.rules) == (b.tier, b.priority, b.subject_ns,
                                                           b.rules)
    assert [r.action for r in a.rules] == ["deny", "accept", "pass"]


def test_banp_is_the_baseline_tier() -> None:
    p = parsed("""
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]
""")
    assert (p.tier, p.priority, p.rules[0].action) == ("Baseline", 1000, "deny")


def bad(text: str, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        load(text)
    assert field in str(e.value), str(e.value)


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


def test_bad_input_names_the_field() -> None:
    bad(edit(V2, "priority: 10", "priority: 1001"), "spec.priority")
    bad(edit(V1, "priority: 10", "priority: -1"), "spec.priority")
    bad(edit(V2, "tier: Admin", "tier: Middle"), "spec.tier")
    bad(edit(V2, "action: Deny", "action: Drop"), "spec.ingress[0].action")
    bad(edit(V1, "action: Allow", "action: Accept"), "spec.egress[0].action")  # v1alpha2 word
    bad(edit(V2, "action: Accept", "action: Allow"), "spec.egress[0].action")  # v1alpha1 word
    bad(edit(V1, "priority: 10", "priority: 10\n  tier: Admin"), "spec.tier")  # not in v1alpha1
    bad(edit(V2, "protocols:", "ports:"), "spec.ingress[0].ports")           # not in v1alpha2
    bad(edit(V1, "ports:", "protocols:"), "spec.ingress[0].protocols")       # not in v1alpha1
    bad(edit(V2, "{matchLabels: {tenant: a}}",
             "{matchLabels: {tenant: a}, matchExpressions: [{key: tenant, operator: "
             "DoesNotExist}]}"), "spec.subject.namespaces")                  # never matches
    bad(edit(V2, "{matchLabels: {tenant: b}}",
             "{matchExpressions: [{key: t, operator: In, values: [x]}, "
             "{key: t, operator: In, values: [y]}]}"), "spec.ingress[0].from[0].namespaces")
    bad(edit(V2, "[{networks: [10.9.0.0/16]}, {nodes: {}}]", "[{domainNames: [a.io]}]"),
        "spec.egress[0].to[0].domainNames")
    bad(edit(V2, "[{networks: [10.9.0.0/16]}, {nodes: {}}]", "[{networks: [10.9.0.0/33]}]"),
        "spec.egress[0].to[0].networks[0]")
    bad(edit(V2, "{namespaces: {matchLabels: {tenant: b}}}",
             "{namespaces: {}, pods: {namespaceSelector: {}, podSelector: {}}}"),
        "spec.ingress[0].from[0]")                                           # two peer fields
    bad(edit(V2, "{number: 80}", "{number: 0}"), "destinationPort.number")
    bad(edit(V2, "{start: 1000, end: 1003}", "{start: 1003, end: 1000}"), "range.end")
    load(edit(V2, "protocols:\n    - tcp", "protocols:\n    - destinationNamedPort: x\n    - tcp"))
    egress_named = edit(V2, "  - action: Accept\n    to: [{networks: [10.9.0.0/16]}, {nodes: {}}]",
                        "  - action: Accept\n    to: [{networks: [10.9.0.0/16]}]\n"
                        "    protocols: [{destinationNamedPort: http}]")
    bad(egress_named, "spec.egress[0].protocols")
    banp = """
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: second}
spec: {subject: {namespaces: {}}}
"""
    bad(banp, "metadata.name")                     # a second BANP can only have another name
    bad(edit(banp, "name: second", "name: default").replace("spec: {", "spec: {priority: 3, "),
        "spec.priority")                            # BANP has no priority
    bad(edit(V2, "kind: ClusterNetworkPolicy", "kind: AdminNetworkPolicy"), "apiVersion")
    bad(edit(V2, "metadata: {name: tenants}", "metadata: {name: tenants, namespace: x}"),
        "metadata.namespace")


def test_bad_rule_that_cannot_match_is_not_bad() -> None:
    # A rule whose peers select nothing today is valid (pods come later).
    parsed(edit(V2, "{matchLabels: {tenant: b}}", "{matchLabels: {tenant: nobody}}"))


@dataclass
class Change:
    kind: str
    namespace: str
    name: str
    op: str
    body: dict[str, Any] | None
    rev: int = 0


def pod(name: str, ns: str, node: str, ip: str, labels: dict[str, str],
        ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "node": node, "ip": ip, "labels": labels,
            "ports": ports or []}


def cnp(name: str, priority: int, rules: list[dict[str, Any]], tier: str = "Admin",
        subject: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "spec": {"tier": tier, "priority": priority,
                                   "subject": subject or {"namespaces": {"matchLabels":
                                                                         {"tenant": "a"}}},
                                   "ingress": rules}}


def engine(pols: list[dict[str, Any]], n_local: int = 3, n_peers: int = 4
           ) -> tuple[ClusterPolicyEngine, dict[str, Any], list[str]]:
    e = ClusterPolicyEngine("n1")
    pods = [pod(f"a{i}", "a", "n1", f"10.0.1.{i + 1}", {"app": "x"}) for i in range(n_local)]
    pods += [pod(f"b{i}", "b", "n2", f"10.0.2.{i + 1}", {}) for i in range(n_peers)]
    owners, problems = e.load([{"name": "a", "labels": {"tenant": "a"}},
                               {"name": "b", "labels": {"tenant": "b"}}], pods,
                              [{"name": "n1", "nodeIP": "192.168.0.1"}],
                              {"ClusterNetworkPolicy": pols})
    return e, owners, problems


DENY_B_TCP = {"action": "Deny", "from": [{"namespaces": {"matchLabels": {"tenant": "b"}}}],
              "protocols": [{"tcp": {"destinationPort": {"number": 80}}},
                            {"tcp": {"destinationPort": {"number": 443}}}]}


def test_rule_costs_subjects_plus_peers_plus_ports_plus_one() -> None:
    _, owners, problems = engine([cnp("p", 10, [DENY_B_TCP])], n_local=30, n_peers=40)
    assert not problems
    flows = owners["cluster-rule:ClusterNetworkPolicy/p/ingress/0"]
    assert len(flows) == 30 + 40 + 2 + 1
    conj = [f for f in flows if any(k == "conj_id" for k, _ in f.match)]
    assert len(conj) == 1 and conj[0].actions == () and conj[0].goto is None  # Deny: drop
    assert {f.table for f in flows} == {"AdminIngress"}
    assert all(isinstance(a, Conjunction) for f in flows if f not in conj for a in f.actions)


def test_priorities_follow_policy_priority_rule_order_and_name() -> None:
    accept = {"action": "Accept", "from": [{"namespaces": {}}]}
    _, owners, _ = engine([cnp("z-first", 5, [DENY_B_TCP, accept]),
                           cnp("b-tie", 9, [accept]), cnp("a-tie", 9, [accept])])

    def prio(owner: str) -> int:
        return {f.priority for f in owners[f"cluster-rule:ClusterNetworkPolicy/{owner}"]}.pop()

    order = [prio("z-first/ingress/0"), prio("z-first/ingress/1"), prio("a-tie/ingress/0"),
             prio("b-tie/ingress/0")]
    assert order == sorted(order, reverse=True) and len(set(order)) == 4
    assert order[0] == PRIO_TOP - 5 * SLOTS
    pass_ = {"action": "Pass", "from": [{"namespaces": {}}]}
    _, owners, _ = engine([cnp("p", 1, [pass_])])
    conj = [f for f in owners["cluster-rule:ClusterNetworkPolicy/p/ingress/0"]
            if any(k == "conj_id" for k, _ in f.match)]
    assert conj[0].goto == "IngressRule"


def test_named_port_resolves_on_the_subject() -> None:
    e = ClusterPolicyEngine("n1")
    owners, _ = e.load([{"name": "a", "labels": {"tenant": "a"}}],
                       [pod("w", "a", "n1", "10.0.1.1", {},
                            [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]),
                        pod("v", "a", "n1", "10.0.1.2", {})],
                       [], {"ClusterNetworkPolicy": [cnp("p", 1, [{
                           "action": "Deny", "from": [{"namespaces": {}}],
                           "protocols": [{"destinationNamedPort": "http"}]}])]})
    text = [f.ofctl(e.pipeline) if hasattr(f, "ofctl") else str(f)
            for f in owners["cluster-rule:ClusterNetworkPolicy/p/ingress/0"]]
    assert any("8080" in t for t in text)
    assert any("nw_dst=10.0.1.1" in t for t in text)
    assert not any("nw_dst=10.0.1.2" in t for t in text)  # no port named http: no subject


def test_changes_touch_only_their_own_policies() -> None:
    e, _, _ = engine([cnp("p", 10, [DENY_B_TCP]), cnp("q", 20, [DENY_B_TCP])])
    out, problems = e.apply([Change("Pod", "a", "a9", "put",
                                    pod("a9", "a", "n1", "10.0.1.99", {}))])
    assert not problems and set(out) == {"cluster-rule:ClusterNetworkPolicy/p/ingress/0",
                                         "cluster-rule:ClusterNetworkPolicy/q/ingress/0"}
    out, _ = e.apply([Change("Pod", "c", "c1", "put", pod("c1", "c", "n2", "10.0.3.1", {}))])
    assert out == {}  # a pod in no subject and no peer touches nothing
    out, _ = e.apply([Change("ClusterNetworkPolicy", "", "r", "put", cnp("r", 20, [DENY_B_TCP]))])
    assert set(out) == {"cluster-rule:ClusterNetworkPolicy/q/ingress/0",
                        "cluster-rule:ClusterNetworkPolicy/r/ingress/0"}  # same priority only


def test_watch_logs_and_skips_a_bad_object_and_keeps_the_rest() -> None:
    e, owners, problems = engine([cnp("good", 1, [DENY_B_TCP]),
                                  cnp("bad", 5000, [DENY_B_TCP])])
    assert "cluster-rule:ClusterNetworkPolicy/good/ingress/0" in owners
    assert len(problems) == 1 and "spec.priority" in problems[0] and "bad" in problems[0]
    out, problems = e.apply([Change("ClusterNetworkPolicy", "", "good", "put",
                                    cnp("good", 1, [{**DENY_B_TCP, "action": "Drop"}]))])
    assert problems and "spec.ingress[0].action" in problems[0]
    assert out == {"cluster-rule:ClusterNetworkPolicy/good/ingress/0": []}


def test_cases_yaml_is_valid() -> None:
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "datapath", "cluster_policy_cases.yaml")
    cases = yaml.safe_load(open(path))
    for c in cases:
        load("\n---\n".join("apiVersion: policy.networking.k8s.io/v1alpha2\n" + d
                            for d in c["cnp"].split("---\n")))
    with pytest.raises(PolicyError):
        parse_cluster_policy("NetworkPolicy", "x", {})


def test_metrics_per_tier() -> None:
    from flowcni.controller.metrics import ClusterPolicyCollector
    base = cnp("base", 1000, [DENY_B_TCP], tier="Baseline")
    e, owners, _ = engine([cnp("p", 10, [DENY_B_TCP]), cnp("q", 20, [DENY_B_TCP]), base])
    got = {(m.name, s.labels["tier"]): s.value
           for m in ClusterPolicyCollector(e.per_tier).collect() for s in m.samples}
    assert got[("flowcni_cluster_policy_policies", "Admin")] == 2
    assert got[("flowcni_cluster_policy_policies", "Baseline")] == 1
    assert got[("flowcni_cluster_policy_flows", "Baseline")] == len(
        owners["cluster-rule:ClusterNetworkPolicy/base/ingress/0"]) == 3 + 4 + 2 + 1


def test_flowctl_apply_takes_both_versions_and_refuses_bad_ones(tmp_path: Any) -> None:
    """`flowctl apply -f` writes both versions to the store; a bad object fails the whole
    file, exit 1, with the field named, and nothing is written."""
    import os
    import subprocess
    import sys

    from flowcni.datastore.store import Store
    path = tmp_path / "store.db"
    store = Store(str(path))

    def flowctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "FLOWCNI_LAB_DIR"}
        return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", *args,
                               "--datastore", f"sqlite:{path}", "-f", "-"], input=stdin,
                              capture_output=True, text=True, env=env)

    p = flowctl("apply", stdin=V1 + "---\n" + V2)
    assert p.returncode == 0, p.stderr
    assert "adminnetworkpolicy/tenants applied" in p.stdout
    assert "clusternetworkpolicy/tenants applied" in p.stdout
    assert [o["name"] for o in store.objects("ClusterNetworkPolicy")] == ["tenants"]
    p = flowctl("apply", stdin=edit(V2, "name: tenants", "name: other") + "---\n"
                + edit(V1, "priority: 10", "priority: 2000").replace("name: tenants",
                                                                      "name: other"))
    assert p.returncode == 1 and "spec.priority" in p.stderr, p.stderr
    assert len(store.objects("ClusterNetworkPolicy")) == 1  # all or nothing
    p = flowctl("delete", stdin=V2)
    assert p.returncode == 0 and "clusternetworkpolicy/tenants deleted" in p.stdout


def test_sctp_and_protocol_without_port() -> None:
    rule = {"action": "Deny", "from": [{"namespaces": {}}],
            "protocols": [{"sctp": {"destinationPort": {"number": 9}}}, {"udp": {}}]}
    _, owners, problems = engine([cnp("s", 1, [rule])], n_local=1, n_peers=1)
    assert not problems
    text = " ".join(str(f.match) for f in owners["cluster-rule:ClusterNetworkPolicy/s/ingress/0"])
    assert "('ip_proto', 132)" in text and "('sctp_dst', 9)" in text
    assert "('ip_proto', 17)" in text and "udp_dst" not in text  # every UDP port


def test_trace_stories_name_tier_priority_policy_and_rule() -> None:
    from flowcni.ctl.trace import Step, story
    who = "Admin tier, priority 10, ClusterNetworkPolicy deny-tenant-crossing, egress rule 0"
    own = "cluster-rule:ClusterNetworkPolicy/deny-tenant-crossing/egress/0"
    assert story(Step("n", "AdminEgress", 6, owner=own, object=who, actions=[])) == \
        f"AdminEgress: denied by {who}"
    assert story(Step("n", "AdminEgress", 6, owner=own, object=who,
                      actions=["goto_table:EgressRule"])) == \
        f"AdminEgress: passed to NetworkPolicy by {who}"
    assert story(Step("n", "BaselineIngress", 16, owner=own, object=who,
                      actions=["goto_table:ConntrackCommit"])) == \
        f"BaselineIngress: accepted by {who}"
    e, _, _ = engine([cnp("deny-tenant-crossing", 10, [DENY_B_TCP])])
    assert e.rule_descriptions() == {
        "cluster-rule:ClusterNetworkPolicy/deny-tenant-crossing/ingress/0":
            "Admin tier, priority 10, ClusterNetworkPolicy deny-tenant-crossing, ingress rule 0"}


def test_clause_flows_carry_conjunctions_only() -> None:
    from flowcni.flows.cookie import Feature
    from flowcni.flows.model import Flow, Output
    t = Flow.make("AdminEgress", 0, {"ipv4_src": "10.0.0.1"}, feature=Feature.POLICY, owner="")
    (f,) = Flow.clauses([(t, [Conjunction(7, 1, 2)])], priority=500, owner="o")
    assert (f.table, f.priority, f.owner, f.goto) == ("AdminEgress", 500, "o", None)
    with pytest.raises(ValueError, match="conjunction actions only"):
        Flow.clauses([(t, [Output("IN_PORT")])], priority=500, owner="o")
    with pytest.raises(ValueError, match="out of range"):
        Flow.clauses([(t, [Conjunction(7, 1, 2)])], priority=70000, owner="o")


def test_clause_flows_equal_constructed_ones_and_check_every_action_tuple() -> None:
    """Flow.clauses fills slots directly: its flows must be the very flows the
    dataclass constructor gives (equal, same hash), and a bad action tuple is
    refused even after good ones were seen."""
    from flowcni.flows.cookie import Feature
    from flowcni.flows.model import Flow, Output
    t = Flow.make("AdminEgress", 0, {"ipv4_src": "10.0.0.1"}, feature=Feature.POLICY, owner="")
    u = Flow.make("AdminEgress", 0, {"ipv4_dst": "10.0.0.2"}, feature=Feature.POLICY, owner="")
    acts = (Conjunction(7, 1, 2),)
    got = Flow.clauses([(t, acts), (u, acts)], priority=500, owner="o")
    want = [Flow(x.table, 500, x.match, acts, None, x.feature, "o") for x in (t, u)]
    assert got == want and [hash(f) for f in got] == [hash(f) for f in want]
    with pytest.raises(ValueError, match="conjunction actions only"):
        Flow.clauses([(t, acts), (u, (Output("IN_PORT"),))], priority=500, owner="o")


def test_with_each_gives_what_make_gives_and_checks_each_address() -> None:
    from flowcni.flows.cookie import Feature
    from flowcni.flows.model import Flow
    kw: dict[str, Any] = dict(feature=Feature.POLICY, owner="")
    t = Flow.make("AdminIngress", 0, {"ipv4_src": "10.0.0.1"}, **kw)
    values = ["10.0.0.2", "172.16.0.0/16", "10.0.0.3/32"]
    assert Flow.with_each(t, "ipv4_src", values) == [
        Flow.make("AdminIngress", 0, {"ipv4_src": v}, **kw) for v in values]
    with pytest.raises(ValueError, match="host bits set"):
        Flow.with_each(t, "ipv4_src", ["10.0.0.1/24"])
    with pytest.raises(ValueError, match="no address field ipv4_dst"):
        Flow.with_each(t, "ipv4_dst", ["10.0.0.2"])


def test_rules_sharing_selectors_each_get_all_their_clauses() -> None:
    """Selected sets and clause templates are shared across rules within one
    recompute (and dropped after it); each rule still gets its own flows, and an
    address named twice (a /32 network and a pod) is one clause flow."""
    p = cnp("p", 10, [DENY_B_TCP])
    p["spec"]["egress"] = [{"action": "Deny", "to": [
        {"namespaces": {"matchLabels": {"tenant": "b"}}}, {"networks": ["10.0.2.1/32"]}]}]
    e, owners, problems = engine([p, cnp("q", 20, [DENY_B_TCP])], n_local=3, n_peers=4)
    assert not problems
    for o in ("p/ingress/0", "q/ingress/0"):
        assert len(owners[f"cluster-rule:ClusterNetworkPolicy/{o}"]) == 3 + 4 + 2 + 1
    flows = owners["cluster-rule:ClusterNetworkPolicy/p/egress/0"]
    assert len(flows) == 3 + 4 + 1
    assert len({f.match for f in flows}) == len(flows)
    assert e._selected == {} and e._dims == {}


def test_a_pod_address_not_in_canonical_form_is_a_problem_not_a_crash() -> None:
    """Both paths (load, apply) report the pod naming its field and carry on; the
    address never reaches a flow (where it would raise out of the engine)."""
    from flowcni.flows.clusterpolicy import ClusterPolicyEngine
    eng = ClusterPolicyEngine("n1")
    bad = {"namespace": "a", "name": "p", "ip": "10.0.0.01", "node": "n1", "labels": {}}
    good = {"namespace": "a", "name": "q", "ip": "10.0.0.2", "node": "n1", "labels": {}}
    spec = {"tier": "Admin", "priority": 1,
            "subject": {"namespaces": {}},
            "ingress": [{"name": "r", "action": "Deny", "from": [{"namespaces": {}}]}]}
    _, problems = eng.load([{"name": "a", "labels": {}}], [bad, good], [],
                           {"ClusterNetworkPolicy": [{"name": "c", "labels": {}, "spec": spec}]})
    assert any("a/p" in p and "ip" in p for p in problems), problems
    assert "a/q" in eng.pods and "a/p" not in eng.pods

    @dataclass
    class C:
        kind: str
        namespace: str
        name: str
        op: str
        body: dict[str, Any] | None

    _, problems = eng.apply([C("Pod", "a", "p2", "put", {**bad, "name": "p2"})])
    assert any("a/p2" in p and "ip" in p for p in problems), problems
