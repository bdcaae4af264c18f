"""Node ports for the embedded store: what kube-apiserver's node-port allocator does.

In a Kubernetes cluster the API server checks every nodePort against its
range, refuses one another Service holds, and picks a free one when a
NodePort or LoadBalancer Service leaves it out. With the embedded store,
`flowctl apply -f` is the API side, so it does the same here, against the
cluster's `node_port_range`. A port keeps the node port it was given by an
earlier apply of the same Service (a re-apply of an unchanged file changes
nothing), and ports of one Service with the same port number but different
protocols share one node port, as Kubernetes allocates them.

Pure: takes the objects to apply and the Services already stored, returns
the objects with node ports filled in; no I/O.
"""

from __future__ import annotations

import copy
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


def _key(p: dict[str, Any]) -> tuple[str, Any]:
    return str(p.get("protocol", "TCP")), p.get("port")


def assign(objs: Sequence[Obj], stored: Iterable[dict[str, Any]],
           node_port_range: tuple[int, int]) -> list[Obj]:
    """`objs` with every missing nodePort of a NodePort/LoadBalancer Service allocated.

    `stored`: the Service bodies in the store now ({"namespace", "name", "spec"}).
    Raises NodePortError when a given nodePort is held by another Service or
    when the range has no free port left.
    """
    lo, hi = node_port_range
    applying = {(ns, n) for k, ns, n, _ in objs if k == "Service"}
    previous: dict[tuple[str, str], dict[tuple[str, Any], int]] = {}
    holder: dict[int, str] = {}  # node port -> "ns/name" of the other Service holding it
    for b in stored:
        ident = (str(b.get("namespace")), str(b.get("name")))
        given = {_key(p): p["nodePort"] for p in _ports(b)
                 if isinstance(p.get("nodePort"), int)}
        previous[ident] = given
        if ident not in applying:
            for np in given.values():
                holder.setdefault(np, "/".join(ident))
    # Ports named in the file are taken first, so an allocation never steals one.
    for kind, ns, name, body in objs:
        if kind != "Service":
            continue
        for i, p in enumerate(_ports(body)):
            np = p.get("nodePort")
            if not isinstance(np, int):
                continue
            other = holder.get(np)
            if other is not None and other != f"{ns}/{name}":
                raise NodePortError(f"Service {ns}/{name}: spec.ports[{i}].nodePort: {np} is "
                                    f"already used by Service {other}")
            holder[np] = f"{ns}/{name}"
    # Then the ports each re-applied Service had before, so that they stay its own.
    kept: dict[tuple[str, str], dict[tuple[str, Any], int]] = {}
    for kind, ns, name, body in objs:
        spec = body.get("spec")
        if kind != "Service" or not isinstance(spec, dict) or not wants_node_ports(spec):
            continue
        for p in _ports(body):
            old = previous.get((ns, name), {}).get(_key(p))
            if isinstance(p.get("nodePort"), int) or old is None or not lo <= old <= hi \
                    or holder.get(old, f"{ns}/{name}") != f"{ns}/{name}":
                continue
            kept.setdefault((ns, name), {})[_key(p)] = old
            holder[old] = f"{ns}/{name}"
    out: list[Obj] = []
    free = (n for n in range(lo, hi + 1))
    for kind, ns, name, body in objs:
        spec = body.get("spec")
        if kind != "Service" or not isinstance(spec, dict) or not wants_node_ports(spec) \
                or all(isinstance(p.get("nodePort"), int) for p in _ports(body)):
            out.append((kind, ns, name, body))
            continue
        me = f"{ns}/{name}"
        body = copy.deepcopy(body)
        by_number: dict[Any, int] = {p["port"]: p["nodePort"] for p in _ports(body)
                                     if isinstance(p.get("nodePort"), int)}
        mine = kept.get((ns, name), {})
        for i, p in enumerate(_ports(body)):
            if isinstance(p.get("nodePort"), int):
                continue
            np = mine.get(_key(p), by_number.get(p.get("port")))
            if np is None:
                np = next((n for n in free if n not in holder), None)
                if np is None:
                    raise NodePortError(f"Service {me}: spec.ports[{i}].nodePort: no free node "
                                        f"port left in {lo}-{hi}")
            p["nodePort"] = np
            holder[np] = me
            by_number.setdefault(p.get("port"), np)
        out.append((kind, ns, name, body))
    return out
