"""A stock Debian 12 root filesystem, made with debootstrap, to install into.

The install test runs setup's Python part in it (chroot) and the image test
imports it into podman as the base of the DaemonSet image, so both prove
things on a plain Debian 12, not on the machine that runs the tests (which
may hold another Python, pip configuration, compilers). Everything lives in
the caller's directory; nothing is cached elsewhere.

The one thing carried over from the host is its TLS trust: where traffic to
PyPI goes through an inspecting proxy, the host's CA bundle (PIP_CERT, else
Debian's bundle) is what makes pip work there, and a stock root has no copy.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: What setup's Python part needs from Debian (the rest of debian-packages.txt
#: is network tools and runtimes, not needed to install and start flowcni).
PYTHON_PACKAGES = ("python3", "python3-venv", "ca-certificates")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for path in files:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        for uri in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def host_ca_bundle() -> str:
    return os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"


def debootstrap(root: str, include: Sequence[str] = PYTHON_PACKAGES,
                timeout: float = 900) -> None:
    """A minimal Debian 12 (minbase) in `root`, plus `include`."""
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(include)}",
                    SUITE, root, mirror()], check=True, capture_output=True, text=True,
                   timeout=timeout)


def tarball(root: str, dest: str) -> str:
    """`root` as a tar (numeric owners), as `podman import` takes it."""
    subprocess.run(["tar", "-C", root, "--numeric-owner", "-cf", dest, "."], check=True,
                   timeout=600)
    return dest


def copy_in(root: str, files: Sequence[str], src_dir: str, dest: str) -> None:
    """Copy `files` (relative to src_dir) to `dest` inside root."""
    target = os.path.join(root, dest.lstrip("/"))
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src_dir, rel), os.path.join(target, rel))


def chroot_run(root: str, script: str, env: dict[str, str] | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `script` (bash) in the chroot with a stock environment.

    /dev and /proc are mounted in a private mount namespace that ends with the
    command, so nothing stays mounted on the host, even on failure. The
    environment is a root login's, not this process's (no PIP_* settings, no
    other Python on PATH), plus the host CA bundle as PIP_CERT and `env`.
    """
    shutil.copy(host_ca_bundle(), os.path.join(root, "etc/ssl/certs/host-ca-bundle.crt"))
    shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
    envv = [f"{k}={v}" for k, v in {
        "PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8",
        "PIP_CERT": "/etc/ssl/certs/host-ca-bundle.crt", **(env or {})}.items()]
    inner = (f'mount --rbind /dev "{root}/dev" && mount -t proc proc "{root}/proc" && '
             f'exec chroot "{root}" /usr/bin/env -i "$@"')
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, "sh",
         *envv, "bash", "-euo", "pipefail", "-c", script],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
