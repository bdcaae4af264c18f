"""Services reached from outside the pod network: NodePorts, external IPs, LoadBalancer
IPs, their traffic policies, and the node's own connections to Services.

How such traffic enters OVS (decided here, carried out by controller.hostnet):
the node's network stack keeps its addresses (ARP, kubelet, SSH stay the
kernel's), and a small nftables table in the node's namespace steers only
Service traffic into br-int through the gateway port:

- NodePort: a connection to any local address of the node (except loopback)
  on a node port is DNATed to NODEPORT_VIP, keeping the port; a route sends
  NODEPORT_VIP out of flowcni-gw0, where OVS's ARP responder answers for it.
  ServiceLB then matches (NODEPORT_VIP, protocol, node port). This is the
  approach Antrea's proxyAll takes; it works the same on the kernel and
  userspace datapaths and needs no change to the uplink.
- External IPs and LoadBalancer ingress IPs: routed to flowcni-gw0 as they
  are (no DNAT in the node); ServiceLB matches (IP, protocol, port) like a
  ClusterIP, so pods reach them too.
- ClusterIPs from the node itself (host-network processes): routed to
  flowcni-gw0, so they enter br-int from the gateway address.

Replies: every connection that entered from the gateway carries the
from-gateway conntrack mark (flows.services.gateway_reply_flows), so its
replies go back to the gateway, where the node's conntrack undoes its own
DNAT.

externalTrafficPolicy Cluster: the node does not masquerade (it only DNATs
node ports to NODEPORT_VIP), so the client's address reaches OVS, which
picks the endpoint for that client (sessionAffinity ClientIP is keyed on
the real client, as kube-proxy's is) and DNATs; only then is the connection
SNATed to the node's gateway address, in a conntrack zone of its own
(gateway_snat_flows), so an endpoint on another node replies to this node.
Its replies are un-SNATed, then un-DNATed, and go out of the gateway to the
node. Local: no SNAT (the client's address reaches the endpoint) and only
this node's endpoints are used. SCTP (NODE_MASQUERADED) is the exception: the
node masquerades it before OVS, as it did for every protocol.
internalTrafficPolicy Local: the ClusterIP uses only this node's endpoints.
With a Local policy and no local endpoint the traffic is dropped, as
kube-proxy does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.fields import ip_int
from flowcni.flows.model import CT, Action, Controller, Flow, GroupAction, Load, OutputReg
from flowcni.flows.tables import DEFAULT, Pipeline

# Link-local addresses the node never has: where the node's DNAT sends NodePort
# connections, and (hairpin) the source a pod sees when it reaches itself.
NODEPORT_VIP = "169.254.0.252"
HAIRPIN_IP = "169.254.0.253"
NODE_PORT_RANGE = (1, 65535)

PRIO_ENTRY = 200

SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
POLICIES = ("Cluster", "Local")
MAX_AFFINITY_TIMEOUT = 86400


# Protocols whose externalTrafficPolicy Cluster connections the node masquerades (before
# OVS picks the endpoint, so their affinity is keyed on the gateway address) instead of
# OVS SNATing them after. OVS 3.1's userspace conntrack tracks SCTP by addresses only:
# two clients' associations to one endpoint, both SNATed to the gateway address, would
# need the same reply tuple, and the second one's SNAT fails (its INIT then reaches the
# endpoint unSNATed, and the answer leaves the endpoint's node straight to the client:
# measured, tests/datapath/test_nodeport.py test_sctp_two_external_clients...). The
# node's own conntrack tells SCTP associations apart by port, so masquerading there
# keeps every client working; they then share one OVS entry (one endpoint) per node.
NODE_MASQUERADED = frozenset({"SCTP"})


@dataclass(frozen=True)
class Exposure:
    """How a Service is reached beyond its ClusterIP, and its traffic policies."""

    type: str = "ClusterIP"
    node_ports: tuple[int | None, ...] = ()   # per Service port (None: none)
    external_ips: tuple[str, ...] = ()        # spec.externalIPs
    lb_ips: tuple[str, ...] = ()              # status.loadBalancer.ingress[].ip
    external_local: bool = False              # externalTrafficPolicy: Local
    internal_local: bool = False              # internalTrafficPolicy: Local
    affinity_timeout: int | None = None       # sessionAffinity: ClientIP (seconds)
    # spec.healthCheckNodePort (LoadBalancer + externalTrafficPolicy Local): where
    # each node answers load balancers with its local endpoint count
    # (controller/healthcheck.py)
    health_check_node_port: int | None = None

    @property
    def entry_ips(self) -> tuple[str, ...]:
        """Addresses outside the pod network that lead to this Service's ports."""
        return tuple(dict.fromkeys((*self.external_ips, *self.lb_ips)))


def _ipv4(v: Any, field: str) -> str:
    try:
        return str(ipaddress.IPv4Address(v))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{field}: {v!r} is not an IPv4 address") from e


def _policy(spec: dict[str, Any], field: str) -> bool:
    v = spec.get(field, "Cluster")
    if v is None:
        v = "Cluster"
    if v not in POLICIES:
        raise ValueError(f"spec.{field}: {v!r} (supported: Cluster, Local)")
    return v == "Local"


def parse_exposure(spec: dict[str, Any], status: Any, raw_ports: Sequence[Any],
                   node_port_range: tuple[int, int] = NODE_PORT_RANGE,
                   require_node_ports: bool = True) -> Exposure:
    """The NodePort / external / policy / affinity fields of a Service, checked.

    Raises ValueError naming the field. `raw_ports` is spec.ports (already
    checked to be mappings by the caller). `node_port_range` is the cluster's
    (the embedded store's API side checks it; a Kubernetes API server has done
    so already). `require_node_ports=False` lets `flowctl apply` validate a
    Service before it allocates the missing node ports.
    """
    stype = spec.get("type", "ClusterIP")
    node_ports: list[int | None] = []
    for i, p in enumerate(raw_ports):
        np = p.get("nodePort") if isinstance(p, dict) else None
        if np is None or stype not in ("NodePort", "LoadBalancer"):
            node_ports.append(None)
            continue
        if isinstance(np, bool) or not isinstance(np, int) \
                or not NODE_PORT_RANGE[0] <= np <= NODE_PORT_RANGE[1]:
            raise ValueError(f"spec.ports[{i}].nodePort: {np!r} is not a port number (1-65535)")
        lo, hi = node_port_range
        if not lo <= np <= hi:
            raise ValueError(f"spec.ports[{i}].nodePort: {np} is outside the node-port range "
                             f"{lo}-{hi}")
        node_ports.append(np)
    no_alloc = stype == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is False
    if require_node_ports and not no_alloc and stype in ("NodePort", "LoadBalancer") \
            and raw_ports and all(n is None for n in node_ports):
        raise ValueError(f"spec.ports[0].nodePort: required for type {stype} (the embedded "
                         "datastore does not allocate node ports; Kubernetes always sets it)")
    seen: set[tuple[str, int]] = set()
    for i, (p, n) in enumerate(zip(raw_ports, node_ports, strict=True)):
        if n is None:
            continue
        k = (str(p.get("protocol", "TCP")), n)
        if k in seen:
            raise ValueError(f"spec.ports[{i}].nodePort: {n}/{k[0]} used twice")
        seen.add(k)
    ext = spec.get("externalIPs") or []
    if not isinstance(ext, list):
        raise ValueError("spec.externalIPs: must be a list of IPv4 addresses")
    external = tuple(_ipv4(a, f"spec.externalIPs[{i}]") for i, a in enumerate(ext)) \
        if ext else ()
    lb: list[str] = []
    if stype == "LoadBalancer" and isinstance(status, dict):
        ingress = (status.get("loadBalancer") or {}).get("ingress") or []
        if not isinstance(ingress, list):
            raise ValueError("status.loadBalancer.ingress: must be a list")
        for i, ing in enumerate(ingress):
            if isinstance(ing, dict) and ing.get("ip"):
                lb.append(_ipv4(ing["ip"], f"status.loadBalancer.ingress[{i}].ip"))
    ext_local = _policy(spec, "externalTrafficPolicy")
    if ext_local and stype not in ("NodePort", "LoadBalancer"):
        raise ValueError("spec.externalTrafficPolicy: Local needs type NodePort or LoadBalancer")
    int_local = _policy(spec, "internalTrafficPolicy")
    aff = spec.get("sessionAffinity", "None") or "None"
    if aff not in ("None", "ClientIP"):
        raise ValueError(f"spec.sessionAffinity: {aff!r} (supported: None, ClientIP)")
    timeout = None
    if aff == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        timeout = cfg.get("timeoutSeconds", 10800) if isinstance(cfg, dict) else None
        if isinstance(timeout, bool) or not isinstance(timeout, int) \
                or not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
            raise ValueError("spec.sessionAffinityConfig.clientIP.timeoutSeconds: "
                             f"{timeout!r} (1-{MAX_AFFINITY_TIMEOUT})")
    hc = spec.get("healthCheckNodePort")
    if hc is not None:
        if stype != "LoadBalancer" or not ext_local:
            raise ValueError("spec.healthCheckNodePort: only for type LoadBalancer with "
                             "externalTrafficPolicy Local")
        lo, hi = node_port_range
        if isinstance(hc, bool) or not isinstance(hc, int) or not lo <= hc <= hi:
            raise ValueError(f"spec.healthCheckNodePort: {hc!r} is outside the node-port "
                             f"range {lo}-{hi}")
        if hc in node_ports:
            raise ValueError(f"spec.healthCheckNodePort: {hc} is also a nodePort of this "
                             "Service")
    key = (stype, tuple(node_ports), external, tuple(lb), ext_local, int_local, timeout, hc)
    hit = _EXPOSURES.get(key)
    if hit is None:
        hit = Exposure(*key)
        if len(_EXPOSURES) < _EXPOSURES_MAX:
            _EXPOSURES[key] = hit
    return hit


# Equal Exposures are one object: most Services have no node port, external IP,
# policy or affinity, and each made its own (a frozen dataclass of eight fields,
# the costliest step of parsing one). Bounded: past the limit, new values are
# simply not shared.
_EXPOSURES: dict[tuple[Any, ...], Exposure] = {}
_EXPOSURES_MAX = 1 << 14


def is_local(ip: str, cidr: ipaddress.IPv4Network | None) -> bool:
    """Whether endpoint `ip` (an IPv4 address already checked) is in this node's pod
    CIDR. Called per endpoint per build: integer arithmetic, not ipaddress objects."""
    if cidr is None:
        return False
    return ip_int(ip) & int(cidr.netmask) == int(cidr.network_address)


def entry_flows(owner: str, exposure: Exposure, ports: Sequence[Any],
                groups: Sequence[tuple[int | None, bool]],
                pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """ServiceLB flows for the node ports and external/LoadBalancer IPs of one Service.

    `ports`: the Service's ports (protocol, port); `groups`: per port, the
    group external traffic uses (over every ready endpoint, or this node's
    only with externalTrafficPolicy Local) and whether it has any bucket.
    """
    kw = dict(feature=Feature.SERVICE, owner=owner, pipeline=pipeline)
    flows = []
    for sp, np, (gid, has) in zip(ports, exposure.node_ports, groups, strict=True):
        proto = f"{sp.protocol.lower()}_dst"
        targets = [(NODEPORT_VIP, np)] if np is not None else []
        targets += [(ip, sp.port) for ip in exposure.entry_ips]
        # Cluster policy, no endpoint at all: answer like a ClusterIP without
        # endpoints; Local policy, no local endpoint: drop, as kube-proxy does.
        # Cluster policy: the connection is SNATed to the gateway address once its
        # endpoint is chosen (gateway_snat_flows); the register bit says so. SCTP:
        # the node masquerades it instead (NODE_MASQUERADED).
        snat: list[Action] = ([] if exposure.external_local or sp.protocol in NODE_MASQUERADED
                              else [Load(F.SNAT_TO_GATEWAY, 1)])
        acts: list[Action] = ([*snat, GroupAction(gid)] if gid is not None and has
                              else [] if exposure.external_local else [Controller()])
        for ip, port in targets:
            flows.append(Flow.make("ServiceLB", PRIO_ENTRY, {"ipv4_dst": ip, proto: port},
                                   acts, **kw))
    return flows


# -- the node's side (text for controller.hostnet; no I/O here) ---------------------------------

@dataclass(frozen=True)
class HostEntry:
    """One way into a Service the node's nftables must steer into br-int.

    node_port: DNAT (to NODEPORT_VIP) connections to a local address on `port`;
    otherwise `ip`:`port` is an external/LoadBalancer IP (routed, not DNATed).
    masquerade: the node masquerades the connection to the gateway address: tenant
    node ports (flows/tenantservices.py nodeport_flows SNATs them again, into the
    tenant) and NODE_MASQUERADED protocols; the default network's other
    Cluster-policy connections are SNATed in OVS after the endpoint is chosen
    (gateway_snat_flows).
    """

    protocol: str   # tcp / udp / sctp
    port: int
    masquerade: bool
    ip: str = ""    # "" for a node port


def host_entries(exposure: Exposure, ports: Sequence[Any]) -> list[HostEntry]:
    """The node ports of a default-network Service, and its external and LoadBalancer
    IPs where the node masquerades (NODE_MASQUERADED, policy Cluster; otherwise they
    are routed to the gateway as they are and need no entry)."""
    out = []
    for sp, np in zip(ports, exposure.node_ports, strict=True):
        masq = not exposure.external_local and sp.protocol in NODE_MASQUERADED
        proto = sp.protocol.lower()
        if np is not None:
            out.append(HostEntry(proto, np, masq))
        if masq:
            out += [HostEntry(proto, sp.port, True, ip) for ip in exposure.entry_ips]
    return out


# -- SNAT to the gateway address (externalTrafficPolicy Cluster) -------------------------------

GATEWAY_SNAT_OWNER = "nodeport-snat"
PRIO_SNAT = 205          # ConntrackZone: above the main zone's 200
# Output: above hairpin's (flows.hairpin PRIO_HAIRPIN, 210), which a pod reaching itself
# through its own node's node port also matches (its address as source and
# destination after the DNAT) but must not take: it came in from the gateway, and goes
# to its port SNATed to the gateway address, not back out of the gateway.
PRIO_SNAT_OUTPUT = 215
PRIO_SNAT_EST = 195      # ConntrackState: above established (190), below invalid (200)
PRIO_SNAT_COMMIT = 220   # ConntrackCommit: above the from-gateway commit (210)
PRIO_SNAT_INGRESS = 205  # IngressRule: as the node's own traffic (flows.node PRIO_HOST)

# Source ports of that SNAT. OVS picks them itself, knowing nothing of the node's own
# connections from the same gateway address (kubelet probes, host-network clients to
# pods), whose source ports the kernel takes from its ephemeral range
# (net.ipv4.ip_local_port_range of the node's namespace). Were OVS to give a node-port
# connection to endpoint E:e the port the node also uses for its own connection to E:e,
# the reply to the node's connection (E:e -> gateway:port) would match the SNAT's reply
# tuple in ConntrackZone and be un-SNATed to the external client. So the SNAT uses the
# largest run of ports in SNAT_SPAN clear of the ephemeral range and of the node-port
# range (where a late reply to an expired SNAT would be DNATed by the node's node-port
# rule): 1024-29999 with Linux's default ephemeral range (32768-60999) and node ports
# (30000-32767). Ports below 30000 are safe from the node's listeners: a reply to a
# SNATed connection is un-SNATed in OVS and never reaches the node's stack. Capacity:
# OVS needs a distinct port per connection with the same endpoint, endpoint port and
# protocol, so one node SNATs at most (last - first + 1) = 28,976 node-port connections
# to one endpoint:port at once (a closed one holds its port until conntrack forgets it,
# tens of seconds: that bounds the rate of new connections to one endpoint:port through
# one node to a few hundred per second); past that a new connection's SNAT fails and it
# is not answered. A node whose ranges leave fewer than SNAT_MIN_PORTS clear (e.g.
# ip_local_port_range 1024 65535) gets no range (snat_port_range: None): OVS then picks
# from every port, as before this range existed, and the agent logs the clash risk.
SNAT_SPAN = (1024, 65535)
SNAT_MIN_PORTS = 1024
DEFAULT_SNAT_PORTS = (1024, 29999)  # what a node with Linux's and Kubernetes' defaults gets


def snat_port_range(ephemeral: tuple[int, int], node_ports: tuple[int, int]
                    ) -> tuple[int, int] | None:
    """The gateway SNAT's source ports for a node whose kernel ephemeral range and
    node-port range are these: the largest run of ports in SNAT_SPAN clear of both
    (the lowest such run on a tie); None when that run is shorter than SNAT_MIN_PORTS."""
    best, start = (0, -1), SNAT_SPAN[0]
    for a, b in [*sorted((ephemeral, node_ports)), (SNAT_SPAN[1] + 1, SNAT_SPAN[1] + 1)]:
        end = min(a - 1, SNAT_SPAN[1])
        if end - start > best[1] - best[0]:
            best = (start, end)
        start = max(start, b + 1)
    return best if best[1] - best[0] + 1 >= SNAT_MIN_PORTS else None


def gateway_snat_flows(gateway_ip: str, pipeline: Pipeline = DEFAULT,
                       ports: tuple[int, int] | None = DEFAULT_SNAT_PORTS) -> list[Flow]:
    """The node's flows that SNAT Cluster-policy connections from the gateway to
    `gateway_ip`, source ports in `ports` (snat_port_range; None: any), once their endpoint is
    chosen, and undo it on their replies.

    - ServiceLB's entry flow loads SNAT_TO_GATEWAY (entry_flows); ConntrackCommit
      commits such a connection (from the gateway) with CT_MARK_NODEPORT_SNAT next
      to the from-gateway mark, in the main zone, while the packet still has the
      client's address (so the main zone's entry is the client's); ConntrackState
      loads the bit again for the connection's later packets from that mark.
    - Output SNATs a packet with the bit (from the gateway) in SNAT_ZONE: last, so
      every main-zone lookup and commit has seen the client's address.
    - IngressRule lets such a connection to a local endpoint in as it lets the
      node's own traffic in (the node masqueraded it before: NetworkPolicy saw the
      gateway address, which node_flows always allow).
    - A packet to the gateway address (a reply from a local endpoint or over the
      tunnel) is un-SNATed in SNAT_ZONE and recirculated into ConntrackZone with
      GATEWAY_UNSNAT set, where the main zone un-DNATs it; it is then a reply of a
      from-gateway connection and goes out of the gateway (gateway_reply_flows).
      Anything else to the gateway address finds no entry there and goes on as before.
    """
    kw = dict(feature=Feature.SERVICE, owner=GATEWAY_SNAT_OWNER, pipeline=pipeline)
    bit = F.SNAT_TO_GATEWAY.mask
    from_gw = F.SOURCE.value(F.FROM_GATEWAY)
    snat_from_gw = (from_gw[0] | bit, from_gw[1] | bit)
    marks = F.CT_MARK_FROM_GATEWAY | F.CT_MARK_NODEPORT_SNAT
    return [
        Flow.make("ConntrackZone", PRIO_SNAT,
                  {"eth_type": 0x0800, "ipv4_dst": gateway_ip,
                   "reg0": F.GATEWAY_UNSNAT.value(0)},
                  [Load(F.GATEWAY_UNSNAT, 1),
                   CT(table="ConntrackZone", zone=F.SNAT_ZONE, nat="")], **kw),
        Flow.make("ConntrackState", PRIO_SNAT_EST,
                  {"eth_type": 0x0800, "ct_state": "-new-rpl+trk",
                   "ct_mark": (F.CT_MARK_NODEPORT_SNAT, F.CT_MARK_NODEPORT_SNAT)},
                  [Load(F.SNAT_TO_GATEWAY, 1)], goto="L3Forwarding", **kw),
        Flow.make("IngressRule", PRIO_SNAT_INGRESS, {"reg0": snat_from_gw},
                  goto="ConntrackCommit", **kw),
        Flow.make("ConntrackCommit", PRIO_SNAT_COMMIT,
                  {"eth_type": 0x0800, "ct_state": "+new+trk", "reg0": snat_from_gw},
                  [CT(commit=True, mark=marks)], goto="Output", **kw),
        Flow.make("Output", PRIO_SNAT_OUTPUT, {"eth_type": 0x0800, "reg0": snat_from_gw},
                  [CT(commit=True, zone=F.SNAT_ZONE, snat=gateway_ip if ports is None
                      else f"{gateway_ip}:{ports[0]}-{ports[1]}"),
                   OutputReg(F.OUT_PORT)], **kw),
    ]
