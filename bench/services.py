#!/usr/bin/env python3
"""Service proxy flows, groups and compute time at scale (builders only, no datapath).

S Services with E endpoints each (two ports: TCP by name, UDP by number),
every endpoint a pod of the Service's own app label, as the embedded store
gives them to the agent. Prints one JSON line per size:
{"services", "endpoints", "compute_s", "flows", "groups", "peak_rss_mb"}:
what one agent computes at start (ServiceProxy.load) and the peak RSS of the
process doing it (each size runs in its own process, so the figure is its
own; it includes the generated input, about 130 MB at 10,000 Services).
compute_cpu_s is the same build's process CPU time and loadavg_1m the
machine's load when it ran: on a shared machine the wall time grows with the
load, the CPU time much less. Peer figure in the same line: "kube_proxy_rules", the nftables rules
kube-proxy's nftables mode writes for the same Services (one per Service
port plus one per endpoint per port, as counted from its rule layout).

The datapath figures the issue asks for (connections/s and throughput
through a ClusterIP vs kube-proxy's DNAT, endpoint change latency) are not
measured here yet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any


def generate(services: int, endpoints: int) -> tuple[list[Any], list[Any]]:
    svcs, pods = [], []
    for s in range(services):
        ns = f"ns{s % 100}"
        svcs.append({"namespace": ns, "name": f"svc{s}", "spec": {
            "clusterIP": f"10.96.{(s >> 8) & 255}.{s & 255}" if s < 65536 else "10.97.0.1",
            "selector": {"app": f"a{s}"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                      {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}]}})
        for e in range(endpoints):
            i = s * endpoints + e
            pods.append({"namespace": ns, "name": f"p{i}", "node": f"node{i % 50}",
                         "ip": f"10.{(i >> 16) & 255 | 128}.{(i >> 8) & 255}.{i & 255}",
                         "labels": {"app": f"a{s}"},
                         "ports": [{"name": "http", "containerPort": 8080}]})
    return svcs, pods


def measure(services: int, endpoints: int) -> dict[str, Any]:
    from flowcni.flows.services import ServiceProxy

    svcs, pods = generate(services, endpoints)
    proxy = ServiceProxy()
    t, c = time.perf_counter(), time.process_time()
    flows, groups, problems = proxy.load(svcs, pods)
    compute, cpu = time.perf_counter() - t, time.process_time() - c
    assert not problems, problems[:3]
    n_groups = sum(len(v) for v in groups.values())
    n_ports = sum(len(s["spec"]["ports"]) for s in svcs)
    return {"services": services, "endpoints": endpoints, "compute_s": round(compute, 3),
            "compute_cpu_s": round(cpu, 3), "loadavg_1m": round(os.getloadavg()[0], 2),
            "flows": sum(len(v) for v in flows.values()), "groups": n_groups,
            "buckets": sum(len(g.buckets) for v in groups.values() for g in v),
            "kube_proxy_rules": n_ports * (1 + endpoints),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=2, type=int, metavar=("SERVICES", "ENDPOINTS"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(*a.one)))
        return
    for s, e in ((1_000, 10), (10_000, 10)):
        out = subprocess.run([sys.executable, __file__, "--one", str(s), str(e)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
