"""Network namespaces and commands run inside them, for the lab."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

NETNS_DIR = "/run/netns"


def run(cmd: Sequence[str], check: bool = True, env: dict[str, str] | None = None,
        input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True, env=env, input=input,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def add(name: str) -> str:
    if exists(name):
        raise RuntimeError(f"network namespace {name} already exists")
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])
    return os.path.join(NETNS_DIR, name)


def delete(name: str) -> None:
    if exists(name):
        run(["ip", "netns", "del", name], check=False)


def listing(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]
