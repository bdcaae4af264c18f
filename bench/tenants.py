#!/usr/bin/env python3
"""Tenant networks: flows, compute time and memory at scale, and what a tenant costs on the wire.

Two parts, both printing JSON lines on stdout:

* builders (no datapath, each size in its own process so its peak RSS is its
  own): T TenantNetworks with P pods each, spread round-robin over `--nodes`
  nodes; what the agent of node1 computes: the resolution of every tenant
  (datastore.tenantconv.resolve: VNIs, slices, conditions) and every flow it
  holds for them (shared flows, each tenant's node-wide flows with one flow per
  remote slice, five per local tenant pod)::

    {"tenants": T, "pods_per_tenant": P, "nodes": N, "flows": .., "compute_s": ..,
     "peak_rss_mb": ..}

* throughput (`--throughput`, root): a two-node lab (geneve), a tenant with a
  client pod on node1 and a server pod on node2, and the same pair on the
  default network; `--repeat` rounds of one iperf3 run per pair, the order
  swapped every round (T,D, D,T, T,D ...) so the machine's changing load hits
  both alike; each round's figures go to stderr as a JSON line, and the
  result has the medians::

    {"path": "tenant_cross_node", "flowcni_gbps": .., "default_network_gbps": ..,
     "ratio": flowcni/default, "ratio_per_round_median": ..,
     "tenant_vswitchd_s_per_gb": .., "default_vswitchd_s_per_gb": ..,
     "tenant_passes_per_packet": .., "default_passes_per_packet": ..,
     "tenant_upcalls_per_run": .., "default_upcalls_per_run": .., "rounds": ..,
     "seconds": .., "loadavg_1m": [min, max]}

  The two pipelines do the same datapath work per packet (one ct() and one
  recirculation per pass on each node, the same number of megaflows, no
  per-connection field in any mask), so the vswitchd CPU per GB should match;
  a throughput ratio away from 1 on a shared machine is load, not the tenant.

The lab lives in /run/flowcni-bench-<prefix> with netns names <prefix>-...;
give your own --prefix on a shared machine. Everything is removed in finally.

    python3 bench/tenants.py                   # builders: 100x100 and 1000x10
    python3 bench/tenants.py --throughput --prefix wtb [--time 5] [--repeat 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def generate(tenants: int, pods: int, nodes: int) -> tuple[list[Any], list[Any], list[Any]]:
    tn, nss = [], []
    for t in range(tenants):
        tn.append({"name": f"t{t}", "created": f"{t:08d}", "spec": {
            "namespaceSelector": {"matchLabels": {"tenant": f"t{t}"}},
            "subnets": ["10.128.0.0/12"], "nodeSubnetSize": 24}})
        nss.append({"name": f"ns{t}", "labels": {"tenant": f"t{t}"}})
    node_list = [{"name": f"node{i}", "nodeIP": f"192.168.{i >> 8}.{i & 255 or 1}",
                  "podCIDR": f"10.244.{i}.0/24"} for i in range(1, nodes + 1)]
    return tn, nss, node_list


def measure(tenants: int, pods: int, nodes: int) -> dict[str, Any]:
    from flowcni.datastore.tenantconv import resolve
    from flowcni.flows.pod import LocalPod
    from flowcni.flows.tenant import TenantNet, base_flows, tenant_flows, tenant_pod_flows

    tn, nss, node_list = generate(tenants, pods, nodes)
    ips = {n["name"]: n["nodeIP"] for n in node_list}
    t0 = time.perf_counter()
    res = resolve(tn, nss, node_list, "10.244.0.0/16")
    flows = base_flows(7)
    port = 100
    for t in res.tenants.values():
        assert t.ok, t.conditions
        net = TenantNet(t.name, t.vni, tuple((n, ips[n], s) for n, s in sorted(t.slices.items())))
        flows += tenant_flows(net, "node1", 7)
        local = [p for p in range(pods) if p % nodes == 0]  # node1's share
        base = int(t.slices["node1"].split(".")[2])
        for i, _ in enumerate(local):
            port += 1
            flows += tenant_pod_flows(LocalPod(f"{t.name}-{i}/eth0", port,
                                               f"10.{128 + (base >> 8)}.{base & 255}.{i + 2}",
                                               f"02:00:00:{(port >> 16) & 255:02x}:"
                                               f"{(port >> 8) & 255:02x}:{port & 255:02x}"),
                                      net)
    compute = time.perf_counter() - t0
    return {"tenants": tenants, "pods_per_tenant": pods, "nodes": nodes, "flows": len(flows),
            "compute_s": round(compute, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# -- throughput ----------------------------------------------------------------------------

TENANT_YAML = [
    ("Namespace", "", "tb", {"name": "tb", "labels": {"tenant": "tb"}}),
    ("TenantNetwork", "", "tb", {"name": "tb", "created": "0", "labels": {}, "spec": {
        "namespaceSelector": {"matchLabels": {"tenant": "tb"}},
        "subnets": ["10.60.0.0/16"], "vni": 77}}),
]


def interleaved(eps: dict[str, Any], seconds: int, rounds: int,
                nodes: list[Any]) -> dict[str, Any]:
    """Rounds of one iperf3 run per path, the order swapped every round (T,D then D,T).

    Load from the other users of the machine comes and goes over seconds; in
    a round the two runs are back to back, and swapping the order each round
    makes a slow drift hit both paths alike. Each round prints its figures to
    stderr as a JSON line; the result has the medians, the median of the
    per-round ratios (paired, so a round on a loaded machine counts once for
    both paths) and the ovs-vswitchd CPU seconds per GB of each path: the
    datapath's cost per byte, which still moves with the load (ovs-vswitchd
    polls: fewer packets per wake-up cost more each), and the datapath passes
    per packet and upcalls of each run on both `nodes` (counters, not timings:
    the same on an idle or a loaded machine when the two paths do the same work).
    """
    from peers import counts_delta, datapath_counts
    from throughput import iperf3, log

    gbps: dict[str, list[float]] = {"tenant": [], "default": []}
    cost: dict[str, list[float]] = {"tenant": [], "default": []}
    passes: dict[str, list[float]] = {"tenant": [], "default": []}
    upcalls: dict[str, list[int]] = {"tenant": [], "default": []}
    ratios: list[float] = []
    for ep in eps.values():  # warm-up, not counted: first megaflows, ARP, socket buffers
        iperf3(ep, 1)
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        got = {}
        for label in (("tenant", "default") if r % 2 == 0 else ("default", "tenant")):
            c0 = datapath_counts(nodes)
            got[label] = iperf3(eps[label], seconds)
            dc = counts_delta(c0, datapath_counts(nodes))
            gbps[label].append(got[label].gbps)
            cost[label].append(got[label].vswitchd_s_per_gb)
            passes[label].append((dc["packets"] + dc["recirculations"]) / max(dc["packets"], 1))
            upcalls[label].append(dc["upcalls"])
        ratios.append(got["tenant"].gbps / got["default"].gbps)
        load.append(os.getloadavg()[0])
        log(json.dumps({"round": r + 1, **{
            f"{k}_{f}": round(v, 3) for k, s in got.items()
            for f, v in (("gbps", s.gbps), ("vswitchd_s_per_gb", s.vswitchd_s_per_gb),
                         ("retransmits", s.retransmits), ("passes_per_packet", passes[k][-1]),
                         ("upcalls", upcalls[k][-1]))},
            "ratio": round(ratios[-1], 3), "loadavg_1m": round(load[-1], 2)}))
    med = {k: statistics.median(v) for k, v in gbps.items()}
    return {"path": "tenant_cross_node", "flowcni_gbps": round(med["tenant"], 3),
            "default_network_gbps": round(med["default"], 3),
            "ratio": round(med["tenant"] / med["default"], 3),
            "ratio_per_round_median": round(statistics.median(ratios), 3),
            "tenant_vswitchd_s_per_gb": round(statistics.median(cost["tenant"]), 3),
            "default_vswitchd_s_per_gb": round(statistics.median(cost["default"]), 3),
            "tenant_passes_per_packet": round(statistics.median(passes["tenant"]), 3),
            "default_passes_per_packet": round(statistics.median(passes["default"]), 3),
            "tenant_upcalls_per_run": statistics.median(upcalls["tenant"]),
            "default_upcalls_per_run": statistics.median(upcalls["default"]),
            "rounds": rounds, "seconds": seconds,
            "loadavg_1m": [round(min(load), 2), round(max(load), 2)]}


def throughput(prefix: str, seconds: int, repeat: int) -> dict[str, Any]:
    from flowcni.lab.lab import Lab

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import Endpoints, vswitchd_pids
    from throughput import log, wait_reachable

    lab = Lab(base=f"/run/flowcni-bench-{prefix}", prefix=f"{prefix}-")
    lab.down()
    try:
        lab.up(nodes=2, encap="geneve")
        store = lab.store()
        for kind, ns, name, body in TENANT_YAML:
            store.put(kind, ns, name, body)
        lab.wait_realized()
        pids = vswitchd_pids([lab.node(n).ovs for n in ("node1", "node2")])
        eps = {}
        for label, ns in (("tenant", "tb"), ("default", "default")):
            c = lab.pod_add("c", "node1", namespace=ns)
            s = lab.pod_add("s", "node2", namespace=ns)
            eps[label] = Endpoints(c.netns, s.netns, s.ip, pids)
            wait_reachable(eps[label])
            log(f"setup {label}: {c.ip} on node1 -> {s.ip} on node2")
        return interleaved(eps, seconds, repeat,
                           [lab.node(n).ovs for n in ("node1", "node2")])
    finally:
        lab.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--one", nargs=3, type=int, metavar=("TENANTS", "PODS", "NODES"))
    ap.add_argument("--nodes", type=int, default=10, help="nodes the pods spread over")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--prefix", default=os.environ.get("FLOWCNI_BENCH_PREFIX", "fcbtn"),
                    help="lab netns/run-dir prefix (default $FLOWCNI_BENCH_PREFIX or fcbtn)")
    ap.add_argument("--time", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=8,
                    help="rounds; each runs both paths once, the order swapped every round "
                         "(an even count lets each path go first equally often)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(*a.one)))
        return
    if a.throughput:
        print(json.dumps(throughput(a.prefix, a.time, a.repeat)), flush=True)
        return
    for t, p in ((100, 100), (1_000, 10)):
        out = subprocess.run([sys.executable, __file__, "--one", str(t), str(p), str(a.nodes)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
