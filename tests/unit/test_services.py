"""Service parsing, endpoint selection and the proxy's incremental output (pure logic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from flowcni.datastore.manifests import ManifestError, load
from flowcni.flows.model import CT, Controller, GroupAction
from flowcni.flows.policy import PodInfo
from flowcni.flows.services import (
    ServiceError,
    ServicePort,
    ServiceProxy,
    endpoints,
    group_id_for,
    parse_service,
    slice_endpoints,
)
from flowcni.flows.tables import DEFAULT, EGRESS_POLICY

SPEC = {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                  {"name": "dns", "port": 53, "protocol": "UDP"}]}


@dataclass
class Change:
    kind: str
    namespace: str
    name: str
    op: str
    body: dict[str, Any] | None


def pod(name: str, ip: str, labels: dict[str, str], ports: Any = ()) -> dict[str, Any]:
    return {"namespace": "d", "name": name, "ip": ip, "labels": labels, "node": "n1",
            "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]}


def svc(spec: dict[str, Any] = SPEC, name: str = "web") -> dict[str, Any]:
    return {"namespace": "d", "name": name, "spec": spec}


@pytest.mark.parametrize("spec,field", [
    ({**SPEC, "ipFamilies": ["IPv6"]}, "spec.ipFamilies"),
    ({**SPEC, "clusterIP": "fd00::1"}, "spec.clusterIP"),
    ({k: v for k, v in SPEC.items() if k != "clusterIP"}, "spec.clusterIP"),
    ({**SPEC, "ports": []}, "spec.ports"),
    ({**SPEC, "ports": [{"port": 0}]}, "spec.ports[0].port"),
    ({**SPEC, "ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol"),
    ({**SPEC, "ports": [{"port": 80, "targetPort": 70000}]}, "spec.ports[0].targetPort"),
    ({**SPEC, "type": "Weird"}, "spec.type"),
])
def test_bad_services_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ServiceError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_service("d", "web", spec)


def test_manifest_refusal_names_object_and_field() -> None:
    text = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ipFamilies: [IPv6], ports: [{port: 80}]}
"""
    with pytest.raises(ManifestError, match="Service default/web: spec.ipFamilies"):
        load(text)


def test_headless_and_external_name_program_nothing() -> None:
    assert parse_service("d", "h", {**SPEC, "clusterIP": "None"}).cluster_ip is None
    p = ServiceProxy()
    flows, groups, problems = p.load([svc({**SPEC, "clusterIP": "None"})],
                                     [pod("a", "10.244.1.2", {"app": "web"})])
    assert (flows, groups, problems) == ({}, {}, [])


def test_endpoints_resolve_named_ports_per_pod() -> None:
    s = parse_service("d", "web", SPEC)
    pods = [PodInfo("d", "a", {"app": "web"}, "10.244.1.2", "n1", (("http", 8080, "TCP"),)),
            PodInfo("d", "b", {"app": "web"}, "10.244.1.3", "n1", (("http", 9090, "TCP"),)),
            PodInfo("d", "c", {"app": "web"}, "10.244.1.4", "n1", ()),        # no such port
            PodInfo("d", "e", {"app": "web"}, "", "n1", (("http", 80, "TCP"),)),  # no IP
            PodInfo("x", "f", {"app": "web"}, "10.244.1.6", "n1", (("http", 80, "TCP"),)),
            PodInfo("d", "g", {"app": "db"}, "10.244.1.7", "n1", (("http", 80, "TCP"),))]
    assert endpoints(s, s.ports[0], pods) == [("10.244.1.2", 8080), ("10.244.1.3", 9090)]
    assert endpoints(s, ServicePort("dns", "UDP", 53, 53), pods) == [
        ("10.244.1.2", 53), ("10.244.1.3", 53), ("10.244.1.4", 53)]


def test_one_group_per_port_with_a_bucket_per_endpoint() -> None:
    p = ServiceProxy()
    flows, groups, _ = p.load([svc()], [pod("a", "10.244.1.2", {"app": "web"}, [("http", 8080)]),
                                        pod("b", "10.244.2.2", {"app": "web"}, [("http", 80)])])
    gs = groups["service:d/web"]
    assert len(gs) == 2 and len(flows["service:d/web"]) == 2
    http = next(g for g in gs if len(g.buckets) == 2 and "8080" in g.ofctl())
    egress = DEFAULT.id(EGRESS_POLICY)
    assert http.ofctl().endswith(
        f"bucket=actions=ct(commit,table={egress},zone=65520,nat(dst=10.244.1.2:8080))"
        f",bucket=actions=ct(commit,table={egress},zone=65520,nat(dst=10.244.2.2:80))")
    lb = [f for f in flows["service:d/web"] if f.match_text().startswith("tcp")][0]
    assert lb.match_text() == "tcp,nw_dst=10.96.0.10,tp_dst=80"
    assert lb.actions == (GroupAction(http.group_id),)


def test_changes_touch_only_the_services_they_affect() -> None:
    p = ServiceProxy()
    p.load([svc(), svc({**SPEC, "clusterIP": "10.96.0.11", "selector": {"app": "db"}}, "db")],
           [pod("a", "10.244.1.2", {"app": "web"}, [("http", 80)])])
    gid_before = {g.group_id for g in p.built["d/web"][1]}
    # A new web pod: only web changes, and keeps its group ids.
    flows, groups, _ = p.apply([Change("Pod", "d", "b", "put",
                                       pod("b", "10.244.1.3", {"app": "web"}, [("http", 80)]))])
    assert set(flows) == {"service:d/web"}
    assert {g.group_id for g in groups["service:d/web"]} == gid_before
    # An unrelated pod: nothing.
    assert p.apply([Change("Pod", "d", "z", "put", pod("z", "10.244.1.9", {"app": "x"}))])[:2] \
        == ({}, {})
    # The last endpoint of db's selector never existed; deleting db removes its owner.
    flows, groups, _ = p.apply([Change("Service", "d", "db", "delete", None)])
    assert flows == {"service:d/db": []} and groups == {"service:d/db": []}


def test_a_service_without_endpoints_goes_to_the_agent_and_has_no_group() -> None:
    """The agent answers those packets (controller.reject)."""
    p = ServiceProxy()
    flows, groups, _ = p.load([svc()], [])
    assert groups["service:d/web"] == []
    assert all(f.actions == (Controller(),) for f in flows["service:d/web"])


def test_a_bad_service_is_reported_and_the_rest_still_programmed() -> None:
    p = ServiceProxy()
    flows, _, problems = p.load([svc({**SPEC, "ipFamilies": ["IPv6"]}, "bad"), svc()],
                                [pod("a", "10.244.1.2", {"app": "web"}, [("http", 80)])])
    assert set(flows) == {"service:d/web"}
    assert problems and "service d/bad: spec.ipFamilies" in problems[0]


def test_group_ids_are_stable_and_collisions_probe_on() -> None:
    a = group_id_for("d/web/0", {})
    assert a == group_id_for("d/web/0", {})
    assert group_id_for("d/web/0", {a: "other/svc/1"}) != a


def test_nat_needs_commit_and_an_address() -> None:
    with pytest.raises(ValueError):
        CT(nat="10.0.0.1:80")
    with pytest.raises(ValueError):
        CT(commit=True, nat="10.0.0.1")


def slice_(name: str, service: str, eps: list[tuple[str, dict[str, bool]]],
           ports: Any = ({"name": "http", "port": 8080, "protocol": "TCP"},),
           address_type: str = "IPv4") -> dict[str, Any]:
    return {"namespace": "d", "name": name, "addressType": address_type,
            "labels": {"kubernetes.io/service-name": service}, "ports": list(ports),
            "endpoints": [{"addresses": [a], "conditions": c} for a, c in eps]}


def test_slices_give_ready_endpoints_and_terminating_only_as_a_fallback() -> None:
    s = parse_service("d", "web", SPEC)
    http = s.ports[0]
    ready, term = {"ready": True}, {"ready": False, "serving": True, "terminating": True}
    gone = {"ready": False, "serving": False, "terminating": True}
    slices = [slice_("a", "web", [("10.244.1.2", ready), ("10.244.1.3", term),
                                  ("10.244.1.4", gone), ("not-an-ip", ready)]),
              slice_("b", "web", [("10.244.2.2", {})]),             # ready unset: ready
              slice_("c", "other", [("10.244.3.3", ready)]),         # another Service
              slice_("d", "web", [("fd00::1", ready)], address_type="IPv6")]
    assert slice_endpoints(s, http, slices) == [("10.244.1.2", 8080), ("10.244.2.2", 8080)]
    only_term = [slice_("a", "web", [("10.244.1.3", term), ("10.244.1.4", gone)])]
    assert slice_endpoints(s, http, only_term) == [("10.244.1.3", 8080)]
    # the UDP port "dns" has no slice port of that name and protocol
    assert slice_endpoints(s, s.ports[1], slices) == []


def test_slice_changes_touch_their_service() -> None:
    p = ServiceProxy(slices=True)
    p.load([svc()], [], [])
    flows, groups, _ = p.apply([Change("EndpointSlice", "d", "web-1", "put",
                                       slice_("web-1", "web", [("10.244.1.2", {})]))])
    assert set(groups) == {"service:d/web"} and len(groups["service:d/web"]) == 1
    flows, groups, _ = p.apply([Change("EndpointSlice", "d", "web-1", "delete", None)])
    assert groups == {"service:d/web": []}


def test_many_endpoints_split_across_chained_groups() -> None:
    """More endpoints than one group message holds: sub-groups that each fit one
    OpenFlow message, under a top group weighted by their sizes, so every endpoint
    keeps a 1/n share; each endpoint is in exactly one sub-group; fewer endpoints
    later give the sub-group ids back."""
    from flowcni.flows.services import MAX_BUCKETS, split_sizes
    from flowcni.flows.tables import DEFAULT
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as parser

    class DP:
        ofproto, ofproto_parser = ofp, parser

    n = 2 * MAX_BUCKETS + 7
    p = ServiceProxy()
    pods = [pod(f"p{i}", f"10.244.{i // 250}.{i % 250 + 2}", {"app": "web"}, [("http", 80)])
            for i in range(n)]
    flows, groups, problems = p.load([svc()], pods)
    assert not problems
    gs = {g.group_id: g for g in groups["service:d/web"]}
    lb = next(f for f in flows["service:d/web"] if ("tcp_dst", 80) in f.match)
    top = gs[next(a.group_id for a in lb.actions if isinstance(a, GroupAction))]
    subs = [gs[b[0].group_id] for b in top.buckets]
    assert len(subs) == 3 and top.weights == tuple(len(s.buckets) for s in subs)
    assert sorted(top.weights) == sorted(split_sizes(n)) and sum(top.weights) == n
    assert max(top.weights) - min(top.weights) <= 1
    nats = [b[0].nat for s in subs for b in s.buckets]
    assert len(nats) == len(set(nats)) == n
    # sub-groups come before the top group that leads to them
    order = [g.group_id for g in groups["service:d/web"]]
    assert all(order.index(s.group_id) < order.index(top.group_id) for s in subs)
    for g in [*subs, top]:
        m = parser.OFPGroupMod(DP(), command=0x8000, type_=ofp.OFPGT_SELECT, group_id=1,
                               buckets=g.osken_buckets(parser, ofp, DEFAULT))
        m.serialize()
        assert len(m.buf) <= 0xFFFF
    assert "weight:" in top.ofctl() and "group:" in top.ofctl()
    assert p.describe()[0]["ports"][0]["subgroups"] == sorted(s.group_id for s in subs)
    # down to one group: the sub-group ids are released
    gone = [Change("Pod", "d", f"p{i}", "delete", None) for i in range(MAX_BUCKETS + 10, n)]
    _, groups, _ = p.apply(gone)
    gs = {g.group_id: g for g in groups["service:d/web"]}
    assert gs[top.group_id].weights == tuple(split_sizes(MAX_BUCKETS + 10))
    assert len(gs[top.group_id].buckets) == 2
    assert p.describe()[0]["ports"][0]["subgroups"] == sorted(s.group_id for s in subs[:2])
    assert set(p.gids) == {g.group_id for g in groups["service:d/web"]}


def test_fast_paths_still_validate() -> None:
    """The validated-once shortcuts (CT.dnat, Flow.with_values) refuse what the
    generic paths refuse, and give what the generic paths give."""
    from flowcni.flows.cookie import Feature
    from flowcni.flows.model import Flow

    assert CT.dnat("10.0.0.1", 80, "EgressRule") == CT(commit=True, table="EgressRule",
                                                       nat="10.0.0.1:80")
    for ip, port in (("10.0.0.256", 80), ("10.0.0.1", 0), ("10.0.0.1", 70000),
                     ("010.0.0.1", 80), ("10.0.0.1", True)):
        with pytest.raises(ValueError):
            CT.dnat(ip, port, "EgressRule")  # type: ignore[arg-type]
    t = Flow.make("ServiceLB", 200, {"ipv4_dst": "0.0.0.0", "tcp_dst": 1}, [GroupAction(1)],
                  feature=Feature.SERVICE, owner="")
    f = Flow.with_values(t, {"ipv4_dst": "10.96.0.1", "tcp_dst": 80}, [GroupAction(7)],
                         owner="o")
    assert f == Flow.make("ServiceLB", 200, {"ipv4_dst": "10.96.0.1", "tcp_dst": 80},
                          [GroupAction(7)], feature=Feature.SERVICE, owner="o")
    for bad in ({"tcp_dst": 70000}, {"ipv4_dst": "10.96.0.1/8"}, {"udp_dst": 53},
                {"tcp_dst": "80"}):
        with pytest.raises(ValueError):
            Flow.with_values(t, bad, [GroupAction(7)], owner="o")


def test_unchanged_inputs_are_not_rebuilt() -> None:
    """A change that leaves a Service's endpoints as they were reports nothing and
    reuses the built objects (the per-Service content hash)."""
    p = ServiceProxy()
    p.load([svc()], [pod("a", "10.244.1.2", {"app": "web"}, [("http", 80)])])
    before = p.built["d/web"]
    flows, groups, _ = p.apply([Change("Pod", "d", "a", "put", pod(
        "a", "10.244.1.2", {"app": "web", "extra": "x"}, [("http", 80)]))])
    assert flows == {} and groups == {} and p.built["d/web"] is before
    flows, _, _ = p.apply([Change("Pod", "d", "b", "put", pod(
        "b", "10.244.1.3", {"app": "web"}, [("http", 80)]))])
    assert list(flows) == ["service:d/web"] and p.built["d/web"] is not before


def test_removed_udp_endpoints_are_reported_once_for_flushing() -> None:
    """Only UDP ports' removed endpoints; each once (take_stale drains); the flush names
    the ClusterIP side and the endpoint side of the entries, in the pods' zone."""
    from flowcni.controller.svcconntrack import flush_args
    from flowcni.flows.services import StaleUDP

    spec = {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                      {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}
    p = ServiceProxy()
    p.load([svc(spec)], [pod("a", "10.244.1.2", {"app": "web"}),
                         pod("b", "10.244.1.3", {"app": "web"})])
    assert p.take_stale() == []
    p.apply([Change("Pod", "d", "a", "delete", None)])
    gone = StaleUDP("10.96.0.10", 53, "10.244.1.2", 5353)
    assert p.take_stale() == [gone] and p.take_stale() == []
    p.apply([Change("Service", "d", "web", "delete", None)])
    # none left: one flush for all, naming the endpoints it had (for the SNAT zone)
    assert p.take_stale() == [StaleUDP("10.96.0.10", 53, gone=(("10.244.1.3", 5353),))]
    assert flush_args(StaleUDP("10.96.0.10", 53)) == [
        "zone=65520", "ct_nw_dst=10.96.0.10,ct_nw_proto=17,ct_tp_dst=53"]
    assert flush_args(gone) == ["zone=65520", "ct_nw_dst=10.96.0.10,ct_nw_proto=17,ct_tp_dst=53",
                                "ct_nw_src=10.244.1.2,ct_nw_proto=17,ct_tp_src=5353"]


def test_stale_udp_flush_covers_the_snat_zone_once_per_endpoint() -> None:
    """Node ports with externalTrafficPolicy Cluster are SNATed after the DNAT, in the
    SNAT zone: a removed endpoint's entries there (client -> endpoint) are flushed as
    well, once per endpoint address and port however many fronts (ClusterIP, node
    port) reported it, and for a Service left with none, each endpoint it had. A
    tenant's flush (snat_zone=False) leaves that zone alone."""
    from flowcni.controller.svcconntrack import flush_stale
    from flowcni.flows.nodeport import NODEPORT_VIP
    from flowcni.flows.services import StaleUDP

    spec = {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353,
                       "nodePort": 30053}]}
    p = ServiceProxy()
    p.load([svc(spec)], [pod("a", "10.244.1.2", {"app": "web"}),
                         pod("b", "10.244.1.3", {"app": "web"})])
    p.apply([Change("Pod", "d", "a", "delete", None)])
    stale = p.take_stale()
    assert {(s.cluster_ip, s.port) for s in stale} == {("10.96.0.10", 53), (NODEPORT_VIP, 30053)}

    class Calls:
        def __init__(self) -> None:
            self.args: list[tuple[str, ...]] = []

        def call(self, method: str, *params: str) -> str:
            assert method == "dpctl/flush-conntrack"
            self.args.append(params)
            return ""
    c = Calls()
    assert flush_stale(c, stale) == 3
    snat = [a for a in c.args if a[0] == "zone=65521"]
    assert snat == [("zone=65521", "ct_nw_dst=10.244.1.2,ct_nw_proto=17,ct_tp_dst=5353")]
    c = Calls()
    flush_stale(c, stale, 7, snat_zone=False)
    assert [a[0] for a in c.args] == ["zone=7", "zone=7"]
    p.apply([Change("Service", "d", "web", "delete", None)])
    c = Calls()
    flush_stale(c, p.take_stale())
    assert [a for a in c.args if a[0] == "zone=65521"] == [
        ("zone=65521", "ct_nw_dst=10.244.1.3,ct_nw_proto=17,ct_tp_dst=5353")]
    assert StaleUDP("v", 1, "e", 2).endpoints == (("e", 2),)


def test_pod_from_body_with_a_memo_shares_repeats_and_gives_the_same_pods() -> None:
    """A bulk load's memo (ServiceProxy.load) shares equal label sets, port lists and
    strings between pods, and each pod equals the one made without it; a label value
    that is not hashable keeps its own dict."""
    from flowcni.flows.policy import PodInfo, pod_from_body

    def body(name: str, labels: dict[str, Any]) -> dict[str, Any]:
        return {"namespace": "d", "name": name, "ip": f"10.0.0.{len(name)}", "node": "n1",
                "labels": labels, "ports": [{"name": "http", "containerPort": 80}]}
    memo: dict[Any, Any] = {}
    a, b = (pod_from_body(body(n, {"app": "web", "tier": "x"}), memo) for n in ("a", "bb"))
    c = pod_from_body(body("ccc", {"app": "web", "odd": ["x"]}), memo)
    assert a.labels is b.labels and a.ports is b.ports and a.namespace is b.namespace
    assert c.labels == {"app": "web", "odd": ["x"]} and c.labels is not a.labels
    for p, n, labels in ((a, "a", {"app": "web", "tier": "x"}),
                         (c, "ccc", {"app": "web", "odd": ["x"]})):
        assert p == pod_from_body(body(n, labels)) == PodInfo(
            "d", n, labels, f"10.0.0.{len(n)}", "n1", (("http", 80, "TCP"),))


def test_the_label_index_is_built_on_first_use_and_then_kept_in_step() -> None:
    p = ServiceProxy()
    p.load([], [pod("a", "10.244.1.2", {"app": "web"}, [("http", 80)]),
                pod("b", "10.244.1.3", {"app": "db"}, [("http", 80)])])
    assert p._by_label is None  # no Service: no index
    # A pod changing labels before the first Service: the index, built later, sees it.
    p.apply([Change("Pod", "d", "b", "put", pod("b", "10.244.1.3", {"app": "web"},
                                                [("http", 80)]))])
    assert p._by_label is None
    flows, _, _ = p.apply([Change("Service", "d", "web", "put", svc())])
    assert p._by_label is not None
    assert [ip for ip, _ in p.port_endpoints(p.services["d/web"])[0]] == [
        "10.244.1.2", "10.244.1.3"]
    # After it exists, pod changes keep it in step: a pod leaving the selector goes.
    p.apply([Change("Pod", "d", "a", "put", pod("a", "10.244.1.2", {"app": "db"},
                                                [("http", 80)]))])
    assert [ip for ip, _ in p.port_endpoints(p.services["d/web"])[0]] == ["10.244.1.3"]
    assert {k: set(v) for k, v in p.by_label.items()} == {("d", "app", "web"): {"d/b"},
                                                           ("d", "app", "db"): {"d/a"}}


def test_fast_dnat_actions_are_real_cts() -> None:
    """CT.dnats fills each action as a twin and turns it into a CT: the result is a
    CT in every way (type, equality both ways, hash, repr), checked or not."""
    from flowcni.flows.model import _CTFill

    want = CT(commit=True, table="EgressRule", nat="10.0.0.1:80")
    for checked in (False, True):
        got = CT.dnats([("10.0.0.1", 80), ("10.0.0.2", 80)], "EgressRule", checked=checked)
        assert [type(a) for a in got] == [CT, CT]
        assert got[0] == want and want == got[0] and hash(got[0]) == hash(want)
        assert repr(got[0]) == repr(want) and got[1].nat == "10.0.0.2:80"
    assert not isinstance(got[0], _CTFill)
    with pytest.raises(ValueError):  # unchecked (the default) still refuses
        CT.dnats([("10.0.0.1", 80), ("10.0.0.1", 0)], "EgressRule")


def test_the_proxy_checks_each_pods_address_and_ports_once_and_reports_bad_ones() -> None:
    """A pod whose address is not IPv4, or whose named port has no valid number, is
    reported naming the pod and field and is not an endpoint; the rest of the load
    goes on (a bad address used to fail the whole build at its DNAT action)."""
    p = ServiceProxy()
    flows, groups, problems = p.load([svc()], [
        pod("a", "10.244.1.2", {"app": "web"}, [("http", 8080)]),
        pod("b", "010.244.1.3", {"app": "web"}, [("http", 8080)]),
        pod("c", "10.244.1.4", {"app": "web"}, [("http", 70000)]),
        {"namespace": "d", "name": "d", "labels": {"app": "web"}, "ip": "10.244.1.5",
         "ports": "not a list"}])
    assert problems == [
        "pod d/b: ip: '010.244.1.3' is not an IPv4 address (not an endpoint)",
        "pod d/c: ports[0].containerPort: 70000 is not a port number (1-65535)"]
    http, dns = p.port_endpoints(p.services["d/web"])
    assert http == [("10.244.1.2", 8080)]
    assert dns == [("10.244.1.2", 53), ("10.244.1.4", 53)]  # c's address is fine
    assert sorted(p.pods) == ["d/a", "d/b", "d/c"]  # d is no pod: skipped


def test_proxy_pods_share_repeats_and_match_the_policy_engines_pods() -> None:
    """One load's memo shares namespaces, label sets and port lists between pods; each
    ProxyPod holds what flows.policy.pod_from_body reads for the same body."""
    from flowcni.flows.policy import pod_from_body
    from flowcni.flows.services import PodMemo, proxy_pods

    bodies = [{"namespace": "d", "name": n, "ip": f"10.0.0.{len(n)}", "node": "n1",
               "labels": labels, "ports": ports} for n, labels, ports in (
        ("a", {"app": "web", "tier": "x"}, [{"name": "http", "containerPort": 80}]),
        ("bb", {"app": "web", "tier": "x"}, [{"name": "http", "containerPort": 80}]),
        ("ccc", {"app": "web", "odd": ["x"]}, [{"name": "h", "containerPort": "81",
                                              "protocol": "udp"}, {"containerPort": 0}]),
        ("dddd", {}, None))]
    warnings: list[str] = []
    got = dict(proxy_pods(bodies, PodMemo(), warnings))
    assert warnings == [] and list(got) == ["d/a", "d/bb", "d/ccc", "d/dddd"]
    a, b, c, d = got.values()
    assert a.labels is b.labels and a.ports is b.ports and a.namespace is b.namespace
    assert c.labels == {"app": "web", "odd": ["x"]} and c.labels is not a.labels
    for body, mine in zip(bodies, got.values(), strict=True):
        ref = pod_from_body(body)
        assert (mine.namespace, mine.labels, mine.ip, mine.ports) == (
            ref.namespace, ref.labels, ref.ip, ref.ports)
    assert c.ports == (("h", 81, "UDP"),)


def test_equal_service_ports_and_exposures_are_one_object() -> None:
    a = parse_service("d", "a", SPEC)
    b = parse_service("e", "b", {**SPEC, "clusterIP": "10.96.0.11"})
    assert a.ports == b.ports and all(x is y for x, y in zip(a.ports, b.ports, strict=True))
    assert a.exposure is b.exposure
    c = parse_service("d", "c", {**SPEC, "sessionAffinity": "ClientIP"})
    assert c.exposure is not a.exposure and c.exposure.affinity_timeout == 10800


def test_an_empty_selector_takes_endpoints_from_slices_not_the_namespace() -> None:
    """`selector: {}` is no selector (the API reference: endpoints are then managed
    outside Kubernetes): the namespace's pods are not its endpoints, its hand-written
    EndpointSlices are, even when the proxy otherwise reads pods (embedded store)."""
    p = ServiceProxy()
    pods = [pod("a", "10.244.1.2", {"app": "web"}), pod("b", "10.244.1.3", {"app": "db"})]
    p.load([], pods)
    p.apply([Change("Service", "d", "web", "put", svc({**SPEC, "selector": {}}, "web"))])
    s = p.services["d/web"]
    assert s.selector is None and not s.selects(p.pods["d/a"])
    assert p.port_endpoints(s) == [[], []]
    p.apply([Change("EndpointSlice", "d", "web-1", "put",
                    slice_("web-1", "web", [("10.244.9.9", {})]))])
    assert p.port_endpoints(s)[0] == [("10.244.9.9", 8080)]
