"""CNI reliability soak: sequential ADD/DEL pairs, then concurrent ADDs and DELs, on one node.

What a node sees over a day of pod churn, compressed: ``--pairs`` sequential
ADD/DEL pairs (a fresh netns and container id each, like a runtime's
sandboxes), then ``--concurrent`` ADDs at once followed by their DELs at once.
Everything goes through the real plugin executable of a one-node lab. After
the run the node is checked against what it held before: IPAM leases (the
agent's checkpoint), OVS ports on br-int, veths in the node's netns, flows
in OVS and the node's Pod records in the embedded store; a pod that got an
address another live pod holds counts as a duplicate; any plugin exit other
than 0 is a failure.

Agent RSS is read after ``--warmup`` untimed pairs and again after the
timed pairs, so a leak per pair shows as growth (goal: < 2 MB over 1,000
pairs). Prints one JSON line; the lab is removed in ``finally``.

    python3 bench/cni_soak.py [--pairs 1000] [--concurrent 200] [--warmup 200]
        [--base /run/flowcni-soak] [--prefix fcs-]

``soak()`` is also what the CI test runs, in a short form, on its own lab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flowcni.lab import netns
from flowcni.lab.lab import Lab, Node, Pod

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refplugin import percentiles  # noqa: E402

NODE = "node1"


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def node_state(lab: Lab, node: Node) -> dict[str, int]:
    """What a pod leaves behind if its teardown is incomplete, counted on the node."""
    ovs = node.ovs
    try:
        with open(os.path.join(node.rundir, "agent", "ipam.json")) as f:
            leases = len(json.load(f).get("leases", {}))
    except FileNotFoundError:
        leases = 0
    ports = len(ovs.vsctl("list-ports", "br-int").split())
    links = netns.run(["ip", "-n", node.netns, "-o", "link", "show", "type", "veth"]).stdout
    flows = [ln for ln in ovs.ofctl("dump-flows", "br-int", "--no-stats").splitlines()
             if "actions=" in ln]
    # The agent records each named pod in the embedded store; a DEL removes it.
    records = len([p for p in lab.store().objects("Pod") if p.get("node") == node.name])
    return {"leases": leases, "ports": ports, "veths": len(links.splitlines()),
            "flows": len(flows), "pod_records": records}


class Runner:
    """Invokes the lab's installed plugin for throwaway pods, as a runtime does."""

    def __init__(self, lab: Lab, node: Node, prefix: str) -> None:
        self.lab, self.node, self.prefix = lab, node, prefix
        self.plugin = os.path.join(lab.bin_dir, "flowcni")
        self.conf = json.loads(lab.net_conf(node))
        self.failures: list[str] = []
        self._seq = 0

    def new_pod(self) -> Pod:
        self._seq += 1
        pod = Pod(name=f"soak-{self._seq}", namespace="default", node=self.node.name,
                  netns=f"{self.prefix}s{self._seq}", container_id=secrets.token_hex(32))
        netns.run(["ip", "netns", "add", pod.netns])
        return pod

    def invoke(self, command: str, pod: Pod, prev: dict[str, Any] | None = None
               ) -> tuple[float, dict[str, Any] | None]:
        """(ms, result) of one plugin run; a failure is recorded, not raised."""
        conf = dict(self.conf, prevResult=prev) if prev else self.conf
        t0 = time.perf_counter()
        cp = subprocess.run([self.plugin], input=json.dumps(conf),
                            env=self.lab.plugin_env(command, pod), capture_output=True,
                            text=True, timeout=120)
        ms = (time.perf_counter() - t0) * 1000.0
        if cp.returncode != 0:
            self.failures.append(f"{command} {pod.name}: exit {cp.returncode}: "
                                 f"{cp.stdout.strip()[:300]} {cp.stderr.strip()[:300]}")
            return ms, None
        return ms, (json.loads(cp.stdout) if cp.stdout.strip() else {})

    def pair(self) -> float:
        """ADD then DEL one fresh pod; return the ADD's ms."""
        pod = self.new_pod()
        try:
            ms, res = self.invoke("ADD", pod)
            self.invoke("DEL", pod, res)
        finally:
            netns.delete(pod.netns)
        return ms


def _ip_of(res: dict[str, Any] | None) -> str | None:
    if not res or not res.get("ips"):
        return None
    return str(res["ips"][0]["address"]).split("/")[0]


def concurrent_round(r: Runner, c: int) -> tuple[list[float], int]:
    """C ADDs at once, then their DELs at once; return (ADD ms, duplicate IPs)."""
    pods = [r.new_pod() for _ in range(c)]
    try:
        with ThreadPoolExecutor(max_workers=c) as pool:
            added = list(pool.map(lambda p: r.invoke("ADD", p), pods))
            ips = Counter(ip for _, res in added if (ip := _ip_of(res)))
            dups = sum(n - 1 for n in ips.values() if n > 1)
            list(pool.map(lambda pr: r.invoke("DEL", pr[0], pr[1][1]),
                          zip(pods, added, strict=True)))
    finally:
        for p in pods:
            netns.delete(p.netns)
    return [ms for ms, _ in added], dups


def settle(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for background teardown (a DEL's veth and lease finish after it answers)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.2)


def soak(lab: Lab, pairs: int, concurrent: int, warmup: int) -> dict[str, Any]:
    """Run the soak on the lab's node1 (a lab already up); return the JSON figures."""
    node = lab.node(NODE)
    r = Runner(lab, node, lab.prefix)
    before = node_state(lab, node)
    for _ in range(warmup):
        r.pair()
    assert node.agent_pid
    rss_before = rss_mb(node.agent_pid)
    add_ms = [r.pair() for _ in range(pairs)]
    rss_after = rss_mb(node.agent_pid)
    c_ms, dups = concurrent_round(r, concurrent) if concurrent else ([], 0)
    add_ms += c_ms
    settle(lambda: node_state(lab, node) == before)
    after = node_state(lab, node)
    p50, p99 = percentiles(add_ms) if add_ms else (0.0, 0.0)
    return {
        "pairs": pairs, "concurrent": concurrent,
        "add_p50_ms": round(p50, 2), "add_p99_ms": round(p99, 2),
        **{f"leaked_{k}": after[k] - before[k]
           for k in ("leases", "ports", "veths", "flows", "pod_records")},
        "duplicate_ips": dups, "failures": len(r.failures),
        "agent_rss_mb_before": round(rss_before, 2), "agent_rss_mb_after": round(rss_after, 2),
        "first_failures": r.failures[:3],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pairs", type=int, default=1000, help="sequential ADD/DEL pairs")
    ap.add_argument("--concurrent", type=int, default=200,
                    help="ADDs run at once, then their DELs (at most 250: one /24)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed pairs before RSS")
    ap.add_argument("--base", default=os.environ.get("FLOWCNI_SOAK_BASE", "/run/flowcni-soak"),
                    help="the lab's state directory")
    ap.add_argument("--prefix", default=os.environ.get("FLOWCNI_SOAK_PREFIX", "fcs-"),
                    help="netns name prefix of the lab")
    a = ap.parse_args(argv)
    if a.pairs < 0 or a.warmup < 0 or not 0 <= a.concurrent <= 250:
        ap.error("--pairs and --warmup must be >= 0, --concurrent within 0..250")
    lab = Lab(base=a.base, prefix=a.prefix)
    lab.down()  # leftovers of an interrupted run (from its state file)
    try:
        lab.up(nodes=1)
        out = soak(lab, a.pairs, a.concurrent, a.warmup)
    finally:
        with contextlib.suppress(Exception):
            lab.down()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
