"""Who may hold the agent's OpenFlow session: only its own bridge, one session at a time.

An impostor switch gets the full flow set and every later change, so pods
lose their network without any error anywhere. These tests play impostors
(an unprivileged process, root with a wrong datapath id, a second session
with the right one), kill the real session, and migrate an old TCP
controller row, checking the agent's state and real packets each time.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from flowcni.ctl.client import AgentClient
from flowcni.lab.lab import Lab, Node

from tests.support.probe import eventually, ping, ping_during

FAKE_SWITCH = os.path.join(os.path.dirname(__file__), "..", "support", "fake_switch.py")
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def status(node: Node) -> dict[str, Any]:
    st: dict[str, Any] = AgentClient(node.api_socket).status()
    return st


def of_socket(node: Node) -> str:
    return os.path.join(node.ovs.rundir, "flowcni", "br-int.sock")


def dpid(node: Node) -> str:
    return node.ovs.vsctl("get", "bridge", "br-int", "datapath_id").strip().strip('"')


def fake_switch(node: Node, endpoints: list[str], dpid: str = "1", hold: float = 3.0,
                as_nobody: bool = False) -> subprocess.Popen[str]:
    """Start the fake switch in the node's netns; the script goes in on stdin, so an
    unprivileged user needs no access to the checkout."""
    with open(FAKE_SWITCH) as f:
        script = f.read()
    argv = ["ip", "netns", "exec", node.netns, *(NOBODY if as_nobody else []),
            "/usr/bin/python3", "-I", "-", *endpoints, "--dpid", dpid, "--hold", str(hold)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdin is not None
    p.stdin.write(script)
    p.stdin.close()
    return p


def report(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None and p.stderr is not None
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait(timeout=60) == 0, err
    r: dict[str, Any] = json.loads(out)
    return r


def settled(lab: Lab, node: Node) -> dict[str, Any]:
    """Status once the agent is connected and synced (it may be reconnecting)."""
    assert eventually(lambda: bool(status(node).get("synced")), timeout=30), status(node)
    return status(node)


def test_unprivileged_impostor_cannot_reach_or_displace_the_switch(lab1: Lab) -> None:
    node = lab1.node("node1")
    before = settled(lab1, node)
    p = fake_switch(node, ["tcp:127.0.0.1:6653", "tcp:127.0.0.1:6633",
                           f"unix:{of_socket(node)}"], dpid=dpid(node), hold=4.0,
                    as_nobody=True)
    # A pod attached while the impostor tries: it must be wired into the real OVS.
    pod = lab1.pod_add("during", "node1")
    try:
        r = report(p)
        assert r["connected_to"] is None, f"impostor got a session: {r}"
        assert not r["adopted"], r
        assert set(r["refused"]) == {"tcp:127.0.0.1:6653", "tcp:127.0.0.1:6633",
                                     f"unix:{of_socket(node)}"}, r
        after = status(node)
        assert after["connected"] and after["synced"], after
        assert after["round"] == before["round"], "the session was replaced"
        assert ping(lab1, "during", lab1.pod("a").ip, count=2)
        flows = node.ovs.ofctl("dump-flows", "br-int", "--no-stats")
        assert pod.ip in flows, "the new pod's flows are not in OVS"
    finally:
        lab1.pod_del("during")


def test_root_peer_with_wrong_datapath_id_is_refused(lab1: Lab) -> None:
    node = lab1.node("node1")
    before = settled(lab1, node)
    r = report(fake_switch(node, [f"unix:{of_socket(node)}"], dpid="123456", hold=10.0))
    assert r["connected_to"], r
    assert r["features_request"] and r["closed_by_peer"], r
    assert not r["adopted"], r
    after = status(node)
    assert after["connected"] and after["round"] == before["round"], after
    assert ping(lab1, "a", lab1.pod("b").ip)


def test_second_session_never_displaces_the_live_one(lab1: Lab) -> None:
    node = lab1.node("node1")
    before = settled(lab1, node)
    r = report(fake_switch(node, [f"unix:{of_socket(node)}"], dpid=dpid(node), hold=10.0))
    assert r["connected_to"] and r["features_request"], r
    assert r["closed_by_peer"] and not r["adopted"], r
    after = status(node)
    assert after["connected"] and after["round"] == before["round"], after
    assert ping(lab1, "a", lab1.pod("b").ip)


def test_agent_recovers_by_itself_when_its_session_is_killed(lab1: Lab) -> None:
    node = lab1.node("node1")
    before = settled(lab1, node)
    # ovs-vswitchd drops every controller session of the bridge and reconnects.
    node.ovs.appctl("bridge/reconnect", "br-int")
    assert eventually(lambda: status(node)["round"] != before["round"]
                      and bool(status(node)["synced"]), timeout=30), status(node)
    pod = lab1.pod_add("after-reconnect", "node1")
    try:
        assert ping(lab1, "after-reconnect", lab1.pod("a").ip, count=2)
        assert pod.ip in node.ovs.ofctl("dump-flows", "br-int", "--no-stats")
    finally:
        lab1.pod_del("after-reconnect")


def test_old_tcp_controller_row_is_migrated_in_place_without_loss(lab1: Lab) -> None:
    """An agent of an older version left `tcp:127.0.0.1:6653`: the new agent turns that
    row into its unix target without emptying the controller set (no flow flush)."""
    node = lab1.node("node1")
    settled(lab1, node)
    uuid = node.ovs.vsctl("get", "bridge", "br-int", "controller").strip()
    os.kill(node.agent_pid, 9)
    node.ovs.vsctl("set", "controller", "br-int", "target=\"tcp:127.0.0.1:6653\"")
    out = ping_during(lab1, "a", lab1.pod("b").ip, 400,
                      lambda: lab1.restart_agent("node1", kill=True))
    assert " 0% packet loss" in out, out[-300:]
    assert node.ovs.vsctl("get", "bridge", "br-int", "controller").strip() == uuid
    target = node.ovs.vsctl("get", "controller", "br-int", "target").strip().strip('"')
    assert target == f"unix:{of_socket(node)}"
    assert eventually(lambda: "true" in node.ovs.vsctl("get", "controller", "br-int",
                                                       "is_connected"), timeout=30)
