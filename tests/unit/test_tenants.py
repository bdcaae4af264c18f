"""TenantNetwork validation, resolution (VNIs, slices, conditions) and tenant flows: pure."""

from __future__ import annotations

from typing import Any

import pytest
from flowcni.datastore import tenantconv as tc
from flowcni.datastore.manifests import ManifestError, load
from flowcni.flows.model import Flow
from flowcni.flows.pod import LocalPod
from flowcni.flows.tables import DEFAULT
from flowcni.flows.tenant import TenantNet, base_flows, tenant_flows, tenant_pod_flows

NODES = [{"name": "node1", "nodeIP": "192.168.50.11", "podCIDR": "10.244.1.0/24"},
         {"name": "node2", "nodeIP": "192.168.50.12", "podCIDR": "10.244.2.0/24"}]
CLUSTER = "10.244.0.0/16"


def body(name: str, created: str = "", **spec: Any) -> dict[str, Any]:
    spec.setdefault("namespaceSelector", {"matchLabels": {"tenant": name}})
    spec.setdefault("subnets", ["10.50.0.0/16"])
    return {"name": name, "spec": spec, "created": created}


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "labels": labels}


@pytest.mark.parametrize("spec,field", [
    ({"subnets": ["10.50.0.0/16"]}, "spec.namespaceSelector"),
    ({"namespaceSelector": {}, "subnets": ["10.50.0.0/16"]}, "spec.namespaceSelector"),
    ({"namespaceSelector": {"matchLabels": {"a": "b"}}}, "spec.subnets"),
    ({"namespaceSelector": {"matchLabels": {"a": "b"}}, "subnets": ["10.50.0.1/16"]},
     "spec.subnets[0]"),
    ({"namespaceSelector": {"matchLabels": {"a": "b"}}, "subnets": ["10.50.0.0/16"],
      "vni": 70000}, "spec.vni"),
    ({"namespaceSelector": {"matchLabels": {"a": "b"}}, "subnets": ["10.50.0.0/28"]},
     "spec.subnets[0]"),
    ({"namespaceSelector": {"matchLabels": {"a": "b"}}, "subnets": ["10.50.0.0/16"],
      "egress": {"masquerade": "yes"}}, "spec.egress.masquerade"),
    ({"namespaceSelector": {"matchLabels": {"a": "b"}}, "subnets": ["10.50.0.0/16"],
      "colour": 1}, "spec.colour"),
])
def test_bad_spec_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(tc.TenantError) as e:
        tc.parse_tenant("t", spec)
    assert str(e.value).startswith(field + ":")


def test_manifest_and_immutable_update() -> None:
    objs = load("""
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: blue}
spec:
  namespaceSelector: {matchLabels: {tenant: blue}}
  subnets: [10.50.0.0/16]
""")
    assert [(k, n, b["name"]) for k, n, _, b in objs] == [("TenantNetwork", "", "blue")]
    with pytest.raises(ManifestError, match="spec.vni"):
        load("apiVersion: flowcni.io/v1alpha1\nkind: TenantNetwork\nmetadata: {name: x}\n"
             "spec: {namespaceSelector: {matchLabels: {a: b}}, subnets: [10.1.0.0/16], "
             "vni: 0}\n")
    old = tc.for_update(None, objs[0][3], "2026-01-01T00:00:00Z")
    assert old["created"] == "2026-01-01T00:00:00Z"
    same = tc.for_update(old, {**objs[0][3]}, "later")
    assert same["created"] == old["created"]
    changed = {**objs[0][3], "spec": {**objs[0][3]["spec"], "subnets": ["10.60.0.0/16"]}}
    with pytest.raises(tc.TenantError, match="^spec.subnets: immutable"):
        tc.for_update(old, changed, "later")


def test_resolve_slices_vnis_and_namespaces() -> None:
    r = tc.resolve([body("blue"), body("red", vni=300)],
                   [ns("b1", tenant="blue"), ns("r1", tenant="red"), ns("plain")],
                   NODES, CLUSTER)
    blue, red = r.tenants["blue"], r.tenants["red"]
    assert blue.ok and red.ok
    assert red.vni == 300 and blue.vni == tc.auto_vni("blue")
    assert blue.slices == red.slices == {"node1": "10.50.1.0/24", "node2": "10.50.2.0/24"}
    assert blue.gateway("node1") == "10.50.1.1"
    assert r.by_namespace == {"b1": "blue", "r1": "red"}
    # the same input gives the same answer (every agent computes it)
    again = tc.resolve([body("red", vni=300), body("blue")],
                       [ns("b1", tenant="blue"), ns("r1", tenant="red")], NODES, CLUSTER)
    assert again.tenants["blue"].vni == blue.vni


def test_conflicts_are_conditions_and_others_keep_working() -> None:
    r = tc.resolve([
        body("old", "1", vni=500),
        body("dup", "2", vni=500, namespaceSelector={"matchLabels": {"t": "dup"}}),
        body("grab", "3", namespaceSelector={"matchLabels": {"tenant": "old"}},
             subnets=["10.60.0.0/16"]),
        body("under", "4", subnets=["192.168.50.0/24"], nodeSubnetSize=28),
        body("tiny", "5", subnets=["10.70.0.0/24"], nodeSubnetSize=25),
    ], [ns("o", tenant="old"), ns("d", t="dup")], NODES, CLUSTER)
    t = r.tenants
    assert t["old"].ok and t["old"].namespaces == ["o"]

    def cond(name: str, typ: str) -> str:
        return next(c.message for c in t[name].conditions if c.type == typ)
    assert not t["dup"].ok and cond("dup", "VNIConflict").startswith("spec.vni: 500")
    assert t["grab"].ok and cond("grab", "NamespaceConflict").startswith(
        "spec.namespaceSelector: namespace o")
    assert not t["under"].ok and "192.168.50.11" in cond("under", "SubnetOverlap")
    assert t["tiny"].ok and t["tiny"].slices == {"node1": "10.70.0.128/25"}
    assert "node2" in cond("tiny", "SubnetTooSmall")
    # a namespace of an unusable tenant is still its (its pods fail, never join the default)
    assert r.by_namespace["d"] == "dup"


def test_routed_mode_refuses_tenants() -> None:
    r = tc.resolve([body("blue")], [], NODES, CLUSTER, encap="none")
    assert not r.tenants["blue"].ok
    assert r.tenants["blue"].conditions[0].reason == "EncapRequired"


def _texts(flows: list[Flow]) -> list[str]:
    return [f.ofctl(DEFAULT, names=True) for f in flows]


def test_tenant_flows_match_the_tenant_and_key_the_tunnel() -> None:
    t = TenantNet("blue", 0x1234, (("node1", "192.168.50.11", "10.50.1.0/24"),
                                   ("node2", "192.168.50.12", "10.50.2.0/24")))
    fl = _texts(tenant_flows(t, "node1", 7))
    assert any("tun_id=4660" in f and "in_port=7" in f and "Classifier" in f for f in fl)
    out = [f for f in fl if "nw_dst=10.50.2.0/24" in f]
    assert len(out) == 1 and "set_field:4660->tun_id" in out[0]
    assert "reg4=0x11234/0x1ffff" in out[0]
    assert not any("10.50.1.0/24" in f for f in fl)  # own slice: pods' own flows
    assert any("ct(table=" in f and "zone=4660" in f for f in fl)
    assert any("ct(commit,zone=4660)" in f for f in fl)
    pod = _texts(tenant_pod_flows(LocalPod("c/eth0", 9, "10.50.1.2", "02:00:00:00:00:09"), t))
    assert len(pod) == 5
    assert any("L3Forwarding" in f and "reg4=0x11234/0x1ffff" in f and "nw_dst=10.50.1.2" in f
               for f in pod)
    base = _texts(base_flows(7))
    # unknown tunnel keys are dropped; key 0 is the default network as before
    assert any("priority=204,in_port=7,actions=drop" in f for f in base)
    assert any("priority=205,in_port=7,tun_id=0" in f for f in base)
    # every tenant flow sits above the default network's flows of its table
    assert all(f.priority > 210 for f in tenant_flows(t, "node1", 7) + base_flows(None)
               if f.table in ("L3Forwarding", "ARPResponder", "EgressRule", "IngressRule",
                              "ConntrackZone", "ConntrackCommit"))


# -- the agent's side (controller/tenants.py), with a FlowSync and no switch ---------------

def _tenants(tmp_path: Any, encap: str = "geneve") -> Any:
    from flowcni.cni.ipam import IPAM
    from flowcni.controller.flowsync import FlowSync
    from flowcni.controller.tenants import Tenants
    from flowcni.flows.node import Gateway
    fs = FlowSync(DEFAULT, lambda: 1)
    gw = Gateway("10.244.1.1", "02:00:00:00:00:01", 2, "10.244.1.0/24", "192.168.50.11")
    ipam = IPAM("10.244.1.0/24", None)
    return Tenants("node1", CLUSTER, encap, str(tmp_path), fs, 7, gw, ipam), fs, ipam


def test_no_tenant_no_flows_then_flows_and_pools(tmp_path: Any) -> None:
    from flowcni.controller.tenants import TenantRefused
    t, fs, ipam = _tenants(tmp_path)
    t.load([], [ns("b1", tenant="blue")], NODES)
    assert fs.flow_count() == 0 and t.placement("b1") is None
    t.load([body("blue", egress={"masquerade": True})], [ns("b1", tenant="blue")], NODES)
    assert fs.flow_count() > 0
    p = t.placement("b1")
    assert p is not None and p.cidr == "10.50.1.0/24" and p.gateway == "10.50.1.1"
    assert str(p.ipam.allocate("c1/eth0")) == "10.50.1.2"
    egress = t.nets["blue"].egress_ip
    assert egress.startswith("10.244.1.") and str(ipam.lease("tenant-egress:blue")) == egress
    assert t.placement("other") is None
    # the tenant goes: its flows, the shared ones and its egress lease go too
    t.load([], [ns("b1", tenant="blue")], NODES)
    assert fs.flow_count() == 0 and ipam.lease("tenant-egress:blue") is None
    with pytest.raises(TenantRefused, match="EncapRequired|encap is none"):
        t2, fs2, _ = _tenants(tmp_path / "x", encap="none")
        (tmp_path / "x").mkdir()
        t2.load([body("blue")], [ns("b1", tenant="blue")], NODES)
        assert fs2.flow_count() == 0
        t2.placement("b1")


def test_relabelled_namespace_reports_running_pods(tmp_path: Any) -> None:
    from types import SimpleNamespace
    t, _, _ = _tenants(tmp_path)
    t.load([body("blue")], [ns("b1", tenant="blue")], NODES)
    t.pods = lambda: [SimpleNamespace(namespace="b1", name="p", ip="10.50.1.2", tenant="blue",
                                      key="c/eth0",
                                      local_pod=lambda: LocalPod("c/eth0", 5, "10.50.1.2",
                                                                 "02:00:00:00:00:05"))]
    assert t.describe()[0]["stale_pods"] == []
    t.load([body("blue")], [ns("b1")], NODES)  # label removed: new pods go to the default
    assert t.placement("b1") is None
    d = t.describe()[0]
    assert d["stale_pods"] == ["b1/p"] and d["pods"][0]["name"] == "p"
    # reported: a condition naming the pod and both networks, and one log line
    cond = next(c for c in d["conditions"] if c["type"] == "PodsOnOldNetwork")
    assert cond["status"] == "True" and "b1/p (started on blue" in cond["message"]
    assert "now in the default network" in cond["message"]
    assert cond["message"].startswith("spec.namespaceSelector:")
    # moved back: the condition goes
    t.load([body("blue")], [ns("b1", tenant="blue")], NODES)
    assert not [c for c in t.describe()[0]["conditions"] if c["type"] == "PodsOnOldNetwork"]


def test_relabel_is_logged_once_naming_the_pods(tmp_path: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from flowcni.datastore.store import Change
    t, _, _ = _tenants(tmp_path)
    t.load([body("blue")], [ns("b1")], NODES)
    t.pods = lambda: [SimpleNamespace(namespace="b1", name="old", ip="10.244.1.5", tenant="",
                                      local_pod=lambda: LocalPod("c/eth0", 5, "10.244.1.5",
                                                                 "02:00:00:00:00:05"))]
    caplog.set_level("WARNING")
    relabel = Change(2, "put", "Namespace", "", "b1", ns("b1", tenant="blue"))
    t.apply([relabel])
    t.apply([relabel])  # nothing new: no second line
    lines = [r.getMessage() for r in caplog.records if "PodsOnOldNetwork" in r.getMessage()]
    assert len(lines) == 1 and "b1/old (started on the default network" in lines[0]
    assert "now in blue" in lines[0]


def test_cluster_policies_selecting_tenant_namespaces_are_reported(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    from flowcni.datastore.store import Change
    t, fs, _ = _tenants(tmp_path)
    anp = {"name": "deny-all", "spec": {"priority": 10, "subject": {
        "namespaces": {"matchLabels": {"tenant": "blue"}}},
        "ingress": [{"name": "x", "action": "Deny", "from": [{"namespaces": {}}]}]}}
    banp = {"name": "default", "spec": {"subject": {"namespaces": {}},
                                        "ingress": [{"name": "x", "action": "Deny",
                                                     "from": [{"namespaces": {}}]}]}}
    caplog.set_level("WARNING")
    t.load([body("blue"), body("red", subnets=["10.60.0.0/16"])],
           [ns("b1", tenant="blue"), ns("r1", tenant="red"), ns("plain")], NODES,
           cluster_policies={"AdminNetworkPolicy": [anp]})
    conds = {d["name"]: [c for c in d["conditions"] if c["type"] == "AdminPolicyNotApplied"]
             for d in t.describe()}
    assert [c["message"].split(" selects")[0] for c in conds["blue"]] == [
        "spec.subject of AdminNetworkPolicy/deny-all"]
    assert conds["red"] == []
    # a baseline policy selecting every namespace: both tenants report it
    t.apply([Change(3, "put", "BaselineAdminNetworkPolicy", "", "default", banp)])
    conds = {d["name"]: [c["message"] for c in d["conditions"]
                         if c["type"] == "AdminPolicyNotApplied"] for d in t.describe()}
    assert "BaselineAdminNetworkPolicy/default" in conds["red"][0]
    assert "AdminNetworkPolicy/deny-all, BaselineAdminNetworkPolicy/default" in conds["blue"][0]
    logged = [r.getMessage() for r in caplog.records if "AdminPolicyNotApplied" in r.getMessage()]
    assert len(logged) == 3  # blue (ANP), then blue and red (with the BANP)
    t.apply([Change(4, "delete", "AdminNetworkPolicy", "", "deny-all", None),
             Change(5, "delete", "BaselineAdminNetworkPolicy", "", "default", None)])
    assert not any(c["type"] == "AdminPolicyNotApplied"
                   for d in t.describe() for c in d["conditions"])


def test_connect_to_needs_both_sides_and_no_overlap() -> None:
    r = tc.resolve([
        body("blue", connectTo=["green", "red"]),
        body("green", subnets=["10.60.0.0/16"], connectTo=["blue"]),
        body("red", connectTo=["blue"]),                          # overlaps blue
        body("yellow", subnets=["10.70.0.0/16"], connectTo=["blue"]),  # blue does not agree
    ], [], NODES, CLUSTER)
    t = r.tenants
    assert t["blue"].connected == ["green"] and t["green"].connected == ["blue"]
    assert t["red"].connected == [] and t["yellow"].connected == []
    msg = {c.message for c in t["yellow"].conditions if c.type == "ConnectRefused"}
    assert msg == {"spec.connectTo[0]: TenantNetwork blue does not list yellow in its "
                   "spec.connectTo"}
    assert any("overlap" in c.message for c in t["red"].conditions)


def test_connect_flows_use_the_peers_key(tmp_path: Any) -> None:
    from types import SimpleNamespace
    t, fs, _ = _tenants(tmp_path)
    t.load([body("blue", connectTo=["green"]),
            body("green", subnets=["10.60.0.0/16"], connectTo=["blue"])], [], NODES)
    blue = fs.flows_of(["tenant:blue"])
    out = [f for f in blue if dict(f.match).get("ipv4_dst") == "10.60.2.0/24"]
    assert len(out) == 1 and f"set_field:{t.nets['green'].vni}->tun_id" in out[0].ofctl()
    assert fs.flows_of(["tenant-connect:blue"]) == []
    t.pods = lambda: [SimpleNamespace(tenant="green", namespace="g", name="g",
                                      local_pod=lambda: LocalPod(
        "g/eth0", 9, "10.60.1.2", "02:00:00:00:00:09"))]
    t.pods_changed()
    [f] = fs.flows_of(["tenant-connect:blue"])
    assert dict(f.match)["ipv4_dst"] == "10.60.1.2"
    t.pods = lambda: []
    t.pods_changed()
    assert fs.flows_of(["tenant-connect:blue"]) == []


def test_immutable_change_behind_the_apis_back_is_refused(tmp_path: Any) -> None:
    t, fs, _ = _tenants(tmp_path)
    t.load([body("blue", vni=300)], [ns("b1", tenant="blue")], NODES)
    before = fs.flows_of(["tenant:blue"])
    t.load([body("blue", vni=301, subnets=["10.51.0.0/16"])], [ns("b1", tenant="blue")],
           NODES)
    d = t.describe()[0]
    assert d["vni"] == 300 and d["subnets"] == ["10.50.0.0/16"] and d["ok"]
    msgs = [c["message"] for c in d["conditions"] if c["type"] == "ImmutableFieldChanged"]
    assert len(msgs) == 1 and msgs[0].startswith("spec.subnets: immutable")
    assert fs.flows_of(["tenant:blue"]) == before  # nothing running is cut off
    # a mutable field still applies
    t.load([body("blue", vni=300, egress={"masquerade": True})], [ns("b1", tenant="blue")],
           NODES)
    assert t.describe()[0]["masquerade"] and t.nets["blue"].egress_ip


def test_tenant_pool_forgets_leases_no_port_carries(tmp_path: Any) -> None:
    """A restarted agent's tenant pool drops checkpointed leases of pods that are gone."""
    t, _, _ = _tenants(tmp_path)
    t.load([body("blue")], [ns("b1", tenant="blue")], NODES)
    p = t.placement("b1")
    assert p is not None
    p.ipam.allocate("gone/eth0")
    p.ipam.allocate("kept/eth0")
    t2, _, _ = _tenants(tmp_path)
    t2.load([body("blue")], [ns("b1", tenant="blue")], NODES)
    assert t2.restore({("blue", "10.50.1.0/24"): {"kept/eth0": "10.50.1.3"}}) == []
    p2 = t2.placement("b1")
    assert p2 is not None and set(p2.ipam.leases()) == {"kept/eth0"}


def test_policy_inside_a_tenant_is_lifted_into_it() -> None:
    from flowcni.flows.model import Conjunction
    from flowcni.flows.tenant import PRIO_FALLTHROUGH
    from flowcni.flows.tenantpolicy import tenant_policy_flows
    t = TenantNet("blue", 0x65, ())
    pods = [{"namespace": "b1", "name": n, "ip": ip, "node": "node1", "labels": {"app": n}}
            for n, ip in (("x", "10.50.1.2"), ("y", "10.50.1.3"), ("z", "10.50.1.4"))]
    pol = {"namespace": "b1", "name": "p", "spec": {
        "podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "y"}}},
                              {"ipBlock": {"cidr": "10.50.1.4/32"}}],
                     "ports": [{"port": 80}, {"port": 81}]}]}}
    flows, problems = tenant_policy_flows(t, "node1", [ns("b1")], pods, [pol])
    assert problems == [] and flows
    for f in flows:
        m = dict(f.match)
        assert m["reg4"] == (0x10065, 0x1FFFF) and f.priority > PRIO_FALLTHROUGH
        assert f.owner == "tenant-policy:blue"
        if "conj_id" in m:
            assert m["conj_id"] >> 16 == 0x65
        for a in f.actions:
            if isinstance(a, Conjunction):
                assert a.id >> 16 == 0x65
    assert any(f.table == "IngressDefault" and dict(f.match).get("ipv4_dst") == "10.50.1.2"
               for f in flows)


TN_YAML = """
apiVersion: v1
kind: Namespace
metadata: {name: b1, labels: {tenant: blue}}
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: blue}
spec:
  namespaceSelector: {matchLabels: {tenant: blue}}
  subnets: [SUBNET]
"""


def test_flowctl_apply_tenant_network(tmp_path: Any, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    """apply -f records the creation time once; an immutable change refuses the whole
    file (the Namespace in it is not written either) and names the field."""
    from flowcni.ctl import flowctl
    from flowcni.datastore.store import Store
    db = str(tmp_path / "store.db")
    store = Store(db)
    f = tmp_path / "tn.yaml"
    f.write_text(TN_YAML.replace("SUBNET", "10.50.0.0/16"))
    assert flowctl.main(["apply", "-f", str(f), "--datastore", f"sqlite:{db}"]) == 0
    first = store.get("TenantNetwork", "", "blue")
    assert first is not None and first["created"] and first["spec"]["subnets"] == [
        "10.50.0.0/16"]
    assert flowctl.main(["apply", "-f", str(f), "--datastore", f"sqlite:{db}"]) == 0
    assert store.get("TenantNetwork", "", "blue")["created"] == first["created"]  # type: ignore[index]
    rev = store.revision()
    f.write_text(TN_YAML.replace("SUBNET", "10.60.0.0/16"))
    capsys.readouterr()
    assert flowctl.main(["apply", "-f", str(f), "--datastore", f"sqlite:{db}"]) == 1
    assert "TenantNetwork blue: spec.subnets: immutable" in capsys.readouterr().err
    assert store.revision() == rev


# -- VNIs: allocated oldest first, recorded in the embedded store, kept ----------------------


def test_newer_spec_vni_never_takes_an_older_tenants_allocated_vni() -> None:
    v = tc.auto_vni("auto")
    r = tc.resolve([body("auto", "1"), body("late", "2", vni=v, subnets=["10.60.0.0/16"])],
                   [], NODES, CLUSTER)
    assert r.tenants["auto"].vni == v and r.tenants["auto"].ok
    late = r.tenants["late"]
    assert not late.ok and [c.message for c in late.conditions if c.type == "VNIConflict"] == [
        f"spec.vni: {v} is already used by TenantNetwork auto"]


def test_vni_out_of_the_16_bit_range_is_refused_naming_spec_vni() -> None:
    r = tc.resolve([body("big", vni=0x10000), body("ok")], [], NODES, CLUSTER)
    [c] = r.tenants["big"].conditions
    assert (c.type, c.status, c.reason) == ("Ready", False, "VNIOutOfRange")
    assert c.message.startswith("spec.vni: 65536: an integer 1..65519")
    assert r.tenants["ok"].ok


def test_recorded_vni_survives_the_deletion_of_the_tenant_it_stepped_over() -> None:
    h = tc.auto_vni("b")
    both = [body("x", "1", vni=h), body("b", "2", subnets=["10.60.0.0/16"])]
    r = tc.resolve(both, [], NODES, CLUSTER)
    assert r.tenants["b"].vni == h + 1
    # derived only: x's deletion moves b (what the record is for)
    assert tc.resolve(both[1:], [], NODES, CLUSTER).tenants["b"].vni == h
    # recorded: b keeps its VNI
    assert tc.resolve(both[1:], [], NODES, CLUSTER, recorded={"b": h + 1}).tenants["b"].vni \
        == h + 1
    # a record that disagrees with spec.vni is not taken
    assert tc.resolve([body("x", "1", vni=7)], [], NODES, CLUSTER,
                      recorded={"x": 9}).tenants["x"].vni == 7


def test_agents_share_one_vni_record_in_the_store(tmp_path: Any) -> None:
    from flowcni.datastore.store import Change, Store
    store = Store(str(tmp_path / "store.db"))
    h = tc.auto_vni("b")
    agents = []
    for n in ("a1", "a2"):
        (tmp_path / n).mkdir()
        t, _, _ = _tenants(tmp_path / n)
        t.vni_record = store
        agents.append(t)
    a1, a2 = agents
    x, b = body("x", "1", vni=h), body("b", "2", subnets=["10.60.0.0/16"])
    a1.load([x, b], [], NODES)
    assert store.vnis() == {"x": h, "b": h + 1}
    assert {d["name"]: d["vni_source"] for d in a1.describe()} == {"x": "spec",
                                                                    "b": "recorded"}
    # another agent that starts after x is gone takes b's VNI from the record
    a2.load([b], [], NODES)
    assert a2.nets["b"].vni == h + 1
    # x deleted: b keeps its VNI, x's record goes
    a1.apply([Change(5, "delete", "TenantNetwork", "", "x", None)])
    assert a1.nets["b"].vni == h + 1 and store.vnis() == {"b": h + 1}
    # a newer tenant asking for b's VNI is refused, naming spec.vni
    a1.apply([Change(6, "put", "TenantNetwork", "", "c",
                     body("c", "3", vni=h + 1, subnets=["10.70.0.0/16"]))])
    [c] = [c for d in a1.describe() if d["name"] == "c" for c in d["conditions"]
           if c["type"] == "VNIConflict"]
    assert c["message"] == f"spec.vni: {h + 1} is already used by TenantNetwork b"
    assert "c" not in a1.nets and a1.nets["b"].vni == h + 1
