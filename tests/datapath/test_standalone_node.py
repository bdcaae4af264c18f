"""A single node outside the lab, set up as the README's "A single node outside the lab" says.

Its own network namespace (a veth uplink holding the node IP), its own Open
vSwitch, and an agent on an embedded store of its own whose cluster settings
come from a FLOWCNI_CLUSTER_CONFIG file and which records the pods it
attaches (as a kubelet would: no kubelet here); no `Lab` object, no lab state.
Pods attach through the launcher `flowctl install-cni` writes, and
`flowctl apply/delete --datastore sqlite:PATH` is what reaches that store: a
deny-all policy in one namespace stops traffic to its pods while the same
client still reaches a pod of another namespace, and deleting it lets traffic through again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flowcni.cni import install
from flowcni.datastore.store import Store
from flowcni.lab import netns
from flowcni.lab.ovs import OVS, kill_wait

PREFIX = os.environ.get("FLOWCNI_TEST_PREFIX", "fct")
NODE_IP = "192.168.253.10"
CLUSTER = "cluster_cidr: 10.77.0.0/16\nnode_cidr_size: 24\nencap: geneve\n"
DENY_ALL = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""


def eventually(what: str, fn: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.5)


class Node:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.ns = f"{PREFIX}solo"
        self.ovs = OVS(self.ns, str(base / "ovs"))
        self.store = base / "store.db"
        self.sock = str(base / "cni.sock")
        self.agent: subprocess.Popen[bytes] | None = None
        self.pod_ns: list[str] = []

    def flowctl(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCNI_")}
        return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", *args], input=stdin,
                              capture_output=True, text=True, env=env, timeout=120)

    def start(self) -> None:
        netns.add(self.ns)
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"],
                    ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0-peer", "up"],
                    ["ip", "link", "set", "eth0", "up"]):
            netns.run(netns.exec_argv(self.ns, cmd))
        self.ovs.start()
        (self.base / "cluster.yaml").write_text(CLUSTER)
        log = open(self.base / "agent.log", "ab")
        self.agent = subprocess.Popen(
            netns.exec_argv(self.ns, [
                sys.executable, "-m", "flowcni.controller.agent", "--node", "solo",
                "--datastore", f"sqlite:{self.store}", "--node-ip", NODE_IP,
                "--ovsdb", self.ovs.remote, "--cni-socket", self.sock,
                "--state-dir", str(self.base / "state"), "--datapath-type", "netdev"]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "FLOWCNI_CLUSTER_CONFIG": str(self.base / "cluster.yaml")},
            start_new_session=True)
        eventually("agent ready", lambda: self.flowctl(
            "probe", "--socket", self.sock, "--ready").returncode == 0, timeout=120)

    def attach(self, plugin: str, name: str, namespace: str = "default") -> str:
        ns = f"{PREFIX}solo-{name}"
        netns.add(ns)
        self.pod_ns.append(ns)
        conf = {"cniVersion": "1.0.0", "name": "flowcni", "type": "flowcni",
                "agentSocket": self.sock}
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "ADD", "CNI_CONTAINERID": name,
               "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0",
               "CNI_PATH": os.path.dirname(plugin),
               "CNI_ARGS": f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"}
        p = subprocess.run([plugin], input=json.dumps(conf), env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        result: dict[str, Any] = json.loads(p.stdout)
        return str(result["ips"][0]["address"].split("/")[0])

    def ping(self, src_ns: str, ip: str) -> bool:
        return subprocess.run(netns.exec_argv(src_ns, ["ping", "-c1", "-W1", ip]),
                              capture_output=True).returncode == 0

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            kill_wait(self.agent.pid, timeout=10)
            self.agent.wait()
        self.ovs.stop()
        for ns in [*self.pod_ns, self.ns]:
            if netns.exists(ns):
                netns.delete(ns)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    if netns.exists(n.ns):  # a crashed earlier run
        netns.delete(n.ns)
    try:
        n.start()
        yield n
    finally:
        n.stop()


def test_single_node_on_its_own_store(node: Node, tmp_path: Path) -> None:
    plugin = install.install(str(tmp_path / "bin"))
    web, client = node.attach(plugin, "web"), node.attach(plugin, "client")
    other = node.attach(plugin, "other", namespace="prod")
    for ip in (web, client, other):  # the pod CIDR came from the cluster config file
        assert ip.startswith("10.77."), ip
    client_ns = f"{PREFIX}solo-client"
    eventually("client -> web", lambda: node.ping(client_ns, web))
    # the agent recorded them, as a kubelet would.
    pods = {(p["namespace"], p["name"]): p["ip"] for p in Store(str(node.store)).objects("Pod")}
    assert pods == {("default", "web"): web, ("default", "client"): client,
                    ("prod", "other"): other}

    p = node.flowctl("apply", "--datastore", f"sqlite:{node.store}", "-f", "-", stdin=DENY_ALL)
    assert p.returncode == 0 and "networkpolicy/default/deny-all applied" in p.stdout, p.stderr
    # Denied into default; at the same time the same client still reaches prod/other.
    eventually("client -> web denied", lambda: not node.ping(client_ns, web))
    assert node.ping(client_ns, other)

    p = node.flowctl("delete", "--datastore", f"sqlite:{node.store}", "-f", "-", stdin=DENY_ALL)
    assert p.returncode == 0 and "deleted" in p.stdout, p.stderr
    eventually("client -> web allowed again", lambda: node.ping(client_ns, web))
