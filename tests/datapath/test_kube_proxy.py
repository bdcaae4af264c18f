"""Services done by kube-proxy (node-level DNAT) on a flowcni cluster, with real packets.

The agents run with `--proxy kube-proxy` (flowcni leaves Services to the node). Each
node gets the nftables rules kube-proxy's nftables mode would write
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
from flowcni.datastore.manifests import load
from flowcni.flows.tables import DEFAULT
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually
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
VIP_HAIRPIN2 = "10.96.0.13"  # the endpoint is client2, on node2
CLUSTER_CIDR = "10.244.0.0/16"  # the lab's default
TABLE = "kube-proxy-test"
SCTP_PORT = 9999


@pytest.fixture(scope="module")
def klab() -> Iterator[Lab]:
    pods: list[tuple[str, str, dict[str, str]]] = [
        ("client", "node1", {}), ("ep1", "node1", {}), ("ep2", "node2", {"app": "ep2"}),
        ("client2", "node2", {})]
    with running_lab("kp", nodes=2, encap="geneve", pods=pods, proxy="kube-proxy") as lab:
        servers: list[subprocess.Popen[str]] = []
        try:
            servers += [start_server(lab.exec_argv(f"default/{n}", []), n, "80,53u")
                        for n in ("ep1", "ep2", "client", "client2")]
            servers += [start_sctp_responder(lab.exec_argv(f"default/{n}", []), n, SCTP_PORT)
                        for n in ("ep1", "ep2", "client")]
            ip = {p.name: p.ip for p in lab.pods()}
            common = [
                # ClusterIPs: one endpoint on node1, one on node2, one the client itself.
                DNat(VIP_LOCAL, 8080, "tcp", ip["ep1"], 80),
                DNat(VIP_LOCAL, 53, "udp", ip["ep1"], 53),
                DNat(VIP_REMOTE, 8080, "tcp", ip["ep2"], 80),
                DNat(VIP_REMOTE, 53, "udp", ip["ep2"], 53),
                DNat(VIP_HAIRPIN, 8080, "tcp", ip["client"], 80),
                DNat(VIP_HAIRPIN, 53, "udp", ip["client"], 53),
                DNat(VIP_HAIRPIN2, 8080, "tcp", ip["client2"], 80),
                DNat(VIP_HAIRPIN2, 53, "udp", ip["client2"], 53),
                DNat(VIP_LOCAL, SCTP_PORT, "sctp", ip["ep1"], SCTP_PORT),
                DNat(VIP_REMOTE, SCTP_PORT, "sctp", ip["ep2"], SCTP_PORT),
                DNat(VIP_HAIRPIN, SCTP_PORT, "sctp", ip["client"], SCTP_PORT),
            ]
            for node in ("node1", "node2"):
                nip = lab.node(node).node_ip
                node_ports = [DNat(nip, port, proto, ip[ep], target, masquerade=masq,
                                   node_port=True) for port, proto, ep, target, masq in [
                    # NodePorts (externalTrafficPolicy Cluster: masqueraded): ep1, ep2.
                    (30080, "tcp", "ep1", 80, True),
                    (30080, "udp", "ep1", 53, True),
                    (30081, "tcp", "ep2", 80, True),
                    (30081, "udp", "ep2", 53, True),
                    # externalTrafficPolicy Local: this node's endpoint, client kept.
                    (30082, "tcp", "ep1" if node == "node1" else "ep2", 80, False),
                    # A node port whose endpoint is the client pod itself (hairpin).
                    (30090, "tcp", "client", 80, True),
                    (30090, "udp", "client", 53, True)]]
                install_kube_proxy_rules(lab, node, TABLE, common + node_ports,
                                         cluster_cidr=CLUSTER_CIDR)
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
    """A pod reaching a Service whose endpoint is itself (kube-proxy masquerades it): the
    node DNATs the packet back to the same pod, which it reaches from the gateway."""
    got = replies(klab, "default/client", [f"{VIP_HAIRPIN}:8080", f"{VIP_HAIRPIN}:53u"])
    assert got == {f"{VIP_HAIRPIN}:8080": "client ping", f"{VIP_HAIRPIN}:53u": "client ping"}
    assert sctp_init(klab.exec_argv("default/client", []), VIP_HAIRPIN, SCTP_PORT) == \
        "client init"
    got = replies(klab, "default/client2", [f"{VIP_HAIRPIN2}:8080", f"{VIP_HAIRPIN2}:53u"])
    assert got == {f"{VIP_HAIRPIN2}:8080": "client2 ping",
                   f"{VIP_HAIRPIN2}:53u": "client2 ping"}


def test_hairpin_through_a_node_port(klab: Lab) -> None:
    """The client pod reaches its own node's node port, whose endpoint is itself; client2
    reaches the same node port on node1 (endpoint remote to it) as a control."""
    n1 = klab.node("node1").node_ip
    want = {f"{n1}:30090": "client ping", f"{n1}:30090u": "client ping"}
    assert replies(klab, "default/client", [f"{n1}:30090", f"{n1}:30090u"]) == want
    assert replies(klab, "default/client2", [f"{n1}:30090", f"{n1}:30090u"]) == want


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_nodeport_from_the_external_host(klab: Lab, node: str) -> None:
    """The external host reaches each node's node ports, TCP and UDP: endpoint ep1 (on
    node1), ep2 (on node2), so local on one node and remote on the other, and the
    externalTrafficPolicy Local port (this node's endpoint, no masquerade)."""
    nip = klab.node(node).node_ip
    local = "ep1" if node == "node1" else "ep2"
    got = request(netns.exec_argv(klab.external_ns, []),
                  [f"{nip}:30080", f"{nip}:30080u", f"{nip}:30081", f"{nip}:30081u",
                   f"{nip}:30082"])
    assert got == {f"{nip}:30080": "ep1 ping", f"{nip}:30080u": "ep1 ping",
                   f"{nip}:30081": "ep2 ping", f"{nip}:30081u": "ep2 ping",
                   f"{nip}:30082": f"{local} ping"}


def test_clusterip_from_the_node_itself(klab: Lab) -> None:
    """node1's own stack through its output-hook DNAT: endpoint local and remote
    (masqueraded to the gateway address as kube-proxy does for off-cluster sources)."""
    got = request(netns.exec_argv(klab.node("node1").netns, []),
                  [f"{VIP_LOCAL}:8080", f"{VIP_REMOTE}:8080", f"{VIP_REMOTE}:53u"])
    assert got == {f"{VIP_LOCAL}:8080": "ep1 ping", f"{VIP_REMOTE}:8080": "ep2 ping",
                   f"{VIP_REMOTE}:53u": "ep2 ping"}


def test_flowcni_leaves_services_to_the_node(klab: Lab) -> None:
    """In kube-proxy mode a Service in the datastore programs nothing: with a Service on
    VIP_LOCAL selecting ep2, the node's rule (ep1) still answers, ServiceLB holds only its
    miss flow and flowcni's own node table is absent."""
    store = klab.store()
    svc = f"""
apiVersion: v1
kind: Service
metadata: {{name: shadow, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_LOCAL}
  selector: {{app: ep2}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30080}}
"""
    for kind, ns, name, body in load(svc):
        store.put(kind, ns, name, body)
    try:
        klab.wait_realized(timeout=30)
        n1 = klab.node("node1")
        flows = n1.ovs.ofctl("dump-flows", "br-int", f"table={DEFAULT.id('ServiceLB')}")
        assert [ln for ln in flows.splitlines() if "priority=" in ln
                and "priority=0" not in ln] == [], flows
        nft = subprocess.run(netns.exec_argv(n1.netns, ["nft", "list", "tables"]),
                             capture_output=True, text=True, check=True).stdout
        assert "flowcni-proxy" not in nft and TABLE in nft
        assert replies(klab, "default/client", [f"{VIP_LOCAL}:8080"]) == \
            {f"{VIP_LOCAL}:8080": "ep1 ping"}
        assert request(netns.exec_argv(klab.external_ns, []), [f"{n1.node_ip}:30080"]) == \
            {f"{n1.node_ip}:30080": "ep1 ping"}
    finally:
        store.delete("Service", "default", "shadow")


def test_replies_took_the_gateway_flow(klab: Lab) -> None:
    """A reply of a DNATed connection comes back through the from-gateway reply flow on
    node1: its packet count grows with this one request (earlier tests' packets aside)."""
    def count() -> int:
        flows = klab.node("node1").ovs.ofctl("dump-flows", "br-int")
        line = next(ln for ln in flows.splitlines() if "ct_mark=0x1/0x1" in ln and "+rpl" in ln)
        m = re.search(r"n_packets=(\d+)", line)
        assert m, line
        return int(m.group(1))

    before = count()
    got = replies(klab, "default/client", [f"{VIP_REMOTE}:8080"])
    assert got == {f"{VIP_REMOTE}:8080": "ep2 ping"}, got
    # datapath flow stats reach the OpenFlow rule when the revalidators pull them
    assert eventually(lambda: count() > before, timeout=10), before
