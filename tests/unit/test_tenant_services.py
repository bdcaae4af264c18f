"""Services inside tenant networks (flows/tenantservices.py, controller/tenants.py): pure.

The flows and groups are checked as OVS would hold them (their ovs-ofctl
text): the tenant id in every ServiceLB match, above the tenant
fall-through, and every bucket committing in the tenant's zone.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
from flowcni.datastore.store import Change
from flowcni.flows.model import CT_ZONE, Controller, GroupAction
from flowcni.flows.services import ServiceProxy
from flowcni.flows.tables import DEFAULT
from flowcni.flows.tenant import PRIO_FALLTHROUGH, PRIO_TENANT, TenantNet, base_flows
from flowcni.flows.tenantservices import lift_flow, lift_services, tenant_service_body

NODES = [{"name": "node1", "nodeIP": "192.168.50.11", "podCIDR": "10.244.1.0/24"},
         {"name": "node2", "nodeIP": "192.168.50.12", "podCIDR": "10.244.2.0/24"}]
CLUSTER = "10.244.0.0/16"
VIP = "10.96.5.5"


def tn(name: str, vni: int) -> dict[str, Any]:
    return {"name": name, "created": name, "spec": {
        "namespaceSelector": {"matchLabels": {"tenant": name}},
        "subnets": ["10.50.0.0/16"], "vni": vni}}


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "labels": labels}


def svc(namespace: str, name: str = "web", ip: str = VIP, **spec: Any) -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "spec": {
        "clusterIP": ip, "selector": {"app": "web"},
        "ports": [{"port": 80, "targetPort": 8080}, {"name": "u", "port": 53,
                                                      "protocol": "UDP"}], **spec}}


def pod(namespace: str, name: str, ip: str, node: str = "node1") -> dict[str, Any]:
    return {"namespace": namespace, "name": name, "ip": ip, "node": node,
            "labels": {"app": "web"}}


def _tenants(tmp_path: Any, services: bool = True) -> Any:
    from flowcni.cni.ipam import IPAM
    from flowcni.controller.flowsync import FlowSync
    from flowcni.controller.tenants import Tenants
    from flowcni.flows.node import Gateway
    fs = FlowSync(DEFAULT, lambda: 1)
    gw = Gateway("10.244.1.1", "02:00:00:00:00:01", 2, "10.244.1.0/24", "192.168.50.11")
    t = Tenants("node1", CLUSTER, "geneve", str(tmp_path), fs, 7, gw,
                IPAM("10.244.1.0/24", None))
    if services:
        t.enable_services(slices=False)
    return t, fs


def _ofctl(fs: Any, owner: str) -> list[str]:
    return [f.ofctl(DEFAULT, names=True) for f in fs.flows_of([owner])]


def _groups(fs: Any, owner: str) -> list[str]:
    return [g.ofctl(DEFAULT) for g in fs.desired_groups() if g.owner == owner]


def _load(t: Any, extra_svcs: list[dict[str, Any]] = (),  # type: ignore[assignment]
          extra_pods: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
    t.load([tn("blue", 101), tn("red", 202)],
           [ns("b1", tenant="blue"), ns("r1", tenant="red"), ns("default")], NODES,
           [pod("b1", "w", "10.50.1.5"), pod("r1", "w", "10.50.1.5"), *extra_pods], [],
           [svc("b1"), svc("r1"), *extra_svcs], [])


def test_lifted_service_matches_its_tenant_and_commits_in_its_zone() -> None:
    """The proxy's own flows and groups, lifted: tenant id, priority, zone; pure."""
    p = ServiceProxy(DEFAULT, local_cidr="10.50.1.0/24")  # a local endpoint: hairpin flows
    flows, groups, problems = p.load([svc("b1")], [pod("b1", "w", "10.50.1.5")])
    assert problems == []
    t = TenantNet("blue", 101, ())
    lf, lg = lift_services(t, flows, groups)
    assert set(lf) == set(lg) == {"tenant-service:b1/web", "tenant-hairpin:blue"}
    texts = [f.ofctl(DEFAULT, names=True) for f in lf["tenant-service:b1/web"]]
    assert len(texts) == 2
    for f in lf["tenant-service:b1/web"]:
        assert dict(f.match)["reg4"] == (0x10065, 0x1FFFF)
        assert f.priority > PRIO_FALLTHROUGH
    assert all("reg4=0x10065/0x1ffff" in x and f"nw_dst={VIP}" in x for x in texts)
    gtexts = [g.ofctl(DEFAULT) for g in lg["tenant-service:b1/web"]]
    assert len(gtexts) == 2
    for g in gtexts:
        assert "zone=101" in g and f"zone={CT_ZONE}" not in g, g
        assert re.search(r"nat\(dst=10\.50\.1\.5:(8080|53)\)", g), g
    # the same Service of the default proxy stays in the default zone (nothing shared)
    assert all(f"zone={CT_ZONE}" in g.ofctl(DEFAULT) for g in groups["service:b1/web"])
    # hairpin flows are lifted by lift_hairpin only, as the tenant's: its id on each,
    # the reply's zone flow above the tenant's zone flow (PRIO_TENANT)
    hair = [f for f in flows.get("service-hairpin", [])]
    assert hair and all(f.table != "ServiceLB" for f in hair)
    with pytest.raises(ValueError, match="only"):
        lift_flow(hair[0], t)
    lh = {f.table: f for f in lf["tenant-hairpin:blue"]}
    assert len(lf["tenant-hairpin:blue"]) == len(hair) == 3
    assert all(dict(f.match)["reg4"] == (0x10065, 0x1FFFF) for f in lf["tenant-hairpin:blue"])
    assert lh["ConntrackZone"].priority > PRIO_TENANT
    out = [f.ofctl(DEFAULT, names=True) for f in lf["tenant-hairpin:blue"]
           if f.table == "Output"]
    assert any("nw_src=10.50.1.5,nw_dst=10.50.1.5" in x and "nat(src=169.254.0.253)" in x
               and "IN_PORT" in x for x in out), out


def test_tenant_service_is_above_the_fall_through_and_default_flows() -> None:
    fall = [f for f in base_flows(7) if f.table == "ServiceLB"]
    assert len(fall) == 1 and fall[0].priority == PRIO_FALLTHROUGH
    p = ServiceProxy(DEFAULT)
    flows, _, _ = p.load([svc("b1")], [])  # no endpoint: the agent answers (Controller)
    lf, lg = lift_services(TenantNet("blue", 101, ()), flows, {})
    (f,) = [f for f in lf["tenant-service:b1/web"] if dict(f.match).get("tcp_dst") == 80]
    assert any(isinstance(a, Controller) for a in f.actions)
    assert f.priority > fall[0].priority > max(
        g.priority for fl in flows.values() for g in fl)


def test_two_tenants_same_clusterip_and_endpoint(tmp_path: Any) -> None:
    """Identical ClusterIP and endpoint address in blue and red: two flow sets told apart
    only by the tenant id, two group sets committing in two zones; the default network
    gets none of them."""
    t, fs = _tenants(tmp_path)
    _load(t)
    blue, red = _ofctl(fs, "tenant-service:b1/web"), _ofctl(fs, "tenant-service:r1/web")
    assert len(blue) == len(red) == 2
    assert all("reg4=0x10065/0x1ffff" in x for x in blue)
    assert all("reg4=0x100ca/0x1ffff" in x for x in red)
    gb, gr = _groups(fs, "tenant-service:b1/web"), _groups(fs, "tenant-service:r1/web")
    assert len(gb) == len(gr) == 2
    assert all("zone=101" in g and "nat(dst=10.50.1.5:" in g for g in gb)
    assert all("zone=202" in g and "nat(dst=10.50.1.5:" in g for g in gr)
    ids_b = {int(g.split(",")[0].split("=")[1]) for g in gb}
    ids_r = {int(g.split(",")[0].split("=")[1]) for g in gr}
    assert not ids_b & ids_r
    # each flow leads to its own tenant's group
    for text, ids in ((blue, ids_b), (red, ids_r)):
        assert {int(m) for x in text for m in re.findall(r"group:(\d+)", x)} == ids
    # nothing of theirs is a default-network Service flow (no reg4 match)
    assert not any(o.startswith("service:") for o in fs.owners())
    d = {(s["tenant"], s["service"], s["vni"]) for s in t.describe_services()}
    assert d == {("blue", "b1/web", 101), ("red", "r1/web", 202)}


def test_tenant_service_changes_follow(tmp_path: Any) -> None:
    t, fs = _tenants(tmp_path)
    _load(t)
    # red's endpoint goes: red's port flows answer from the agent; blue is untouched
    blue_before = _ofctl(fs, "tenant-service:b1/web")
    t.apply([Change(2, "delete", "Pod", "r1", "w", None)])
    red = fs.flows_of(["tenant-service:r1/web"])
    assert red and all(any(isinstance(a, Controller) for a in f.actions) for f in red)
    assert _groups(fs, "tenant-service:r1/web") == []
    assert _ofctl(fs, "tenant-service:b1/web") == blue_before
    # UDP endpoint removed: flushed in red's zone
    stale = t.take_stale()
    assert stale and {z for z, _ in stale} == {202}
    assert {(s.cluster_ip, s.port) for _, s in stale} == {(VIP, 53)}
    # a second endpoint in blue: its groups gain a bucket
    t.apply([Change(3, "put", "Pod", "b1", "w2", pod("b1", "w2", "10.50.2.9", "node2"))])
    assert all("10.50.2.9" in g for g in _groups(fs, "tenant-service:b1/web"))
    # blue's Service deleted: its flows and groups go
    t.apply([Change(4, "delete", "Service", "b1", "web", None)])
    assert fs.flows_of(["tenant-service:b1/web"]) == []
    assert _groups(fs, "tenant-service:b1/web") == []
    # a Service of a default namespace never reaches a tenant proxy
    t.apply([Change(5, "put", "Service", "default", "web", svc("default"))])
    assert not any(o.endswith("default/web") for o in fs.owners())


def test_namespace_leaving_its_tenant_takes_its_services(tmp_path: Any) -> None:
    t, fs = _tenants(tmp_path)
    _load(t)
    assert fs.flows_of(["tenant-service:r1/web"])
    t.apply([Change(2, "put", "Namespace", "", "r1", ns("r1"))])  # label removed
    assert fs.flows_of(["tenant-service:r1/web"]) == []
    assert _groups(fs, "tenant-service:r1/web") == []
    assert fs.flows_of(["tenant-service:b1/web"])  # blue kept


def test_unsupported_fields_are_dropped_and_named(tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    body = svc("b1", type="LoadBalancer", externalIPs=["192.0.2.1"],
               sessionAffinity="ClientIP")
    body["spec"]["ports"][0]["nodePort"] = 30080
    new, dropped = tenant_service_body(body)
    assert dropped == ["spec.type=LoadBalancer", "spec.externalIPs"]
    assert new["spec"]["type"] == "NodePort" and new["spec"]["ports"][0]["nodePort"] == 30080
    assert body["spec"]["type"] == "LoadBalancer"  # the caller's body is left as it was
    assert tenant_service_body(svc("b1")) == (svc("b1"), [])
    t, fs = _tenants(tmp_path)
    t.load([tn("blue", 101)], [ns("b1", tenant="blue")], NODES,
           [pod("b1", "w", "10.50.1.5")], [], [body], [])
    assert "spec.externalIPs" in caplog.text and "b1/web" in caplog.text
    texts = _ofctl(fs, "tenant-service:b1/web")
    assert all("192.0.2.1" not in x for x in texts)
    # sessionAffinity is kept (lifted: see test_affinity_inside_a_tenant)
    assert all("goto_table:AffinityDNAT" in x for x in texts if "table=ServiceLB" in x)


def test_node_port_into_a_tenant(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A tenant Service's node port: the lifted node-port flow (tenant id, NODEPORT_VIP,
    its zone), the entry into the tenant under its gateway address on this node, the
    answer's way out, and the node's nftables entry; a node port the default network
    has is refused, naming the field."""
    from flowcni.flows.nodeport import HostEntry
    np_svc = svc("b1", type="NodePort")
    np_svc["spec"]["ports"][0]["nodePort"] = 30090
    t, fs = _tenants(tmp_path)
    t.load([tn("blue", 101)], [ns("b1", tenant="blue")], NODES,
           [pod("b1", "w", "10.50.1.5")], [], [np_svc], [])
    lifted = [x for x in _ofctl(fs, "tenant-service:b1/web") if "169.254.0.252" in x]
    assert len(lifted) == 1 and "reg4=0x10065/0x1ffff" in lifted[0] and "tp_dst=30090" in lifted[0]
    entry = _ofctl(fs, "tenant-nodeport:blue")
    assert len(entry) == 3
    (into,) = [x for x in entry if "table=ServiceLB" in x]
    assert "reg4=0/0x10000" in into or "reg4=0x0/0x10000" in into, into
    assert "tp_dst=30090" in into and "nat(src=10.50.1.1)" in into and "zone=65521" in into
    (back,) = [x for x in entry if "table=ConntrackState" in x]
    assert "nw_src=169.254.0.252,nw_dst=10.50.1.1" in back and "zone=65521" in back
    assert t.host_entries() == [HostEntry("tcp", 30090, True)]
    # the default network already has that node port: refused, logged, nothing installed
    t2, fs2 = _tenants(tmp_path / "t2", services=False)
    t2.enable_services(False, dict, lambda: {("TCP", 30090)})
    t2.load([tn("blue", 101)], [ns("b1", tenant="blue")], NODES,
            [pod("b1", "w", "10.50.1.5")], [], [np_svc], [])
    assert _ofctl(fs2, "tenant-nodeport:blue") == [] and t2.host_entries() == []
    assert "spec.ports[0].nodePort: 30090/TCP is already the default network's" in caplog.text


def test_node_port_conflict_with_the_default_network_is_seen_from_either_side(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A tenant Service holds node port 30090; a default-network Service then asks for
    it: when the default side changes (sync_node_ports, as the agent calls it after a
    default Service change), the later one, the default Service, is refused, naming
    its spec.ports[i].nodePort; the tenant keeps the port (its flows and node rule).
    The agent leaves the refused port out of the default Service's flows and node
    rules. When the tenant Service goes, the default one gets the port; a tenant
    Service asking for it again is then the later one, refused naming its own field."""
    from flowcni.controller.agent import held_node_port
    from flowcni.flows.nodeport import NODEPORT_VIP, HostEntry
    np_svc = svc("b1", type="NodePort")
    np_svc["spec"]["ports"][0]["nodePort"] = 30090
    default: dict[tuple[str, int], tuple[str, int]] = {}
    t, fs = _tenants(tmp_path, services=False)
    t.enable_services(False, dict, lambda: default)
    t.load([tn("blue", 101)], [ns("b1", tenant="blue")], NODES,
           [pod("b1", "w", "10.50.1.5")], [], [np_svc], [])
    assert t.host_entries() == [HostEntry("tcp", 30090, True)] and t.default_refused == {}
    default[("TCP", 30090)] = ("d/web", 1)  # the default network's d/web, its ports[1]
    assert t.sync_node_ports()
    assert t.default_refused == {("TCP", 30090): "blue/b1/web"}
    assert "service d/web: spec.ports[1].nodePort: 30090/TCP is already tenant blue's " \
        "Service b1/web's on this node" in caplog.text
    assert len(_ofctl(fs, "tenant-nodeport:blue")) == 3
    assert t.host_entries() == [HostEntry("tcp", 30090, True)]
    assert not t.sync_node_ports()  # nothing new: not logged again
    assert caplog.text.count("spec.ports[1].nodePort: 30090/TCP") == 1
    # a restarted agent (same state directory) that sees both at once: still blue's
    t3, _ = _tenants(tmp_path, services=False)
    t3.enable_services(False, dict, lambda: default)
    t3.load([tn("blue", 101)], [ns("b1", tenant="blue")], NODES,
            [pod("b1", "w", "10.50.1.5")], [], [np_svc], [])
    assert t3.default_refused == {("TCP", 30090): "blue/b1/web"}
    assert t3.host_entries() == [HostEntry("tcp", 30090, True)]
    # the agent's filter: d/web's node-port flow for 30090 goes, its ClusterIP stays
    p = ServiceProxy()
    pflows, _, _ = p.load([{"namespace": "d", "name": "web", "spec": {
        "type": "NodePort", "clusterIP": "10.96.0.20", "selector": {"app": "web"},
        "ports": [{"name": "a", "port": 81, "nodePort": 30091},
                  {"name": "b", "port": 80, "nodePort": 30090}]}}],
        [{"namespace": "d", "name": "p", "ip": "10.244.1.9", "labels": {"app": "web"},
          "node": "node1"}])
    held = [f for f in pflows["service:d/web"] if held_node_port(f, t.default_refused)]
    assert len(held) == 1 and dict(held[0].match)["ipv4_dst"] == NODEPORT_VIP \
        and dict(held[0].match)["tcp_dst"] == 30090
    # the tenant Service goes: the default Service gets the port
    t.apply([Change(2, "delete", "Service", "b1", "web", None)])
    assert t.default_refused == {} and t.host_entries() == []
    # and a tenant Service asking for it now is the later one
    caplog.clear()
    t.apply([Change(3, "put", "Service", "b1", "web", np_svc)])
    assert t.default_refused == {} and t.host_entries() == []
    assert _ofctl(fs, "tenant-nodeport:blue") == []
    assert "service b1/web (tenant blue): spec.ports[0].nodePort: 30090/TCP is already the " \
        "default network's on this node" in caplog.text


def test_affinity_inside_a_tenant_learns_per_tenant(tmp_path: Any) -> None:
    """sessionAffinity ClientIP in two tenants with the same ClusterIP and endpoint: each
    tenant's AffinityDNAT flows match its id and DNAT in its zone, and what they learn
    matches the tenant id too (reg4), so clients with one address never share."""
    t, fs = _tenants(tmp_path)
    aff: dict[str, Any] = {"sessionAffinity": "ClientIP",
           "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    t.load([tn("blue", 101), tn("red", 202)],
           [ns("b1", tenant="blue"), ns("r1", tenant="red")], NODES,
           [pod("b1", "w", "10.50.1.5"), pod("r1", "w", "10.50.1.5")], [],
           [svc("b1", **aff), svc("r1", **aff)], [])
    for owner, vni in (("tenant-service:b1/web", 101), ("tenant-service:r1/web", 202)):
        flows = fs.flows_of([owner])
        dnat = [f for f in flows if f.table == "AffinityDNAT"]
        assert dnat and all(dict(f.match)["reg4"] == (0x10000 | vni, 0x1FFFF) for f in dnat)
        texts = [f.ofctl(DEFAULT, names=True) for f in dnat]
        learns = [x for x in texts if "learn(" in x]
        assert learns and all("NXM_NX_REG4[]" in x and f"zone={vni}" in x for x in learns)
        lb = [f.ofctl(DEFAULT, names=True) for f in flows if f.table == "ServiceLB"]
        assert lb and all("goto_table:AffinityDNAT" in x for x in lb)


def test_no_tenant_services_without_flowcni_proxy(tmp_path: Any) -> None:
    t, fs = _tenants(tmp_path, services=False)
    _load(t)
    assert not any(o.startswith("tenant-service:") for o in fs.owners())
    assert t.describe_services() == []


def test_group_ids_kept_clear_of_the_default_proxy(tmp_path: Any) -> None:
    from flowcni.flows.services import group_id_for
    t, fs = _tenants(tmp_path, services=False)
    want = group_id_for("b1/web/0", {})
    # the default proxy holds that id, even under the same key (a namespace relabelled into
    # a tenant keeps its Services there): the tenant's group must not reuse it
    t.enable_services(False, lambda: {want: "b1/web/0"})
    _load(t)
    ids = [g.group_id for g in fs.desired_groups() if g.owner == "tenant-service:b1/web"]
    assert ids and want not in ids
    flows = fs.flows_of(["tenant-service:b1/web"])
    assert {a.group_id for f in flows for a in f.actions if isinstance(a, GroupAction)} == \
        set(ids)


def test_flowctl_services_shows_the_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    from flowcni.ctl.flowctl import show_services
    reply = {"proxy": "flowcni", "packets": {}, "services": [
        {"service": "b1/web", "clusterIP": VIP, "tenant": "blue", "vni": 101,
         "ports": [{"port": 80, "protocol": "TCP", "endpoints": ["10.50.1.5:8080"],
                    "group": 9}]},
        {"service": "default/web", "clusterIP": VIP,
         "ports": [{"port": 80, "protocol": "TCP", "endpoints": [], "group": None}]}]}
    agent = SimpleNamespace(name="node1", call=lambda verb, **kw: reply)
    assert show_services([agent]) == 0  # type: ignore[list-item]
    out = capsys.readouterr().out
    assert "blue (VNI 101)" in out and "TENANT" in out.splitlines()[0]
    line = next(x for x in out.splitlines() if "default/web" in x)
    assert "blue" not in line


# -- cluster DNS from every tenant ---------------------------------------------------------

DNS = {"namespace": "kube-system", "name": "kube-dns", "spec": {
    "clusterIP": "10.96.0.10", "selector": {"k8s-app": "kube-dns"},
    "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
              {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}


def test_cluster_dns_reaches_every_tenant_under_its_own_address(tmp_path: Any) -> None:
    from flowcni.controller.tenants import DNS_KEY
    t, fs = _tenants(tmp_path)
    _load(t, extra_svcs=[DNS])
    addrs = dict(t.dns_addresses)
    assert set(addrs) == {"blue", "red"} and addrs["blue"] != addrs["red"]
    assert all(a.startswith("10.244.1.") for a in addrs.values())  # the node's pod CIDR
    assert str(t.node_ipam.lease(DNS_KEY + "blue")) == addrs["blue"]
    for name, vni in (("blue", 101), ("red", 202)):
        text = _ofctl(fs, f"tenant-dns:{name}")
        reg = f"reg4={hex(0x10000 | vni)}/0x1ffff"
        lb = [x for x in text if x.startswith("table=ServiceLB")]
        # one per DNS port: the tenant's query, SNATed in its zone to its address, leaves
        # the tenant (reg4 cleared) and meets the default Service flow again
        assert len(lb) == 2 and all(reg in x and "nw_dst=10.96.0.10" in x and "tp_dst=53" in x
                                    for x in lb)
        assert all(f"ct(commit,table={DEFAULT.id('ServiceLB')},zone={vni},"
                   f"nat(src={addrs[name]}))" in x for x in lb)
        assert all("load:0x0->NXM_NX_REG4[16..16]" in x for x in lb)
        # answers to its address: un-DNAT in the default zone, into the tenant, again
        (rz,) = [x for x in text if x.startswith("table=ConntrackZone")]
        assert f"nw_dst={addrs[name]}" in rz and "reg4=0x0/0x10000" in rz
        assert f"load:{hex(vni)}->NXM_NX_REG4[0..15]" in rz and "zone=65520" in rz
        # later packets (already SNATed by the tenant zone): DNATed in the default zone
        (st,) = [x for x in text if x.startswith("table=ConntrackState")]
        assert reg in st and f"nw_src={addrs[name]}" in st and "zone=65520,nat" in st
        assert "nw_dst=10.96.0.10" in st
        assert "ct_state=-new-inv+trk" in st
    # a tenant's own Service on the same address wins: lifted flows sit above
    from flowcni.flows.tenantservices import PRIO_DNS
    assert all(f.priority > PRIO_DNS for f in fs.flows_of(["tenant-service:b1/web"]))
    assert all(f.priority > PRIO_FALLTHROUGH for f in fs.flows_of(["tenant-dns:blue"])
               if f.table == "ServiceLB")
    # the DNS Service goes: the flows and the addresses go too
    t.apply([Change(9, "delete", "Service", "kube-system", "kube-dns", None)])
    assert not any(o.startswith("tenant-dns:") for o in fs.owners())
    assert t.dns_addresses == {} and t.node_ipam.lease(DNS_KEY + "blue") is None
    t.apply([Change(10, "put", "Service", "kube-system", "kube-dns", DNS)])
    assert {o for o in fs.owners() if o.startswith("tenant-dns:")} == {
        "tenant-dns:blue", "tenant-dns:red"}
    # a tenant goes: its DNS flows and address go
    t.apply([Change(11, "delete", "TenantNetwork", "", "red", None)])
    assert "tenant-dns:red" not in fs.owners() and set(t.dns_addresses) == {"blue"}


def test_no_cluster_dns_exception_for_a_tenant_owned_kube_system(tmp_path: Any) -> None:
    t, fs = _tenants(tmp_path)
    t.load([tn("blue", 101)], [ns("kube-system", tenant="blue")], NODES, [], [], [DNS], [])
    assert not any(o.startswith("tenant-dns:") for o in fs.owners())
    # ... it is then an ordinary Service of that tenant
    assert fs.flows_of(["tenant-service:kube-system/kube-dns"])


def test_connected_tenant_gets_a_copy_in_its_own_zone(tmp_path: Any) -> None:
    """green and blue are connected (both list each other): green's pods reach blue's
    Service through a copy matching green's id, one below green's own Services, whose
    groups commit in green's zone; red (not connected) gets none."""
    t, fs = _tenants(tmp_path)
    blue = tn("blue", 101)
    blue["spec"]["connectTo"] = ["green"]
    green = {"name": "green", "created": "green", "spec": {
        "namespaceSelector": {"matchLabels": {"tenant": "green"}},
        "subnets": ["10.60.0.0/16"], "vni": 303, "connectTo": ["blue"]}}
    t.load([blue, tn("red", 202), green],
           [ns("b1", tenant="blue"), ns("r1", tenant="red"), ns("g1", tenant="green")], NODES,
           [pod("b1", "w", "10.50.1.5")], [], [svc("b1")], [])
    own, copy = fs.flows_of(["tenant-service:b1/web"]), fs.flows_of(["tenant-service:b1/web@green"])
    assert len(own) == len(copy) == 2
    assert all(dict(f.match)["reg4"] == (0x1012F, 0x1FFFF) for f in copy)
    assert {f.priority for f in copy} == {f.priority - 1 for f in own}
    g_own = {g.group_id for g in fs.desired_groups() if g.owner == "tenant-service:b1/web"}
    g_copy = [g for g in fs.desired_groups() if g.owner == "tenant-service:b1/web@green"]
    assert len(g_copy) == 2 and not g_own & {g.group_id for g in g_copy}
    assert all("zone=303" in g.ofctl(DEFAULT) and "nat(dst=10.50.1.5:" in g.ofctl(DEFAULT)
               for g in g_copy)
    assert {a.group_id for f in copy for a in f.actions if isinstance(a, GroupAction)} == {
        g.group_id for g in g_copy}
    assert not any("@red" in o for o in fs.owners())
    # the Service goes: the copy and its group ids go too
    t.apply([Change(5, "delete", "Service", "b1", "web", None)])
    assert fs.flows_of(["tenant-service:b1/web@green"]) == []
    assert not [g for g in fs.desired_groups() if g.owner.startswith("tenant-service:")]
    assert not any("@green" in k for k in t._taken.values())


def test_default_clusterips_are_no_tenant_destination(tmp_path: Any) -> None:
    """A masquerading tenant would otherwise reach default ClusterIPs through the node."""
    from flowcni.flows.tenantservices import DEFAULT_SERVICES_OWNER
    t, fs = _tenants(tmp_path, services=False)  # kube-proxy mode: the guard holds too
    _load(t, extra_svcs=[DNS, svc("default", ip="10.96.7.7")])
    text = _ofctl(fs, DEFAULT_SERVICES_OWNER)
    assert sorted(x.split("nw_dst=")[1].split(",")[0] for x in text) == [
        "10.96.0.10", "10.96.7.7"]  # the tenants' own 10.96.5.5 is not one of them
    assert all("table=L3Forwarding" in x and "reg4=0x10000/0x10000" in x
               and x.endswith("actions=drop") for x in text)
    t.apply([Change(3, "delete", "Service", "default", "web", None)])
    assert len(_ofctl(fs, DEFAULT_SERVICES_OWNER)) == 1
    t.load([], [ns("default")], NODES, [], [], [DNS], [])  # no tenant: no flows at all
    assert fs.flow_count() == 0


def test_bodies_outside_tenants_are_not_kept_and_come_back_when_a_namespace_joins(
        tmp_path: Any) -> None:
    """With the datastore's lister (the agent's case), Pods, NetworkPolicies and
    EndpointSlices of namespaces outside every tenant are not kept; a namespace that
    joins a tenant has them read again. The flows and groups are the same as with
    every body kept, at each step."""
    from flowcni.controller.tenants import Tenants

    web = {"podSelector": {}, "ingress": [{"from": [{"podSelector": {
        "matchLabels": {"app": "web"}}}]}]}
    store: dict[str, list[dict[str, Any]]] = {
        "Pod": [pod("b1", "w", "10.50.1.5"), pod("r1", "w", "10.50.1.5"),
                pod("default", "d", "10.244.1.9"), pod("other", "o", "10.244.1.10")],
        "NetworkPolicy": [{"namespace": ns_, "name": "p", "spec": web}
                          for ns_ in ("b1", "default", "other")],
        "EndpointSlice": []}
    namespaces = [ns("b1", tenant="blue"), ns("r1", tenant="red"), ns("default"), ns("other")]
    services = [svc("b1"), svc("r1"), svc("default", "d", "10.96.7.7")]
    pairs = []
    for lister in (None, lambda kind: [dict(b) for b in store.get(kind, [])]):
        t, fs = _tenants(tmp_path / ("kept" if lister is None else "listed"))
        t.lister = lister
        t.load([tn("blue", 101), tn("red", 202)], namespaces, NODES, store["Pod"],
               store["NetworkPolicy"], services, [])
        pairs.append((t, fs))
    (full, ffs), (lean, lfs) = pairs
    assert isinstance(lean, Tenants) and lean.lister is not None

    def same() -> None:
        assert sorted(f.ofctl(DEFAULT) for f in lfs.desired_flows()) == sorted(
            f.ofctl(DEFAULT) for f in ffs.desired_flows())
        assert sorted(g.ofctl(DEFAULT) for g in lfs.desired_groups()) == sorted(
            g.ofctl(DEFAULT) for g in ffs.desired_groups())

    same()
    assert set(lean.objects["Pod"]) == {"b1/w", "r1/w"}
    assert set(lean.objects["NetworkPolicy"]) == {"b1/p"}
    assert len(full.objects["Pod"]) == 4  # without a lister, as before
    # "default" joins blue, and a pod of it comes in the same batch (already listed)
    store["Pod"].append(pod("default", "d2", "10.244.1.11"))
    batch = [Change(10, "put", "Namespace", "", "default", ns("default", tenant="blue")),
             Change(11, "put", "Pod", "default", "d2", store["Pod"][-1])]
    for t in (full, lean):
        t.apply(batch)
    same()
    assert set(lean.objects["Pod"]) == {"b1/w", "r1/w", "default/d", "default/d2"}
    assert set(lean.objects["NetworkPolicy"]) == {"b1/p", "default/p"}
    assert any("10.244.1.11" in f.ofctl(DEFAULT) for f in lfs.desired_flows())
    # a pod of a namespace outside every tenant: not kept
    for t in (full, lean):
        t.apply([Change(12, "put", "Pod", "other", "o2", pod("other", "o2", "10.244.1.12"))])
    assert "other/o2" not in lean.objects["Pod"]
    # and "default" leaves again: its bodies go
    for t in (full, lean):
        t.apply([Change(13, "put", "Namespace", "", "default", ns("default"))])
    same()
    assert set(lean.objects["Pod"]) == {"b1/w", "r1/w"}


def test_agent_restores_a_default_node_port_a_tenant_let_go() -> None:
    """The agent's side (_node_ports_held): a refusal coming filters the default
    Service's node-port flow out even when the Service itself did not change; the
    refusal going puts the flow back from what the proxy built."""
    from flowcni.controller.agent import Agent
    p = ServiceProxy()
    built, _, _ = p.load([{"namespace": "d", "name": "web", "spec": {
        "type": "NodePort", "clusterIP": "10.96.0.20", "selector": {"app": "web"},
        "ports": [{"name": "b", "port": 80, "nodePort": 30090}]}}],
        [{"namespace": "d", "name": "p", "ip": "10.244.1.9", "labels": {"app": "web"},
          "node": "node1"}])
    a = object.__new__(Agent)
    a.services, a._np_held = p, {}
    a.tenants = SimpleNamespace(default_refused={("TCP", 30090): "blue/b1/web"})
    flows, groups = a._node_ports_held({}, {})
    assert list(flows) == ["service:d/web"] and groups["service:d/web"] == p.built["d/web"][1]
    assert len(flows["service:d/web"]) == len(built["service:d/web"]) - 1
    assert a._node_ports_held({}, {}) == ({}, {})  # nothing changed since
    a.tenants.default_refused = {}
    flows, _ = a._node_ports_held({}, {})
    assert flows == {"service:d/web": built["service:d/web"]}


def test_a_node_port_held_by_a_tenant_service_stays_its(tmp_path: Any) -> None:
    """red's r1/web holds node port 30090. A later Service asking for it, of another
    tenant (blue's b1/web, which sorts first) or of the same tenant (red's r1/aaa),
    is refused; the holder keeps it. Before: blue took it from red, and red's second
    Service made FlowSync refuse the whole tenant change (two owners, one flow)."""
    t, fs = _tenants(tmp_path, services=True)

    def np_svc(namespace: str, name: str = "web", ip: str = VIP) -> dict[str, Any]:
        b = svc(namespace, name, ip, type="NodePort")
        b["spec"]["ports"][0]["nodePort"] = 30090
        return b

    t.load([tn("blue", 101), tn("red", 202)], [ns("b1", tenant="blue"), ns("r1", tenant="red")],
           [{"name": "node1", "nodeIP": "192.168.50.11", "podCIDR": "10.244.1.0/24"}],
           [pod("b1", "w", "10.50.1.5"), pod("r1", "w", "10.50.1.5")], [], [np_svc("r1")], [])
    assert t.node_ports == {("TCP", 30090): "red/r1/web"}
    t.apply([Change(2, "put", "Service", "b1", "web", np_svc("b1"))])
    assert t.node_ports == {("TCP", 30090): "red/r1/web"}
    t.apply([Change(3, "put", "Service", "r1", "aaa", np_svc("r1", "aaa", "10.96.5.6"))])
    assert t.node_ports == {("TCP", 30090): "red/r1/web"}
