"""Real runtimes as CNI clients, against Debian's reference bridge + host-local plugins.

Proves the runtime harness in tests/support/runtimes.py works end to end before it is
pointed at flowcni's own plugin: a busybox container gets an address from
10.199.0.0/24 on the test bridge ``fcrefbr0``, pings the bridge, and its host-local
lease is released when the runtime removes it (CNI DEL).

All addresses live in the containers' own netns or on ``fcrefbr0``; the only traffic
is one ping to the bridge address.  Needs root, podman and/or containerd + ctr.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.oci_image import BUSYBOX, build_busybox_oci  # noqa: E402
from tests.support.runtimes import (  # noqa: E402
    DEBIAN_CNI_DIR,
    Isolation,
    bridge_hostlocal_conflist,
    containerd_session,
    delete_link,
    hostlocal_leases,
    make_plugin_dir,
    podman_backend,
    podman_exec,
    podman_load,
    podman_rm,
    podman_run,
    podman_session,
    write_conflist,
)

pytestmark = pytest.mark.runtime

BRIDGE = "fcrefbr0"
SUBNET = "10.199.0.0/24"
GATEWAY = "10.199.0.1"
IMAGE = "localhost/flowcni-busybox:latest"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"

ExecFn = Callable[..., "subprocess.CompletedProcess[str]"]


def _require(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a bridge and runs containers")
    for path in (f"{DEBIAN_CNI_DIR}/bridge", f"{DEBIAN_CNI_DIR}/host-local", BUSYBOX):
        if not os.path.exists(path):
            pytest.skip(
                f"{path} missing (apt-get install containernetworking-plugins busybox-static)"
            )
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass
class RefNet:
    name: str
    conf_dir: str
    data_dir: str
    bin_dir: str


@pytest.fixture(scope="module")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing (apt-get install busybox-static)")
    return build_busybox_oci(str(tmp_path_factory.mktemp("oci") / "busybox.tar"), IMAGE)


@pytest.fixture
def ref_net(tmp_path: Path) -> Iterator[RefNet]:
    """A conflist dir with one bridge+host-local network; the bridge goes away after."""
    name = "fcref"
    net = RefNet(
        name=name,
        conf_dir=str(tmp_path / "net.d"),
        data_dir=str(tmp_path / "ipam"),
        bin_dir=str(tmp_path / "bin"),
    )
    write_conflist(net.conf_dir, bridge_hostlocal_conflist(name, BRIDGE, SUBNET, net.data_dir))
    forward_before = _read(IP_FORWARD)
    try:
        yield net
    finally:
        delete_link(BRIDGE)
        # The bridge plugin switches IPv4 forwarding on; put it back if it was off.
        if forward_before == "0" and _read(IP_FORWARD) == "1":
            with open(IP_FORWARD, "w") as f:
                f.write("0\n")


def _check_attached(exec_fn: ExecFn, net: RefNet, lease_owner: str) -> str:
    """Address from the subnet on eth0, gateway reachable, lease held; return the IP."""
    out = exec_fn("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    ips = re.findall(r"inet (10\.199\.0\.\d+)/24", out)
    assert ips, f"no {SUBNET} address on eth0 in the container:\n{out}"
    ip = ips[0]
    host = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", BRIDGE], capture_output=True, text=True
    ).stdout
    assert f"inet {GATEWAY}/24" in host, f"{BRIDGE} lacks {GATEWAY}: {host}"
    ping = exec_fn("ping", "-c", "1", "-W", "2", GATEWAY, check=False)
    assert ping.returncode == 0, f"ping {GATEWAY} failed:\n{ping.stdout}{ping.stderr}"
    leases = hostlocal_leases(net.data_dir, net.name)
    assert leases.get(ip) == lease_owner, f"lease for {ip} not held by {lease_owner}: {leases}"
    return ip


def test_podman_cni_bridge_hostlocal(ref_net: RefNet, busybox_archive: str) -> None:
    _require("podman")
    with podman_session(ref_net.conf_dir, DEBIAN_CNI_DIR) as penv:
        assert podman_backend(penv) == "cni"
        image = podman_load(penv, busybox_archive)
        assert image == IMAGE
        cid = podman_run(penv, image, ref_net.name, ["sleep", "300"])
        try:

            def exec_fn(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
                return podman_exec(penv, cid, *cmd, check=check)

            ip = _check_attached(exec_fn, ref_net, cid)
        finally:
            podman_rm(penv, cid, check=False)
        leases = hostlocal_leases(ref_net.data_dir, ref_net.name)
        assert ip not in leases, f"podman rm did not release {ip} (CNI DEL): {leases}"


@pytest.mark.parametrize(
    "isolation",
    [
        "mountns",
        pytest.param(
            "global",
            marks=pytest.mark.skipif(
                os.environ.get("FLOWCNI_TEST_CTR_GLOBAL") != "1",
                reason="writes /etc/cni/net.d and /opt/cni/bin; set FLOWCNI_TEST_CTR_GLOBAL=1",
            ),
        ),
    ],
)
def test_ctr_cni_bridge_hostlocal(
    ref_net: RefNet, busybox_archive: str, isolation: Isolation
) -> None:
    _require("containerd", "ctr", "unshare")
    make_plugin_dir(ref_net.bin_dir, ["bridge", "host-local", "loopback"])
    with containerd_session(ref_net.conf_dir, ref_net.bin_dir, isolation=isolation) as cd:
        cd.import_image(busybox_archive)
        ctr = cd.run(IMAGE, cmd=["sleep", "300"])
        try:

            def exec_fn(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
                return cd.exec(ctr.id, *cmd, check=check)

            ip = _check_attached(exec_fn, ref_net, ctr.cni_container_id)
        finally:
            rc = cd.remove(ctr.id)
        assert rc is not None, f"ctr run did not exit after the task was killed:\n{ctr.log()}"
        assert "network review" not in ctr.log(), f"ctr's CNI DEL failed:\n{ctr.log()}"
        leases = hostlocal_leases(ref_net.data_dir, ref_net.name)
        assert ip not in leases, f"ctr did not release {ip} (CNI DEL): {leases}"
        assert cd.task_status(ctr.id) is None
