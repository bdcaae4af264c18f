"""Cross-node pod networking on a 3-node lab, for every encapsulation and routed mode.

Real packets everywhere: ICMP and TCP between every pair of pods, the
encapsulation captured on the underlay, DF pings at the pod MTU, egress to
the external host (which must see the node IP), nodes joining and leaving.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator

import pytest
from flowcni.lab import netns
from flowcni.lab.lab import EXTERNAL_IP, Lab, LabError

from tests.datapath.conftest import make_lab, running_lab
from tests.support.probe import eventually, ping, tcp_transfer

ENCAPS = ["geneve", "vxlan", "gre", "none"]
# tcpdump filter that matches each mode's cross-node pod traffic on the underlay
UNDERLAY_FILTER = {
    "geneve": "udp port 6081",
    "vxlan": "udp port 4789",
    "gre": "ip proto 47",
    "none": "icmp and net 10.244.0.0/16",
}
MTU = {"geneve": 1450, "vxlan": 1450, "gre": 1458, "none": 1500}


@pytest.fixture(scope="module", params=ENCAPS)
def mlab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    encap = request.param
    pods: list[tuple[str, str, dict[str, str]]] = [
        (f"p{n}{k}", f"node{n}", {}) for n in (1, 2, 3) for k in ("a", "b")]
    with running_lab(f"m{encap[:3]}", nodes=3, encap=encap, pods=pods) as lab:
        lab.encap = encap  # type: ignore[attr-defined]
        yield lab


def underlay_capture(lab: Lab, bpf: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(netns.exec_argv(lab.underlay_ns, [
        "tcpdump", "-n", "-l", "-i", "br0", "-c", "1", bpf]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if "listening on" in line:
            break
    return p


def test_every_pod_reaches_every_pod(mlab: Lab) -> None:
    pods = mlab.pods()
    failed = [f"{s.name}->{d.name}" for s, d in itertools.permutations(pods, 2)
              if not ping(mlab, s.ref, d.ip, count=2, timeout=1)]
    assert failed == []


def test_trace_agrees_with_the_datapath(mlab: Lab) -> None:
    """flowctl trace follows each pair across nodes and ends at the destination pod."""
    from flowcni.ctl.trace import Tracer
    tracer = Tracer(mlab)
    for s, d in itertools.permutations(mlab.pods(), 2):
        v = tracer.trace(s.ref, d.ref, "icmp")
        assert v.delivered and v.pod == d.ref and v.node == d.node, (s.name, d.name, v.detail)
        nodes = {st.node for st in v.steps}
        assert nodes == {s.node, d.node}, (s.name, d.name, nodes)


def test_tunnel_neighbours_are_the_peers_bridge_macs(mlab: Lab) -> None:
    """OVS must send tunnel packets to the MAC of the peer's br-phy (where its node IP
    lives); a peer's uplink MAC would reach the peer but not its tunnel end."""
    if mlab.encap == "none":  # type: ignore[attr-defined]
        pytest.skip("routed mode has no tunnels")
    mac = {n.node_ip: subprocess.run(["ip", "-n", n.netns, "-br", "link", "show", "br-phy"],
                                     capture_output=True, text=True).stdout.split()[2]
           for n in mlab.nodes()}
    for n in mlab.nodes():
        rows = [ln.split()[:2] for ln in n.ovs.appctl("tnl/neigh/show").splitlines()[2:]]
        learnt = {ip: m for ip, m in rows if ip in mac}
        assert learnt == {ip: m for ip, m in mac.items() if ip != n.node_ip}, (n.name, learnt)


def test_tcp_between_every_pair_of_nodes(mlab: Lab) -> None:
    pods = mlab.pods()
    for s, d in itertools.permutations(pods, 2):
        if s.node != d.node:
            assert tcp_transfer(mlab, d.ref, s.ref, nbytes=2_000_000) == 2_000_000, \
                f"{s.name} -> {d.name}"


def test_underlay_sees_the_encapsulation(mlab: Lab) -> None:
    encap = mlab.encap  # type: ignore[attr-defined]
    cap = underlay_capture(mlab, UNDERLAY_FILTER[encap])
    try:
        assert ping(mlab, "p1a", mlab.pod("p3a").ip, count=3)
        out, _ = cap.communicate(timeout=10)
    finally:
        cap.kill()
    assert out.strip(), f"no {UNDERLAY_FILTER[encap]} packet on the underlay"
    if encap == "none":
        assert mlab.pod("p3a").ip in out  # bare pod addresses
    # and the inverse: the encapsulated modes never show bare pod addresses
    if encap != "none":
        bare = underlay_capture(mlab, "icmp and net 10.244.0.0/16")
        assert ping(mlab, "p1a", mlab.pod("p3a").ip, count=2)
        bare.terminate()
        out, _ = bare.communicate(timeout=10)
        assert "10.244." not in out, out


def test_df_ping_at_pod_mtu_crosses_and_one_byte_more_is_refused(mlab: Lab) -> None:
    encap = mlab.encap  # type: ignore[attr-defined]
    mtu = MTU[encap]
    dst = mlab.pod("p2a").ip
    link = subprocess.run(mlab.exec_argv("p1a", ["ip", "-o", "link", "show", "eth0"]),
                          capture_output=True, text=True).stdout
    assert f"mtu {mtu} " in link
    assert ping(mlab, "p1a", dst, count=2, extra=("-M", "do", "-s", str(mtu - 28)))
    p = subprocess.run(mlab.exec_argv("p1a", ["ping", "-c", "1", "-W", "1", "-M", "do", "-s",
                                              str(mtu - 27), dst]),
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert "message too long" in (p.stdout + p.stderr).lower()


def test_external_host_sees_the_node_ip(mlab: Lab) -> None:
    p = subprocess.Popen(netns.exec_argv(mlab.external_ns, [
        "tcpdump", "-n", "-l", "-i", "eth0", "-c", "1", f"icmp and dst {EXTERNAL_IP}"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if "listening on" in line:
            break
    try:
        assert ping(mlab, "p2b", EXTERNAL_IP, count=2)
        out, _ = p.communicate(timeout=10)
    finally:
        p.kill()
    node_ip = mlab.node("node2").node_ip
    assert f"{node_ip} > {EXTERNAL_IP}" in out, out


@pytest.mark.parametrize("encap", ["geneve", "none"])
def test_node_joins_and_leaves(encap: str) -> None:
    with running_lab(f"j{encap[:3]}", nodes=2, encap=encap,
                     pods=[("x1", "node1", {}), ("x2", "node2", {})]) as lab:
        n3 = lab.node_add()
        lab.pod_add("x3", n3.name)
        assert ping(lab, "x1", lab.pod("x3").ip, count=3)
        assert ping(lab, "x3", lab.pod("x2").ip, count=3)
        lab.node_del(n3.name)
        node1 = lab.node("node1")

        def gone() -> bool:
            flows = node1.ovs.ofctl("dump-flows", "br-int", "--no-stats")
            routes = subprocess.run(["ip", "-n", node1.netns, "route"], capture_output=True,
                                    text=True).stdout
            return n3.pod_cidr not in flows and n3.pod_cidr not in routes

        assert eventually(gone), "node3's flow or route is still on node1"
        assert ping(lab, "x1", lab.pod("x2").ip)


def test_bad_lab_input_is_refused_and_nothing_built() -> None:
    lab = make_lab("bad")
    lab.down()
    with pytest.raises(LabError, match="encap 'vxlan6' unknown"):
        lab.up(nodes=1, encap="vxlan6")
    with pytest.raises(LabError, match="node-cidr-size 12 does not fit"):
        lab.up(nodes=1, cluster_cidr="10.244.0.0/16", node_cidr_size=12)
    assert netns.listing(lab.prefix) == []
    assert lab.nodes() == []


def test_agent_claiming_a_taken_cidr_is_refused() -> None:
    """A second node asking for node1's pod CIDR stops before touching OVS or the store."""
    import sys
    with running_lab("dup") as lab:
        taken = lab.node("node1").pod_cidr
        p = subprocess.run([sys.executable, "-m", "flowcni.controller.agent", "--node", "intruder",
                            "--datastore", f"sqlite:{lab.store_path}", "--node-ip", "192.168.77.99",
                            "--pod-cidr", taken, "--ovsdb", "unix:/nonexistent"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        assert f"pod CIDR {taken} overlaps node node1's {taken}" in p.stderr
        assert [n["name"] for n in lab.store().nodes()] == ["node1"]
