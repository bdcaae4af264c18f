"""Real traffic between lab pods: ping, TCP transfers, packet captures."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from flowcni.lab.lab import Lab

TCP_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1); s.settimeout(float(sys.argv[2]))
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(float(sys.argv[2])); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    n += len(b)
c.sendall(str(n).encode()); c.close(); print(n, flush=True)
"""

TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
data = b"x" * int(sys.argv[3]); c.sendall(data); c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode())
"""


def ping(lab: Lab, src: str, dst_ip: str, count: int = 1, timeout: float = 1.0,
         extra: tuple[str, ...] = ()) -> bool:
    p = subprocess.run(lab.exec_argv(src, ["ping", "-n", "-c", str(count), "-W", str(timeout),
                                           *extra, dst_ip]),
                       capture_output=True, text=True)
    return p.returncode == 0


def ping_during(lab: Lab, src: str, dst_ip: str, count: int,
                action: Callable[[], object]) -> str:
    """Ping `dst_ip` from pod `src` every 10 ms, `count` times, while `action` runs (an
    agent restart, say); ping's output, whose summary line tells the loss."""
    p = subprocess.Popen(lab.exec_argv(src, ["ping", "-n", "-i", "0.01", "-c", str(count),
                                             "-W", "1", dst_ip]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        action()
    finally:
        out, _ = p.communicate(timeout=count * 0.01 + 120)
    return out


def tcp_transfer(lab: Lab, server: str, client: str, port: int = 5001,
                 nbytes: int = 1_000_000) -> int:
    """Send nbytes from client to server over TCP; return what the server counted."""
    srv = subprocess.Popen(lab.exec_argv(server, [sys.executable, "-c", TCP_SERVER, str(port),
                                                  "10"]),
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "listening"
        dst = lab.pod(server).ip
        cli = subprocess.run(lab.exec_argv(client, [sys.executable, "-c", TCP_CLIENT, dst,
                                                    str(port), str(nbytes)]),
                             capture_output=True, text=True, timeout=30)
        if cli.returncode != 0:
            return -1
        return int(cli.stdout.strip() or -1)
    finally:
        srv.kill()
        srv.wait()


class Capture:
    """tcpdump inside a pod's netns; count() stops it and returns the packets seen."""

    def __init__(self, lab: Lab, pod: str, bpf: str, iface: str = "eth0") -> None:
        self.p = subprocess.Popen(lab.exec_argv(pod, ["tcpdump", "-n", "-l", "-i", iface,
                                                      "-U", bpf]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.p.stderr is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait until tcpdump is listening
            line = self.p.stderr.readline()
            if "listening on" in line:
                break

    def count(self) -> list[str]:
        time.sleep(0.3)
        self.p.terminate()
        out, _ = self.p.communicate(timeout=5)
        return [ln for ln in out.splitlines() if ln.strip()]


def eventually(check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """True as soon as check() is; False if it never is within timeout.

    For effects the agent finishes in the background (a DEL's veth and
    lease) and for flow counters OVS updates periodically.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
