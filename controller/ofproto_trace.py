"""Running `ofproto/trace` on the agent's own bridge and reading its output as steps.

The agent runs the trace (it knows its bridge, which it takes as --bridge, and
where its ovs-vswitchd listens), so flowctl never reaches into a switch or a
namespace. `parse` is pure: it turns the text ovs-appctl prints into table
visits, the final datapath actions and where the packet left the bridge.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

from flowcni.api.schema import TraceStep

_GOTO_RE = re.compile(r"goto_table:(\d+)")
_GROUP_RE = re.compile(r"^\s*group:(\d+)$")
_BUCKET_RE = re.compile(r"^\s*-> using bucket (\d+)")
_NAT_RE = re.compile(r"nat\(dst=([\d.]+(?::\d+)?)\)")
_STEP_RE = re.compile(r"^\s*(\d+)\. (.*?)(?:, priority (\d+))?(?:, cookie (0x[0-9a-f]+))?$")


class TraceError(RuntimeError):
    pass


@dataclass
class Parsed:
    steps: list[TraceStep] = field(default_factory=list)
    datapath_actions: str = ""
    output_port: int | None = None
    tunnel: bool = False
    groups: list[tuple[int, int]] = field(default_factory=list)  # (group id, bucket taken)
    nat_dst: str = ""  # the first nat(dst=...) a ct() in the trace applied


def parse(out: str, bridge: str, names: dict[int, str], node: str = "") -> Parsed:
    """Steps in `bridge` of every resumed pipeline (other bridges, such as br-phy
    after native tunnelling, are skipped), the final datapath actions, the last
    output port and whether the packet was sent into a tunnel."""
    r = Parsed()
    cur: TraceStep | None = None
    inside = False
    group = 0
    for line in out.splitlines():
        # Groups and the bucket OVS took, wherever they appear (inside a table's
        # actions, or where a dp_hash recirculation resumed the group).
        if gm := _GROUP_RE.match(line):
            group = int(gm[1])
        elif bm := _BUCKET_RE.match(line):
            r.groups.append((group, int(bm[1])))
        if not r.nat_dst and (nm := _NAT_RE.search(line)):
            r.nat_dst = nm[1]
        if line.startswith("bridge("):
            inside = line.startswith(f'bridge("{bridge}")')
            cur = None  # a new pipeline: nothing below belongs to the last step
            continue
        if line.startswith(("Final flow:", "Megaflow:", "===", "Flow:")):
            inside = False
        if line.startswith("Datapath actions:"):
            r.datapath_actions = line.split(":", 1)[1].strip()
            continue
        if not inside:
            continue
        m = _STEP_RE.match(line)
        if m and not line.startswith("     "):
            tid = int(m[1])
            cur = TraceStep(node, names.get(tid, str(tid)), tid,
                            int(m[3]) if m[3] else None, m[4] or "",
                            no_match=m[2].strip() == "No match.")
            r.steps.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s and set(s) == {"-"}:
            continue
        if s.startswith("-> output port is"):
            r.output_port = int(s.rsplit(" ", 1)[1])
        elif s.startswith("-> output to native tunnel"):
            r.tunnel = True
        elif s and not s.startswith("->") and not s.startswith("Resuming") and s != "thaw":
            cur.actions.append(_GOTO_RE.sub(
                lambda m: f"goto_table:{names.get(int(m[1]), m[1])}", s))
    return r


def vswitchd_target(rundir: str) -> str:
    """The ovs-vswitchd control socket in `rundir`: the fixed name a lab gives it, or
    the `ovs-vswitchd.PID.ctl` a packaged OVS uses."""
    fixed = os.path.join(rundir, "ovs-vswitchd.ctl")
    if os.path.exists(fixed):
        return fixed
    try:
        with open(os.path.join(rundir, "ovs-vswitchd.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot find ovs-vswitchd's control socket in {rundir}: {e}") from e
    return os.path.join(rundir, f"ovs-vswitchd.{pid}.ctl")


def run(rundir: str, bridge: str, flow: str, timeout: float = 20.0) -> str:
    """ovs-appctl ofproto/trace BRIDGE FLOW against this node's ovs-vswitchd."""
    p = subprocess.run(["ovs-appctl", "-t", vswitchd_target(rundir), f"--timeout={int(timeout)}",
                        "ofproto/trace", bridge, flow], capture_output=True, text=True,
                       timeout=timeout + 5)
    if p.returncode != 0:
        raise TraceError(f"ofproto/trace {flow}: {(p.stderr or p.stdout).strip()}")
    return p.stdout
