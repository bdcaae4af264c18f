"""TenantNetwork: validation of one object, and the cluster-wide resolution every agent does.

A TenantNetwork (flowcni.io/v1alpha1, cluster-scoped) puts the pods of the
namespaces it selects on a network of their own: its own subnets (which may
overlap other tenants and the default pod network), its own VNI on the wire
and its own conntrack zone.

Who writes status: nobody. Every agent computes the same resolution from
the same objects (VNIs, zones, per-node slices, conditions) with the pure
`resolve` below, and reports it through `flowctl tenants` and its log. N
agents writing one status would race and multiply API writes by the node
count; a single writer needs leader election, i.e. a controller Deployment
flowcni does not have yet. So the RBAC grants read only.

The VNI of a tenant without `spec.vni` is allocated, and kept:
- VNIs are handed out oldest tenant first (explicit and allocated alike), so
  a newer tenant never moves an older one's VNI: a newer `spec.vni` that is
  already in use is a VNIConflict naming spec.vni, whoever holds it.
- The embedded store records every usable tenant's VNI (Store.record_vnis,
  first writer wins, so every agent converges on one record); `resolve` gives
  recorded VNIs first. So the VNI also survives the deletion of an older
  tenant whose VNI an allocation had to step over, and agent restarts.
- With the Kubernetes API there is no record (read-only RBAC, see above):
  the allocation is a pure function of the tenants that exist, the same on
  every agent and across restarts; only deleting an older tenant whose VNI
  a younger one's hash collided with can move that younger one. `spec.vni`
  pins a VNI for good.

Field rules (each violation names the field):
- spec.namespaceSelector: a label selector (matchLabels, matchExpressions
  with In/NotIn/Exists/DoesNotExist); required (an empty one selects every
  namespace, which is refused: it would swallow the default network).
- spec.subnets: one or more IPv4 CIDRs, host bits clear.
- spec.nodeSubnetSize: prefix length of each node's slice (default 24).
  Node i (by the index of its pod CIDR in the cluster CIDR) gets the i-th
  slice across the subnets, so every agent computes every node's slice.
- spec.vni: optional, 1..65519. The wire's VNI field has 24 bits, but the
  VNI doubles as the tenant's id in a 16-bit register field (reg4[0..15])
  and as its conntrack zone (16 bits; 65520.. are flowcni's own zones), so
  larger values are refused (condition Ready=False, reason VNIOutOfRange,
  naming spec.vni).
- spec.egress.masquerade: bool (default false).
- spec.connectTo: list of other TenantNetwork names.
Immutable: spec.subnets, spec.nodeSubnetSize, spec.vni (a change would
renumber running pods); `check_update` refuses such a change.
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flowcni.flows.policy import OPERATORS, Selector

KIND = "TenantNetwork"
API_VERSION = "flowcni.io/v1alpha1"
GROUP, VERSION, PLURAL = "flowcni.io", "v1alpha1", "tenantnetworks"

VNI_MIN, VNI_MAX = 1, 0xFFEF
AUTO_VNI_MIN = 0x1000  # automatic VNIs start here, explicit small ones stay free for people
IMMUTABLE = ("subnets", "nodeSubnetSize", "vni")
SELECTOR_OPS = OPERATORS


class TenantError(ValueError):
    """An unusable TenantNetwork; the message starts with the field path."""


@dataclass(frozen=True)
class TenantSpec:
    """One TenantNetwork as validated; `created` orders tenants (older wins conflicts)."""

    name: str
    match_labels: tuple[tuple[str, str], ...]
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...]
    subnets: tuple[str, ...]
    node_subnet_size: int
    vni: int | None
    masquerade: bool
    connect_to: tuple[str, ...]
    created: str = ""

    def selects(self, labels: dict[str, str]) -> bool:
        """Whether namespaceSelector selects a namespace with these labels."""
        return Selector(self.match_labels, self.match_expressions).matches(labels)

    def slice_for(self, index: int) -> str | None:
        """The index-th /nodeSubnetSize slice across the subnets, or None if there is none."""
        for s in self.subnets:
            net = IPv4Network(s)
            n = 1 << (self.node_subnet_size - net.prefixlen)
            if index < n:
                return str(IPv4Network((int(net.network_address)
                                        + (index << (32 - self.node_subnet_size)),
                                        self.node_subnet_size)))
            index -= n
        return None


def _fail(field_: str, why: str) -> TenantError:
    return TenantError(f"{field_}: {why}")


def _str_list(field_: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise _fail(field_, "must be a list of non-empty strings")
    return list(v)


def parse_selector(sel: Any, field_: str = "spec.namespaceSelector"
                   ) -> tuple[tuple[tuple[str, str], ...],
                              tuple[tuple[str, str, tuple[str, ...]], ...]]:
    if not isinstance(sel, dict):
        raise _fail(field_, "required: a label selector (matchLabels / matchExpressions)")
    unknown = set(sel) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise _fail(f"{field_}.{sorted(unknown)[0]}", "unknown field")
    ml = sel.get("matchLabels") or {}
    if not isinstance(ml, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in ml.items()):
        raise _fail(f"{field_}.matchLabels", "must be a map of strings")
    exprs: list[tuple[str, str, tuple[str, ...]]] = []
    for i, e in enumerate(sel.get("matchExpressions") or []):
        where = f"{field_}.matchExpressions[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or not e["key"]:
            raise _fail(where, "needs a key")
        op = e.get("operator")
        if op not in SELECTOR_OPS:
            raise _fail(f"{where}.operator", f"{op!r}: one of {', '.join(SELECTOR_OPS)}")
        values = e.get("values") or []
        values = _str_list(f"{where}.values", values) if values else []
        if op in ("In", "NotIn") and not values:
            raise _fail(f"{where}.values", f"{op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise _fail(f"{where}.values", f"{op} takes no values")
        exprs.append((e["key"], str(op), tuple(sorted(values))))
    if not ml and not exprs:
        raise _fail(field_, "empty: it would select every namespace (the default network's "
                    "too); name the namespaces' labels")
    return tuple(sorted(ml.items())), tuple(exprs)


def parse_tenant(name: str, spec: Any, created: str = "") -> TenantSpec:
    """Validate one TenantNetwork's spec; TenantError names the field."""
    if not isinstance(spec, dict):
        raise _fail("spec", "missing or not a mapping")
    known = {"namespaceSelector", "subnets", "nodeSubnetSize", "vni", "egress", "connectTo"}
    unknown = set(spec) - known
    if unknown:
        raise _fail(f"spec.{sorted(unknown)[0]}",
                    f"unknown field (known: {', '.join(sorted(known))})")
    ml, exprs = parse_selector(spec.get("namespaceSelector"))
    raw = spec.get("subnets")
    if not raw:
        raise _fail("spec.subnets", "required: at least one IPv4 CIDR")
    subnets: list[str] = []
    for i, s in enumerate(_str_list("spec.subnets", raw)):
        try:
            net = ipaddress.ip_network(s, strict=True)
        except ValueError as e:
            raise _fail(f"spec.subnets[{i}]", f"{s!r}: {e}") from e
        if not isinstance(net, IPv4Network):
            raise _fail(f"spec.subnets[{i}]", f"{s}: only IPv4")
        for j, other in enumerate(subnets):
            if net.overlaps(IPv4Network(other)):
                raise _fail(f"spec.subnets[{i}]", f"{s} overlaps spec.subnets[{j}] {other}")
        subnets.append(str(net))
    size = spec.get("nodeSubnetSize", 24)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 30:
        raise _fail("spec.nodeSubnetSize", f"{size!r}: a prefix length 1..30 (each node's "
                    "slice needs a gateway and pods)")
    for i, s in enumerate(subnets):
        if IPv4Network(s).prefixlen > size:
            raise _fail(f"spec.subnets[{i}]", f"{s} is smaller than one node's slice "
                        f"(spec.nodeSubnetSize /{size})")
    vni = spec.get("vni")
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int)
                            or not VNI_MIN <= vni <= VNI_MAX):
        raise _fail("spec.vni", f"{vni!r}: an integer {VNI_MIN}..{VNI_MAX} (a VNI is also "
                    "the tenant's 16-bit id and conntrack zone; 24-bit VNIs above "
                    f"{VNI_MAX} are not accepted)")
    egress = spec.get("egress") or {}
    if not isinstance(egress, dict) or set(egress) - {"masquerade"}:
        raise _fail("spec.egress", "a mapping with only 'masquerade'")
    masq = egress.get("masquerade", False)
    if not isinstance(masq, bool):
        raise _fail("spec.egress.masquerade", f"{masq!r}: true or false")
    connect = spec.get("connectTo") or []
    connect = _str_list("spec.connectTo", connect) if connect else []
    if name in connect:
        raise _fail("spec.connectTo", f"names the network itself ({name})")
    return TenantSpec(name, ml, exprs, tuple(subnets), size, vni, masq,
                      tuple(sorted(set(connect))), created)


def check_update(old: TenantSpec, new: TenantSpec) -> None:
    """Refuse a change to an immutable field (TenantError naming it)."""
    for f, a, b in (("spec.subnets", old.subnets, new.subnets),
                    ("spec.nodeSubnetSize", old.node_subnet_size, new.node_subnet_size),
                    ("spec.vni", old.vni, new.vni)):
        if a != b:
            raise _fail(f, f"immutable: {a!r} -> {b!r} would renumber running pods; delete "
                        "the TenantNetwork and create it again")


def for_update(old: dict[str, Any] | None, new: dict[str, Any], now: str) -> dict[str, Any]:
    """The body to store for an apply: creation time kept (it orders conflicts), and
    an immutable field change refused (TenantError naming it) as an API server would."""
    if old is None:
        return {**new, "created": now}
    check_update(from_body(old), from_body({**new, "created": old.get("created", "")}))
    return {**new, "created": old.get("created", now)}


def from_body(body: dict[str, Any]) -> TenantSpec:
    """A datastore body ({"name", "spec", "created"}) as a TenantSpec."""
    return parse_tenant(str(body.get("name")), body.get("spec"), str(body.get("created") or ""))


def kube_body(raw: Any) -> dict[str, Any]:
    """The API server's TenantNetwork JSON -> the datastore body.

    The spec is not validated here: an invalid one must still reach `resolve`,
    which reports it as a condition (dropping it would hide it).
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("metadata"), dict):
        raise TenantError("metadata: missing")
    meta = raw["metadata"]
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise TenantError("metadata.name: missing")
    labels = meta.get("labels") or {}
    return {"name": name, "labels": labels if isinstance(labels, dict) else {},
            "spec": raw.get("spec"), "created": str(meta.get("creationTimestamp") or "")}


# -- the cluster-wide resolution ----------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    type: str      # Ready, VNIConflict, NamespaceConflict, SubnetOverlap, SubnetTooSmall, ...
    status: bool
    reason: str
    message: str   # names the field

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "status": "True" if self.status else "False",
                "reason": self.reason, "message": self.message}


@dataclass
class Tenant:
    """One tenant network as resolved: usable (`ok`) or not, and why."""

    spec: TenantSpec | None
    name: str
    vni: int = 0
    namespaces: list[str] = field(default_factory=list)
    slices: dict[str, str] = field(default_factory=dict)  # node -> slice CIDR
    conditions: list[Condition] = field(default_factory=list)
    ok: bool = False
    connected: list[str] = field(default_factory=list)  # tenants it may reach (and back)

    @property
    def zone(self) -> int:
        return self.vni

    def gateway(self, node: str) -> str:
        s = self.slices.get(node)
        return str(IPv4Network(s).network_address + 1) if s else ""


@dataclass
class Resolution:
    tenants: dict[str, Tenant]
    by_namespace: dict[str, str]   # namespace -> tenant name (usable or not)

    def of_namespace(self, ns: str) -> Tenant | None:
        name = self.by_namespace.get(ns)
        return self.tenants.get(name) if name else None


def auto_vni(name: str) -> int:
    """The first VNI tried for a tenant without spec.vni: a hash of its name."""
    return AUTO_VNI_MIN + zlib.crc32(name.encode()) % (VNI_MAX - AUTO_VNI_MIN + 1)


def node_index(pod_cidr: str, cluster_cidr: str) -> int:
    """Which node-sized block of the cluster CIDR a node's pod CIDR is."""
    net, cluster = IPv4Network(pod_cidr), IPv4Network(cluster_cidr)
    return (int(net.network_address) - int(cluster.network_address)) >> (32 - net.prefixlen)


def resolve(bodies: Iterable[dict[str, Any]], namespaces: Iterable[dict[str, Any]],
            nodes: Iterable[dict[str, Any]], cluster_cidr: str,
            encap: str = "geneve", recorded: Mapping[str, int] | None = None) -> Resolution:
    """Every tenant's VNI, namespaces, per-node slices and conditions; pure.

    Tenants are taken oldest first (creation time, then name), so when two
    conflict (the same VNI, the same namespace) the older keeps it and the
    newer gets a condition naming the field; other tenants are not affected.
    VNIs: `recorded` ones (name -> VNI, what the store kept; a record that
    disagrees with spec.vni is ignored) are given first; then, oldest first,
    each tenant takes its spec.vni (VNIConflict if in use) or auto_vni(name),
    or the next free value.
    """
    nodes = list(nodes)
    node_ips = {n["name"]: n.get("nodeIP", "") for n in nodes}
    tenants: dict[str, Tenant] = {}
    specs: list[TenantSpec] = []
    for b in bodies:
        name = str(b.get("name"))
        try:
            specs.append(from_body(b))
        except TenantError as e:
            reason = "VNIOutOfRange" if str(e).startswith("spec.vni:") else "Invalid"
            tenants[name] = Tenant(None, name, conditions=[
                Condition("Ready", False, reason, str(e))])
    specs.sort(key=lambda s: (s.created, s.name))
    used: dict[int, str] = {}
    held: dict[str, int] = {}  # the recorded VNIs given
    for s in specs:
        v = (recorded or {}).get(s.name)
        if v is not None and s.vni in (None, v) and VNI_MIN <= v <= VNI_MAX and v not in used:
            used[v], held[s.name] = s.name, v
    for s in specs:
        t = tenants[s.name] = Tenant(s, s.name)
        if encap == "none":
            t.conditions.append(Condition("Ready", False, "EncapRequired",
                                          "cluster encap is none (routed mode): a tenant "
                                          "network needs an encapsulation to carry its VNI"))
        if s.name in held:
            t.vni = held[s.name]
        elif s.vni is not None:
            if s.vni in used:
                t.conditions.append(Condition("VNIConflict", True, "VNIInUse",
                                              f"spec.vni: {s.vni} is already used by "
                                              f"TenantNetwork {used[s.vni]}"))
            else:
                used[s.vni] = s.name
                t.vni = s.vni
        else:
            v = auto_vni(s.name)
            while v in used:
                v = AUTO_VNI_MIN if v >= VNI_MAX else v + 1
            used[v] = s.name
            t.vni = v
        for ip_name, ip in node_ips.items():
            if ip and any(IPv4Address(ip) in IPv4Network(n) for n in s.subnets):
                t.conditions.append(Condition("SubnetOverlap", True, "OverlapsNodeAddress",
                                              f"spec.subnets: contains node {ip_name}'s "
                                              f"address {ip}"))
    claimed: dict[str, str] = {}
    for s in specs:
        t = tenants[s.name]
        for ns in sorted(namespaces, key=lambda n: str(n.get("name"))):
            nsname = str(ns.get("name"))
            if not s.selects(ns.get("labels") or {}):
                continue
            if nsname in claimed:
                t.conditions.append(Condition(
                    "NamespaceConflict", True, "NamespaceClaimed",
                    f"spec.namespaceSelector: namespace {nsname} is already in TenantNetwork "
                    f"{claimed[nsname]}; its pods stay there"))
                continue
            claimed[nsname] = s.name
            t.namespaces.append(nsname)
        for n in nodes:
            try:
                idx = node_index(n["podCIDR"], cluster_cidr)
            except (KeyError, ValueError):
                continue
            sl = s.slice_for(idx)
            if sl is None:
                t.conditions.append(Condition(
                    "SubnetTooSmall", True, "NoSliceForNode",
                    f"spec.subnets: no /{s.node_subnet_size} slice left for node {n['name']} "
                    f"(node index {idx}); its pods of this network cannot start"))
            else:
                t.slices[n["name"]] = sl
    for t in tenants.values():
        t.ok = t.spec is not None and not any(
            c.type in ("VNIConflict", "SubnetOverlap", "Ready") for c in t.conditions)
        if t.ok:
            t.conditions.insert(0, Condition("Ready", True, "Resolved",
                                             f"VNI {t.vni}, zone {t.zone}"))
    for t in tenants.values():
        if not (t.ok and t.spec):
            continue
        for i, other in enumerate(t.spec.connect_to):
            o = tenants.get(other)
            why = ""
            if o is None or o.spec is None:
                why = f"no usable TenantNetwork {other}"
            elif not o.ok:
                why = f"TenantNetwork {other} is not usable"
            elif t.name not in o.spec.connect_to:
                why = f"TenantNetwork {other} does not list {t.name} in its spec.connectTo"
            elif any(IPv4Network(a).overlaps(IPv4Network(b))
                     for a in t.spec.subnets for b in o.spec.subnets):
                why = (f"the subnets of {t.name} and {other} overlap: an address would "
                       "name two pods")
            if why:
                t.conditions.append(Condition("ConnectRefused", True, "NotConnected",
                                              f"spec.connectTo[{i}]: {why}"))
            else:
                t.connected.append(other)
    # Unusable tenants keep their namespaces: their pods must fail to start with the
    # reason, not quietly join the default network.
    by_ns = {ns: t.name for t in tenants.values() for ns in t.namespaces}
    return Resolution(tenants, by_ns)
