"""The direct FlowMod encoder writes exactly the bytes os-ken writes, for every builder.

FlowSync sends what controller.ofwire encodes instead of os-ken objects (they
were most of a 100k-flow full sync's time), so any difference from os-ken's
own serialization is a wire change: these tests compare the bytes of every
flow the builders make (node, tunnel, pods, policy with conjunctions and
port ranges, Services with ct/nat and groups, gateway replies).
"""

from __future__ import annotations

import struct
from typing import Any

from flowcni.controller import ofwire
from flowcni.flows import cookie as ck
from flowcni.flows.clusterpolicy import ClusterPolicyEngine
from flowcni.flows.model import CT, Controller, Flow, Load, Move, Output, SetField
from flowcni.flows.node import Gateway, node_flows
from flowcni.flows.pod import LocalPod, pod_flows
from flowcni.flows.policy import PolicyEngine
from flowcni.flows.services import ServiceProxy, gateway_reply_flows
from flowcni.flows.tables import DEFAULT
from flowcni.flows.tenant import TenantNet, base_flows, tenant_flows, tenant_pod_flows
from flowcni.flows.tunnel import RemoteNode, remote_node_flows, tunnel_flows
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

GW = Gateway("10.244.1.1", "02:00:00:00:00:01", 2, "10.244.1.0/24")


class _Dp:
    ofproto = ofp
    ofproto_parser = parser
    id = 1


def osken_add(f: Flow, rnd: int, xid: int) -> bytes:
    m = parser.OFPFlowMod(_Dp(), cookie=f.cookie(rnd), cookie_mask=0,
                          table_id=DEFAULT.id(f.table), command=ofp.OFPFC_ADD,
                          priority=f.priority, match=f.osken_match(parser),
                          instructions=f.osken_instructions(parser, ofp, DEFAULT))
    m.set_xid(xid)
    m.serialize()
    return bytes(m.buf)


def osken_delete(f: Flow, xid: int) -> bytes:
    m = parser.OFPFlowMod(_Dp(), table_id=DEFAULT.id(f.table), command=ofp.OFPFC_DELETE_STRICT,
                          priority=f.priority, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                          match=f.osken_match(parser))
    m.set_xid(xid)
    m.serialize()
    return bytes(m.buf)


def policy_flows() -> list[Flow]:
    eng = PolicyEngine("n1", DEFAULT)
    pods = [{"namespace": "d", "name": f"p{i}", "ip": f"10.244.{1 + i % 3}.{10 + i}",
             "node": "n1" if i % 3 == 0 else "n2",
             "labels": {"app": "web" if i % 2 else "db"}} for i in range(12)]
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}},
                              {"ipBlock": {"cidr": "192.168.0.0/16",
                                           "except": ["192.168.1.0/24"]}}],
                     "ports": [{"port": 80}, {"protocol": "UDP", "port": 53},
                               {"port": 8000, "endPort": 8010}]}],
        "egress": [{"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "100.64.0.7/32"}}],
                    "ports": [{"protocol": "SCTP", "port": 9}]}]}
    owners, problems = eng.load([{"name": "d", "labels": {}}], pods,
                                [{"namespace": "d", "name": "a", "spec": spec}])
    assert not problems
    return [f for fl in owners.values() for f in fl]


def service_flows() -> list[Flow]:
    spec = {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]}
    pods = [{"namespace": "d", "name": f"w{i}", "ip": f"10.244.1.{5 + i}", "node": "n1",
             "labels": {"app": "web"}, "ports": []} for i in range(3)]
    flows, _, _ = ServiceProxy().load([{"namespace": "d", "name": "web", "spec": spec}], pods)
    return [f for fl in flows.values() for f in fl] + gateway_reply_flows(GW)


def exposed_service_flows() -> list[Flow]:
    """NodePort with sessionAffinity (learn, resubmit, register loads) and a local
    endpoint (hairpin: SNAT in its own zone)."""
    spec = {"clusterIP": "10.96.0.11", "selector": {"app": "web"}, "type": "NodePort",
            "sessionAffinity": "ClientIP", "externalIPs": ["192.0.2.7"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}
    pods = [{"namespace": "d", "name": f"w{i}", "ip": f"10.244.{1 + i}.5", "node": "n1",
             "labels": {"app": "web"}, "ports": []} for i in range(2)]
    flows, _, problems = ServiceProxy(local_cidr="10.244.1.0/24").load(
        [{"namespace": "d", "name": "np", "spec": spec}], pods)
    assert not problems
    out = [f for fl in flows.values() for f in fl]
    assert {"SessionAffinity", "AffinityDNAT"} <= {
        t for f in out for t in (f.table, *(getattr(a, "table", None) for a in f.actions))}
    return out


def tenant_builder_flows() -> list[Flow]:
    """A masquerading tenant with a remote slice and a pod (tunnel key, zone, SNAT)."""
    t = TenantNet("blue", 101, (("n1", "192.168.80.1", "10.50.1.0/24"),
                                ("n2", "192.168.80.2", "10.50.2.0/24")),
                  egress_ip="10.244.1.250", no_egress=("10.244.0.0/16",))
    return (base_flows(3) + tenant_flows(t, "n1", 3, gw=GW)
            + tenant_pod_flows(LocalPod("beef/eth0", 6, "10.50.1.5", "0A:58:0A:32:01:05"), t)
            + tenant_service_builder_flows(t))


def tenant_service_builder_flows(t: TenantNet) -> list[Flow]:
    """Services inside a tenant (lifted, a connected tenant's copy), its cluster-DNS
    way out (reg4 cleared, SNAT with a recirculation into the same table) and the
    default ClusterIPs' drops."""
    from flowcni.flows.tenantservices import default_clusterip_flows, dns_flows, lift_services
    p = ServiceProxy(DEFAULT)
    svc: dict[str, Any] = {"namespace": "b", "name": "web", "spec": {
        "clusterIP": "10.96.0.90", "selector": {"app": "w"},
        "ports": [{"port": 80}, {"name": "u", "port": 53, "protocol": "UDP"}]}}
    flows, groups, _ = p.load([svc], [{"namespace": "b", "name": "w", "ip": "10.50.1.5",
                                       "node": "n1", "labels": {"app": "w"}}])
    lf, _ = lift_services(t, flows, groups, DEFAULT, (TenantNet("green", 303, ()),),
                          lambda key, peer, gid: gid + 1)
    out = [f for fl in lf.values() for f in fl]
    assert len(out) == 4
    # sessionAffinity (a learn() keyed by reg4 too) and hairpin, lifted
    pa = ServiceProxy(DEFAULT, local_cidr="10.50.1.0/24")
    fa, ga, _ = pa.load([{**svc, "spec": {**svc["spec"], "sessionAffinity": "ClientIP"}}],
                        [{"namespace": "b", "name": "w", "ip": "10.50.1.5", "node": "n1",
                          "labels": {"app": "w"}}])
    la, _ = lift_services(t, fa, ga, DEFAULT)
    lifted = [f for fl in la.values() for f in fl]
    assert any("NXM_NX_REG4[]" in f.ofctl(DEFAULT) for f in lifted)
    assert "tenant-hairpin:blue" in la
    out += lifted
    return (out + dns_flows(t, "10.244.1.251", "10.96.0.10", [("UDP", 53), ("TCP", 53)])
            + default_clusterip_flows(["10.96.0.10"]))


def cluster_policy_flows() -> list[Flow]:
    spec = {"tier": "Admin", "priority": 10,
            "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
            "ingress": [{"name": "deny-b", "action": "Deny",
                         "from": [{"namespaces": {"matchLabels": {"team": "b"}}}],
                         "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}],
            "egress": [{"name": "pass", "action": "Pass",
                        "to": [{"networks": ["192.0.2.0/24"]}]}]}
    pods = [{"namespace": ns, "name": f"p{i}", "ip": f"10.244.1.{10 + i}", "node": "n1",
             "labels": {}} for i, ns in enumerate(("a", "b"))]
    owners, problems = ClusterPolicyEngine("n1", DEFAULT).load(
        [{"name": "a", "labels": {"team": "a"}}, {"name": "b", "labels": {"team": "b"}}],
        pods, [], {"ClusterNetworkPolicy": [{"name": "c", "labels": {}, "spec": spec}]})
    assert not problems
    out = [f for fl in owners.values() for f in fl]
    assert {"AdminEgress", "AdminIngress"} <= {f.table for f in out}
    return out


def every_builder() -> list[Flow]:
    flows = (node_flows(GW) + tunnel_flows(3, GW)
             + remote_node_flows(RemoteNode("n2", "192.168.80.2", "10.244.2.0/24"), GW, 3)
             + pod_flows(LocalPod("c0ffee/eth0", 5, "10.244.1.5", "0A:58:0A:F4:01:05"), GW)
             + policy_flows() + service_flows() + exposed_service_flows()
             + tenant_builder_flows() + cluster_policy_flows())
    kw: dict[str, Any] = {"feature": ck.Feature.POD, "owner": "pod:x"}
    # Actions and fields no builder above happens to use yet.
    flows += [
        Flow.make("L3Forwarding", 7, {"ipv4_dst": "10.9.0.0/16", "reg0": (0x10, 0xF0)},
                  [Move("eth_src", "eth_dst"), SetField("eth_src", "02:00:00:00:00:09"),
                   Output("IN_PORT"), Controller()], **kw),
        Flow.make("Classifier", 9, {"in_port": 7}, [CT(table="ConntrackZone")]
                  if "ConntrackZone" in DEFAULT.table("Classifier").next
                  else [Output(1)], **kw),
    ]
    assert any(isinstance(a, Load) for f in flows for a in f.actions)
    return flows


def test_flow_mods_are_byte_identical_to_osken() -> None:
    enc = ofwire.Encoder(DEFAULT)
    flows = every_builder()
    assert len(flows) > 60
    for i, f in enumerate(flows):
        xid = 0x1000 + i
        assert ofwire.with_xid(enc.flow_add(f, 5), xid) == osken_add(f, 5, xid), f.ofctl()
        assert ofwire.with_xid(enc.flow_delete(f), xid) == osken_delete(f, xid), f.ofctl()
    # Twice: the second time from the action cache.
    assert all(enc.flow_add(f, 6)[8:] == osken_add(f, 6, 0)[8:] for f in flows)


def test_bundle_add_is_what_osken_sends() -> None:
    f = node_flows(GW)[0]
    inner = parser.OFPFlowMod(_Dp(), cookie=f.cookie(2), table_id=DEFAULT.id(f.table),
                              command=ofp.OFPFC_ADD, priority=f.priority,
                              match=f.osken_match(parser),
                              instructions=f.osken_instructions(parser, ofp, DEFAULT))
    add = parser.ONFBundleAddMsg(_Dp(), 77, ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED, inner, [])
    add.set_xid(4242)
    add.serialize()
    got = ofwire.bundle_add(77, ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED, 4242,
                            ofwire.Encoder(DEFAULT).flow_add(f, 2))
    assert got == bytes(add.buf)
    assert struct.unpack_from("!I", got, 4)[0] == struct.unpack_from("!I", got, 28)[0] == 4242
