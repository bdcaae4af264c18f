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

import hashlib
import ipaddress
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from flowcni.flows import fields as F
from flowcni.flows.affinity import with_affinity
from flowcni.flows.cookie import Feature
from flowcni.flows.hairpin import HAIRPIN_OWNER, hairpin_flows
from flowcni.flows.model import (
    CT,
    MAX_GROUP_ID,
    Action,
    Controller,
    Flow,
    Group,
    GroupAction,
    SetField,
    _new_flow,
    gc_paused,
    plain_ipv4,
)
from flowcni.flows.node import Gateway
from flowcni.flows.nodeport import (
    NODE_PORT_RANGE,
    Exposure,
    HostEntry,
    entry_flows,
    host_entries,
    is_local,
    parse_exposure,
)
from flowcni.flows.policy import PodInfo, _own, _shared_labels
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
# header and 72 bytes per bucket of ct(commit, table, zone, nat(dst))). A port
# with more endpoints is split across sub-groups of at most MAX_BUCKETS each,
# under a top group whose buckets lead to them (group chaining, which OVS
# supports), each weighted by its sub-group's size, so every endpoint still
# gets an equal share. Beyond MAX_BUCKETS sub-groups (826,281 endpoints on one
# port) the rest is reported and left out.
MAX_BUCKETS = (0xFFFF - 16) // 72
MAX_ENDPOINTS = MAX_BUCKETS * MAX_BUCKETS


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
    exposure: Exposure = Exposure()  # node ports, external IPs, policies (flows.nodeport)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def owner(self) -> str:
        return service_owner(self.key)

    def selects(self, pod: PodInfo | ProxyPod) -> bool:
        return (self.selector is not None and pod.namespace == self.namespace
                and all(pod.labels.get(k) == v for k, v in self.selector))


def service_owner(key: str) -> str:
    return f"service:{key}"


# -- the pods the proxy keeps -------------------------------------------------------------


class ProxyPod(NamedTuple):
    """What the proxy keeps of a pod: what a Service selects it by and its endpoints.

    Not a PodInfo (flows.policy): the proxy needs neither the pod's name (its
    key holds it) nor its node, and a tuple is the cheapest object to make.
    Parsing a PodInfo per pod was a third of the proxy's start-up at 10,000
    Services x 10 endpoints (100,000 pods).
    """

    namespace: str
    labels: dict[str, str]  # shared with every pod of the same labels: never mutated
    ip: str  # canonical IPv4 ("" with none; a bad one is reported and left out)
    ports: tuple[tuple[str, int, str], ...]  # (name, number 1-65535, protocol)


class PodMemo:
    """What repeats across the pods of one load (or apply): namespaces, label sets and
    port lists, each parsed once, keyed by the body's own values so that a hit
    copies and checks nothing (a Deployment's pods carry the same ones)."""

    __slots__ = ("strings", "labels", "ports")

    def __init__(self) -> None:
        self.strings: dict[Any, str] = {}
        self.labels: dict[Any, dict[str, str]] = {}
        self.ports: dict[Any, tuple[tuple[tuple[str, int, str], ...], list[str]]] = {}


_NO_LABELS = _shared_labels({})
_MISSING = object()
_NO_PODS: dict[str, ProxyPod] = {}  # what an index lookup that finds none reads (never written)
_new_pod = tuple.__new__  # ProxyPod(...) without NamedTuple's __new__ in Python: half the cost
_PTON, _NTOP, _AF_INET = socket.inet_pton, socket.inet_ntop, socket.AF_INET


def proxy_pods(bodies: Iterable[dict[str, Any]], memo: PodMemo,
               warnings: list[str]) -> Iterator[tuple[str, ProxyPod]]:
    """Pods' bodies -> (key, ProxyPod) of each; a body that is no pod is skipped (the
    policy engine reports those).

    Each pod's address and port numbers are checked here, once per pod (a bad
    one is reported in `warnings`, naming the field, and left out): the
    groups' DNAT actions trust them (CT.dnats checked=True) instead of
    checking each again for every Service port the pod serves. Strings kept
    are the proxy's own, not the body's (flows.policy._own). A generator, with
    its lookups bound once, instead of a call per pod.
    """
    strings, labels_memo, ports_memo = memo.strings, memo.labels, memo.ports
    intern, ntop, pton, af, new_pod = sys.intern, _NTOP, _PTON, _AF_INET, _new_pod
    missing = _MISSING
    for b in bodies:
        try:
            raw_ns, name = b["namespace"], b["name"]
            ns = strings.get(raw_ns)
            if ns is None:
                if type(raw_ns) is not str:
                    continue
                ns = strings[raw_ns] = _own(raw_ns)
            key = intern(f"{ns}/{name}")
            labels = _NO_LABELS
            raw = b.get("labels")
            if raw:
                try:  # keyed by the body's own items: equal to the owned ones, no copy on a hit
                    lkey: tuple[Any, ...] | None = tuple(raw.items())
                    hit = labels_memo.get(lkey)
                except TypeError:  # a value that is no string (not hashable): this pod's own
                    lkey = hit = None
                if hit is None:  # one dict per distinct label set, across engines
                    hit = _shared_labels(raw)
                    if lkey is not None:
                        labels_memo[lkey] = hit
                labels = hit
            ports: tuple[tuple[str, int, str], ...] = ()
            raw_ports = b.get("ports")
            if raw_ports:
                try:  # what _pod_ports reads of each port (a missing field is not a None one)
                    if len(raw_ports) == 1:  # most pods: (name, number, protocol)
                        p = raw_ports[0]
                        pkey: tuple[Any, ...] | None = (
                            p.get("name", missing), p.get("containerPort"),
                            p.get("protocol", missing))
                    else:  # (None, each port's): never equal to a one-port key
                        pkey = (None, tuple([(p.get("name", missing), p.get("containerPort"),
                                              p.get("protocol", missing)) for p in raw_ports]))
                    got = ports_memo.get(pkey)
                except TypeError:  # an unhashable value: parsed on its own
                    pkey = got = None
                if got is None:
                    got = _pod_ports(raw_ports)
                    if pkey is not None:
                        ports_memo[pkey] = got
                ports = got[0]
                if got[1]:
                    warnings += [f"pod {key}: {w}" for w in got[1]]
            raw_ip = b.get("ip") or ""
            ip = ""
            if raw_ip:
                try:  # inet_ntop's text: the check, and a copy of our own
                    own = ntop(af, pton(af, raw_ip))
                except (OSError, TypeError):
                    own = ""
                if own == raw_ip:
                    ip = intern(own)
                else:
                    warnings.append(f"pod {key}: ip: {raw_ip!r} is not an IPv4 address "
                                    "(not an endpoint)")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        yield key, new_pod(ProxyPod, (ns, labels, ip, ports))


def _pod_ports(raw_ports: Any) -> tuple[tuple[tuple[str, int, str], ...], list[str]]:
    """(name, number, protocol) of each container port (as flows.policy.pod_from_body
    reads them), and what was wrong with those left out (a number that is no port)."""
    out: list[tuple[str, int, str]] = []
    bad: list[str] = []
    for i, p in enumerate(raw_ports):
        if not p.get("containerPort"):
            continue
        n = int(p["containerPort"])
        if not 0 < n < 65536:
            bad.append(f"ports[{i}].containerPort: {p['containerPort']!r} is not a port "
                       "number (1-65535)")
            continue
        out.append((_own(str(p.get("name", ""))), n,
                    _own(str(p.get("protocol", "TCP")).upper())))
    return tuple(out), bad


def _port_number(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
        raise ServiceError(f"{field}: {v!r} is not a port number (1-65535)")
    return v


# Equal ServicePorts (and Exposures) are one object: most Services have the same few
# ports (http 80 -> "http", dns 53...) and no node port, external IP or policy, and
# each made its own (30,000 frozen objects at 10,000 Services, each a Python-level
# __init__). Keyed by the fields, before making one; bounded like flows.model's
# shared match pairs: past the limit new values are simply not shared.
_SHARED_VALUES: dict[tuple[Any, ...], Any] = {}
_SHARED_MAX = 1 << 14


def _service_port(name: str, protocol: str, port: int, target: int | str) -> ServicePort:
    key = ("port", name, protocol, port, type(target), target)
    hit = _SHARED_VALUES.get(key)
    if hit is None:
        hit = ServicePort(name, protocol, port, target)
        if len(_SHARED_VALUES) < _SHARED_MAX:
            _SHARED_VALUES[key] = hit
    return hit  # type: ignore[no-any-return]


def parse_service(namespace: str, name: str, spec: Any, status: Any = None,
                  node_port_range: tuple[int, int] = NODE_PORT_RANGE,
                  require_node_ports: bool = True) -> Service:
    """A Service's spec (and status, for LoadBalancer IPs), checked: every refusal
    names the field it is about. The last two arguments: see parse_exposure."""
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
            cluster_ip = cip if isinstance(cip, str) and plain_ipv4(cip) else str(
                ipaddress.IPv4Address(cip))
        except ValueError as e:
            raise ServiceError(f"spec.clusterIP: {cip!r} is not an IPv4 address") from e
    raw_ports = spec.get("ports")
    if cluster_ip is not None and (not isinstance(raw_ports, list) or not raw_ports):
        raise ServiceError("spec.ports: a Service with a ClusterIP needs at least one port")
    ports = []
    for i, p in enumerate(raw_ports or []):
        if not isinstance(p, dict):
            raise ServiceError(f"spec.ports[{i}]: must be a mapping")
        proto = p.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            raise ServiceError(f"spec.ports[{i}].protocol: {proto!r} (supported: TCP, UDP, "
                               "SCTP)")
        port = p.get("port")
        if type(port) is not int or not 0 < port < 65536:  # the field named only on error
            port = _port_number(port, f"spec.ports[{i}].port")
        target = p.get("targetPort", port)
        if isinstance(target, str) and not target.isdigit():
            if not target:
                raise ServiceError(f"spec.ports[{i}].targetPort: empty name")
        elif type(target) is not int or not 0 < target < 65536:
            target = _port_number(int(target) if isinstance(target, str) else target,
                                  f"spec.ports[{i}].targetPort")
        ports.append(_service_port(str(p.get("name") or ""), proto, port, target))
    sel = spec.get("selector")
    if sel is not None and (not isinstance(sel, dict)
                            or not all(isinstance(k, str) for k in sel)):
        raise ServiceError("spec.selector: must be a map of strings")
    # An empty selector is no selector: the API reference says endpoints are then managed
    # outside Kubernetes (EndpointSlices written by hand), not "every pod of the namespace".
    selector = tuple(sorted((k, str(v)) for k, v in sel.items())) if sel else None
    try:
        exposure = parse_exposure(spec, status, raw_ports or [], node_port_range,
                                  require_node_ports)
    except ValueError as e:
        raise ServiceError(str(e)) from e
    return Service(namespace, name, cluster_ip, tuple(ports), selector, exposure)


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


class _LbShape:
    """The ServiceLB flow's shape for one protocol, validated once by Flow.make: each
    Service port's flow only fills in its address and port (what Flow.with_values
    does, minus its generality: 20,000 such flows at 10,000 Services)."""

    __slots__ = ("pipeline", "template", "port_field", "at_ip", "at_port", "pairs")

    def __init__(self, protocol: str, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.port_field = f"{protocol.lower()}_dst"
        self.template = Flow.make(
            "ServiceLB", PRIO_SERVICE, {"ipv4_dst": "0.0.0.0", self.port_field: 1},
            [GroupAction(1)], feature=Feature.SERVICE, owner="", pipeline=pipeline)
        names = [k for k, _ in self.template.match]
        self.at_ip, self.at_port = names.index("ipv4_dst"), names.index(self.port_field)
        # port -> its (field, port) match pair, one shared by every Service on that port
        self.pairs: dict[int, tuple[str, int]] = {}

    def flow(self, vip: str, port: int, action: Action, owner: str) -> Flow:
        """The flow for `vip` (an address plain_ipv4 has passed) and `port`, checked here."""
        pair = self.pairs.get(port)
        if pair is None:
            if type(port) is not int or not 0 <= port <= 0xFFFF:
                raise ValueError(f"ServiceLB: {self.port_field}={port!r} is not a 16-bit number")
            pair = self.pairs[port] = (self.port_field, port)
        t = self.template
        match = list(t.match)
        match[self.at_ip] = ("ipv4_dst", vip)
        match[self.at_port] = pair
        return _new_flow(t.table, t.priority, tuple(match), (action,), None, t.feature, owner)


_LB_SHAPES: dict[tuple[int, str], _LbShape] = {}


def _lb_shape(protocol: str, pipeline: Pipeline) -> _LbShape:
    hit = _LB_SHAPES.get((id(pipeline), protocol))
    if hit is None or hit.pipeline is not pipeline:
        hit = _LB_SHAPES[(id(pipeline), protocol)] = _LbShape(protocol, pipeline)
    return hit


def split_sizes(n: int) -> list[int]:
    """Sizes of the sub-groups n endpoints are split into (one group when they fit).

    As equal as they can be (they differ by at most one), so a top bucket's
    weight, its sub-group's size, stays within one endpoint of the others.
    """
    if n <= MAX_BUCKETS:
        return [n]
    k = min(-(-n // MAX_BUCKETS), MAX_BUCKETS)
    n = min(n, MAX_ENDPOINTS)
    return [n // k + (j < n % k) for j in range(k)]


def port_groups(gid: int, sub_gids: list[int], ep: list[tuple[str, int]], owner: str,
                pipeline: Pipeline = DEFAULT, checked: bool = False) -> list[Group]:
    """One Service port's select group(s): `gid` holds every endpoint, or, when
    they do not fit in one group, leads to the sub-groups `sub_gids` (one per
    split_sizes entry, put first: a group must exist before one leads to it).
    checked: the endpoints' addresses and ports are known good (CT.dnats).
    """
    sizes = split_sizes(len(ep))
    if len(sizes) == 1:
        return [Group.dnat_select(gid, ep, ct_table=EGRESS_POLICY, owner=owner,
                                  table="ServiceLB", pipeline=pipeline, checked=checked)]
    if len(sub_gids) != len(sizes):
        raise ValueError(f"group {gid}: {len(sizes)} sub-groups needed, {len(sub_gids)} given")
    out, start = [], 0
    for sub, size in zip(sub_gids, sizes, strict=True):
        out.append(Group.dnat_select(sub, ep[start:start + size], ct_table=EGRESS_POLICY,
                                     owner=owner, table="ServiceLB", pipeline=pipeline,
                                     checked=checked))
        start += size
    out.append(Group.make(gid, [(GroupAction(sub),) for sub in sub_gids], owner=owner,
                          table="ServiceLB", pipeline=pipeline, weights=sizes))
    return out


def service_flows(svc: Service, eps: list[list[tuple[str, int]]], gids: list[int],
                  pipeline: Pipeline = DEFAULT,
                  sub_gids: list[list[int]] | None = None,
                  checked: bool = False) -> tuple[list[Flow], list[Group]]:
    """The ServiceLB flow and select group(s) of each port of `svc`.

    eps, gids (and sub_gids, for ports whose endpoints need more than one
    group): per port. checked: the endpoints' addresses and ports are known
    good (the proxy checked them when it took them in: see CT.dnats).
    """
    flows: list[Flow] = []
    groups: list[Group] = []
    vip = svc.cluster_ip
    if vip is None:
        return flows, groups
    if not plain_ipv4(vip):  # once per Service, for all its ports' flows
        raise ValueError(f"service {svc.key}: clusterIP {vip!r} is not an IPv4 address")
    owner = svc.owner
    for i, (sp, ep, gid) in enumerate(zip(svc.ports, eps, gids, strict=True)):
        shape = _lb_shape(sp.protocol, pipeline)
        if not ep:
            # No endpoint: the agent answers (TCP RST, ICMP port unreachable) as
            # kube-proxy does, instead of letting the client time out (controller.reject).
            flows.append(shape.flow(vip, sp.port, Controller(), owner))
            continue
        groups += port_groups(gid, sub_gids[i] if sub_gids else [], ep, owner, pipeline,
                              checked)
        flows.append(shape.flow(vip, sp.port, GroupAction(gid), owner))
    return flows, groups


class ServiceProxy:
    """Services and the pods they select -> each Service's flows and groups.

    Pure like the policy engine: fed datastore changes, it returns only the
    owners (Services) whose flows or groups changed, so one Service change
    touches its own flows and groups and nothing else.
    """

    def __init__(self, pipeline: Pipeline = DEFAULT, slices: bool = False,
                 local_cidr: str | None = None,
                 node_port_range: tuple[int, int] = NODE_PORT_RANGE) -> None:
        """slices: endpoints come from EndpointSlices (the Kubernetes datastore, where
        the EndpointSlice controller writes them); otherwise from the pods each
        Service selects (the embedded store, where the agent plays that
        controller). A Service without a selector always uses slices.
        local_cidr: this node's pod CIDR (endpoints in it are local, for the
        Local traffic policies).
        node_port_range: node ports outside it are refused (the embedded store's
        cluster setting; a Kubernetes API server has checked its own)."""
        self.pipeline = pipeline
        self.node_port_range = node_port_range
        self.local_cidr = ipaddress.IPv4Network(local_cidr) if local_cidr else None
        self.extra_gids: dict[str, dict[str, int]] = {}  # service key -> group name -> gid
        # service key -> its endpoints on this node (hairpin flows, flows.hairpin)
        self.local_ips: dict[str, frozenset[str]] = {}
        self.hairpin_ips: frozenset[str] = frozenset()
        self.use_slices = slices
        self.services: dict[str, Service] = {}
        self.pods: dict[str, ProxyPod] = {}
        self.slices: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []  # drained into the problems load/apply return
        self.gids: dict[int, str] = {}          # group id -> "ns/name/index"
        self.svc_gids: dict[str, dict[int, int]] = {}  # service key -> port index -> gid
        # (namespace, label, value) -> pod key -> pod: a selector's pods without a
        # scan. Built on the first selector-based endpoint lookup, not before: with
        # no Service (or endpoints from slices) it was 2 MB at 10,000 pods for nothing.
        self._by_label: dict[tuple[str, str, str], dict[str, ProxyPod]] | None = None
        self.built: dict[str, tuple[list[Flow], list[Group]]] = {}
        # service key -> (what its flows and groups are computed from, them): a
        # change that leaves a Service's inputs as they were costs no rebuild.
        self._inputs: dict[str, tuple[int, tuple[list[Flow], list[Group]]]] = {}
        self.sub_gids: dict[str, dict[tuple[int, int], int]] = {}  # key -> (port, j) -> gid
        self.stale: list[StaleUDP] = []  # drained by take_stale
        # A node port is one Service's: (PROTOCOL, port) -> the Service key holding it,
        # the ports each key holds, and the keys refused a port, rebuilt when it is let
        # go (_claim_node_ports). An API server never lets two Services ask for one;
        # a direct store write, or two tenant Services of one tenant, can.
        self.np_holder: dict[tuple[str, int], str] = {}
        self._np_held: dict[str, set[tuple[str, int]]] = {}
        self._np_waiting: dict[tuple[str, int], set[str]] = {}
        self._np_released: set[tuple[str, int]] = set()

    def _claim_node_ports(self, key: str, svc: Service | None) -> Service | None:
        """svc as it is built: without the node ports another Service of this proxy
        holds (each refusal a warning naming spec.ports[i].nodePort). The holder keeps
        a port until it lets it go; the ports key no longer asks for are let go."""
        want: set[tuple[str, int]] = set()
        if svc is not None and svc.exposure.node_ports.count(None) != len(svc.ports):
            want = {(sp.protocol, np) for sp, np in zip(svc.ports, svc.exposure.node_ports,
                                                        strict=True) if np is not None}
        held = self._np_held.pop(key, None)
        if held:
            for k in held - want:
                del self.np_holder[k]
                self._np_released.add(k)
        if not want or svc is None:
            return svc
        nps = list(svc.exposure.node_ports)
        mine: set[tuple[str, int]] = set()
        for i, (sp, np) in enumerate(zip(svc.ports, nps, strict=True)):
            if np is None:
                continue
            k = (sp.protocol, np)
            holder = self.np_holder.setdefault(k, key)
            if holder == key:
                mine.add(k)
                continue
            nps[i] = None
            self._np_waiting.setdefault(k, set()).add(key)
            self.warnings.append(f"service {key}: spec.ports[{i}].nodePort: {np}/"
                                 f"{sp.protocol} is already service {holder}'s")
        self._np_held[key] = mine
        if len(mine) == len(want):
            return svc
        return replace(svc, exposure=replace(svc.exposure, node_ports=tuple(nps)))

    def _gid(self, pk: str, have: dict[Any, int], slot: Any) -> int:
        if slot not in have:
            have[slot] = group_id_for(pk, self.gids)
            self.gids[have[slot]] = pk
        return have[slot]

    def _build(self, key: str) -> tuple[list[Flow], list[Group]]:
        svc = self._claim_node_ports(key, self.services.get(key))
        mine = self.svc_gids.setdefault(key, {})
        subs = self.sub_gids.setdefault(key, {})
        for i in [i for i in mine if svc is None or i >= len(svc.ports)]:
            del self.gids[mine.pop(i)]
        if svc is None:
            for g in subs.values():
                del self.gids[g]
            del self.svc_gids[key], self.sub_gids[key]
            self._inputs.pop(key, None)
            self.local_ips.pop(key, None)
            for gid in self.extra_gids.pop(key, {}).values():
                del self.gids[gid]
            return [], []
        gids = [self._gid(f"{key}/{i}", mine, i) for i in range(len(svc.ports))]
        eps = self.port_endpoints(svc)
        sub_gids: list[list[int]] = []
        for i, (sp, ep) in enumerate(zip(svc.ports, eps, strict=True)):
            if len(ep) <= MAX_BUCKETS:  # one group (split_sizes), no sub-group
                sub_gids.append([])
                continue
            n_sub = len(split_sizes(len(ep)))
            sub_gids.append([self._gid(f"{key}/{i}/{j}", subs, (i, j)) for j in range(n_sub)])
            if len(ep) > MAX_ENDPOINTS:
                self.warnings.append(f"service {key} port {sp.port}/{sp.protocol}: {len(ep)} "
                                     f"endpoints, only the first {MAX_ENDPOINTS} programmed")
        if subs:
            for slot in [s for s in subs
                         if s[0] >= len(sub_gids) or s[1] >= len(sub_gids[s[0]])]:
                del self.gids[subs.pop(slot)]
        # A content hash, not the inputs themselves: holding every Service's
        # endpoint lists would cost more than the flows (a 64-bit hash; a
        # collision, 2**-64 per change, would only skip one rebuild).
        digest = hash((svc, tuple(map(tuple, eps)), tuple(gids),
                       tuple(map(tuple, sub_gids))))
        cached = self._inputs.get(key)
        if cached is not None and cached[0] == digest:
            return cached[1]
        out = self._build_exposed(key, svc, eps, gids, sub_gids)
        self._inputs[key] = (digest, out)
        return out

    def _extra_gid(self, key: str, name: str, keep: set[str]) -> int:
        keep.add(name)
        return self._gid(f"{key}/{name}", self.extra_gids.setdefault(key, {}), name)

    def _build_exposed(self, key: str, svc: Service, eps: list[list[tuple[str, int]]],
                       gids: list[int], sub_gids: list[list[int]]
                       ) -> tuple[list[Flow], list[Group]]:
        """The ClusterIP's flows and groups (this node's endpoints only with
        internalTrafficPolicy Local), plus node ports and external IPs (flows.nodeport).

        Only the cluster-wide endpoint lists are split across chained groups
        (sub_gids); one node's own endpoints are capped at one group's worth."""
        ex = svc.exposure
        cidr = self.local_cidr
        if cidr is None:  # no endpoint is this node's
            local: list[list[tuple[str, int]]] = [[] for _ in eps] if (
                ex.internal_local or ex.external_local) else []  # [] never read
            mine: frozenset[str] = frozenset()
        else:  # each address checked once, not once per port
            here = {ip for ep in eps for ip, _ in ep if is_local(ip, cidr)}
            local = [[e for e in ep if e[0] in here][:MAX_BUCKETS] if here else []
                     for ep in eps]
            mine = frozenset(ip for ep in local for ip, _ in ep)
        if mine:
            self.local_ips[key] = mine
        else:  # most Services on a node have no endpoint there: no empty set each
            self.local_ips.pop(key, None)
        main = local if ex.internal_local else eps
        flows, groups = service_flows(svc, main, gids, self.pipeline,
                                      None if ex.internal_local else sub_gids, checked=True)
        if ex.internal_local:  # no local endpoint: drop, as kube-proxy does
            flows = [Flow.with_match(f, [], pipeline=self.pipeline)
                     if any(isinstance(a, Controller) for a in f.actions) else f for f in flows]
        keep: set[str] = set()
        if svc.cluster_ip is not None and (ex.external_ips or ex.lb_ips or (
                ex.node_ports.count(None) != len(ex.node_ports))):  # entry IPs or node ports
            ext = local if ex.external_local else eps
            targets: list[tuple[int | None, bool]] = []
            for i, (ep, m) in enumerate(zip(ext, main, strict=True)):
                gid = gids[i]
                if ep != m:
                    gid = self._extra_gid(key, f"{i}/ext", keep)
                    if ep:
                        groups.append(Group.dnat_select(gid, ep, ct_table=EGRESS_POLICY,
                                                        owner=svc.owner, table="ServiceLB",
                                                        pipeline=self.pipeline, checked=True))
                targets.append((gid, bool(ep)))
            flows += entry_flows(svc.owner, ex, svc.ports, targets, self.pipeline)
        extra = self.extra_gids.get(key)
        if extra:
            for name in [n for n in extra if n not in keep]:
                del self.gids[extra.pop(name)]
        if ex.affinity_timeout is not None:
            flows, groups = with_affinity(flows, groups, ex.affinity_timeout, self.pipeline)
        return flows, groups

    def port_endpoints(self, svc: Service) -> list[list[tuple[str, int]]]:
        """Each port's (IP, port) endpoints, in one pass over the selected pods."""
        if self.use_slices or svc.selector is None:
            return [slice_endpoints(svc, sp, self.slices.values()) for sp in svc.ports]
        sel, ns = svc.selector, svc.namespace
        pods: Iterable[ProxyPod]
        if len(sel) == 1:
            pods = self.by_label.get((ns, *sel[0]), _NO_PODS).values()
        else:  # pods carrying every selector label: the smallest member set, checked
            members = sorted((self.by_label.get((ns, k, v), _NO_PODS) for k, v in sel),
                             key=len)
            pods = [p for key, p in members[0].items() if all(key in m for m in members[1:])]
        chosen = [p for p in pods if p.ip]
        ips: list[str] | None = None  # every address, sorted once for the numbered ports
        res: list[list[tuple[str, int]]] = []
        for sp in svc.ports:
            target = sp.target
            if isinstance(target, int):
                if ips is None:
                    ips = sorted({p.ip for p in chosen})
                res.append([(ip, target) for ip in ips])
                continue
            out: set[tuple[str, int]] = set()
            for p in chosen:
                for name, n, proto in p.ports:
                    if name == target and proto == sp.protocol:
                        out.add((p.ip, n))
                        break
            res.append(sorted(out))
        return res

    def endpoints(self, svc: Service, sp: ServicePort) -> list[tuple[str, int]]:
        return self.port_endpoints(svc)[svc.ports.index(sp)]

    def _set_pod(self, key: str, pod: ProxyPod | None) -> ProxyPod | None:
        """Put (or with None remove) a pod, keeping the indexes built so far; the old one."""
        old = self.pods.pop(key, None)
        by_label = self._by_label
        if old is not None:
            if by_label is not None:
                for k, v in old.labels.items():
                    by_label.get((old.namespace, k, v), {}).pop(key, None)
        if pod is not None:
            self.pods[key] = pod
            if by_label is not None:
                for k, v in pod.labels.items():
                    by_label.setdefault((pod.namespace, k, v), {})[key] = pod
        return old

    @property
    def by_label(self) -> dict[tuple[str, str, str], dict[str, ProxyPod]]:
        """The label index ((namespace, label, value) -> the pods carrying it, by key),
        built from the pods on first use and kept in step after."""
        if self._by_label is None:
            idx: dict[tuple[str, str, str], dict[str, ProxyPod]] = {}
            for key, pod in self.pods.items():
                for k, v in pod.labels.items():
                    members = idx.get((pod.namespace, k, v))
                    if members is None:  # (not setdefault: a new dict per call)
                        members = idx[(pod.namespace, k, v)] = {}
                    members[key] = pod
            self._by_label = idx
        return self._by_label

    @staticmethod
    def _slice_service(body: dict[str, Any] | None) -> str | None:
        name = ((body or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        return f"{(body or {}).get('namespace')}/{name}" if name else None

    def _recompute(self, keys: Iterable[str]) -> tuple[dict[str, list[Flow]],
                                                        dict[str, list[Group]]]:
        with gc_paused():
            return self._recompute_all(keys)

    def _recompute_all(self, keys: Iterable[str]) -> tuple[dict[str, list[Flow]],
                                                            dict[str, list[Group]]]:
        flows: dict[str, list[Flow]] = {}
        groups: dict[str, list[Group]] = {}
        todo = sorted(set(keys))
        while todo:
            for key in todo:
                new = self._build(key)
                old = self.built.get(key, ([], []))
                if old is new or old == new:
                    continue
                if new == ([], []):
                    self.built.pop(key, None)
                else:
                    self.built[key] = new
                self.stale += stale_udp(old, new)
                owner = service_owner(key)
                flows[owner], groups[owner] = new
            # Services refused a node port that was let go in this pass: built again
            released, self._np_released = self._np_released, set()
            todo = sorted({w for k in released for w in self._np_waiting.pop(k, ())
                           if w in self.services})
        hairpin = frozenset().union(*self.local_ips.values())
        if hairpin != self.hairpin_ips:
            self.hairpin_ips = hairpin
            flows[HAIRPIN_OWNER] = hairpin_flows(hairpin, self.pipeline) if hairpin else []
        return flows, groups

    def take_stale(self) -> list[StaleUDP]:
        """UDP endpoints removed since the last call: their conntrack entries must go
        once the new groups are installed (controller.svcconntrack)."""
        out, self.stale = self.stale, []
        return out

    def load(self, services: list[dict[str, Any]], pods: list[dict[str, Any]],
             slices: Iterable[dict[str, Any]] = ()
             ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]], list[str]]:
        """Initial state: (flows by owner, groups by owner, problems).

        What it builds lives as long as the agent: handed to the collector's
        oldest generation (gc_paused(promote=True)) instead of being scanned
        by the first young collection after the build (0.4 s at 10,000
        Services x 10 endpoints, a fifth of the build)."""
        with gc_paused(promote=True):
            return self._load(services, pods, slices)

    def _load(self, services: list[dict[str, Any]], pods: list[dict[str, Any]],
              slices: Iterable[dict[str, Any]]
              ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]], list[str]]:
        problems: list[str] = []
        for sl in slices:
            self.slices[f"{sl.get('namespace')}/{sl.get('name')}"] = sl
        memo = PodMemo()
        have = self.pods
        # With no index built yet (a first load), a new pod only goes into self.pods.
        # Bodies that are no pod are skipped: the policy engine reports them.
        generic = self._by_label is not None
        for key, p in proxy_pods(pods, memo, self.warnings):
            if generic or key in have:
                self._set_pod(key, p)
            else:
                have[key] = p
        for b in services:
            self._put_service(b, problems)
        flows, groups = self._recompute(self.services)
        problems += self.warnings
        self.warnings = []
        return flows, groups, problems

    def _put_service(self, b: dict[str, Any], problems: list[str]) -> None:
        key = f"{b.get('namespace')}/{b.get('name')}"
        try:
            self.services[key] = parse_service(b["namespace"], b["name"], b.get("spec"),
                                               b.get("status"), self.node_port_range)
        except (ServiceError, KeyError) as e:
            self.services.pop(key, None)
            problems.append(f"service {key}: {e}")

    def apply(self, changes: Iterable[Any]
              ) -> tuple[dict[str, list[Flow]], dict[str, list[Group]], list[str]]:
        """Datastore changes (store.Change) -> (changed owners' flows, their groups, problems)."""
        problems: list[str] = []
        touched: set[str] = set()
        memo = PodMemo()
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
                got = (next(proxy_pods((c.body,), memo, self.warnings), None)
                       if c.op == "put" and c.body else None)
                new = got[1] if got is not None else None
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
                ex = svc.exposure
                ports.append({"name": sp.name, "protocol": sp.protocol, "port": sp.port,
                              "endpoints": [f"{ip}:{n}" for ip, n in self.endpoints(svc, sp)],
                              "group": by_key.get(f"{key}/{i}"),
                              "subgroups": sorted(g for (pi, _), g in
                                                  self.sub_gids.get(key, {}).items()
                                                  if pi == i),
                              "nodePort": ex.node_ports[i] if ex.node_ports else None,
                              "externalGroup": self.extra_gids.get(key, {}).get(f"{i}/ext")})
            ex = svc.exposure
            out.append({"service": key, "clusterIP": svc.cluster_ip, "ports": ports,
                        "type": ex.type, "externalIPs": list(ex.external_ips),
                        "loadBalancerIPs": list(ex.lb_ips),
                        "externalTrafficPolicy": "Local" if ex.external_local else "Cluster",
                        "internalTrafficPolicy": "Local" if ex.internal_local else "Cluster",
                        "sessionAffinityTimeout": ex.affinity_timeout})
        return out


    def health_checks(self) -> dict[int, tuple[str, int]]:
        """healthCheckNodePort -> (Service key, its endpoints on this node), for each
        LoadBalancer Service with externalTrafficPolicy Local that has one: what a
        load balancer asks each node (controller/healthcheck.py)."""
        return {svc.exposure.health_check_node_port: (key, len(self.local_ips.get(key, ())))
                for key, svc in self.services.items()
                if svc.exposure.health_check_node_port is not None}

    def host_view(self) -> tuple[list[HostEntry], list[str]]:
        """What the node's own stack needs (controller.hostnet): the node ports and
        external IPs to steer into br-int, and the addresses to route to the gateway
        (every ClusterIP, for host-network clients, and every external IP)."""
        entries: list[HostEntry] = []
        ips: set[str] = set()
        holder = self.np_holder
        for key, svc in self.services.items():
            if svc.cluster_ip is None:
                continue
            ips.add(svc.cluster_ip)
            ex = svc.exposure
            ips.update(ex.entry_ips)
            if any(np is not None and holder.get((sp.protocol, np)) != key
                   for sp, np in zip(svc.ports, ex.node_ports, strict=True)):
                ex = replace(ex, node_ports=tuple(  # without those another Service holds
                    np if np is not None and holder.get((sp.protocol, np)) == key else None
                    for sp, np in zip(svc.ports, ex.node_ports, strict=True)))
            entries += host_entries(ex, svc.ports)
        return sorted(set(entries), key=lambda e: (e.ip, e.protocol, e.port)), sorted(ips)


# -- stale UDP conntrack -------------------------------------------------------------------
#
# A UDP "connection" never ends: a client that keeps one source port keeps
# its conntrack entry, DNATed to the endpoint it first got, for as long as it
# sends (the entry's timeout restarts with every datagram). When that endpoint
# goes away the entry must go too, or the client keeps sending to nobody; the
# next datagram then misses conntrack, is new, and picks a remaining endpoint.
# TCP entries are left alone: a connection to a gone endpoint fails on its
# own, and those to remaining endpoints must not be disturbed.


@dataclass(frozen=True)
class StaleUDP:
    """The conntrack entries of connections to cluster_ip:port that were DNATed to
    endpoint:endpoint_port; endpoint "" (and port 0): every entry of that ClusterIP
    and port (it has no endpoint left: one flush instead of one per endpoint), and
    `gone` then lists the endpoints it had (their node-port SNATs are flushed by
    endpoint: controller.svcconntrack)."""

    cluster_ip: str
    port: int
    endpoint: str = ""
    endpoint_port: int = 0
    gone: tuple[tuple[str, int], ...] = ()

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """The (address, port) endpoints whose entries are stale."""
        return ((self.endpoint, self.endpoint_port),) if self.endpoint else self.gone


def udp_endpoints(built: tuple[list[Flow], list[Group]]) -> dict[tuple[str, int],
                                                                  set[tuple[str, int]]]:
    """(ClusterIP, UDP port) -> the endpoints its group (and sub-groups) DNAT to."""
    flows, groups = built
    by_id = {g.group_id: g for g in groups}

    def reach(gid: int, seen: set[int]) -> set[tuple[str, int]]:
        out: set[tuple[str, int]] = set()
        if gid in seen or gid not in by_id:
            return out
        seen.add(gid)
        for bucket in by_id[gid].buckets:
            for a in bucket:
                if isinstance(a, CT) and a.nat:
                    ip, _, port = a.nat.rpartition(":")
                    out.add((ip, int(port)))
                elif isinstance(a, GroupAction):
                    out |= reach(a.group_id, seen)
        return out

    eps: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for f in flows:
        m = dict(f.match)
        if "udp_dst" not in m:
            continue
        key = (str(m["ipv4_dst"]), int(m["udp_dst"]))  # type: ignore[arg-type]
        for a in f.actions:
            if isinstance(a, GroupAction):
                eps.setdefault(key, set()).update(reach(a.group_id, set()))
            elif isinstance(a, CT) and a.nat:  # sessionAffinity: the DNAT is in the flow
                ip, _, port = a.nat.rpartition(":")
                eps.setdefault(key, set()).add((ip, int(port)))
    return eps


def stale_udp(old: tuple[list[Flow], list[Group]],
              new: tuple[list[Flow], list[Group]]) -> list[StaleUDP]:
    """Endpoints a Service's UDP ports had in `old` and no longer have in `new`."""
    if not old[0]:  # a new Service (every Service at load): nothing to look through
        return []
    before = udp_endpoints(old)
    if not before:
        return []
    after = udp_endpoints(new)
    out = []
    for (vip, port), eps in sorted(before.items()):
        left = after.get((vip, port), set())
        if not left:
            out.append(StaleUDP(vip, port, gone=tuple(sorted(eps))))
        else:
            out += [StaleUDP(vip, port, ip, n) for ip, n in sorted(eps - left)]
    return out
