"""The lab demo: two nodes, pods, real traffic, a Service, a NetworkPolicy, a trace, two
tenant networks with overlapping addresses, the flow tables."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

from flowcni.lab import netns
from flowcni.lab.lab import EXTERNAL_IP, Lab

# SO_REUSEADDR: the sink of an earlier step may still hold the port in LAST_ACK.
TCP_SINK = ("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            "s.bind(('0.0.0.0',8080));s.listen(1);"
            "c,_=s.accept();n=0\nwhile (b:=c.recv(65536)): n+=len(b)\nprint(n)")
TCP_SEND = ("import socket,sys;c=socket.create_connection((sys.argv[1],int(sys.argv[3])),"
            "timeout=5);c.sendall(b'x'*int(sys.argv[2]));c.close()")
POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}]
"""
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
"""
TENANTS = """
apiVersion: v1
kind: Namespace
metadata: {name: blue, labels: {tenant: blue}}
---
apiVersion: v1
kind: Namespace
metadata: {name: red, labels: {tenant: red}}
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: blue}
spec:
  namespaceSelector: {matchLabels: {tenant: blue}}
  subnets: [10.50.0.0/16]
  vni: 101
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: red}
spec:
  namespaceSelector: {matchLabels: {tenant: red}}
  subnets: [10.50.0.0/16]
  vni: 202
"""


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def ok(cond: bool, what: str) -> bool:
    print(f"  [{'ok' if cond else 'FAIL'}] {what}", flush=True)
    return cond


def _ping(lab: Lab, src: str, dst: str, *extra: str) -> bool:
    return subprocess.run(lab.exec_argv(src, ["ping", "-n", "-c", "2", "-W", "1", *extra, dst]),
                          capture_output=True).returncode == 0


def _tcp(lab: Lab, src: str, dst: str, nbytes: int) -> int:
    """Send nbytes from pod src to pod dst's port 8080; what dst received."""
    return _tcp_to(lab, src, lab.pod(dst).ip, nbytes, [dst], wait=5.0)[dst]


def _tcp_to(lab: Lab, src: str, ip: str, nbytes: int, sinks: list[str], port: int = 8080,
            wait: float = 2.0) -> dict[str, int]:
    """Send nbytes from src (a pod, or the external host's namespace) to ip:port; what
    each of `sinks` (pods listening on 8080) received."""
    procs = {d: subprocess.Popen(lab.exec_argv(d, [sys.executable, "-c", TCP_SINK]),
                                 stdout=subprocess.PIPE, text=True) for d in sinks}
    time.sleep(0.5)
    send = [sys.executable, "-c", TCP_SEND, ip, str(nbytes), str(port)]
    sent = subprocess.run(netns.exec_argv(src, send) if src == lab.external_ns
                          else lab.exec_argv(src, send), capture_output=True, text=True)
    if sent.returncode:
        print(f"  sender: {sent.stderr.strip().splitlines()[-1:]}", flush=True)
    got = {}
    for d, sink in procs.items():
        try:
            out, _ = sink.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            sink.kill()
            out, _ = sink.communicate()
        got[d] = int(out.strip() or 0)
    return got


def run_demo(lab: Lab, keep: bool = False) -> int:
    from flowcni.ctl.flowctl import (
        show_flows,
        show_policy,
        show_services,
        show_status,
        show_tenants,
        show_trace,
    )
    from flowcni.datastore.manifests import load
    from flowcni.lab.cli import show_nodes, show_pods

    good = True
    try:
        step("flowctl lab up --nodes 2 (geneve)")
        lab.up(nodes=2, encap="geneve")
        show_nodes(lab)
        step("pods: web-1 (node1, app=web), web-2 (node2, app=web), "
             "client (node2, app=client), other (node1)")
        lab.pod_add("web-1", "node1", labels={"app": "web"})
        lab.pod_add("web-2", "node2", labels={"app": "web"})
        lab.pod_add("client", "node2", labels={"app": "client"})
        lab.pod_add("other", "node1", labels={"app": "other"})
        show_pods(lab)
        pods = {p.name: p for p in lab.pods()}
        step("ping: every pod to every pod (same node and across the Geneve tunnel)")
        for s in pods:
            for d, p in pods.items():
                if s != d:
                    good &= ok(_ping(lab, s, p.ip), f"{s} -> {d} ({p.ip})")
        step(f"egress: other pings the external host {EXTERNAL_IP} (masqueraded)")
        good &= ok(_ping(lab, "other", EXTERNAL_IP), f"other -> {EXTERNAL_IP}")
        step("TCP: client (node2) sends 10 MB to web-1 (node1) port 8080")
        good &= ok(_tcp(lab, "client", "web-1", 10_000_000) == 10_000_000,
                   "web-1 received 10000000 bytes")
        step("Service: ClusterIP 10.96.0.80:80 and node port 30080 -> the app=web pods' 8080 "
             "(a select group in OVS)")
        print(SERVICE)
        store = lab.store()
        for kind, ns, name, body in load(SERVICE):
            store.put(kind, ns, name, body)
        lab.wait_realized()
        got = _tcp_to(lab, "client", "10.96.0.80", 100_000, ["web-1", "web-2"], port=80)
        good &= ok(sorted(got.values()) == [0, 100_000],
                   f"client -> 10.96.0.80:80 reached one endpoint: {got}")
        n1 = lab.node("node1").node_ip
        step(f"NodePort: the external host sends to node1's address {n1}:30080 "
             "(steered into OVS by the node's nftables, SNATed in OVS to node1's gateway)")
        # One segment: bigger bursts from the underlay lose their first try (the node
        # drops userspace-TSO packets larger than the gateway's MTU, see README).
        got = _tcp_to(lab, lab.external_ns, n1, 1000, ["web-1", "web-2"], port=30080)
        good &= ok(sorted(got.values()) == [0, 1000],
                   f"external -> {n1}:30080 reached one endpoint: {got}")
        step("flowctl services (endpoints per node, packets per group bucket)")
        show_services(lab.agents())
        step("flowctl flows --node node2 --service default/web")
        show_flows([a for a in lab.agents() if a.name == "node2"], SimpleNamespace(
            stale=False, table=None, pod=None, policy=None, service="default/web", json=False,
            no_stats=True))
        step("flowctl trace --from client --to default/web (the Service: group, bucket, endpoint)")
        good &= ok(show_trace(lab.agents(), "client", "default/web") == 0,
                   "the trace reaches an endpoint pod through the Service")
        step("NetworkPolicy: web pods accept only client, on TCP 8080")
        print(POLICY)
        for kind, ns, name, body in load(POLICY):
            store.put(kind, ns, name, body)
        lab.wait_realized()
        good &= ok(_tcp(lab, "client", "web-2", 1000) == 1000, "client -> web-2:8080 allowed")
        good &= ok(_tcp(lab, "other", "web-2", 1000) == 0, "other -> web-2:8080 denied")
        good &= ok(not _ping(lab, "client", pods["web-1"].ip), "client -> web-1 ping denied")
        step("flowctl policy (each rule as realized, with the packets it allowed)")
        show_policy(lab.agents())
        step("flowctl trace --from other --to web-2 --dport 8080 (why is it denied?)")
        show_trace(lab.agents(), "other", "web-2", "tcp", 8080)
        step("flowctl trace --live --from client --to web-1 --dport 8080 (a real probe)")
        show_trace(lab.agents(), "client", "web-1", "tcp", 8080, live=True)
        step("spoof guard: other pings web-1 from a forged source address")
        subprocess.run(lab.exec_argv("other", ["ip", "addr", "add", "10.244.1.250/32",
                                               "dev", "eth0"]), check=True)
        good &= ok(not _ping(lab, "other", pods["web-1"].ip, "-I", "10.244.1.250"),
                   "forged packets dropped by SpoofGuard")
        step("tenant networks: blue and red, both 10.50.0.0/16, VNIs 101 and 202")
        print(TENANTS)
        for kind, ns, name, body in load(TENANTS):
            if kind == "TenantNetwork":
                body = {**body, "created": name}  # what flowctl apply records
            store.put(kind, ns, name, body)
        lab.wait_realized()
        for ref, node in (("blue/a", "node1"), ("red/a", "node1"), ("blue/b", "node2"),
                          ("red/b", "node2")):
            ns, name = ref.split("/")
            p = lab.pod_add(name, node, namespace=ns)
            print(f"  {ref} on {node}: {p.ip}")
        step("flowctl tenants")
        show_tenants(lab.agents())
        got = _tcp_to(lab, "blue/a", "10.50.2.2", 100_000, ["blue/b", "red/b"])
        good &= ok(got == {"blue/b": 100_000, "red/b": 0},
                   f"blue/a -> 10.50.2.2:8080 reached blue/b, not red/b: {got}")
        got = _tcp_to(lab, "red/a", "10.50.2.2", 100_000, ["blue/b", "red/b"])
        good &= ok(got == {"blue/b": 0, "red/b": 100_000},
                   f"red/a -> 10.50.2.2:8080 reached red/b, not blue/b: {got}")
        good &= ok(not _ping(lab, "blue/a", pods["web-1"].ip),
                   "blue/a -> web-1 (default network) dropped")
        step("flowctl trace --from blue/a --to 10.50.2.2 (tenant and VNI at each hop)")
        show_trace(lab.agents(), "blue/a", "10.50.2.2", "tcp", 8080)
        step("flowctl flows --node node1 (table names, owners from the cookies)")
        show_flows([a for a in lab.agents() if a.name == "node1"], SimpleNamespace(
            table=None, pod=None, policy=None, service=None, stale=False, json=False,
            no_stats=True))
        step("flowctl status")
        show_status(lab.agents())
    finally:
        if keep:
            print("\nlab left up: try `flowctl lab pods`, `flowctl flows --pod default/web-1`, "
                  "`flowctl trace --from client --to web-1 --dport 8080`; "
                  "`flowctl lab down` to remove it")
        else:
            step("flowctl lab down")
            lab.down()
    print(f"\ndemo {'passed' if good else 'FAILED'}")
    return 0 if good else 1
