"""The node's ovs-vswitchd dies and comes back: CNI STATUS, ADD and recovery.

Kills only this test lab's own ovs-vswitchd (from its pidfile), never
another one on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from flowcni.lab.lab import Lab, Pod

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually, ping


@pytest.fixture(scope="module")
def slab() -> Iterator[Lab]:
    with running_lab("swl", pods=[("a", "node1", {})]) as lab:
        yield lab


def plugin(lab: Lab, command: str, pod: Pod | None = None) -> tuple[int, dict[str, Any]]:
    node = lab.node("node1")
    conf = dict(json.loads(lab.net_conf(node)), cniVersion="1.1.0")
    env = (lab.plugin_env(command, pod) if pod else
           {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_PATH": lab.bin_dir})
    p = subprocess.run([os.path.join(lab.bin_dir, "flowcni")], input=json.dumps(conf),
                       env=env, capture_output=True, text=True, timeout=120)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {})


def vswitchd_pid(lab: Lab) -> int:
    with open(os.path.join(lab.node("node1").ovs.rundir, "ovs-vswitchd.pid")) as f:
        return int(f.read().strip())


def leases(lab: Lab) -> list[str]:
    with open(os.path.join(lab.node("node1").rundir, "agent", "ipam.json")) as f:
        return sorted(json.load(f)["leases"])


def test_status_add_and_recovery_across_vswitchd_loss(slab: Lab) -> None:
    node = slab.node("node1")
    before_leases = leases(slab)
    assert plugin(slab, "STATUS")[0] == 0
    before_ports = node.ovs.vsctl("list-ports", "br-int").split()
    pid = vswitchd_pid(slab)
    os.kill(pid, signal.SIGKILL)
    restarted = False
    try:
        assert eventually(lambda: plugin(slab, "STATUS")[0] != 0, timeout=10)
        rc, out = plugin(slab, "STATUS")
        assert out.get("code") == 50, out
        # ADD while the switch is away: try again later, briefly said, nothing left.
        pod = Pod("during-outage", "default", "node1", "", secrets.token_hex(32))
        pod.netns = f"{slab.prefix}outage"
        subprocess.run(["ip", "netns", "add", pod.netns], check=True)
        try:
            rc, out = plugin(slab, "ADD", pod)
        finally:
            subprocess.run(["ip", "netns", "del", pod.netns], check=False)
        assert rc != 0 and out.get("code") == 11, out
        text = f"{out.get('msg', '')} {out.get('details', '')}"
        assert len(text) < 300 and "ovsdbapp" not in text and "Traceback" not in text, text
        assert leases(slab) == before_leases
        node.ovs.start_vswitchd()
        restarted = True
        # Back by itself: ready again, a new pod is wired and reaches the old one.
        assert eventually(lambda: plugin(slab, "STATUS")[0] == 0, timeout=60)
        new = slab.pod_add("after-outage", "node1")
        try:
            assert ping(slab, "after-outage", slab.pod("a").ip, count=2)
            assert new.ip in node.ovs.ofctl("dump-flows", "br-int", "--no-stats")
        finally:
            slab.pod_del("after-outage")
        assert eventually(lambda: node.ovs.vsctl("list-ports", "br-int").split()
                          == before_ports, timeout=30)
        # DEL releases the lease in the background: done before the next test counts.
        assert eventually(lambda: leases(slab) == before_leases, timeout=30)
    finally:
        if not restarted:
            node.ovs.start_vswitchd()


def test_add_while_vswitchd_is_frozen_is_try_again_and_leaks_nothing(slab: Lab) -> None:
    """A frozen ovs-vswitchd (SIGSTOP) keeps its sockets open: the session looks alive
    until its echo times out, and OVSDB takes the port without anyone applying it."""
    node = slab.node("node1")
    before_leases = leases(slab)
    before_ports = node.ovs.vsctl("list-ports", "br-int").split()
    pid = vswitchd_pid(slab)
    pod = Pod("frozen", "default", "node1", f"{slab.prefix}frozen", secrets.token_hex(32))
    subprocess.run(["ip", "netns", "add", pod.netns], check=True)
    os.kill(pid, signal.SIGSTOP)
    try:
        rc, out = plugin(slab, "ADD", pod)
        assert rc != 0 and out.get("code") == 11, out
        text = f"{out.get('msg', '')} {out.get('details', '')}"
        assert len(text) < 300 and "ovsdbapp" not in text and "Traceback" not in text, text
        assert eventually(lambda: plugin(slab, "STATUS")[0] != 0, timeout=60)
        assert plugin(slab, "STATUS")[1].get("code") == 50
    finally:
        os.kill(pid, signal.SIGCONT)
        subprocess.run(["ip", "netns", "del", pod.netns], check=False)
    assert eventually(lambda: plugin(slab, "STATUS")[0] == 0, timeout=60)
    assert leases(slab) == before_leases
    assert eventually(lambda: node.ovs.vsctl("list-ports", "br-int").split() == before_ports,
                      timeout=30)
    assert ping(slab, "a", node.pod_cidr.replace("0/24", "1"))
