"""NodePorts, external IPs, traffic policies and affinity fields: parsing and builders
(pure logic; the datapath proof is tests/datapath/test_nodeport.py)."""

from __future__ import annotations

from typing import Any

import pytest
from flowcni.controller.hostnet import proxy_rules
from flowcni.datastore.manifests import ManifestError, load
from flowcni.flows import fields as F
from flowcni.flows.model import CT, Controller, GroupAction, Load, Resubmit
from flowcni.flows.nodeport import NODEPORT_VIP, HostEntry, gateway_snat_flows
from flowcni.flows.services import ServiceError, ServiceProxy, parse_service
from flowcni.flows.tables import DEFAULT

BASE = {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}


def pod(name: str, ip: str) -> dict[str, Any]:
    return {"namespace": "d", "name": name, "ip": ip, "labels": {"app": "web"}, "node": "n",
            "ports": []}


def proxy(spec: dict[str, Any], status: Any = None) -> tuple[ServiceProxy, Any, Any]:
    sp = ServiceProxy(local_cidr="10.244.1.0/24")
    body: dict[str, Any] = {"namespace": "d", "name": "web", "spec": spec}
    if status:
        body["status"] = status
    flows, groups, problems = sp.load([body], [pod("a", "10.244.1.5"), pod("b", "10.244.2.5")])
    assert problems == []
    return sp, flows["service:d/web"], groups["service:d/web"]


def group_ips(groups: Any, gid: int) -> list[str]:
    g = next(g for g in groups if g.group_id == gid)
    return sorted(b[0].nat.split(":")[0] for b in g.buckets)


def lb_flow(flows: Any, ip: str, port: int) -> Any:
    return next(f for f in flows if dict(f.match).get("ipv4_dst") == ip
                and dict(f.match).get("tcp_dst") == port)


@pytest.mark.parametrize("patch,field", [
    ({"ports": [{"port": 80, "nodePort": "x"}]}, r"spec.ports\[0\].nodePort"),
    ({"ports": [{"port": 80, "nodePort": 70000}]}, r"spec.ports\[0\].nodePort"),
    ({"ports": [{"port": 80}]}, r"spec.ports\[0\].nodePort: required"),
    ({"ports": [{"port": 80, "nodePort": 30001}, {"port": 81, "nodePort": 30001}]},
     r"spec.ports\[1\].nodePort: 30001/TCP used twice"),
    ({"externalIPs": ["1.2.3.x"]}, r"spec.externalIPs\[0\]"),
    ({"externalIPs": "1.2.3.4"}, "spec.externalIPs"),
    ({"externalTrafficPolicy": "Nearest"}, "spec.externalTrafficPolicy"),
    ({"type": "ClusterIP", "externalTrafficPolicy": "Local"}, "spec.externalTrafficPolicy"),
    ({"internalTrafficPolicy": "Node"}, "spec.internalTrafficPolicy"),
    ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity"),
    ({"sessionAffinity": "ClientIP",
      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
])
def test_bad_fields_are_refused_by_name(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ServiceError, match=field):
        parse_service("d", "web", {**BASE, **patch})


def test_bad_load_balancer_ip_is_refused_by_name() -> None:
    with pytest.raises(ServiceError, match=r"status.loadBalancer.ingress\[0\].ip"):
        parse_service("d", "web", {**BASE, "type": "LoadBalancer"},
                      {"loadBalancer": {"ingress": [{"ip": "nope"}]}})
    with pytest.raises(ManifestError, match=r"Service d/web: spec.ports\[0\].nodePort"):
        load("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: d}\n"
             "spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: -1}]}\n")


def test_cluster_policy_node_port_uses_the_clusterip_group() -> None:
    _, flows, groups = proxy(BASE)
    cip, np = lb_flow(flows, "10.96.0.10", 80), lb_flow(flows, NODEPORT_VIP, 30080)
    # The same group, with the flag that has OVS SNAT the connection to the gateway
    # address once the endpoint is chosen (flows.nodeport.gateway_snat_flows).
    assert np.actions == (Load(F.SNAT_TO_GATEWAY, 1), *cip.actions)
    assert isinstance(cip.actions[0], GroupAction)
    assert group_ips(groups, cip.actions[0].group_id) == ["10.244.1.5", "10.244.2.5"]


def test_cluster_policy_node_port_with_affinity_keeps_the_snat_flag() -> None:
    _, flows, _ = proxy({**BASE, "sessionAffinity": "ClientIP"})
    np, cip = lb_flow(flows, NODEPORT_VIP, 30080), lb_flow(flows, "10.96.0.10", 80)
    assert np.actions == (Load(F.SNAT_TO_GATEWAY, 1), Resubmit("SessionAffinity"))
    assert cip.actions == (Resubmit("SessionAffinity"),)


def test_sctp_cluster_policy_is_masqueraded_by_the_node_not_flagged() -> None:
    spec = {**BASE, "externalIPs": ["203.0.113.1"], "ports": [
        *BASE["ports"], {"name": "s", "port": 99, "protocol": "SCTP", "nodePort": 30099}]}
    sp, flows, _ = proxy(spec)
    sctp = [f for f in flows if "sctp_dst" in dict(f.match)]
    assert sctp and all(not isinstance(a, Load) for f in sctp for a in f.actions)
    assert sp.host_view()[0] == [HostEntry("sctp", 30099, True),
                                 HostEntry("tcp", 30080, False),
                                 HostEntry("sctp", 99, True, "203.0.113.1")]
    sp, _, _ = proxy({**spec, "externalTrafficPolicy": "Local"})
    assert sp.host_view()[0] == [HostEntry("sctp", 30099, False), HostEntry("tcp", 30080, False)]


def test_gateway_snat_flows_undo_before_the_main_zone() -> None:
    text = {f.table: f.ofctl() for f in gateway_snat_flows("10.244.1.1")}
    assert "nat(src=10.244.1.1:1024-29999)" in text["Output"] \
        and f"zone={F.SNAT_ZONE}" in text["Output"]
    assert "nw_dst=10.244.1.1" in text["ConntrackZone"] and "nat)" in text["ConntrackZone"]
    assert "ct_mark=0x2/0x2" in text["ConntrackState"]
    assert "set_field:0x3->ct_mark" in text["ConntrackCommit"]
    from flowcni.flows.hairpin import PRIO_HAIRPIN
    from flowcni.flows.tenantservices import PRIO_HAIRPIN_OUT
    out = next(f for f in gateway_snat_flows("10.244.1.1") if f.table == "Output")
    assert out.priority > max(PRIO_HAIRPIN, PRIO_HAIRPIN_OUT)  # a pod via its node port


def test_external_local_uses_a_group_of_local_endpoints_and_keeps_the_source() -> None:
    sp, flows, groups = proxy({**BASE, "externalTrafficPolicy": "Local",
                               "externalIPs": ["203.0.113.1"]})
    cip, np = lb_flow(flows, "10.96.0.10", 80), lb_flow(flows, NODEPORT_VIP, 30080)
    ext = lb_flow(flows, "203.0.113.1", 80)
    assert group_ips(groups, cip.actions[0].group_id) == ["10.244.1.5", "10.244.2.5"]
    assert group_ips(groups, np.actions[0].group_id) == ["10.244.1.5"]
    assert ext.actions == np.actions
    entries, ips = sp.host_view()
    assert entries == [HostEntry("tcp", 30080, False)]  # external IPs: routed, no rule
    assert ips == ["10.96.0.10", "203.0.113.1"]


def test_internal_local_clusterip_and_cluster_node_port() -> None:
    _, flows, groups = proxy({**BASE, "internalTrafficPolicy": "Local"})
    cip, np = lb_flow(flows, "10.96.0.10", 80), lb_flow(flows, NODEPORT_VIP, 30080)
    assert group_ips(groups, cip.actions[0].group_id) == ["10.244.1.5"]
    assert group_ips(groups, np.actions[-1].group_id) == ["10.244.1.5", "10.244.2.5"]


def test_local_policy_without_local_endpoints_drops_cluster_without_any_rejects() -> None:
    sp = ServiceProxy(local_cidr="10.244.9.0/24")
    spec = {**BASE, "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"}
    flows, groups, _ = sp.load([{"namespace": "d", "name": "web", "spec": spec}],
                               [pod("b", "10.244.2.5")])
    assert all(f.actions == () for f in flows["service:d/web"])
    assert groups["service:d/web"] == []
    flows, _, _ = ServiceProxy(local_cidr="10.244.9.0/24").load(
        [{"namespace": "d", "name": "web", "spec": BASE}], [])
    assert all(isinstance(f.actions[0], Controller) for f in flows["service:d/web"])


def test_load_balancer_ips_and_group_ids_released_on_delete() -> None:
    sp, flows, _ = proxy({**BASE, "type": "LoadBalancer", "externalTrafficPolicy": "Local"},
                         {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "x"}]}})
    assert lb_flow(flows, "198.51.100.7", 80)
    assert len(sp.gids) == 2  # the ClusterIP's group and the Local one

    class C:
        kind, namespace, name, op, body = "Service", "d", "web", "delete", None
    sp.apply([C()])
    assert sp.gids == {} and sp.host_view() == ([], [])


def test_proxy_rules_text() -> None:
    text = proxy_rules([HostEntry("tcp", 30080, True), HostEntry("udp", 30081, False),
                        HostEntry("tcp", 80, True, "203.0.113.1")], NODEPORT_VIP)
    assert f"tcp dport 30080 meta mark set meta mark | 0x20000 dnat to {NODEPORT_VIP}" in text
    assert f"udp dport 30081 dnat to {NODEPORT_VIP}" in text
    assert "ip daddr 203.0.113.1 tcp dport 80 meta mark set meta mark | 0x20000" in text
    assert "fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports" in text


def test_hairpin_flows_follow_local_endpoints() -> None:
    from flowcni.flows.hairpin import HAIRPIN_OWNER
    from flowcni.flows.nodeport import HAIRPIN_IP
    sp = ServiceProxy(local_cidr="10.244.1.0/24")
    flows, _, _ = sp.load([{"namespace": "d", "name": "web", "spec": BASE}],
                          [pod("a", "10.244.1.5"), pod("b", "10.244.2.5")])
    text = [f.ofctl(names=True) for f in flows[HAIRPIN_OWNER]]
    assert any("nw_src=10.244.1.5,nw_dst=10.244.1.5" in t and
               f"ct(commit,zone=65521,nat(src={HAIRPIN_IP})),IN_PORT" in t for t in text), text
    assert not any("10.244.2.5" in t for t in text)  # remote endpoints need none
    unsnat = f"ct(table={DEFAULT.id('ConntrackZone')},zone=65521,nat)"
    assert any(f"nw_dst={HAIRPIN_IP}" in t and unsnat in t for t in text), text

    class C:
        kind, namespace, name, op, body = "Service", "d", "web", "delete", None
    flows, _, _ = sp.apply([C()])
    assert flows[HAIRPIN_OWNER] == []


def test_a_goto_to_the_same_table_is_refused() -> None:
    from flowcni.flows.cookie import Feature
    from flowcni.flows.model import CT, Flow
    with pytest.raises(ValueError, match="may not go to ConntrackZone"):
        Flow.make("ConntrackZone", 1, goto="ConntrackZone", feature=Feature.BASE, owner="x")
    with pytest.raises(ValueError, match="nat"):
        CT(commit=False, snat="169.254.0.253")


def test_affinity_resubmits_learns_in_a_flow_and_keeps_cluster_fronts_apart() -> None:
    spec = {**BASE, "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 30}}}
    _, flows, groups = proxy(spec)
    text = [f.ofctl(names=True) for f in flows]
    lb = [t for t in text if t.startswith("table=ServiceLB")]
    assert len(lb) == 2 and all("resubmit(," in t and "goto_table:AffinityDNAT" in t
                                for t in lb), lb
    hits = [t for t in text if "priority=210" in t and "AffinityDNAT" in t]
    # one per endpoint per front (ClusterIP and node port share the group, not the flows)
    assert len(hits) == 4 and all("learn(" in t and "idle_timeout=30" in t for t in hits), hits
    (g,) = groups
    assert "resubmit(," in g.ofctl() and "learn(" not in g.ofctl()


def test_kubernetes_service_keeps_its_load_balancer_status() -> None:
    from flowcni.datastore import kubeconv
    raw = {"metadata": {"namespace": "d", "name": "web"},
           "spec": {**BASE, "type": "LoadBalancer"},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}}
    body = kubeconv.service(raw)
    assert body["status"] == {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}
    svc = parse_service("d", "web", body["spec"], body["status"])
    assert svc.exposure.lb_ips == ("198.51.100.9",)


def test_gateway_snat_source_ports_stay_clear_of_the_nodes_own() -> None:
    """The node-port SNAT's source ports (flows.nodeport.snat_port_range): the largest
    run in 1024-65535 clear of the node's ephemeral range and of node ports (1024-29999
    with Linux's and Kubernetes' defaults, DEFAULT_SNAT_PORTS); a node with no room
    left gets None (any port: logged by the agent, which still starts). The emitted
    nat() carries the range, in the OpenFlow message too (os-ken's NXActionNAT
    range_proto_*), and no range for None."""
    from flowcni.flows.nodeport import DEFAULT_SNAT_PORTS, snat_port_range
    assert snat_port_range((32768, 60999), (30000, 32767)) == DEFAULT_SNAT_PORTS == (
        1024, 29999)
    assert snat_port_range((32768, 65535), (30000, 32767)) == (1024, 29999)
    assert snat_port_range((10000, 65000), (30000, 32767)) == (1024, 9999)
    assert snat_port_range((1024, 29000), (30000, 32767)) == (32768, 65535)
    assert snat_port_range((1024, 60999), (30000, 32767)) == (61000, 65535)
    assert snat_port_range((1024, 65535), (30000, 32767)) is None
    assert snat_port_range((1024, 64535), (30000, 32767)) is None  # 1,000 left: too few
    for ephemeral in ((32768, 60999), (32768, 65535), (10000, 65000), (2000, 63000),
                      (1024, 29000), (40000, 41000)):
        r = snat_port_range(ephemeral, (30000, 32767))
        assert r is not None, ephemeral
        lo, hi = r
        assert hi < ephemeral[0] or lo > ephemeral[1], ephemeral
        assert hi < 30000 or lo > 32767, ephemeral
        assert 1024 <= lo <= hi <= 65535 and hi - lo + 1 >= 1024
    anyport = next(f for f in gateway_snat_flows("10.244.1.1", ports=None)
                   if f.table == "Output")
    assert "nat(src=10.244.1.1))" in anyport.ofctl()
    out = next(f for f in gateway_snat_flows("10.244.1.1", ports=(1024, 29999))
               if f.table == "Output")
    assert "nat(src=10.244.1.1:1024-29999)" in out.ofctl()
    from os_ken.ofproto import ofproto_v1_3_parser as parser
    ct = next(a for a in out.actions if isinstance(a, CT))
    nat = ct.osken(parser, None, DEFAULT).actions[-1]
    assert (nat.range_ipv4_min, nat.range_ipv4_max) == ("10.244.1.1", "10.244.1.1")
    assert (nat.range_proto_min, nat.range_proto_max) == (1024, 29999)


def test_ct_snat_port_range_is_checked() -> None:
    """CT.snat: an address, optionally with FIRST-LAST; anything else is refused."""
    assert CT(commit=True, snat="10.0.0.1:61000-65535").ofctl(DEFAULT).endswith(
        "nat(src=10.0.0.1:61000-65535))")
    assert CT(commit=True, snat="10.0.0.1").ofctl(DEFAULT).endswith("nat(src=10.0.0.1))")
    for bad in ("10.0.0.1:", "10.0.0.1:5", "10.0.0.1:9-8", "10.0.0.1:0-10",
                "10.0.0.1:1-65536", "x:1-2", "10.0.0.1:a-b"):
        with pytest.raises(ValueError, match="nat\\(src="):
            CT(commit=True, snat=bad)


def test_read_ephemeral_range(tmp_path: Any) -> None:
    from flowcni.controller.hostnet import read_ephemeral_range
    f = tmp_path / "range"
    f.write_text("32768\t60999\n")
    assert read_ephemeral_range(str(f)) == (32768, 60999)
    with pytest.raises(ValueError, match="ip_local_port_range"):
        read_ephemeral_range(str(tmp_path / "none"))


def test_a_node_port_two_services_ask_for_is_the_first_holders() -> None:
    """Two Services asking for one node port (a direct store write; two Services of one
    tenant): the holder keeps it (at load, the first by key), the other is built without
    it and refused naming spec.ports[i].nodePort, and gets it once the holder lets go.
    Before, both got the same ServiceLB flow and FlowSync refused the whole change."""
    from flowcni.datastore.store import Change
    sp = ServiceProxy(local_cidr="10.244.1.0/24")
    other = {**BASE, "clusterIP": "10.96.0.11"}
    flows, _, problems = sp.load(
        [{"namespace": "d", "name": "web", "spec": BASE},
         {"namespace": "d", "name": "zzz", "spec": other}], [pod("a", "10.244.1.5")])
    assert problems == ["service d/zzz: spec.ports[0].nodePort: 30080/TCP is already "
                        "service d/web's"]
    assert lb_flow(flows["service:d/web"], NODEPORT_VIP, 30080)
    assert not [f for f in flows["service:d/zzz"] if dict(f.match).get("tcp_dst") == 30080]
    assert [e.port for e in sp.host_view()[0]] == [30080]
    # a change of the refused one does not take it
    flows, _, problems = sp.apply([Change(2, "put", "Service", "d", "zzz", {
        "namespace": "d", "name": "zzz", "spec": {**other, "sessionAffinity": "ClientIP"}})])
    assert "already service d/web's" in problems[0]
    assert not [f for f in flows["service:d/zzz"] if dict(f.match).get("tcp_dst") == 30080]
    # the holder goes: the waiting Service is built again, with the port
    flows, _, problems = sp.apply([Change(3, "delete", "Service", "d", "web", None)])
    assert problems == [] and flows["service:d/web"] == []
    assert {dict(f.match).get("tcp_dst") for f in flows["service:d/zzz"]
            if dict(f.match).get("ipv4_dst") == NODEPORT_VIP} == {30080}
    assert sp.np_holder == {("TCP", 30080): "d/zzz"}
