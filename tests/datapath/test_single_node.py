"""Same-node pod networking through real OVS: reachability, TCP, spoof guard, DEL, restart."""

from __future__ import annotations

import json
import os
import subprocess

from flowcni.ctl.client import AgentClient
from flowcni.flows import cookie as ck
from flowcni.lab.lab import Lab

from tests.support.probe import Capture, eventually, ping, ping_during, tcp_transfer


def flows(lab: Lab) -> list[str]:
    out = lab.node("node1").ovs.ofctl("dump-flows", "br-int", "--no-stats")
    return [ln.strip() for ln in out.splitlines() if "actions=" in ln]


def cookies(lab: Lab) -> list[int]:
    return [int(ln.split("cookie=")[1].split(",")[0], 16) for ln in flows(lab)]


def test_pods_reach_each_other_and_gateway(lab1: Lab) -> None:
    pods = {p.name: p for p in lab1.pods()}
    gw = lab1.node("node1").pod_cidr.replace("0/24", "1")
    for src in pods:
        assert ping(lab1, src, gw), f"{src} -> gateway {gw}"
        for dst, p in pods.items():
            if src != dst:
                assert ping(lab1, src, p.ip), f"{src} -> {dst} ({p.ip})"


def test_tcp_between_pods_carries_data(lab1: Lab) -> None:
    assert tcp_transfer(lab1, "b", "a", nbytes=4_000_000) == 4_000_000


def test_forged_source_ip_is_dropped(lab1: Lab) -> None:
    b = lab1.pod("b")
    assert ping(lab1, "a", b.ip)  # neighbour entry for b now exists in a
    subprocess.run(lab1.exec_argv("a", ["ip", "addr", "add", "10.244.1.250/32", "dev", "eth0"]),
                   check=True)
    try:
        cap = Capture(lab1, "b", "icmp")
        assert not ping(lab1, "a", b.ip, count=3, timeout=0.5, extra=("-I", "10.244.1.250"))
        seen = cap.count()
        assert seen == [], f"forged packets reached b: {seen}"
        # The capture does see real traffic, so an empty capture above means dropped.
        cap = Capture(lab1, "b", "icmp")
        assert ping(lab1, "a", b.ip)
        assert cap.count(), "capture saw no genuine ping"
    finally:
        subprocess.run(lab1.exec_argv("a", ["ip", "addr", "del", "10.244.1.250/32", "dev",
                                            "eth0"]))


def test_forged_source_mac_is_dropped(lab1: Lab) -> None:
    a, b = lab1.pod("a"), lab1.pod("b")
    subprocess.run(lab1.exec_argv("a", ["ip", "link", "set", "eth0", "address",
                                        "0a:00:00:00:be:ef"]), check=True)
    try:
        cap = Capture(lab1, "b", "icmp or arp")
        assert not ping(lab1, "a", b.ip, count=2, timeout=0.5)
        assert cap.count() == []
    finally:
        subprocess.run(lab1.exec_argv("a", ["ip", "link", "set", "eth0", "address", a.mac]),
                       check=True)
    assert ping(lab1, "a", b.ip)


def test_forged_arp_sender_is_dropped(lab1: Lab) -> None:
    """An ARP request claiming another pod's IP gets no answer from the responder."""
    b = lab1.pod("b")
    subprocess.run(lab1.exec_argv("a", ["ip", "addr", "add", "10.244.1.251/32", "dev", "eth0"]),
                   check=True)
    try:
        p = subprocess.run(lab1.exec_argv("a", ["arping", "-c", "2", "-w", "2", "-I", "eth0",
                                                "-s", "10.244.1.251", b.ip]),
                           capture_output=True, text=True)
        assert p.returncode != 0, p.stdout
        ok = subprocess.run(lab1.exec_argv("a", ["arping", "-c", "1", "-w", "2", "-I", "eth0",
                                                 b.ip]), capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        subprocess.run(lab1.exec_argv("a", ["ip", "addr", "del", "10.244.1.251/32", "dev",
                                            "eth0"]))


def test_del_removes_port_veth_flows_and_lease(lab1: Lab) -> None:
    node = lab1.node("node1")
    pod = lab1.pod_add("gone", "node1")
    key = f"{pod.container_id}/eth0"
    ports = node.ovs.vsctl("list-ports", "br-int").split()
    host_if = [p for p in ports if p.startswith("fc")]
    assert len(host_if) == 4
    assert any(pod.mac in f for f in flows(lab1))
    lab1.pod_del("gone")
    assert len([p for p in node.ovs.vsctl("list-ports", "br-int").split()
                if p.startswith("fc")]) == 3
    left = [f for f in flows(lab1) if pod.mac in f or f"nw_dst={pod.ip}," in f]
    assert left == []

    def host_veths() -> int:
        links = subprocess.run(["ip", "-n", node.netns, "-o", "link"], capture_output=True,
                               text=True).stdout
        return sum(1 for ln in links.splitlines() if ": fcv" in ln)

    def leased() -> bool:
        with open(os.path.join(node.rundir, "agent", "ipam.json")) as f:
            return key in json.load(f)["leases"]

    # The veth and the lease go in the background, right after DEL answers.
    assert eventually(lambda: host_veths() == 3 and not leased())
    # DEL again (the runtime retries): still a success.
    from flowcni.lab.lab import Pod
    lab1.run_plugin("DEL", Pod("gone", "default", "node1", "nonexistent", pod.container_id),
                    node)


def test_agent_kill9_restart_keeps_traffic_and_leaves_no_stale_flows(lab1: Lab) -> None:
    before = flows(lab1)
    old_round = ck.round_of(cookies(lab1)[0])
    b = lab1.pod("b")
    out = ping_during(lab1, "a", b.ip, 500,
                      lambda: lab1.restart_agent("node1", kill=True))
    assert " 0% packet loss" in out, out[-300:]
    after = flows(lab1)
    rounds = {ck.round_of(c) for c in cookies(lab1)}
    assert rounds == {ck.next_round(old_round)}, f"flows of several rounds: {rounds}"
    strip = [f.split(",", 1)[1] for f in after]  # drop the cookie
    assert len(strip) == len(set(strip)), "duplicate flows"
    assert sorted(strip) == sorted(f.split(",", 1)[1] for f in before)
    assert ping(lab1, "c", b.ip)


def test_leases_survive_restart(lab1: Lab) -> None:
    ips = {p.ip for p in lab1.pods()}
    lab1.restart_agent("node1", kill=True)
    p = lab1.pod_add("fresh", "node1")
    try:
        assert p.ip not in ips
        assert ping(lab1, "fresh", lab1.pod("a").ip)
    finally:
        lab1.pod_del("fresh")


def test_gateway_traffic_goes_through_the_pipeline(lab1: Lab) -> None:
    """With the userspace datapath the node's stack must not answer pods on their host veths."""
    node = lab1.node("node1")
    gw_mac = subprocess.run(["ip", "-n", node.netns, "-br", "link", "show", "flowcni-gw0"],
                            capture_output=True, text=True, check=True).stdout.split()[2]
    subprocess.run(lab1.exec_argv("c", ["ip", "neigh", "flush", "all"]), check=True)

    def gw_flow_packets() -> int:
        out = node.ovs.ofctl("dump-flows", "br-int", f"dl_dst={gw_mac}")
        return sum(int(x.split("n_packets=")[1].split(",")[0]) for x in out.splitlines()
                   if "n_packets=" in x)

    before = gw_flow_packets()
    gw_ip = node.pod_cidr.replace("0/24", "1")
    assert ping(lab1, "c", gw_ip, count=3)
    neigh = subprocess.run(lab1.exec_argv("c", ["ip", "neigh", "show", gw_ip]),
                           capture_output=True, text=True).stdout
    assert gw_mac in neigh, f"pod resolved the gateway to {neigh!r}, not {gw_mac}"
    # OVS pushes datapath stats to flows periodically.
    assert eventually(lambda: gw_flow_packets() >= before + 3), gw_flow_packets()


def test_a_bad_object_stalls_neither_the_agent_nor_its_restart(lab1: Lab) -> None:
    """A pod body no engine expects (labels a list: the embedded store takes any body,
    as from a buggy or older writer) made every change batch holding it raise; the
    watch retried that batch for ever, so no later change took effect, and a restarted
    agent died in its initial load. Now the bad pod is skipped and named in status, a
    later policy lands in OVS, and a restart comes up with that policy in force."""
    store = lab1.store()
    node = lab1.node("node1")
    b, c = lab1.pod("b"), lab1.pod("c")

    def failures() -> list[str]:
        st = AgentClient(node.api_socket).status()
        return [f"{f['kind']} {f['namespace']}/{f['name']}"
                for f in st.get("change_failures", [])]

    try:
        lab1.set_labels("b", {"zp": "deny"})
        lab1.wait_realized(timeout=30)
        assert ping(lab1, "a", b.ip) and ping(lab1, "a", c.ip)
        # on a node of its own (none here): the pod restore of node1 never reads it
        store.put("Pod", "default", "zp-bad", {
            "namespace": "default", "name": "zp-bad", "labels": ["zp=deny"],
            "ip": "10.244.99.250", "node": "node9", "containerID": "zp-bad", "ports": []})
        assert eventually(lambda: failures() == ["Pod default/zp-bad"], timeout=30), \
            failures()
        store.put("NetworkPolicy", "default", "zp-deny", {
            "namespace": "default", "name": "zp-deny",
            "spec": {"podSelector": {"matchLabels": {"zp": "deny"}},
                     "policyTypes": ["Ingress"]}})
        lab1.wait_realized(timeout=30)
        # the deny is in force while the control path works, at the same time
        assert not ping(lab1, "a", b.ip) and ping(lab1, "a", c.ip)
        lab1.restart_agent("node1")  # the bad pod is still in the store
        assert failures() == ["Pod default/zp-bad"]
        lab1.wait_realized(timeout=30)
        assert not ping(lab1, "a", b.ip) and ping(lab1, "a", c.ip)
    finally:
        store.delete("NetworkPolicy", "default", "zp-deny")
        store.delete("Pod", "default", "zp-bad")
        lab1.set_labels("b", {})
        lab1.wait_realized(timeout=30)
    assert eventually(lambda: ping(lab1, "a", b.ip), timeout=10)
    assert failures() == []  # the bad object's delete applied: nothing left to report
