"""The agent API and flowctl against an agent started by hand, outside any lab.

The test makes a network namespace, starts ovsdb-server and ovs-vswitchd in it,
writes an embedded store and starts `flowcni-agent` itself (no `Lab`): what an
operator of a plain node does. Pods are attached by the real plugin executable.
Then `flowctl --agent-socket P ...` runs as a separate process and must show what
the switch holds: status, flows (checked against ovs-ofctl), the policy, traces
(checked against real packets), and fail loudly where something is not there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from flowcni.ctl.client import AgentClient, AgentError
from flowcni.datastore.store import ClusterConfig, Store
from flowcni.lab.ovs import OVS

from tests.support.probe import eventually

RUN = os.environ.get("FLOWCNI_TEST_PREFIX", "fct")
NODE_IP = "192.168.251.1"
CLUSTER = "10.78.0.0/16"
DENY_B = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-b, namespace: default}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p


@dataclass
class Node:
    ns: str
    base: str
    ovs: OVS
    store: Store
    agent: subprocess.Popen[bytes]
    pods: dict[str, dict[str, str]]

    @property
    def api(self) -> str:
        return os.path.join(self.base, "run", "api.sock")

    @property
    def cni(self) -> str:
        return os.path.join(self.base, "run", "cni.sock")


def flowctl(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    """flowctl as its own process, pointed at the agent only by --agent-socket."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCNI_")}
    env["FLOWCNI_LAB_DIR"] = os.path.join(node.base, "no-lab")  # no lab to fall back on
    return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", "--agent-socket",
                           node.api, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def attach(node: Node, name: str, labels: dict[str, str]) -> dict[str, str]:
    """CNI ADD through the real plugin, then report the pod to the store (the kubelet's
    part on a node with the embedded datastore)."""
    pns = f"{node.ns}-{name}"
    sh("ip", "netns", "add", pns)
    sh("ip", "-n", pns, "link", "set", "lo", "up")
    conf = {"cniVersion": "1.0.0", "name": "flowcni", "type": "flowcni",
            "agentSocket": node.cni}
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"c-{name}",
           "CNI_NETNS": f"/run/netns/{pns}", "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"}
    p = subprocess.run([sys.executable, "-m", "flowcni.cni.plugin"], input=json.dumps(conf),
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    ip = res["ips"][0]["address"].split("/")[0]
    node.store.put("Pod", "default", name, {"namespace": "default", "name": name,
                                            "labels": labels, "ip": ip, "node": "solo",
                                            "containerID": f"c-{name}", "ports": []})
    pod = {"ns": pns, "ip": ip}
    node.pods[name] = pod
    return pod


def ping(node: Node, src: str, ip: str) -> bool:
    return sh("ip", "netns", "exec", node.pods[src]["ns"], "ping", "-n", "-c", "1", "-W", "1",
              ip, check=False).returncode == 0


def wait_realized(node: Node) -> None:
    rev = node.store.revision()
    assert eventually(lambda: AgentClient(node.api).status()["applied_revision"] >= rev,
                      timeout=20)


@pytest.fixture(scope="module")
def solo() -> Iterator[Node]:
    ns = f"{RUN}sa-node"
    base = f"/run/flowcni-test-{RUN}-standalone"
    for leftover in (f"{ns}-a", f"{ns}-b", ns):
        sh("ip", "netns", "del", leftover, check=False)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    ovs = OVS(ns, os.path.join(base, "ovs"))
    agent: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1")
        sh("ip", "-n", ns, "link", "set", "uplink1", "up")
        sh("ip", "-n", ns, "addr", "add", f"{NODE_IP}/24", "dev", "uplink0")
        sh("ip", "-n", ns, "link", "set", "uplink0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "192.168.251.254")
        ovs.start()
        store = Store(os.path.join(base, "store.db"))
        store.set_cluster(ClusterConfig(cluster_cidr=CLUSTER, encap="geneve").validate())
        log = open(os.path.join(base, "agent.log"), "ab")
        agent = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "flowcni.controller.agent",
             "--node", "solo", "--datastore", f"sqlite:{store.path}", "--node-ip", NODE_IP,
             "--ovsdb", ovs.remote, "--datapath-type", "netdev", "--metrics-address", "",
             "--cni-socket", os.path.join(base, "run", "cni.sock"),
             "--api-socket", os.path.join(base, "run", "api.sock"),
             "--state-dir", os.path.join(base, "state")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(ns, base, ovs, store, agent, {})

        def synced() -> bool:
            try:
                return bool(AgentClient(node.api).status()["synced"])
            except AgentError:
                return False
        assert eventually(synced, timeout=60), open(log.name).read()[-3000:]
        attach(node, "a", {"app": "a"})
        attach(node, "b", {"app": "b"})
        wait_realized(node)
        yield node
    finally:
        if agent is not None:
            os.killpg(agent.pid, signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
        ovs.stop()
        for leftover in (f"{ns}-a", f"{ns}-b", ns):
            sh("ip", "netns", "del", leftover, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_sockets_are_root_only_and_cni_socket_has_only_cni_verbs(solo: Node) -> None:
    assert stat.S_IMODE(os.stat(solo.api).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(solo.cni)
        s.sendall(b'{"command": "_status"}')
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(b"".join(iter(lambda: s.recv(65536), b"")))
    assert reply["ok"] is False and "unknown command" in reply["msg"]


def test_status_table_and_json(solo: Node) -> None:
    p = flowctl(solo, "status")
    assert p.returncode == 0, p.stderr
    head, row = p.stdout.splitlines()[:2]
    assert head.split()[:3] == ["NODE", "CONNECTED", "SYNCED"]
    assert row.split()[:3] == ["solo", "yes", "yes"]
    st = json.loads(flowctl(solo, "status", "--json").stdout)
    assert [s["node"] for s in st] == ["solo"]
    assert st[0]["bridge"] == "br-int" and st[0]["pods"] == 2
    assert st[0]["datastore"] == f"sqlite:{solo.store.path}"


def test_flows_are_what_ovs_holds(solo: Node) -> None:
    p = flowctl(solo, "flows", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)[0]["flows"]
    held = [ln for ln in solo.ovs.ofctl("dump-flows", "br-int").splitlines()
            if "actions=" in ln]
    assert len(rows) == len(held) > 10
    assert {r["cookie"] for r in rows} == {
        ln.split("cookie=")[1].split(",")[0] for ln in held}
    assert all(r["as_desired"] for r in rows), [r for r in rows if not r["as_desired"]]
    a_ip = solo.pods["a"]["ip"]
    mine = [r for r in rows if r["object"] == "pod default/a"]
    assert any(a_ip in r["match"] for r in mine), mine
    one = flowctl(solo, "flows", "--table", "L3Forwarding", "--no-stats")
    assert one.returncode == 0 and "table=L3Forwarding" in one.stdout
    assert all("table=L3Forwarding" in ln for ln in one.stdout.splitlines()[1:])


def test_unknown_table_node_and_socket_fail_loudly(solo: Node) -> None:
    p = flowctl(solo, "flows", "--table", "NoSuchTable")
    assert p.returncode != 0 and "Classifier" in p.stderr and "IngressDefault" in p.stderr
    p = flowctl(solo, "call", "flows", '{"table": "NoSuchTable"}')  # the agent checks too
    err = json.loads(p.stdout)["error"]
    assert p.returncode == 1 and err["code"] == "not-found" and "Classifier" in err["message"]
    p = flowctl(solo, "status", "--node", "other")
    assert p.returncode == 1 and "no node 'other'" in p.stderr and "solo" in p.stderr
    p = flowctl(solo, "--agent-socket", "/nonexistent/api.sock", "status")
    assert p.returncode == 1 and "no agent API socket at /nonexistent/api.sock" in p.stderr
    p = flowctl(solo, "trace", "--from", "default/nosuch", "--to", "default/a")
    assert p.returncode == 1 and "no pod default/nosuch" in p.stderr
    p = flowctl(solo, "trace", "--from", "a", "--to", "b", "--proto", "icmp", "--dport", "80")
    assert p.returncode == 1 and "icmp has no ports" in p.stderr


def test_trace_says_where_packets_really_go(solo: Node) -> None:
    p = flowctl(solo, "trace", "--from", "a", "--to", "b", "--dport", "80")
    assert p.returncode == 0 and "verdict: DELIVERED: delivered to pod default/b" in p.stdout
    p = flowctl(solo, "trace", "--from", "a", "--to", "8.8.8.8")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "LEAVES THE NODE" in p.stdout and f"masqueraded to the node's address {NODE_IP}" \
        in p.stdout
    st = AgentClient(solo.api).status()
    unassigned = st["pod_cidr"].rsplit(".", 1)[0] + ".200"
    p = flowctl(solo, "trace", "--from", "a", "--to", unassigned)
    assert p.returncode == 3 and "NOWHERE" in p.stdout and "no pod has it" in p.stdout
    p = flowctl(solo, "trace", "--from", "a", "--to", "10.78.250.9")
    assert p.returncode == 3 and "in no node's pod CIDR" in p.stdout


def test_deny_all_policy_shows_and_traces(solo: Node, tmp_path: object) -> None:
    path = os.path.join(solo.base, "deny-b.yaml")
    with open(path, "w") as f:
        f.write(DENY_B)
    p = flowctl(solo, "apply", "-f", path)  # the agent's own embedded store
    assert p.returncode == 0 and "networkpolicy/default/deny-b applied" in p.stdout, p.stderr
    wait_realized(solo)
    try:
        rows = json.loads(flowctl(solo, "policy", "--json").stdout)
        iso = [r for r in rows if r["policy"] == "default/deny-b"]
        assert [r["rule"] for r in iso] == ["ingress: isolates"], rows
        assert iso[0]["detail"]["isolated_pods"] == ["default/b"]
        text = flowctl(solo, "policy").stdout
        assert "default/deny-b isolates default/b" in text
        a, b = solo.pods["a"]["ip"], solo.pods["b"]["ip"]
        # the deny, next to a control on an allowed path at the same time
        assert not ping(solo, "a", b) and ping(solo, "b", a)
        p = flowctl(solo, "trace", "--from", "a", "--to", "b", "--proto", "icmp")
        assert p.returncode == 3 and "DROPPED" in p.stdout, p.stdout
        assert "isolated by default/deny-b" in p.stdout
        p = flowctl(solo, "trace", "--from", "b", "--to", "a", "--proto", "icmp")
        assert p.returncode == 0 and "delivered to pod default/a" in p.stdout
    finally:
        flowctl(solo, "delete", "-f", path)
        wait_realized(solo)
