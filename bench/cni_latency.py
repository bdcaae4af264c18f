"""CNI ADD/DEL latency of flowcni next to the reference ``bridge`` + ``host-local`` plugins.

For ``--n`` pods in sequence each implementation gets an ADD per pod, then a
DEL per pod, invoked as a runtime (libcni) does and timed the same way: only
the plugin process, ``time.perf_counter`` around ``subprocess.run``. DEL
stdin carries the ADD result as ``prevResult``, as libcni sends it for
cniVersion >= 0.4.0 (and as ``refplugin`` does for the reference).

* Reference: :func:`refplugin.measure_reference`, unchanged.
* flowcni: a one-node lab (``/run/flowcni-bench``, names prefixed ``fcb-``)
  with its OVS and agent; per pod a fresh ``ip netns add fcb-pN`` and the
  installed launcher ``<lab>/bin/flowcni`` with the lab's network config on
  stdin and the lab's CNI environment.

Order: the reference runs first, before the lab exists, then flowcni.
``measure_reference`` makes its own bridge and does all ADDs then all DELs in
one call, so the two cannot be interleaved pod by pod without copying it;
running the reference first (each side after its own untimed warm-up) means
our idle agent and OVS never run in the background of the reference's
timings, so any bias from it is against flowcni. Other load on the machine
can still drift between the two phases; repeat runs to see the spread.

Everything is removed in ``finally`` (pods DELeted untimed, netns deleted,
``lab.down()``).

    python3 bench/cni_latency.py [--n 100] [--warmup 5]   # prints one JSON line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from flowcni.lab import netns
from flowcni.lab.lab import Lab, Node, Pod

# bench/ is a folder of scripts, not a package: refplugin sits next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refplugin import measure_reference, percentiles, run_plugin_timed  # noqa: E402

BASE = "/run/flowcni-bench"
PREFIX = "fcb-"
NODE = "node1"


class _FlowcniPods:
    """Runs the installed flowcni launcher for pods of a one-node lab, like a runtime."""

    def __init__(self, lab: Lab, node: Node) -> None:
        self.lab = lab
        self.node = node
        self.plugin = os.path.join(lab.bin_dir, "flowcni")
        self.conf: dict[str, Any] = json.loads(lab.net_conf(node))
        self.added: dict[str, tuple[Pod, dict[str, Any]]] = {}  # netns -> (pod, ADD result)

    def _invoke(self, command: str, pod: Pod, conf: dict[str, Any]) -> tuple[float, str]:
        """Run the plugin once; return (elapsed ms, stdout). Raise unless it exits 0."""
        return run_plugin_timed(self.plugin, command, pod.ref,
                                self.lab.plugin_env(command, pod), conf)

    def add(self, i: int) -> float:
        """Make netns ``fcb-p<i>`` and ADD it; return the plugin's ms."""
        pod = Pod(
            name=f"bench-{i}",
            namespace="default",
            node=self.node.name,
            netns=f"{self.lab.prefix}p{i}",
            container_id=secrets.token_hex(32),  # 64 hex chars, like a runtime
        )
        subprocess.run(["ip", "netns", "add", pod.netns], check=True, capture_output=True)
        try:
            ms, out = self._invoke("ADD", pod, self.conf)
        except BaseException:
            netns.delete(pod.netns)
            raise
        self.added[pod.netns] = (pod, json.loads(out))
        return ms

    def delete(self, ns: str) -> float:
        """DEL the pod in ``ns`` (prevResult = its ADD result); return ms. Drops the netns."""
        pod, result = self.added[ns]
        ms, _ = self._invoke("DEL", pod, dict(self.conf, prevResult=result))
        del self.added[ns]
        netns.delete(ns)
        return ms

    def cleanup(self) -> None:
        """Untimed DEL of whatever is still attached, so the agent releases it."""
        for ns in list(self.added):
            with contextlib.suppress(Exception):
                self.delete(ns)
            netns.delete(ns)


def measure_flowcni(lab: Lab, n: int, warmup: int) -> dict[str, list[float]]:
    """ADD then DEL ``n`` pods with flowcni in a running lab; latencies in ms.

    ``warmup`` pods are first added and deleted untimed (page cache, pyc files,
    the agent's first-request paths).
    """
    pods = _FlowcniPods(lab, lab.node(NODE))
    add_ms: list[float] = []
    del_ms: list[float] = []
    try:
        for i in range(warmup):
            pods.add(n + i)
            pods.delete(f"{lab.prefix}p{n + i}")
        order: list[str] = []
        for i in range(n):
            add_ms.append(pods.add(i))
            order.append(f"{lab.prefix}p{i}")
        for ns in order:
            del_ms.append(pods.delete(ns))
    finally:
        pods.cleanup()
    return {"add_ms": add_ms, "del_ms": del_ms}


def summarize(ours: dict[str, list[float]], ref: dict[str, list[float]]) -> dict[str, Any]:
    """The output line: p50/p99 per side and operation, flowcni/reference p50 ratios."""
    out: dict[str, Any] = {"n": len(ours["add_ms"])}
    for op in ("add", "del"):
        f50, f99 = percentiles(ours[f"{op}_ms"])
        r50, r99 = percentiles(ref[f"{op}_ms"])
        out[f"flowcni_{op}_p50_ms"] = round(f50, 3)
        out[f"flowcni_{op}_p99_ms"] = round(f99, 3)
        out[f"reference_{op}_p50_ms"] = round(r50, 3)
        out[f"reference_{op}_p99_ms"] = round(r99, 3)
        out[f"ratio_{op}_p50"] = round(f50 / r50, 3)  # from unrounded medians
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=100, help="pods per implementation (timed)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed ADD+DEL pairs first")
    ap.add_argument("--prefix", default=os.environ.get("FLOWCNI_BENCH_PREFIX", PREFIX),
                    help="netns prefix of the bench lab, so two checkouts can run side by "
                         f"side (default: $FLOWCNI_BENCH_PREFIX or {PREFIX}); the lab's "
                         f"state goes to {BASE}-PREFIX unless it is the default")
    args = ap.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        ap.error("--n must be >= 1 and --warmup >= 0")

    if args.warmup:
        measure_reference(args.warmup)  # untimed: warms the bridge/host-local binaries
    ref = measure_reference(args.n)

    base = BASE if args.prefix == PREFIX else f"{BASE}-{args.prefix.rstrip('-')}"
    lab = Lab(base=base, prefix=args.prefix)
    lab.down()  # leftovers of an interrupted run
    try:
        lab.up(nodes=1)
        ours = measure_flowcni(lab, args.n, args.warmup)
    finally:
        lab.down()

    print(json.dumps(summarize(ours, ref)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
