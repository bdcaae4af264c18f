"""The reference datapaths of the throughput bench, built in namespaces of their own.

Two peers stand next to flowcni so each of its figures is a ratio measured in
the same run on the same machine:

* bare OVS on the same datapath type (netdev, userspace TSO enabled as the lab
  does), with nothing but a NORMAL flow (same node) or two in_port flows and a
  static geneve port (cross node): the floor of what OVS itself costs, so the
  ratio shows what flowcni's pipeline and plumbing add;
* the Flannel vxlan datapath: a Linux bridge ``cni0`` per node and, across
  nodes, a kernel VXLAN device ``flannel.1`` routed the way Flannel routes it
  (an onlink route to the peer's pod subnet via its VTEP address, a permanent
  neighbour and an FDB entry), so the peer pays the same extra IP hop in the
  node that flowcni's routed pipeline models.

Cross-node peers hang off the lab's underlay bridge ``br0`` exactly as a lab
node does (a veth ``eth0`` in the node netns, its peer enslaved to ``br0``), so
both cross the same wire. Every address lives in a namespace made here; the
only thing touched outside them is that veth peer in the lab's underlay netns,
which leaves with its namespace or with the lab.

Everything made is recorded as it is made, so :meth:`Peers.cleanup` removes
exactly that and nothing else, also after a failure half-way.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from flowcni.cni.podif import set_tx_checksum
from flowcni.lab import netns
from flowcni.lab.netns import run
from flowcni.lab.ovs import OVS, kill_wait

PEER_BASE = "/run/flowcni-bench-tp-peers"  # OVS rundirs (pidfiles, sockets, logs)
BARE_PREFIX = "fcbb-"
LINUX_PREFIX = "fcbl-"
PREFIXES = (BARE_PREFIX, LINUX_PREFIX)
POD_MTU = 1450  # what flowcni gives pods with geneve on a 1500 uplink, and Flannel vxlan
UNDERLAY_NET = "192.168.77"  # the lab's underlay /24; our nodes take .201/.202, .211/.212
UNDERLAY_PREFIX = 24
BARE_POD_NET = "10.77.0"  # one /24 across both bare nodes: the bare peer switches, never routes
GENEVE_PORT = "tun0"


@dataclass(frozen=True)
class Endpoints:
    """Where an iperf3 pair runs: client and server pod netns, and the server's IP.

    `ovs_pids` are the ovs-vswitchd processes that forward the pair's packets,
    so the bench can report their CPU per byte: in the userspace datapath that
    is where the time goes, and it compares more steadily than throughput.
    """

    client_ns: str
    server_ns: str
    server_ip: str
    ovs_pids: tuple[int, ...] = ()


def vswitchd_pids(nodes: list[OVS]) -> tuple[int, ...]:
    """The ovs-vswitchd pid of each OVS, read from its pidfile."""
    out = []
    for ovs in nodes:
        try:
            with open(os.path.join(ovs.rundir, "ovs-vswitchd.pid")) as f:
                out.append(int(f.read().strip()))
        except (OSError, ValueError):
            pass
    return tuple(out)


_PMD_COUNTERS = {"packets received": "packets", "packet recirculations": "recirculations",
                 "miss with success upcall": "upcalls", "miss with failed upcall": "failed_upcalls"}


def datapath_counts(nodes: list[OVS]) -> dict[str, int]:
    """Userspace datapath counters summed over `nodes` (dpif-netdev/pmd-stats-show).

    Cumulative since the daemon started; take the difference over a run. Packets
    plus recirculations is the number of datapath passes (megaflow lookups):
    the datapath's work, which, unlike a rate, does not depend on the
    machine's load; upcalls are the misses that went to ofproto.
    """
    total = dict.fromkeys(_PMD_COUNTERS.values(), 0)
    for ovs in nodes:
        for line in ovs.appctl("dpif-netdev/pmd-stats-show").splitlines():
            name, _, value = line.strip().partition(":")
            if name in _PMD_COUNTERS and value.strip().isdigit():
                total[_PMD_COUNTERS[name]] += int(value)
    return total


def counts_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _link_mac(ns: str, ifname: str) -> str:
    out = run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname]).stdout
    mac: str = json.loads(out)[0]["address"]
    return mac


class Peers:
    """Builds the peer datapaths on demand and remembers what it made."""

    def __init__(self, underlay_ns: str, base: str = PEER_BASE) -> None:
        self.underlay_ns = underlay_ns
        self.base = base
        self.made_ns: list[str] = []
        self.made_ovs: list[OVS] = []
        self.made_uplinks: list[str] = []

    # -- building blocks -----------------------------------------------------------

    def _netns(self, name: str) -> str:
        netns.add(name)
        self.made_ns.append(name)
        return name

    def _ovs(self, ns: str) -> OVS:
        """An ovsdb-server + ovs-vswitchd of its own in `ns`, TSO on as a lab node has it."""
        ovs = OVS(ns, os.path.join(self.base, ns))
        # Recorded before start: a start that fails half-way may leave a pidfile behind.
        self.made_ovs.append(ovs)
        ovs.start(tso=True)
        return ovs

    def _uplink(self, ns: str, tag: str) -> None:
        """eth0 in `ns`, its peer `u<tag>` on the underlay's br0: what Lab._uplink does."""
        peer = f"u{tag}"
        u = self.underlay_ns
        self.made_uplinks.append(peer)
        run(["ip", "-n", u, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", u, "link", "set", peer, "master", "br0", "up"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def _pod(self, node_ns: str, host_if: str, pod_ns: str, cidr: str,
             gateway: str | None, tx_offload: bool) -> None:
        """A pod netns with eth0 at `cidr`, its veth peer `host_if` left in the node netns.

        Both ends get POD_MTU, as flowcni's plumbing gives both ends the pod MTU.
        tx checksum offload is switched with flowcni's own function, so a peer pod
        carries exactly the offload state a flowcni pod carries in the same mode.
        """
        self._netns(pod_ns)
        mtu = str(POD_MTU)
        run(["ip", "-n", node_ns, "link", "add", host_if, "mtu", mtu, "type", "veth",
             "peer", "name", "eth0", "mtu", mtu, "netns", pod_ns])
        run(["ip", "-n", node_ns, "link", "set", host_if, "up"])
        run(["ip", "-n", pod_ns, "addr", "add", cidr, "dev", "eth0"])
        run(["ip", "-n", pod_ns, "link", "set", "eth0", "up"])
        if gateway:
            run(["ip", "-n", pod_ns, "route", "add", "default", "via", gateway])
        if not tx_offload:
            set_tx_checksum(os.path.join(netns.NETNS_DIR, pod_ns), "eth0", False)

    @staticmethod
    def _ofport(ovs: OVS, ifname: str) -> int:
        return int(ovs.vsctl("get", "Interface", ifname, "ofport").strip())

    @staticmethod
    def _one_flow_set(ovs: OVS, bridge: str, flows: list[str]) -> None:
        """Replace every flow of `bridge` with `flows` (a new bridge starts with NORMAL)."""
        ovs.ofctl("del-flows", bridge)
        for flow in flows:
            ovs.ofctl("add-flow", bridge, flow)

    # -- bare OVS ------------------------------------------------------------------

    def bare_same_node(self, tx_offload: bool) -> Endpoints:
        """One bare node: a netdev bridge, two pods, one `actions=NORMAL` flow."""
        node = self._netns(f"{BARE_PREFIX}s-node")
        ovs = self._ovs(node)
        ovs.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int",
                  "datapath_type=netdev")
        for tag, last in (("a", 1), ("b", 2)):
            host = f"v{tag}"
            self._pod(node, host, f"{BARE_PREFIX}s-{tag}", f"{BARE_POD_NET}.{last}/24",
                      None, tx_offload)
            ovs.vsctl("add-port", "br-int", host)
        self._one_flow_set(ovs, "br-int", ["priority=0,actions=NORMAL"])
        return Endpoints(f"{BARE_PREFIX}s-a", f"{BARE_PREFIX}s-b", f"{BARE_POD_NET}.2",
                         vswitchd_pids([ovs]))

    def bare_cross_node(self, tx_offload: bool) -> Endpoints:
        """Two bare nodes on the lab underlay, each br-phy (node IP) + br-int (pod, geneve)."""
        ips = {1: f"{UNDERLAY_NET}.201", 2: f"{UNDERLAY_NET}.202"}
        nodes = []
        for i, ip in ips.items():
            node = self._netns(f"{BARE_PREFIX}x-node{i}")
            self._uplink(node, f"bb{i}")
            ovs = self._ovs(node)
            nodes.append(ovs)
            # The lab's node layout: the endpoint IP on br-phy so OVS native tunnelling
            # finds its route and neighbours there, eth0 as br-phy's underlay port.
            ovs.vsctl("add-br", "br-phy", "--", "set", "bridge", "br-phy",
                      "datapath_type=netdev", "--", "add-port", "br-phy", "eth0")
            run(["ip", "-n", node, "addr", "add", f"{ip}/{UNDERLAY_PREFIX}", "dev", "br-phy"])
            run(["ip", "-n", node, "link", "set", "br-phy", "up"])
            ovs.vsctl("add-br", "br-int", "--", "set", "bridge", "br-int",
                      "datapath_type=netdev")
            self._pod(node, "vp", f"{BARE_PREFIX}x-pod{i}", f"{BARE_POD_NET}.{i}/24", None,
                      tx_offload)
            ovs.vsctl("add-port", "br-int", "vp")
            ovs.vsctl("add-port", "br-int", GENEVE_PORT, "--", "set", "Interface",
                      GENEVE_PORT, "type=geneve", f"options:remote_ip={ips[3 - i]}")
            pod, tun = self._ofport(ovs, "vp"), self._ofport(ovs, GENEVE_PORT)
            self._one_flow_set(ovs, "br-int", [f"in_port={pod},actions=output:{tun}",
                                               f"in_port={tun},actions=output:{pod}"])
        return Endpoints(f"{BARE_PREFIX}x-pod1", f"{BARE_PREFIX}x-pod2", f"{BARE_POD_NET}.2",
                         vswitchd_pids(nodes))

    # -- the Flannel datapath ------------------------------------------------------

    def _cni0(self, node: str, subnet: str) -> None:
        """The node's pod bridge with the pods' gateway address, as Flannel's bridge CNI."""
        run(["ip", "-n", node, "link", "add", "cni0", "mtu", str(POD_MTU), "type", "bridge"])
        run(["ip", "-n", node, "addr", "add", f"{subnet}.1/24", "dev", "cni0"])
        run(["ip", "-n", node, "link", "set", "cni0", "up"])

    def _linux_pod(self, node: str, host_if: str, pod_ns: str, subnet: str, last: int) -> None:
        # Flannel leaves the pods' offloads at the kernel's defaults (all on).
        self._pod(node, host_if, pod_ns, f"{subnet}.{last}/24", f"{subnet}.1", True)
        run(["ip", "-n", node, "link", "set", host_if, "master", "cni0"])

    def linux_same_node(self) -> Endpoints:
        """Two pods on one Linux bridge: Flannel's same-node path (no VXLAN involved)."""
        node = self._netns(f"{LINUX_PREFIX}s-node")
        subnet = "10.78.0"
        self._cni0(node, subnet)
        self._linux_pod(node, "va", f"{LINUX_PREFIX}s-a", subnet, 2)
        self._linux_pod(node, "vb", f"{LINUX_PREFIX}s-b", subnet, 3)
        return Endpoints(f"{LINUX_PREFIX}s-a", f"{LINUX_PREFIX}s-b", f"{subnet}.3")

    def linux_cross_node(self) -> Endpoints:
        """Two Flannel vxlan nodes on the lab underlay: cni0, flannel.1, one pod each.

        As Flannel's vxlan backend: node i owns pod subnet 10.78.i.0/24 with its
        VTEP address 10.78.i.0/32 on flannel.1; the peer's subnet is routed onlink
        via the peer's VTEP address, whose MAC is a permanent neighbour and whose
        underlay IP an FDB entry (no learning, no multicast).
        """
        ips = {1: f"{UNDERLAY_NET}.211", 2: f"{UNDERLAY_NET}.212"}
        vtep_mac: dict[int, str] = {}
        for i, ip in ips.items():
            node = self._netns(f"{LINUX_PREFIX}x-node{i}")
            self._uplink(node, f"bl{i}")
            run(["ip", "-n", node, "addr", "add", f"{ip}/{UNDERLAY_PREFIX}", "dev", "eth0"])
            run(netns.exec_argv(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
            subnet = f"10.78.{i}"
            self._cni0(node, subnet)
            run(["ip", "-n", node, "link", "add", "flannel.1", "mtu", str(POD_MTU), "type",
                 "vxlan", "id", "1", "local", ip, "dev", "eth0", "dstport", "4789",
                 "nolearning"])
            run(["ip", "-n", node, "addr", "add", f"{subnet}.0/32", "dev", "flannel.1"])
            run(["ip", "-n", node, "link", "set", "flannel.1", "up"])
            vtep_mac[i] = _link_mac(node, "flannel.1")
            self._linux_pod(node, "vp", f"{LINUX_PREFIX}x-pod{i}", subnet, 2)
        for i in ips:
            node, j = f"{LINUX_PREFIX}x-node{i}", 3 - i
            peer_vtep = f"10.78.{j}.0"
            run(["ip", "-n", node, "neigh", "replace", peer_vtep, "lladdr", vtep_mac[j],
                 "dev", "flannel.1", "nud", "permanent"])
            run(netns.exec_argv(node, ["bridge", "fdb", "append", vtep_mac[j], "dev",
                                       "flannel.1", "dst", ips[j]]))
            run(["ip", "-n", node, "route", "add", f"10.78.{j}.0/24", "via", peer_vtep,
                 "dev", "flannel.1", "onlink"])
        return Endpoints(f"{LINUX_PREFIX}x-pod1", f"{LINUX_PREFIX}x-pod2", "10.78.2.2")

    # -- teardown ------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Stop our daemons (by their pidfiles), then drop our namespaces and uplinks.

        Daemons go first: an ovs-vswitchd whose netns vanished under it would
        keep running. Returns what was removed, for the caller to report.
        """
        removed: list[str] = []
        for ovs in self.made_ovs:
            removed += stop_ovs(ovs)
        for name in reversed(self.made_ns):
            if netns.exists(name):
                netns.delete(name)
                removed.append(name)
        if netns.exists(self.underlay_ns):  # normally gone with the peer netns already
            for peer in self.made_uplinks:
                run(["ip", "-n", self.underlay_ns, "link", "del", peer], check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        self.made_ns, self.made_ovs, self.made_uplinks = [], [], []
        return removed


def stop_ovs(ovs: OVS) -> list[str]:
    """Kill the daemons named by `ovs`'s pidfiles, vswitchd first; return what was killed.

    A pid is only signalled while its command line still names our rundir: a
    pidfile left by a crash may by now name somebody else's process.
    """
    killed = []
    for pid in ovs.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if ovs.rundir in cmdline:
            kill_wait(pid)
            killed.append(f"pid {pid}")
    return killed


def cleanup_leftovers(base: str = PEER_BASE) -> list[str]:
    """Remove what a crashed earlier run left: OVS daemons under `base`, our namespaces.

    Only names with this bench's prefixes and pidfiles under its own rundir are
    touched, so other labs and benches on the machine are left alone.
    """
    removed: list[str] = []
    if os.path.isdir(base):
        for ns in sorted(os.listdir(base)):
            removed += stop_ovs(OVS(ns, os.path.join(base, ns)))
    for prefix in PREFIXES:
        for name in netns.listing(prefix):
            netns.delete(name)
            removed.append(name)
    shutil.rmtree(base, ignore_errors=True)
    return removed
