"""Cluster-wide tiered policy: both upstream API versions, one model, one set of flows.

policy.networking.k8s.io has two shapes in use at once: v1alpha1
AdminNetworkPolicy (priority 0-1000, actions Allow/Deny/Pass) with the
singleton BaselineAdminNetworkPolicy `default` (Allow/Deny), and v1alpha2
ClusterNetworkPolicy (spec.tier Admin|Baseline, priority 0-1000, actions
Accept/Deny/Pass, `protocols` instead of `ports`). Both parse into one
`ClusterPolicy`, so the datapath, the CLI and the tests see no difference.

Evaluation per direction, as upstream specifies: the Admin tier by priority
(lower number first), rules in written order; Accept is final (past
NetworkPolicy and Baseline), Deny is final, Pass leaves the Admin tier for
NetworkPolicy. NetworkPolicy decides for the pods it isolates; only for the
others does the Baseline tier run. In flows: AdminEgress/AdminIngress before
the NetworkPolicy tables, BaselineEgress/BaselineIngress after them (the
isolation tables fall through to Baseline).

Each rule is one conjunction per port resolution (subjects x peers x ports),
so it costs |subjects| + |peers| + |ports| + 1 flows on a node. Each rule has
an OpenFlow priority of its own: priority band `prio_of(priority)` minus the
rule's slot among the rules of the policies sharing that (tier, priority),
ordered by policy name, then kind, then rule index. Upstream leaves ties
between policies of one priority undefined; this order makes them
deterministic, and `flowctl policy` shows it. A change recomputes only the
policies it can touch, and those sharing the changed policy's priority.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flowcni.flows.cookie import Feature
from flowcni.flows.model import Conjunction, Flow, gc_paused
from flowcni.flows.policy import (
    OPERATORS,
    PROTOCOLS,
    PodInfo,
    PolicyError,
    PortMatch,
    PortSpec,
    Selector,
    _selector,
    engine_pod,
    port_match,
    resolve_ports,
)
from flowcni.flows.tables import DEFAULT, Pipeline

GROUP = "policy.networking.k8s.io"
V1ALPHA1 = f"{GROUP}/v1alpha1"
V1ALPHA2 = f"{GROUP}/v1alpha2"
API_VERSIONS = {"AdminNetworkPolicy": V1ALPHA1, "BaselineAdminNetworkPolicy": V1ALPHA1,
                "ClusterNetworkPolicy": V1ALPHA2}
KINDS = tuple(API_VERSIONS)
TIERS = ("Admin", "Baseline")
MAX_PRIORITY = 1000
BANP_NAME = "default"
# v1alpha1's BaselineAdminNetworkPolicy has no priority: it sits last in the
# Baseline tier (after every v1alpha2 Baseline policy of a lower number).
BANP_PRIORITY = MAX_PRIORITY

# OpenFlow priorities in the tier tables: a band of SLOTS per policy priority.
SLOTS = 64
PRIO_TOP = 64100
PRIO_ESTABLISHED = 65000
CONJ_BASE = 1 << 24  # conjunction ids of their own, far from NetworkPolicy's
TABLES = {("Admin", "egress"): "AdminEgress", ("Admin", "ingress"): "AdminIngress",
          ("Baseline", "egress"): "BaselineEgress", ("Baseline", "ingress"): "BaselineIngress"}
CONNTRACK_OWNER = "cluster-conntrack"

# Per version: the actions it knows, and the internal action each stands for.
ACTIONS = {
    "AdminNetworkPolicy": {"Allow": "accept", "Deny": "deny", "Pass": "pass"},
    "BaselineAdminNetworkPolicy": {"Allow": "accept", "Deny": "deny"},
    "ClusterNetworkPolicy": {"Accept": "accept", "Deny": "deny", "Pass": "pass"},
}
SPEC_FIELDS = {
    "AdminNetworkPolicy": {"priority", "subject", "ingress", "egress"},
    "BaselineAdminNetworkPolicy": {"subject", "ingress", "egress"},
    "ClusterNetworkPolicy": {"tier", "priority", "subject", "ingress", "egress"},
}
MAX_RULES = {"AdminNetworkPolicy": 100, "BaselineAdminNetworkPolicy": 100,
             "ClusterNetworkPolicy": 25}


# -- model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterPeer:
    """One peer: exactly one of namespaces, pods (namespace AND pod selector), nodes, networks."""

    namespaces: Selector | None = None
    pods: Selector | None = None
    nodes: Selector | None = None
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterPort:
    """protocol + port (None: every port) + end (range), or a named port (any protocol)."""

    protocol: str = ""
    port: int | None = None
    end: int | None = None
    name: str = ""


@functools.lru_cache(maxsize=4096)
def _port_specs(ports: tuple[ClusterPort, ...]) -> tuple[PortSpec, ...]:
    """Cluster ports as NetworkPolicy port specs, resolved by the same code
    (flows.policy.resolve_ports): a named port, which names no protocol here, is
    that name under each protocol."""
    return tuple(spec for s in ports for spec in (
        [PortSpec(proto, s.name) for proto in PROTOCOLS] if s.name
        else [PortSpec(s.protocol, s.port, s.end)]))


@dataclass(frozen=True)
class ClusterRule:
    index: int
    name: str
    direction: str
    action: str                         # accept | deny | pass
    peers: tuple[ClusterPeer, ...]
    ports: tuple[ClusterPort, ...] | None  # None: every port and protocol


@dataclass(frozen=True)
class ClusterPolicy:
    kind: str
    name: str
    tier: str
    priority: int
    subject_ns: Selector
    subject_pods: Selector | None       # None: every pod of the selected namespaces
    rules: tuple[ClusterRule, ...]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    def order(self) -> tuple[int, str, str]:
        """Deterministic order inside one (tier, priority): name, then kind."""
        return (self.priority, self.name, self.kind)


# -- parsing ------------------------------------------------------------------------------


def _only(v: Any, where: str, allowed: Iterable[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise PolicyError(f"{where}: must be a map")
    allowed = set(allowed)
    for k in v:
        if k not in allowed:
            raise PolicyError(f"{where}.{k}: unknown field for this kind and version "
                              f"(known: {', '.join(sorted(allowed))})")
    return v


def _one_of(v: dict[str, Any], where: str) -> str:
    set_ = [k for k, x in v.items() if x is not None]
    if len(set_) != 1:
        raise PolicyError(f"{where}: exactly one field must be set (got "
                          f"{', '.join(set_) or 'none'})")
    return set_[0]


def _satisfiable(sel: Selector, where: str) -> Selector:
    """Refuse a selector no label set can match (a policy that can never apply)."""
    want = dict(sel.labels)
    for k, op, values in sel.exprs:
        if op == "DoesNotExist" and (k in want or any(
                k2 == k and op2 in ("In", "Exists") for k2, op2, _ in sel.exprs)):
            raise PolicyError(f"{where}.matchExpressions: {k} DoesNotExist contradicts "
                              "another requirement on the same key: matches nothing")
        if op == "In" and k in want and want[k] not in values:
            raise PolicyError(f"{where}.matchExpressions: {k} In {list(values)} contradicts "
                              f"matchLabels {k}={want[k]}: matches nothing")
        if op == "NotIn" and k in want and want[k] in values:
            raise PolicyError(f"{where}.matchExpressions: {k} NotIn {list(values)} contradicts "
                              f"matchLabels {k}={want[k]}: matches nothing")
    ins: dict[str, set[str]] = {}
    for k, op, values in sel.exprs:
        if op == "In":
            ins[k] = ins[k] & set(values) if k in ins else set(values)
            if not ins[k]:
                raise PolicyError(f"{where}.matchExpressions: the In requirements on {k} "
                                  "have no value in common: matches nothing")
    return sel


def _sel(v: Any, where: str) -> Selector:
    if v is None:
        raise PolicyError(f"{where}: required (use {{}} for every one)")
    return _satisfiable(_selector(v, where), where)


def _namespaced_pod(v: Any, where: str) -> tuple[Selector, Selector]:
    v = _only(v, where, ("namespaceSelector", "podSelector"))
    return (_sel(v.get("namespaceSelector"), f"{where}.namespaceSelector"),
            _sel(v.get("podSelector"), f"{where}.podSelector"))


def _networks(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= 25:
        raise PolicyError(f"{where}: must list 1 to 25 CIDRs")
    out = []
    for i, c in enumerate(v):
        try:
            net = ipaddress.ip_network(str(c), strict=False)
        except ValueError as e:
            raise PolicyError(f"{where}[{i}]: {c!r} is not a CIDR") from e
        if net.version != 4:
            raise PolicyError(f"{where}[{i}]: {c}: only IPv4 is supported")
        out.append(str(net))
    return tuple(out)


def _peer(v: Any, where: str, direction: str) -> ClusterPeer:
    fields = ("namespaces", "pods") + (("nodes", "networks", "domainNames")
                                       if direction == "egress" else ())
    v = _only(v, where, fields)
    k = _one_of(v, where)
    if k == "namespaces":
        return ClusterPeer(namespaces=_sel(v[k], f"{where}.namespaces"))
    if k == "pods":
        ns, pods = _namespaced_pod(v[k], f"{where}.pods")
        return ClusterPeer(namespaces=ns, pods=pods)
    if k == "nodes":
        return ClusterPeer(nodes=_sel(v[k], f"{where}.nodes"))
    if k == "networks":
        return ClusterPeer(networks=_networks(v[k], f"{where}.networks"))
    raise PolicyError(f"{where}.domainNames: not supported by flowcni (no DNS-aware datapath)")


def _port_number(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise PolicyError(f"{where}: {v!r} must be a port number 1..65535")
    return v


def _protocol(v: Any, where: str) -> str:
    p = "TCP" if v is None else v
    if p not in PROTOCOLS:
        raise PolicyError(f"{where}: {v!r} is not TCP, UDP or SCTP")
    return str(p)


def _range(v: Any, where: str, proto: str) -> ClusterPort:
    v = _only(v, where, ("protocol", "start", "end") if proto == "" else ("start", "end"))
    proto = proto or _protocol(v.get("protocol"), f"{where}.protocol")
    start = _port_number(v.get("start"), f"{where}.start")
    end = _port_number(v.get("end"), f"{where}.end")
    if end < start:
        raise PolicyError(f"{where}.end: {end} is below start {start}")
    return ClusterPort(proto, start, end)


def _named(v: Any, where: str) -> ClusterPort:
    if not isinstance(v, str) or not 0 < len(v) <= 15:
        raise PolicyError(f"{where}: {v!r} is not a port name")
    return ClusterPort(name=v)


def _ports_v1alpha1(v: Any, where: str) -> tuple[ClusterPort, ...]:
    if not isinstance(v, list) or not v:
        raise PolicyError(f"{where}: must be a non-empty list")
    out = []
    for i, p in enumerate(v):
        w = f"{where}[{i}]"
        p = _only(p, w, ("portNumber", "namedPort", "portRange"))
        k = _one_of(p, w)
        if k == "portNumber":
            pn = _only(p[k], f"{w}.portNumber", ("protocol", "port"))
            out.append(ClusterPort(_protocol(pn.get("protocol"), f"{w}.portNumber.protocol"),
                                   _port_number(pn.get("port"), f"{w}.portNumber.port")))
        elif k == "namedPort":
            out.append(_named(p[k], f"{w}.namedPort"))
        else:
            out.append(_range(p[k], f"{w}.portRange", ""))
    return tuple(out)


def _protocols_v1alpha2(v: Any, where: str) -> tuple[ClusterPort, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= 25:
        raise PolicyError(f"{where}: must list 1 to 25 entries")
    out = []
    for i, p in enumerate(v):
        w = f"{where}[{i}]"
        p = _only(p, w, ("tcp", "udp", "sctp", "destinationNamedPort"))
        k = _one_of(p, w)
        if k == "destinationNamedPort":
            out.append(_named(p[k], f"{w}.destinationNamedPort"))
            continue
        proto = k.upper()
        attrs = _only(p[k] or {}, f"{w}.{k}", ("destinationPort",))
        dp = attrs.get("destinationPort")
        if dp is None:
            out.append(ClusterPort(proto))
            continue
        dw = f"{w}.{k}.destinationPort"
        dp = _only(dp, dw, ("number", "range"))
        dk = _one_of(dp, dw)
        if dk == "number":
            out.append(ClusterPort(proto, _port_number(dp[dk], f"{dw}.number")))
        else:
            out.append(_range(dp[dk], f"{dw}.range", proto))
    return tuple(out)


def parse_cluster_policy(kind: str, name: str, spec: Any) -> ClusterPolicy:
    """One object of either API version into the model, or PolicyError naming the field."""
    if kind not in API_VERSIONS:
        raise PolicyError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    spec = _only(spec, "spec", SPEC_FIELDS[kind])
    if kind == "BaselineAdminNetworkPolicy":
        if name != BANP_NAME:
            raise PolicyError(f"metadata.name: a BaselineAdminNetworkPolicy is a singleton "
                              f"named {BANP_NAME!r}, not {name!r}")
        tier, priority = "Baseline", BANP_PRIORITY
    else:
        tier = "Admin" if kind == "AdminNetworkPolicy" else spec.get("tier")
        if tier not in TIERS:
            raise PolicyError(f"spec.tier: {tier!r} is not Admin or Baseline")
        priority = spec.get("priority")
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not 0 <= priority <= MAX_PRIORITY:
            raise PolicyError(f"spec.priority: {priority!r} must be an integer 0..{MAX_PRIORITY}")
    subj = _only(spec.get("subject"), "spec.subject", ("namespaces", "pods"))
    sk = _one_of(subj, "spec.subject")
    if sk == "namespaces":
        sub_ns, sub_pods = _sel(subj[sk], "spec.subject.namespaces"), None
    else:
        sub_ns, sub_pods = _namespaced_pod(subj[sk], "spec.subject.pods")
    actions = ACTIONS[kind]
    v2 = kind == "ClusterNetworkPolicy"
    rules: list[ClusterRule] = []
    for d, peer_key in (("ingress", "from"), ("egress", "to")):
        raw = spec.get(d) or []
        if not isinstance(raw, list):
            raise PolicyError(f"spec.{d}: must be a list")
        if len(raw) > MAX_RULES[kind]:
            raise PolicyError(f"spec.{d}: {len(raw)} rules, at most {MAX_RULES[kind]}")
        for i, r in enumerate(raw):
            w = f"spec.{d}[{i}]"
            r = _only(r, w, ("name", "action", peer_key, "protocols" if v2 else "ports"))
            rname = r.get("name") or ""
            if not isinstance(rname, str) or len(rname) > 100:
                raise PolicyError(f"{w}.name: must be a string of at most 100 characters")
            act = r.get("action")
            if act not in actions:
                raise PolicyError(f"{w}.action: {act!r} is not one of {', '.join(actions)}")
            peers_raw = r.get(peer_key)
            if not isinstance(peers_raw, list) or not 1 <= len(peers_raw) <= 100:
                raise PolicyError(f"{w}.{peer_key}: must list at least one peer")
            peers = tuple(_peer(p, f"{w}.{peer_key}[{j}]", d) for j, p in enumerate(peers_raw))
            pk = "protocols" if v2 else "ports"
            ports = (None if r.get(pk) is None else
                     _protocols_v1alpha2(r[pk], f"{w}.{pk}") if v2
                     else _ports_v1alpha1(r[pk], f"{w}.{pk}"))
            if ports and any(p.name for p in ports) and any(
                    pe.nodes is not None or pe.networks for pe in peers):
                raise PolicyError(f"{w}.{pk}: a named port cannot go with nodes or networks "
                                  "peers (they have no named ports)")
            rules.append(ClusterRule(i, rname, d, actions[act], peers, ports))
    return ClusterPolicy(kind, name, str(tier), priority, sub_ns, sub_pods, tuple(rules))




def prio_of(priority: int, slot: int) -> int:
    return PRIO_TOP - priority * SLOTS - slot


def describe_rule(pol: ClusterPolicy, rule: ClusterRule) -> str:
    """The words a trace uses for a rule: 'Admin tier, priority 10, ClusterNetworkPolicy
    deny-tenant-crossing, egress rule 0 (name)'."""
    nm = f" ({rule.name})" if rule.name else ""
    return (f"{pol.tier} tier, priority {pol.priority}, {pol.kind} {pol.name}, "
            f"{rule.direction} rule {rule.index}{nm}")


def rule_owner(pol: ClusterPolicy, rule: ClusterRule) -> str:
    return f"cluster-rule:{pol.kind}/{pol.name}/{rule.direction}/{rule.index}"


@dataclass
class _Realized:
    """What one rule holds on this node, for `flowctl policy`."""

    owner: str
    table: str
    priority: int
    conj_ids: list[int]
    subjects: int
    flows: int


class ClusterPolicyEngine:
    """Cluster policies -> flows for one node; recomputes only what a change touches."""

    def __init__(self, node: str, pipeline: Pipeline = DEFAULT) -> None:
        self.node = node
        self.pipeline = pipeline
        self.pods: dict[str, PodInfo] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.nodes: dict[str, tuple[str, dict[str, str]]] = {}   # name -> (IP, labels)
        self.policies: dict[str, ClusterPolicy] = {}
        self.realized: dict[str, list[_Realized]] = {}          # policy key -> its rules
        self.owners: dict[str, set[str]] = {}                   # policy key -> owners
        self._conj: dict[tuple[str, int], int] = {}              # (rule owner, i) -> id
        self._next_conj = CONJ_BASE
        self._templates: dict[tuple[str, str, Any], Flow] = {}
        self._pods_by_ns: dict[str, list[PodInfo]] | None = None
        # Per recompute (cleared before and after one): what a selector picks and
        # the clause templates of an address set. 100 Admin policies reuse a
        # few dozen selectors, and selecting and templating them per rule was a
        # third of the build.
        self._selected: dict[tuple[Selector, Selector | None, bool],
                             tuple[list[PodInfo], frozenset[str]]] = {}
        self._dims: dict[tuple[str, str, frozenset[Any]], tuple[Flow, ...]] = {}

    # -- selection ----------------------------------------------------------------

    def _ns_pods(self, ns_sel: Selector, pod_sel: Selector | None) -> list[PodInfo]:
        by_ns = self._by_ns()
        return [p for n, labels in self.namespaces.items() if ns_sel.matches(labels)
                for p in by_ns.get(n, ()) if pod_sel is None or pod_sel.matches(p.labels)]

    def _by_ns(self) -> dict[str, list[PodInfo]]:
        """Pods with an address by namespace; rebuilt after a pod change, not per rule."""
        if self._pods_by_ns is None:
            idx: dict[str, list[PodInfo]] = defaultdict(list)
            for p in self.pods.values():
                if p.ip:
                    idx[p.namespace].append(p)
            self._pods_by_ns = idx
        return self._pods_by_ns

    def _select(self, ns_sel: Selector, pod_sel: Selector | None, local: bool
                ) -> tuple[list[PodInfo], frozenset[str]]:
        """(pods, their IPs) a selector pair picks, on this node only or anywhere;
        cached for one recompute, so rules sharing selectors share one set object.
        Only for use inside `_recompute`, which empties the cache around itself."""
        key = (ns_sel, pod_sel, local)
        hit = self._selected.get(key)
        if hit is None:
            pods = self._ns_pods(ns_sel, pod_sel)
            if local:
                pods = [p for p in pods if p.node == self.node]
            hit = self._selected[key] = (pods, frozenset(p.ip for p in pods))
        return hit

    def _node_ips(self, sel: Selector) -> list[str]:
        return sorted(ip for name, (ip, labels) in self.nodes.items()
                      if ip and sel.matches({"kubernetes.io/hostname": name, **labels}))

    # -- ports --------------------------------------------------------------------------

    @staticmethod
    def _resolve(ports: tuple[ClusterPort, ...], pod: PodInfo | None) -> frozenset[PortMatch]:
        return resolve_ports(_port_specs(ports), pod)

    # -- flows of one policy ------------------------------------------------------------

    def _slots(self, pol: ClusterPolicy) -> dict[tuple[str, int], int]:
        """(direction, rule index) -> slot among the rules of its (tier, priority)."""
        same = sorted((p for p in self.policies.values()
                       if p.tier == pol.tier and p.priority == pol.priority),
                      key=ClusterPolicy.order)
        out: dict[tuple[str, int], int] = {}
        for d in ("ingress", "egress"):
            n = 0
            for p in same:
                for r in p.rules:
                    if r.direction == d:
                        if p.key == pol.key:
                            out[(d, r.index)] = n
                        n += 1
        return out

    def _conj_id(self, owner: str, i: int) -> int:
        k = (owner, i)
        if k not in self._conj:
            self._conj[k] = self._next_conj
            self._next_conj += 1
        return self._conj[k]

    def _groups(self, pol: ClusterPolicy, rule: ClusterRule, subjects: list[PodInfo]
                ) -> list[tuple[frozenset[str], frozenset[str], frozenset[PortMatch] | None]]:
        """(subject IPs, peer addresses, port matches or None) per conjunction.

        One conjunction unless a named port resolves differently per pod (subjects
        on ingress, peers on egress): then one per distinct resolution."""
        pod_sels: list[tuple[Selector, Selector | None]] = []
        addrs: set[str] = set()
        for pe in rule.peers:
            if pe.networks:
                addrs.update(pe.networks)
            elif pe.nodes is not None:
                addrs.update(self._node_ips(pe.nodes))
            elif pe.namespaces is not None:
                pod_sels.append((pe.namespaces, pe.pods))
        sub_ips = self._select(pol.subject_ns, pol.subject_pods, True)[1]
        if rule.ports is None or not any(p.name for p in rule.ports):
            ports = None if rule.ports is None else self._resolve(rule.ports, None)
            if not addrs and len(pod_sels) == 1:
                peers = self._select(*pod_sels[0], False)[1]  # the cached set: its hash too
            else:
                peers = frozenset(addrs.union(*(self._select(*ps, False)[1]
                                                 for ps in pod_sels)))
            return [(sub_ips, peers, ports)]
        assert rule.ports is not None
        pod_peers = [p for ps in pod_sels for p in self._select(*ps, False)[0]]
        if rule.direction == "ingress":
            peers = frozenset(addrs | {p.ip for p in pod_peers})
            by: dict[frozenset[PortMatch], set[str]] = defaultdict(set)
            for p in subjects:
                by[self._resolve(rule.ports, p)].add(p.ip)
            return [(frozenset(s), peers, pm) for pm, s in by.items()]
        by_p: dict[frozenset[PortMatch], set[str]] = defaultdict(set)
        if addrs:
            by_p[self._resolve(rule.ports, None)].update(addrs)
        for p in pod_peers:
            by_p[self._resolve(rule.ports, p)].add(p.ip)
        return [(sub_ips, frozenset(a), pm) for pm, a in by_p.items()]

    def _policy_flows(self, pol: ClusterPolicy) -> tuple[dict[str, list[Flow]],
                                                          list[_Realized]]:
        slots = self._slots(pol)
        subjects = self._select(pol.subject_ns, pol.subject_pods, True)[0]
        out: dict[str, list[Flow]] = {}
        realized: list[_Realized] = []
        for rule in pol.rules:
            owner = rule_owner(pol, rule)
            slot = slots[(rule.direction, rule.index)]
            if slot >= SLOTS:
                raise PolicyError(f"spec.{rule.direction}[{rule.index}]: more than {SLOTS} "
                                  f"{rule.direction} rules share {pol.tier} priority "
                                  f"{pol.priority}")
            table = TABLES[(pol.tier, rule.direction)]
            prio = prio_of(pol.priority, slot)
            flows = self._rule_flows(pol, rule, table, prio, owner, subjects) if subjects else []
            out[owner] = flows
            groups = [k for k in self._conj if k[0] == owner]
            realized.append(_Realized(owner, table, prio, [self._conj[k] for k in groups],
                                      len(subjects), len(flows)))
        return out, realized

    def _rule_flows(self, pol: ClusterPolicy, rule: ClusterRule, table: str, prio: int,
                    owner: str, subjects: list[PodInfo]) -> list[Flow]:
        ingress = rule.direction == "ingress"
        sel_f, peer_f = ("ipv4_dst", "ipv4_src") if ingress else ("ipv4_src", "ipv4_dst")
        if rule.action == "deny":
            goto = None
        elif rule.action == "pass" and pol.tier == "Admin":
            goto = "IngressRule" if ingress else "EgressRule"
        else:  # accept (and Pass in the Baseline tier: on to the default, allow)
            goto = "ConntrackCommit" if ingress else "L3Forwarding"
        groups = [(i, g) for i, g in enumerate(self._groups(pol, rule, subjects))
                  if g[0] and g[1] and (g[2] is None or g[2])]
        # Clause matches differ across the dimensions of one conjunction (each
        # matches its own field), so with one conjunction every clause flow
        # carries one action; only several conjunctions can share a match.
        items: list[tuple[Flow, tuple[Conjunction, ...]]] = []
        shared: dict[tuple[Any, ...], tuple[Flow, list[Conjunction]]] = {}
        conj_flows: list[Flow] = []
        for i, (subs, peers, ports) in groups:
            cid = self._conj_id(owner, i)
            dims = [self._dim(table, sel_f, subs), self._dim(table, peer_f, peers)]
            if ports is not None:
                dims.append(self._dim(table, "port", ports))
            for k, dim in enumerate(dims, 1):
                act = Conjunction(cid, k, len(dims))
                if len(groups) == 1:
                    acts = (act,)
                    items += [(t, acts) for t in dim]
                else:
                    for t in dim:
                        shared.setdefault(t.match, (t, []))[1].append(act)
            conj_flows.append(Flow.make(table, prio, {"conj_id": cid, "eth_type": 0x0800},
                                        goto=goto, feature=Feature.POLICY, owner=owner,
                                        pipeline=self.pipeline))
        items += [(t, tuple(sorted(set(acts), key=lambda a: (a.id, a.clause))))
                  for t, acts in shared.values()]
        return Flow.clauses(items, priority=prio, owner=owner) + conj_flows

    def _dim(self, table: str, field: str, values: frozenset[Any]) -> tuple[Flow, ...]:
        """The clause templates of one conjunction dimension, one per distinct match
        (a /32 network and a pod address are one match); cached per recompute."""
        key = (table, field, values)
        hit = self._dims.get(key)
        if hit is None:
            if field == "port":
                ts = [self._template(table, field, v) for v in sorted(values, key=str)]
            else:
                ts = self._addr_templates(table, field, [
                    a[:-3] if a.endswith("/32") else a for a in values])
            hit = self._dims[key] = tuple({t.match: t for t in ts}.values())
        return hit

    def _addr_templates(self, table: str, field: str, addrs: list[str]) -> list[Flow]:
        """`_template` for many addresses: those not made yet are made from the
        first one's flow (`Flow.with_each`), which checks each address only."""
        tmpl = self._templates
        new = [a for a in addrs if (table, field, a) not in tmpl]
        if new:
            first = self._template(table, field, new[0])
            for a, t in zip(new[1:], Flow.with_each(first, field, new[1:]), strict=True):
                tmpl[(table, field, a)] = t
        return [tmpl[(table, field, a)] for a in addrs]

    def _template(self, table: str, field: str, value: Any) -> Flow:
        """A validated flow on one clause match, made once per distinct match: the
        same pod addresses recur in many rules, and validating each copy was most
        of the engine's time."""
        key = (table, field, value)
        t = self._templates.get(key)
        if t is None:
            m = port_match(value) if field == "port" else {field: value}
            t = self._templates[key] = Flow.make(table, 0, m, feature=Feature.POLICY,
                                                 owner="", pipeline=self.pipeline)
        return t

    def conntrack_flows(self) -> list[Flow]:
        """Established connections skip the Admin ingress tier, as they skip IngressRule."""
        return [Flow.make("AdminIngress", PRIO_ESTABLISHED,
                          {"eth_type": 0x0800, "ct_state": "-new+trk"}, goto="ConntrackCommit",
                          feature=Feature.POLICY, owner=CONNTRACK_OWNER, pipeline=self.pipeline)]

    # -- changes ------------------------------------------------------------------------

    def _recompute(self, keys: set[str], out: dict[str, list[Flow]],
                   problems: list[str]) -> None:
        self._selected, self._dims = {}, {}
        try:
            with gc_paused():
                self._recompute_keys(keys, out, problems)
        finally:
            self._selected, self._dims = {}, {}

    def _recompute_keys(self, keys: set[str], out: dict[str, list[Flow]],
                        problems: list[str]) -> None:
        for key in sorted(keys):
            old = self.owners.pop(key, set())
            self.realized.pop(key, None)
            pol = self.policies.get(key)
            new: dict[str, list[Flow]] = {}
            if pol is not None:
                try:
                    new, real = self._policy_flows(pol)
                except PolicyError as e:
                    problems.append(f"{key}: {e}")
                    new, real = {}, []
                self.realized[key] = real
                self.owners[key] = set(new)
            for o in old - set(new):
                out[o] = []
                for k in [k for k in self._conj if k[0] == o]:
                    del self._conj[k]
            out.update(new)

    def _touched_by_pod(self, pods: list[PodInfo]) -> set[str]:
        out = set()
        for key, pol in self.policies.items():
            for p in pods:
                ns = self.namespaces.get(p.namespace, {})
                if pol.subject_ns.matches(ns) and (pol.subject_pods is None
                                                   or pol.subject_pods.matches(p.labels)):
                    out.add(key)
                    break
                if any(pe.namespaces is not None and pe.namespaces.matches(ns)
                       and (pe.pods is None or pe.pods.matches(p.labels))
                       for r in pol.rules for pe in r.peers):
                    out.add(key)
                    break
        return out

    def _same_priority(self, pol: ClusterPolicy) -> set[str]:
        return {k for k, p in self.policies.items()
                if p.tier == pol.tier and p.priority == pol.priority}

    def _put_node(self, b: dict[str, Any]) -> None:
        self.nodes[b["name"]] = (str(b.get("nodeIP") or ""), dict(b.get("labels") or {}))

    def load(self, namespaces: list[dict[str, Any]], pods: list[dict[str, Any]],
             nodes: list[dict[str, Any]], policies: dict[str, list[dict[str, Any]]]
             ) -> tuple[dict[str, list[Flow]], list[str]]:
        """Initial state (policies by kind); returns (flows by owner, problems)."""
        with gc_paused(promote=True):
            return self._load(namespaces, pods, nodes, policies)

    def _load(self, namespaces: list[dict[str, Any]], pods: list[dict[str, Any]],
              nodes: list[dict[str, Any]], policies: dict[str, list[dict[str, Any]]]
              ) -> tuple[dict[str, list[Flow]], list[str]]:
        problems: list[str] = []
        self._pods_by_ns = None
        for n in namespaces:
            self.namespaces[n["name"]] = dict(n.get("labels") or {})
        for b in nodes:
            self._put_node(b)
        for b in pods:
            try:
                p = engine_pod(b)
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"pod {b.get('namespace')}/{b.get('name')}: {e}")
                continue
            self.pods[p.key] = p
        for kind, bodies in policies.items():
            for b in bodies:
                try:
                    pol = parse_cluster_policy(kind, b["name"], b.get("spec"))
                except (PolicyError, KeyError) as e:
                    problems.append(f"{kind.lower()} {b.get('name')}: {e}")
                    continue
                self.policies[pol.key] = pol
        out: dict[str, list[Flow]] = {CONNTRACK_OWNER: self.conntrack_flows()}
        self._recompute(set(self.policies), out, problems)
        return {k: v for k, v in out.items() if v}, problems

    def apply(self, changes: Iterable[Any]) -> tuple[dict[str, list[Flow]], list[str]]:
        """Apply datastore changes (store.Change); returns (changed owners' flows, problems)."""
        problems: list[str] = []
        keys: set[str] = set()
        pods: list[PodInfo] = []
        for c in changes:
            if c.kind == "Pod":
                self._pods_by_ns = None
                key = f"{c.namespace}/{c.name}"
                old = self.pods.pop(key, None)
                if old:
                    pods.append(old)
                if c.op == "put" and c.body:
                    try:
                        new = engine_pod(c.body)
                    except (KeyError, TypeError, ValueError) as e:
                        problems.append(f"pod {key}: {e}")
                        continue
                    self.pods[key] = new
                    pods.append(new)
            elif c.kind == "Namespace":
                if c.op == "put" and c.body:
                    self.namespaces[c.name] = dict(c.body.get("labels") or {})
                else:
                    self.namespaces.pop(c.name, None)
                keys |= set(self.policies)
            elif c.kind == "Node":
                if c.op == "put" and c.body:
                    self._put_node(c.body)
                else:
                    self.nodes.pop(c.name, None)
                keys |= {k for k, p in self.policies.items()
                         if any(pe.nodes is not None for r in p.rules for pe in r.peers)}
            elif c.kind in API_VERSIONS:
                key = f"{c.kind}/{c.name}"
                oldp = self.policies.pop(key, None)
                keys.add(key)
                if oldp:
                    keys |= self._same_priority(oldp)
                if c.op == "put" and c.body:
                    try:
                        newp = parse_cluster_policy(c.kind, c.name, c.body.get("spec"))
                    except PolicyError as e:
                        problems.append(f"{c.kind.lower()} {c.name}: {e}")
                        continue
                    self.policies[key] = newp
                    keys |= self._same_priority(newp)
        if pods:
            keys |= self._touched_by_pod(pods)
        out: dict[str, list[Flow]] = {}
        self._recompute(keys, out, problems)
        return out, problems

    # -- inspection ---------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every cluster policy in evaluation order, with its rules as realized here."""
        out = []
        order = sorted(self.policies.values(),
                       key=lambda p: (TIERS.index(p.tier), *p.order()))
        for n, pol in enumerate(order):
            real = {r.owner: r for r in self.realized.get(pol.key, [])}
            rules = []
            for rule in pol.rules:
                o = rule_owner(pol, rule)
                r = real.get(o)
                rules.append({"owner": o, "index": rule.index, "name": rule.name,
                              "direction": rule.direction, "action": rule.action,
                              "table": r.table if r else TABLES[(pol.tier, rule.direction)],
                              "of_priority": r.priority if r else None,
                              "conj_ids": r.conj_ids if r else [],
                              "subjects": r.subjects if r else 0,
                              "flows": r.flows if r else 0,
                              "describe": describe_rule(pol, rule)})
            out.append({"kind": pol.kind, "name": pol.name, "tier": pol.tier,
                        "priority": pol.priority, "order": n,
                        "api_version": API_VERSIONS[pol.kind], "rules": rules})
        return out

    def per_tier(self) -> dict[str, dict[str, int]]:
        """Policies, rules and flows per tier (metrics)."""
        out = {t: {"policies": 0, "rules": 0, "flows": 0} for t in TIERS}
        for key, pol in list(self.policies.items()):
            c = out[pol.tier]
            c["policies"] += 1
            c["rules"] += len(pol.rules)
            c["flows"] += sum(r.flows for r in self.realized.get(key, []))
        return out

    def rule_descriptions(self) -> dict[str, str]:
        """Rule owner -> its words, for traces."""
        return {rule_owner(p, r): describe_rule(p, r)
                for p in self.policies.values() for r in p.rules}


__all__ = ["API_VERSIONS", "ClusterPolicy", "ClusterPolicyEngine", "OPERATORS",
           "parse_cluster_policy"]
