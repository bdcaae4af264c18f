"""Pods attached through CNI become Pod objects in the embedded store.

With the Kubernetes datastore the API server knows every pod (kubelet reports
it) and the agent only reads. With the embedded store nobody plays kubelet:
a pod started by podman or containerd would have an address and flows but no
Pod object, so no NetworkPolicy would select it. When the runtime names the
pod (``K8S_POD_NAMESPACE`` and ``K8S_POD_NAME`` in CNI_ARGS), the agent writes
that object itself: namespace, name, node, IP, container id, and labels.

Labels come from CNI_ARGS ``FLOWCNI_POD_LABELS=key=value,key2=value2``
(podman passes the ``CNI_ARGS`` of its own environment through to plugins).
Without it, the labels of an existing record for the same pod are kept, so
a label set by ``flowctl``/the lab survives a re-ADD.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

#: CNI_ARGS key carrying the pod's labels.
LABELS_ARG = "FLOWCNI_POD_LABELS"

# Kubernetes label syntax: an optional DNS-subdomain prefix and a name of at
# most 63 characters; values of at most 63 characters, possibly empty.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
_VALUE = re.compile(rf"({_NAME})?")


class LabelError(ValueError):
    """CNI_ARGS labels that are not Kubernetes labels."""


def parse_labels(text: str) -> dict[str, str]:
    """``"app=web,tier=db"`` -> ``{"app": "web", "tier": "db"}``; LabelError naming the bad one."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise LabelError(f"CNI_ARGS {LABELS_ARG}: {item!r} is not a key=value label")
        labels[key] = value
    return labels


class PodStore(Protocol):
    """What this needs of the embedded store (flowcni.datastore.store.Store)."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...
    def put(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> int: ...
    def delete(self, kind: str, namespace: str, name: str) -> bool: ...


class PodRecords:
    """Writes and removes the Pod objects of this node's CNI attachments.

    Writes run on one thread of their own: the store keeps a SQLite
    connection per thread, and CNI requests each arrive on a fresh thread.
    """

    def __init__(self, store: PodStore, node: str) -> None:
        self.store, self.node = store, node
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-records")

    def attached(self, namespace: str, name: str, ip: str, container_id: str,
                 labels: dict[str, str] | None) -> None:
        self._writer.submit(self._attached, namespace, name, ip, container_id, labels).result()

    def detached(self, namespace: str, name: str, container_id: str) -> None:
        """Remove the record, unless it now describes another container of that name."""
        self._writer.submit(self._detached, namespace, name, container_id).result()

    def _attached(self, namespace: str, name: str, ip: str, container_id: str,
                  labels: dict[str, str] | None) -> None:
        old = self.store.get("Pod", namespace, name) or {}
        self.store.put("Pod", namespace, name, {
            "namespace": namespace, "name": name,
            "labels": labels if labels is not None else dict(old.get("labels") or {}),
            "ip": ip, "node": self.node, "containerID": container_id,
            "ports": list(old.get("ports") or [])})

    def _detached(self, namespace: str, name: str, container_id: str) -> None:
        old = self.store.get("Pod", namespace, name)
        if old is not None and old.get("containerID") in (container_id, None, ""):
            self.store.delete("Pod", namespace, name)
