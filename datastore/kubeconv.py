"""Kubernetes API objects (raw JSON dicts) -> the small shapes the agent uses.

The Kubernetes datastore hands the agent exactly what the embedded store
does (see controller.store and controller.datastore), so these functions are
the whole difference between the two as far as the agent's model goes.
They take the API server's raw camelCase JSON rather than the client's
models: the models rename every field to snake_case, would have to be
turned back for NetworkPolicy specs (which policy code reads as YAML
shapes), and fail a whole list when a single object does not deserialise.

Every function is pure and raises `Malformed` (naming the object) for an
object the agent cannot use; the watcher logs it, drops any older copy and
keeps going, so one bad object never stops the rest from flowing.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from typing import Any

Body = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped kinds


class Malformed(ValueError):
    """An API object the agent cannot use; the message starts with its kind and name."""


def object_key(kind: str, raw: Any) -> Key:
    """(namespace, name) of a raw object, or Malformed when its metadata is unusable."""
    if not isinstance(raw, dict):
        raise Malformed(f"{kind} (unnamed): not a JSON object")
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        raise Malformed(f"{kind} (unnamed): metadata is not an object")
    name, ns = meta.get("name"), meta.get("namespace", "") or ""
    if not isinstance(name, str) or not name:
        raise Malformed(f"{kind} (unnamed): metadata.name missing")
    if not isinstance(ns, str):
        raise Malformed(f"{kind} {name}: metadata.namespace is not a string")
    return ns, name


def resource_version(raw: Any) -> str | None:
    """metadata.resourceVersion, if the object has a readable one (also for bookmarks)."""
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


def ref(kind: str, key: Key) -> str:
    return f"{kind} {key[0]}/{key[1]}" if key[0] else f"{kind} {key[1]}"


def _labels(where: str, meta: dict[str, Any]) -> dict[str, str]:
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Malformed(f"{where}: metadata.labels is not a map of strings")
    return dict(labels)


def _dict(where: str, raw: dict[str, Any], field: str, required: bool = True) -> dict[str, Any]:
    value = raw.get(field)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"{where}: {field} is not an object")
    return value


def _list(where: str, raw: dict[str, Any], field: str) -> list[Any]:
    value = raw.get(field)
    if value is None:
        return []
    if not isinstance(value, list):
        raise Malformed(f"{where}: {field} is not a list")
    return value


def node_internal_ip(raw: dict[str, Any]) -> str | None:
    """The first InternalIP of status.addresses, IPv4 preferred (tunnels are IPv4 for now)."""
    status = raw.get("status")
    addrs = status.get("addresses") if isinstance(status, dict) else None
    found: list[str] = [a["address"] for a in addrs or [] if isinstance(a, dict)
                        and a.get("type") == "InternalIP" and isinstance(a.get("address"), str)]
    v4 = [a for a in found if "." in a]
    return (v4 or found)[0] if found else None


def node(raw: Any) -> Body:
    """{"name", "nodeIP", "podCIDR"}: what a peer needs to reach the node's pods."""
    key = object_key("Node", raw)
    where = ref("Node", key)
    spec = _dict(where, raw, "spec", required=False)
    cidr = spec.get("podCIDR")
    if not isinstance(cidr, str) or not cidr:
        raise Malformed(f"{where}: no spec.podCIDR (is the controller manager allocating "
                        "node CIDRs?)")
    ip = node_internal_ip(raw)
    if ip is None:
        raise Malformed(f"{where}: no InternalIP in status.addresses")
    try:
        ipaddress.ip_network(cidr)
        ipaddress.ip_address(ip)
    except ValueError as e:
        raise Malformed(f"{where}: {e}") from e
    # labels (when it has any): egress `nodes` peers of cluster policies select by them
    labels = _labels(where, raw["metadata"])
    return {"name": key[1], "nodeIP": ip, "podCIDR": cidr, **({"labels": labels} if labels else {})}


def namespace(raw: Any) -> Body:
    """{"name", "labels"}: namespace selectors of policies match on these labels."""
    key = object_key("Namespace", raw)
    return {"name": key[1], "labels": _labels(ref("Namespace", key), raw["metadata"])}


# A pod that has terminated keeps status.podIP, but the address may already
# belong to a new pod on the node, so it must not stand for this one any more.
TERMINATED_PHASES = ("Succeeded", "Failed")


def pod_ip(raw: dict[str, Any]) -> str:
    """status.podIPs[0] (or the older status.podIP); "" if none yet or terminated."""
    status = raw.get("status")
    if not isinstance(status, dict) or status.get("phase") in TERMINATED_PHASES:
        return ""
    ips = status.get("podIPs")
    if isinstance(ips, list) and ips and isinstance(ips[0], dict):
        ip = ips[0].get("ip")
    else:
        ip = status.get("podIP")
    if not ip:
        return ""
    if not isinstance(ip, str):
        raise ValueError(f"status.podIP {ip!r} is not a string")
    ipaddress.ip_address(ip)
    return ip


def container_ports(where: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Named ports of every container, sidecar init containers included (they serve too)."""
    containers = list(_list(where, spec, "containers"))
    containers += [c for c in _list(where, spec, "initContainers")
                   if isinstance(c, dict) and c.get("restartPolicy") == "Always"]
    out = []
    for c in containers:
        if not isinstance(c, dict):
            raise Malformed(f"{where}: a container is not an object")
        for p in _list(where, c, "ports"):
            port = p.get("containerPort") if isinstance(p, dict) else None
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise Malformed(f"{where}: container {c.get('name')!r}: bad containerPort "
                                f"{port!r}")
            out.append({"name": p.get("name") or "", "containerPort": port,
                        "protocol": p.get("protocol") or "TCP"})
    return out


def pod(raw: Any) -> Body:
    """{"namespace", "name", "labels", "ip", "node", "ports"} for policy and services.

    A hostNetwork pod (kube-proxy, the flowcni agent itself, ...) is not on
    the pod network: its status.podIP is its node's address. It gets ip ""
    here, as a pod without an address does, so it never becomes a policy
    subject or peer by its labels (NetworkPolicy does not apply to
    host-network pods; their traffic is the node's, which ipBlock rules and
    the node's own host-traffic rule cover).
    """
    key = object_key("Pod", raw)
    where = ref("Pod", key)
    spec = _dict(where, raw, "spec", required=False)
    node_name = spec.get("nodeName") or ""
    if not isinstance(node_name, str):
        raise Malformed(f"{where}: spec.nodeName is not a string")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise Malformed(f"{where}: spec.hostNetwork is not a boolean")
    try:
        ip = "" if host_network else pod_ip(raw)
    except ValueError as e:
        raise Malformed(f"{where}: {e}") from e
    return {"namespace": key[0], "name": key[1], "labels": _labels(where, raw["metadata"]),
            "ip": ip, "node": node_name, "ports": container_ports(where, spec)}


def network_policy(raw: Any) -> Body:
    """{"namespace", "name", "spec"}: the spec verbatim (camelCase), as policy code reads YAML."""
    key = object_key("NetworkPolicy", raw)
    spec = _dict(ref("NetworkPolicy", key), raw, "spec")
    return {"namespace": key[0], "name": key[1], "spec": copy.deepcopy(spec)}


def service(raw: Any) -> Body:
    """{"namespace", "name", "spec", "status"}: what the Service proxy programs
    (flows.services; the status for LoadBalancer ingress IPs)."""
    key = object_key("Service", raw)
    spec = _dict(ref("Service", key), raw, "spec")
    body: Body = {"namespace": key[0], "name": key[1], "spec": copy.deepcopy(spec)}
    status = raw.get("status")
    if isinstance(status, dict) and status.get("loadBalancer"):
        body["status"] = {"loadBalancer": copy.deepcopy(status["loadBalancer"])}
    return body


def endpoint_slice(raw: Any) -> Body:
    """{"namespace", "name", "labels", "endpoints", "ports", "addressType"}: a Service's
    endpoints for the proxy (flows.services.slice_endpoints)."""
    key = object_key("EndpointSlice", raw)
    where = ref("EndpointSlice", key)
    address_type = raw.get("addressType")
    if not isinstance(address_type, str):
        raise Malformed(f"{where}: addressType missing")
    return {"namespace": key[0], "name": key[1], "labels": _labels(where, raw["metadata"]),
            "endpoints": copy.deepcopy(_list(where, raw, "endpoints")),
            "ports": copy.deepcopy(_list(where, raw, "ports")), "addressType": address_type}


def tenant_network(raw: Any) -> Body:
    """{"name", "spec", "created"}: validated (datastore.tenantconv names the field)."""
    from flowcni.datastore.tenantconv import TenantError, kube_body
    try:
        return kube_body(raw)
    except TenantError as e:
        raise Malformed(str(e)) from e


def cluster_policy(kind: str) -> Callable[[Any], Body]:
    """{"name", "labels", "spec"} of a cluster-scoped policy.networking.k8s.io object
    (AdminNetworkPolicy, BaselineAdminNetworkPolicy, ClusterNetworkPolicy): the spec
    verbatim, parsed and validated by flows.clusterpolicy, which logs and skips a bad one."""
    def convert(raw: Any) -> Body:
        key = object_key(kind, raw)
        where = ref(kind, key)
        if key[0]:
            raise Malformed(f"{where}: has a namespace; {kind} is cluster-scoped")
        return {"name": key[1], "labels": _labels(where, raw["metadata"]),
                "spec": copy.deepcopy(_dict(where, raw, "spec"))}
    return convert


CLUSTER_POLICY_KINDS = ("AdminNetworkPolicy", "BaselineAdminNetworkPolicy",
                        "ClusterNetworkPolicy")

CONVERTERS: dict[str, Callable[[Any], Body]] = {
    "Node": node, "Namespace": namespace, "Pod": pod, "NetworkPolicy": network_policy,
    "Service": service, "EndpointSlice": endpoint_slice, "TenantNetwork": tenant_network,
    **{k: cluster_policy(k) for k in CLUSTER_POLICY_KINDS},
}


def convert(kind: str, raw: Any) -> tuple[Key, Body]:
    """(key, body) of a raw object; Malformed for anything the agent cannot use.

    Any unexpected error inside a converter is reported as Malformed too: a
    surprising object must cost that object, never the watch.
    """
    key = object_key(kind, raw)
    try:
        return key, CONVERTERS[kind](raw)
    except Malformed:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise Malformed(f"{ref(kind, key)}: {type(e).__name__}: {e}") from e
