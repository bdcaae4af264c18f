"""Kubernetes YAML in, datastore objects out, with errors that name the field.

Both datastores feed the agent the same small shapes (see `to_object`), so
the agent's model never sees raw API objects. `flowctl apply -f` and the
Kubernetes watchers both go through here.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from flowcni.datastore import tenantconv
from flowcni.flows.clusterpolicy import API_VERSIONS as CLUSTER_POLICY_KINDS
from flowcni.flows.clusterpolicy import parse_cluster_policy
from flowcni.flows.nodeport import NODE_PORT_RANGE
from flowcni.flows.policy import PolicyError, parse_policy
from flowcni.flows.services import ServiceError, parse_service

# kind -> apiVersion we accept
SUPPORTED = {"Namespace": "v1", "NetworkPolicy": "networking.k8s.io/v1", "Service": "v1",
             tenantconv.KIND: tenantconv.API_VERSION,
             **CLUSTER_POLICY_KINDS}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ManifestError(ValueError):
    """Invalid manifest; the message starts with the object and the field path."""


def _fail(where: str, field: str, why: str) -> ManifestError:
    return ManifestError(f"{where}: {field}: {why}")


def validate_labels(where: str, field: str, labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise _fail(where, field, "must be a map of strings")
    out = {}
    for k, v in labels.items():
        if not isinstance(k, str):
            raise _fail(where, field, f"key {k!r} is not a string")
        prefix, _, name = k.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN_RE.match(prefix)):
            raise _fail(where, f"{field}.{k}", "prefix is not a DNS subdomain")
        if not name or len(name) > 63 or not LABEL_NAME_RE.match(name):
            raise _fail(where, f"{field}.{k}", "invalid label key")
        v = "" if v is None else str(v) if isinstance(v, (int, float, bool)) else v
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE_RE.match(v):
            raise _fail(where, f"{field}.{k}", f"invalid label value {v!r}")
        out[k] = v
    return out


def to_object(doc: Any, index: int = 0, identity_only: bool = False,
              node_port_range: tuple[int, int] = NODE_PORT_RANGE,
              require_node_ports: bool = True) -> tuple[str, str, str, dict[str, Any]]:
    """(kind, namespace, name, body) for one manifest, validated.

    identity_only: for deletions, only kind, apiVersion and metadata count.
    node_port_range, require_node_ports: for Services (see parse_exposure);
    `flowctl apply` passes the cluster's range and allocates missing node ports.
    """
    if not isinstance(doc, dict):
        raise ManifestError(f"document {index}: not a mapping")
    kind = doc.get("kind")
    where = f"document {index} ({kind or '?'})"
    if kind not in SUPPORTED:
        raise _fail(where, "kind", f"{kind!r} not supported (supported: "
                    f"{', '.join(sorted(SUPPORTED))})")
    assert isinstance(kind, str)
    if doc.get("apiVersion") != SUPPORTED[kind]:
        raise _fail(where, "apiVersion", f"{doc.get('apiVersion')!r}; {kind} needs "
                    f"{SUPPORTED[kind]!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise _fail(where, "metadata", "missing")
    name = meta.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 63:
        raise _fail(where, "metadata.name", f"{name!r} is not a DNS-1123 label")
    where = f"{kind} {name}"
    labels = validate_labels(where, "metadata.labels", meta.get("labels"))
    if kind == "Namespace":
        return kind, "", name, {"name": name, "labels": labels}
    if kind == tenantconv.KIND:  # cluster-scoped
        if not identity_only:
            try:
                tenantconv.parse_tenant(name, doc.get("spec"))
            except tenantconv.TenantError as e:
                raise ManifestError(f"{where}: {e}") from e
        return kind, "", name, {"name": name, "labels": labels, "spec": doc.get("spec")}
    if kind in CLUSTER_POLICY_KINDS:  # cluster-scoped, both API versions
        if meta.get("namespace"):
            raise _fail(where, "metadata.namespace", f"{kind} is cluster-scoped")
        if identity_only:
            return kind, "", name, {}
        try:
            parse_cluster_policy(kind, name, doc.get("spec"))
        except PolicyError as e:
            raise ManifestError(f"{where}: {e}") from e
        return kind, "", name, {"name": name, "labels": labels, "spec": doc["spec"]}
    ns = meta.get("namespace") or "default"
    if not isinstance(ns, str) or not NAME_RE.match(ns):
        raise _fail(where, "metadata.namespace", f"{ns!r} is not a DNS-1123 label")
    where = f"{kind} {ns}/{name}"
    if identity_only:
        return kind, ns, name, {}
    spec = doc.get("spec")
    if kind == "Service":
        try:
            parse_service(ns, name, spec, doc.get("status"), node_port_range,
                          require_node_ports)
        except ServiceError as e:
            raise ManifestError(f"{where}: {e}") from e
        assert isinstance(spec, dict)
        validate_labels(where, "spec.selector", spec.get("selector"))
        body = {"namespace": ns, "name": name, "labels": labels, "spec": spec}
        if isinstance(doc.get("status"), dict):  # LoadBalancer ingress IPs
            body["status"] = doc["status"]
        return kind, ns, name, body
    try:
        parse_policy(ns, name, spec)
    except PolicyError as e:
        raise ManifestError(f"{where}: {e}") from e
    assert isinstance(spec, dict)  # parse_policy checked it
    for d in ("ingress", "egress"):
        for i, r in enumerate(spec.get(d) or []):
            peers = (r or {}).get("from" if d == "ingress" else "to") or []
            for j, peer in enumerate(peers):
                for sk in ("podSelector", "namespaceSelector"):
                    sel = (peer or {}).get(sk) or {}
                    validate_labels(where, f"spec.{d}[{i}].{'from' if d == 'ingress' else 'to'}"
                                    f"[{j}].{sk}.matchLabels", sel.get("matchLabels"))
    validate_labels(where, "spec.podSelector.matchLabels",
                    (spec.get("podSelector") or {}).get("matchLabels"))
    return kind, ns, name, {"namespace": ns, "name": name, "labels": labels, "spec": spec}


def load(text: str, identity_only: bool = False,
         node_port_range: tuple[int, int] = NODE_PORT_RANGE,
         require_node_ports: bool = True) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Every document of a (multi-document) YAML text; all or nothing."""
    opts = (identity_only, node_port_range, require_node_ports)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError(f"not valid YAML: {e}") from e
    if not docs:
        raise ManifestError("no objects in the file")
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and d.get("kind") == "List":
            out += [to_object(x, i, *opts) for x in d.get("items") or []]
        else:
            out.append(to_object(d, i, *opts))
    return out
