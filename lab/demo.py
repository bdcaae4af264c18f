"""The lab demo: a node, pods, real traffic, the spoof guard at work, and the flow tables."""

from __future__ import annotations

import subprocess
import sys

from flowcni.lab.lab import Lab

TCP_SINK = ("import socket;s=socket.socket();s.bind(('0.0.0.0',8080));s.listen(1);"
            "c,_=s.accept();n=0\nwhile (b:=c.recv(65536)): n+=len(b)\nprint(n)")
TCP_SEND = ("import socket,sys;c=socket.create_connection((sys.argv[1],8080),timeout=5);"
            "c.sendall(b'x'*int(sys.argv[2]));c.close()")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def ok(cond: bool, what: str) -> bool:
    print(f"  [{'ok' if cond else 'FAIL'}] {what}", flush=True)
    return cond


def _ping(lab: Lab, src: str, dst: str, *extra: str) -> bool:
    return subprocess.run(lab.exec_argv(src, ["ping", "-n", "-c", "1", "-W", "1", *extra, dst]),
                          capture_output=True).returncode == 0


def run_demo(lab: Lab, keep: bool = False) -> int:
    from flowcni.controller.flowctl import main as flowctl

    good = True
    try:
        step("flowctl lab up --nodes 1")
        lab.up(nodes=1)
        flowctl(["lab", "nodes"])
        step("three pods: web-1, web-2 (app=web), client (app=client)")
        lab.pod_add("web-1", "node1", labels={"app": "web"})
        lab.pod_add("web-2", "node1", labels={"app": "web"})
        lab.pod_add("client", "node1", labels={"app": "client"})
        flowctl(["lab", "pods"])
        pods = {p.name: p for p in lab.pods()}
        gw = lab.node("node1").pod_cidr.rsplit(".", 1)[0] + ".1"
        step("ping: every pod to every pod and to the gateway")
        for s in pods:
            good &= ok(_ping(lab, s, gw), f"{s} -> gateway {gw}")
            for d, p in pods.items():
                if s != d:
                    good &= ok(_ping(lab, s, p.ip), f"{s} -> {d} ({p.ip})")
        step("TCP: client sends 10 MB to web-1:8080")
        sink = subprocess.Popen(lab.exec_argv("web-1", [sys.executable, "-c", TCP_SINK]),
                                stdout=subprocess.PIPE, text=True)
        import time
        time.sleep(0.5)
        subprocess.run(lab.exec_argv("client", [sys.executable, "-c", TCP_SEND,
                                                pods["web-1"].ip, "10000000"]), check=False)
        out, _ = sink.communicate(timeout=30)
        good &= ok(out.strip() == "10000000", f"web-1 received {out.strip()} bytes")
        step("spoof guard: client pings web-2 from a forged source address")
        subprocess.run(lab.exec_argv("client", ["ip", "addr", "add", "10.244.1.250/32",
                                                "dev", "eth0"]), check=True)
        good &= ok(not _ping(lab, "client", pods["web-2"].ip, "-I", "10.244.1.250"),
                   "forged packets dropped by SpoofGuard")
        step("NetworkPolicy: not implemented yet (issue 4); all pods may talk")
        step("flowctl flows --node node1 (table names, feature and round from the cookie)")
        flowctl(["flows", "--node", "node1"])
        step("flowctl status")
        flowctl(["status"])
    finally:
        if keep:
            print("\nlab left up: try `flowctl lab pods`, `flowctl flows`, "
                  "`flowctl lab exec client -- ping web-1's IP`; `flowctl lab down` to remove")
        else:
            step("flowctl lab down")
            lab.down()
    print(f"\ndemo {'passed' if good else 'FAILED'}")
    return 0 if good else 1
