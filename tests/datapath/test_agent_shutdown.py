"""SIGTERM stops an agent on the Kubernetes datastore promptly, also as a container's PID 1.

The DaemonSet execs the agent, so it is PID 1 of its container, and the
kernel drops a signal PID 1 has no handler for: a SIGTERM that arrived while
the agent was still starting (waiting for its Node, OVS or the first lists)
was lost, and the runtime had to SIGKILL it after the grace period. The
agent runs here under `unshare --pid --fork`, which makes it PID 1 of a new
PID namespace, as in a container. No timing is asserted: the agent must be
gone within a generous deadline, and its watches on the (fake) API server
must be closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from flowcni.datastore.kube import KINDS
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import make_lab
from tests.support.kubelab import KubeLabDatastore

T = TypeVar("T")
EXIT_DEADLINE = 30.0  # generous: the old agent needed node_wait (60 s) or a SIGKILL


@pytest.fixture(scope="module")
def klab() -> Iterator[Lab]:
    lab = make_lab("kterm", datastore=KubeLabDatastore)
    lab.down()
    try:
        lab.up(nodes=1, encap="geneve")
        yield lab
    finally:
        ds = lab.datastore
        assert isinstance(ds, KubeLabDatastore)
        ds.stop()
        lab.down()


def wait_for(check: Callable[[], T], timeout: float, what: str) -> T:
    """check()'s first truthy value; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def control(lab: Lab) -> KubeLabDatastore:
    ds = lab.datastore
    assert isinstance(ds, KubeLabDatastore)
    return ds


def as_pid1(lab: Lab, argv: list[str], log: str) -> subprocess.Popen[bytes]:
    """Run `argv` in node1's netns as PID 1 of a new PID namespace."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            netns.exec_argv(lab.node("node1").netns,
                            ["unshare", "--pid", "--fork", "--kill-child", *argv]),
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)


def pid1_of(outer: subprocess.Popen[bytes]) -> int:
    """The host pid of the process `unshare --fork` started (its only child)."""
    def child() -> int | None:
        try:
            with open(f"/proc/{outer.pid}/task/{outer.pid}/children") as f:
                kids = f.read().split()
        except FileNotFoundError:
            return None
        return int(kids[0]) if kids else None
    pid = wait_for(child, 30, "the agent under unshare")
    assert pid is not None
    assert_agent_is_pid1(pid)
    return pid


def assert_agent_is_pid1(pid: int) -> None:
    """`pid` is the agent itself and PID 1 of a PID namespace other than ours: what the
    tests are about (the kernel drops signals PID 1 has no handler for)."""
    wait_for(lambda: _is_agent(pid), 30, f"pid {pid} to be the agent (exec'd)")
    with open(f"/proc/{pid}/status") as f:
        nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
    assert nspid[0] == str(pid) and nspid[-1] == "1" and len(nspid) >= 2, nspid
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")


def _is_agent(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return any(a.endswith((b"flowcni-agent", b"flowcni.controller.agent")) for a in argv)


def stop_and_time(outer: subprocess.Popen[bytes], pid: int) -> tuple[int | None, float]:
    """SIGTERM the agent; (exit status of the unshare wrapper or None, seconds waited)."""
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    try:
        rc: int | None = outer.wait(EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.monotonic() - t0


def test_sigterm_while_starting_as_pid1(klab: Lab, tmp_path: os.PathLike[str]) -> None:
    """An agent waiting for a Node the API server does not have yet (its watches open)."""
    ctl = control(klab).control()
    base = ctl.watch_count()  # node1's own agent
    d = str(tmp_path)
    outer = as_pid1(klab, [
        sys.executable, "-m", "flowcni.controller.agent", "--node", "ghost",
        "--datastore", "kubernetes",
        "--kubeconfig", control(klab).kubeconfig, "--node-ip", "192.168.99.9",
        "--ovsdb", f"unix:{d}/no-ovsdb.sock", "--cni-socket", f"{d}/cni.sock",
        "--api-socket", f"{d}/api.sock", "--state-dir", f"{d}/state"],
        os.path.join(d, "agent.log"))
    try:
        pid = pid1_of(outer)
        wait_for(lambda: ctl.watch_count() >= base + len(KINDS), 60,
                 "the starting agent's watches (one per kind)")
        rc, took = stop_and_time(outer, pid)
        with open(os.path.join(d, "agent.log")) as f:
            log = f.read()
        assert rc is not None, f"agent still running {EXIT_DEADLINE:g}s after SIGTERM:\n{log}"
        assert "while starting; exiting" in log
        wait_for(lambda: ctl.watch_count() == base, 30, "the agent's watches closed")
        print(f"starting agent (PID 1) exited {took:.2f}s after SIGTERM")
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()


def test_sigterm_running_agent_as_pid1(klab: Lab) -> None:
    """node1's agent restarted as PID 1, synced, then SIGTERMed."""
    node = klab.node("node1")
    with open(f"/proc/{node.agent_pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    argv = argv[argv.index("netns") + 3:] if argv[:2] == ["ip", "netns"] else argv
    ctl = control(klab).control()
    os.kill(node.agent_pid, signal.SIGKILL)
    wait_for(lambda: ctl.watch_count() == 0, 30, "old agent's watches gone")
    outer = as_pid1(klab, argv, node.agent_log)
    try:
        pid = pid1_of(outer)
        klab.wait_ready(node, timeout=120)
        wait_for(lambda: ctl.watch_count() == len(KINDS), 30, "one watch per kind")
        rc, took = stop_and_time(outer, pid)
        assert rc is not None, f"agent still running {EXIT_DEADLINE:g}s after SIGTERM"
        wait_for(lambda: ctl.watch_count() == 0, 30, "the watches closed")
        with open(node.agent_log) as f:
            assert "agent stopped; flows stay in OVS" in f.read()
        print(f"running agent (PID 1) exited {took:.2f}s after SIGTERM")
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
        klab.restart_agent("node1")
