"""Tenant networks on this node: the resolution, their flows, their address pools.

The agent keeps TenantNetworks, Namespaces and Nodes as the datastore lists
and watches them, resolves them (datastore.tenantconv.resolve: the same
answer on every node), and then:
- programs each usable tenant's node-wide flows (flows/tenant.py) and the
  flows all tenants share, only while at least one tenant is usable;
- answers PodManager's question "which network does a pod of namespace N
  join": the default one, a tenant (with its per-node slice, its gateway and
  an IPAM of its own), or an error naming why the tenant cannot take pods
  (routed mode, a conflict, no slice for this node). A pod never silently
  joins the default network when its namespace belongs to a tenant.

Relabelling a namespace into or out of a tenant applies to pods created
afterwards. A running pod keeps the network, address and flows it started
with (its address belongs to that network's range, and changing it under a
running process would break its connections); `flowctl tenants` lists such
pods under "stale" so the user can restart them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from flowcni.cni.ipam import IPAM, IPAMError
from flowcni.controller.flowsync import FlowSync
from flowcni.datastore.store import Change
from flowcni.datastore.tenantconv import (
    Condition,
    Resolution,
    Tenant,
    TenantError,
    TenantSpec,
    check_update,
    from_body,
    resolve,
)
from flowcni.flows.clusterpolicy import KINDS as CLUSTER_POLICY_KINDS
from flowcni.flows.clusterpolicy import parse_cluster_policy
from flowcni.flows.hairpin import HAIRPIN_OWNER
from flowcni.flows.model import Flow, Group
from flowcni.flows.node import Gateway
from flowcni.flows.nodeport import HostEntry
from flowcni.flows.pod import LocalPod
from flowcni.flows.policy import PolicyError
from flowcni.flows.services import (
    ServiceError,
    ServiceProxy,
    StaleUDP,
    group_id_for,
    parse_service,
)
from flowcni.flows.tenant import (
    TENANT_BASE_OWNER,
    TenantNet,
    base_flows,
    connect_owner,
    connect_pod_flows,
    tenant_flows,
    tenant_owner,
)
from flowcni.flows.tenantpolicy import policy_owner, tenant_policy_flows
from flowcni.flows.tenantservices import (
    DEFAULT_SERVICES_OWNER,
    DNS_SERVICE,
    default_clusterip_flows,
    dns_flows,
    dns_owner,
    hairpin_owner,
    lift_services,
    nodeport_flows,
    nodeport_owner,
    parse_service_owner,
    tenant_service_body,
)

LOG = logging.getLogger(__name__)

# The default network's node ports as the agent hands them over: (PROTOCOL, port), or a
# mapping from them to the (Service key, port index) asking (named in a refusal).
DefaultNodePorts = Mapping[tuple[str, int], "tuple[str, int] | None"] | set[tuple[str, int]]
# Leases of the node's IPAM that tenants' egress addresses hold: kept across restarts
# (no port backs them) and out of every CNI GC (their network is none of the runtime's).
EGRESS_KEY = "tenant-egress:"
# A tenant's cluster-DNS address on this node (flows/tenantservices.py dns_flows): a lease
# of the same kind, under its own key (tenant names have no colon).
DNS_KEY = EGRESS_KEY + "dns:"
EGRESS_NETWORK = "flowcni-tenant-egress"
KINDS = ("TenantNetwork", "Namespace", "Node")
POLICY_KINDS = ("Pod", "NetworkPolicy")  # namespaced: kept by "namespace/name"
SERVICE_KINDS = ("Service", "EndpointSlice")  # likewise; for the tenants' Service proxies
# Kinds whose bodies only a tenant's own namespaces need (see Tenants.lister).
TENANT_ONLY_KINDS = ("Pod", "NetworkPolicy", "EndpointSlice")
_SAFE = re.compile(r"[^a-z0-9.-]")


class VNIRecord(Protocol):
    """Where allocated VNIs are kept (datastore.store.Store; none with the Kubernetes
    API, see datastore/tenantconv.py)."""

    def vnis(self) -> dict[str, int]: ...

    def record_vnis(self, want: dict[str, int]) -> dict[str, int]: ...

    def forget_vni(self, name: str) -> None: ...


class TenantRefused(Exception):
    """A pod's namespace belongs to a tenant that cannot take pods on this node."""


@dataclass(frozen=True)
class Placement:
    """Where a new pod of a tenant goes on this node."""

    net: TenantNet
    cidr: str      # this node's slice
    gateway: str   # its first address (answered by the tenant's ARP responder)
    ipam: IPAM


NODE_PORTS_FILE = "tenant-nodeports.json"


def _read_node_ports(path: str) -> dict[tuple[str, int], str]:
    """The node ports tenant Services held when the file was written ({} if none)."""
    try:
        with open(path) as f:
            return {(str(p), int(n)): str(h) for p, n, h in json.load(f)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as e:
        LOG.warning("%s: not read (%s): node ports are held as if none were before", path, e)
        return {}


def _write_node_ports(path: str, ports: dict[tuple[str, int], str]) -> None:
    """Written whole, then renamed over the old one; a failure is logged (the next
    restart then treats the ports as new, as before this file existed)."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(sorted([p, n, h] for (p, n), h in ports.items()), f)
        os.replace(path + ".tmp", path)
    except OSError as e:
        LOG.warning("%s: not written: %s", path, e)


class Tenants:
    def __init__(self, me: str, cluster_cidr: str, encap: str, state_dir: str,
                 flows: FlowSync, tun_ofport: int | None, gateway: Gateway | None = None,
                 node_ipam: IPAM | None = None,
                 lister: Callable[[str], list[dict[str, Any]]] | None = None) -> None:
        self.me, self.cluster_cidr, self.encap = me, cluster_cidr, encap
        self.state_dir, self.flows, self.tun_ofport = state_dir, flows, tun_ofport
        self.gateway, self.node_ipam = gateway, node_ipam
        # The datastore's list of a kind (Datastore.objects). With it, the Pods,
        # NetworkPolicies and EndpointSlices of namespaces outside every tenant are
        # not kept here (the default network's engines have them), and a namespace
        # that joins a tenant has them read again. Keeping every body of the
        # cluster cost the agent 60 MB at 10,000 pods and 1,000 policies, with
        # no tenant at all. Without it (tests), every body is kept.
        self.lister = lister
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            k: {} for k in (*KINDS, *POLICY_KINDS, *SERVICE_KINDS, *CLUSTER_POLICY_KINDS)}
        self._policy: dict[str, list[Flow]] = {}  # tenant -> its NetworkPolicy flows
        self.resolution = Resolution({}, {})
        self.nets: dict[str, TenantNet] = {}
        self._ipams: dict[tuple[str, str], IPAM] = {}
        self._lock = threading.RLock()
        self._reported: dict[str, tuple[str, ...]] = {}
        self._connect: dict[str, list[Flow]] = {}
        self._accepted: dict[str, TenantSpec] = {}  # immutable fields as first accepted
        self.pods: Callable[[], list[Any]] = lambda: []  # the node's attachments
        # Services inside tenants (flows/tenantservices.py): one ServiceProxy per tenant,
        # only with flowcni's proxy (enable_services); None: off (kube-proxy mode).
        self._svc_slices: bool | None = None
        self._default_gids: Callable[[], dict[int, str]] = dict
        self._proxies: dict[str, ServiceProxy] = {}
        self._svc_owned: set[str] = set()  # owners of the tenant Service flows installed
        self._taken: dict[int, str] = {}  # group ids: the tenants' proxies' and their copies'
        # connectTo: Service key -> (peer, group id) -> the peer's copy's group id
        self._peer_gids: dict[str, dict[tuple[str, int], int]] = {}
        self._svc_dropped: dict[str, tuple[str, ...]] = {}  # Service key -> fields logged
        self.stale: list[tuple[int, StaleUDP]] = []  # (zone, entry): drained by take_stale
        self._dns: dict[str, list[Flow]] = {}  # tenant -> its cluster-DNS flows installed
        self._guarded: list[Flow] = []  # the default ClusterIPs' drops for tenants
        self.dns_addresses: dict[str, str] = {}  # tenant -> its DNS address on this node
        # reported, not enforced: running pods left on their old network (relabel) and
        # cluster policies whose subjects are tenant namespaces; tenant -> conditions
        self._notices: dict[str, list[Condition]] = {}
        self._admin: dict[str, list[str]] = {}  # tenant -> cluster policies selecting it
        self.vni_record: VNIRecord | None = None  # set by the agent (the embedded store)
        self._recorded: dict[str, int] = {}  # the record as last read
        # node ports of tenant Services (flows/tenantservices.py nodeport_flows)
        self._default_node_ports: Callable[[], DefaultNodePorts] = set
        self._nodeports: dict[str, list[Flow]] = {}  # tenant -> its node-port flows
        self.node_ports: dict[tuple[str, int], str] = {}  # (protocol, port) -> "tenant/ns/name"
        # (protocol, port) a default-network Service asks for but a tenant Service had
        # first -> that tenant Service ("tenant/ns/name"): the agent leaves it out of the
        # default proxy's flows and the node's rules (default_refused_changed)
        self.default_refused: dict[tuple[str, int], str] = {}
        self._np_refused: set[str] = set()  # refusals logged (the last sync's)
        # the tenant Services' node ports as the previous run of this agent left them:
        # who had a port first outlives a restart (used by the first sync only)
        self._np_file = os.path.join(state_dir, NODE_PORTS_FILE)
        self._np_earlier = _read_node_ports(self._np_file)
        self._loaded = False  # load() has run
        self._np_refusing: set[str] = set()  # this sync's

    # -- datastore ---------------------------------------------------------------------

    def load(self, tenants: list[dict[str, Any]], namespaces: list[dict[str, Any]],
             nodes: list[dict[str, Any]], pods: list[dict[str, Any]] | None = None,
             policies: list[dict[str, Any]] | None = None,
             services: list[dict[str, Any]] | None = None,
             slices: list[dict[str, Any]] | None = None,
             cluster_policies: dict[str, list[dict[str, Any]]] | None = None) -> list[Flow]:
        """The initial lists; returns the policy flows it changed (for the datapath guard).
        cluster_policies (by kind) are only reported on (see the module's doc)."""
        with self._lock:
            self.objects = {"TenantNetwork": {b["name"]: b for b in tenants},
                            "Namespace": {b["name"]: b for b in namespaces},
                            "Node": {b["name"]: b for b in nodes},
                            "Pod": {f"{b['namespace']}/{b['name']}": b for b in pods or []},
                            "NetworkPolicy": {f"{b['namespace']}/{b['name']}": b
                                              for b in policies or []},
                            "Service": {f"{b['namespace']}/{b['name']}": b
                                        for b in services or []},
                            "EndpointSlice": {f"{b['namespace']}/{b['name']}": b
                                              for b in slices or []},
                            **{k: {b["name"]: b for b in (cluster_policies or {}).get(k, [])}
                               for k in CLUSTER_POLICY_KINDS}}
            self._recompute()
            self._drop_outside_tenants()
            changed = self._recompute_policy(set(self.nets))
            self._loaded = True
            self._rebuild_services()
            self._sync_default_guard()
            self._sync_notices()
            return changed

    def apply(self, batch: list[Change]) -> list[Flow]:
        """Watched changes; returns the policy flows it changed (for the datapath guard)."""
        touched = notices = False
        namespaces: set[str] = set()
        with self._lock:
            for c in batch:
                if c.kind in SERVICE_KINDS:
                    key = f"{c.namespace}/{c.name}"
                elif c.kind in POLICY_KINDS:
                    key = f"{c.namespace}/{c.name}"
                    namespaces.add(c.namespace)
                elif c.kind in KINDS:
                    key = c.name
                    touched = True
                elif c.kind in CLUSTER_POLICY_KINDS:
                    key = c.name
                    notices = True
                else:
                    continue
                if c.op == "put" and c.body is not None:
                    if self._keeps(c.kind, c.namespace):
                        self.objects[c.kind][key] = c.body
                else:
                    self.objects[c.kind].pop(key, None)
                    if c.kind == "TenantNetwork":
                        self._forget_vni(key)
            before = dict(self.resolution.by_namespace)
            if touched:
                self._recompute()
                self._refill(set(self.resolution.by_namespace) - set(before))
                self._drop_outside_tenants()
                changed = self._recompute_policy(set(self.nets) | set(self._policy))
                self._rebuild_services()
                self._sync_default_guard()
                self._sync_notices()
                return changed
            if notices:
                self._sync_notices()
            self._apply_services(batch)
            if any(c.kind == "Service" and f"{c.namespace}/{c.name}" == DNS_SERVICE
                   for c in batch):
                self._sync_dns()
            if any(c.kind == "Service" and c.namespace not in self.resolution.by_namespace
                   for c in batch):
                self._sync_default_guard()
            names = {n for ns in namespaces for n in (before.get(ns),
                                                     self.resolution.by_namespace.get(ns)) if n}
            return self._recompute_policy(names) if names else []

    def _keeps(self, kind: str, namespace: str) -> bool:
        """Whether a body of `kind` in `namespace` is kept (see `lister`)."""
        return (self.lister is None or kind not in TENANT_ONLY_KINDS
                or namespace in self.resolution.by_namespace)

    def _drop_outside_tenants(self) -> None:
        """Forget the tenant-only bodies of namespaces outside every tenant (see `lister`)."""
        if self.lister is None:
            return
        mine = self.resolution.by_namespace
        for kind in TENANT_ONLY_KINDS:
            objs = self.objects[kind]
            if any(b.get("namespace") not in mine for b in objs.values()):
                self.objects[kind] = {k: b for k, b in objs.items()
                                      if b.get("namespace") in mine}

    def _refill(self, joined: set[str]) -> None:
        """Read again the tenant-only bodies of namespaces that just joined a tenant.

        The datastore's current list may be ahead of the watch: the changes in
        between arrive later and are applied again, to the same effect.
        """
        if self.lister is None or not joined:
            return
        for kind in TENANT_ONLY_KINDS:
            objs = self.objects[kind]
            for b in self.lister(kind):
                if b.get("namespace") in joined:
                    objs[f"{b['namespace']}/{b['name']}"] = b

    def in_tenant(self, namespace: str) -> bool:
        """Whether pods and policies of `namespace` belong to a tenant network (not to the
        default network's policy engine)."""
        with self._lock:
            return namespace in self.resolution.by_namespace

    def _recompute_policy(self, names: set[str]) -> list[Flow]:
        """Rebuild the NetworkPolicy flows of these tenants from their own objects."""
        changes: dict[str, list[Flow]] = {}
        changed: list[Flow] = []
        for name in sorted(names):
            net = self.nets.get(name)
            flows: list[Flow] = []
            t = self.resolution.tenants.get(name)
            if net is not None and t is not None:
                mine = set(t.namespaces)
                flows, problems = tenant_policy_flows(
                    net, self.me,
                    [b for n, b in self.objects["Namespace"].items() if n in mine],
                    [b for b in self.objects["Pod"].values() if b.get("namespace") in mine],
                    [b for b in self.objects["NetworkPolicy"].values()
                     if b.get("namespace") in mine], self.flows.pipeline)
                for p in problems:
                    LOG.error("TenantNetwork %s: skipping %s", name, p)
            old = self._policy.get(name, [])
            if old != flows:
                changes[policy_owner(name)] = flows
                changed += old + flows
                if flows:
                    self._policy[name] = flows
                else:
                    self._policy.pop(name, None)
        if changes:
            self.flows.set_owners(changes)
        return changed

    # -- Services inside tenants (flows/tenantservices.py) ------------------------------

    def enable_services(self, slices: bool,
                        taken: Callable[[], dict[int, str]] = dict,
                        node_ports: Callable[[], DefaultNodePorts] = set) -> None:
        """Program tenant Services (flowcni's proxy mode). slices: endpoints from
        EndpointSlices, as the default proxy (flows.services.ServiceProxy); taken: the
        default proxy's group ids, kept clear of when the tenants' proxies are built;
        node_ports: the default network's node ports ((protocol, port), or a mapping
        from them to the (Service key, port index) asking), shared with the tenants'
        on this node: whoever had one first keeps it (_sync_nodeports). Builds them at
        once from what load() kept."""
        with self._lock:
            self._svc_slices, self._default_gids = slices, taken
            self._default_node_ports = node_ports
            self._rebuild_services()

    def sync_node_ports(self) -> bool:
        """Re-check node ports after the default network's Services changed; whether
        default_refused changed (the agent then re-filters the default's flows)."""
        with self._lock:
            before = dict(self.default_refused)
            self._sync_nodeports()
            return self.default_refused != before

    def _sync_nodeports(self) -> None:
        """Every tenant's node ports into it (flows/tenantservices.py nodeport_flows). A
        node port names one Service on the node, whichever network it is in: the one
        that had it first keeps it, whichever side changes (when none had it, the
        default network's Service, then tenants by name); a later one is refused,
        logged once naming its spec.ports[i].nodePort. Run on a tenant change and on a
        default-network Service change (sync_node_ports). The tenants' holdings are
        kept in the state directory (NODE_PORTS_FILE), so a restarted agent gives a
        port to the same Service as before; an agent starting on a fresh node sees
        both at once and gives it to the default network's."""
        given = self._default_node_ports()
        default: dict[tuple[str, int], tuple[str, int] | None] = (
            dict(given) if isinstance(given, Mapping) else dict.fromkeys(given))
        held = {**{k: "the default network" for k in default
                   if k not in self.default_refused}, **self._np_earlier, **self.node_ports}
        if self._loaded:  # the first sync that sees the tenants' Services
            self._np_earlier = {}
        want: dict[str, list[Flow]] = {}
        mine: dict[tuple[str, int], str] = {}
        per_tenant: dict[str, list[tuple[str, int]]] = {}
        claims: list[tuple[str, str, str, int, tuple[str, int]]] = []  # tenant, key, i, port
        for name, p in sorted(self._proxies.items()):
            t, net = self.resolution.tenants.get(name), self.nets.get(name)
            if t is None or net is None or self.gateway is None:
                continue
            per_tenant[name] = []
            for key, svc in sorted(p.services.items()):
                for i, (sp, np) in enumerate(zip(svc.ports, svc.exposure.node_ports,
                                                 strict=True)):
                    if np is not None:
                        claims.append((name, key, sp.protocol, i, (sp.protocol, np)))
        # A tenant Service keeps a port it held (even against a default Service, or
        # another tenant's, that asks for it now): holders' claims go first; otherwise
        # the default network, then tenants by name.
        keeps = {k for name, key, _, _, k in claims if held.get(k) == f"{name}/{key}"}
        claims.sort(key=lambda c: held.get(c[4]) != f"{c[0]}/{c[1]}")  # stable
        refused: dict[tuple[str, int], str] = {}
        for name, key, proto, i, k in claims:
            other = (mine.get(k) or (None if k in keeps else
                                     "the default network" if k in default else None))
            if other is not None:
                self._np_refuse(f"service {key} (tenant {name}): spec.ports[{i}].nodePort: "
                                f"{k[1]}/{proto} is already {other}'s on this node")
                continue
            mine[k] = f"{name}/{key}"
            per_tenant[name].append(k)
            if k in default:
                refused[k] = mine[k]
                asker = default[k]
                where = (f"service {asker[0]}: spec.ports[{asker[1]}].nodePort"
                         if asker else "a default-network Service's node port")
                self._np_refuse(f"{where}: {k[1]}/{k[0]} is already tenant "
                                f"{name}'s Service {key}'s on this node")
        self.default_refused = refused
        self._np_refused = set(self._np_refusing)  # logged again only if it comes back
        self._np_refusing.clear()
        for name, ports in per_tenant.items():
            t, net = self.resolution.tenants[name], self.nets[name]
            assert self.gateway is not None
            flows = nodeport_flows(net, t.gateway(self.me), net.router_mac, self.gateway.mac,
                                   ports, self.flows.pipeline)
            if flows:
                want[name] = flows
        changes: dict[str, list[Flow]] = {nodeport_owner(n): []
                                          for n in set(self._nodeports) - set(want)}
        changes.update({nodeport_owner(n): f for n, f in want.items()
                        if self._nodeports.get(n) != f})
        if mine != self.node_ports:
            _write_node_ports(self._np_file, mine)
        self._nodeports, self.node_ports = want, mine
        if changes:
            self.flows.set_owners(changes)

    def _np_refuse(self, msg: str) -> None:
        """A node-port refusal of this sync: logged unless the previous sync had it."""
        self._np_refusing.add(msg)
        if msg not in self._np_refused:
            LOG.error("%s", msg)

    def host_entries(self) -> list[HostEntry]:
        """The tenants' node ports, for the node's nftables (controller.hostnet): each
        masqueraded (externalTrafficPolicy Cluster, the only one tenants get)."""
        with self._lock:
            return [HostEntry(proto.lower(), port, True)
                    for proto, port in sorted(self.node_ports)]

    def _service_body(self, b: dict[str, Any]) -> dict[str, Any]:
        """A tenant Service's body for its proxy; what it loses is logged once per change."""
        key = f"{b.get('namespace')}/{b.get('name')}"
        new, dropped = tenant_service_body(b)
        if tuple(dropped) != self._svc_dropped.get(key, ()):
            self._svc_dropped[key] = tuple(dropped)
            if dropped:
                LOG.warning("service %s (tenant %s): %s not supported inside a tenant "
                            "network: programmed as a ClusterIP only", key,
                            self.resolution.by_namespace.get(str(b.get("namespace"))),
                            ", ".join(dropped))
        return new

    def _rebuild_services(self) -> None:
        """Every tenant's Service proxy anew, from its own namespaces' objects (after the
        resolution may have moved namespaces, slices or tenants); installs the difference."""
        if self._svc_slices is None:
            return
        # One table of taken group ids for all tenants' proxies. The default proxy's are
        # marked as not theirs: a namespace that moved into a tenant may still have its
        # Services in the default proxy (the relabel gap), under the same key, and its
        # tenant Services must not reuse those groups.
        taken = {g: f"default-network:{k}" for g, k in self._default_gids().items()}
        self._taken, self._peer_gids = taken, {}
        flows: dict[str, list[Flow]] = {}
        groups: dict[str, list[Group]] = {}
        proxies: dict[str, ServiceProxy] = {}
        for name, net in sorted(self.nets.items()):
            t = self.resolution.tenants.get(name)
            if t is None:
                continue
            mine = set(t.namespaces)
            p = ServiceProxy(self.flows.pipeline, slices=self._svc_slices,
                             local_cidr=t.slices.get(self.me))
            p.gids = taken
            f, g, problems = p.load(
                [self._service_body(b) for b in self.objects["Service"].values()
                 if b.get("namespace") in mine],
                [b for b in self.objects["Pod"].values() if b.get("namespace") in mine],
                [b for b in self.objects["EndpointSlice"].values()
                 if b.get("namespace") in mine])
            for msg in problems:
                LOG.error("TenantNetwork %s: skipping %s", name, msg)
            p.take_stale()  # a fresh proxy has no earlier endpoints to compare with
            lf, lg = self._lift(net, f, g)
            flows.update(lf)
            groups.update(lg)
            proxies[name] = p
        self._proxies = proxies
        for o in self._svc_owned - set(flows):
            flows[o], groups[o] = [], []
        self._svc_owned = {o for o, fl in flows.items() if fl}
        if flows:
            self.flows.set_owners(flows, groups)
        self._sync_nodeports()
        self._sync_dns()

    def _sync_default_guard(self) -> None:
        """Tenants never reach a default-network ClusterIP by routing (a masquerading
        tenant's egress would, through the node): one drop each, while tenants exist."""
        ips = []
        if self.nets:
            for b in self.objects["Service"].values():
                spec = b.get("spec")
                cip = spec.get("clusterIP") if isinstance(spec, dict) else None
                if (b.get("namespace") not in self.resolution.by_namespace
                        and isinstance(cip, str) and cip not in ("", "None")):
                    try:
                        ips.append(str(ipaddress.IPv4Address(cip)))
                    except ValueError:
                        continue  # the default proxy reports it
        flows = default_clusterip_flows(ips, self.flows.pipeline)
        if flows != self._guarded:
            self._guarded = flows
            self.flows.set_owners({DEFAULT_SERVICES_OWNER: flows})

    def _dns_service(self) -> tuple[str, list[tuple[str, int]]] | None:
        """The cluster DNS Service's ClusterIP and ports, when the default network has it."""
        ns = DNS_SERVICE.split("/", 1)[0]
        b = self.objects["Service"].get(DNS_SERVICE)
        if b is None or ns in self.resolution.by_namespace:
            return None
        try:
            svc = parse_service(ns, DNS_SERVICE.split("/", 1)[1], b.get("spec"))
        except ServiceError:
            return None  # the default proxy reports it
        if svc.cluster_ip is None:
            return None
        return svc.cluster_ip, [(p.protocol, p.port) for p in svc.ports]

    def _sync_dns(self) -> None:
        """Every usable tenant's way to the cluster DNS Service (flows/tenantservices.py),
        each under an address of its own on this node; none while there is no such
        Service (its addresses are then given back)."""
        dns = self._dns_service() if self._svc_slices is not None else None
        want: dict[str, list[Flow]] = {}
        for name, net in sorted(self.nets.items()):
            if dns is None:
                break
            addr = self._dns_address(name)
            if addr:
                want[name] = dns_flows(net, addr, dns[0], dns[1], self.flows.pipeline)
        for name in set(self.dns_addresses) - set(want):
            self.dns_addresses.pop(name, None)
            if self.node_ipam is not None:
                self.node_ipam.release(DNS_KEY + name)
        changes: dict[str, list[Flow]] = {dns_owner(n): [] for n in set(self._dns) - set(want)}
        changes.update({dns_owner(n): f for n, f in want.items() if self._dns.get(n) != f})
        self._dns = {n: f for n, f in want.items() if f}
        if changes:
            self.flows.set_owners(changes)

    def _dns_address(self, name: str) -> str:
        """Tenant `name`'s cluster-DNS address on this node ("" when none can be had)."""
        if self.node_ipam is None:
            return ""
        if name not in self.dns_addresses:
            try:
                self.dns_addresses[name] = str(self.node_ipam.allocate(
                    DNS_KEY + name, {"network": EGRESS_NETWORK, "tenant": name}))
            except IPAMError as e:
                LOG.error("TenantNetwork %s: no address on this node for cluster DNS (%s): "
                          "%s", name, DNS_SERVICE, e.msg)
                return ""
        return self.dns_addresses[name]

    def _lift(self, net: TenantNet, flows: dict[str, list[Flow]],
              groups: dict[str, list[Group]]
              ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]]]:
        """A tenant proxy's changed owners lifted into the tenant, with a copy for each
        connected tenant (connectTo), whose group ids are kept here and given back when
        a copy no longer needs them."""
        used: set[tuple[str, tuple[str, int]]] = set()

        def gid_of(key: str, peer: str, gid: int) -> int:
            mine = self._peer_gids.setdefault(key, {})
            used.add((key, (peer, gid)))
            if (peer, gid) not in mine:
                name = f"{key}/{gid}@{peer}"
                mine[(peer, gid)] = group_id_for(name, self._taken)
                self._taken[mine[(peer, gid)]] = name
            return mine[(peer, gid)]

        peers = tuple(self.nets[p] for p, _, _ in net.peers if p in self.nets)
        out = lift_services(net, flows, groups, self.flows.pipeline, peers, gid_of)
        for key in {o.split(":", 1)[1] for o in flows if o != HAIRPIN_OWNER}:
            mine = self._peer_gids.get(key, {})
            for slot in [s for s in mine if (key, s) not in used]:
                del self._taken[mine.pop(slot)]
            if not mine:
                self._peer_gids.pop(key, None)
        return out

    def _apply_services(self, batch: list[Change]) -> None:
        """Pods, Services and EndpointSlices of tenant namespaces: to their tenant's proxy."""
        if self._svc_slices is None:
            return
        by_tenant: dict[str, list[Change]] = {}
        for c in batch:
            if c.kind not in ("Pod", *SERVICE_KINDS):
                continue
            name = self.resolution.by_namespace.get(c.namespace)
            if name is None or name not in self._proxies:
                continue
            if c.kind == "Service" and c.body is not None:
                c = replace(c, body=self._service_body(c.body))
            by_tenant.setdefault(name, []).append(c)
        flows: dict[str, list[Flow]] = {}
        groups: dict[str, list[Group]] = {}
        for name, changes in sorted(by_tenant.items()):
            p, net = self._proxies[name], self.nets[name]
            f, g, problems = p.apply(changes)
            for msg in problems:
                LOG.error("TenantNetwork %s: skipping %s", name, msg)
            # in the tenant's zone, and in each connected tenant's (its copies commit there)
            zones = (net.vni, *(self.nets[q].vni for q, _, _ in net.peers if q in self.nets))
            self.stale += [(z, s) for s in p.take_stale() for z in zones]
            lf, lg = self._lift(net, f, g)
            flows.update(lf)
            groups.update(lg)
        for o, fl in flows.items():
            groups.setdefault(o, [])
            if fl:
                self._svc_owned.add(o)
            else:
                self._svc_owned.discard(o)
        if flows:
            self.flows.set_owners(flows, groups)
        if by_tenant:
            self._sync_nodeports()

    def take_stale(self) -> list[tuple[int, StaleUDP]]:
        """UDP entries of tenant Services' removed endpoints, with the zone they are in
        (controller.svcconntrack flushes them once the new groups are installed)."""
        with self._lock:
            out, self.stale = self.stale, []
            return out

    def describe_services(self) -> list[dict[str, Any]]:
        """Each tenant Service as flows.services.ServiceProxy.describe, plus its tenant."""
        with self._lock:
            return [{**s, "tenant": name, "vni": self.nets[name].vni,
                     "connected": [p for p, _, _ in self.nets[name].peers]}
                    for name, p in sorted(self._proxies.items()) for s in p.describe()]

    def _kept_immutable(self) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
        """The TenantNetworks to resolve, with immutable fields as this agent first
        accepted them: a change that got past the API (a store written by hand) would
        renumber running pods, so it is reported (naming the field) and not applied."""
        bodies, refused = [], {}
        for name, b in self.objects["TenantNetwork"].items():
            spec = b.get("spec") if isinstance(b.get("spec"), dict) else None
            try:
                new = from_body(b)
            except TenantError:
                bodies.append(b)
                continue
            old = self._accepted.get(name)
            if old is None or spec is None:
                self._accepted[name] = new
                bodies.append(b)
                continue
            try:
                check_update(old, new)
                bodies.append(b)
            except TenantError as e:
                refused[name] = [str(e)]
                kept = {**spec, "subnets": list(old.subnets),
                        "nodeSubnetSize": old.node_subnet_size}
                kept.pop("vni", None)
                if old.vni is not None:
                    kept["vni"] = old.vni
                bodies.append({**b, "spec": kept})
        for name in set(self._accepted) - set(self.objects["TenantNetwork"]):
            del self._accepted[name]
        return bodies, refused

    def _forget_vni(self, name: str) -> None:
        if self.vni_record is not None:
            try:
                self.vni_record.forget_vni(name)
            except Exception as e:  # the store unreachable: the record stays, harmless
                LOG.error("TenantNetwork %s: VNI record not removed: %s", name, e)

    def _resolve(self, bodies: list[dict[str, Any]]) -> Resolution:
        """resolve(), with the VNIs recorded in the store given first, and the usable
        tenants' VNIs recorded (once another agent recorded first, its answer is taken)."""
        def run(recorded: dict[str, int]) -> Resolution:
            return resolve(bodies, self.objects["Namespace"].values(),
                           self.objects["Node"].values(), self.cluster_cidr, self.encap,
                           recorded)
        self._recorded = {}
        if self.vni_record is None:
            return run({})
        try:
            recorded = self.vni_record.vnis()
            res = run(recorded)
            want = {t.name: t.vni for t in res.tenants.values() if t.ok and t.vni}
            kept = recorded
            if any(recorded.get(n) != v for n, v in want.items()):
                kept = self.vni_record.record_vnis(want)
        except Exception as e:  # the store unreachable: derived VNIs, as without a record
            LOG.error("TenantNetworks: VNI record unavailable, VNIs derived: %s", e)
            return run({})
        self._recorded = kept
        return res if all(kept.get(n) == v for n, v in want.items()) else run(kept)

    def _recompute(self) -> None:
        bodies, refused = self._kept_immutable()
        res = self._resolve(bodies)
        for name, msgs in refused.items():
            res.tenants[name].conditions += [
                Condition("ImmutableFieldChanged", True, "ChangeRefused", m) for m in msgs]
        ips = {n["name"]: n.get("nodeIP", "") for n in self.objects["Node"].values()}
        nets = {}
        for t in res.tenants.values():
            self._report(t)
            if t.ok and t.spec is not None:
                masq = t.spec.masquerade and self.egress_ip(t.name)
                nets[t.name] = TenantNet(t.name, t.vni, tuple(
                    (n, ips.get(n, ""), s) for n, s in sorted(t.slices.items())
                    if ips.get(n)), masq or "",
                    (self.cluster_cidr, *t.spec.subnets) if masq else ())
        for name in {t.name for t in res.tenants.values()} | set(self.nets):
            if name not in nets or not nets[name].egress_ip:
                self._release_egress(name)
        for name, net in list(nets.items()):
            peers = tuple((p, nets[p].vni, nets[p].slices)
                          for p in sorted(res.tenants[name].connected) if p in nets)
            if peers:
                nets[name] = replace(net, peers=peers)
        changes: dict[str, list[Flow]] = {}
        pipeline = self.flows.pipeline
        for name in set(self.nets) - set(nets):
            changes[tenant_owner(name)] = []
        for name, net in nets.items():
            if self.nets.get(name) != net:
                changes[tenant_owner(name)] = tenant_flows(net, self.me, self.tun_ofport,
                                                           pipeline, self.gateway)
        if bool(nets) != bool(self.nets):
            changes[TENANT_BASE_OWNER] = base_flows(self.tun_ofport, pipeline) if nets else []
        self.resolution, self.nets = res, nets
        changes.update(self._connect_changes())
        if changes:
            self.flows.set_owners(changes)

    def _connect_changes(self) -> dict[str, list[Flow]]:
        """connectTo's flows towards the local pods of connected tenants (by tenant)."""
        local: dict[str, list[tuple[LocalPod, TenantNet]]] = {}
        for a in self.pods():
            t = self.nets.get(getattr(a, "tenant", ""))
            if t is not None:
                local.setdefault(t.name, []).append((a.local_pod(), t))
        want = {}
        for name, net in self.nets.items():
            pods = [p for peer, _, _ in net.peers for p in local.get(peer, [])]
            if pods:
                want[connect_owner(name)] = connect_pod_flows(net, pods, self.flows.pipeline)
        changes: dict[str, list[Flow]] = {o: [] for o in set(self._connect) - set(want)}
        changes.update({o: f for o, f in want.items() if self._connect.get(o) != f})
        self._connect = want
        return changes

    def pods_changed(self) -> None:
        """A local pod came or went: connected tenants' flows towards it follow."""
        with self._lock:
            changes = self._connect_changes()
            if changes:
                self.flows.set_owners(changes)
            self._sync_notices(policies=False)

    # -- reported, not enforced ----------------------------------------------------------

    def _stale_pods(self, pods: list[Any]) -> list[tuple[str, str, str]]:
        """Running pods whose namespace now belongs to another network than the one they
        started on: (pod "ns/name", its network, its namespace's network; "" = default)."""
        out = []
        for p in pods:
            was = getattr(p, "tenant", "") or ""
            now = self.resolution.by_namespace.get(p.namespace, "")
            if was != now:
                out.append((f"{p.namespace}/{p.name}", was, now))
        return sorted(out)

    def _admin_subjects(self) -> dict[str, list[str]]:
        """Tenant -> the cluster policies ("Kind/name") whose spec.subject selects one of
        its namespaces (policies that do not parse are the cluster engine's to report)."""
        labels = {n: dict(b.get("labels") or {}) for n, b in self.objects["Namespace"].items()}
        out: dict[str, list[str]] = {}
        for kind in CLUSTER_POLICY_KINDS:
            for name, b in sorted(self.objects[kind].items()):
                try:
                    pol = parse_cluster_policy(kind, name, b.get("spec"))
                except (PolicyError, KeyError, TypeError, ValueError):
                    continue
                hit = {t for ns, t in self.resolution.by_namespace.items()
                       if pol.subject_ns.matches(labels.get(ns, {}))}
                for t in hit:
                    out.setdefault(t, []).append(f"{kind}/{name}")
        return out

    def _sync_notices(self, policies: bool = True) -> None:
        """The PodsOnOldNetwork and AdminPolicyNotApplied conditions (module doc), each
        logged once per change, naming the pods or the policies. policies=False: only
        the pods changed (the cluster policies' subjects are not looked at again)."""
        if policies:
            self._admin = self._admin_subjects()
        notices: dict[str, list[Condition]] = {}
        moved: dict[str, list[str]] = {}
        for key, was, now in self._stale_pods(list(self.pods())):
            what = (f"{key} (started on {was or 'the default network'}, its namespace is "
                    f"now in {now or 'the default network'})")
            for t in {was, now} - {""}:
                moved.setdefault(t, []).append(what)
        for t, pods in sorted(moved.items()):
            notices.setdefault(t, []).append(Condition(
                "PodsOnOldNetwork", True, "NamespaceMoved",
                "spec.namespaceSelector: running pods keep the network and address they "
                f"started with until restarted: {', '.join(pods)}"))
        for t, pols in sorted(self._admin.items()):
            notices.setdefault(t, []).append(Condition(
                "AdminPolicyNotApplied", True, "TenantNotSupported",
                f"spec.subject of {', '.join(pols)} selects namespaces of this network: the "
                "Admin and Baseline tiers do not apply to tenant pods (use NetworkPolicy "
                "inside the tenant)"))
        for t in sorted(set(notices) | set(self._notices)):
            new = notices.get(t, [])
            if new != self._notices.get(t, []):
                for c in new:
                    if c not in self._notices.get(t, []):
                        LOG.warning("TenantNetwork %s: %s: %s", t, c.type, c.message)
        self._notices = notices

    def notices(self, name: str) -> list[Condition]:
        """The reported-only conditions of tenant `name` (see _sync_notices)."""
        with self._lock:
            return list(self._notices.get(name, []))

    def _report(self, t: Tenant) -> None:
        """One log line per new set of conditions of a tenant (each names its field)."""
        msgs = tuple(f"{c.type}: {c.message}" for c in t.conditions
                     if not (c.type == "Ready" and c.status))
        if self._reported.get(t.name) != msgs:
            self._reported[t.name] = msgs
            for m in msgs:
                LOG.error("TenantNetwork %s: %s", t.name, m)
            if not msgs:
                LOG.info("TenantNetwork %s: VNI %d, zone %d, slice here %s, namespaces %s",
                         t.name, t.vni, t.zone, t.slices.get(self.me, "-"), t.namespaces)

    # -- egress ------------------------------------------------------------------------

    def egress_ip(self, name: str) -> str:
        """This node's egress address of a masquerading tenant: leased from the node's
        own pod CIDR, so the node's stack routes and masquerades it like a pod's, and
        its replies come back to this bridge. "" (logged) when the CIDR is full."""
        if self.node_ipam is None or self.gateway is None:
            return ""
        try:
            return str(self.node_ipam.allocate(EGRESS_KEY + name, {"network": EGRESS_NETWORK,
                                                                   "tenant": name}))
        except IPAMError as e:
            LOG.error("TenantNetwork %s: spec.egress.masquerade: no egress address on this "
                      "node: %s", name, e.msg)
            return ""

    def _release_egress(self, name: str) -> None:
        if self.node_ipam is not None:
            self.node_ipam.release(EGRESS_KEY + name)

    # -- pods --------------------------------------------------------------------------

    def placement(self, namespace: str) -> Placement | None:
        """None: the default network. TenantRefused (naming why) if the tenant can't."""
        with self._lock:
            t = self.resolution.of_namespace(namespace)
            if t is None:
                return None
            if not t.ok:
                why = "; ".join(c.message for c in t.conditions if not c.status
                                or c.type != "Ready")
                raise TenantRefused(f"namespace {namespace} belongs to TenantNetwork {t.name}, "
                                    f"which cannot take pods: {why}")
            cidr = t.slices.get(self.me)
            if cidr is None:
                raise TenantRefused(f"TenantNetwork {t.name}: no slice of spec.subnets for "
                                    f"node {self.me} (spec.subnets too small for its nodes)")
            return Placement(self.nets[t.name], cidr, t.gateway(self.me),
                             self.ipam(t.name, cidr))

    def ipam(self, name: str, cidr: str) -> IPAM:
        with self._lock:
            ip = self._ipams.get((name, cidr))
            if ip is None:
                fname = f"ipam-tenant-{_SAFE.sub('_', name)}-{cidr.replace('/', '_')}.json"
                path = os.path.join(self.state_dir, fname)
                ip = self._ipams[(name, cidr)] = IPAM(cidr, path)
                # leases a checkpoint kept for pods no port backs any more (their DEL
                # never came, or came while this pool was not loaded)
                for k in ip.gc({a.key for a in self.pods()}):
                    LOG.warning("TenantNetwork %s: releasing lease %s: no port carries it",
                                name, k)
            return ip

    def release(self, key: str) -> None:
        """Give back `key`'s lease, whichever tenant pool holds it (none: a no-op)."""
        with self._lock:
            pools = list(self._ipams.values())
        for p in pools:
            p.release(key)

    def gc(self, valid: set[str], owned: Callable[[dict[str, Any]], bool]) -> list[str]:
        """CNI GC of the tenant pools: leases not in `valid` that `owned` accepts."""
        with self._lock:
            pools = list(self._ipams.values())
        return [k for p in pools for k in p.gc(valid, owned)]

    def restore(self, leases: dict[tuple[str, str], dict[str, str]]) -> list[str]:
        """Re-learn leases of running tenant pods ((tenant, slice) -> {key: ip})."""
        rejected: list[str] = []
        for (name, cidr), kv in leases.items():
            pool = self.ipam(name, cidr)
            rejected += pool.restore(kv)
            pool.gc(set(kv))
        return rejected

    # -- inspection --------------------------------------------------------------------

    SHARED_OWNERS = (TENANT_BASE_OWNER, DEFAULT_SERVICES_OWNER)  # every tenant's packets

    def owners(self, name: str) -> set[str]:
        """The owners of every flow this agent installs for tenant `name`: its own
        (tenant, connectTo, policy, cluster DNS), its Services' (and their copies for
        connected tenants), the copies of connected tenants' Services it reaches, and
        its local pods'. The one answer `flowctl flows --tenant` and the per-tenant
        metrics use; SHARED_OWNERS are the flows every tenant's packets meet."""
        with self._lock:
            t = self.resolution.tenants.get(name)
            mine = set(t.namespaces) if t else set()
            services = {o for o in self._svc_owned
                        if (kp := parse_service_owner(o)) is not None
                        and (kp[0].partition("/")[0] in mine or kp[1] == name)}
        pods = {f"pod:{p.key}" for p in self.pods() if getattr(p, "tenant", "") == name}
        return {tenant_owner(name), connect_owner(name), policy_owner(name), dns_owner(name),
                hairpin_owner(name), nodeport_owner(name), *services, *pods}

    def metric_rows(self) -> list[tuple[str, int, bool, int, int]]:
        """(tenant, VNI, usable, local pods, flows) for the metrics endpoint."""
        with self._lock:
            tenants = list(self.resolution.tenants.values())
        pods = list(self.pods())
        rows = []
        for t in sorted(tenants, key=lambda t: t.name):
            keys = [f"pod:{p.key}" for p in pods if getattr(p, "tenant", "") == t.name]
            n_flows = len(self.flows.flows_of(sorted(self.owners(t.name))))
            rows.append((t.name, t.vni, t.ok, len(keys), n_flows))
        return rows

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            res = self.resolution
            pods = list(self.pods())
            notices = {k: list(v) for k, v in self._notices.items()}
            recorded = dict(self._recorded)
        out = []
        for t in sorted(res.tenants.values(), key=lambda t: t.name):
            mine = [p for p in pods if getattr(p, "tenant", "") == t.name]
            stale = [f"{p.namespace}/{p.name}" for p in pods
                     if (getattr(p, "tenant", "") or None) != (res.by_namespace.get(p.namespace))
                     and t.name in (getattr(p, "tenant", ""), res.by_namespace.get(p.namespace))]
            out.append({
                "name": t.name, "ok": t.ok, "vni": t.vni or None, "zone": t.zone or None,
                "vni_source": ("spec" if t.spec and t.spec.vni is not None else
                               "recorded" if recorded.get(t.name) == t.vni and t.vni else
                               "derived" if t.vni else None),
                "subnets": list(t.spec.subnets) if t.spec else [],
                "namespaces": t.namespaces, "slices": t.slices,
                "node_slice": t.slices.get(self.me), "gateway": t.gateway(self.me),
                "router_mac": self.nets[t.name].router_mac if t.name in self.nets else None,
                "egress_ip": self.nets[t.name].egress_ip if t.name in self.nets else None,
                "masquerade": bool(t.spec and t.spec.masquerade),
                "connect_to": list(t.spec.connect_to) if t.spec else [],
                "connected": list(t.connected),
                "owners": sorted(self.owners(t.name)),
                "shared_owners": list(self.SHARED_OWNERS),
                "pods": [{"namespace": p.namespace, "name": p.name, "ip": p.ip}
                         for p in mine],
                "stale_pods": stale,
                "conditions": [c.as_dict() for c in
                               (*t.conditions, *notices.get(t.name, []))]})
        return out
