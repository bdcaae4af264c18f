#!/usr/bin/env python3
"""NetworkPolicy flow count and compute time at scale (builders only, no datapath).

Generates a cluster of pods spread over namespaces with app/tier labels and
policies with realistic selectors: most rules pick peers by app label in the
policy's own namespace, some by a namespace's team label, some add an
ipBlock; one to three ports each. Every pod is placed on the measured node,
the worst case for one node. Prints one JSON line per size:
pods, policies, flows (what flowcni installs), per_pair_flows (what one flow
per selected pod x peer x port would cost), compute_s, peak_rss_mb.
Each size runs in its own process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from typing import Any


def generate(pods: int, policies: int, seed: int = 7) -> tuple[list[Any], list[Any], list[Any]]:
    rnd = random.Random(seed)
    n_ns = max(1, pods // 100)
    apps = 20
    namespaces = [{"name": f"ns{i}", "labels": {"team": f"t{i % 10}"}} for i in range(n_ns)]
    plist = []
    for i in range(pods):
        ns = f"ns{i % n_ns}"
        plist.append({"namespace": ns, "name": f"p{i}", "node": "node1",
                      "ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                      "labels": {"app": f"a{rnd.randrange(apps)}", "tier": rnd.choice(
                          ["web", "db", "cache"])},
                      "ports": [{"name": "http", "containerPort": 8080}]})
    pols = []
    for j in range(policies):
        ns = f"ns{j % n_ns}"
        kind = rnd.random()
        peer: dict[str, Any]
        if kind < 0.6:
            peer = {"podSelector": {"matchLabels": {"app": f"a{rnd.randrange(apps)}"}}}
        elif kind < 0.9:
            peer = {"namespaceSelector": {"matchLabels": {"team": f"t{rnd.randrange(10)}",
                                                          }},
                    "podSelector": {"matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["web", "db"]}]}}
        else:
            peer = {"ipBlock": {"cidr": "172.16.0.0/16", "except": ["172.16.1.0/24"]}}
        ports = [{"port": p} for p in rnd.sample([80, 443, 8080, 5432, "http"],
                                                 rnd.randint(1, 3))]
        spec: dict[str, Any] = {
            "podSelector": {"matchLabels": {"app": f"a{rnd.randrange(apps)}"}},
            "ingress": [{"from": [peer], "ports": ports}]}
        if rnd.random() < 0.3:
            spec["egress"] = [{"to": [{"podSelector": {"matchLabels": {
                "tier": "db"}}}], "ports": [{"port": 5432}]}]
            spec["policyTypes"] = ["Ingress", "Egress"]
        pols.append({"namespace": ns, "name": f"np{j}", "spec": spec})
    return namespaces, plist, pols


def measure(pods: int, policies: int) -> dict[str, Any]:
    from flowcni.flows.policy import PolicyEngine

    nss, plist, pols = generate(pods, policies)
    eng = PolicyEngine("node1")
    t = time.perf_counter()
    owners, problems = eng.load(nss, plist, pols)
    compute = time.perf_counter() - t
    assert not problems, problems[:3]
    flows = sum(len(v) for v in owners.values())
    per_pair = sum(len(r["pods"]) * (len(r["peers"]) if r["peers"] is not None else 1)
                   * (len(r["ports"]) if r["ports"] is not None else 1)
                   for r in eng.describe())
    return {"pods": pods, "policies": policies, "flows": flows, "per_pair_flows": per_pair,
            "rules": len(eng.describe()), "compute_s": round(compute, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=2, type=int, metavar=("PODS", "POLICIES"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(*a.one)))
        return
    for pods, policies in ((1000, 100), (10000, 1000)):
        subprocess.run([sys.executable, __file__, "--one", str(pods), str(policies)],
                       check=True)


if __name__ == "__main__":
    main()
