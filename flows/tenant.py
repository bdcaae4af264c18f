"""Flows of tenant networks: the same pipeline, with a tenant id in reg4 from classification on.

A tenant's packets carry its id (TENANT, = its VNI) and the IN_TENANT bit
from Classifier on: a tenant pod's port loads them, and so does a tunnel
packet whose key is the tenant's VNI. Every later table that would look at
addresses either matches the id (ARP, conntrack, L3 forwarding, commit) or is
skipped by one IN_TENANT flow above every default-network flow of that table,
below the tenant's own lifted flows there (Services: flows/tenantservices.py;
NetworkPolicy: flows/tenantpolicy.py). So:

- the same IP in two tenants, or in a tenant and the default network, never
  meets the other's flows: L3Forwarding's tenant flows match (id, address),
  and one flow per table catches any tenant packet before a default one can;
- conntrack zone = the tenant's VNI, so identical 5-tuples of two tenants are
  two connections;
- ARP from a tenant pod is answered by its tenant's router MAC, whatever it
  asks for (no ARP ever crosses: everything is routed at L3);
- on the wire, the tunnel key is the tenant's VNI (0 for the default network);
  a tunnel packet with a key no tenant of this node has is dropped, never
  delivered on the default network.

None of these flows exist while no tenant does: the default network's flows
and counts are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import CT, Flow, Load, Move, SetField
from flowcni.flows.node import Gateway, _arp_reply
from flowcni.flows.pod import LocalPod
from flowcni.flows.tables import DEFAULT, EGRESS_POLICY, INGRESS_POLICY, Pipeline

TENANT_BASE_OWNER = "tenants"
# Above every default-network flow of the tables they share (max 210 there).
PRIO_TENANT = 230        # a tenant's own flows (its pods, slices, ARP, zone, commit)
PRIO_CONNECT = 228       # connectTo: a connected tenant's pods and slices (own ones first)
# Policy tables: a tenant's own rules are lifted to their default priority + 1000
# (flows/tenantpolicy.py); below them, above every default-network flow, a tenant
# packet that met none of its rules goes on.
PRIO_FALLTHROUGH = 1000
# The cluster policy tiers (flows/clusterpolicy.py) select pods by address, which
# tenants may share with the default network: tenant packets skip the Admin tier
# above every cluster rule (and never reach the Baseline tier: the Default tables'
# fall-through flows go past it).
PRIO_TIER_SKIP = 65100
PRIO_EGRESS_NOT = 226    # masquerading tenant: never out to the cluster or its own subnets
PRIO_EGRESS_NEW = 222    # masquerading tenant: new connections out, SNAT in its zone
PRIO_EGRESS_EST = 221    # ... and their later packets (NATed by ConntrackZone's ct(nat))
PRIO_TENANT_DROP = 220   # any tenant packet no flow of its tenant took: dropped
PRIO_TUN_DEFAULT = 205   # tunnel key 0: the default network, as before
PRIO_TUN_UNKNOWN = 204   # any other key (a tenant this node does not know): dropped


@dataclass(frozen=True)
class TenantNet:
    """What a node's flows need of one usable tenant network."""

    name: str
    vni: int
    slices: tuple[tuple[str, str, str], ...]  # (node, node IP, slice CIDR), this node's too
    # Masquerade: this node's egress address for the tenant (one of its default pod
    # CIDR's, leased from the node's IPAM), the ranges it must never reach that way.
    egress_ip: str = ""
    no_egress: tuple[str, ...] = ()
    # connectTo, agreed by both: (name, VNI, slices) of each tenant this one may reach.
    peers: tuple[tuple[str, int, tuple[tuple[str, str, str], ...]], ...] = ()

    @property
    def router_mac(self) -> str:
        """The tenant's virtual router MAC, from its VNI (locally administered, unicast)."""
        v = self.vni
        return f"aa:bb:cd:{(v >> 16) & 0xFF:02x}:{(v >> 8) & 0xFF:02x}:{v & 0xFF:02x}"

    @property
    def owner(self) -> str:
        return f"tenant:{self.name}"


def tenant_owner(name: str) -> str:
    return f"tenant:{name}"


def _id(t: TenantNet) -> dict[str, tuple[int, int]]:
    v, m = F.TENANT.value(t.vni)
    fv, fm = F.IN_TENANT.value(1)
    return {"reg4": (v | fv, m | fm)}


def _in_tenant() -> dict[str, tuple[int, int]]:
    return {"reg4": F.IN_TENANT.value(1)}


def base_flows(tun_ofport: int | None, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Flows every tenant shares: skips, the catch-all drop, the tunnel key guard."""
    kw = dict(feature=Feature.TENANT, owner=TENANT_BASE_OWNER, pipeline=pipeline)
    ip = {"eth_type": 0x0800}
    flows = [
        # New connections skip the default network's Services and policies, and meet
        # only their own tenant's Services and NetworkPolicy flows (flows/tenantservices.py,
        # flows/tenantpolicy.py, above these): what none of those took goes on as the
        # table's miss would.
        Flow.make("ServiceLB", PRIO_FALLTHROUGH, {**ip, **_in_tenant()},
                  goto=EGRESS_POLICY, **kw),
        Flow.make(EGRESS_POLICY, PRIO_TIER_SKIP, {**ip, **_in_tenant()},
                  goto="EgressRule", **kw),
        Flow.make(INGRESS_POLICY, PRIO_TIER_SKIP, {**ip, **_in_tenant()},
                  goto="IngressRule", **kw),
        Flow.make("EgressRule", PRIO_FALLTHROUGH, {**ip, **_in_tenant()},
                  goto="EgressDefault", **kw),
        Flow.make("EgressDefault", PRIO_FALLTHROUGH, {**ip, **_in_tenant()},
                  goto="L3Forwarding", **kw),
        Flow.make("IngressRule", PRIO_FALLTHROUGH + 1,
                  {**ip, **_in_tenant(), "ct_state": "-new+trk"}, goto="ConntrackCommit", **kw),
        Flow.make("IngressRule", PRIO_FALLTHROUGH, {**ip, **_in_tenant()},
                  goto="IngressDefault", **kw),
        Flow.make("IngressDefault", PRIO_FALLTHROUGH, {**ip, **_in_tenant()},
                  goto="ConntrackCommit", **kw),
        # What its tenant's flows did not route goes nowhere (not to the default network).
        Flow.make("L3Forwarding", PRIO_TENANT_DROP, _in_tenant(), **kw),
        Flow.make("ARPResponder", PRIO_TENANT_DROP, _in_tenant(), **kw),
    ]
    if tun_ofport is not None:
        flows += [
            Flow.make("Classifier", PRIO_TUN_DEFAULT, {"in_port": tun_ofport, "tunnel_id": 0},
                      [Load(F.SOURCE, F.FROM_TUNNEL)], goto="ConntrackZone", **kw),
            Flow.make("Classifier", PRIO_TUN_UNKNOWN, {"in_port": tun_ofport}, **kw),
        ]
    return flows


def egress_flows(t: TenantNet, gw: Gateway, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Masquerade: a tenant's new connections out of the cluster are SNATed, in the
    tenant's conntrack zone, to its egress address on this node, then handed to the
    node's stack (which masquerades that pod-CIDR address like any pod's). Replies come
    back from the gateway to the egress address: that is what names their tenant, and
    the zone's NAT entry their pod, whatever address other tenants' pods share."""
    kw = dict(feature=Feature.TENANT, owner=t.owner, pipeline=pipeline)
    tid = _id(t)
    ip = {"eth_type": 0x0800}
    to_gw = [SetField("eth_src", t.router_mac), SetField("eth_dst", gw.mac),
             Load(F.OUT_PORT, gw.ofport)]
    flows = [Flow.make("L3Forwarding", PRIO_EGRESS_NOT, {**tid, "ipv4_dst": cidr}, **kw)
             for cidr in t.no_egress]
    flows += [
        Flow.make("L3Forwarding", PRIO_EGRESS_NEW, {**ip, **tid, "ct_state": "+new+trk"},
                  [*to_gw, CT(commit=True, zone=t.vni, snat=t.egress_ip, table="L3DecTTL")],
                  **kw),
        Flow.make("L3Forwarding", PRIO_EGRESS_EST, {**ip, **tid, "ct_state": "-new+trk"},
                  to_gw, goto="L3DecTTL", **kw),
        Flow.make("ConntrackZone", PRIO_TENANT,
                  {"reg0": F.SOURCE.value(F.FROM_GATEWAY), "ipv4_dst": t.egress_ip},
                  [Load(F.TENANT, t.vni), Load(F.IN_TENANT, 1),
                   CT(table="ConntrackState", zone=t.vni, nat="")], **kw),
    ]
    return flows


def tenant_flows(t: TenantNet, me: str, tun_ofport: int | None,
                 pipeline: Pipeline = DEFAULT, gw: Gateway | None = None) -> list[Flow]:
    """One tenant's node-wide flows: tunnel key in, ARP, zone, commit, remote slices out
    (and egress, for a masquerading tenant with an egress address here)."""
    kw = dict(feature=Feature.TENANT, owner=t.owner, pipeline=pipeline)
    tid = _id(t)
    ip = {"eth_type": 0x0800}
    flows = [
        Flow.make("ARPResponder", PRIO_TENANT, {**tid, "arp_op": 1},
                  _arp_reply(t.router_mac, [Move("arp_tpa", F.SCRATCH),
                                            Move("arp_spa", "arp_tpa"),
                                            Move(F.SCRATCH, "arp_spa")]), **kw),
        Flow.make("ConntrackZone", PRIO_TENANT, {**ip, **tid},
                  [CT(table="ConntrackState", zone=t.vni, nat="")], **kw),
        Flow.make("ConntrackCommit", PRIO_TENANT, {**ip, **tid, "ct_state": "+new+trk"},
                  [CT(commit=True, zone=t.vni)], goto="Output", **kw),
    ]
    if t.egress_ip and gw is not None:
        flows += egress_flows(t, gw, pipeline)
    if tun_ofport is None:
        return flows
    for name, vni, slices in t.peers:
        # A connected tenant's remote slices: into the tunnel with ITS key, so the far
        # node delivers (and its pods answer) in that tenant; its local pods: see
        # connect_pod_flows.
        peer_mac = TenantNet(name, vni, ()).router_mac
        for node, node_ip, cidr in slices:
            if node == me:
                continue
            flows.append(Flow.make(
                "L3Forwarding", PRIO_CONNECT, {**tid, "ipv4_dst": cidr},
                [SetField("eth_src", peer_mac), SetField("eth_dst", F.VIRTUAL_ROUTER_MAC),
                 SetField("tun_ipv4_dst", node_ip), SetField("tunnel_id", vni),
                 Load(F.OUT_PORT, tun_ofport)],
                goto="L3DecTTL", **kw))
    flows.append(Flow.make(
        "Classifier", PRIO_TENANT, {"in_port": tun_ofport, "tunnel_id": t.vni},
        [Load(F.SOURCE, F.FROM_TUNNEL), Load(F.TENANT, t.vni), Load(F.IN_TENANT, 1)],
        goto="ConntrackZone", **kw))
    for node, node_ip, cidr in t.slices:
        if node == me:
            continue
        flows.append(Flow.make(
            "L3Forwarding", PRIO_TENANT, {**tid, "ipv4_dst": cidr},
            [SetField("eth_src", t.router_mac), SetField("eth_dst", F.VIRTUAL_ROUTER_MAC),
             SetField("tun_ipv4_dst", node_ip), SetField("tunnel_id", t.vni),
             Load(F.OUT_PORT, tun_ofport)],
            goto="L3DecTTL", **kw))
    return flows


def connect_owner(name: str) -> str:
    return f"tenant-connect:{name}"


def connect_pod_flows(t: TenantNet, pods: list[tuple[LocalPod, TenantNet]],
                      pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Tenant t reaching the local pods of the tenants it is connected with: one flow
    per such pod, matching t's id, delivering as the pod's own tenant would.

    From here on the packet is the pod's tenant's, as if it had come through the
    tunnel under that tenant's key: committed in t's zone (t's egress rules passed,
    and the answers must find it there), then the tenant id switched and the packet
    tracked in the pod's tenant's zone, so that tenant's ingress rules decide (a new
    connection there until its own commit) and the pod's answers are not invalid.
    The lookup in the pod's tenant's zone also NATs: an answer of a Service endpoint
    to a connected tenant's client (flows/tenantservices.py, peers) is un-DNATed there,
    back to the Service's address; for anything else it changes nothing.
    """
    kw = dict(feature=Feature.TENANT, owner=connect_owner(t.name), pipeline=pipeline)
    return [Flow.make("L3Forwarding", PRIO_CONNECT, {**_id(t), "ipv4_dst": p.ip},
                      [SetField("eth_src", pt.router_mac), SetField("eth_dst", p.mac),
                       CT(commit=True, zone=t.vni), Load(F.TENANT, pt.vni),
                       CT(zone=pt.vni, nat="", table="L3DecTTL")], **kw)
            for p, pt in pods]


def tenant_pod_flows(pod: LocalPod, t: TenantNet, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """A tenant pod's five flows: as a default pod's, with the tenant loaded and matched."""
    kw = dict(feature=Feature.POD, owner=f"pod:{pod.key}", pipeline=pipeline)
    port = pod.ofport
    return [
        Flow.make("Classifier", PRIO_TENANT, {"in_port": port},
                  [Load(F.SOURCE, F.FROM_POD), Load(F.TENANT, t.vni), Load(F.IN_TENANT, 1)],
                  goto="SpoofGuard", **kw),
        Flow.make("SpoofGuard", PRIO_TENANT,
                  {"in_port": port, "eth_src": pod.mac, "ipv4_src": pod.ip},
                  goto="ConntrackZone", **kw),
        Flow.make("SpoofGuard", PRIO_TENANT,
                  {"in_port": port, "eth_src": pod.mac, "arp_sha": pod.mac, "arp_spa": pod.ip},
                  goto="ARPResponder", **kw),
        Flow.make("L3Forwarding", PRIO_TENANT, {**_id(t), "ipv4_dst": pod.ip},
                  [SetField("eth_src", t.router_mac), SetField("eth_dst", pod.mac)],
                  goto="L3DecTTL", **kw),
        Flow.make("L2ForwardingCalc", 100, {"eth_dst": pod.mac},
                  [Load(F.OUT_PORT, port)], goto=INGRESS_POLICY, **kw),
    ]

