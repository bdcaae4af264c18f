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

Then, in one two-node lab (geneve, flowcni proxy; --no-lab skips it), one
client pod ``c`` on node1 and endpoints ``e`` (node2) and ``e2`` (node1):

* ``{"path": "clusterip", "flowcni_conn_per_s", "kube_proxy_nft_conn_per_s",
  "ratio"}``: sequential TCP connections (connect, one request, its answer,
  close) per second from ``c`` to ``e`` through a ClusterIP flowcni programs,
  and through another ClusterIP that only node1's nftables knows, DNATed the
  way kube-proxy's nftables mode does (tests.support.svc.kube_proxy_rules:
  the packet leaves OVS through the gateway, the node DNATs it and routes it
  back). --conn-repeat rounds of --conn-time seconds, each round running both
  paths back to back, the order swapped every round (F,N then N,F) so the
  machine's changing load hits both alike; each round's figures go to stderr
  as a JSON line. Medians, plus "ratio_per_round_median" (the paired
  ratios' median) and "*_vswitchd_us_per_conn" (ovs-vswitchd CPU of both
  nodes per connection: the flowcni path takes fewer datapath passes per
  connection than the nftables one, which crosses node1's OVS twice per
  packet; the nftables path's kernel work is not counted there).
* ``{"path": "clusterip_throughput", "flowcni_gbps", "pod_ip_gbps", "ratio"}``:
  iperf3 (one TCP stream) from ``c`` to ``e`` through the ClusterIP and to
  ``e``'s pod IP, --repeat rounds interleaved the same way; medians.
* ``{"endpoint_change_p50_ms", "endpoint_change_p99_ms", "changes"}``: a
  UDP Service's one endpoint is swapped (``e`` out, ``e2`` in, and back) by
  writing its EndpointSlice to the store; the time until a prober in ``c``
  (a new socket, so a new connection, every 2 ms) is answered by the new one.

--prefix names the lab (netns names and /run dir): give each concurrent run
its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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


# -- lab figures -----------------------------------------------------------------------

VIP_FLOWCNI, VIP_NFT, VIP_UDP = "10.96.9.1", "10.96.9.2", "10.96.9.3"
IPERF_PORT = 5201

CONNECT = r"""
import socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(b"ping"); s.recv(100); s.close(); n += 1
print(n / seconds)
"""

PROBER = r"""
import socket, sys, time
last = None
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.05)
    try:
        s.sendto(b"x", (sys.argv[1], 53)); who = s.recv(100).split()[0].decode()
    except OSError:
        who = None
    s.close()
    if who and who != last:
        print(time.time(), who, flush=True); last = who
    time.sleep(0.002)
"""


def put(lab: Any, kind: str, name: str, body: dict[str, Any]) -> None:
    lab.store().put(kind, "default", name, {"namespace": "default", "name": name, **body})


def put_slice(lab: Any, service: str, ips: list[str], ports: list[tuple[int, str]]) -> None:
    from tests.support.svc import endpoint_slice  # on sys.path once lab_figures runs

    lab.store().put(*endpoint_slice("default", service, ips,
                                    [(f"p{n}", n, proto) for n, proto in ports]))


def put_service(lab: Any, name: str, vip: str, ports: list[tuple[int, str]]) -> None:
    put(lab, "Service", name, {"spec": {"clusterIP": vip, "ports": [
        {"name": f"p{n}", "port": n, "targetPort": n, "protocol": proto}
        for n, proto in ports]}})


def in_pod(lab: Any, pod: str, argv: list[str], timeout: float = 120) -> str:
    p = subprocess.run(lab.exec_argv(f"default/{pod}", argv), capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} in {pod}: exit {p.returncode}: {p.stderr.strip()[-300:]}")
    return p.stdout


def iperf_gbps(lab: Any, ip: str, seconds: int, tries: int = 3) -> float:
    """One iperf3 run; retried when it ends without a result.

    The long-lived server may still be closing the previous test ("the server
    is busy"), which iperf3 reports in its JSON with exit status 0.
    """
    for attempt in range(tries):
        out = json.loads(in_pod(lab, "c", ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t",
                                           str(seconds), "-J"], timeout=seconds + 60))
        got = out.get("end", {}).get("sum_received", {}).get("bits_per_second")
        if got is not None:
            return float(got) / 1e9
        print(f"iperf3 to {ip}: no result ({out.get('error')}), try {attempt + 1}/{tries}",
              file=sys.stderr, flush=True)
        time.sleep(1)
    raise RuntimeError(f"iperf3 to {ip}: no result after {tries} tries")


def _order(i: int, pair: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Round i's order: as given in even rounds, swapped in odd ones (A,B then B,A)."""
    return pair if i % 2 == 0 else pair[::-1]


def _cpu(pids: tuple[int, ...]) -> float:
    from throughput import cpu_seconds

    return float(cpu_seconds(pids))


def conn_rounds(lab: Any, pids: tuple[int, ...], rounds: int, seconds: float,
                nodes: list[Any]) -> dict[str, Any]:
    """New TCP connections per second, flowcni's ClusterIP and the nftables one, interleaved.

    Each round runs both paths back to back, the order swapped every round, so
    load from the machine's other users hits both alike; a round's figures go
    to stderr as a JSON line. The result has the medians, the median of the
    per-round ratios and the ovs-vswitchd CPU (both nodes) per connection of
    each path: the datapath's cost per connection, which scatters less than
    the rate (the nftables path's kernel work is not in it: it runs in the
    node's softirq, not in ovs-vswitchd), and the datapath passes and upcalls
    per connection on both `nodes` (counters: the work, whatever the load).
    """
    from peers import counts_delta, datapath_counts
    from throughput import log

    rate: dict[str, list[float]] = {"flowcni": [], "nft": []}
    cost: dict[str, list[float]] = {"flowcni": [], "nft": []}
    passes: dict[str, list[float]] = {"flowcni": [], "nft": []}
    upcalls: dict[str, list[float]] = {"flowcni": [], "nft": []}
    ratios: list[float] = []
    # ~1,000 connections a second on each path fill the client's 28k ephemeral ports
    # with TIME_WAIT in about seven rounds; connect() then slows down for both paths
    # alike (every run fell 3-5x from round 7 on), and the medians of the two paths'
    # rates came from different machines. The client reuses them, as load generators do.
    in_pod(lab, "c", ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1",
                      "net.ipv4.ip_local_port_range=1024 65535"])
    for vip in (VIP_FLOWCNI, VIP_NFT):  # warm-up, not counted: first megaflows, ARP
        in_pod(lab, "c", [sys.executable, "-c", CONNECT, vip, "80", "0.5"])
    load = [os.getloadavg()[0]]
    for i in range(rounds):
        got: dict[str, float] = {}
        for what, vip in _order(i, [("flowcni", VIP_FLOWCNI), ("nft", VIP_NFT)]):
            c0, d0 = _cpu(pids), datapath_counts(nodes)
            got[what] = float(in_pod(lab, "c", [sys.executable, "-c", CONNECT, vip, "80",
                                                str(seconds)]))
            dc = counts_delta(d0, datapath_counts(nodes))
            conns = max(got[what] * seconds, 1)
            rate[what].append(got[what])
            cost[what].append((_cpu(pids) - c0) / conns * 1e6)
            passes[what].append((dc["packets"] + dc["recirculations"]) / conns)
            upcalls[what].append(dc["upcalls"] / conns)
            got[f"{what}_vswitchd_us_per_conn"] = cost[what][-1]
            got[f"{what}_passes_per_conn"] = passes[what][-1]
            got[f"{what}_upcalls_per_conn"] = upcalls[what][-1]
        ratios.append(got["flowcni"] / got["nft"])
        load.append(os.getloadavg()[0])
        log(json.dumps({"round": i + 1, **{k: round(v, 3) for k, v in got.items()},
                        "ratio": round(ratios[-1], 3), "loadavg_1m": round(load[-1], 2)}))
    fc, kp = statistics.median(rate["flowcni"]), statistics.median(rate["nft"])
    return {"path": "clusterip", "flowcni_conn_per_s": round(fc, 1),
            "kube_proxy_nft_conn_per_s": round(kp, 1), "ratio": round(fc / kp, 3),
            "ratio_per_round_median": round(statistics.median(ratios), 3),
            "flowcni_vswitchd_us_per_conn": round(statistics.median(cost["flowcni"]), 1),
            "nft_vswitchd_us_per_conn": round(statistics.median(cost["nft"]), 1),
            "flowcni_passes_per_conn": round(statistics.median(passes["flowcni"]), 2),
            "nft_passes_per_conn": round(statistics.median(passes["nft"]), 2),
            "flowcni_upcalls_per_conn": round(statistics.median(upcalls["flowcni"]), 4),
            "nft_upcalls_per_conn": round(statistics.median(upcalls["nft"]), 4),
            "rounds": rounds, "seconds": seconds,
            "loadavg_1m": [round(min(load), 2), round(max(load), 2)]}


def tput_rounds(lab: Any, pod_ip: str, rounds: int, seconds: int) -> dict[str, Any]:
    """iperf3 through the ClusterIP and to the pod IP, interleaved as conn_rounds is."""
    from throughput import log

    tput: dict[str, list[float]] = {"flowcni": [], "pod_ip": []}
    ratios: list[float] = []
    for i in range(rounds):
        got: dict[str, float] = {}
        for what, ip in _order(i, [("flowcni", VIP_FLOWCNI), ("pod_ip", pod_ip)]):
            got[what] = iperf_gbps(lab, ip, seconds)
            tput[what].append(got[what])
        ratios.append(got["flowcni"] / got["pod_ip"])
        log(json.dumps({"round": i + 1, **{f"{k}_gbps": round(v, 3) for k, v in got.items()},
                        "ratio": round(ratios[-1], 3),
                        "loadavg_1m": round(os.getloadavg()[0], 2)}))
    ft, pt = statistics.median(tput["flowcni"]), statistics.median(tput["pod_ip"])
    return {"path": "clusterip_throughput", "flowcni_gbps": round(ft, 3),
            "pod_ip_gbps": round(pt, 3), "ratio": round(ft / pt, 3),
            "ratio_per_round_median": round(statistics.median(ratios), 3), "rounds": rounds}


def lab_figures(prefix: str, repeat: int, seconds: int, changes: int,
                conn_repeat: int = 12, conn_seconds: float = 2.0) -> Iterator[dict[str, Any]]:
    """Yields each figure as soon as it is measured, so a later failure loses nothing."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flowcni.lab.lab import Lab
    from peers import vswitchd_pids

    from tests.support.svc import DNat, install_kube_proxy_rules, start_server

    lab = Lab(base=f"/run/flowcni-{prefix}", prefix=f"{prefix}-")
    lab.down()
    procs: list[subprocess.Popen[str]] = []
    try:
        lab.up(nodes=2, encap="geneve")
        lab.pod_add("c", "node1")
        lab.pod_add("e", "node2")
        lab.pod_add("e2", "node1")
        ips = {p.name: p.ip for p in lab.pods()}
        for n in ("e", "e2"):
            procs.append(start_server(lab.exec_argv(f"default/{n}", []), n, "80,53u"))
        procs.append(subprocess.Popen(lab.exec_argv("default/e", [
            "iperf3", "-s", "-p", str(IPERF_PORT)]), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True))
        put_service(lab, "bench", VIP_FLOWCNI, [(80, "TCP"), (IPERF_PORT, "TCP")])
        put_slice(lab, "bench", [ips["e"]], [(80, "TCP"), (IPERF_PORT, "TCP")])
        put_service(lab, "churn", VIP_UDP, [(53, "UDP")])
        put_slice(lab, "churn", [ips["e"]], [(53, "UDP")])
        lab.wait_realized(timeout=60)
        install_kube_proxy_rules(lab, "node1", "benchkp",
                                 [DNat(VIP_NFT, 80, "tcp", ips["e"], 80)])
        time.sleep(1)
        nodes = [lab.node(n).ovs for n in ("node1", "node2")]
        yield conn_rounds(lab, vswitchd_pids(nodes), conn_repeat, conn_seconds, nodes)
        yield tput_rounds(lab, ips["e"], repeat, seconds)
        # endpoint change -> seen by a prober
        prober = subprocess.Popen(lab.exec_argv("default/c", [sys.executable, "-c", PROBER,
                                                              VIP_UDP]),
                                  stdout=subprocess.PIPE, text=True)
        procs.append(prober)
        seen: list[tuple[float, str]] = []

        def read() -> None:
            for ln in prober.stdout or []:
                t, who = ln.split()
                seen.append((float(t), who))
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        lat: list[float] = []
        for i in range(changes):
            want = "e2" if i % 2 == 0 else "e"
            t0 = time.time()
            put_slice(lab, "churn", [ips[want]], [(53, "UDP")])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                hit = [t for t, who in seen if who == want and t >= t0]
                if hit:
                    lat.append((hit[0] - t0) * 1000)
                    break
                time.sleep(0.005)
            time.sleep(0.2)
        lat.sort()
        if lat:
            yield {"endpoint_change_p50_ms": round(statistics.median(lat), 1),
                   "endpoint_change_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
                   "changes": changes, "seen": len(lat)}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        lab.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--one", nargs=2, type=int, metavar=("SERVICES", "ENDPOINTS"))
    ap.add_argument("--no-lab", action="store_true", help="builder figures only")
    ap.add_argument("--lab-only", action="store_true", help="lab figures only")
    ap.add_argument("--prefix", default="fcbs", help="lab prefix (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=6, help="throughput rounds")
    ap.add_argument("--time", type=int, default=3, help="seconds per throughput run")
    ap.add_argument("--conn-repeat", type=int, default=12,
                    help="connection-rate rounds; each runs both paths, order swapped")
    ap.add_argument("--conn-time", type=float, default=2.0,
                    help="seconds per connection-rate run")
    ap.add_argument("--changes", type=int, default=40, help="endpoint changes to time")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(*a.one)))
        return
    for s, e in () if a.lab_only else ((1_000, 10), (10_000, 10)):
        out = subprocess.run([sys.executable, __file__, "--one", str(s), str(e)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)
    if not a.no_lab:
        for line in lab_figures(a.prefix, a.repeat, a.time, a.changes, a.conn_repeat,
                                a.conn_time):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
