"""Node ports for the embedded store: what kube-apiserver's node-port allocator does.

In a Kubernetes cluster the API server checks every nodePort against its
range, refuses one another Service holds, and picks a free one when a
NodePort or LoadBalancer Service leaves it out. With the embedded store,
`flowctl apply -f` is the API side, so it does the same here, against the
cluster's `node_port_range`. A port keeps the node port it was given by an
earlier apply of the same Service (a re-apply of an unchanged file changes
nothing), and ports of one Service with the same port number but different
protocols share one node port, as Kubernetes allocates them.

A missing node port is picked at random among the free ones, as the API
server's allocator does, and from the upper part of the range first: the
bottom `static_band` ports are left to Services that name their nodePort
(Kubernetes' node-port static subrange, KEP-3668), so a port chosen by hand
is rarely already taken by an allocation. Random, not lowest-free: two
clusters (or a cluster rebuilt) do not hand the same port to different
Services by construction, and nothing comes to depend on allocation order.

Pure: takes the objects to apply and the Services already stored, returns
the objects with node ports filled in; no I/O.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence
from typing import Any

Obj = tuple[str, str, str, dict[str, Any]]  # kind, namespace, name, body (manifests.load)


class NodePortError(ValueError):
    """A node port that cannot be given; the message names the Service and the field."""


def wants_node_ports(spec: dict[str, Any]) -> bool:
    """Whether Kubernetes would allocate node ports for this spec."""
    stype = spec.get("type", "ClusterIP")
    if stype == "NodePort":
        return True
    return stype == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False


def _ports(body: dict[str, Any]) -> list[dict[str, Any]]:
    spec = body.get("spec")
    ports = spec.get("ports") if isinstance(spec, dict) else None
    return [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []


def wants_health_check(spec: dict[str, Any]) -> bool:
    """Whether Kubernetes would allocate a healthCheckNodePort for this spec."""
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


HEALTH = ("health", None)  # the healthCheckNodePort's key among a Service's port keys


def _key(p: dict[str, Any]) -> tuple[str, Any]:
    return str(p.get("protocol", "TCP")), p.get("port")


Slot = tuple[str, tuple[str, Any], dict[str, Any], str]  # field, key, holder dict, its key


def _slots(body: dict[str, Any], wanted_only: bool) -> list[Slot]:
    """Where a Service holds node ports: each port's nodePort and the healthCheckNodePort
    (wanted_only: only those Kubernetes would allocate for its type)."""
    spec = body.get("spec")
    if not isinstance(spec, dict):
        return []
    out: list[Slot] = []
    if not wanted_only or wants_node_ports(spec):
        out += [(f"spec.ports[{i}].nodePort", _key(p), p, "nodePort")
                for i, p in enumerate(_ports(body))]
    if not wanted_only or wants_health_check(spec):
        out.append(("spec.healthCheckNodePort", HEALTH, spec, "healthCheckNodePort"))
    return out


def _given(slot: Slot) -> int | None:
    v = slot[2].get(slot[3])
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def static_band(lo: int, hi: int) -> int:
    """How many ports at the bottom of lo-hi an allocation takes only when the rest
    is full: min(max(16, size / 32), 128), Kubernetes' formula (86 of 30000-32767)."""
    return min(max(16, (hi - lo + 1) // 32), 128)


def pick(lo: int, hi: int, taken: dict[int, str] | set[int], rng: random.Random
         ) -> int | None:
    """A random free port of lo-hi (None when none is): the upper band first, then
    the static band. A few random draws, then a scan of what is free (a nearly
    full range), so every free port can still be found."""
    off = static_band(lo, hi)
    bands = [(lo + off, hi), (lo, lo + off - 1)] if off < hi - lo + 1 else [(lo, hi)]
    for a, b in bands:
        for _ in range(32):
            n = rng.randint(a, b)
            if n not in taken:
                return n
        free = [n for n in range(a, b + 1) if n not in taken]
        if free:
            return rng.choice(free)
    return None


def assign(objs: Sequence[Obj], stored: Iterable[dict[str, Any]],
           node_port_range: tuple[int, int], rng: random.Random | None = None) -> list[Obj]:
    """`objs` with every missing nodePort of a NodePort/LoadBalancer Service, and the
    healthCheckNodePort of a LoadBalancer with externalTrafficPolicy Local, allocated.

    `stored`: the Service bodies in the store now ({"namespace", "name", "spec"}).
    Raises NodePortError when a given node port is held by another Service or
    when the range has no free port left. `rng`: where random picks come from
    (tests pass a seeded one).
    """
    lo, hi = node_port_range
    rng = rng or random.Random()
    applying = {(ns, n) for k, ns, n, _ in objs if k == "Service"}
    previous: dict[tuple[str, str], dict[tuple[str, Any], int]] = {}
    holder: dict[int, str] = {}  # node port -> "ns/name" of the Service holding it
    for b in stored:
        ident = (str(b.get("namespace")), str(b.get("name")))
        given = {sl[1]: v for sl in _slots(b, False) if (v := _given(sl)) is not None}
        previous[ident] = given
        if ident not in applying:
            for held in given.values():
                holder.setdefault(held, "/".join(ident))
    services = [(ns, name, body) for kind, ns, name, body in objs if kind == "Service"]
    # Ports named in the file are taken first, so an allocation never steals one.
    for ns, name, body in services:
        me = f"{ns}/{name}"
        for sl in _slots(body, False):
            val = _given(sl)
            if val is None:
                continue
            other = holder.get(val)
            if other is not None and other != me:
                raise NodePortError(f"Service {me}: {sl[0]}: {val} is already used by "
                                    f"Service {other}")
            holder[val] = me
    # Then the ports each re-applied Service had before, so that they stay its own.
    kept: dict[tuple[str, str], dict[tuple[str, Any], int]] = {}
    for ns, name, body in services:
        me = f"{ns}/{name}"
        for sl in _slots(body, True):
            old = previous.get((ns, name), {}).get(sl[1])
            if _given(sl) is not None or old is None or not lo <= old <= hi \
                    or holder.get(old, me) != me:
                continue
            kept.setdefault((ns, name), {})[sl[1]] = old
            holder[old] = me
    out: list[Obj] = []
    for kind, ns, name, body in objs:
        if kind != "Service" or all(_given(sl) is not None for sl in _slots(body, True)):
            out.append((kind, ns, name, body))
            continue
        me = f"{ns}/{name}"
        body = copy.deepcopy(body)
        slots = _slots(body, True)
        by_number: dict[Any, int] = {sl[1][1]: v for sl in slots
                                     if sl[1] != HEALTH and (v := _given(sl)) is not None}
        mine = kept.get((ns, name), {})
        for field, key, where, attr in slots:
            if _given((field, key, where, attr)) is not None:
                continue
            np: int | None = mine.get(key, None if key == HEALTH else by_number.get(key[1]))
            if np is None:
                np = pick(lo, hi, holder, rng)
                if np is None:
                    raise NodePortError(f"Service {me}: {field}: no free node port left in "
                                        f"{lo}-{hi}")
            where[attr] = np
            holder[np] = me
            if key != HEALTH:
                by_number.setdefault(key[1], np)
        out.append((kind, ns, name, body))
    return out
