"""Services done by kube-proxy (node-level DNAT) on a flowcni cluster, with real packets.

Each node gets the nftables rules kube-proxy's nftables mode would write
(DNAT of a ClusterIP or node port to an endpoint, hairpin and NodePort
traffic masqueraded); pods and the external host then talk to the Services.
A reply that skipped the node's conntrack would come from the endpoint's own
address: TCP clients reset it and connected UDP sockets never see it, so
each check below fails without the from-gateway conntrack mark.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.support.svc import (
    DNat,
    install_kube_proxy_rules,
    replies,
    request,
    sctp_init,
    start_sctp_responder,
    start_server,
)

VIP_LOCAL, VIP_REMOTE, VIP_HAIRPIN = "10.96.0.10", "10.96.0.11", "10.96.0.12"
TABLE = "kube-proxy-test"
SCTP_PORT = 9999


@pytest.fixture(scope="module")
def klab() -> Iterator[Lab]:
    pods: list[tuple[str, str, dict[str, str]]] = [
        ("client", "node1", {}), ("ep1", "node1", {}), ("ep2", "node2", {}),
        ("client2", "node2", {})]
    with running_lab("kp", nodes=2, encap="geneve", pods=pods) as lab:
        servers: list[subprocess.Popen[str]] = []
        try:
            servers += [start_server(lab.exec_argv(f"default/{n}", []), n, "80,53u")
                        for n in ("ep1", "ep2", "client")]
            servers += [start_sctp_responder(lab.exec_argv(f"default/{n}", []), n, SCTP_PORT)
                        for n in ("ep1", "ep2", "client")]
            ip = {p.name: p.ip for p in lab.pods()}
            n1 = lab.node("node1").node_ip
            rules = [
                # ClusterIPs: one endpoint on node1, one on node2, one the client itself.
                DNat(VIP_LOCAL, 8080, "tcp", ip["ep1"], 80),
                DNat(VIP_LOCAL, 53, "udp", ip["ep1"], 53),
                DNat(VIP_REMOTE, 8080, "tcp", ip["ep2"], 80),
                DNat(VIP_REMOTE, 53, "udp", ip["ep2"], 53),
                DNat(VIP_HAIRPIN, 8080, "tcp", ip["client"], 80),
                DNat(VIP_HAIRPIN, 53, "udp", ip["client"], 53),
                DNat(VIP_LOCAL, SCTP_PORT, "sctp", ip["ep1"], SCTP_PORT),
                DNat(VIP_REMOTE, SCTP_PORT, "sctp", ip["ep2"], SCTP_PORT),
                DNat(VIP_HAIRPIN, SCTP_PORT, "sctp", ip["client"], SCTP_PORT),
                # NodePorts on node1 (externalTrafficPolicy Cluster: masqueraded).
                DNat(n1, 30080, "tcp", ip["ep1"], 80, masquerade=True),
                DNat(n1, 30081, "tcp", ip["ep2"], 80, masquerade=True),
                DNat(n1, 30081, "udp", ip["ep2"], 53, masquerade=True),
                # externalTrafficPolicy Local: the client's address is kept.
                DNat(n1, 30082, "tcp", ip["ep1"], 80),
            ]
            for node in ("node1", "node2"):
                install_kube_proxy_rules(lab, node, TABLE, rules)
            yield lab
        finally:
            for s in servers:
                s.kill()
                s.wait()


@pytest.mark.parametrize("client", ["default/client", "default/client2"])
def test_clusterip_to_endpoints_on_both_nodes(klab: Lab, client: str) -> None:
    """From each node: a ClusterIP whose endpoint is on node1 and one on node2, TCP and UDP."""
    got = replies(klab, client, [f"{VIP_LOCAL}:8080", f"{VIP_LOCAL}:53u",
                                 f"{VIP_REMOTE}:8080", f"{VIP_REMOTE}:53u"])
    assert got == {f"{VIP_LOCAL}:8080": "ep1 ping", f"{VIP_LOCAL}:53u": "ep1 ping",
                   f"{VIP_REMOTE}:8080": "ep2 ping", f"{VIP_REMOTE}:53u": "ep2 ping"}


@pytest.mark.parametrize("client", ["default/client", "default/client2"])
def test_clusterip_sctp(klab: Lab, client: str) -> None:
    """SCTP (INIT answered by INIT-ACK) through a ClusterIP, endpoint on node1 and node2.

    No direct SCTP exchange between the same two pods may precede this: OVS's
    userspace conntrack tracks SCTP by addresses only (ports 0), so a direct
    association's entry would swallow the one through the Service."""
    argv = klab.exec_argv(client, [])
    assert sctp_init(argv, VIP_LOCAL, SCTP_PORT) == "ep1 init"
    assert sctp_init(argv, VIP_REMOTE, SCTP_PORT) == "ep2 init"


def test_pod_ip_control(klab: Lab) -> None:
    """The same servers straight at their pod IPs (what a Service adds is the DNAT)."""
    ip = {p.name: p.ip for p in klab.pods()}
    got = replies(klab, "default/client", [f"{ip['ep1']}:80", f"{ip['ep2']}:53u"])
    assert got == {f"{ip['ep1']}:80": "ep1 ping", f"{ip['ep2']}:53u": "ep2 ping"}


def test_hairpin(klab: Lab) -> None:
    """A pod reaching a Service whose endpoint is itself (kube-proxy masquerades it)."""
    got = replies(klab, "default/client", [f"{VIP_HAIRPIN}:8080", f"{VIP_HAIRPIN}:53u"])
    assert got == {f"{VIP_HAIRPIN}:8080": "client ping", f"{VIP_HAIRPIN}:53u": "client ping"}
    assert sctp_init(klab.exec_argv("default/client", []), VIP_HAIRPIN, SCTP_PORT) == \
        "client init"


def test_nodeport_from_the_external_host(klab: Lab) -> None:
    """The external host reaches node1's node ports: endpoint local, remote, and Local policy."""
    n1 = klab.node("node1").node_ip
    got = request(netns.exec_argv(klab.external_ns, []),
                  [f"{n1}:30080", f"{n1}:30081", f"{n1}:30081u", f"{n1}:30082"])
    assert got == {f"{n1}:30080": "ep1 ping", f"{n1}:30081": "ep2 ping",
                   f"{n1}:30081u": "ep2 ping", f"{n1}:30082": "ep1 ping"}


def test_replies_took_the_gateway_flow(klab: Lab) -> None:
    """The replies above came back through the from-gateway reply flow on node1."""
    replies(klab, "default/client", [f"{VIP_REMOTE}:8080"])
    flows = klab.node("node1").ovs.ofctl("dump-flows", "br-int")
    line = next(ln for ln in flows.splitlines() if "ct_mark=0x1/0x1" in ln and "+rpl" in ln)
    m = re.search(r"n_packets=(\d+)", line)
    assert m and int(m.group(1)) > 0, line
