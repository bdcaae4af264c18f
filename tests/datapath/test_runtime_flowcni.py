"""Real container runtimes attach containers through flowcni and reach lab pods.

podman (CNI backend) and containerd's `ctr run --cni` call the installed
`flowcni` executable exactly as they would on a node; the container gets an
address from the node's pod CIDR, pings a lab pod and is pinged back, and
removing the container (CNI DEL) leaves no OVS port behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.support.oci_image import BUSYBOX, build_busybox_oci
from tests.support.probe import ping
from tests.support.runtimes import (
    containerd_session,
    make_plugin_dir,
    podman_exec,
    podman_load,
    podman_rm,
    podman_run,
    podman_session,
    write_conflist,
)

pytestmark = pytest.mark.runtime
IMAGE = "localhost/flowcni-busybox:latest"
ExecFn = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="module")
def rt_lab() -> Iterator[Lab]:
    with running_lab("rt", pods=[("target", "node1", {})]) as lab:
        yield lab


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} missing (apt-get install busybox-static)")
    return build_busybox_oci(str(tmp_path_factory.mktemp("oci") / "busybox.tar"), IMAGE)


def conf_dir(lab: Lab, tmp_path: Path) -> str:
    with open(lab.node("node1").conflist) as f:
        conflist = json.load(f)
    d = str(tmp_path / "net.d")
    write_conflist(d, conflist)
    return d


def pod_ports(lab: Lab) -> list[str]:
    ports = lab.node("node1").ovs.vsctl("list-ports", "br-int").split()
    return [p for p in ports if p.startswith("fc")]


def check_attached(lab: Lab, exec_fn: ExecFn) -> str:
    out = exec_fn("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    ips = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out)
    assert ips, f"no IPv4 address on the container's eth0:\n{out}"
    ip = ips[0][0]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(lab.node("node1").pod_cidr)
    target = lab.pod("target").ip
    r = exec_fn("ping", "-c", "2", "-W", "2", target, check=False)
    assert r.returncode == 0, f"container -> lab pod {target}: {r.stdout}{r.stderr}"
    assert ping(lab, "target", ip, count=2), f"lab pod -> container {ip}"
    return ip


def test_podman_container_gets_flowcni_address(rt_lab: Lab, image: str,
                                               tmp_path: Path) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman not installed")
    before = pod_ports(rt_lab)
    with podman_session(conf_dir(rt_lab, tmp_path), rt_lab.bin_dir) as penv:
        assert podman_load(penv, image) == IMAGE
        cid = podman_run(penv, IMAGE, "flowcni", ["sleep", "300"])
        try:
            check_attached(rt_lab, lambda *c, check=True: podman_exec(penv, cid, *c,
                                                                         check=check))
            assert len(pod_ports(rt_lab)) == len(before) + 1
        finally:
            podman_rm(penv, cid, check=False)
    assert pod_ports(rt_lab) == before, "podman rm (CNI DEL) left the OVS port"


def test_ctr_container_gets_flowcni_address(rt_lab: Lab, image: str, tmp_path: Path) -> None:
    for tool in ("containerd", "ctr", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    bin_dir = str(tmp_path / "bin")
    make_plugin_dir(bin_dir, ["flowcni"], src_dir=rt_lab.bin_dir)
    before = pod_ports(rt_lab)
    with containerd_session(conf_dir(rt_lab, tmp_path), bin_dir) as cd:
        cd.import_image(image)
        ctr = cd.run(IMAGE, cmd=["sleep", "300"])
        try:
            check_attached(rt_lab, lambda *c, check=True: cd.exec(ctr.id, *c, check=check))
        finally:
            rc = cd.remove(ctr.id)
        assert rc is not None, ctr.log()
    assert pod_ports(rt_lab) == before, "ctr (CNI DEL) left the OVS port"
