"""Remote nodes as the agent sees them, and what each one costs locally.

Encapsulating clusters: one L3Forwarding flow per remote node (its pod CIDR
into the tunnel, towards its node IP), plus one route for the whole cluster
CIDR through the gateway so the node itself reaches remote pods through the
tunnel too, from its gateway address (the route's source), which keeps the
replies on the tunnel (see flows/tunnel.py). Routed clusters: no flows, one
kernel route per remote node (`podCIDR via nodeIP`): the node reaches remote
pods from its node IP over the underlay, and replies route back the same way.
A node that joins or leaves changes only its own flow and route.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from flowcni.controller import hostnet
from flowcni.controller.flowsync import FlowSync
from flowcni.datastore.store import Change, ClusterConfig
from flowcni.flows.model import Flow
from flowcni.flows.node import Gateway
from flowcni.flows.tunnel import RemoteNode, remote_node_flows

LOG = logging.getLogger(__name__)


def remote_node(body: dict[str, Any]) -> RemoteNode | None:
    """A datastore Node as a remote node; None (logged) if it cannot be used."""
    try:
        return RemoteNode(body["name"], body["nodeIP"], body["podCIDR"])
    except (KeyError, TypeError):
        LOG.error("skipping malformed node %r", body)
        return None


class Peers:
    """Keeps flows and routes in step with the set of remote nodes."""

    def __init__(self, me: str, cfg: ClusterConfig, gw: Gateway, tun_ofport: int | None,
                 flows: FlowSync) -> None:
        self.me, self.cfg, self.gw, self.tun_ofport, self.flows = me, cfg, gw, tun_ofport, flows
        self.nodes: dict[str, RemoteNode] = {}
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] = lambda: None

    def routes(self) -> dict[str, tuple[str | None, str | None]]:
        if self.cfg.encap == "none":
            return {n.pod_cidr: (n.node_ip, None) for n in self.nodes.values()}
        return {self.cfg.cluster_cidr: (None, hostnet.GATEWAY_IF)}

    def set_nodes(self, bodies: list[dict[str, Any]]) -> None:
        """Replace the whole set (initial list, or a re-list)."""
        want = {n.name: n for n in map(remote_node, bodies)
                if n is not None and n.name != self.me}
        with self._lock:
            changes: dict[str, list[Flow]] = {}
            joined: list[RemoteNode] = []
            for name in set(self.nodes) - set(want):
                self._drop(name, changes)
            for n in want.values():
                self._put(n, changes, joined)
            self._commit(changes, joined)
            hostnet.sync_routes(self.routes())
        self.on_change()

    def apply(self, changes: list[Change]) -> None:
        """Apply watched changes to Node objects."""
        touched = False
        with self._lock:
            flows: dict[str, list[Flow]] = {}
            joined: list[RemoteNode] = []
            before = dict(self.nodes)
            try:
                for c in changes:
                    if c.kind != "Node" or c.name == self.me:
                        continue
                    touched = True
                    n = remote_node(c.body) if c.op == "put" and c.body else None
                    if n is None:
                        self._drop(c.name, flows)
                    else:
                        self._put(n, flows, joined)
                self._commit(flows, joined)
            except Exception:
                # not taken: the same changes again (the agent retries a failed batch)
                # must find these nodes as they were, not skip them as already known
                self.nodes = before
                raise
            if touched:
                hostnet.sync_routes(self.routes())
        if touched:
            self.on_change()

    def _commit(self, changes: dict[str, list[Flow]], joined: list[RemoteNode]) -> None:
        """All nodes' flow changes in one bundle, then resolve the new peers.

        One bundle per node made a 1,000-node list take a round trip per node
        (open, add, barrier, commit) before the agent applied anything else.
        """
        if changes:
            self.flows.set_owners(changes)
        if joined:
            hostnet.nudge_neighbors([n.node_ip for n in joined])

    def _put(self, n: RemoteNode, changes: dict[str, list[Flow]],
             joined: list[RemoteNode]) -> None:
        if self.nodes.get(n.name) == n:
            return
        self.nodes[n.name] = n
        if self.tun_ofport is not None:
            changes[n.owner] = remote_node_flows(n, self.gw, self.tun_ofport,
                                                 self.flows.pipeline)
            joined.append(n)
        LOG.info("node %s (%s, pods %s) joined", n.name, n.node_ip, n.pod_cidr)

    def _drop(self, name: str, changes: dict[str, list[Flow]]) -> None:
        n = self.nodes.pop(name, None)
        if n is None:
            return
        changes[n.owner] = []
        LOG.info("node %s left", name)


def refresh_neighbors(peers: Peers, stop: threading.Event, interval: float = 30.0) -> None:
    """Keep OVS's tunnel neighbour entries of every peer fresh (see hostnet.nudge_neighbor).

    The first round comes a second after start-up, once OVS surely knows the
    node IP; then every `interval` seconds, well inside OVS's entry lifetime.
    """
    wait = 1.0
    while not stop.wait(wait):
        wait = interval
        if peers.tun_ofport is not None:
            hostnet.nudge_neighbors([n.node_ip for n in list(peers.nodes.values())])
