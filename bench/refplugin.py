"""Reference CNI latency: Debian's ``bridge`` + ``host-local`` plugins, no runtime.

For ``n`` pods in sequence: ``ip netns add``, then the bridge plugin's ADD, invoked
exactly as a runtime (libcni) does — the single plugin's config from the conflist with
``cniVersion`` and ``name`` injected on stdin, and ``CNI_COMMAND``, ``CNI_CONTAINERID``,
``CNI_NETNS=/run/netns/NAME``, ``CNI_IFNAME=eth0``, ``CNI_PATH=/usr/lib/cni`` in the
environment.  Then DEL for each pod (stdin carries the ADD result as ``prevResult``, as
libcni does for cniVersion >= 0.4.0).  Only the plugin process is timed
(``time.perf_counter`` around ``subprocess.run``).

Everything lives in namespaces made here and on the bridge ``fcbench0``
(10.198.0.0/16); no packet is sent.  The netns, the bridge and host-local's private
``dataDir`` are removed in ``finally``; ``net.ipv4.ip_forward`` (which the bridge
plugin switches on) is put back if it was off.

    python3 bench/refplugin.py [N]   # prints one JSON line
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

CNI_DIR = "/usr/lib/cni"
BRIDGE = "fcbench0"
SUBNET = "10.198.0.0/16"
NET_NAME = "fcbench"
CNI_VERSION = "1.0.0"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


def percentiles(xs: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) by the nearest-rank method; (nan, nan) for an empty list."""
    if not xs:
        return (math.nan, math.nan)
    s = sorted(xs)

    def rank(p: float) -> float:
        return s[max(0, math.ceil(p / 100 * len(s)) - 1)]

    return (rank(50), rank(99))


def plugin_conf(data_dir: str, bridge: str = BRIDGE, subnet: str = SUBNET) -> dict[str, Any]:
    """The conflist's single plugin config, as libcni hands it to the plugin."""
    return {
        "cniVersion": CNI_VERSION,
        "name": NET_NAME,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "dataDir": data_dir,
        },
    }


def _cni_env(command: str, container_id: str, netns: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": CNI_DIR,
    }


def run_plugin_timed(plugin: str, command: str, label: str, env: dict[str, str],
                     conf: dict[str, Any]) -> tuple[float, str]:
    """Run a CNI plugin once as a runtime does; return (elapsed ms, stdout).

    Only the plugin process is timed, the same way for flowcni and the
    reference, so the two figures compare. Raises unless it exits 0.
    """
    stdin = json.dumps(conf).encode()
    t0 = time.perf_counter()
    cp = subprocess.run([plugin], input=stdin, env=env, capture_output=True)
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    if cp.returncode != 0:
        raise RuntimeError(
            f"{os.path.basename(plugin)} {command} {label} rc={cp.returncode}: "
            f"{cp.stdout.decode(errors='replace')} {cp.stderr.decode(errors='replace')}"
        )
    return elapsed_ms, cp.stdout.decode()


def _invoke(command: str, container_id: str, netns: str, conf: dict[str, Any]) -> tuple[float, str]:
    """Run the bridge plugin once; return (elapsed ms, stdout). Raise on failure."""
    return run_plugin_timed(os.path.join(CNI_DIR, "bridge"), command, container_id,
                            _cni_env(command, container_id, netns), conf)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def measure_reference(n: int = 100) -> dict[str, list[float]]:
    """ADD then DEL ``n`` pods with the reference bridge plugin; latencies in ms."""
    if os.path.exists(f"/sys/class/net/{BRIDGE}"):
        raise RuntimeError(f"{BRIDGE} already exists: another run in progress? refusing")
    tmp = tempfile.mkdtemp(prefix="flowcni-refbench-")
    data_dir = os.path.join(tmp, "ipam")
    conf = plugin_conf(data_dir)
    forward_before = _read(IP_FORWARD)
    tag = f"fcb{os.getpid()}"
    pods: list[tuple[str, str]] = []  # (netns name, container id)
    added: dict[str, dict[str, Any]] = {}  # container id -> ADD result
    add_ms: list[float] = []
    del_ms: list[float] = []
    try:
        for i in range(n):
            ns = f"{tag}-{i}"
            cid = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex chars, like a runtime
            _ip("netns", "add", ns)
            pods.append((ns, cid))
            ms, out = _invoke("ADD", cid, f"/run/netns/{ns}", conf)
            added[cid] = json.loads(out)
            add_ms.append(ms)
        for ns, cid in pods:
            del_conf = dict(conf, prevResult=added[cid])
            ms, _ = _invoke("DEL", cid, f"/run/netns/{ns}", del_conf)
            del added[cid]
            del_ms.append(ms)
    finally:
        for ns, cid in pods:
            if cid in added:  # an ADD without its DEL: release untimed
                with contextlib.suppress(Exception):
                    _invoke("DEL", cid, f"/run/netns/{ns}", dict(conf, prevResult=added[cid]))
            _ip("netns", "del", ns, check=False)
        if os.path.exists(f"/sys/class/net/{BRIDGE}"):
            _ip("link", "del", BRIDGE, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        if forward_before == "0" and _read(IP_FORWARD) == "1":
            with contextlib.suppress(OSError), open(IP_FORWARD, "w") as f:
                f.write("0\n")
    return {"add_ms": add_ms, "del_ms": del_ms}


def main(argv: Sequence[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 100
    res = measure_reference(n)
    add50, add99 = percentiles(res["add_ms"])
    del50, del99 = percentiles(res["del_ms"])
    print(
        json.dumps(
            {
                "n": n,
                "reference_add_p50_ms": round(add50, 3),
                "reference_add_p99_ms": round(add99, 3),
                "reference_del_p50_ms": round(del50, 3),
                "reference_del_p99_ms": round(del99, 3),
                "reference_add_mean_ms": round(sum(res["add_ms"]) / max(1, n), 3),
                "reference_del_mean_ms": round(sum(res["del_ms"]) / max(1, n), 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
