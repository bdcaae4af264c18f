"""Kubernetes NetworkPolicy: parsing, selection, and the flows that enforce it.

A rule allows traffic between the pods its policy selects and a set of peers
on a set of ports. Enforcing it with one flow per (pod, peer, port) grows
with their product; here each rule is a conjunction of up to three clauses,
so it costs |selected| + |peers| + |ports| + 1 flows, and a match flow used by
several rules (the same peer address, the same port) is one flow carrying
several conjunction actions.

Egress rules are enforced where the selected (source) pod lives, ingress
rules where the selected (destination) pod lives, so a connection is checked
on every node it crosses. Replies and related traffic of allowed connections
skip the rules through conntrack. Conntrack is always on: switching it on
only while some local pod is isolated saved a recirculation on nodes without
policy, but the userspace datapath kept megaflows translated while it was off
(a SYN forwarded without ct commit, so its SYN-ACK was invalid; an egress
deny not applied) for seconds after it came back on.

The engine is incremental: a change to a pod, a namespace or a policy
recomputes only the rules it can affect, edits only the clause flows of the
addresses and ports a conjunction gains or loses, and returns only the flows
whose content changed, keyed by owner, for one atomic bundle.
"""

from __future__ import annotations

import ipaddress
import itertools
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flowcni.flows.cookie import Feature
from flowcni.flows.model import (
    CT,
    Conjunction,
    Flow,
    Match,
    MatchOwner,
    MatchValue,
    OwnerKey,
    plain_ipv4,
)
from flowcni.flows.tables import DEFAULT, Pipeline

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
DIRS = ("ingress", "egress")

PRIO_CT_ESTABLISHED = 210
PRIO_ALLOW = 201   # single-clause rules: a direct allow, above any conjunction
PRIO_CONJ = 200
PRIO_ISOLATE = 200
CONNTRACK_OWNER = "conntrack"


class PolicyError(ValueError):
    """Invalid NetworkPolicy; the message names the field."""


# -- model -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selector:
    """A Kubernetes label selector; the empty selector selects everything."""

    labels: tuple[tuple[str, str], ...] = ()
    exprs: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.labels:
            if labels.get(k) != v:
                return False
        for k, op, values in self.exprs:
            has = k in labels
            if op == "In" and not (has and labels[k] in values):
                return False
            if op == "NotIn" and has and labels[k] in values:
                return False
            if op == "Exists" and not has:
                return False
            if op == "DoesNotExist" and has:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Peer:
    pods: Selector | None = None        # None with namespaces set: all pods there
    namespaces: Selector | None = None  # None: the policy's own namespace
    # ipBlock, minus its excepts; a single host as its bare address ("10.0.0.1"),
    # the form a pod's address and a flow's match have, so one address is one
    # string and one clause flow whichever peer it came from
    cidrs: tuple[str, ...] = ()

    @property
    def is_ipblock(self) -> bool:
        # Not bool(cidrs): an ipBlock whose excepts cover it has no addresses
        # left and must allow nothing, not pass for a peer of every pod.
        return self.pods is None and self.namespaces is None


@dataclass(frozen=True, slots=True)
class PortSpec:
    protocol: str              # TCP | UDP | SCTP
    port: int | str | None     # number, name, or None (every port)
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    key: str                          # ns/name/direction/index
    direction: str
    peers: tuple[Peer, ...] | None    # None: every peer
    ports: tuple[PortSpec, ...] | None  # None: every port and protocol


@dataclass(frozen=True, slots=True)
class Policy:
    namespace: str
    name: str
    selector: Selector
    types: frozenset[str]
    rules: tuple[Rule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    labels: dict[str, str] = field(hash=False, compare=True)
    ip: str = ""
    node: str = ""
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, number, protocol)

    @property
    def key(self) -> str:
        # Interned: the engines store a pod's key in 3-4 dicts and sets each (by
        # namespace, local, by label...), and each call made a new string: 40,000
        # copies at 10,000 pods. Interned, every place shares one (freed with it).
        return sys.intern(f"{self.namespace}/{self.name}")


def _own(s: Any) -> Any:
    """A string of our own (shared with equal ones), not one inside the body it came in.

    An agent's initial list is 50 MB of bodies at 10,000 pods, freed once
    loaded; a pod's name or address kept from them pins the allocator's
    arena it sits in, and most of that memory was never given back.
    """
    return sys.intern(s.encode().decode()) if type(s) is str else s


class Labels(dict[str, str]):
    """A pod's labels, one dict shared by every PodInfo with the same ones: never mutated."""

    __slots__ = ("__weakref__",)


# The label sets in use, each held once. Pods of one workload share theirs, and the
# policy, cluster-policy and Service engines each keep a PodInfo per pod: at 10,000
# pods the agent held 30,000 label dicts (5.2 MB traced); weak, so a set goes with
# its last pod.
_LABELS: weakref.WeakValueDictionary[tuple[tuple[Any, Any], ...], Labels] = (
    weakref.WeakValueDictionary())


def _shared_labels(raw: Any) -> dict[str, str]:
    pairs = [(_own(k), _own(v)) for k, v in (raw or {}).items()]
    if not all(type(k) is str and type(v) is str for k, v in pairs):
        return dict(pairs)  # not shared (nor hashable, maybe): the engines report it
    items = tuple(sorted(pairs))
    labels = _LABELS.get(items)
    if labels is None:
        labels = _LABELS.setdefault(items, Labels(items))
    return labels


# PodInfo's slot setters: what its frozen __init__ does, minus the per-field
# object.__setattr__ (a third of a pod's parse; 100,000 pods at 10,000 Services).
_POD_SLOTS = tuple(PodInfo.__dict__[f].__set__
                   for f in ("namespace", "name", "labels", "ip", "node", "ports"))


def pod_from_body(b: dict[str, Any], shared: dict[Any, Any] | None = None) -> PodInfo:
    """A pod's body -> PodInfo, with strings of its own (see _own).

    `shared`: a memo for a bulk load. Namespaces, nodes, label sets and port
    lists repeat across pods (a Deployment's pods carry the same ones), so
    each distinct one is made once and then shared: at 100,000 pods that is
    30 MB less and a third less time. Names and addresses are each pod's own.
    Label sets are also shared across loads and engines (_shared_labels); the
    memo only saves looking them up. Nothing changes a PodInfo's labels after
    this, so sharing the dict is safe.
    """
    memo: dict[Any, Any] = {} if shared is None else shared
    raw_ports = b.get("ports")
    ports: tuple[tuple[str, int, str], ...] = ()
    if raw_ports:
        ports = tuple((str(p.get("name", "")), int(p["containerPort"]),
                       str(p.get("protocol", "TCP")).upper())
                      for p in raw_ports if p.get("containerPort"))
        ports = memo.setdefault(("ports", ports), ports)
    raw = b.get("labels")
    labels: dict[str, str] = {}
    if raw:
        try:  # keyed by the body's own items: equal to the owned ones, no copy on a hit
            key: tuple[Any, ...] | None = ("labels", *raw.items())
            hit = memo.get(key)
        except TypeError:  # a value that is no string (not hashable): this pod's own
            key = hit = None
        if hit is None:  # one dict per distinct label set, across engines (_LABELS)
            hit = _shared_labels(raw)
            if key is not None:
                memo[key] = hit
        labels = hit
    pod = object.__new__(PodInfo)
    ns, name, ip, node = _SET_NS, _SET_NAME, _SET_IP, _SET_NODE
    ns(pod, _shared(memo, b["namespace"]))
    name(pod, _own(b["name"]))
    _SET_LABELS(pod, labels)
    ip(pod, _own(b.get("ip") or ""))
    node(pod, _shared(memo, b.get("node") or ""))
    _SET_PORTS(pod, ports)
    return pod


_SET_NS, _SET_NAME, _SET_LABELS, _SET_IP, _SET_NODE, _SET_PORTS = _POD_SLOTS


def _shared(memo: dict[Any, Any], s: Any) -> Any:
    """_own(s), made once per distinct string in `memo`."""
    if type(s) is not str:
        return s
    hit = memo.get(s)
    if hit is None:
        hit = memo[s] = _own(s)
    return hit


# -- parsing ------------------------------------------------------------------------


def _selector(v: Any, where: str) -> Selector:
    if v is None:
        return Selector()
    if not isinstance(v, dict):
        raise PolicyError(f"{where}: must be a label selector")
    ml = v.get("matchLabels") or {}
    if not isinstance(ml, dict):
        raise PolicyError(f"{where}.matchLabels: must be a map")
    exprs = []
    for i, e in enumerate(v.get("matchExpressions") or []):
        w = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str):
            raise PolicyError(f"{w}.key: required")
        op = e.get("operator")
        if op not in OPERATORS:
            raise PolicyError(f"{w}.operator: {op!r} is not one of {', '.join(OPERATORS)}")
        values = e.get("values") or []
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{w}.values: required for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{w}.values: must be empty for {op}")
        exprs.append((_own(e["key"]), _own(op), tuple(_own(str(x)) for x in values)))
    return Selector(tuple(sorted((_own(str(k)), _own(str(x))) for k, x in ml.items())),
                    tuple(exprs))


def _ipblock(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, dict) or "cidr" not in v:
        raise PolicyError(f"{where}.cidr: required")
    cidr = v["cidr"]
    if (isinstance(cidr, str) and cidr.endswith("/32") and not v.get("except")
            and plain_ipv4(cidr[:-3])):
        return (cidr[:-3],)  # one host: what the general path gives, without ipaddress
    try:
        block = ipaddress.ip_network(v["cidr"], strict=False)
    except ValueError as e:
        raise PolicyError(f"{where}.cidr: {v['cidr']!r} is not a CIDR") from e
    if block.version != 4:
        raise PolicyError(f"{where}.cidr: only IPv4 is supported")
    nets = [block]
    for i, x in enumerate(v.get("except") or []):
        try:
            ex = ipaddress.ip_network(x, strict=False)
        except ValueError as e:
            raise PolicyError(f"{where}.except[{i}]: {x!r} is not a CIDR") from e
        if ex.version != 4 or not ex.subnet_of(block):  # type: ignore[arg-type]
            raise PolicyError(f"{where}.except[{i}]: {x} is outside the block {block}")
        nxt = []
        for n in nets:
            if ex.subnet_of(n):  # type: ignore[arg-type]
                nxt += list(n.address_exclude(ex))  # type: ignore[arg-type]
            elif not n.subnet_of(ex):  # type: ignore[arg-type]
                nxt.append(n)
        nets = nxt
    return tuple(str(n.network_address) if n.prefixlen == 32 else str(n) for n in sorted(nets))


def _peer(v: Any, where: str) -> Peer:
    if not isinstance(v, dict) or not v:
        raise PolicyError(f"{where}: must set podSelector, namespaceSelector or ipBlock")
    if "ipBlock" in v:
        if len(v) > 1:
            raise PolicyError(f"{where}: ipBlock cannot be combined with selectors")
        return Peer(cidrs=_ipblock(v["ipBlock"], f"{where}.ipBlock"))
    pods = _selector(v["podSelector"], f"{where}.podSelector") if "podSelector" in v else None
    nss = (_selector(v["namespaceSelector"], f"{where}.namespaceSelector")
           if "namespaceSelector" in v else None)
    return Peer(pods=pods if pods is not None else None if nss is not None else Selector(),
                namespaces=nss)


def _port(v: Any, where: str) -> PortSpec:
    if not isinstance(v, dict):
        raise PolicyError(f"{where}: must be a map")
    proto = str(v.get("protocol", "TCP"))
    if proto not in PROTOCOLS:
        raise PolicyError(f"{where}.protocol: {proto!r} is not TCP, UDP or SCTP")
    port = v.get("port")
    end = v.get("endPort")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or (port is not None and not isinstance(port, (int, str))):
        raise PolicyError(f"{where}.port: must be a number or a name")
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise PolicyError(f"{where}.port: {port} out of range 1..65535")
    if isinstance(port, str) and not (0 < len(port) <= 15):
        raise PolicyError(f"{where}.port: {port!r} is not a port name")
    if end is not None:
        if not isinstance(port, int):
            raise PolicyError(f"{where}.endPort: needs a numeric port")
        if not isinstance(end, int) or not port <= end <= 65535:
            raise PolicyError(f"{where}.endPort: {end!r} must be >= port {port} and <= 65535")
    return PortSpec(_own(proto), _own(port), end)


def _one_ipblock(peers: list[Peer]) -> tuple[Peer, ...]:
    """A rule's ipBlock peers as one peer holding all their addresses, where the first was.

    The same addresses allowed, and one object instead of one per block: an
    allow-list rule of 40 external hosts was 80,000 Peers at 1,000 policies.
    """
    blocks = [pe for pe in peers if pe.is_ipblock]
    if len(blocks) < 2:
        return tuple(peers)
    one = Peer(cidrs=tuple(dict.fromkeys(a for pe in blocks for a in pe.cidrs)))
    first = peers.index(blocks[0])
    return tuple(one if i == first else pe for i, pe in enumerate(peers)
                 if i == first or not pe.is_ipblock)


def parse_policy(namespace: str, name: str, spec: Any) -> Policy:
    """A NetworkPolicy spec (camelCase, as in YAML) into the model, or PolicyError."""
    if not isinstance(spec, dict):
        raise PolicyError("spec: required")
    if "podSelector" not in spec:
        raise PolicyError("spec.podSelector: required (use {} to select every pod)")
    sel = _selector(spec["podSelector"], "spec.podSelector")
    types = spec.get("policyTypes")
    if types is None:  # inferred: Ingress always, Egress if egress rules are present
        types = ["Ingress"] + (["Egress"] if spec.get("egress") is not None else [])
    if not isinstance(types, list) or any(t not in ("Ingress", "Egress") for t in types):
        raise PolicyError(f"spec.policyTypes: {types!r} must list Ingress and/or Egress")
    rules: list[Rule] = []
    for d, peer_key in (("ingress", "from"), ("egress", "to")):
        raw = spec.get(d) or []
        if not isinstance(raw, list):
            raise PolicyError(f"spec.{d}: must be a list")
        for i, r in enumerate(raw):
            w = f"spec.{d}[{i}]"
            if r is None:
                r = {}
            if not isinstance(r, dict):
                raise PolicyError(f"{w}: must be a map")
            peers = r.get(peer_key)
            ports = r.get("ports")
            rules.append(Rule(
                f"{namespace}/{name}/{d}/{i}", d,
                None if not peers else _one_ipblock([_peer(p, f"{w}.{peer_key}[{j}]")
                                                     for j, p in enumerate(peers)]),
                None if not ports else tuple(_port(p, f"{w}.ports[{j}]")
                                             for j, p in enumerate(ports))))
    return Policy(_own(namespace), _own(name), sel, frozenset(t.lower() for t in types),
                  tuple(r for r in rules if r.direction in {t.lower() for t in types}))


# -- port resolution ---------------------------------------------------------------


def range_masks(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] as (value, mask) pairs, largest aligned blocks first."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, 0xFFFF & ~(size - 1)))
        lo += size
    return out


PortMatch = tuple[str, int | None, int | None]  # (protocol, value, mask); value None: any port


def resolve_ports(specs: tuple[PortSpec, ...], pod: PodInfo | None) -> frozenset[PortMatch]:
    """Port matches of a rule's ports, naming ports of `pod` (None: numbers only)."""
    out: set[PortMatch] = set()
    for s in specs:
        if s.port is None:
            out.add((s.protocol, None, None))
        elif isinstance(s.port, int):
            if s.end_port is None or s.end_port == s.port:
                out.add((s.protocol, s.port, 0xFFFF))
            else:
                out.update((s.protocol, v, m) for v, m in range_masks(s.port, s.end_port))
        elif pod is not None:
            out.update((s.protocol, num, 0xFFFF) for name, num, proto in pod.ports
                       if name == s.port and proto == s.protocol)
    return frozenset(out)


def port_match(pm: PortMatch) -> dict[str, MatchValue]:
    proto, value, mask = pm
    m: dict[str, MatchValue] = {"eth_type": 0x0800, "ip_proto": PROTOCOLS[proto]}
    if value is not None:
        assert mask is not None
        m[f"{proto.lower()}_dst"] = value if mask == 0xFFFF else (value, mask)
    return m


# -- the world and selection ------------------------------------------------------------


class World:
    """Pods, namespaces and policies, with indexes that make selection cheap."""

    def __init__(self, node: str | None = None) -> None:
        self.pods: dict[str, PodInfo] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.policies: dict[str, Policy] = {}
        self.by_ns: dict[str, set[str]] = defaultdict(set)
        self.policies_by_ns: dict[str, set[str]] = defaultdict(set)
        self._peer_cache: dict[tuple[Peer, str | None], list[PodInfo]] = {}
        self._ip_cache: dict[tuple[Peer, str | None], tuple[str, ...]] = {}
        # rule key -> (the rule, its ipBlock addresses, its pod peers)
        self._rule_parts: dict[str, tuple[Rule, tuple[str, ...], tuple[Peer, ...]]] = {}
        # Pods on `node` by namespace: a rule is realized only for its node's
        # pods, and scanning the namespace's every pod for each of the ~100
        # rules a pod add touches was a third of that change's time.
        self.node = node
        self.local_by_ns: dict[str, set[str]] = defaultdict(set)

    def changed(self) -> None:
        """Pods or namespaces changed: forget memoised peer sets."""
        self._peer_cache.clear()
        self._ip_cache.clear()

    def put_pod(self, p: PodInfo) -> PodInfo | None:
        old = self.del_pod(p.key)
        self.pods[p.key] = p
        self.by_ns[p.namespace].add(p.key)
        if self.node is not None and p.node == self.node:
            self.local_by_ns[p.namespace].add(p.key)
        return old

    def del_pod(self, key: str) -> PodInfo | None:
        self.changed()
        old = self.pods.pop(key, None)
        if old:
            self.by_ns[old.namespace].discard(key)
            self.local_by_ns[old.namespace].discard(key)
        return old

    def put_policy(self, p: Policy) -> Policy | None:
        old = self.policies.get(p.key)
        self.policies[p.key] = p
        self.policies_by_ns[p.namespace].add(p.key)
        return old

    def del_policy(self, key: str) -> Policy | None:
        old = self.policies.pop(key, None)
        if old:
            self.policies_by_ns[old.namespace].discard(key)
            for r in old.rules:
                self._rule_parts.pop(r.key, None)
        return old

    def selected(self, pol: Policy) -> list[PodInfo]:
        return [p for k in self.by_ns.get(pol.namespace, ()) if (p := self.pods[k]).ip
                and pol.selector.matches(p.labels)]

    def selected_on(self, pol: Policy, node: str) -> list[PodInfo]:
        """The pods `pol` selects on `node` (through the local index for the world's node)."""
        if node != self.node:
            return [p for p in self.selected(pol) if p.node == node]
        return [p for k in self.local_by_ns.get(pol.namespace, ()) if (p := self.pods[k]).ip
                and pol.selector.matches(p.labels)]

    def peer_pods(self, peer: Peer, policy_ns: str) -> list[PodInfo]:
        """Pods a peer selects; memoised until the world changes (rules share peers)."""
        if peer.is_ipblock:
            return []
        key = (peer, policy_ns if peer.namespaces is None else None)
        hit = self._peer_cache.get(key)
        if hit is None:
            hit = self._peer_cache[key] = self._peer_pods(peer, policy_ns)
        return hit

    def peer_addresses(self, rule: Rule, policy_ns: str) -> Peers:
        """Every address a rule's peers name: its ipBlocks and the pods they select.

        A pod add realizes about 100 rules of 40 ipBlocks and 500 pod addresses
        each; their ipBlocks are split out once per rule, and the addresses of
        each pod peer once per change. The result holds those tuples as they
        are, shared with every rule naming the same peer (see Peers).
        """
        parts = self._rule_parts.get(rule.key)
        if parts is None or parts[0] is not rule:
            peers = rule.peers or ()
            parts = self._rule_parts[rule.key] = (
                rule, tuple(a for pe in peers for a in pe.cidrs),
                tuple(pe for pe in peers if not pe.is_ipblock))
        chunks = [parts[1]] if parts[1] else []
        for peer in parts[2]:
            key = (peer, policy_ns if peer.namespaces is None else None)
            ips = self._ip_cache.get(key)
            if ips is None:
                ips = self._ip_cache[key] = tuple(p.ip for p in self.peer_pods(peer, policy_ns))
            if ips:
                chunks.append(ips)
        return Peers(tuple(chunks))

    def _peer_pods(self, peer: Peer, policy_ns: str) -> list[PodInfo]:
        if peer.namespaces is None:
            nss: Iterable[str] = [policy_ns]
        else:
            sel = peer.namespaces
            nss = [n for n, labels in self.namespaces.items() if sel.matches(labels)]
        psel = peer.pods or Selector()
        return [p for n in nss for k in self.by_ns.get(n, ()) if (p := self.pods[k]).ip
                and psel.matches(p.labels)]

    def isolated(self, pod: PodInfo, direction: str) -> list[Policy]:
        return [pol for k in self.policies_by_ns.get(pod.namespace, ())
                if direction in (pol := self.policies[k]).types
                and pol.selector.matches(pod.labels)]

    def allows(self, src: PodInfo, dst: PodInfo, protocol: str, port: int) -> bool:
        """Whether policy lets a new connection src -> dst:port/protocol through.

        The Kubernetes semantics evaluated on the objects, not on flows: the
        oracle the datapath tests compare real probes with. Both ends count:
        the destination's ingress policies and the source's egress policies.
        """
        return (self._side_allows(dst, src, dst, "ingress", protocol, port)
                and self._side_allows(src, dst, dst, "egress", protocol, port))

    def _side_allows(self, pod: PodInfo, other: PodInfo, dst: PodInfo, direction: str,
                     protocol: str, port: int) -> bool:
        pols = self.isolated(pod, direction)
        if not pols:
            return True
        return any(self._rule_allows(r, pol, other, dst, protocol, port)
                   for pol in pols for r in pol.rules if r.direction == direction)

    def _rule_allows(self, rule: Rule, pol: Policy, other: PodInfo, dst: PodInfo,
                     protocol: str, port: int) -> bool:
        if rule.ports is not None and not any(
                p == protocol and (v is None or port & (m or 0xFFFF) == v)
                for p, v, m in resolve_ports(rule.ports, dst)):
            return False
        if rule.peers is None:
            return True
        for peer in rule.peers:
            if peer.is_ipblock:
                if other.ip and any(ipaddress.ip_address(other.ip) in
                                    ipaddress.ip_network(c) for c in peer.cidrs):
                    return True
                continue
            ns_ok = (other.namespace == pol.namespace if peer.namespaces is None
                     else peer.namespaces.matches(self.namespaces.get(other.namespace, {})))
            if ns_ok and (peer.pods or Selector()).matches(other.labels):
                return True
        return False


# -- realization ---------------------------------------------------------------------------


class Peers:
    """A conjunction's peer addresses, as the tuples they came in (an address may be in
    more than one): a rule's ipBlock addresses and each pod peer's addresses.

    Not one sorted tuple per conjunction: an egress rule at cluster scale has
    hundreds of peer addresses, and those tuples were 4.7 MB for 1,000 rules,
    most of it the same pod addresses over and over; these tuples are the
    ones World keeps per rule and per peer, shared by every rule naming them.
    (A frozenset's table was four times a tuple: 29 MB.) Compared as sets;
    the few rules a change touches are diffed through sets made on the spot
    (PolicyEngine._recompute_rules).
    """

    __slots__ = ("chunks",)

    def __init__(self, chunks: tuple[tuple[str, ...], ...]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self.chunks)

    def __bool__(self) -> bool:
        return any(self.chunks)

    def distinct(self) -> set[str]:
        return set(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Peers):
            return NotImplemented
        return self.chunks == other.chunks or self.distinct() == other.distinct()

    def __hash__(self) -> int:
        return hash(frozenset(self))

    def __repr__(self) -> str:
        return f"Peers({sorted(self.distinct())})"


@dataclass(frozen=True, slots=True)
class SubRule:
    """One conjunction: selected addresses x peer addresses x port matches (None: any)."""

    rule: str
    direction: str
    selected: frozenset[str]
    peers: Peers | None
    ports: frozenset[PortMatch] | None


def _has_named(specs: tuple[PortSpec, ...] | None) -> bool:
    return specs is not None and any(isinstance(s.port, str) for s in specs)


def realize(rule: Rule, pol: Policy, world: World, node: str) -> list[SubRule]:
    """The conjunctions a rule needs on `node` (named ports split it by resolution).

    Addresses are kept as the flows match them (a bare address for a host),
    so the same address from two peers is one peer, and one clause flow.
    """
    sel = world.selected_on(pol, node)
    if not sel:
        return []
    named = _has_named(rule.ports)
    numeric = None if rule.ports is None else resolve_ports(rule.ports, None)
    if rule.direction == "ingress":
        groups: dict[Any, set[str]] = defaultdict(set)
        peers = None if rule.peers is None else world.peer_addresses(rule, pol.namespace)
        for p in sel:
            ports = resolve_ports(rule.ports, p) if named and rule.ports else numeric
            groups[ports].add(p.ip)
        out = [SubRule(rule.key, "ingress", frozenset(ips), peers, po)
               for po, ips in groups.items()]
    else:
        selected = frozenset(p.ip for p in sel)
        by_ports: dict[Any, set[str]] = defaultdict(set)
        if rule.peers is None:
            if not named:
                return [SubRule(rule.key, "egress", selected, None, numeric)]
            for p in world.pods.values():  # named ports of any pod anywhere: per pod
                if p.ip:
                    by_ports[resolve_ports(rule.ports or (), p)].add(p.ip)
            by_ports[numeric].add("0.0.0.0/0")
        elif not named:
            s = SubRule(rule.key, "egress", selected, world.peer_addresses(rule, pol.namespace),
                        numeric)
            return [s] if s.peers and (s.ports is None or s.ports) else []
        else:
            for peer in rule.peers:
                if peer.is_ipblock:
                    by_ports[numeric].update(peer.cidrs)
                else:
                    for p in world.peer_pods(peer, pol.namespace):
                        by_ports[resolve_ports(rule.ports or (), p)].add(p.ip)
        out = [SubRule(rule.key, "egress", selected, Peers((tuple(peers),)), po)
               for po, peers in by_ports.items()]
    return [s for s in out if (s.peers is None or s.peers) and (s.ports is None or s.ports)]


class _TouchIndex:
    """Which rules can a pod touch: policies and their pod peers, arranged for lookup.

    Built at load and kept: a policy change updates it in place (rebuilding it
    for 1,000 policies took 0.3 s, paid by the first pod change after every
    policy change), and a namespace change forgets only `cross_in`, the one
    part that depends on namespace labels.
    """

    def __init__(self, world: World) -> None:
        self.named_port_rules: set[str] = set()  # every peer, a named port: any pod counts
        self.by_ns: dict[str, list[Policy]] = defaultdict(list)
        self.same_ns: dict[str, list[Peer]] = {}  # rule key -> its same-namespace pod peers
        self.cross: list[tuple[str, Peer]] = []   # (rule key, peer with namespaceSelector)
        self.cross_in: dict[str, list[tuple[str, Peer]]] = {}  # namespace -> cross peers there
        for pol in world.policies.values():
            self.add_policy(pol)

    def add_policy(self, pol: Policy) -> None:
        self.by_ns[pol.namespace].append(pol)
        for r in pol.rules:
            if r.peers is None:
                if r.ports and any(isinstance(s.port, str) for s in r.ports):
                    self.named_port_rules.add(r.key)
                continue
            self.same_ns[r.key] = [pe for pe in r.peers
                                   if not pe.is_ipblock and pe.namespaces is None]
            cross = [(r.key, pe) for pe in r.peers
                     if not pe.is_ipblock and pe.namespaces is not None]
            if cross:
                self.cross += cross
                self.cross_in.clear()  # worked out again per namespace, when asked

    def remove_policy(self, pol: Policy) -> None:
        self.by_ns[pol.namespace] = [p for p in self.by_ns[pol.namespace] if p is not pol]
        keys = {r.key for r in pol.rules}
        self.named_port_rules -= keys
        for k in keys:
            self.same_ns.pop(k, None)
        if any(k in keys for k, _ in self.cross):
            self.cross = [(k, pe) for k, pe in self.cross if k not in keys]
            self.cross_in.clear()


def engine_pod(b: dict[str, Any]) -> PodInfo:
    """A pod as the engine takes it: its address is matched as it is written, so it
    must be an IPv4 address in canonical form (ValueError naming the field)."""
    p = pod_from_body(b)
    if p.ip and not plain_ipv4(p.ip):
        raise ValueError(f"ip: {p.ip!r} is not an IPv4 address")
    return p


# The pending edits of one clause flow in one recomputation, in order: a
# Conjunction adds (or replaces) that id's contribution, an int removes that
# id's. One edit is held bare, more in a list: most clause flows (ipBlock
# addresses) have one contributor, and a list each doubled a load's peak.
_Edits = dict[tuple[str, str], dict[Any, Any]]


def _table(direction: str) -> str:
    return "IngressRule" if direction == "ingress" else "EgressRule"


def _layout(s: SubRule) -> tuple[str, bool, bool]:
    """What fixes a conjunction's clause numbering: same layout, same actions per clause."""
    return (s.direction, s.peers is None, s.ports is None)


def _rule_shape(subs: list[SubRule]) -> list[tuple[str, bool]]:
    """What a rule's own flows (one per conjunction of 2+ clauses) are made of."""
    return [(s.direction, s.peers is not None or s.ports is not None) for s in subs]


def _port_text(pm: PortMatch) -> str:
    proto, value, mask = pm
    return (f"{proto}/{value if value is not None else '*'}"
            + (f"/{mask:#x}" if mask not in (None, 0xFFFF) else ""))


_PROTOCOL_NAMES = {n: p for p, n in PROTOCOLS.items()}


def _port_of(match: Match) -> PortMatch:
    """The port match a clause flow on ports matches (what port_match made it from)."""
    m = dict(match)
    proto = _PROTOCOL_NAMES[m["ip_proto"]]  # type: ignore[index]  # an int: port_match's
    v = m.get(f"{proto.lower()}_dst")
    if isinstance(v, tuple):
        return (proto, v[0], v[1])
    return (proto, None, None) if v is None else (proto, int(v), 0xFFFF)


def _describe_match(field: str) -> Callable[[Match], str]:
    """`match` -> "field=value", the value as the engine wrote it (a port as _port_text)."""
    if field == "port":
        return lambda match: f"port={_port_text(_port_of(match))}"

    def describe(match: Match) -> str:
        for k, v in match:
            if k == field:
                return f"{field}={v}"
        raise ValueError(f"a clause flow on {field} without it: {match}")
    return describe


_MATCH_OWNERS: dict[tuple[str, int, str], MatchOwner] = {}


def _match_owner(table: str, prio: int, field: str) -> MatchOwner:
    """The owner of the clause flows of one table, priority and field: each flow owns
    itself, named "policy-match:TABLE:PRIO:FIELD=VALUE" after the one value it matches.

    A MatchOwner, not a string per flow: there is one clause flow per
    distinct address or port (95,000 at cluster scale) and their names were
    9 MB; the name is made from the flow's match when asked (flowctl, cookies).
    """
    k = (table, prio, field)
    mo = _MATCH_OWNERS.get(k)
    if mo is None:
        mo = _MATCH_OWNERS[k] = MatchOwner(f"policy-match:{table}:{prio}:",
                                           _describe_match(field))
    return mo


def _dims(s: SubRule) -> list[tuple[str, Iterable[Any]]]:
    """(match field, values) of each clause of a conjunction, in clause order."""
    ingress = s.direction == "ingress"
    dims: list[tuple[str, Iterable[Any]]] = [("ipv4_dst" if ingress else "ipv4_src",
                                              s.selected)]
    if s.peers is not None:
        dims.append(("ipv4_src" if ingress else "ipv4_dst", s.peers))
    if s.ports is not None:
        dims.append(("port", s.ports))
    return dims


def _queue(edits: _Edits, table: str, field: str, values: Iterable[Any], op: Any) -> None:
    q = edits.setdefault((table, field), {})
    for v in values:
        cur = q.get(v)
        if cur is None:
            q[v] = op
        elif type(cur) is list:
            cur.append(op)
        else:
            q[v] = [cur, op]


class PolicyEngine:
    """Incremental NetworkPolicy -> flows for one node.

    What it keeps per clause flow (one per distinct address or port match a
    conjunction uses; 100,000 at cluster scale) is the flow itself: a clause
    flow's actions are exactly the conjunctions contributing to it. A dict of
    contributions per flow, a template flow and a key tuple per match were
    80 MB of the engine's 200 MB at that size. A change edits only the clause
    flows of the addresses it adds to or takes from a conjunction.
    """

    SWEEP_MIN = 1024  # shared action tuples kept before the first sweep (_shared_actions)

    def __init__(self, node: str, pipeline: Pipeline = DEFAULT) -> None:
        self.node = node
        self.pipeline = pipeline
        self.world = World(node)
        self.subrules: dict[str, list[SubRule]] = {}         # rule key -> its conjunctions
        self.conj_ids: dict[tuple[str, int], int] = {}      # (rule key, index) -> id
        self.rule_of_conj: dict[int, str] = {}
        self._next_id = 1
        # (table, field) -> value -> the conjunctive clause flow matching field=value
        self._clause_flows: dict[tuple[str, str], dict[Any, Flow]] = {}
        # a conjunction action -> the one-action tuple of every clause flow it alone
        # contributes to (most ipBlock addresses: 80,000 tuples of one otherwise)
        self._single: dict[Conjunction, tuple[Conjunction]] = {}
        # one tuple per distinct set of several contributions, shared by the clause
        # flows that have it (a pod address is in the peer sets of the same rules as
        # the other pods of its namespace and labels: 15,000 tuples of 34 conjunctions
        # on average were 697 distinct ones, 4.5 MB). Keyed by (table, field, the
        # conjunction ids): in one table and field an id has one clause number (ids
        # hash in C; a Conjunction's hash is Python code). Swept by _shared_actions.
        self._shared: dict[tuple[str, str, tuple[int, ...]], tuple[Conjunction, ...]] = {}
        self._shared_swept = 0  # its size after the last sweep
        # (table, field) -> value -> ids of the single-clause rules allowing on it
        self._allows: dict[tuple[str, str], dict[Any, set[int]]] = {}
        self.isolated: dict[str, tuple[bool, bool]] = {}    # local pod key -> (in, out)
        # local pod key -> the address its isolation flows match: a pod deleted, or
        # given a new address, must lose the flows on its old one
        self._isolated_ip: dict[str, str] = {}
        self._touch_index: _TouchIndex | None = None

    # -- flows of one piece ----------------------------------------------------------

    def _conj_id(self, rule: str, i: int) -> int:
        k = (rule, i)
        if k not in self.conj_ids:
            self.conj_ids[k] = self._next_id
            self.rule_of_conj[self._next_id] = rule
            self._next_id += 1
        return self.conj_ids[k]

    def _queue_clauses(self, conj: _Edits, allow: _Edits, s: SubRule, cid: int,
                       values: list[tuple[str, Iterable[Any]]], add: bool) -> None:
        """Queue adding (or removing) conjunction `cid`'s contribution to the clause
        flows of `values` (per clause of `s`, as _dims gives them)."""
        table = _table(s.direction)
        n = len(values)
        for k, (fld, vals) in enumerate(values, 1):
            if n == 1:
                _queue(allow, table, fld, vals, cid if add else -cid)
            else:
                _queue(conj, table, fld, vals, Conjunction(cid, k, n) if add else cid)

    def _new_flow(self, table: str, prio: int, field: str, value: Any,
                  actions: tuple[Conjunction, ...] = ()) -> Flow:
        """A clause flow on field=value, validated and owned by its own match."""
        m = port_match(value) if field == "port" else {field: value}
        goto = None if actions else ("ConntrackCommit" if table == "IngressRule"
                                     else "L3Forwarding")
        f = Flow.make(table, prio, m, actions, goto, feature=Feature.POLICY, owner="",
                      pipeline=self.pipeline)
        return Flow.with_match(f, actions, goto, owner=_match_owner(table, prio, field),
                               pipeline=self.pipeline)

    def _apply_edits(self, conj: _Edits, allow: _Edits, out: dict[OwnerKey, list[Flow]]) -> None:
        """Apply queued edits; put into `out` the clause flows whose content changed.

        Each under its owner's key (the flow's key: a clause flow owns itself),
        made only after every flow is: a load makes 95,000 of these short-lived
        tuples, and made amid the flows (whose match tuples are of their size)
        they left 6 MB of holes among them for good.
        """
        gone: list[Flow] = []
        made: list[Flow] = []
        for (table, fld), q in conj.items():
            flows = self._clause_flows.setdefault((table, fld), {})
            for v, ops in q.items():
                old = flows.get(v)
                acts = {a.id: a for a in old.actions} if old is not None else {}
                for op in (ops if type(ops) is list else (ops,)):
                    if type(op) is int:
                        acts.pop(op, None)
                    else:
                        acts[op.id] = op
                if not acts:
                    if old is not None:
                        del flows[v]
                        gone.append(old)
                    continue
                if len(acts) == 1:  # one tuple per contribution, shared by its flows
                    (act,) = acts.values()
                    actions = self._single.get(act) or self._single.setdefault(act, (act,))
                else:
                    actions = self._shared_actions(table, fld, acts)
                if old is not None and actions == old.actions:
                    continue
                new = (self._new_flow(table, PRIO_CONJ, fld, v, actions) if old is None
                       else Flow.with_match(old, actions, pipeline=self.pipeline))
                flows[v] = new
                made.append(new)
        for (table, fld), q in allow.items():
            ids = self._allows.setdefault((table, fld), {})
            for v, ops in q.items():
                cur = ids.get(v)
                was = bool(cur)
                cur = cur if cur is not None else set()
                for op in (ops if type(ops) is list else (ops,)):
                    if op > 0:
                        cur.add(op)
                    else:
                        cur.discard(-op)
                if cur:
                    ids[v] = cur
                else:
                    ids.pop(v, None)
                if bool(cur) != was:
                    (made if cur else gone).append(self._new_flow(table, PRIO_ALLOW, fld, v))
        for f in gone:
            out[f.key] = []
        for f in made:
            out[f.key] = [f]

    def _shared_actions(self, table: str, fld: str,
                        acts: dict[int, Conjunction]) -> tuple[Conjunction, ...]:
        """The actions of conjunctions `acts` (by id), in id order: one tuple shared by
        every clause flow on `table` and `fld` with the same ones (see _shared).

        An entry whose conjunctions are not these (an id whose clause layout
        changed) is replaced. Tuples no flow holds any more are forgotten by a
        sweep over the clause flows once the table has doubled since the last
        one: rare (the number of distinct sets grows slowly) and paid for by
        the doubling, as a dict's own resizes are.
        """
        ids = tuple(sorted(acts))
        actions = tuple(acts[i] for i in ids)
        key = (table, fld, ids)
        shared = self._shared.get(key)
        if shared is not None and shared == actions:
            return shared
        if shared is None and len(self._shared) >= 2 * self._shared_swept + self.SWEEP_MIN:
            self._shared = {(t, fd, tuple(a.id for a in f.actions)): f.actions
                            for (t, fd), flows in self._clause_flows.items()
                            for f in flows.values() if len(f.actions) > 1}
            self._shared_swept = len(self._shared)
        self._shared[key] = actions
        return actions

    def _rule_flows(self, rule: str) -> list[Flow]:
        out = []
        for i, s in enumerate(self.subrules.get(rule, [])):
            if self._n_dims(s) < 2:
                continue
            table = _table(s.direction)
            nxt = "ConntrackCommit" if s.direction == "ingress" else "L3Forwarding"
            out.append(Flow.make(table, PRIO_CONJ, {"conj_id": self._conj_id(rule, i),
                                                    "eth_type": 0x0800},
                                 goto=nxt, feature=Feature.POLICY, owner=f"rule:{rule}",
                                 pipeline=self.pipeline))
        return out

    @staticmethod
    def _n_dims(s: SubRule) -> int:
        return 1 + (s.peers is not None) + (s.ports is not None)

    def _isolation_flows(self, key: str) -> list[Flow]:
        """The isolation flows of local pod `key` as installed: on the address they
        were made for, which the world may no longer have (deleted, or a new address)."""
        iso = self.isolated.get(key)
        ip = self._isolated_ip.get(key)
        if iso is None or not ip:
            return []
        kw = dict(feature=Feature.POLICY, owner=f"isolation:{key}", pipeline=self.pipeline)
        out = []
        if iso[0]:
            out.append(Flow.make("IngressDefault", PRIO_ISOLATE, {"ipv4_dst": ip}, **kw))
        if iso[1]:
            out.append(Flow.make("EgressDefault", PRIO_ISOLATE, {"ipv4_src": ip}, **kw))
        return out

    def conntrack_flows(self) -> list[Flow]:
        """Conntrack for all IP traffic, whether or not any pod is isolated (see above)."""
        kw = dict(feature=Feature.POLICY, owner=CONNTRACK_OWNER, pipeline=self.pipeline)
        ip = {"eth_type": 0x0800}
        return [
            Flow.make("ConntrackZone", 200, ip, [CT(table="ConntrackState", nat="")],
                      **kw),
            Flow.make("ConntrackState", 200, {**ip, "ct_state": "+inv+trk"}, **kw),
            Flow.make("ConntrackState", 190, {**ip, "ct_state": "-new+trk"},
                      goto="L3Forwarding", **kw),
            Flow.make("IngressRule", PRIO_CT_ESTABLISHED, {**ip, "ct_state": "-new+trk"},
                      goto="ConntrackCommit", **kw),
            Flow.make("ConntrackCommit", 200, {**ip, "ct_state": "+new+trk"},
                      [CT(commit=True)], goto="Output", **kw),
        ]

    # -- recomputation -----------------------------------------------------------------

    def _recompute_rules(self, rules: set[str], out: dict[OwnerKey, list[Flow]]) -> None:
        """Recompute `rules`; put into `out` only the owners whose flows changed.

        A conjunction whose clause layout stays (the usual case: a pod joins
        or leaves a peer set) is edited by difference: only the addresses it
        gains or loses have their clause flow edited. Taking every touched
        rule's clauses out and putting them back (about 50 rules of 500
        addresses for one pod add at 100k flows) was most of a change's time.
        """
        conj: _Edits = {}
        allow: _Edits = {}
        for rk in rules:
            ns, name, _d, _i = rk.split("/")
            pol = self.world.policies.get(f"{ns}/{name}")
            rule = next((r for r in pol.rules if r.key == rk), None) if pol else None
            new = realize(rule, pol, self.world, self.node) if rule and pol else []
            old = self.subrules.get(rk, [])
            if new == old:
                continue  # same conjunctions, same ids: the same clauses and rule flows
            for i in range(max(len(old), len(new))):
                o = old[i] if i < len(old) else None
                n = new[i] if i < len(new) else None
                if o == n:
                    continue
                cid = self._conj_id(rk, i)
                if o is not None and n is not None and _layout(o) == _layout(n):
                    pairs = list(zip(_dims(o), _dims(n), strict=True))
                    self._queue_clauses(conj, allow, o, cid, [
                        (f, set(ov).difference(nv)) for (f, ov), (_, nv) in pairs], add=False)
                    self._queue_clauses(conj, allow, n, cid, [
                        (f, set(nv).difference(ov)) for (f, ov), (_, nv) in pairs], add=True)
                    continue
                if o is not None:
                    self._queue_clauses(conj, allow, o, cid, _dims(o), add=False)
                if n is not None:
                    self._queue_clauses(conj, allow, n, cid, _dims(n), add=True)
            if new:
                self.subrules[rk] = new
            else:
                self.subrules.pop(rk, None)
            if _rule_shape(new) != _rule_shape(old):  # what _rule_flows depends on
                out[f"rule:{rk}"] = self._rule_flows(rk)
        self._apply_edits(conj, allow, out)

    def _recompute_isolation(self, pods: set[str], out: dict[OwnerKey, list[Flow]]) -> None:
        for k in pods:
            old_flows = self._isolation_flows(k)
            p = self.world.pods.get(k)
            if p is None or p.node != self.node or not p.ip:
                self.isolated.pop(k, None)
                self._isolated_ip.pop(k, None)
            else:
                self.isolated[k] = (bool(self.world.isolated(p, "ingress")),
                                    bool(self.world.isolated(p, "egress")))
                self._isolated_ip[k] = p.ip
            new_flows = self._isolation_flows(k)
            if new_flows != old_flows:
                out[f"isolation:{k}"] = new_flows

    def _rules_touching_pods(self, pods: list[PodInfo]) -> set[str]:
        """Rules whose selected set or peer set may contain any of these pods.

        Indexed by namespace: a policy selects only pods of its own namespace,
        and a peer without a namespaceSelector only pods of the policy's
        namespace, so only peers with a namespaceSelector are checked across
        namespaces, and which of those match a namespace is worked out once
        per namespace. Checking every policy's every peer for every pod took
        minutes for a 10,000-pod list against 1,000 policies of 40 ipBlocks.
        """
        idx = self._touch_index
        if idx is None:
            idx = self._touch_index = _TouchIndex(self.world)
        out = set(idx.named_port_rules)
        by_ns, same_ns, cross, cross_in = idx.by_ns, idx.same_ns, idx.cross, idx.cross_in
        every = Selector()
        for p in pods:
            for pol in by_ns.get(p.namespace, ()):
                if pol.selector.matches(p.labels):
                    out.update(r.key for r in pol.rules)
                    continue
                for r in pol.rules:
                    if r.key in out:
                        continue
                    if any((pe.pods or every).matches(p.labels) for pe in same_ns.get(r.key, ())):
                        out.add(r.key)
            xs = cross_in.get(p.namespace)
            if xs is None:
                labels = self.world.namespaces.get(p.namespace, {})
                xs = cross_in[p.namespace] = [
                    (k, pe) for k, pe in cross
                    if pe.namespaces is not None and pe.namespaces.matches(labels)]
            for k, pe in xs:
                if k not in out and (pe.pods or every).matches(p.labels):
                    out.add(k)
        return out

    def load(self, namespaces: list[dict[str, Any]], pods: list[dict[str, Any]],
             policies: list[dict[str, Any]]) -> tuple[dict[OwnerKey, list[Flow]], list[str]]:
        """Initial state; returns (flows by owner, problems)."""
        problems: list[str] = []
        self._touch_index = None
        for n in namespaces:
            self.world.namespaces[n["name"]] = dict(n.get("labels") or {})
        self.world.changed()
        for b in pods:
            try:
                self.world.put_pod(engine_pod(b))
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"pod {b.get('namespace')}/{b.get('name')}: {e}")
        for b in policies:
            try:
                self.world.put_policy(parse_policy(b["namespace"], b["name"], b.get("spec")))
            except (PolicyError, KeyError) as e:
                problems.append(f"networkpolicy {b.get('namespace')}/{b.get('name')}: {e}")
        # Built here, not by the first pod change (0.1 s at 1,000 policies).
        self._touch_index = _TouchIndex(self.world)
        out: dict[OwnerKey, list[Flow]] = {}
        self._recompute_rules({r.key for p in self.world.policies.values() for r in p.rules},
                              out)
        self._recompute_isolation(set(self.world.pods), out)
        out[CONNTRACK_OWNER] = self.conntrack_flows()
        return {k: v for k, v in out.items() if v}, problems

    def apply(self, changes: Iterable[Any]) -> tuple[dict[OwnerKey, list[Flow]], list[str]]:
        """Apply datastore changes (store.Change); returns (changed owners' flows, problems)."""
        problems: list[str] = []
        rules: set[str] = set()
        pods_changed: list[PodInfo] = []
        iso_pods: set[str] = set()
        for c in changes:
            if c.kind == "Pod":
                key = f"{c.namespace}/{c.name}"
                old = self.world.del_pod(key)
                if old:
                    pods_changed.append(old)
                if c.op == "put" and c.body:
                    try:
                        new = engine_pod(c.body)
                    except (KeyError, TypeError, ValueError) as e:
                        problems.append(f"pod {key}: {e}")
                        iso_pods.add(key)  # gone from the world: its isolation goes too
                        continue
                    self.world.put_pod(new)
                    pods_changed.append(new)
                iso_pods.add(key)
            elif c.kind == "Namespace":
                if self._touch_index is not None:  # only which cross peers match it moves
                    self._touch_index.cross_in.clear()
                if c.op == "put" and c.body:
                    self.world.namespaces[c.name] = dict(c.body.get("labels") or {})
                else:
                    self.world.namespaces.pop(c.name, None)
                self.world.changed()
                rules.update(r.key for pol in self.world.policies.values() for r in pol.rules
                             if r.peers and any(p.namespaces is not None for p in r.peers))
            elif c.kind == "NetworkPolicy":
                idx = self._touch_index
                key = f"{c.namespace}/{c.name}"
                oldp = self.world.del_policy(key)
                if oldp:
                    if idx is not None:
                        idx.remove_policy(oldp)
                    rules.update(r.key for r in oldp.rules)
                    iso_pods.update(p.key for p in self.world.selected(oldp))
                if c.op == "put" and c.body:
                    try:
                        newp = parse_policy(c.namespace, c.name, c.body.get("spec"))
                    except PolicyError as e:
                        problems.append(f"networkpolicy {key}: {e}")
                        continue
                    self.world.put_policy(newp)
                    if idx is not None:
                        idx.add_policy(newp)
                    rules.update(r.key for r in newp.rules)
                    iso_pods.update(p.key for p in self.world.selected(newp))
        if pods_changed:
            rules |= self._rules_touching_pods(pods_changed)
        out: dict[OwnerKey, list[Flow]] = {}
        self._recompute_rules(rules, out)
        self._recompute_isolation(iso_pods, out)
        return out, problems

    # -- inspection ------------------------------------------------------------------------

    def isolation_report(self) -> dict[str, dict[str, list[str]]]:
        """Local isolated pods -> the policies isolating them, per direction."""
        out = {}
        for key, (i_in, i_out) in self.isolated.items():
            p = self.world.pods.get(key)
            if p is None or not (i_in or i_out):
                continue
            out[key] = {d: [pol.key for pol in self.world.isolated(p, d)]
                        for d in DIRS}
        return out

    def describe(self) -> list[dict[str, Any]]:
        """Every realized rule: its conjunction ids and the sizes of its clauses."""
        out = []
        for rk, subs in sorted(self.subrules.items()):
            for i, s in enumerate(subs):
                out.append({
                    "rule": rk, "conj_id": self.conj_ids.get((rk, i)),
                    "direction": s.direction, "pods": sorted(s.selected),
                    "peers": None if s.peers is None else sorted(s.peers.distinct()),
                    "ports": None if s.ports is None else sorted(
                        _port_text(pm) for pm in s.ports),
                    "flows": len(s.selected) + (len(s.peers.distinct()) if s.peers is not None
                                                else 0)
                    + (len(s.ports) if s.ports is not None else 0)
                    + (1 if self._n_dims(s) > 1 else 0)})
        return out
