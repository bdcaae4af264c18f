#!/usr/bin/env python3
"""Dump what ServiceProxy builds for randomized Services, to compare two versions of
the builders byte for byte (a speed-up must not change a flow or a group).

Deterministic (seeded): run it under each checkout (`PYTHONPATH` pointing a
`flowcni` name at the other tree, or in each worktree) and `cmp` the dumps.
Covers: ClusterIP/NodePort/LoadBalancer, node ports, external and
LoadBalancer IPs, externalTrafficPolicy and internalTrafficPolicy Local,
sessionAffinity, TCP/UDP/SCTP, named and numbered target ports, ports chained
over sub-groups (910-1900 endpoints), three local CIDRs, churn through apply()
(pods out and relabelled, Services changed and removed) with the stale-UDP
list, describe/host_view/health_checks, and an EndpointSlice-mode load.
Prints one line per step (label, lines, sha256 prefix); the dump goes to the
file named by the first argument; the second is the number of seeds.
"""

from __future__ import annotations

import hashlib
import random
import sys
from typing import Any, TextIO

from flowcni.datastore.store import Change
from flowcni.flows.services import ServiceProxy

Body = dict[str, Any]


def gen(seed: int, nsvc: int) -> tuple[random.Random, list[Body], list[Body]]:
    """nsvc Services and their pods (8% with 910-1900 endpoints, the rest 0-12)."""
    r = random.Random(seed)
    pods: list[Body] = []
    svcs: list[Body] = []
    nid = 0
    for s in range(nsvc):
        ns = f"ns{s % 3}"
        big = r.random() < 0.08
        n = r.choice([910, 1000, 1900]) if big else r.choice([0, 1, 2, 5, 12])
        app = f"a{s}"
        for _ in range(n):
            nid += 1
            node = r.randrange(4)
            ip = (f"10.{100 + node}.{(nid >> 8) & 255}.{nid & 255}" if big
                  else f"10.244.{node}.{(nid % 250) + 2}")
            ports = [{"name": "http", "containerPort": r.choice([8080, 8081]),
                      "protocol": "TCP"},
                     {"name": "sc", "containerPort": 9000, "protocol": "SCTP"}]
            pods.append({"namespace": ns, "name": f"p{nid}", "node": f"node{node}", "ip": ip,
                         "labels": {"app": app, "tier": r.choice(["x", "y"])},
                         "ports": ports if r.random() < 0.8 else ports[:1]})
        stype = r.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        sports: list[Body] = [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
        if r.random() < 0.4:
            sports.append({"name": "sc", "port": 9000, "targetPort": "sc", "protocol": "SCTP"})
        spec: Body = {"clusterIP": f"10.96.{s >> 8}.{s & 255}", "selector": {"app": app},
                      "type": stype, "ports": sports}
        if r.random() < 0.3:
            spec["selector"] = {"app": app, "tier": "x"}
        if stype != "ClusterIP":
            for i, p in enumerate(sports):
                p["nodePort"] = 30000 + s * 4 + i
            if r.random() < 0.5:
                spec["externalTrafficPolicy"] = "Local"
        if r.random() < 0.3:
            spec["internalTrafficPolicy"] = "Local"
        if r.random() < 0.3:
            spec["sessionAffinity"] = "ClientIP"
            if r.random() < 0.5:
                spec["sessionAffinityConfig"] = {
                    "clientIP": {"timeoutSeconds": r.randrange(1, 1000)}}
        if r.random() < 0.2:
            spec["externalIPs"] = [f"192.0.2.{s % 250 + 1}"]
        body: Body = {"namespace": ns, "name": f"svc{s}", "spec": spec}
        if stype == "LoadBalancer" and r.random() < 0.5:
            body["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.51.100.{s % 250 + 1}"}]}}
        svcs.append(body)
    return r, svcs, pods


def dump(out: TextIO, label: str, flows: dict[str, list[Any]], groups: dict[str, list[Any]],
         problems: list[str]) -> None:
    lines = [f"## {label}"]
    for o in sorted(flows):
        lines += [f"F {o} {f!r}" for f in sorted(flows[o], key=repr)]
    for o in sorted(groups):
        lines += [f"G {o} {g!r}" for g in sorted(groups[o], key=repr)]
    lines += [f"P {p}" for p in problems]
    text = "\n".join(lines) + "\n"
    out.write(text)
    print(label, len(lines), hashlib.sha256(text.encode()).hexdigest()[:16])


def churn(r: random.Random, svcs: list[Body], pods: list[Body], rev: int) -> list[Change]:
    """One apply()'s worth of changes: pods out or relabelled, Services changed or gone."""
    ch = []
    for _ in range(r.randrange(1, 6)):
        rev += 1
        k = r.random()
        if k < 0.4 and pods:
            b = r.choice(pods)
            ch.append(Change(rev, "delete", "Pod", b["namespace"], b["name"], None))
        elif k < 0.7 and pods:
            b = dict(r.choice(pods))
            b["labels"] = dict(b["labels"], tier=r.choice(["x", "y"]))
            ch.append(Change(rev, "put", "Pod", b["namespace"], b["name"], b))
        elif k < 0.85:
            b = r.choice(svcs)
            spec = dict(b["spec"])
            spec["sessionAffinity"] = r.choice(["None", "ClientIP"])
            ch.append(Change(rev, "put", "Service", b["namespace"], b["name"],
                             {**b, "spec": spec}))
        else:
            b = r.choice(svcs)
            ch.append(Change(rev, "delete", "Service", b["namespace"], b["name"], None))
    return ch


def main() -> None:
    out = open(sys.argv[1], "w")
    for seed in range(int(sys.argv[2]) if len(sys.argv) > 2 else 4):
        for cidr in (None, "10.244.1.0/24", "10.101.0.0/16"):
            r, svcs, pods = gen(seed, 60)
            p = ServiceProxy(local_cidr=cidr)
            dump(out, f"seed{seed} cidr{cidr} load", *p.load(svcs, pods))
            for step in range(25):
                dump(out, f"seed{seed} cidr{cidr} step{step}",
                     *p.apply(churn(r, svcs, pods, step * 10)))
                out.write(f"S {p.take_stale()!r}\n")
            dump(out, f"seed{seed} cidr{cidr} final", {k: v[0] for k, v in p.built.items()},
                 {k: v[1] for k, v in p.built.items()}, [])
            out.write(f"{p.describe()!r}\n{p.host_view()!r}\n"
                      f"{sorted(p.health_checks().items())!r}\n")
    # EndpointSlice mode (the Kubernetes datastore)
    r = random.Random(99)
    p = ServiceProxy(slices=True, local_cidr="10.244.1.0/24")
    svcs = [{"namespace": "d", "name": f"s{i}", "spec": {
        "clusterIP": f"10.96.7.{i + 1}", "type": "NodePort",
        "ports": [{"name": "a", "port": 80, "nodePort": 31000 + i,
                   "protocol": r.choice(["TCP", "UDP", "SCTP"])}],
        "sessionAffinity": r.choice(["None", "ClientIP"]),
        "externalTrafficPolicy": r.choice(["Cluster", "Local"])}} for i in range(10)]
    slices = [{"namespace": "d", "name": f"s{i}-1", "addressType": "IPv4",
               "labels": {"kubernetes.io/service-name": f"s{i}"},
               "ports": [{"name": "a", "port": 8080,
                          "protocol": svcs[i]["spec"]["ports"][0]["protocol"]}],
               "endpoints": [{"addresses": [f"10.244.{r.randrange(3)}.{j + 2}"],
                              "conditions": {"ready": r.random() < 0.8, "serving": True,
                                             "terminating": True}}
                             for j in range(r.choice([1, 5, 950]))]}
              for i in range(10)]
    dump(out, "slices load", *p.load(svcs, [], slices))


if __name__ == "__main__":
    main()
