"""The CNI socket and the agent API socket share /run/flowcni: whichever is made last
must not undo the other's access rules (checked with a real unprivileged client)."""

from __future__ import annotations

import os
import shutil
import socketserver
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flowcni.controller.unixserver import UnixServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv")
NOBODY = 65534  # uid and the group granted (nogroup)
RUN = os.environ.get("FLOWCNI_TEST_PREFIX", "fct")


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"ok")


@pytest.fixture
def rundir() -> Iterator[str]:
    # Under /run, not pytest's tmp dir: the unprivileged client must be able to
    # walk the path down to the directory under test.
    d = f"/run/flowcni-{RUN}-unixserver"
    shutil.rmtree(d, ignore_errors=True)
    yield os.path.join(d, "flowcni")
    shutil.rmtree(d, ignore_errors=True)


def connect_as_group_member(path: str) -> str:
    """What uid 65534 with gid 65534 gets connecting to `path`: "ok" or the error."""
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print(s.recv(8).decode())\n"
            "except OSError as e: print(e.strerror)\n")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", sys.executable, "-c", code, path],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("group_first", [True, False])
def test_shared_directory_keeps_each_sockets_rule(rundir: str, group_first: bool) -> None:
    os.makedirs(os.path.dirname(rundir), mode=0o755)
    made = []
    try:
        order = [("api", NOBODY), ("cni", -1)] if group_first else [("cni", -1), ("api", NOBODY)]
        for name, gid in order:
            s = UnixServer(os.path.join(rundir, f"{name}.sock"), _Echo, None, name, gid=gid)
            s.start()
            made.append(s)
        st = os.stat(rundir)
        assert stat.S_IMODE(st.st_mode) == 0o710 and st.st_gid == NOBODY
        assert stat.S_IMODE(os.stat(os.path.join(rundir, "api.sock")).st_mode) == 0o660
        assert stat.S_IMODE(os.stat(os.path.join(rundir, "cni.sock")).st_mode) == 0o600
        assert connect_as_group_member(os.path.join(rundir, "api.sock")) == "ok"
        assert connect_as_group_member(os.path.join(rundir, "cni.sock")) == "Permission denied"
    finally:
        for s in made:
            s.stop()
    # Root only again once no group socket is live in it.
    UnixServer(os.path.join(rundir, "cni.sock"), _Echo, None, "cni").server.server_close()
    assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700


def test_two_groups_cannot_share_a_directory(rundir: str) -> None:
    os.makedirs(os.path.dirname(rundir), mode=0o755)
    a = UnixServer(os.path.join(rundir, "api.sock"), _Echo, None, "api", gid=NOBODY)
    a.start()
    try:
        with pytest.raises(ValueError, match="already open to group 65534"):
            UnixServer(os.path.join(rundir, "other.sock"), _Echo, None, "other", gid=0)
    finally:
        a.stop()
