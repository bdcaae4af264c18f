"""Services inside a tenant network: the default proxy's flows, lifted into the tenant.

Each tenant gets a ServiceProxy of its own (controller/tenants.py) that sees
only the tenant's namespaces: its Services, their EndpointSlices and its
pods. So a Service's endpoints are always the tenant's own pods, and two
tenants may use the same ClusterIP and the same endpoint addresses. Its
output is then lifted into the tenant, as NetworkPolicy is
(flows/tenantpolicy.py):

- every ServiceLB flow gains the tenant id (reg4) and moves up by LIFT,
  above the tenant fall-through (flows/tenant.py PRIO_FALLTHROUGH), so a
  tenant's new connection meets its own tenant's Services and nothing else,
  and a default-network packet (no tenant id) never meets them;
- every group bucket's ct() commits (and NATs) in the tenant's conntrack zone
  (= VNI) instead of the default network's, so the same 5-tuple in two
  tenants is two connections, and a reply is un-DNATed by the lookup that
  the tenant's ConntrackZone flow already does in that zone.

Group ids stay the proxy's (derived from "namespace/name/port": a namespace
belongs to one network only, and the tenants' proxies share one table of
taken ids with each other and the default proxy's ids when they were built).

sessionAffinity ClientIP (flows/affinity.py) is lifted too: its AffinityDNAT
flows gain the tenant id, their DNATs the tenant's zone, and what they learn
into SessionAffinity also matches reg4 (the tenant id), so two tenants'
clients with the same address never share a learned endpoint.

Hairpin (flows/hairpin.py: a pod reaching itself through its Service) is
lifted as one owner per tenant (hairpin_owner): its Output flows gain the
tenant id, and its ConntrackZone flow (the pod's answer to HAIRPIN_IP) the
tenant id and a priority above the tenant's zone flow. The SNAT to
HAIRPIN_IP stays in the shared hairpin zone: two networks' identical
5-tuples there share one entry whose translation is the same (the address is
kept and so is the port), and the answer finds its way back by its port and
its tenant id, not by that entry.

Node ports (type NodePort; LoadBalancer is taken as NodePort): a node port
is node-global, so it names one Service of one network. The node steers it
to the gateway as for the default network (flows/nodeport.py), and
nodeport_flows take it into the tenant: see the section below. External and
load-balancer IPs are not lifted (tenant_service_body drops them, and the
external traffic policy, naming them, for the log).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.hairpin import HAIRPIN_OWNER, PRIO_HAIRPIN
from flowcni.flows.model import (
    CT,
    CT_ZONE,
    Action,
    Flow,
    Group,
    GroupAction,
    Learn,
    Load,
    SetField,
)
from flowcni.flows.tables import DEFAULT, Pipeline
from flowcni.flows.tenant import (
    PRIO_EGRESS_NOT,
    PRIO_FALLTHROUGH,
    PRIO_TENANT,
    TenantNet,
    _id,
    _in_tenant,
)

LIFT = 1000
# Tables a tenant proxy's Service flows are lifted from (see the module's doc).
LIFTED_TABLES = frozenset({"ServiceLB", "AffinityDNAT"})
# Spec fields a tenant Service does not get, each named in the log line when dropped.
UNSUPPORTED = ("externalIPs", "externalTrafficPolicy", "loadBalancerIP",
               "healthCheckNodePort")
# Hairpin, lifted: above the tenant's zone flow (ConntrackZone) and the default
# network's hairpin flows (Output).
PRIO_HAIRPIN_ZONE = PRIO_TENANT + 1
PRIO_HAIRPIN_OUT = PRIO_HAIRPIN + 1


def service_owner(key: str) -> str:
    """The owner of a tenant Service's flows ("namespace/name": a namespace is in one
    network only, so the key names the tenant too)."""
    return f"tenant-service:{key}"


def tenant_service_body(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A tenant Service's body as its tenant's proxy gets it, and the fields dropped.

    type LoadBalancer becomes NodePort (its node ports are kept: see
    nodeport_flows); external and load balancer addresses, the external traffic
    policy and the health-check node port go. The caller's body is not changed."""
    spec = body.get("spec")
    if not isinstance(spec, dict):
        return body, []
    dropped = [f"spec.{k}" for k in UNSUPPORTED if spec.get(k) not in (None, [], "", "None")]
    if spec.get("type") == "LoadBalancer":
        dropped.insert(0, "spec.type=LoadBalancer")
    if not dropped and not body.get("status"):
        return body, []
    new = copy.deepcopy(body)
    nspec = new["spec"]
    for k in UNSUPPORTED:
        nspec.pop(k, None)
    if nspec.get("type") == "LoadBalancer":
        nspec["type"] = "NodePort"
    new.pop("status", None)
    return new, dropped


def hairpin_owner(name: str) -> str:
    """The owner of tenant `name`'s hairpin flows on this node."""
    return f"tenant-hairpin:{name}"


def _not_default_snat(actions: Iterable[Action]) -> list[Action]:
    """`actions` without the default network's node-port SNAT flag (flows/nodeport.py
    gateway_snat_flows): a tenant's node ports are SNATed into the tenant before their
    endpoint is chosen (nodeport_flows), never to the default gateway address."""
    return [a for a in actions if not (isinstance(a, Load) and a.field == F.SNAT_TO_GATEWAY)]


def _in_zone(a: Action, zone: int) -> Action:
    """A ct() of the default zone moved to `zone`; a learn() also keyed by the tenant
    id (reg4), which the learned flow then matches as it was on the learning packet."""
    if isinstance(a, Learn) and "reg4" not in a.copy:
        return replace(a, copy=(*a.copy, "reg4"))
    return replace(a, zone=zone) if isinstance(a, CT) and a.zone == CT_ZONE else a


def lift_hairpin(f: Flow, t: TenantNet, pipeline: Pipeline = DEFAULT) -> Flow:
    """A proxy's hairpin flow (flows/hairpin.py) as tenant t's."""
    if f.table not in ("ConntrackZone", "Output"):
        raise ValueError(f"{f.table}: not a hairpin table")
    prio = PRIO_HAIRPIN_ZONE if f.table == "ConntrackZone" else PRIO_HAIRPIN_OUT
    return Flow.make(f.table, prio, {**dict(f.match), **_id(t)}, list(f.actions), f.goto,
                     feature=Feature.SERVICE, owner=hairpin_owner(t.name), pipeline=pipeline)


def lift_flow(f: Flow, t: TenantNet, pipeline: Pipeline = DEFAULT) -> Flow:
    """A default proxy's ServiceLB (or AffinityDNAT) flow as the same flow of tenant t."""
    if f.table not in LIFTED_TABLES:
        raise ValueError(f"{f.table}: only {sorted(LIFTED_TABLES)} flows are lifted "
                         "into a tenant")
    m: dict[str, Any] = dict(f.match)
    if "reg4" in m:
        raise ValueError(f"{f.table}: Service flow already matches reg4")
    m.update(_id(t))
    prio = f.priority + LIFT
    if prio <= PRIO_FALLTHROUGH:
        raise ValueError(f"{f.table}: lifted priority {prio} is not above the tenant "
                         f"fall-through ({PRIO_FALLTHROUGH})")
    return Flow.make(f.table, prio, m, [_in_zone(a, t.vni) for a in _not_default_snat(f.actions)],
                     f.goto,
                     feature=Feature.SERVICE, owner=service_owner(f.owner.split(":", 1)[1]),
                     pipeline=pipeline)


def lift_group(g: Group, t: TenantNet) -> Group:
    """A Service group whose buckets commit (and NAT) in the tenant's zone."""
    return replace(g, buckets=tuple(tuple(_in_zone(a, t.vni) for a in b) for b in g.buckets),
                   owner=service_owner(g.owner.split(":", 1)[1]))


def peer_owner(key: str, peer: str) -> str:
    """The owner of a tenant Service's flows for a connected tenant (connectTo)."""
    return f"tenant-service:{key}@{peer}"


def parse_service_owner(owner: str) -> tuple[str, str] | None:
    """(key, peer) of a service_owner or peer_owner name (peer "" for the tenant's own
    copy); None for any other owner."""
    prefix = service_owner("")
    if not owner.startswith(prefix):
        return None
    key, _, peer = owner[len(prefix):].partition("@")
    return key, peer


def _for_peer(a: Action, x: TenantNet, gid_of: Callable[[int], int]) -> Action:
    return GroupAction(gid_of(a.group_id)) if isinstance(a, GroupAction) else _in_zone(a, x.vni)


def lift_for_peer(f: Flow, x: TenantNet, key: str, gid_of: Callable[[int], int],
                  pipeline: Pipeline = DEFAULT) -> Flow:
    """A tenant Service's ServiceLB flow as connected tenant x's pods reach it: x's id,
    one below the tenant's own Services (x's own Service on the same address and port
    wins), its groups' copies committing in x's zone (gid_of: original -> copy)."""
    own = lift_flow(f, x, pipeline)
    return Flow.make(f.table, own.priority - 1, dict(own.match),
                     [_for_peer(a, x, gid_of) for a in _not_default_snat(f.actions)], f.goto,
                     feature=Feature.SERVICE, owner=peer_owner(key, x.name), pipeline=pipeline)


def lift_services(t: TenantNet, flows: dict[str, list[Flow]],
                  groups: dict[str, list[Group]], pipeline: Pipeline = DEFAULT,
                  peers: tuple[TenantNet, ...] = (),
                  gid_of: Callable[[str, str, int], int] | None = None
                  ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]]]:
    """A tenant proxy's changed owners (flows.services.ServiceProxy.load/apply) lifted:
    the same owners renamed (service:KEY -> tenant-service:KEY); hairpin as
    hairpin_owner(t.name) (never copied for peers: a peer's pod is never the endpoint).

    peers: the tenants connected with t (connectTo, agreed by both): each gets its own
    copy of every Service (owner tenant-service:KEY@PEER), matching its id, whose groups
    commit in its zone: from there on the connection is the peer's own, reaching t's
    endpoint as any of t's pods (flows/tenant.py connect flows). gid_of(key, peer,
    group id) gives the copy's group id."""
    out_f: dict[str, list[Flow]] = {}
    out_g: dict[str, list[Group]] = {}
    for owner, fl in flows.items():
        if owner == HAIRPIN_OWNER:
            out_f[hairpin_owner(t.name)] = [lift_hairpin(f, t, pipeline) for f in fl]
            out_g[hairpin_owner(t.name)] = []
            continue
        key = owner.split(":", 1)[1]
        out_f[service_owner(key)] = [lift_flow(f, t, pipeline) for f in fl]
        out_g[service_owner(key)] = [lift_group(g, t) for g in groups.get(owner, [])]
        for x in peers:
            if gid_of is None:
                raise ValueError("lift_services: peers need gid_of")

            def copy_gid(gid: int, _x: TenantNet = x, _k: str = key) -> int:
                assert gid_of is not None
                return gid_of(_k, _x.name, gid)

            out_f[peer_owner(key, x.name)] = [lift_for_peer(f, x, key, copy_gid, pipeline)
                                               for f in fl]
            out_g[peer_owner(key, x.name)] = [
                replace(g, group_id=copy_gid(g.group_id), owner=peer_owner(key, x.name),
                        buckets=tuple(tuple(_for_peer(a, x, copy_gid) for a in b)
                                      for b in g.buckets))
                for g in groups.get(owner, [])]
    return out_f, out_g


# -- cluster DNS from every tenant: the one deliberate exception ----------------------------
#
# The default network's DNS Service (DNS_SERVICE) is reachable from every tenant's pods,
# at its own ClusterIP and ports, answered by the default network's DNS endpoints. Its
# endpoints' addresses may be any tenant's too, and the tenant pod's address may be a
# default pod's, so the query leaves its tenant under an address of the default network:
#
# - ServiceLB (a new query): SNAT in the tenant's zone to the tenant's DNS address on
#   this node (one per tenant per node, leased from the node's own pod CIDR), the tenant
#   id cleared, and back into ServiceLB, where the default Service flow DNATs it in the
#   default zone, as any default pod's query. The default network carries it from there
#   (tunnel key 0), and the answer comes back to this node, to that address.
# - ConntrackZone (an answer, to the tenant's DNS address, on the default network):
#   un-DNAT in the default zone, the tenant id loaded, and back into ConntrackZone,
#   where the tenant's own zone flow un-SNATs it to the pod (flows/tenant.py).
# - ConntrackState (a later packet of the query, already SNATed by the tenant's zone
#   lookup, so its source is the tenant's DNS address, and its destination still the
#   DNS ClusterIP): the tenant id cleared, and the default zone's DNAT applied, as for
#   any established default connection. Both addresses are matched: a tenant whose
#   subnets overlap the default pod CIDR may have a pod at the DNS address.
#
# A tenant's own Service on the same ClusterIP and port wins (tenant Services sit
# above these): the tenant's address space is its own.

DNS_SERVICE = "kube-system/kube-dns"
PRIO_DNS = PRIO_FALLTHROUGH + 100       # ServiceLB: above the fall-through, below lifted
PRIO_DNS_STATE = PRIO_TENANT            # ConntrackState: above every default flow there
PRIO_DNS_REPLY = PRIO_TENANT + 1        # ConntrackZone: above the tenant zone flows


def dns_owner(name: str) -> str:
    return f"tenant-dns:{name}"


def dns_flows(t: TenantNet, address: str, cluster_ip: str,
              ports: list[tuple[str, int]], pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Tenant t's pods reaching the cluster DNS Service at cluster_ip on `ports`
    ((protocol, port)), under `address`, t's DNS address on this node; pure."""
    kw = dict(feature=Feature.TENANT, owner=dns_owner(t.name), pipeline=pipeline)
    tid = _id(t)
    leave = [Load(F.TENANT, 0), Load(F.IN_TENANT, 0)]
    flows = [Flow.make("ServiceLB", PRIO_DNS,
                       {**tid, "ipv4_dst": cluster_ip, f"{proto.lower()}_dst": port},
                       [*leave, CT(commit=True, zone=t.vni, snat=address, table="ServiceLB")],
                       **kw)
             for proto, port in sorted(set(ports))]
    if not flows:
        return []
    flows += [
        Flow.make("ConntrackState", PRIO_DNS_STATE,
                  {"eth_type": 0x0800, **tid, "ipv4_src": address, "ipv4_dst": cluster_ip,
                   "ct_state": "-new-inv+trk"},
                  [*leave, CT(zone=CT_ZONE, nat="", table="ConntrackState")], **kw),
        Flow.make("ConntrackZone", PRIO_DNS_REPLY,
                  {"reg4": F.IN_TENANT.value(0), "ipv4_dst": address},
                  [Load(F.TENANT, t.vni), Load(F.IN_TENANT, 1),
                   CT(zone=CT_ZONE, nat="", table="ConntrackZone")], **kw),
    ]
    return flows


# -- the default network's ClusterIPs are no tenant's egress destination -------------------
#
# A masquerading tenant's new connections to addresses outside the cluster leave through
# the node (flows/tenant.py egress_flows). The node routes every ClusterIP back into the
# bridge (flowcni's proxy, for host-network clients; kube-proxy DNATs them itself), so
# without these a masquerading tenant would reach every default-network Service that way.

DEFAULT_SERVICES_OWNER = "tenant-no-default-services"


def default_clusterip_flows(cluster_ips: list[str], pipeline: Pipeline = DEFAULT
                            ) -> list[Flow]:
    """One drop per default-network ClusterIP for every tenant packet routed to it (the
    cluster DNS exception never gets here: its packets leave the tenant in ServiceLB)."""
    kw = dict(feature=Feature.TENANT, owner=DEFAULT_SERVICES_OWNER, pipeline=pipeline)
    return [Flow.make("L3Forwarding", PRIO_EGRESS_NOT, {**_in_tenant(), "ipv4_dst": ip}, **kw)
            for ip in sorted(set(cluster_ips))]


# -- node ports into a tenant ---------------------------------------------------------------
#
# The node's nftables DNAT a node port to NODEPORT_VIP (keeping the port) and masquerade
# it to the node's gateway address (flows/nodeport.py HostEntry.masquerade, which
# controller/tenants.py asks for: unlike the default network's, a tenant's node port is
# SNATed before its endpoint is chosen), so it enters from the gateway with no tenant id:
#
# - ServiceLB (no tenant id, NODEPORT_VIP, the port): the tenant id loaded, SNAT in the
#   shared hairpin zone to the tenant's gateway address on this node (a tenant address
#   that every node routes back here, under the tenant's VNI; never a pod's), and back
#   into ServiceLB, where the tenant proxy's lifted node-port flow DNATs in the tenant's
#   zone to a tenant endpoint, on this node or through the tunnel. Later packets of the
#   connection take the same way (nothing is committed in the default zone); both NATs
#   then apply their existing bindings.
# - The answer comes back to the tenant's gateway address, in the tenant: the tenant's
#   zone flow un-DNATs it (its source is now NODEPORT_VIP), then ConntrackState (tenant
#   id, NODEPORT_VIP -> gateway address) leaves the tenant (IN_TENANT cleared, the id
#   kept as a marker) and un-SNATs it in the hairpin zone, and L3Forwarding hands it to
#   the gateway port: the node's conntrack undoes its masquerade and DNAT.

PRIO_NODEPORT = PRIO_FALLTHROUGH + 50   # ServiceLB: above every default entry flow
PRIO_NODEPORT_REPLY = PRIO_TENANT + 1   # ConntrackState and L3Forwarding


def nodeport_owner(name: str) -> str:
    return f"tenant-nodeport:{name}"


def nodeport_flows(t: TenantNet, gateway_ip: str, router_mac: str, gw_mac: str,
                   ports: list[tuple[str, int]], pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Node ports ((protocol, port)) of tenant t's Services taken into t on this node,
    under t's gateway address here (gateway_ip); the gateway port's MAC gw_mac. Pure."""
    from flowcni.flows.nodeport import NODEPORT_VIP
    if not ports:
        return []
    kw = dict(feature=Feature.SERVICE, owner=nodeport_owner(t.name), pipeline=pipeline)
    tid = _id(t)
    flows = [Flow.make("ServiceLB", PRIO_NODEPORT,
                       {"reg4": F.IN_TENANT.value(0), "ipv4_dst": NODEPORT_VIP,
                        f"{proto.lower()}_dst": port},
                       [Load(F.TENANT, t.vni), Load(F.IN_TENANT, 1),
                        CT(commit=True, zone=F.SNAT_ZONE, snat=gateway_ip, table="ServiceLB")],
                       **kw)
             for proto, port in sorted(set(ports))]
    leaving = F.TENANT.value(t.vni)[0], F.TENANT.mask | F.IN_TENANT.mask
    flows += [
        Flow.make("ConntrackState", PRIO_NODEPORT_REPLY,
                  {"eth_type": 0x0800, **tid, "ipv4_src": NODEPORT_VIP,
                   "ipv4_dst": gateway_ip, "ct_state": "-new-inv+trk"},
                  [Load(F.IN_TENANT, 0), CT(zone=F.SNAT_ZONE, nat="", table="L3Forwarding")],
                  **kw),
        Flow.make("L3Forwarding", PRIO_NODEPORT_REPLY, {"eth_type": 0x0800, "reg4": leaving},
                  [SetField("eth_src", router_mac), SetField("eth_dst", gw_mac)],
                  goto="L3DecTTL", **kw),
    ]
    return flows
