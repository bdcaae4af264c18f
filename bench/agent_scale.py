#!/usr/bin/env python3
"""The running agent at cluster scale: memory, full sync, restart, changes, watch bursts.

One real lab node (its own OVS, its own agent, real pods attached through the
real plugin) whose agent sees a large simulated cluster in its datastore:

* remote nodes: datastore entries with node IPs and /28 pod CIDRs. Their
  tunnels point at 192.168.80.0/20, off the lab's underlay /24, routed to the
  lab's own `external` namespace, which answers nobody: enough for flow counts,
  and no packet leaves the lab's namespaces;
* pods: ``--pods`` cluster-wide, ``--local`` of them on the measured node (real
  netns, real CNI ADD), the rest spread over the remote nodes;
* NetworkPolicies: ``--policies``, ten per namespace, each selecting the
  namespace's local pod (tier=web); ingress from pods by app label in the
  namespace and by team across namespaces, plus ``--ipblocks`` external /32
  clients of its own; egress to db pods of a team plus as many external /32
  servers. Conjunctions share every match flow, so pod addresses cost at most
  one flow per table; the per-policy external addresses are what brings the
  measured node to about 100,000 flows (Kube-OVN's 115k-flow report came from
  exactly such allow-lists).

Both datastores, one after the other: the embedded SQLite store, and the fake
Kubernetes API server (tests/support/fakeapi.py, list + watch over HTTP).
Each prints four JSON lines:

  {"datastore", "flows" (in OVS, dump-aggregate), "desired_flows", "agent_rss_mb",
   "full_sync_s" (the agent's own timing of the full-sync bundle),
   "time_to_synced_s" (agent process start -> status synced)}
  {"datastore", "restart_lost_packets", "restart_s", "ping_sent", "unanswered_at_stop",
   "lost_seqs", "kill_at_seq", "synced_at_seq"}: kill -9 of the agent under a 10/s ping between
   two local pods; restart_s = kill -> synced again; which echoes got no reply, and
   about which echo left at the kill and at the agent's sync (see ping_losses)
  {"datastore", "change_p50_ms", "change_p99_ms", "changes"}: a policy change or
   a pod add, write -> the agent reports the revision applied (its bundle is
   committed in OVS: the agent waits for the commit reply before it says so)
  {"datastore", "watch_burst_s", "rss_growth_mb", "burst"}: ``--burst`` pod
   relabels written at once, write -> applied

The load average is printed last ({"loadavg": [...]}): the machine is shared.

    python3 bench/agent_scale.py                  # 1,000 nodes, 10,000 pods, ~100k flows
    python3 bench/agent_scale.py --quick          # 50 nodes, 500 pods, ~5k flows (CI)
    python3 bench/agent_scale.py --datastore sqlite --prefix fch

Everything runs in namespaces and /run directories named after ``--prefix``
and is removed in ``finally``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # tests.support.* (the fake API server)

from flowcni.ctl.client import AgentClient  # noqa: E402
from flowcni.lab.lab import Lab, Node  # noqa: E402
from flowcni.lab.ovs import kill_wait  # noqa: E402

from tests.support.fakeapi import namespace_obj, node_obj, pod_obj, policy_obj  # noqa: E402
from tests.support.kubelab import KubeLabDatastore  # noqa: E402

CLUSTER_CIDR = "10.244.0.0/16"  # the measured node holds 10.244.1.0/24
EXTERNAL_BASE = int(ipaddress.ip_address("100.64.0.0"))  # policy allow-list addresses
READY_TIMEOUT = 300.0
PING_NS = "bench"


@dataclass(frozen=True)
class Size:
    nodes: int      # remote nodes
    pods: int       # cluster-wide, local ones included
    local: int      # on the measured node (real pods), the two ping pods included
    policies: int
    ipblocks: int   # external /32s per policy and direction
    changes: int
    burst: int


FULL = Size(nodes=1000, pods=10000, local=100, policies=1000, ipblocks=40, changes=60,
            burst=1000)
QUICK = Size(nodes=50, pods=500, local=10, policies=50, ipblocks=40, changes=10, burst=100)


# -- the simulated cluster (store bodies; converted for the API server below) ---------

def remote_node(j: int) -> dict[str, Any]:
    net = ipaddress.ip_network(CLUSTER_CIDR)
    base = int(net.network_address) + (2 << 8) + j * 16  # /28s from 10.244.2.0 on
    return {"name": f"sim{j}", "nodeIP": f"192.168.{80 + j // 250}.{1 + j % 250}",
            "podCIDR": f"{ipaddress.ip_address(base)}/28"}


def namespaces(size: Size) -> list[dict[str, Any]]:
    n_ns = namespaces_count(size)
    out = [{"name": f"ns{k}", "labels": {"team": f"t{k % 10}"}} for k in range(n_ns)]
    return out + [{"name": PING_NS, "labels": {}}]


def namespaces_count(size: Size) -> int:
    return size.local - 2  # one local pod per namespace, plus the two ping pods


def local_pods(size: Size) -> list[tuple[str, str, dict[str, str]]]:
    """(namespace, name, labels) of the real pods on the measured node."""
    out = [(f"ns{k}", f"l{k}", {"app": f"a{k % 10}", "tier": "web"})
           for k in range(namespaces_count(size))]
    return out + [(PING_NS, "ping-a", {}), (PING_NS, "ping-b", {})]


def remote_pods(size: Size) -> list[dict[str, Any]]:
    n_ns = namespaces_count(size)
    out = []
    for i in range(size.pods - size.local):
        j = i % size.nodes
        node = remote_node(j)
        net = ipaddress.ip_network(node["podCIDR"])
        ip = str(net.network_address + 1 + i // size.nodes)
        out.append({"namespace": f"ns{i % n_ns}", "name": f"r{i}", "node": node["name"],
                    "ip": ip, "labels": pod_labels(i), "ports": []})
    return out


def pod_labels(i: int, gen: int = 0) -> dict[str, str]:
    return {"app": f"a{(i + gen) % 10}", "tier": ("web", "db")[i % 2]}


def external(j: int, e: int, size: Size, direction: int) -> str:
    n = EXTERNAL_BASE + ((direction * size.policies + j) * size.ipblocks + e)
    return f"{ipaddress.ip_address(n)}/32"


def policy(j: int, size: Size, extra: int = 0) -> dict[str, Any]:
    n_ns = namespaces_count(size)
    ins: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {"app": f"a{j % 10}"}}},
        {"namespaceSelector": {"matchLabels": {"team": f"t{j % 10}"}},
         "podSelector": {"matchLabels": {"app": f"a{(j + 1) % 10}"}}}]
    ins += [{"ipBlock": {"cidr": external(j, e, size, 0)}} for e in range(size.ipblocks + extra)]
    outs: list[dict[str, Any]] = [
        {"namespaceSelector": {"matchLabels": {"team": f"t{(j + 3) % 10}"}},
         "podSelector": {"matchLabels": {"tier": "db"}}}]
    outs += [{"ipBlock": {"cidr": external(j, e, size, 1)}} for e in range(size.ipblocks)]
    spec: dict[str, Any] = {
        "podSelector": {"matchLabels": {"tier": "web"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": ins, "ports": [{"protocol": "TCP", "port": 80 + j % 4},
                                            {"protocol": "TCP", "port": 8443}]}],
        "egress": [{"to": outs, "ports": [{"protocol": "TCP", "port": 5432}]}]}
    return {"namespace": f"ns{j % n_ns}", "name": f"np{j}", "spec": spec}


# -- the two datastores, behind one small interface ----------------------------------

class Backend:
    """Writes the simulated cluster into one datastore kind."""

    name = ""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def put_many(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        raise NotImplementedError


class SqliteBackend(Backend):
    name = "sqlite"

    def put_many(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        self.lab.store().put_many(kind, [(b.get("namespace", ""), b["name"], b) for b in bodies])


class KubeBackend(Backend):
    name = "kubernetes"
    PLURAL = {"Node": "nodes", "Namespace": "namespaces", "Pod": "pods",
              "NetworkPolicy": "networkpolicies"}

    def put_many(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        ds = self.lab.datastore
        assert isinstance(ds, KubeLabDatastore)
        objs = [self.to_kube(kind, b) for b in bodies]
        for i in range(0, len(objs), 2000):  # one control call per chunk
            ds.control().call("put_many", res=self.PLURAL[kind], objs=objs[i:i + 2000])

    @staticmethod
    def to_kube(kind: str, b: dict[str, Any]) -> dict[str, Any]:
        if kind == "Node":
            return node_obj(b["name"], b["nodeIP"], b["podCIDR"])
        if kind == "Namespace":
            return namespace_obj(b["name"], b["labels"])
        if kind == "Pod":
            return pod_obj(b["namespace"], b["name"], b["node"], b["ip"], b["labels"],
                           b.get("ports"))
        return policy_obj(b["namespace"], b["name"], b["spec"])


# -- measuring -----------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def ovs_flows(node: Node) -> int:
    out = node.ovs.ofctl("dump-aggregate", "br-int")
    m = re.search(r"flow_count=(\d+)", out)
    return int(m.group(1)) if m else -1


def wait_applied(node: Node, target: int, timeout: float = 120.0,
                 poll: float = 0.005) -> float:
    """Poll the agent until it reports revision >= target applied; returns the time seen."""
    cli = AgentClient(node.api_socket, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        st = cli.status()
        if st.get("synced") and (st.get("applied_revision") or 0) >= target:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent applied {st.get('applied_revision')} < {target} "
                               f"after {timeout}s")
        time.sleep(poll)


def settled_revision(node: Node, timeout: float = 300.0) -> int:
    """The agent's datastore revision once it has applied everything it has seen."""
    cli = AgentClient(node.api_socket, timeout=timeout)
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        st = cli.status()
        rev, applied = st.get("datastore_revision") or 0, st.get("applied_revision") or 0
        if st.get("synced") and applied >= rev and rev == last:
            return int(rev)
        last = rev
        time.sleep(0.3)
    raise RuntimeError(f"agent never settled: {cli.status()}")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def emit(d: dict[str, Any]) -> None:
    print(json.dumps(d), flush=True)


PING_INTERVAL = 0.1


def ping_losses(out: str) -> tuple[int, list[int], bool]:
    """(echoes sent, sequence numbers never answered, whether the last echo was
    unanswered) from iputils ping's output.

    The last echo sent is not among the losses but reported apart: ping is
    stopped by SIGINT and exits at once, so an echo sent less than a round
    trip before the signal counts as lost in ping's own summary although
    nothing dropped it (on a busy machine the round trip through the
    userspace datapath can take a good part of the interval). Any earlier
    echo without a reply is a loss.
    """
    m = re.search(r"(\d+) packets transmitted", out)
    if not m:
        return 0, [], False
    sent = int(m.group(1))
    answered = {int(x) for x in re.findall(r"icmp_seq=(\d+) ", out)}
    return sent, [n for n in range(1, sent) if n not in answered], sent not in answered


def run_one(kind: str, size: Size, prefix: str, profile: str | None) -> None:
    tag = "s" if kind == "sqlite" else "k"
    kw: dict[str, Any] = {"datastore": KubeLabDatastore} if kind == "kubernetes" else {}
    lab = Lab(base=f"/run/flowcni-{prefix}-as{tag}", prefix=f"{prefix}as{tag}-", **kw)
    lab.ready_timeout = READY_TIMEOUT
    lab.down()
    backend: Backend = KubeBackend(lab) if kind == "kubernetes" else SqliteBackend(lab)
    ping: subprocess.Popen[str] | None = None
    try:
        lab.up(nodes=1, cluster_cidr=CLUSTER_CIDR)
        node = lab.node("node1")
        backend.put_many("Namespace", namespaces(size))
        for ns, name, labels in local_pods(size):
            lab.pod_add(name, "node1", namespace=ns, labels=labels)
        backend.put_many("Node", [remote_node(j) for j in range(size.nodes)])
        backend.put_many("Pod", remote_pods(size))
        backend.put_many("NetworkPolicy", [policy(j, size) for j in range(size.policies)])
        settled_revision(node)

        # 1. a fresh agent: list everything, one full sync
        old_pid = node.agent_pid
        kill_wait(old_pid)
        rec = Recorder(lab, old_pid, profile, kind) if profile else None
        t0 = time.monotonic()
        node = lab._start_agent(node)
        t_synced = time.monotonic() - t0
        if rec is not None:
            rec.stop()
        st = AgentClient(node.api_socket, timeout=60).status()
        emit({"datastore": kind, "flows": ovs_flows(node), "desired_flows": st["flows"],
              "agent_rss_mb": rss_mb(node.agent_pid),
              "full_sync_s": round(st["flow_stats"].get("last_full_sync_s", -1.0), 3),
              "time_to_synced_s": round(t_synced, 3)})

        # 2. kill -9 under a 10/s ping between two local pods
        a, b = lab.pod(f"{PING_NS}/ping-a"), lab.pod(f"{PING_NS}/ping-b")
        ping = subprocess.Popen(lab.exec_argv(a.ref, ["ping", "-n", "-i", str(PING_INTERVAL),
                                                      b.ip]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t_ping = time.monotonic()
        time.sleep(2.0)
        t0 = time.monotonic()
        node = lab.restart_agent("node1", kill=True)
        restart_s = time.monotonic() - t0
        time.sleep(2.0)
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=10)
        ping = None
        sent, lost, in_flight = ping_losses(out)
        emit({"datastore": kind, "restart_lost_packets": len(lost) if sent else -1,
              "restart_s": round(restart_s, 3), "ping_sent": sent,
              "unanswered_at_stop": int(in_flight),
              # where the losses fall: echo N leaves about (N-1) * interval after the start
              "lost_seqs": lost, "kill_at_seq": int((t0 - t_ping) / PING_INTERVAL) + 1,
              "synced_at_seq": int((t0 + restart_s - t_ping) / PING_INTERVAL) + 1})

        # 3. changes: a policy gains an allowed client / a pod joins a peer set
        rev = settled_revision(node)
        lat = []
        for i in range(size.changes):
            if i % 2 == 0:
                body = policy(0, size, extra=1 + i // 2)
                kind_, bodies = "NetworkPolicy", [body]
            else:
                j = i // 2 % size.nodes
                pod = {"namespace": "ns0", "name": f"new{i}", "node": f"sim{j}",
                       "ip": str(ipaddress.ip_network(remote_node(j)["podCIDR"])
                                 .network_address + 14 - (i // 2 // size.nodes) % 4),
                       "labels": {"app": "a0", "tier": "db"}, "ports": []}
                kind_, bodies = "Pod", [pod]
            t0 = time.monotonic()
            backend.put_many(kind_, bodies)
            lat.append((wait_applied(node, rev + 1) - t0) * 1000)
            rev += 1
        emit({"datastore": kind, "change_p50_ms": round(statistics.median(lat), 1),
              "change_p99_ms": round(pct(lat, 99), 1), "changes": len(lat)})

        # 4. a burst of pod relabels through the watch
        rev = settled_revision(node)
        rss0 = rss_mb(node.agent_pid)
        pods = remote_pods(size)[:size.burst]
        for i, p in enumerate(pods):
            p["labels"] = pod_labels(i, gen=1)
        t0 = time.monotonic()
        backend.put_many("Pod", pods)
        burst_s = wait_applied(node, rev + len(pods), timeout=300, poll=0.01) - t0
        emit({"datastore": kind, "watch_burst_s": round(burst_s, 3),
              "rss_growth_mb": round(rss_mb(node.agent_pid) - rss0, 1), "burst": len(pods)})
    finally:
        if ping is not None:
            ping.kill()
            ping.wait()
        lab.down()
        stop = getattr(lab.datastore, "stop", None)
        if callable(stop):
            stop()


class Recorder:
    """py-spy (from the venv, if installed) sampling the new agent from its start to synced.

    The agent's pid is known only once the lab has spawned it, so a thread
    watches the lab's state for it and attaches; collapsed stacks (one line
    per stack, with its sample count) go to DIR/agent-start-KIND.txt.
    """

    def __init__(self, lab: Lab, old_pid: int, out_dir: str, kind: str) -> None:
        self.exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        self.done = threading.Event()
        os.makedirs(out_dir, exist_ok=True)
        self.out = os.path.join(out_dir, f"agent-start-{kind}.txt")
        if os.path.exists(self.exe):
            threading.Thread(target=self._attach, args=(lab, old_pid), daemon=True).start()

    def _attach(self, lab: Lab, old_pid: int) -> None:
        while not self.done.is_set():
            pid = lab.node("node1").agent_pid
            if pid and pid != old_pid:
                self.proc = subprocess.Popen(
                    [self.exe, "record", "--pid", str(pid), "--rate", "50", "--threads",
                     "--format", "raw", "--output", self.out, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                return
            time.sleep(0.005)

    def stop(self) -> None:
        self.done.set()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- in-process memory profile (no lab) ---------------------------------------------------

class SerializingSwitch:
    """Enough of ofapp.Switch for a full sync: serializes each message as os-ken would send it.

    Holding only the byte count keeps the profile about the agent's own
    objects, as a real connection's bounded send queue does.
    """

    def __init__(self) -> None:
        from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser

        class _Dp:
            ofproto = ofproto_v1_3
            ofproto_parser = ofproto_v1_3_parser
            id = 1

            def set_xid(self, msg: Any) -> None:
                msg.set_xid(1)

        self.dp = _Dp()
        self.ofp, self.parser = ofproto_v1_3, ofproto_v1_3_parser
        self.alive = True
        self.sent_bytes = 0
        self.messages = 0

    def group_desc(self, timeout: float = 30.0) -> list[Any]:
        return []  # a fresh bridge: no groups yet

    def bundle(self, msgs: Any, timeout: float = 30.0) -> None:
        from flowcni.controller import ofwire

        for m in msgs:
            if isinstance(m, bytes):  # a FlowMod FlowSync encoded itself
                self.sent_bytes += len(ofwire.bundle_add(1, 0, 1, m))
            else:
                add = self.parser.ONFBundleAddMsg(self.dp, 1, 0, m, [])
                add.set_xid(1)
                add.serialize()
                self.sent_bytes += len(add.buf)
            self.messages += 1


def memory_profile(size: Size, top: int) -> None:
    """What the agent holds at this size, stage by stage, with tracemalloc's top sites."""
    import tracemalloc

    from flowcni.controller.flowsync import FlowSync
    from flowcni.flows.node import Gateway, node_flows
    from flowcni.flows.policy import PolicyEngine
    from flowcni.flows.tables import DEFAULT as PIPELINE
    from flowcni.flows.tunnel import RemoteNode, remote_node_flows

    tracemalloc.start(1)
    gw = Gateway("10.244.1.1", "02:00:00:00:00:01", 2, "10.244.1.0/24")
    fs = FlowSync(PIPELINE, lambda: 7)
    stages = []

    def stage(name: str, t0: float) -> None:
        cur, peak = tracemalloc.get_traced_memory()
        stages.append({"stage": name, "s": round(time.perf_counter() - t0, 2),
                       "traced_mb": round(cur / 2**20, 1), "peak_mb": round(peak / 2**20, 1)})
        tracemalloc.reset_peak()

    t = time.perf_counter()
    by_owner: dict[str, list[Any]] = {}
    for f in node_flows(gw, PIPELINE):
        by_owner.setdefault(f.owner, []).append(f)
    for j in range(size.nodes):
        b = remote_node(j)
        n = RemoteNode(b["name"], b["nodeIP"], b["podCIDR"])
        by_owner[n.owner] = remote_node_flows(n, gw, 3, PIPELINE)
    fs.set_owners(by_owner)
    stage("nodes", t)
    t = time.perf_counter()
    eng = PolicyEngine("node1", PIPELINE)
    loc = [{"namespace": ns, "name": n, "labels": lb, "node": "node1",
            "ip": f"10.244.1.{i + 2}", "ports": []}
           for i, (ns, n, lb) in enumerate(local_pods(size))]
    owners, problems = eng.load(namespaces(size), remote_pods(size) + loc,
                                [policy(j, size) for j in range(size.policies)])
    assert not problems, problems[:3]
    stage("policy_engine_load", t)
    t = time.perf_counter()
    fs.set_owners(owners)
    del owners
    stage("desired_set", t)
    t = time.perf_counter()
    sw = SerializingSwitch()
    fs.full_sync(sw)  # type: ignore[arg-type]
    stage("full_sync", t)
    snap = tracemalloc.take_snapshot()
    for s in stages:
        emit(s)
    emit({"flows": fs.flow_count(), "owners": len(fs.owners()), "bundle_messages": sw.messages,
          "bundle_mb": round(sw.sent_bytes / 2**20, 1)})
    for st in snap.statistics("lineno")[:top]:
        fr = st.traceback[0]
        where = os.path.relpath(fr.filename, REPO) if REPO in fr.filename else fr.filename
        emit({"site": f"{where}:{fr.lineno}", "mb": round(st.size / 2**20, 2),
              "count": st.count})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 nodes, 500 pods, ~5k flows")
    ap.add_argument("--datastore", choices=["sqlite", "kubernetes", "both"], default="both")
    ap.add_argument("--prefix", default=os.environ.get("FLOWCNI_TEST_PREFIX", "fcb"),
                    help="names of this run's namespaces and /run dirs (default: "
                    "$FLOWCNI_TEST_PREFIX or fcb)")
    ap.add_argument("--py-spy-dir", help="record the agent's start (py-spy, collapsed "
                    "stacks) into this directory")
    ap.add_argument("--memory-profile", action="store_true",
                    help="no lab: build the agent's state in this process and print "
                    "tracemalloc figures per stage and the top allocation sites")
    ap.add_argument("--top", type=int, default=15, help="with --memory-profile: how many "
                    "allocation sites (default: %(default)s)")
    a = ap.parse_args(argv)
    size = QUICK if a.quick else FULL
    if a.memory_profile:
        memory_profile(size, top=a.top)
        return 0
    kinds = ["sqlite", "kubernetes"] if a.datastore == "both" else [a.datastore]
    for k in kinds:
        run_one(k, size, a.prefix, a.py_spy_dir)
    emit({"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
