"""Continuous new-connection probers for datapath tests that change policy under traffic.

Each prober runs in a source pod with one thread per (target, port): it opens
a fresh TCP connection, records when it started and ended and whether it
connected, sleeps a little and starts again, until killed. Every line it
prints is one probe, so a test can compare each probe with the policy that
was in force (realized) for its whole duration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

PROBER = r"""
import json, socket, sys, threading, time
targets = json.loads(sys.argv[1]); timeout = float(sys.argv[2]); pause = float(sys.argv[3])
lock = threading.Lock()
def run(name, ip, port):
    while True:
        s = socket.socket(); s.settimeout(timeout)
        t0 = time.time()
        try:
            s.connect((ip, port)); ok = 1
        except OSError:
            ok = 0
        t1 = time.time()
        s.close()
        with lock:
            print(f"{name} {port} {t0:.4f} {t1:.4f} {ok}", flush=True)
        time.sleep(pause)
for name, ip, port in targets:
    threading.Thread(target=run, args=(name, ip, port), daemon=True).start()
threading.Event().wait()
"""


@dataclass(frozen=True)
class Probe:
    src: str
    dst: str
    port: int
    start: float
    end: float
    ok: bool


def start_prober(argv_prefix: list[str], targets: list[tuple[str, str, int]],
                 log_path: str, timeout: float = 0.3, pause: float = 0.03
                 ) -> subprocess.Popen[bytes]:
    """Start probing (name, ip, port) targets continuously; lines go to `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([*argv_prefix, sys.executable, "-c", PROBER,
                                 json.dumps(targets), str(timeout), str(pause)],
                                stdout=log, stderr=subprocess.DEVNULL)


def read_probes(src: str, log_path: str, offset: int = 0) -> tuple[list[Probe], int]:
    """Complete probe lines of a prober's log from byte `offset`; (probes, next offset)."""
    out = []
    with open(log_path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    for line in data[:end].decode().splitlines():
        parts = line.split()
        if len(parts) == 5:
            out.append(Probe(src, parts[0], int(parts[1]), float(parts[2]), float(parts[3]),
                             parts[4] == "1"))
    return out, offset + end
