"""NetworkPolicy parsing, selection and the incremental engine (no switch needed)."""

from __future__ import annotations

from typing import Any

import pytest
from flowcni.datastore.manifests import ManifestError, load
from flowcni.datastore.store import Change
from flowcni.flows.model import Conjunction
from flowcni.flows.policy import (
    PodInfo,
    PolicyEngine,
    PolicyError,
    Selector,
    World,
    parse_policy,
    range_masks,
)


def pod(ns: str, name: str, ip: str, node: str = "n1", **labels: str) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "ip": ip, "node": node, "labels": labels}


def pol(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "spec": spec}


def test_range_masks_cover_exactly_the_range() -> None:
    for lo, hi in [(80, 81), (79, 81), (1, 65535), (8000, 8010), (1024, 1024), (3, 17)]:
        covered = {p for v, m in range_masks(lo, hi) for p in range(65536)
                   if p & m == v} if hi - lo < 100 else None
        if covered is not None:
            assert covered == set(range(lo, hi + 1)), (lo, hi)
    assert range_masks(1, 65535)[-1] == (32768, 0x8000)


def test_selector_operators() -> None:
    s = parse_policy("d", "p", {"podSelector": {"matchExpressions": [
        {"key": "a", "operator": "In", "values": ["1", "2"]},
        {"key": "b", "operator": "NotIn", "values": ["x"]},
        {"key": "c", "operator": "Exists"},
        {"key": "d", "operator": "DoesNotExist"}]}}).selector
    assert s.matches({"a": "1", "c": ""})
    assert not s.matches({"a": "3", "c": ""})
    assert not s.matches({"a": "1", "b": "x", "c": ""})
    assert not s.matches({"a": "1"})
    assert not s.matches({"a": "1", "c": "", "d": "y"})
    assert Selector().matches({})


def test_policy_types_inferred() -> None:
    assert parse_policy("d", "p", {"podSelector": {}}).types == {"ingress"}
    assert parse_policy("d", "p", {"podSelector": {}, "egress": []}).types == {
        "ingress", "egress"}


@pytest.mark.parametrize("spec,field", [
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                             "except": ["11.0.0.0/16"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]: 11.0.0.0/16 is outside the block"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]},
     "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]},
     "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}},
     "spec.podSelector.matchExpressions[0].operator"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"},
                                             "podSelector": {}}]}]},
     "spec.egress[0].to[0]: ipBlock cannot be combined"),
    ({}, "spec.podSelector: required"),
])
def test_invalid_policies_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_policy("d", "p", spec)


def test_apply_rejects_invalid_policy_naming_the_field() -> None:
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: prod}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 90, endPort: 80}]}]
"""
    with pytest.raises(ManifestError, match=r"NetworkPolicy prod/bad: spec.ingress\[0\]"):
        load(text)
    assert load(text.replace("endPort: 80", "endPort: 95"))[0][:3] == (
        "NetworkPolicy", "prod", "bad")


WORLD_NS = [{"name": "d", "labels": {}}, {"name": "p", "labels": {"env": "prod"}}]
WORLD_PODS = [pod("d", "web", "10.244.1.2", app="web"), pod("d", "web2", "10.244.1.3", app="web"),
              pod("d", "c1", "10.244.2.2", node="n2", app="client"),
              pod("d", "c2", "10.244.2.3", node="n2", app="client"),
              pod("p", "api", "10.244.2.4", node="n2", app="api")]


def allow_clients(name: str = "a", ports: list[Any] | None = None) -> dict[str, Any]:
    return pol("d", name, {"podSelector": {"matchLabels": {"app": "web"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {
                               "app": "client"}}}], "ports": ports or [{"port": 80},
                                                                       {"port": 81}]}]})


def flows_of(owners: dict[Any, list[Any]]) -> list[Any]:
    return [f for fl in owners.values() for f in fl]


def test_flow_count_is_a_sum_not_a_product() -> None:
    eng = PolicyEngine("n1")
    owners, problems = eng.load(WORLD_NS, WORLD_PODS, [allow_clients()])
    assert problems == []
    rule_flows = [f for f in flows_of(owners) if f.owner_name.startswith(("rule:", "policy-match"))]
    # 2 selected + 2 peers + 2 ports + 1 conjunction flow (product would be 8)
    assert len(rule_flows) == 7
    assert eng.describe()[0]["flows"] == 7


def test_match_flows_shared_between_rules() -> None:
    eng = PolicyEngine("n1")
    owners, _ = eng.load(WORLD_NS, WORLD_PODS, [allow_clients("a"),
                                                allow_clients("b", [{"port": 81}])])
    rule_flows = [f for f in flows_of(owners) if f.table == "IngressRule"]
    port81 = [f for f in rule_flows if dict(f.match).get("tcp_dst") == 81]
    assert len(port81) == 1
    assert sorted(a.id for a in port81[0].actions if isinstance(a, Conjunction)) == [1, 2]


def test_unrelated_change_touches_nothing_and_relabel_touches_little() -> None:
    eng = PolicyEngine("n1")
    eng.load(WORLD_NS, WORLD_PODS, [allow_clients()])
    out, _ = eng.apply([Change(1, "put", "Pod", "p", "other",
                               pod("p", "other", "10.244.2.9", node="n2", app="x"))])
    assert {k for k, v in out.items()} <= {"isolation:p/other"} and not any(out.values())
    out, _ = eng.apply([Change(2, "put", "Pod", "p", "other",
                               pod("p", "other", "10.244.2.9", node="n2", app="client"))])
    assert not any(out.values())  # namespaced podSelector: p/other is not a peer
    out, _ = eng.apply([Change(3, "put", "Pod", "d", "c3",
                               pod("d", "c3", "10.244.2.9", node="n2", app="client"))])
    changed = {v[0].owner_name for k, v in out.items() if v}
    # one new peer: one new match flow, nothing else
    assert changed == {"policy-match:IngressRule:200:ipv4_src=10.244.2.9"}


def test_isolation_follows_policies_and_conntrack_stays() -> None:
    eng = PolicyEngine("n1")
    owners, _ = eng.load(WORLD_NS, WORLD_PODS, [])
    assert owners["conntrack"]  # on from the start, policy or not
    out, _ = eng.apply([Change(1, "put", "NetworkPolicy", "d", "a", allow_clients())])
    assert out["isolation:d/web"] and out["isolation:d/web2"]
    out, _ = eng.apply([Change(2, "delete", "NetworkPolicy", "d", "a", None)])
    assert out["isolation:d/web"] == []
    assert "conntrack" not in out  # never switched off and on again


def test_named_ports_split_by_resolution() -> None:
    pods = [{**pod("d", "w1", "10.244.1.2", app="web"),
             "ports": [{"name": "http", "containerPort": 80}]},
            {**pod("d", "w2", "10.244.1.3", app="web"),
             "ports": [{"name": "http", "containerPort": 8080}]},
            pod("d", "w3", "10.244.1.4", app="web")]
    eng = PolicyEngine("n1")
    eng.load(WORLD_NS, pods, [pol("d", "n", {"podSelector": {"matchLabels": {"app": "web"}},
                                             "ingress": [{"ports": [{"port": "http"}]}]})])
    rules = {tuple(r["pods"]): r["ports"] for r in eng.describe()}
    assert rules == {("10.244.1.2",): ["TCP/80"], ("10.244.1.3",): ["TCP/8080"]}


def test_world_allows_is_the_kubernetes_semantics() -> None:
    """The oracle the churn test compares probes with (namespace AND pod selectors,
    named ports resolved on the destination, both ends' isolation)."""
    w = World()
    w.namespaces = {"default": {}, "other": {}}
    b = PodInfo("default", "b", {"app": "b"}, "10.0.2.2", "n2", (("echo", 8080, "TCP"),))
    c = PodInfo("default", "c", {"app": "c"}, "10.0.3.2", "n3")
    d = PodInfo("other", "d", {"app": "c"}, "10.0.3.3", "n3")
    for p in (b, c, d):
        w.put_pod(p)
    assert w.allows(c, b, "TCP", 8080) and w.allows(d, b, "TCP", 1)
    w.put_policy(parse_policy("default", "team", {
        "podSelector": {"matchLabels": {"app": "b"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}},
                               "podSelector": {"matchLabels": {"app": "c"}}}],
                     "ports": [{"port": "echo"}]}]}))
    assert not w.allows(c, b, "TCP", 8080) and not w.allows(d, b, "TCP", 8080)
    w.namespaces["other"] = {"team": "x"}
    assert w.allows(d, b, "TCP", 8080) and not w.allows(c, b, "TCP", 8080)
    assert not w.allows(d, b, "TCP", 8081) and not w.allows(d, b, "UDP", 8080)
    assert w.allows(b, c, "TCP", 80)  # c is not isolated; b has no egress policy
    w.put_policy(parse_policy("default", "out", {
        "podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": 8000, "endPort": 8100}]}]}))
    assert not w.allows(c, d, "TCP", 80) and w.allows(c, d, "TCP", 8050)
    assert not w.allows(c, b, "TCP", 8080)  # egress allows, b's ingress still denies


def _touching_by_brute_force(eng: PolicyEngine, pods: list[Any]) -> set[str]:
    """Every policy's every peer against every pod: the definition the index must keep."""
    out: set[str] = set()
    for p in pods:
        for polx in eng.world.policies.values():
            if p.namespace == polx.namespace and polx.selector.matches(p.labels):
                out.update(r.key for r in polx.rules)
            for r in polx.rules:
                if r.peers is None:
                    if r.ports and any(isinstance(s.port, str) for s in r.ports):
                        out.add(r.key)
                    continue
                for peer in r.peers:
                    if peer.is_ipblock:
                        continue
                    ns_ok = (p.namespace == polx.namespace if peer.namespaces is None
                             else peer.namespaces.matches(eng.world.namespaces.get(p.namespace,
                                                                                   {})))
                    if ns_ok and (peer.pods or Selector()).matches(p.labels):
                        out.add(r.key)
    return out


def test_rules_touching_pods_index_agrees_with_brute_force() -> None:
    import random

    from flowcni.flows.policy import pod_from_body

    rnd = random.Random(3)
    nss = [{"name": f"ns{i}", "labels": {"team": f"t{i % 3}"}} for i in range(6)]
    pods = [pod(f"ns{i % 6}", f"p{i}", f"10.0.{i // 250}.{i % 250 + 1}",
                node="n1" if i % 4 == 0 else "n2", app=f"a{i % 5}", tier=("web", "db")[i % 2])
            for i in range(120)]
    peers = [{"podSelector": {"matchLabels": {"app": "a1"}}},
             {"namespaceSelector": {"matchLabels": {"team": "t1"}}},
             {"namespaceSelector": {"matchLabels": {"team": "t2"}},
              "podSelector": {"matchLabels": {"tier": "db"}}},
             {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.8/29"]}},
             {"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn",
                                                    "values": ["a0", "a2"]}]}}]
    pols = []
    for j in range(40):
        rule: dict[str, Any] = {"from": rnd.sample(peers, rnd.randint(1, 3))}
        if j % 7 == 0:
            rule = {"ports": [{"port": "http"}]}  # every peer, a named port
        pols.append(pol(f"ns{j % 6}", f"np{j}", {
            "podSelector": {"matchLabels": {"app": f"a{j % 5}"}} if j % 3 else {},
            "ingress": [rule]}))
    eng = PolicyEngine("n1")
    _, problems = eng.load(nss, pods, pols)
    assert not problems
    changed = [pod_from_body(b) for b in rnd.sample(pods, 30)]
    got = eng._rules_touching_pods(changed)
    assert got == _touching_by_brute_force(eng, changed)
    assert got and got != {r.key for p in eng.world.policies.values() for r in p.rules}
    # The index is kept between calls: a new policy and a relabelled namespace must show.
    eng.apply([Change(1, "put", "NetworkPolicy", "ns1", "late", {
        "namespace": "ns1", "name": "late", "spec": {"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "t9"}}}]}]}}),
        Change(2, "put", "Namespace", "", "ns4", {"name": "ns4", "labels": {"team": "t9"}})])
    got = eng._rules_touching_pods(changed)
    assert "ns1/late/ingress/0" in got and got == _touching_by_brute_force(eng, changed)
    # Policy changes update the kept index in place (no rebuild): a replaced policy
    # with other peers, a deleted one, a new one with a named port and no peers.
    idx = eng._touch_index
    assert idx is not None
    eng.apply([
        Change(3, "put", "NetworkPolicy", "ns1", "np1", {
            "namespace": "ns1", "name": "np1", "spec": {"podSelector": {}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"tier": "web"}}},
                          {"namespaceSelector": {"matchLabels": {"team": "t0"}}}]}]}}),
        Change(4, "delete", "NetworkPolicy", "ns2", "np2", None),
        Change(5, "delete", "NetworkPolicy", "ns1", "late", None),
        Change(6, "put", "NetworkPolicy", "ns3", "named", {
            "namespace": "ns3", "name": "named", "spec": {"podSelector": {}, "ingress": [
                {"ports": [{"port": "dns"}]}]}})])
    assert eng._touch_index is idx
    for sample in (changed, [pod_from_body(b) for b in rnd.sample(pods, 30)]):
        got = eng._rules_touching_pods(sample)
        assert got == _touching_by_brute_force(eng, sample)
    assert "ns3/named/ingress/0" in got and "ns1/late/ingress/0" not in got
    assert not any(k.startswith("ns2/np2/") for k in got)


def _normalized(eng: PolicyEngine, owners: dict[Any, list[Any]]) -> set[Any]:
    """Flows with each conjunction id replaced by what it stands for (rule, selected
    addresses, ports): an incremental engine and a fresh one number them differently."""
    what: dict[int, Any] = {}
    for (rk, i), cid in eng.conj_ids.items():
        subs = eng.subrules.get(rk, [])
        if i < len(subs):
            s = subs[i]
            what[cid] = (rk, tuple(sorted(s.selected)),
                         None if s.ports is None else tuple(sorted(s.ports, key=str)))
    out = set()
    for owner, fl in owners.items():
        for f in fl:
            assert f.owner_key == owner
            m = tuple((k, what.get(v, ("stale", v)) if k == "conj_id" else v)
                      for k, v in f.match)
            acts = tuple(sorted(((what.get(a.id, ("stale", a.id)), a.clause, a.n_clauses)
                                 if isinstance(a, Conjunction) else a for a in f.actions),
                                key=str))
            out.add((f.owner_name, f.table, f.priority, m, acts, f.goto))
    return out


@pytest.mark.parametrize("sweep_min", [PolicyEngine.SWEEP_MIN, 0])
def test_incremental_flows_equal_a_fresh_load_after_random_changes(
        sweep_min: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine edits clause flows by difference; after any sequence of changes its
    flows must be exactly those a fresh engine builds from the final objects. Equal
    actions of several conjunctions are one shared tuple throughout (sweep_min 0: the
    table of shared tuples is swept at every chance)."""
    import random

    monkeypatch.setattr(PolicyEngine, "SWEEP_MIN", sweep_min)

    rnd = random.Random(15)
    apps, teams = ["a0", "a1", "a2"], ["t0", "t1"]

    def rpod(i: int) -> dict[str, Any]:
        body = pod(f"ns{i % 3}", f"p{i}", f"10.0.{rnd.randrange(2)}.{rnd.randrange(1, 12)}",
                   node=rnd.choice(["n1", "n1", "n2"]), app=rnd.choice(apps),
                   tier=rnd.choice(["web", "db"]))
        if rnd.random() < 0.3:
            body["ports"] = [{"name": "http", "containerPort": rnd.choice([80, 8080])}]
        return body

    def rpeer() -> dict[str, Any]:
        return rnd.choice([
            {"podSelector": {"matchLabels": {"app": rnd.choice(apps)}}},
            {"namespaceSelector": {"matchLabels": {"team": rnd.choice(teams)}}},
            {"namespaceSelector": {"matchLabels": {"team": rnd.choice(teams)}},
             "podSelector": {"matchLabels": {"tier": "db"}}},
            {"ipBlock": {"cidr": f"10.0.0.{rnd.randrange(1, 12)}/32"}},  # a pod's address
            {"ipBlock": {"cidr": "10.0.1.0/28", "except": ["10.0.1.4/32"]}}])

    def rport() -> dict[str, Any]:
        return rnd.choice([{"port": 80}, {"port": "http"}, {"protocol": "UDP", "port": 53},
                           {"port": 8000, "endPort": 8010}])

    def rpol(j: int) -> dict[str, Any]:
        rules = []
        for _ in range(rnd.randint(1, 2)):
            r: dict[str, Any] = {}
            if rnd.random() < 0.7:
                r["from"] = [rpeer() for _ in range(rnd.randint(1, 3))]
            if rnd.random() < 0.6:
                r["ports"] = [rport() for _ in range(rnd.randint(1, 2))]
            rules.append(r)
        spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": rnd.choice(apps)}}
                                if rnd.random() < 0.7 else {}}
        spec["ingress" if j % 2 else "egress"] = [
            {("from" if j % 2 else "to") if k == "from" else k: v for k, v in r.items()}
            for r in rules]
        spec["policyTypes"] = ["Ingress" if j % 2 else "Egress"]
        return pol(f"ns{j % 3}", f"np{j}", spec)

    nss = {f"ns{k}": {"team": teams[k % 2]} for k in range(3)}
    pods = {f"p{i}": rpod(i) for i in range(30)}
    pols = {f"np{j}": rpol(j) for j in range(12)}
    eng = PolicyEngine("n1")
    state, problems = eng.load([{"name": n, "labels": lb} for n, lb in nss.items()],
                               list(pods.values()), list(pols.values()))
    assert not problems
    rev = 0
    for step in range(60):
        batch = []
        for _ in range(rnd.randint(1, 4)):
            rev += 1
            x = rnd.random()
            if x < 0.45:  # a pod added, moved, relabelled or given another address
                i = rnd.randrange(40)
                pods[f"p{i}"] = b = rpod(i)
                batch.append(Change(rev, "put", "Pod", b["namespace"], b["name"], b))
            elif x < 0.65 and pods:
                b = pods.pop(rnd.choice(sorted(pods)))
                batch.append(Change(rev, "delete", "Pod", b["namespace"], b["name"], None))
            elif x < 0.85:
                j = rnd.randrange(14)
                pols[f"np{j}"] = p = rpol(j)
                batch.append(Change(rev, "put", "NetworkPolicy", p["namespace"], p["name"], p))
            elif x < 0.93 and pols:
                p = pols.pop(rnd.choice(sorted(pols)))
                batch.append(Change(rev, "delete", "NetworkPolicy", p["namespace"], p["name"],
                                    None))
            else:
                n = f"ns{rnd.randrange(3)}"
                nss[n] = {"team": rnd.choice(teams)}
                batch.append(Change(rev, "put", "Namespace", "", n, {"name": n,
                                                                     "labels": nss[n]}))
        out, problems = eng.apply(batch)
        assert not problems
        state.update(out)
        fresh = PolicyEngine("n1")
        want, _ = fresh.load([{"name": n, "labels": lb} for n, lb in nss.items()],
                             list(pods.values()), list(pols.values()))
        got = _normalized(eng, {k: v for k, v in state.items() if v})
        assert got == _normalized(fresh, want), f"step {step}"
        multi = [f for fl in state.values() for f in fl if len(f.actions) > 1]
        assert len({id(f.actions) for f in multi}) == len({f.actions for f in multi}), step
        field = {"ipv4_src", "ipv4_dst"}
        assert all(eng._shared[(f.table, next((k for k, _ in f.match if k in field), "port"),
                                tuple(c.id for c in f.actions))] is f.actions
                   for f in multi), f"step {step}"


def test_pod_with_a_non_canonical_address_is_a_problem_naming_the_field() -> None:
    eng = PolicyEngine("n1")
    _, problems = eng.load(WORLD_NS, [*WORLD_PODS, pod("d", "odd", "10.244.2.010", app="client")],
                           [allow_clients()])
    assert problems == ["pod d/odd: ip: '10.244.2.010' is not an IPv4 address"]
    out, problems = eng.apply([Change(1, "put", "Pod", "d", "c9",
                                      pod("d", "c9", "10.244.2.9/32", node="n2", app="client"))])
    assert problems == ["pod d/c9: ip: '10.244.2.9/32' is not an IPv4 address"]
    assert not any(out.values())
    # a local isolated pod updated with a bad address leaves the world: so do its flows
    out, problems = eng.apply([Change(2, "put", "Pod", "d", "web",
                                      pod("d", "web", "10.244.1.2.7", app="web"))])
    assert problems and out["isolation:d/web"] == []
    # a clause flow owns itself: its owner's key is its identity (table, priority, match)
    assert out[("IngressRule", 200, (("eth_type", 0x0800), ("ipv4_dst", "10.244.1.2")))] == []


def test_a_rules_ipblocks_are_one_peer_with_every_address() -> None:
    p = parse_policy("d", "p", {"podSelector": {}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"app": "x"}}},
        {"ipBlock": {"cidr": "192.0.2.7/32"}},
        {"namespaceSelector": {}},
        {"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.0/25"]}},
        {"ipBlock": {"cidr": "192.0.2.7/32"}}]}]})
    peers = p.rules[0].peers
    assert peers is not None and [pe.is_ipblock for pe in peers] == [False, True, False]
    assert peers[1].cidrs == ("192.0.2.7", "198.51.100.128/25")
    w = World()
    w.namespaces = {"d": {}, "e": {}}
    src = PodInfo("e", "s", {}, "10.0.0.9", "n1")
    dst = PodInfo("d", "t", {}, "10.0.0.8", "n1")
    for x in (src, dst):
        w.put_pod(x)
    w.put_policy(p)
    assert w.allows(src, dst, "TCP", 1)  # namespaceSelector {} still counts
    w.put_policy(parse_policy("d", "p", {"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "192.0.2.7/32"}}, {"podSelector": {"matchLabels": {"app": "x"}}},
        {"ipBlock": {"cidr": "198.51.100.0/24", "except": ["198.51.100.0/25"]}}]}]}))
    outside = PodInfo("e", "o", {}, "198.51.100.9", "n2")
    inside = PodInfo("e", "i", {}, "198.51.100.200", "n2")
    host = PodInfo("e", "h", {}, "192.0.2.7", "n2")
    assert not w.allows(src, dst, "TCP", 1) and not w.allows(outside, dst, "TCP", 1)
    assert w.allows(inside, dst, "TCP", 1) and w.allows(host, dst, "TCP", 1)


def test_an_ipblock_its_excepts_cover_allows_nothing() -> None:
    spec = {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.0/24"]}}]}]}
    w = World()
    w.namespaces = {"d": {}}
    web = PodInfo("d", "web", {"app": "web"}, "10.244.1.2", "n1")
    client = PodInfo("d", "c1", {"app": "client"}, "10.244.2.2", "n2")
    for x in (web, client):
        w.put_pod(x)
    w.put_policy(parse_policy("d", "p", spec))
    assert not w.allows(client, web, "TCP", 80)
    eng = PolicyEngine("n1")
    owners, problems = eng.load(WORLD_NS, WORLD_PODS, [pol("d", "p", spec)])
    assert not problems and owners["isolation:d/web"]
    assert not [f for f in flows_of(owners) if f.table == "IngressRule"
                and f.owner != "conntrack"]


def test_pods_with_the_same_labels_share_one_dict_which_goes_with_them() -> None:
    """pod_from_body keeps one labels dict per distinct label set (three engines keep a
    PodInfo per pod); a set no pod has any more is dropped; bad values are not shared."""
    import gc

    from flowcni.flows import policy as pol
    a = pol.pod_from_body({"namespace": "n", "name": "a", "labels": {"x": "1", "app": "w"}})
    b = pol.pod_from_body({"namespace": "n", "name": "b", "labels": {"app": "w", "x": "1"}})
    c = pol.pod_from_body({"namespace": "n", "name": "c", "labels": {"app": "v"}})
    assert a.labels is b.labels and a.labels == {"app": "w", "x": "1"}
    assert c.labels is not a.labels
    bad = pol.pod_from_body({"namespace": "n", "name": "d", "labels": {"app": ["x"]}})
    assert bad.labels == {"app": ["x"]}
    key = (("app", "w"), ("x", "1"))
    assert key in pol._LABELS
    del a, b
    gc.collect()
    assert key not in pol._LABELS and (("app", "v"),) in pol._LABELS


def test_an_address_named_by_two_peers_is_one_peer_and_outlives_either() -> None:
    """A rule's peer addresses are kept as the tuples they come in (its ipBlocks, each pod
    peer's pods), so one address can be in two: it is still one peer and one clause
    flow, and it stays while either peer still names it."""
    eng = PolicyEngine("n1")
    owners, problems = eng.load(WORLD_NS, WORLD_PODS, [pol("d", "a", {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}},
                              {"ipBlock": {"cidr": "10.244.2.2/32"}}],  # c1's address
                     "ports": [{"port": 80}]}]})])
    assert not problems
    [d] = eng.describe()
    assert d["peers"] == ["10.244.2.2", "10.244.2.3"] and d["flows"] == 2 + 2 + 1 + 1
    src = sorted(v for f in flows_of(owners) for k, v in f.match if k == "ipv4_src")
    assert src == ["10.244.2.2", "10.244.2.3"]
    out, _ = eng.apply([Change(1, "delete", "Pod", "d", "c1", None)])
    assert not any(out.values())  # the ipBlock still names 10.244.2.2
    [d] = eng.describe()
    assert d["peers"] == ["10.244.2.2", "10.244.2.3"]
    out, _ = eng.apply([Change(2, "delete", "Pod", "d", "c2", None)])
    assert list(out.values()) == [[]]  # 10.244.2.3's clause flow goes, nothing else moves
    assert eng.describe()[0]["peers"] == ["10.244.2.2"]
