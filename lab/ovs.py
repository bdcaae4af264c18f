"""One Open vSwitch (ovsdb-server + ovs-vswitchd) per lab node, inside its netns.

Each node's OVS has its own OVS_RUNDIR, database and logs, so nodes share
nothing but the kernel. Userspace TSO is switched on before ovs-vswitchd
starts (it is read only at start-up).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from flowcni.lab import netns
from flowcni.lab.netns import run

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


@dataclass(frozen=True)
class OVS:
    ns: str
    rundir: str

    @property
    def db_sock(self) -> str:
        return os.path.join(self.rundir, "db.sock")

    @property
    def remote(self) -> str:
        return f"unix:{self.db_sock}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "OVS_RUNDIR": self.rundir, "OVS_LOGDIR": self.rundir,
                "OVS_DBDIR": self.rundir}

    def vsctl(self, *args: str, check: bool = True) -> str:
        return run(["ovs-vsctl", f"--db={self.remote}", "--timeout=20", *args],
                   check=check, env=self.env()).stdout

    def ofctl(self, *args: str, check: bool = True) -> str:
        return run(netns.exec_argv(self.ns, ["ovs-ofctl", "-O", "OpenFlow13", *args]),
                   check=check, env=self.env()).stdout

    def appctl(self, *args: str, check: bool = True) -> str:
        ctl = os.path.join(self.rundir, "ovs-vswitchd.ctl")
        return run(["ovs-appctl", "-t", ctl, *args], check=check, env=self.env()).stdout

    def start(self, tso: bool = True) -> None:
        os.makedirs(self.rundir, exist_ok=True)
        db = os.path.join(self.rundir, "conf.db")
        if not os.path.exists(db):
            run(["ovsdb-tool", "create", db, SCHEMA])
        r = self.rundir
        run(netns.exec_argv(self.ns, [
            "ovsdb-server", db, f"--remote=punix:{self.db_sock}",
            f"--pidfile={r}/ovsdb-server.pid", f"--unixctl={r}/ovsdb-server.ctl",
            f"--log-file={r}/ovsdb-server.log", "--detach"]), env=self.env())
        self.vsctl("--no-wait", "init")
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".",
                   f"other_config:userspace-tso-enable={'true' if tso else 'false'}")
        self.start_vswitchd()

    def start_vswitchd(self) -> None:
        """(Re)start ovs-vswitchd alone, against the running ovsdb-server."""
        r = self.rundir
        run(netns.exec_argv(self.ns, [
            "ovs-vswitchd", self.remote, f"--pidfile={r}/ovs-vswitchd.pid",
            f"--unixctl={r}/ovs-vswitchd.ctl", f"--log-file={r}/ovs-vswitchd.log",
            "--detach"]), env=self.env())

    def pids(self) -> list[int]:
        out = []
        for name in ("ovs-vswitchd", "ovsdb-server"):
            try:
                with open(os.path.join(self.rundir, f"{name}.pid")) as f:
                    out.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return out

    def stop(self) -> None:
        """Stop both daemons; vswitchd first, so it never runs without its db."""
        for pid in self.pids():
            kill_wait(pid)


def kill_wait(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            time.sleep(0.02)
