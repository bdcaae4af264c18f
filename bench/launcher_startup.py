"""Start-up of the installed plugin launcher next to a bare ``python3 -IS``.

A runtime starts the plugin once per CNI call, so the launcher's start-up is
a floor under every ADD and DEL. ``flowctl install-cni`` writes a launcher
that holds its modules compiled (no source, no checkout); this measures
``CNI_COMMAND=VERSION`` through it (no agent involved: start-up, module
loading and one small JSON answer) and, interleaved in the same loop so load
on the machine hits both alike, the interpreter it names in its shebang
doing nothing (``-IS -c pass``): the difference is what the launcher costs.

    /opt/flowcni/venv/bin/python bench/launcher_startup.py [--n 200]   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _time(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="runs of each (default: %(default)s)")
    a = p.parse_args()
    from flowcni.cni import install

    with tempfile.TemporaryDirectory(prefix="flowcni-launcher-") as d:
        launcher = install.install(d)
        size = os.path.getsize(launcher)
        with open(launcher) as f:
            python = f.readline()[2:].split()[0]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "VERSION"}
        runs: dict[str, list[float]] = {"launcher": [], "bare": []}
        for _ in range(a.n):
            runs["launcher"].append(_time([launcher], env))
            runs["bare"].append(_time([python, "-IS", "-c", "pass"], env))
    out: dict[str, object] = {"bench": "launcher_startup", "n": a.n, "python": python,
                              "launcher_bytes": size}
    for name, ts in runs.items():
        ms = sorted(t * 1e3 for t in ts)
        out[f"{name}_min_ms"] = round(ms[0], 2)
        out[f"{name}_p50_ms"] = round(statistics.median(ms), 2)
        out[f"{name}_p99_ms"] = round(ms[int(len(ms) * 0.99) - 1], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
