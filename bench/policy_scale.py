#!/usr/bin/env python3
"""NetworkPolicy flow count and compute time at scale (builders only, no datapath).

Generates a cluster of pods spread over namespaces with app/tier labels and
policies with realistic selectors: most rules pick peers by app label in the
policy's own namespace, some by a namespace's team label, some add an
ipBlock; one to three ports each. Every pod is placed on the measured node,
the worst case for one node. Prints one JSON line per size:
pods, policies, flows (what flowcni installs), per_pair_flows (what one flow
per selected pod x peer x port would cost), compute_s, peak_rss_mb; the
cluster row adds compute_cpu_s (the same span in CPU time: the wall figure
swings with whatever else runs on a shared machine) and cluster_compute_s
(the cluster tiers' share of compute_s).
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


def generate_cluster(n_ns: int, admin: int, seed: int = 11) -> list[dict[str, Any]]:
    """`admin` Admin-tier ClusterNetworkPolicies and the one Baseline policy.

    Admin policies select namespaces by team (or pods by app across namespaces),
    deny ingress from another team on one or two ports, accept egress to a
    network, and pass a third team's traffic to NetworkPolicy; the
    Baseline policy denies ingress from every namespace to every pod (the
    usual cluster default deny): its subject and peer sets are every pod.
    """
    rnd = random.Random(seed)
    out = []
    for j in range(admin):
        subject = ({"namespaces": {"matchLabels": {"team": f"t{rnd.randrange(10)}"}}}
                   if rnd.random() < 0.7 else
                   {"pods": {"namespaceSelector": {},
                             "podSelector": {"matchLabels": {"app": f"a{rnd.randrange(20)}"}}}})
        ports = [{"tcp": {"destinationPort": {"number": p}}}
                 for p in rnd.sample([80, 443, 8080, 5432], rnd.randint(1, 2))]
        ingress = [{"name": "deny-team", "action": "Deny", "protocols": ports,
                    "from": [{"namespaces": {"matchLabels": {"team": f"t{rnd.randrange(10)}"}}}]},
                   {"name": "pass-team", "action": "Pass",
                    "from": [{"namespaces": {"matchLabels": {"team": f"t{rnd.randrange(10)}"}}}]}]
        egress = [{"name": "external", "action": "Accept",
                   "to": [{"networks": ["172.16.0.0/16", "192.0.2.0/24"]}]}]
        out.append({"name": f"admin{j}", "spec": {"tier": "Admin", "priority": j % 1000,
                                                  "subject": subject, "ingress": ingress,
                                                  "egress": egress}})
    out.append({"name": "default", "spec": {
        "tier": "Baseline", "priority": 1000, "subject": {"namespaces": {}},
        "ingress": [{"name": "default-deny", "action": "Deny",
                     "from": [{"namespaces": {}}]}]}})
    return out


def per_pair_of(flows: list[Any]) -> int:
    """What one flow per subject x peer x port would cost: the product of each
    conjunction's clause sizes, read off the flows themselves."""
    from flowcni.flows.model import Conjunction
    dims: dict[int, dict[int, int]] = {}
    for f in flows:
        for a in f.actions:
            if isinstance(a, Conjunction):
                d = dims.setdefault(a.id, {})
                d[a.clause] = d.get(a.clause, 0) + 1
    total = 0
    for d in dims.values():
        n = 1
        for v in d.values():
            n *= v
        total += n
    return total


def measure_cluster(pods: int, policies: int, admin: int) -> dict[str, Any]:
    """NetworkPolicy and the cluster tiers together, as the agent loads them."""
    from flowcni.flows.clusterpolicy import ClusterPolicyEngine
    from flowcni.flows.policy import PolicyEngine

    nss, plist, pols = generate(pods, policies)
    cpols = generate_cluster(len(nss), admin)
    nodes = [{"name": "node1", "nodeIP": "192.168.0.1"}, {"name": "node2", "nodeIP": "192.168.0.2"}]
    t, c = time.perf_counter(), time.process_time()
    owners, problems = PolicyEngine("node1").load(nss, plist, pols)
    t1 = time.perf_counter()
    cowners, cproblems = ClusterPolicyEngine("node1").load(
        nss, plist, nodes, {"ClusterNetworkPolicy": cpols})
    compute, cpu = time.perf_counter() - t, time.process_time() - c
    cluster = time.perf_counter() - t1
    assert not problems and not cproblems, (problems + cproblems)[:3]
    nflows = [f for v in owners.values() for f in v]
    cflows = [f for v in cowners.values() for f in v]
    return {"pods": pods, "policies": policies, "cluster_policies": len(cpols),
            "flows": len(nflows) + len(cflows), "cluster_flows": len(cflows),
            "per_pair_flows": per_pair_of(nflows) + per_pair_of(cflows),
            "compute_s": round(compute, 3), "compute_cpu_s": round(cpu, 3),
            "cluster_compute_s": round(cluster, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


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
    ap.add_argument("--cluster", type=int, default=0, metavar="ADMIN",
                    help="with --one: add ADMIN Admin-tier policies and one Baseline policy")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure_cluster(a.one[0], a.one[1], a.cluster) if a.cluster
                         else measure(*a.one)))
        return
    for pods, policies in ((1000, 100), (10000, 1000)):
        subprocess.run([sys.executable, __file__, "--one", str(pods), str(policies)],
                       check=True)
    subprocess.run([sys.executable, __file__, "--one", "10000", "1000", "--cluster", "100"],
                   check=True)


if __name__ == "__main__":
    main()
