"""Services: what makes a Service's connections work through the pipeline.

Next to kube-proxy (or any node-level DNAT), a pod's packet to a ClusterIP
leaves br-int through the gateway, the node rewrites its destination to an
endpoint, and routes it back into br-int through the gateway. The endpoint's
reply is addressed to the client pod, which br-int (or the tunnel) could
reach directly; delivered that way, it would skip the node's conntrack and
reach the client from the endpoint's address instead of the Service's, and
the client would reset it. So every connection whose first packet entered
from the gateway is committed with a conntrack mark, and its replies are
sent back to the gateway, on the node where the connection entered (a reply
from another node arrives over the tunnel and meets the same conntrack
entry there). The node's conntrack then un-NATs the reply and routes it to
the client through the gateway. NodePort traffic the node forwards into
br-int and hairpin connections (which kube-proxy masquerades) take the same
path. These flows do not depend on the proxy mode: connections the node's
own stack starts (probes, host-network pods) need their replies back at the
gateway too.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import (
    CT,
    MAX_GROUP_ID,
    Controller,
    Flow,
    Group,
    GroupAction,
    SetField,
)
from flowcni.flows.node import Gateway
from flowcni.flows.policy import PodInfo, pod_from_body
from flowcni.flows.tables import DEFAULT, EGRESS_POLICY, Pipeline

GATEWAY_CT_OWNER = "gateway-conntrack"

# Above the policy engine's commit (200) and above local-pod and remote-node
# forwarding (200, 190): a marked reply must never take the direct path.
PRIO_GATEWAY_COMMIT = 210
PRIO_GATEWAY_REPLY = 210


def gateway_reply_flows(gw: Gateway, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Mark connections entering from the gateway; send their replies back to it."""
    kw = dict(feature=Feature.GATEWAY, owner=GATEWAY_CT_OWNER, pipeline=pipeline)
    return [
        Flow.make("ConntrackCommit", PRIO_GATEWAY_COMMIT,
                  {"eth_type": 0x0800, "ct_state": "+new+trk",
                   "reg0": F.SOURCE.value(F.FROM_GATEWAY)},
                  [CT(commit=True, mark=F.CT_MARK_FROM_GATEWAY)], goto="Output", **kw),
        Flow.make("L3Forwarding", PRIO_GATEWAY_REPLY,
                  {"eth_type": 0x0800, "ct_state": "+rpl+trk",
                   "ct_mark": (F.CT_MARK_FROM_GATEWAY, F.CT_MARK_FROM_GATEWAY)},
                  [SetField("eth_dst", gw.mac)], goto="L3DecTTL", **kw),
    ]


# -- flowcni's own Service proxy ------------------------------------------------------------
#
# A new connection to a ClusterIP and port meets the Service's flow in
# ServiceLB, which hands it to the port's select group. Each bucket is one
# ready endpoint: ct(commit, nat(dst=endpoint)) and on to EgressRule, so
# NetworkPolicy sees the real destination pod and port, and the source pod
# as it is (no SNAT). Later packets and replies meet that NAT in the
# conntrack lookup of ConntrackZone (ct(nat)) and skip ServiceLB.

PROXY_MODES = ("flowcni", "kube-proxy")
PROTOCOLS = ("TCP", "UDP", "SCTP")
PRIO_SERVICE = 200
# A group goes to OVS in one OpenFlow message (at most 65535 bytes: a 16-byte
# header and 72 bytes per bucket of ct(commit, table, zone, nat(dst))). More
# endpoints need chained or split groups, which this proxy does not do yet:
# it programs the first MAX_BUCKETS and reports the rest.
MAX_BUCKETS = (0xFFFF - 16) // 72


class ServiceError(ValueError):
    """A Service this proxy cannot program; the message names the field."""


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str       # TCP / UDP / SCTP
    port: int
    target: int | str   # a number, or the name of a container port


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str | None          # None: headless (nothing to program)
    ports: tuple[ServicePort, ...]
    selector: tuple[tuple[str, str], ...] | None  # None: endpoints are managed by hand

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def owner(self) -> str:
        return service_owner(self.key)

    def selects(self, pod: PodInfo) -> bool:
        return (self.selector is not None and pod.namespace == self.namespace
                and all(pod.labels.get(k) == v for k, v in self.selector))


def service_owner(key: str) -> str:
    return f"service:{key}"


def _port_number(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
        raise ServiceError(f"{field}: {v!r} is not a port number (1-65535)")
    return v


def parse_service(namespace: str, name: str, spec: Any) -> Service:
    """A Service's spec, checked: every refusal names the field it is about."""
    if not isinstance(spec, dict):
        raise ServiceError("spec: must be a mapping")
    fams = spec.get("ipFamilies")
    if fams is not None:
        if not isinstance(fams, list) or any(f not in ("IPv4", "IPv6") for f in fams):
            raise ServiceError(f"spec.ipFamilies: {fams!r} is not a list of IPv4/IPv6")
        if "IPv6" in fams:
            raise ServiceError("spec.ipFamilies: IPv6 is not supported (IPv4 only)")
    stype = spec.get("type", "ClusterIP")
    if stype not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ServiceError(f"spec.type: {stype!r} is not a Service type")
    cip = spec.get("clusterIP")
    if stype == "ExternalName" or cip == "None":
        cluster_ip = None  # DNS only: nothing for the datapath
    elif not cip:
        raise ServiceError("spec.clusterIP: required (the embedded datastore does not "
                           "allocate Service IPs; Kubernetes always sets it)")
    else:
        try:
            cluster_ip = str(ipaddress.IPv4Address(cip))
        except ValueError as e:
            raise ServiceError(f"spec.clusterIP: {cip!r} is not an IPv4 address") from e
    raw_ports = spec.get("ports")
    if cluster_ip is not None and (not isinstance(raw_ports, list) or not raw_ports):
        raise ServiceError("spec.ports: a Service with a ClusterIP needs at least one port")
    ports = []
    for i, p in enumerate(raw_ports or []):
        where = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise ServiceError(f"{where}: must be a mapping")
        proto = p.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            raise ServiceError(f"{where}.protocol: {proto!r} (supported: TCP, UDP, SCTP)")
        port = _port_number(p.get("port"), f"{where}.port")
        target = p.get("targetPort", port)
        if isinstance(target, str) and not target.isdigit():
            if not target:
                raise ServiceError(f"{where}.targetPort: empty name")
        else:
            target = _port_number(int(target) if isinstance(target, str) else target,
                                  f"{where}.targetPort")
        ports.append(ServicePort(str(p.get("name") or ""), proto, port, target))
    sel = spec.get("selector")
    if sel is not None and (not isinstance(sel, dict)
                            or not all(isinstance(k, str) for k in sel)):
        raise ServiceError("spec.selector: must be a map of strings")
    selector = None if sel is None else tuple(sorted((k, str(v)) for k, v in sel.items()))
    return Service(namespace, name, cluster_ip, tuple(ports), selector)


def endpoints(svc: Service, sp: ServicePort, pods: Iterable[PodInfo]) -> list[tuple[str, int]]:
    """(IP, port) of each pod the Service selects that has an IP and the target port.

    What the EndpointSlice controller derives: a named targetPort resolves per
    pod through its container port of that name and protocol; a pod without
    it is not an endpoint of that port.
    """
    out = set()
    for p in pods:
        if not p.ip or not svc.selects(p):
            continue
        if isinstance(sp.target, int):
            out.add((p.ip, sp.target))
            continue
        num = next((n for name, n, proto in p.ports
                    if name == sp.target and proto == sp.protocol), None)
        if num is not None:
            out.add((p.ip, num))
    return sorted(out)


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def slice_endpoints(svc: Service, sp: ServicePort,
                    slices: Iterable[dict[str, Any]]) -> list[tuple[str, int]]:
    """(IP, port) of `sp` from the Service's EndpointSlices (discovery.k8s.io/v1).

    Ready endpoints (ready unset counts as ready); only when there is none,
    those still serving while terminating, as Kubernetes specifies. A slice
    port pairs with a Service port by name and protocol. Anything that is not
    an IPv4 address is skipped: one bad entry costs itself, not the Service.
    """
    ready: set[tuple[str, int]] = set()
    terminating: set[tuple[str, int]] = set()
    for sl in slices:
        if (sl.get("namespace") != svc.namespace or sl.get("addressType") != "IPv4"
                or (sl.get("labels") or {}).get(SERVICE_NAME_LABEL) != svc.name):
            continue
        port = next((p.get("port") for p in sl.get("ports") or [] if isinstance(p, dict)
                     and (p.get("name") or "") == sp.name
                     and (p.get("protocol") or "TCP") == sp.protocol), None)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            continue
        for e in sl.get("endpoints") or []:
            if not isinstance(e, dict):
                continue
            cond = e.get("conditions") or {}
            into = (ready if cond.get("ready") is not False else terminating
                    if cond.get("serving") and cond.get("terminating") else None)
            for a in e.get("addresses") or [] if into is not None else []:
                try:
                    into.add((str(ipaddress.IPv4Address(a)), port))  # type: ignore[union-attr]
                except ValueError:
                    continue
    return sorted(ready or terminating)


def group_id_for(key: str, taken: dict[int, str]) -> int:
    """A stable group id for `key` ("ns/name/port-index"), unique among `taken`.

    Derived from the key, so a restarted agent computes the same ids and can
    tell its groups apart from leftovers; a rare collision probes onwards.
    """
    gid = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
    gid = gid % MAX_GROUP_ID + 1
    while taken.get(gid, key) != key:
        gid = gid % MAX_GROUP_ID + 1
    return gid


@functools.lru_cache(maxsize=1 << 16)
def _dnat(ip: str, port: int) -> CT:
    """A bucket's action (shared: an endpoint of several Services is built once)."""
    return CT(commit=True, table=EGRESS_POLICY, nat=f"{ip}:{port}")


def service_flows(svc: Service, eps: list[list[tuple[str, int]]], gids: list[int],
                  pipeline: Pipeline = DEFAULT) -> tuple[list[Flow], list[Group]]:
    """The ServiceLB flow and select group of each port of `svc` (eps/gids: per port)."""
    flows: list[Flow] = []
    groups: list[Group] = []
    if svc.cluster_ip is None:
        return flows, groups
    kw = dict(feature=Feature.SERVICE, owner=svc.owner, pipeline=pipeline)
    for sp, ep, gid in zip(svc.ports, eps, gids, strict=True):
        match: dict[str, Any] = {"ipv4_dst": svc.cluster_ip,
                                 f"{sp.protocol.lower()}_dst": sp.port}
        if not ep:
            # No endpoint: the agent answers (TCP RST, ICMP port unreachable) as
            # kube-proxy does, instead of letting the client time out (controller.reject).
            flows.append(Flow.make("ServiceLB", PRIO_SERVICE, match, [Controller()], **kw))
            continue
        groups.append(Group.make(gid, [[_dnat(ip, port)] for ip, port in ep],
                                 owner=svc.owner, table="ServiceLB", pipeline=pipeline))
        flows.append(Flow.make("ServiceLB", PRIO_SERVICE, match, [GroupAction(gid)], **kw))
    return flows, groups


class ServiceProxy:
    """Services and the pods they select -> each Service's flows and groups.

    Pure like the policy engine: fed datastore changes, it returns only the
    owners (Services) whose flows or groups changed, so one Service change
    touches its own flows and groups and nothing else.
    """

    def __init__(self, pipeline: Pipeline = DEFAULT, slices: bool = False) -> None:
        """slices: endpoints come from EndpointSlices (the Kubernetes datastore, where
        the EndpointSlice controller writes them); otherwise from the pods each
        Service selects (the embedded store, where the agent plays that
        controller). A Service without a selector always uses slices."""
        self.pipeline = pipeline
        self.use_slices = slices
        self.services: dict[str, Service] = {}
        self.pods: dict[str, PodInfo] = {}
        self.slices: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []  # drained into the problems load/apply return
        self.gids: dict[int, str] = {}          # group id -> "ns/name/index"
        self.svc_gids: dict[str, dict[int, int]] = {}  # service key -> port index -> gid
        self.by_ns: dict[str, dict[str, PodInfo]] = {}  # namespace -> pod key -> pod
        # (namespace, label, value) -> pod keys: a selector's candidates without a scan
        self.by_label: dict[tuple[str, str, str], set[str]] = {}
        self.built: dict[str, tuple[list[Flow], list[Group]]] = {}

    def _build(self, key: str) -> tuple[list[Flow], list[Group]]:
        svc = self.services.get(key)
        mine = self.svc_gids.setdefault(key, {})
        for i in [i for i in mine if svc is None or i >= len(svc.ports)]:
            del self.gids[mine.pop(i)]
        if svc is None:
            del self.svc_gids[key]
            return [], []
        gids = []
        for i in range(len(svc.ports)):
            if i not in mine:
                pk = f"{key}/{i}"
                mine[i] = group_id_for(pk, self.gids)
                self.gids[mine[i]] = pk
            gids.append(mine[i])
        eps = [self.endpoints(svc, sp) for sp in svc.ports]
        for sp, ep in zip(svc.ports, eps, strict=True):
            if len(ep) > MAX_BUCKETS:
                self.warnings.append(f"service {key} port {sp.port}/{sp.protocol}: {len(ep)} "
                                     f"endpoints, only the first {MAX_BUCKETS} programmed "
                                     "(one group per port)")
        eps = [ep[:MAX_BUCKETS] for ep in eps]
        return service_flows(svc, eps, gids, self.pipeline)

    def endpoints(self, svc: Service, sp: ServicePort) -> list[tuple[str, int]]:
        if self.use_slices or svc.selector is None:
            return slice_endpoints(svc, sp, self.slices.values())
        in_ns = self.by_ns.get(svc.namespace, {})
        if not svc.selector:
            return endpoints(svc, sp, in_ns.values())
        sets = [self.by_label.get((svc.namespace, k, v), set()) for k, v in svc.selector]
        return endpoints(svc, sp, (in_ns[k] for k in min(sets, key=len)))

    def _set_pod(self, key: str, pod: PodInfo | None) -> PodInfo | None:
        """Put (or with None remove) a pod, keeping the per-namespace index; the old one."""
        old = self.pods.pop(key, None)
        if old is not None:
            self.by_ns.get(old.namespace, {}).pop(key, None)
            for k, v in old.labels.items():
                self.by_label.get((old.namespace, k, v), set()).discard(key)
        if pod is not None:
            self.pods[key] = pod
            self.by_ns.setdefault(pod.namespace, {})[key] = pod
            for k, v in pod.labels.items():
                self.by_label.setdefault((pod.namespace, k, v), set()).add(key)
        return old

    @staticmethod
    def _slice_service(body: dict[str, Any] | None) -> str | None:
        name = ((body or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        return f"{(body or {}).get('namespace')}/{name}" if name else None

    def _recompute(self, keys: Iterable[str]) -> tuple[dict[str, list[Flow]],
                                                        dict[str, list[Group]]]:
        flows: dict[str, list[Flow]] = {}
        groups: dict[str, list[Group]] = {}
        for key in sorted(set(keys)):
            new = self._build(key)
            if self.built.get(key, ([], [])) == new:
                continue
            if new == ([], []):
                self.built.pop(key, None)
            else:
                self.built[key] = new
            flows[service_owner(key)], groups[service_owner(key)] = new
        return flows, groups

    def load(self, services: list[dict[str, Any]], pods: list[dict[str, Any]],
             slices: Iterable[dict[str, Any]] = ()
             ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]], list[str]]:
        """Initial state: (flows by owner, groups by owner, problems)."""
        problems: list[str] = []
        for sl in slices:
            self.slices[f"{sl.get('namespace')}/{sl.get('name')}"] = sl
        for b in pods:
            try:
                p = pod_from_body(b)
            except (KeyError, TypeError, ValueError):
                continue  # the policy engine reports bad pods
            self._set_pod(p.key, p)
        for b in services:
            self._put_service(b, problems)
        flows, groups = self._recompute(self.services)
        problems += self.warnings
        self.warnings = []
        return flows, groups, problems

    def _put_service(self, b: dict[str, Any], problems: list[str]) -> None:
        key = f"{b.get('namespace')}/{b.get('name')}"
        try:
            self.services[key] = parse_service(b["namespace"], b["name"], b.get("spec"))
        except (ServiceError, KeyError) as e:
            self.services.pop(key, None)
            problems.append(f"service {key}: {e}")

    def apply(self, changes: Iterable[Any]
              ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]], list[str]]:
        """Datastore changes (store.Change) -> (changed owners' flows, their groups, problems)."""
        problems: list[str] = []
        touched: set[str] = set()
        for c in changes:
            key = f"{c.namespace}/{c.name}"
            if c.kind == "Service":
                touched.add(key)
                if c.op == "put" and c.body:
                    self._put_service(c.body, problems)
                else:
                    self.services.pop(key, None)
            elif c.kind == "EndpointSlice":
                old_slice = self.slices.pop(key, None)
                if c.op == "put" and c.body:
                    self.slices[key] = c.body
                touched.update(k for k in (self._slice_service(old_slice),
                                           self._slice_service(c.body)) if k)
            elif c.kind == "Pod":
                new = None
                if c.op == "put" and c.body:
                    try:
                        new = pod_from_body(c.body)
                    except (KeyError, TypeError, ValueError):
                        new = None
                old = self._set_pod(key, new)
                touched.update(s.key for s in self.services.values()
                               if any(p is not None and s.selects(p) for p in (old, new)))
        flows, groups = self._recompute(touched)
        problems += self.warnings
        self.warnings = []
        return flows, groups, problems

    def describe(self) -> list[dict[str, Any]]:
        """Each Service: ClusterIP, ports with their endpoints and group ids."""
        out = []
        by_key = {f"{k}/{i}": g for k, gs in self.svc_gids.items() for i, g in gs.items()}
        for key, svc in sorted(self.services.items()):
            ports = []
            for i, sp in enumerate(svc.ports):
                ports.append({"name": sp.name, "protocol": sp.protocol, "port": sp.port,
                              "endpoints": [f"{ip}:{n}" for ip, n in self.endpoints(svc, sp)],
                              "group": by_key.get(f"{key}/{i}")})
            out.append({"service": key, "clusterIP": svc.cluster_ip, "ports": ports})
        return out
