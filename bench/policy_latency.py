#!/usr/bin/env python3
"""NetworkPolicy realization latency: datastore write to enforcement in the datapath.

What is timed is the interval a user waits after ``flowctl apply -f`` (or
``delete -f``) before the policy holds on the wire: from ``t0``, taken just
before the store write ``cmd_apply`` makes, to the first probe that sees the
new verdict in the datapath. The CLI's own start-up is not part of it (it is
Python import time, not realization), so it is measured separately as
``cli_ms``: the median wall time of running ``flowctl apply -f`` a few times.

Setup: a 2-node geneve lab (``/run/flowcni-bench-fcbp``, names ``fcbp-``) with
``--pods`` pods over a few namespaces with varied labels and ~20 background
policies that select other pods, so the agents' policy engines are not
empty. ``bench/target`` (app=target) on node1 runs a UDP echo server on a
few ports; ``bench/src`` (app=src) on node2 runs the prober.

Each change alternates between applying ``deny-src`` (ingress to app=target
only from app=nobody, so app=src is cut off) and deleting it. The prober is a
long-running Python process inside the source pod. Per change it is told the
state to wait for; it sends one UDP datagram every ``--interval-ms`` from a
fresh socket and reports the send time (CLOCK_MONOTONIC, which network
namespaces share) of the first probe that shows the new state: the first
reply for ``allow``; for ``deny`` the first of three consecutive timeouts, so
one slow reply is not mistaken for the flip. Before the write the prober
must have seen the old state ("armed"), and before each change the old state
must hold for ``STABLE_PROBES`` probes in a row. After the write the bench
tells the prober ``t0``; probes sent before it are ignored, since they cannot
show the change (so a stall before the write is never taken for the flip).
A random sleep of up to two agent poll intervals precedes each write: every
cycle starts right after an agent poll (wait_realized), and without it the
writes would all land at one phase of the poll loop.

Every probe uses a 5-tuple not used before in the run (source port and
destination port are walked, not left to the kernel): the pipeline lets
``-new+trk`` packets through ahead of policy, so a reused tuple could ride a
conntrack entry from the allowed phase and hide the deny.

Where the time goes: between changes (never while timed) the bench reads the
node1 agent's own ``flowcni_policy_realization_seconds`` histogram (datastore
batch read -> OpenFlow bundle committed) from its /metrics; the per-change
delta is ``agent_*_ms``, and ``rest_*_ms`` = latency - agent share = the wait
for the agent's next datastore poll (``agent_poll_ms``) plus the datapath.
``engine_*_ms`` replays the same ``PolicyEngine.apply`` in this process, the
pure computation part of the agent share.

``lab.wait_realized()`` runs only after each measurement (to keep changes
apart), never inside the timed interval. Processes and the lab are removed
in ``finally``; the JSON reports whether ``ip netns list`` is clean of the
lab's prefix afterwards.

The agents' datapath guard (controller/dpcache.py: after each change it
re-translates the cached datapath flows the change can affect) is part of the
realization path, so the whole measurement runs twice, in two fresh labs:
with the guard on and off. The JSON line holds both (``guard_on``,
``guard_off``) and the ratio of their p50s.

    python3 bench/policy_latency.py [--pods 200] [--changes 50] [--guard both|on|off]
        [--prefix fcbp]     # lab /run/flowcni-bench-PREFIX, netns PREFIX-*; one JSON line
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import yaml
from flowcni.ctl.client import AgentClient
from flowcni.datastore.manifests import load
from flowcni.datastore.store import Change, Store
from flowcni.flows.policy import PolicyEngine
from flowcni.flows.tables import DEFAULT as PIPELINE
from flowcni.lab import netns
from flowcni.lab.lab import Lab

BENCH_NS = "bench"
TARGET = f"{BENCH_NS}/target"
SOURCE = f"{BENCH_NS}/src"
NAMESPACES = 4
APPS = 10
BG_POLICIES = 20
ECHO_PORTS = [5000 + i for i in range(8)]
STABLE_PROBES = 20
METRICS_ADDRESS = "127.0.0.1:9153"  # the agent's default --metrics-address, in its netns

DENY_POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "deny-src", "namespace": BENCH_NS},
    "spec": {"podSelector": {"matchLabels": {"app": "target"}},
             "policyTypes": ["Ingress"],
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}]},
}

# Multi-port UDP echo: one thread, so the server adds no scheduling of its own.
SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for p in sys.argv[1].split(","):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(p))); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            while True:
                d, a = s.recvfrom(64)
                s.sendto(d, a)
        except (BlockingIOError, InterruptedError):
            pass
"""

# The prober. Probes are pipelined (one sent every `interval`, each waits up to
# `timeout` on its own socket) so that a long timeout does not coarsen the time
# resolution. Commands on stdin, one JSON reply line each on stdout:
#   check STATE N  -> N consecutive probes (in send order) show STATE
#   await STATE    -> prints "armed" once a probe showed the other state; then,
#                     given "t0 T" (the write's time), the send time of the first
#                     probe sent after T that shows the new state
# STATE is "allow" or "deny".
PROBER = r"""
import collections, json, selectors, socket, sys, time
ip = sys.argv[1]
dports = [int(p) for p in sys.argv[2].split(",")]
interval, timeout, deadline_s = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
SPORT_LO, SPORT_SPAN = 10000, 50000
mono = time.monotonic
sel = selectors.DefaultSelector()
nxt = 0  # global probe counter: every probe gets a 5-tuple of its own

def new_socket():
    global nxt
    while True:
        i = nxt; nxt += 1
        sport = SPORT_LO + (i // len(dports)) % SPORT_SPAN
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("0.0.0.0", sport))
        except OSError:
            s.close(); continue
        s.setblocking(False)
        return s, dports[i % len(dports)]

def session(decide, on_stdin=None):
    # Probe until decide(results, resolved_prefix, sent) returns a dict.
    results, sent = [], []
    pending = collections.OrderedDict()  # idx -> socket, in send (= expiry) order
    t_end = mono() + deadline_s
    next_send = mono()
    prefix = 0
    try:
        while True:
            now = mono()
            if now >= next_send:
                s, dport = new_socket()
                idx = len(results)
                results.append(None)
                t = mono()
                sent.append(t)
                try:
                    s.sendto(b"%d" % idx, (ip, dport))
                    pending[idx] = s
                    sel.register(s, selectors.EVENT_READ, idx)
                except OSError:
                    s.close(); results[idx] = False
                next_send += interval
                if next_send < t:  # fell behind (CPU): do not burst to catch up
                    next_send = t + interval
            now = mono()
            while pending:
                idx, s = next(iter(pending.items()))
                if sent[idx] + timeout > now:
                    break
                del pending[idx]; sel.unregister(s); s.close(); results[idx] = False
            wake = next_send
            if pending:
                wake = min(wake, sent[next(iter(pending))] + timeout)
            for key, _ in sel.select(max(0.0, wake - mono())):
                if key.data == "stdin":
                    on_stdin()
                    continue
                idx, s = key.data, key.fileobj
                try:
                    ok = s.recv(64) == b"%d" % idx
                except OSError:
                    ok = False
                del pending[idx]; sel.unregister(s); s.close(); results[idx] = ok
            while prefix < len(results) and results[prefix] is not None:
                prefix += 1
            verdict = decide(results, prefix, sent)
            if verdict is not None:
                verdict["probes"] = len(results)
                return verdict
            if mono() > t_end:
                return {"error": "no verdict before the deadline", "probes": len(results),
                        "resolved": prefix, "allowed": sum(1 for r in results if r)}
    finally:
        for s in pending.values():
            sel.unregister(s); s.close()

def check(want, n):
    st = {"k": 0, "run": 0, "bad": 0}  # scanned up to k: the scans stay incremental
    def decide(results, prefix, sent):
        while st["k"] < prefix:
            ok = results[st["k"]] == want
            st["run"] = st["run"] + 1 if ok else 0
            st["bad"] += not ok
            st["k"] += 1
            if st["run"] >= n:
                return {"ok": True, "mismatches": st["bad"]}
        return None
    return session(decide)

def await_flip(want):
    # Probes sent before the bench's t0 (it arrives on stdin just after the write)
    # cannot show the change, so the search starts at the first probe sent after it.
    need = 1 if want else 3  # deny: three timeouts in a row, report the first
    st = {"armed": False, "early": 0, "t0": None, "k": None}
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    def decide(results, prefix, sent):
        if not st["armed"]:
            while st["early"] < prefix:
                if results[st["early"]] != want:
                    st["armed"] = True
                    print("armed", flush=True)
                    break
                st["early"] += 1
            else:
                if prefix >= 50:
                    return {"error": "already in the new state before the change"}
                return None
        if st["t0"] is None:
            return None
        if st["k"] is None:
            st["k"] = next((i for i, t in enumerate(sent) if t >= st["t0"]), None)
            if st["k"] is None:
                return None
        while st["k"] + need <= prefix:
            k = st["k"]
            if all(results[j] == want for j in range(k, k + need)):
                return {"t_flip": sent[k], "gap": sent[k] - sent[k - 1] if k else 0.0,
                        "index": k, "t_decided": mono()}
            st["k"] += 1
        return None
    def on_stdin():
        st["t0"] = float(sys.stdin.readline().split()[1])
    try:
        return session(decide, on_stdin)
    finally:
        sel.unregister(sys.stdin)

print("ready", flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    cmd = line.split()
    if not cmd:
        continue
    want = cmd[1] == "allow"
    out = check(want, int(cmd[2])) if cmd[0] == "check" else await_flip(want)
    print(json.dumps(out), flush=True)
"""


# Reads the agent's own realization histogram (datastore change read -> flows committed)
# from its /metrics, inside the node's netns; one JSON {sum, count} line per stdin line.
SCRAPER = r"""
import json, sys, urllib.request
url = sys.argv[1]; name = "flowcni_policy_realization_seconds"
print("ready", flush=True)
for _ in sys.stdin:
    out = {}
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in text.splitlines():
            for k in ("sum", "count"):
                if line.startswith(f"{name}_{k} "):
                    out[k] = float(line.split()[1])
    except OSError as e:
        out["error"] = str(e)
    print(json.dumps(out), flush=True)
"""


class BenchError(RuntimeError):
    pass


class LineReader:
    """Lines of a child's stdout through a queue, so every read can time out."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        assert proc.stdout is not None
        self.proc, self.what = proc, what
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, f: Any) -> None:
        for line in f:
            self.q.put(line.strip())
        self.q.put("")

    def readline(self, timeout: float) -> str:
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{self.what}: no output within {timeout}s") from None
        if not line:
            raise BenchError(f"{self.what} exited ({self.proc.poll()})")
        return line


class Helper:
    """A long-running helper process driven by lines over stdin/stdout; says "ready" first."""

    def __init__(self, argv: list[str], what: str) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.out = LineReader(self.proc, what)
        if self.out.readline(30) != "ready":
            raise BenchError(f"{what} did not start")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


class Prober(Helper):
    """The long-running prober in the source pod."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv, "prober")

    def reply(self, timeout: float) -> dict[str, Any]:
        r: dict[str, Any] = json.loads(self.out.readline(timeout))
        return r

    def check(self, state: str, n: int, timeout: float) -> dict[str, Any]:
        self.send(f"check {state} {n}")
        return self.reply(timeout)


class AgentMetrics(Helper):
    """The node agent's realization histogram, read between changes (never while timed).

    Its per-change delta is the agent's share (processing + OpenFlow bundle),
    so the rest of each latency is the datastore poll wait and the datapath.
    Optional: if the agent has no such metric, the bench reports None.
    """

    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv, "metrics scraper")

    def read(self) -> tuple[float, float] | None:
        """(seconds, observations) so far, or None when unavailable."""
        try:
            self.send("")
            r = json.loads(self.out.readline(10))
        except (OSError, BenchError, ValueError):
            return None
        if "sum" not in r or "count" not in r:
            return None
        return float(r["sum"]), float(r["count"])


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def background(n_pods: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                 list[dict[str, Any]]]:
    """Namespaces, pods (name, ns, node, labels, ports) and ~20 policies around the pair.

    Selectors use app labels a0..a9, tiers and team labels only, so none of them
    selects the target or the source: the measured change is the only thing that
    decides their reachability.
    """
    rnd = random.Random(seed)
    nss = [{"name": f"ns{i}", "labels": {"team": f"t{i}"}} for i in range(NAMESPACES)]
    nss.append({"name": BENCH_NS, "labels": {"team": "bench"}})
    pods = [{"name": f"p{i}", "namespace": f"ns{i % NAMESPACES}",
             "node": "node1" if i % 2 else "node2",
             "labels": {"app": f"a{rnd.randrange(APPS)}",
                        "tier": rnd.choice(["web", "db", "cache"])},
             "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}
            for i in range(n_pods)]
    pols = []
    for j in range(BG_POLICIES):
        kind = rnd.random()
        if kind < 0.5:
            peer: dict[str, Any] = {"podSelector": {"matchLabels": {
                "app": f"a{rnd.randrange(APPS)}"}}}
        elif kind < 0.85:
            peer = {"namespaceSelector": {"matchLabels": {"team": f"t{rnd.randrange(NAMESPACES)}"}},
                    "podSelector": {"matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["web", "db"]}]}}
        else:
            peer = {"ipBlock": {"cidr": "172.16.0.0/16", "except": ["172.16.1.0/24"]}}
        ports = [{"port": p} for p in rnd.sample([80, 443, 8080, "http"], rnd.randint(1, 3))]
        spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": f"a{j % APPS}"}},
                                "ingress": [{"from": [peer], "ports": ports}]}
        if rnd.random() < 0.3:
            spec["egress"] = [{"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}],
                               "ports": [{"port": 5432}]}]
            spec["policyTypes"] = ["Ingress", "Egress"]
        pols.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": f"bg{j}", "namespace": f"ns{j % NAMESPACES}"},
                     "spec": spec})
    return nss, pods, pols


def build(lab: Lab, n_pods: int, seed: int) -> list[dict[str, Any]]:
    """Namespaces, the pair, background pods and policies; returns the policies."""
    store = lab.store()
    nss, pods, pols = background(max(0, n_pods - 2), seed)
    for ns in nss:
        store.put("Namespace", "", ns["name"], ns)
    lab.pod_add("target", "node1", BENCH_NS, {"app": "target"},
                [{"name": "echo", "containerPort": ECHO_PORTS[0], "protocol": "UDP"}])
    lab.pod_add("src", "node2", BENCH_NS, {"app": "src"}, [])
    t = time.monotonic()
    for i, p in enumerate(pods, 1):
        lab.pod_add(p["name"], p["node"], p["namespace"], p["labels"], p["ports"])
        if i % 25 == 0:
            log(f"{i + 2}/{n_pods} pods ({time.monotonic() - t:.0f}s)")
    for kind, ns, name, body in load(yaml.safe_dump_all(pols)):
        store.put(kind, ns, name, body)
    lab.wait_realized(timeout=120)
    return pols


def agent_poll_s() -> float:
    """How often the agent polls the SQLite store (Store.watch's default, which it uses)."""
    interval: float = inspect.signature(Store.watch).parameters["interval"].default
    return interval


def log(msg: str) -> None:
    print(f"policy_latency: {msg}", file=sys.stderr, flush=True)


def measure(lab: Lab, prober: Prober, changes: int, warmup: int, deadline: float,
            agent: AgentMetrics | None, seed: int) -> tuple[list[float], list[dict[str, Any]]]:
    """Alternate deny/allow changes; latency (ms) of each after the warm-up ones."""
    rnd = random.Random(seed)
    poll_s = agent_poll_s()
    store = lab.store()
    # Parsed once, outside the timed interval: parsing is the CLI's work, not realization.
    put_objs = load(yaml.safe_dump(DENY_POLICY))
    del_objs = load(yaml.safe_dump(DENY_POLICY), identity_only=True)
    lat: list[float] = []
    samples: list[dict[str, Any]] = []
    t_start = time.monotonic()
    before = agent.read() if agent else None
    for i in range(warmup + changes):
        deny = i % 2 == 0
        old, new = ("allow", "deny") if deny else ("deny", "allow")
        chk = prober.check(old, STABLE_PROBES, deadline + 5)
        if not chk.get("ok"):
            raise BenchError(f"change {i}: state {old!r} not stable before the change: {chk}")
        prober.send(f"await {new}")
        line = prober.out.readline(deadline + 5)
        if line != "armed":
            raise BenchError(f"change {i}: prober not armed: {line}")
        # Each cycle starts right after wait_realized, i.e. just after an agent poll, so
        # without this the write would land at the same phase of the poll loop every
        # time and sample one poll wait instead of all of them.
        time.sleep(rnd.uniform(0, 2 * poll_s))
        t0 = time.monotonic()
        if deny:
            for kind, ns, name, body in put_objs:
                store.put(kind, ns, name, body)
        else:
            for kind, ns, name, _ in del_objs:
                store.delete(kind, ns, name)
        t_written = time.monotonic()
        prober.send(f"t0 {t0!r}")
        r = prober.reply(deadline + 5)
        if "t_flip" not in r:
            raise BenchError(f"change {i} ({new}): {r}")
        ms = (r["t_flip"] - t0) * 1000
        lab.wait_realized(timeout=30)  # after the measurement: keeps changes apart
        sample = {"i": i, "to": new, "ms": round(ms, 2), "gap_ms": round(r["gap"] * 1000, 2),
                  "stable_mismatches": chk.get("mismatches", 0),
                  "write_ms": round((t_written - t0) * 1000, 2), "probes": r["probes"]}
        after = agent.read() if agent else None
        if before and after and after[1] - before[1] == 1:  # exactly this change
            sample["agent_ms"] = round((after[0] - before[0]) * 1000, 2)
        before = after
        if i >= warmup:
            if ms < 0:  # a flip seen before the write cannot be this change's
                raise BenchError(f"change {i}: flip observed {ms:.1f} ms before the write")
            lat.append(ms)
            samples.append(sample)
        log(f"change {i}{' (warm-up)' if i < warmup else ''}: -> {new} {ms:.1f} ms "
            f"(agent {sample.get('agent_ms', '?')} ms, at {time.monotonic() - t_start:.2f}s)")
    return lat, samples


def cli_times(lab: Lab, policy: dict[str, Any], runs: int) -> list[float]:
    """Wall time of `flowctl apply -f` as a subprocess (re-applies a background policy)."""
    exe = shutil.which("flowctl")
    argv = [exe] if exe else [sys.executable, "-m", "flowcni.ctl.flowctl"]
    env = dict(os.environ, FLOWCNI_LAB_DIR=lab.base, FLOWCNI_LAB_PREFIX=lab.prefix)
    out = []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(policy, f)
        f.flush()
        for _ in range(runs):
            t = time.perf_counter()
            p = subprocess.run([*argv, "apply", "-f", f.name], env=env, capture_output=True,
                               text=True, timeout=60)
            out.append((time.perf_counter() - t) * 1000)
            if p.returncode != 0:
                raise BenchError(f"flowctl apply failed ({p.returncode}): {p.stderr.strip()}")
            lab.wait_realized(timeout=30)
    return out


def engine_ms(lab: Lab, node: str, reps: int = 20) -> dict[str, float]:
    """The policy engine's share of one change, replayed in this process.

    The agent runs the same `PolicyEngine.apply` on the batch it polls; timing
    it here, on the lab's own objects, separates computation from polling and
    the OpenFlow bundle without instrumenting the agent.
    """
    store: Store = lab.store()
    eng = PolicyEngine(node, PIPELINE)
    eng.load(store.objects("Namespace"), store.objects("Pod"), store.objects("NetworkPolicy"))
    (kind, ns, name, body), = load(yaml.safe_dump(DENY_POLICY))
    put_t, del_t, flows = [], [], 0
    for _ in range(reps):
        t = time.perf_counter()
        owners, _ = eng.apply([Change(0, "put", kind, ns, name, body)])
        put_t.append(time.perf_counter() - t)
        flows = sum(len(v) for v in owners.values())
        t = time.perf_counter()
        eng.apply([Change(0, "delete", kind, ns, name, None)])
        del_t.append(time.perf_counter() - t)
    return {"engine_put_ms": round(statistics.median(put_t) * 1000, 3),
            "engine_delete_ms": round(statistics.median(del_t) * 1000, 3),
            "engine_flows_rewritten": flows}


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pods", type=int, default=200, help="pods in the lab (>= 2)")
    ap.add_argument("--changes", type=int, default=50, help="measured policy changes")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured changes first")
    ap.add_argument("--interval-ms", type=float, default=1.0, help="probe spacing")
    ap.add_argument("--timeout-ms", type=float, default=100.0,
                    help="a probe without a reply by then counts as dropped")
    ap.add_argument("--cli-runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--guard", choices=["both", "on", "off"], default="both",
                    help="run with the agents' datapath guard on, off, or both (two labs)")
    ap.add_argument("--prefix", default=os.environ.get("FLOWCNI_BENCH_PREFIX", "fcbp"),
                    help="lab name prefix (netns PREFIX-*, /run/flowcni-bench-PREFIX), so "
                    "runs beside other labs on one machine do not collide")
    a = ap.parse_args(argv)
    if a.pods < 2 or a.changes < 1:
        ap.error("need --pods >= 2 and --changes >= 1")
    if os.geteuid() != 0:
        print("policy_latency: needs root (network namespaces, OVS)", file=sys.stderr)
        return 1

    out: dict[str, Any] = {"pods": a.pods, "changes": a.changes}
    for guard in (["on", "off"] if a.guard == "both" else [a.guard]):
        os.environ["FLOWCNI_DATAPATH_GUARD"] = guard  # the lab's agents inherit it
        out[f"guard_{guard}"] = run_lab(a, f"/run/flowcni-bench-{a.prefix}", f"{a.prefix}-")
    on, off = out.get("guard_on", {}), out.get("guard_off", {})
    if on.get("p50_ms") and off.get("p50_ms"):
        out["p50_guard_on_over_off"] = round(on["p50_ms"] / off["p50_ms"], 2)
        out["p99_guard_on_over_off"] = round(on["p99_ms"] / off["p99_ms"], 2)
    print(json.dumps(out))
    return 0


def run_lab(a: argparse.Namespace, base: str, prefix: str) -> dict[str, Any]:
    """One lab, one measured series; the result dict (the lab is removed either way)."""
    lab = Lab(base=base, prefix=prefix)
    lab.down()
    server: subprocess.Popen[str] | None = None
    prober: Prober | None = None
    agent: AgentMetrics | None = None
    result: dict[str, Any] = {"pods": a.pods, "changes": a.changes}
    try:
        t = time.monotonic()
        lab.up(nodes=2, encap="geneve")
        pols = build(lab, a.pods, a.seed)
        result["setup_s"] = round(time.monotonic() - t, 1)
        server = subprocess.Popen(
            lab.exec_argv(TARGET, [sys.executable, "-c", SERVER,
                                   ",".join(map(str, ECHO_PORTS))]),
            stdout=subprocess.PIPE, text=True)
        if LineReader(server, "echo server").readline(30) != "ready":
            raise BenchError("echo server did not start")
        deadline = 10.0
        prober = Prober(lab.exec_argv(SOURCE, [
            sys.executable, "-c", PROBER, lab.pod(TARGET).ip, ",".join(map(str, ECHO_PORTS)),
            str(a.interval_ms / 1000), str(a.timeout_ms / 1000), str(deadline)]))
        if not prober.check("allow", STABLE_PROBES, deadline + 5).get("ok"):
            raise BenchError("source cannot reach the target before any change")

        node1 = lab.node("node1")
        agent = AgentMetrics(netns.exec_argv(node1.netns, [
            sys.executable, "-c", SCRAPER, f"http://{METRICS_ADDRESS}/metrics"]))
        lat, samples = measure(lab, prober, a.changes, a.warmup, deadline, agent,
                               a.seed)
        xs = sorted(lat)
        gaps = sorted(s["gap_ms"] for s in samples)
        result.update({
            "p50_ms": round(percentile(xs, 50), 1), "p99_ms": round(percentile(xs, 99), 1),
            "max_ms": round(xs[-1], 1), "min_ms": round(xs[0], 1),
            "mean_ms": round(statistics.fmean(xs), 1),
            "deny_p50_ms": round(statistics.median(
                [s["ms"] for s in samples if s["to"] == "deny"] or [0.0]), 1),
            "allow_p50_ms": round(statistics.median(
                [s["ms"] for s in samples if s["to"] == "allow"] or [0.0]), 1),
            "write_p50_ms": round(statistics.median(s["write_ms"] for s in samples), 2),
            "probe_gap_p50_ms": round(percentile(gaps, 50), 2),
            "probe_gap_max_ms": round(gaps[-1], 2),
            # probes that disagreed with a settled state: loss/stalls from other load
            "stable_mismatches": sum(s["stable_mismatches"] for s in samples),
            "agent_poll_ms": round(agent_poll_s() * 1000, 1),
        })
        agent_ms = sorted(s["agent_ms"] for s in samples if "agent_ms" in s)
        if agent_ms:
            # the agent's share (poll read -> bundle committed) and what is left over
            rest = sorted(s["ms"] - s["agent_ms"] for s in samples if "agent_ms" in s)
            result.update({
                "agent_p50_ms": round(percentile(agent_ms, 50), 1),
                "agent_p99_ms": round(percentile(agent_ms, 99), 1),
                "agent_max_ms": round(agent_ms[-1], 1),
                "rest_p50_ms": round(percentile(rest, 50), 1),
                "rest_p99_ms": round(percentile(rest, 99), 1)})
        result.update(engine_ms(lab, "node1"))
        result["node1_flows"] = AgentClient(node1.api_socket).status().get("flows")
        try:
            cli = cli_times(lab, pols[0], a.cli_runs)
            result["cli_ms"] = round(statistics.median(cli), 1)
        except (BenchError, OSError, subprocess.TimeoutExpired) as e:
            result["cli_ms"] = None
            result["cli_error"] = str(e)[:200]
        result["samples_ms"] = [s["ms"] for s in samples]
        if agent_ms:
            result["samples_agent_ms"] = [s.get("agent_ms") for s in samples]
    finally:
        for helper in (prober, agent):
            if helper is not None:
                stop(helper.proc)
        stop(server)
        lab.down()
        left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout.split()
                if n.startswith(prefix)]
        if left:
            log(f"namespaces left behind: {left}")
    result["netns_clean"] = not left
    result["guard"] = os.environ.get("FLOWCNI_DATAPATH_GUARD", "on")
    return result


if __name__ == "__main__":
    sys.exit(main())
