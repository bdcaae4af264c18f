"""Reachability probing for policy tests: servers in pods, one parallel prober per source.

Every pod runs the same server (TCP 80, TCP 81, UDP 53 echo). A probe is a
fresh connection (TCP connect, or a UDP datagram that must come back), so
each one is a new conntrack entry and reflects the policy in force.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from flowcni.lab import netns
from flowcni.lab.lab import Lab

PROBES = ("80", "81", "53u")
# The packet `flowctl trace` is asked about for each probe: (protocol, port).
PROBE_PACKET = {"80": ("tcp", 80), "81": ("tcp", 81), "53u": ("udp", 53)}
Table = dict[str, dict[str, set[str]]]  # source -> destination -> probes that got through


def expected(spec: dict[str, Any], sources: list[str], dests: list[str]) -> Table:
    """A truth table's expectation: `default` for every cell, then the `cells`
    overrides in order ("SRC -> DST", * for any; "all", "none" or probes "80,53u").
    The external host ("ext") serves only port 80, so "all" is {"80"} there."""
    def cell(v: Any, dst: str) -> set[str]:
        v = str(v)
        if v == "all":
            return {"80"} if dst == "ext" else set(PROBES)
        return set() if v == "none" else {x.strip() for x in v.split(",")}

    out = {s: {d: cell(spec["default"], d) for d in dests if d != s} for s in sources}
    for key, v in (spec.get("cells") or {}).items():
        src, _, dst = (x.strip() for x in key.partition("->"))
        for s in sources if src == "*" else [src]:
            for d in dests if dst == "*" else [dst]:
                if d != s:
                    out[s][d] = cell(v, d)
    return out


def differing(want: Table, got: Table) -> list[str]:
    """The cells where what was probed is not what the table expects, in words."""
    return [f"{s} -> {d}: want {sorted(want[s][d]) or 'none'}, "
            f"got {sorted(got[s].get(d, set())) or 'none'}"
            for s in want for d in want[s] if want[s][d] != got[s].get(d, set())]

SERVER = r"""
import socket, sys, threading
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(100); s.sendto(d, a)
ports = [p for p in sys.argv[1].split(",") if p]
for p in ports:
    f = udp if p.endswith("u") else tcp
    threading.Thread(target=f, args=(int(p.rstrip("u")),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

PROBER = r"""
import json, socket, sys, threading
targets = json.loads(sys.argv[1]); timeout = float(sys.argv[2]); base = int(sys.argv[3])
out = {}
def probe(key, ip, port, sport):
    ok, local = False, ""
    try:
        if port.endswith("u"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
            s.bind(("0.0.0.0", sport))
            s.sendto(b"probe", (ip, int(port[:-1]))); local = s.getsockname()[1]
            ok = s.recvfrom(100)[0] == b"probe"
        else:
            s = socket.socket(); s.settimeout(timeout)
            try:
                s.connect((ip, int(port))); ok = True
            finally:
                local = s.getsockname()[1]
        s.close()
    except OSError as e:
        ok = f"{type(e).__name__} {e} (sport {local})"
    out[key] = ok
ts = [threading.Thread(target=probe, args=(*t, base + i)) for i, t in enumerate(targets)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def start_server(argv_prefix: list[str], ports: Iterable[str] = PROBES) -> subprocess.Popen[str]:
    p = subprocess.Popen([*argv_prefix, sys.executable, "-c", SERVER, ",".join(ports)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def start_pod_server(lab: Lab, ref: str) -> subprocess.Popen[str]:
    return start_server(lab.exec_argv(ref, []))


def start_netns_server(ns: str, ports: Iterable[str]) -> subprocess.Popen[str]:
    return start_server(netns.exec_argv(ns, []), ports)


# UDP probes bind source ports handed out in sequence. A random ephemeral
# port can repeat a recent probe's, and conntrack then rightly treats the
# datagram as part of that earlier, allowed flow (UDP entries live 30 s), so
# a probe after a tightening would pass. Sequential ports never repeat
# within a run (2,500 blocks of 16: a block comes back after ~2,500 probers).
PORT_BLOCK = 16
_UDP_PORTS = itertools.cycle(range(20000, 60000, PORT_BLOCK))


def probe_from(argv_prefix: list[str], targets: list[tuple[str, str, str]],
               timeout: float = 0.8) -> subprocess.Popen[str]:
    """Start probing (key, ip, port) targets in parallel; read the JSON from stdout."""
    if len(targets) > PORT_BLOCK:
        raise ValueError(f"at most {PORT_BLOCK} targets per prober (its UDP port block)")
    return subprocess.Popen([*argv_prefix, sys.executable, "-c", PROBER,
                             json.dumps(targets), str(timeout), str(next(_UDP_PORTS))],
                            stdout=subprocess.PIPE, text=True)


Target = tuple[str, str, str]  # (key "dst|port", ip, port)


def _probe_all(lab: Lab, targets: dict[str, list[Target]],
               timeout: float) -> dict[str, dict[str, bool | str]]:
    """Run one prober per source in parallel; {src: {key: ok}}."""
    procs = {s: probe_from(lab.exec_argv(s, []), t, timeout) for s, t in targets.items() if t}
    return {s: json.loads(p.communicate(timeout=30)[0]) for s, p in procs.items()}


def matrix(lab: Lab, sources: list[str], dests: dict[str, str],
           ext: tuple[str, str] | None = None,
           errors: dict[str, str] | None = None) -> dict[str, dict[str, set[str]]]:
    """{src: {dst: allowed probes}} for pods (dests: name -> IP) and the external host.

    Every probe runs once, and its answer is the cell: nothing is retried. The
    timeout (3 s) covers TCP's first SYN retransmission (1 s), so a SYN lost on
    a loaded two-core machine is not mistaken for a drop; probes run in
    parallel, so expected drops cost the timeout once per matrix.

    `errors`, if given, receives why each failed probe failed, keyed
    "SRC -> DST PROBE": a timeout (dropped) and a refusal (a reset: no
    listener, or a Service without endpoints) are different bugs, and the
    source port finds the probe's connection in a conntrack dump.
    """
    targets: dict[str, list[Target]] = {}
    for s in sources:
        targets[s] = [(f"{d}|{port}", ip, port) for d, ip in dests.items() if d != s
                      for port in PROBES]
        if ext:
            targets[s].append((f"ext|{ext[1]}", ext[0], ext[1]))
    res = _probe_all(lab, targets, 3.0)
    out: dict[str, dict[str, set[str]]] = {}
    for s, r in res.items():
        row: dict[str, set[str]] = {}
        for key, ok in r.items():
            d, port = key.split("|")
            row.setdefault(d, set())
            if ok is True:
                row[d].add(port)
            elif errors is not None:
                errors[f"{s} -> {d} {port}"] = str(ok)
        out[s] = row
    return out
