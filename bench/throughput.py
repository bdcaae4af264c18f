"""Pod-to-pod TCP throughput of flowcni next to bare OVS and the Flannel datapath.

iperf3 (one TCP stream, ``-t --time`` seconds, JSON output; the figure is
``end.sum_received.bits_per_second``) between two pods on one node
(``same_node``) and between pods on two nodes over geneve (``cross_node``),
for three datapaths built in the same run on the same underlay:

* flowcni: a two-node lab (``/run/flowcni-bench-tp``, names ``fcbt-``, whatever
  FLOWCNI_LAB_* say), encap geneve, pods ``s1``/``s2`` on node1 and ``c`` on
  node2, added by the real plugin;
* bare OVS (``fcbb-``, see ``peers.py``): same datapath type (netdev) and
  userspace TSO setting as a lab node, a single NORMAL flow on one node, or two
  in_port flows and a static geneve port across two nodes on the lab's
  underlay bridge;
* the Flannel datapath (``fcbl-``): a Linux bridge on one node, or bridge +
  kernel VXLAN (routed as Flannel's vxlan backend routes) across two nodes on
  the same underlay bridge.

Fairness: the peers' pods get flowcni's pod MTU (1450: a 1500 uplink minus the
geneve overhead; Flannel vxlan uses the same). Bare OVS pods get the offload
setting flowcni gives pods in the lab's encap mode (with any encap, tx checksum
offload and with it TSO/GSO off, because OVS 3.1's userspace tunnels drop
offloaded packets; on otherwise), switched by flowcni's own function, so the
bare ratio measures the pipeline and plumbing, not that setting. The Flannel
pods keep the kernel defaults (offloads on), as Flannel does: that ratio is
the whole cost of the design against the usual kernel datapath. Each setup's
pod offloads and MTU are printed to stderr so the claim can be checked.

Machine load hits all datapaths alike: every repeat runs the three in turn,
the order rotating by one per repeat, and each path reports the median of
``--repeat`` runs. Per-run figures go to stderr: retransmits, iperf3's CPU
use and, for the two OVS datapaths, the CPU seconds their ovs-vswitchd
processes spent per gigabyte received, which is where the userspace datapath's
time goes and which compares flowcni with bare OVS more steadily than
throughput does. stdout gets one JSON line per path::

    {"path": "same_node", "flowcni_gbps": ..., "bare_ovs_gbps": ...,
     "linux_vxlan_gbps": ..., "ratio_bare_ovs": flowcni/bare,
     "ratio_linux_vxlan": flowcni/linux}

Reading the numbers: with tx checksum offload off, the netdev datapath moves
MTU-sized frames, one AF_PACKET read and write per frame per port, on each
ovs-vswitchd's single main thread; when that thread falls behind, the receive
buffer of the AF_PACKET socket where the data enters OVS overflows (``ss -0 -m``
in the node netns shows the drops), TCP backs off and the sender idles. Runs in
that regime scatter by +-20% and more on a busy machine, so judge a ratio near 1
by several runs or a higher ``--repeat``, not by one line.

Everything (lab, peer namespaces, peer OVS daemons via their pidfiles, iperf3
servers, the lock file) is removed in ``finally``; leftovers of a crashed
earlier run are removed first.

    python3 bench/throughput.py [--time 5] [--repeat 3] [--path same_node|cross_node|both]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flowcni.lab import netns
from flowcni.lab.lab import Lab
from flowcni.lab.netns import run
from flowcni.lab.ovs import kill_wait

# bench/ is a folder of scripts, not a package: peers sits next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import Endpoints, Peers, cleanup_leftovers, vswitchd_pids  # noqa: E402

BASE = "/run/flowcni-bench-tp"
PREFIX = "fcbt-"
LOCK = "/run/flowcni-bench-tp.lock"  # outside BASE: Lab.down() removes BASE
IPERF_PORT = 5201
PATHS = ("same_node", "cross_node")
DATAPATHS = ("flowcni", "bare_ovs", "linux_vxlan")


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sample:
    gbps: float
    retransmits: int
    cpu_sender: float
    cpu_receiver: float
    seconds: float  # wall time of the client run, for per-byte figures
    vswitchd_cpu: float  # CPU seconds the pair's ovs-vswitchd processes used meanwhile

    @property
    def vswitchd_s_per_gb(self) -> float:
        """ovs-vswitchd CPU seconds per gigabyte received: the datapath's cost per byte."""
        gbytes = self.gbps * self.seconds / 8
        return self.vswitchd_cpu / gbytes if gbytes else 0.0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of `pids` (threads included), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLK_TCK


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- iperf3 --------------------------------------------------------------------------


def _listening(ns: str, port: int) -> bool:
    out = run(netns.exec_argv(ns, ["ss", "-Hltn", f"sport = :{port}"]), check=False).stdout
    return bool(out.strip())


def wait_reachable(ep: Endpoints, timeout: float = 20.0) -> None:
    """Ping until the server answers: ARP, tunnel neighbours and flows are all in place.

    This keeps first-packet work (ARP, OVS native-tunnel neighbour resolution,
    upcalls) out of the timed run.
    """
    deadline = time.monotonic() + timeout
    while True:
        p = run(netns.exec_argv(ep.client_ns, ["ping", "-c", "1", "-W", "1", ep.server_ip]),
                check=False)
        if p.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{ep.server_ip} unreachable from {ep.client_ns}: "
                             f"{p.stdout.strip()} {p.stderr.strip()}")
        time.sleep(0.2)


def iperf3(ep: Endpoints, seconds: int) -> Sample:
    """One TCP run: a one-shot server in the server pod, the client in the client pod."""
    server = subprocess.Popen(
        netns.exec_argv(ep.server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(ep.server_ns, IPERF_PORT):
            if server.poll() is not None or time.monotonic() > deadline:
                err = server.stderr.read().decode() if server.stderr else ""
                raise BenchError(f"iperf3 server in {ep.server_ns} not listening: {err}")
            time.sleep(0.05)
        cpu0, t0 = cpu_seconds(ep.ovs_pids), time.monotonic()
        p = run(netns.exec_argv(ep.client_ns, [
            "iperf3", "-c", ep.server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]),
            check=False, timeout=seconds + 60)
        cpu1, t1 = cpu_seconds(ep.ovs_pids), time.monotonic()
        try:
            res: dict[str, Any] = json.loads(p.stdout)
        except json.JSONDecodeError as e:
            raise BenchError(f"iperf3 client in {ep.client_ns}: exit {p.returncode}: "
                             f"{p.stdout[-500:]} {p.stderr.strip()}") from e
        if "error" in res or p.returncode != 0:
            raise BenchError(f"iperf3 client in {ep.client_ns}: {res.get('error')}")
        end = res["end"]
        cpu = end.get("cpu_utilization_percent", {})
        return Sample(gbps=end["sum_received"]["bits_per_second"] / 1e9,
                      retransmits=int(end.get("sum_sent", {}).get("retransmits", 0)),
                      cpu_sender=float(cpu.get("host_total", 0.0)),
                      cpu_receiver=float(cpu.get("remote_total", 0.0)),
                      seconds=float(end["sum_received"].get("seconds", t1 - t0)),
                      vswitchd_cpu=cpu1 - cpu0)
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_wait(server.pid, timeout=2)
        if server.stderr:
            server.stderr.close()


def pod_setup(ns: str) -> str:
    """eth0's MTU and the offloads that matter here, as the pod itself sees them.

    TSO is read from tx-tcp-segmentation: ethtool's summary line
    "tcp-segmentation-offload" also counts newer sub-features (accecn) that
    switching tx checksum offload off leaves on.
    """
    link = json.loads(run(["ip", "-n", ns, "-j", "link", "show", "dev", "eth0"]).stdout)[0]
    feats: dict[str, str] = {}
    for line in run(netns.exec_argv(ns, ["ethtool", "-k", "eth0"])).stdout.splitlines():
        key, _, val = line.partition(":")
        feats[key.strip()] = val.strip().split(" ")[0]
    return (f"mtu={link['mtu']} tx-csum={feats.get('tx-checksumming')} "
            f"tso={feats.get('tx-tcp-segmentation')} "
            f"gso={feats.get('generic-segmentation-offload')}")


# -- the run -------------------------------------------------------------------------


def flowcni_endpoints(lab: Lab, paths: Sequence[str]) -> dict[str, Endpoints]:
    """Pods s1, s2 on node1 and c on node2 of the (already up) lab."""
    s1 = lab.pod_add("s1", "node1")
    n1, n2 = (vswitchd_pids([lab.node(n).ovs]) for n in ("node1", "node2"))
    out: dict[str, Endpoints] = {}
    if "same_node" in paths:
        s2 = lab.pod_add("s2", "node1")
        out["same_node"] = Endpoints(s1.netns, s2.netns, s2.ip, n1)
    if "cross_node" in paths:
        c = lab.pod_add("c", "node2")
        out["cross_node"] = Endpoints(s1.netns, c.netns, c.ip, n1 + n2)
    return out


def build(lab: Lab, peers: Peers, paths: Sequence[str]) -> dict[str, dict[str, Endpoints]]:
    """path -> datapath -> endpoints, everything built and reachable."""
    lab.up(nodes=2, encap="geneve")
    fc = flowcni_endpoints(lab, paths)
    # flowcni's own rule (controller/agent.py): pods keep tx offload only without encap.
    tx_offload = lab.store().cluster().encap == "none"
    builders: dict[str, dict[str, Callable[[], Endpoints]]] = {
        "same_node": {"bare_ovs": lambda: peers.bare_same_node(tx_offload),
                      "linux_vxlan": peers.linux_same_node},
        "cross_node": {"bare_ovs": lambda: peers.bare_cross_node(tx_offload),
                       "linux_vxlan": peers.linux_cross_node},
    }
    eps: dict[str, dict[str, Endpoints]] = {}
    for path in paths:
        eps[path] = {"flowcni": fc[path]}
        for dp, make in builders[path].items():
            eps[path][dp] = make()
        for dp, ep in eps[path].items():
            wait_reachable(ep)
            log(f"setup {path} {dp}: client {ep.client_ns} ({pod_setup(ep.client_ns)}) -> "
                f"server {ep.server_ns} {ep.server_ip} ({pod_setup(ep.server_ns)})")
    return eps


def measure(eps: dict[str, dict[str, Endpoints]], seconds: int,
            repeat: int) -> list[dict[str, Any]]:
    """Per path, `repeat` rounds of all three datapaths; print and return the medians.

    The order rotates each round so that no datapath always runs first (right
    after setup or another path's runs) or last.
    """
    lines = []
    for path, by_dp in eps.items():
        samples: dict[str, list[float]] = {dp: [] for dp in DATAPATHS}
        for r in range(repeat):
            order = DATAPATHS[r % 3:] + DATAPATHS[:r % 3]
            for dp in order:
                s = iperf3(by_dp[dp], seconds)
                samples[dp].append(s.gbps)
                ovs_cost = (f", ovs-vswitchd {s.vswitchd_s_per_gb:.1f} cpu-s/GB"
                            if by_dp[dp].ovs_pids else "")
                log(f"run {path} #{r + 1} {dp}: {s.gbps:.3f} Gbit/s, retransmits "
                    f"{s.retransmits}, cpu sender {s.cpu_sender:.0f}% receiver "
                    f"{s.cpu_receiver:.0f}%{ovs_cost}")
        med = {dp: statistics.median(v) for dp, v in samples.items()}
        line = {"path": path,
                "flowcni_gbps": round(med["flowcni"], 3),
                "bare_ovs_gbps": round(med["bare_ovs"], 3),
                "linux_vxlan_gbps": round(med["linux_vxlan"], 3),
                "ratio_bare_ovs": round(med["flowcni"] / med["bare_ovs"], 3),
                "ratio_linux_vxlan": round(med["flowcni"] / med["linux_vxlan"], 3)}
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--time", type=int, default=5, help="seconds per iperf3 run (default 5)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per datapath and path; the median is reported (default 3)")
    ap.add_argument("--path", choices=[*PATHS, "both"], default="both")
    a = ap.parse_args(argv)
    if a.time < 1 or a.repeat < 1:
        ap.error("--time and --repeat must be at least 1")
    paths = list(PATHS) if a.path == "both" else [a.path]

    # One run at a time: the leftover sweep below would tear down a concurrent run.
    lock = open(LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another throughput bench holds {LOCK}")
        lock.close()
        return 1
    lab = Lab(base=BASE, prefix=PREFIX)
    peers = Peers(lab.underlay_ns)
    try:
        stale = lab.down() + cleanup_leftovers()
        if stale:
            log(f"removed leftovers of an earlier run: {stale}")
        eps = build(lab, peers, paths)
        measure(eps, a.time, a.repeat)
    finally:
        removed = peers.cleanup()
        removed += lab.down()
        log(f"cleaned up: {removed}")
        # Unlinked while still held and only after everything else is gone, so a run
        # that starts now cannot overlap with anything of ours.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOCK)
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
