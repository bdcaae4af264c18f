"""Guards the datapath flow cache: every cached flow must do what the tables say now.

Open vSwitch forwards from a cache of datapath flows ("megaflows") that its
revalidator threads keep in step with the OpenFlow tables, asynchronously.
The agent's flow diff only reaches the tables; if a cached flow outlives the
change it was translated under, traffic follows the old policy while every
OpenFlow-level check (dump-flows, drift, ofproto/trace of a packet) says the
new one. This module closes that gap: it dumps the datapath flows a change can
affect, re-translates each one's key against the tables installed now
(`ofproto/trace` of the datapath key: the same translation an upcall makes),
and deletes the flows whose cached actions disagree. A deleted flow costs one
upcall; the next packet gets a fresh translation.

Talking to ovs-vswitchd: its unixctl socket speaks JSON-RPC, so one
connection carries the dump, every trace and every delete, with no
`ovs-appctl` process per flow (that would cost ~5 ms each). The parsing is in
pure functions so it is unit-tested on captured text.

A disagreement right after a change can be plain revalidation lag (the
revalidator has not run its round yet): the guard then waits for one
completed revalidation round and re-checks; only a flow that still disagrees
is stale: it is deleted, counted and logged (issue 14).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)


class UnixctlError(RuntimeError):
    """ovs-vswitchd is unreachable or refused a command."""


# -- pure parsing --------------------------------------------------------------------


@dataclass(frozen=True)
class DpFlow:
    """One datapath flow from `dpctl/dump-flows -m --no-names`."""

    ufid: str      # "ufid:<uuid>": how the flow is deleted without its mask
    key: str       # full key with values and masks: what ofproto/trace takes
    actions: str   # datapath actions as cached

    @property
    def post_conntrack(self) -> bool:
        """Whether the flow runs after a ct() recirculation (ct_state tracked).

        Only those flows pass the policy tables: the first pass of a packet
        ends at ct(...),recirc and never meets a rule.
        """
        m = _CT_STATE.search(self.key)
        if not m:
            return False
        value, mask = int(m.group(1), 16), int(m.group(2) or "0xffffffff", 16)
        return bool(value & mask & 0x20)  # +trk

    @property
    def new_connections(self) -> bool:
        """Whether the flow can carry the first packet of a connection (ct_state +new,
        or the new bit wildcarded). Only those meet NetworkPolicy: the pipeline sends
        established and related packets past the rules."""
        m = _CT_STATE.search(self.key)
        if not m:
            return True
        value, mask = int(m.group(1), 16), int(m.group(2) or "0xffffffff", 16)
        return not mask & 0x01 or bool(value & 0x01)

    def addresses(self) -> tuple[str | None, str | None]:
        """(ipv4 src, dst) the flow is restricted to, as networks; None: any."""
        m = _IPV4.search(self.key)
        if not m:
            return None, None
        out: list[str | None] = []
        for f in ("src", "dst"):
            fm = re.search(rf"(?:^|,){f}=([0-9.]+)(?:/([0-9.]+))?", m.group(1))
            if fm is None or fm.group(2) == "0.0.0.0":
                out.append(None)
            else:
                out.append(str(ipaddress.ip_network(
                    f"{fm.group(1)}/{fm.group(2) or '32'}", strict=False)))
        return out[0], out[1]


_CT_STATE = re.compile(r"ct_state\((0x[0-9a-f]+)(?:/(0x[0-9a-f]+))?\)")
_IPV4 = re.compile(r"(?:^|[,)])ipv4\(([^)]*)\)")
_UFID = re.compile(r"^(ufid:[0-9a-f-]+),\s*")
_STATS = re.compile(r", packets:\d+, bytes:\d+, used:[^,]+(?:, flags:[^,]*)?(?:, dp:[^,]+)?"
                    r", actions:")


def parse_dump(text: str) -> list[DpFlow]:
    """Datapath flows of a `dpctl/dump-flows -m --no-names` dump (other lines skipped)."""
    out = []
    for line in text.splitlines():
        m = _UFID.match(line)
        if not m:
            continue
        rest = line[m.end():]
        s = _STATS.search(rest)
        if not s:
            continue
        actions = rest[s.end():]
        extra = actions.find(", dp-extra-info:")
        if extra >= 0:
            actions = actions[:extra]
        out.append(DpFlow(m.group(1), rest[:s.start()], actions.strip()))
    return out


def traced_actions(trace: str) -> str | None:
    """The datapath actions `ofproto/trace` gives the traced key itself, or None.

    That is the first such line: a trace that recirculates (ct) goes on to
    translate the resumed packet and prints its actions after.
    """
    for line in trace.splitlines():
        if line.startswith("Datapath actions:"):
            return line.split(":", 1)[1].strip()
    return None


def same_actions(cached: str, traced: str) -> bool:
    """Whether two datapath action lists are the same (spacing aside)."""
    return cached.replace(" ", "") == traced.replace(" ", "")


def needs_slow_path(trace: str) -> bool:
    """Whether the translation goes to userspace: then the cache holds a slow-path action
    that no trace prints, and the flow is not comparable (never a policy verdict)."""
    return "handled by the userspace slow path" in trace or "slow_path(" in trace


def in_scope(flow: DpFlow, ips: frozenset[str] | None, post_ct_only: bool = True,
             new_only: bool = False) -> bool:
    """Whether a change touching `ips` (None: any address) can have changed this flow.

    `new_only`: only flows of new connections (what a policy change can affect).
    """
    if post_ct_only and not flow.post_conntrack:
        return False
    if new_only and not flow.new_connections:
        return False
    if ips is None:
        return True
    for net in flow.addresses():
        if net is None:
            return True  # an address wildcard covers any changed address
        n = ipaddress.ip_network(net)
        if any(ipaddress.ip_address(ip) in n for ip in ips):
            return True
    return False


def flow_addresses(flows: Iterable[Any]) -> frozenset[str] | None:
    """IPv4 addresses the given (changed) flows match on: the datapath flows to check.

    None (check every flow behind conntrack) if some flow matches no single
    address (a port clause, a CIDR). A conjunction-id flow is skipped: it acts
    only with its clause flows, and those changed with it.
    """
    out: set[str] = set()
    for f in flows:
        match = dict(f.match)
        if "conj_id" in match:
            continue
        hit = False
        for field in ("ipv4_src", "ipv4_dst"):
            v = match.get(field)
            if isinstance(v, str) and "/" not in v:
                out.add(v)
                hit = True
        if not hit:
            return None
    return frozenset(out)


# -- ovs-vswitchd's control socket ------------------------------------------------------


def vswitchd_target(ovsdb_remote: str) -> str:
    """The unixctl socket of the ovs-vswitchd that serves `ovsdb_remote`'s directory.

    ovs-vswitchd keeps its control socket next to the database socket (its
    OVS_RUNDIR): `ovs-vswitchd.<pid>.ctl`, or `ovs-vswitchd.ctl` where it was
    started with --unixctl as the lab does.
    """
    rundir = "/var/run/openvswitch"
    if ovsdb_remote.startswith("unix:"):
        rundir = os.path.dirname(ovsdb_remote[5:]) or rundir
    plain = os.path.join(rundir, "ovs-vswitchd.ctl")
    if os.path.exists(plain):
        return plain
    try:
        with open(os.path.join(rundir, "ovs-vswitchd.pid")) as f:
            return os.path.join(rundir, f"ovs-vswitchd.{int(f.read().strip())}.ctl")
    except (OSError, ValueError):
        return plain


class Unixctl:
    """A JSON-RPC client of one OVS daemon's unixctl socket (one connection, reused)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout
        self._sock: socket.socket | None = None
        self._buf = ""
        self._id = 0
        self._lock = threading.Lock()

    def call(self, method: str, *params: str) -> str:
        with self._lock:
            try:
                return self._call(method, list(params))
            except (OSError, ValueError) as e:
                self.close()
                raise UnixctlError(f"{method} on {self.path}: {e}") from e

    def call_many(self, method: str, params: list[list[str]],
                  chunk: int = 1) -> list[str | UnixctlError]:
        """The same command for each parameter list, `chunk` requests in flight at a
        time; a refused command gives its UnixctlError in place of the result.

        Pipelining (chunk > 1) gained nothing against OVS 3.1 (220 traces: 22 ms
        pipelined by 32, 15 ms one by one, idle vswitchd), hence the default.
        """
        out: list[str | UnixctlError] = []
        with self._lock:
            try:
                for i in range(0, len(params), chunk):
                    ids = [self._send(method, p) for p in params[i:i + chunk]]
                    for rid in ids:
                        try:
                            out.append(self._reply(method, rid))
                        except UnixctlError as e:
                            out.append(e)
            except (OSError, ValueError) as e:
                self.close()
                raise UnixctlError(f"{method} on {self.path}: {e}") from e
        return out

    def _send(self, method: str, params: list[str]) -> int:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            s.connect(self.path)
            self._sock, self._buf = s, ""
        self._id += 1
        self._sock.sendall(json.dumps({"method": method, "params": params,
                                       "id": self._id}).encode())
        return self._id

    def _call(self, method: str, params: list[str]) -> str:
        return self._reply(method, self._send(method, params))

    def _reply(self, method: str, rid: int) -> str:
        """Read until the reply to request `rid` (replies come back in order)."""
        assert self._sock is not None
        dec = json.JSONDecoder()
        while True:
            stripped = self._buf.lstrip()
            if stripped:
                try:
                    msg, end = dec.raw_decode(stripped)
                except ValueError:
                    msg = None
                if msg is not None:
                    self._buf = stripped[end:]
                    if msg.get("id") != rid:
                        continue
                    if msg.get("error") is not None:
                        raise UnixctlError(f"{method}: {str(msg['error']).strip()}")
                    return str(msg.get("result") or "")
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise OSError("connection closed")
            self._buf += chunk.decode()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the guard ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stale:
    """A cached datapath flow whose actions the installed tables no longer give."""

    flow: DpFlow
    now: str  # what the tables say for its key

    def describe(self) -> str:
        return f"{self.flow.key} cached actions:{self.flow.actions} tables say:{self.now}"


@dataclass
class CheckResult:
    checked: int = 0          # flows re-translated
    lagging: int = 0          # disagreed, then fixed by the revalidator's own round
    stale: list[Stale] | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.stale is None:
            self.stale = []


class DatapathGuard:
    """Checks cached datapath flows against the installed tables; removes the wrong ones.

    `check(ips)` is the hook a feature calls after its change reached OVS
    (policy now; Services and tenants can pass the addresses they touched, or
    None for every flow behind conntrack, or post_ct_only=False for all).
    """

    def __init__(self, ctl: Unixctl, datapath: str | None = None) -> None:
        self.ctl = ctl
        self._dp = datapath
        self._lock = threading.Lock()

    def datapath(self) -> str:
        """The datapath name ofproto/trace takes ("ovs-netdev", "ovs-system")."""
        if self._dp is None:
            dps = self.ctl.call("dpctl/dump-dps").split()
            if not dps:
                raise UnixctlError("ovs-vswitchd has no datapath")
            self._dp = dps[0].split("@", 1)[-1]
        return self._dp

    def _disagreeing(self, flows: Iterable[DpFlow]) -> tuple[int, list[Stale]]:
        dp = self.datapath()
        flows = list(flows)
        n, out = 0, []
        traces = self.ctl.call_many("ofproto/trace", [[dp, f.key] for f in flows])
        for f, trace in zip(flows, traces, strict=True):
            if isinstance(trace, UnixctlError):
                LOG.debug("cannot retranslate %s: %s", f.key, trace)
                continue
            n += 1
            now = traced_actions(trace)
            if now is None or needs_slow_path(trace) or "userspace(" in f.actions:
                continue
            if not same_actions(f.actions, now):
                out.append(Stale(f, now))
        return n, out

    def dump(self) -> list[DpFlow]:
        return parse_dump(self.ctl.call("dpctl/dump-flows", "-m", "--no-names"))

    def check(self, ips: frozenset[str] | None = None, post_ct_only: bool = True,
              repair: bool = True, new_only: bool = False) -> CheckResult:
        """Re-translate the cached flows in scope; delete (repair) those that disagree.

        Returns what was checked, and the flows still wrong after a completed
        revalidation round (the stale ones, also deleted when `repair`).
        """
        t = time.perf_counter()
        res = CheckResult()
        with self._lock:
            scope = [f for f in self.dump() if in_scope(f, ips, post_ct_only, new_only)]
            res.checked, first = self._disagreeing(scope)
            if first:
                # Give the revalidator its round: what it fixes was lag, not staleness.
                # Then check the whole scope again, not only these flows: the round
                # itself can leave a flow wrong (OVS 3.1 modifies a megaflow found by
                # a lookup of the key, which may be another, overlapping one).
                self.ctl.call("revalidator/wait")
                scope = [f for f in self.dump() if in_scope(f, ips, post_ct_only, new_only)]
                n, stale = self._disagreeing(scope)
                res.checked += n
                res.lagging = len({s.flow.ufid for s in first}
                                  - {s.flow.ufid for s in stale})
                res.stale = stale
                if repair:
                    for s in stale:
                        self.delete(s.flow)
        res.seconds = time.perf_counter() - t
        return res

    def delete(self, flow: DpFlow) -> None:
        try:
            self.ctl.call("dpctl/del-flow", f"{flow.ufid}, {flow.key}")
        except UnixctlError as e:
            if "No such file" not in str(e) and "not found" not in str(e).lower():
                raise
