"""What the agent needs from a datastore, and how one is chosen.

Two implementations: the embedded SQLite store (`datastore.store.Store`,
`sqlite:PATH`) and the Kubernetes API (`kubernetes`, datastore.kube, on the
small stdlib client in datastore.kubeapi).
Both hand the agent the same small object shapes (see controller.manifests)
and the same ordered change stream, so nothing above this seam knows which
one it talks to.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from flowcni.datastore.store import (
    CLUSTER_CONFIG_ENV,
    Change,
    ClusterConfig,
    Store,
    load_cluster_config,
)


class Datastore(Protocol):
    def cluster(self) -> ClusterConfig:
        """Cluster-wide settings (CIDR, encapsulation, masquerade, MTU)."""

    def register_node(self, name: str, node_ip: str, pod_cidr: str | None = None) -> str:
        """Record this node (where the datastore allows it) and return its pod CIDR."""

    def objects(self, kind: str) -> list[dict[str, Any]]:
        """Current objects of a kind: Node, Namespace, Pod, NetworkPolicy, ..."""

    def revision(self) -> int:
        """A revision to watch from; taken before listing."""

    def wait_synced(self) -> bool:
        """Until every kind can be listed whole (the API server's first lists).

        The agent takes its watch revision after this: taken earlier, the
        first watch batch would deliver again everything listed after it.
        """

    def watch(self, since: int, callback: Callable[[list[Change]], None],
              stop: threading.Event, interval: float = 0.05) -> None:
        """Deliver every change after `since`, in order, until `stop` is set."""

    def close(self, timeout: float = 5.0) -> None:
        """Stop background work and close connections, within about `timeout` seconds."""


def open_datastore(spec: str, kubeconfig: str | None = None) -> Datastore | None:
    """`none`, `sqlite:PATH` or `kubernetes`."""
    if spec == "none":
        return None
    if spec.startswith("sqlite:"):
        store = Store(spec.split(":", 1)[1])
        if os.environ.get(CLUSTER_CONFIG_ENV):
            # A node on a store of its own (no lab to set them): the cluster's
            # settings from the same file the DaemonSet's ConfigMap holds.
            store.set_cluster(load_cluster_config(os.environ[CLUSTER_CONFIG_ENV]))
        return store
    if spec == "kubernetes":
        from flowcni.datastore.kube import KubeDatastore  # its HTTP client only when used
        return KubeDatastore(kubeconfig)
    raise ValueError(f"--datastore {spec!r}: use sqlite:PATH, kubernetes or none")
