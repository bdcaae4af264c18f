"""flowcni's own proxy beyond ClusterIPs, with real packets: NodePorts (from the external
host, another node and the node itself), externalTrafficPolicy and
internalTrafficPolicy Local, external and LoadBalancer IPs, and the node's own
connections to ClusterIPs.

The endpoint servers answer with their name and the source address they saw,
so a test tells which endpoint answered and whether the client's address was
kept (Local) or SNATed to the entry node's gateway (Cluster). A reply
that skipped the node's un-NAT would come from the wrong address: TCP clients
reset it and connected UDP sockets never see it, so it shows as an error.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from flowcni.datastore.manifests import load
from flowcni.flows import fields as F
from flowcni.flows.nodeport import HAIRPIN_IP, NODEPORT_VIP, snat_port_range
from flowcni.flows.tables import DEFAULT
from flowcni.lab import netns
from flowcni.lab.lab import EXTERNAL_IP, EXTERNAL_UNDERLAY_IP, Lab

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually
from tests.support.svc import (
    Stream,
    replies,
    request,
    sctp_init,
    start_sctp_responder,
    start_server,
    start_stream_server,
)

VIP_NP, VIP_NPL, VIP_ETL, VIP_ITL, VIP_LB, VIP_HP, VIP_AFF = (
    "10.96.2.1", "10.96.2.2", "10.96.2.3", "10.96.2.4", "10.96.2.5", "10.96.2.6", "10.96.2.7")
AFFINITY_TIMEOUT = 120
VIP_HC, HEALTH_PORT = "10.96.2.8", 30085
# Node ports with affinity (TCP and UDP 30087, SCTP 30088) and plain SCTP (30086). The
# SCTP target ports equal the node ports: OVS 3.1's userspace conntrack rewrites an
# SCTP packet's address but not its port (see test_services.test_clusterip_sctp).
VIP_NPA, VIP_NPS, SCTP_NP, SCTP_AFF_NP = "10.96.2.9", "10.96.2.10", 30086, 30088
EXT_IP, LB_IP = "203.0.113.10", "203.0.113.11"
EXT_SRC = EXTERNAL_UNDERLAY_IP  # the external host connects to the node IPs from it

SERVICES = f"""
apiVersion: v1
kind: Service
metadata: {{name: np, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_NP}
  externalIPs: [{EXT_IP}]
  selector: {{w: "2"}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30081}}
  - {{name: dns, port: 53, targetPort: 53, nodePort: 30081, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: npl, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_NPL}
  selector: {{w: "1"}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30080}}
---
apiVersion: v1
kind: Service
metadata: {{name: etl, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_ETL}
  externalTrafficPolicy: Local
  selector: {{app: web}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30082}}
  - {{name: dns, port: 53, targetPort: 53, nodePort: 30082, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: itl, namespace: default}}
spec:
  clusterIP: {VIP_ITL}
  internalTrafficPolicy: Local
  selector: {{app: web}}
  ports:
  - {{name: http, port: 8080, targetPort: 80}}
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {VIP_LB}
  selector: {{w: "2"}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30083}}
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: hp, namespace: default}}
spec:
  clusterIP: {VIP_HP}
  selector: {{w: "1"}}
  ports:
  - {{name: http, port: 8080, targetPort: 80}}
  - {{name: dns, port: 53, targetPort: 53, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: aff, namespace: default}}
spec:
  clusterIP: {VIP_AFF}
  selector: {{app: web}}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {AFFINITY_TIMEOUT}}}}}
  ports:
  - {{name: http, port: 8080, targetPort: 80}}
  - {{name: dns, port: 53, targetPort: 53, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: hc, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {VIP_HC}
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT}
  selector: {{w: "1"}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30084}}
---
apiVersion: v1
kind: Service
metadata: {{name: npa, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_NPA}
  selector: {{app: web}}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {AFFINITY_TIMEOUT}}}}}
  ports:
  - {{name: http, port: 8080, targetPort: 80, nodePort: 30087}}
  - {{name: dns, port: 53, targetPort: 53, nodePort: 30087, protocol: UDP}}
  - {{name: sctp, port: {SCTP_AFF_NP}, targetPort: {SCTP_AFF_NP}, nodePort: {SCTP_AFF_NP},
      protocol: SCTP}}
---
apiVersion: v1
kind: Service
metadata: {{name: nps, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_NPS}
  selector: {{w: "2"}}
  ports:
  - {{name: sctp, port: {SCTP_NP}, targetPort: {SCTP_NP}, nodePort: {SCTP_NP}, protocol: SCTP}}
"""


def gateway_ip(lab: Lab, node: str) -> str:
    return str(next(ipaddress.ip_network(lab.node(node).pod_cidr).hosts()))


def node_argv(lab: Lab, node: str) -> list[str]:
    return netns.exec_argv(lab.node(node).netns, [])


@pytest.fixture(scope="module")
def nlab() -> Iterator[Lab]:
    with running_lab("np", nodes=2, encap="geneve") as lab:
        lab.pod_add("client1", "node1", labels={"role": "client"})
        lab.pod_add("client2", "node2", labels={"role": "client"})
        lab.pod_add("web1", "node1", labels={"app": "web", "w": "1"})
        lab.pod_add("web2", "node2", labels={"app": "web", "w": "2"})
        servers: list[subprocess.Popen[str]] = []
        try:
            for n in ("web1", "web2"):  # each answers "<name> <source address it saw>"
                servers.append(start_server(lab.exec_argv(f"default/{n}", []), n, "80,53u",
                                            reply="source"))
                for port in (SCTP_NP, SCTP_AFF_NP):
                    servers.append(start_sctp_responder(lab.exec_argv(f"default/{n}", []), n,
                                                        port))
            store = lab.store()
            for kind, ns, name, body in load(SERVICES):
                store.put(kind, ns, name, body)
            lab.wait_realized(timeout=30)
            # The "internet" routes the external and LoadBalancer IPs to node1.
            n1 = lab.node("node1").node_ip
            for ip in (EXT_IP, LB_IP):
                subprocess.run(["ip", "-n", lab.external_ns, "route", "replace", ip, "via", n1],
                               check=True)
            yield lab
        finally:
            for s in servers:
                s.kill()
                s.wait()


def test_nodeport_from_the_external_host(nlab: Lab) -> None:
    """externalTrafficPolicy Cluster: node1's and node2's node ports reach the endpoint on
    either node, TCP and UDP; the endpoint sees the entry node's gateway address
    (SNATed in OVS, so a remote endpoint replies to the entry node)."""
    n1, n2 = nlab.node("node1").node_ip, nlab.node("node2").node_ip
    gw1, gw2 = gateway_ip(nlab, "node1"), gateway_ip(nlab, "node2")
    got = request(netns.exec_argv(nlab.external_ns, []),
                  [f"{n1}:30081", f"{n1}:30081u", f"{n1}:30080", f"{n2}:30080",
                   f"{n2}:30081"])
    assert got == {f"{n1}:30081": f"web2 {gw1}", f"{n1}:30081u": f"web2 {gw1}",
                   f"{n1}:30080": f"web1 {gw1}", f"{n2}:30080": f"web1 {gw2}",
                   f"{n2}:30081": f"web2 {gw2}"}


def test_nodeport_from_another_node_and_from_the_node_itself(nlab: Lab) -> None:
    """node2's own stack to node1's node port, and node1's own stack to its node ports."""
    n1 = nlab.node("node1").node_ip
    gw1 = gateway_ip(nlab, "node1")
    got = request(node_argv(nlab, "node2"), [f"{n1}:30081", f"{n1}:30080"])
    assert got == {f"{n1}:30081": f"web2 {gw1}", f"{n1}:30080": f"web1 {gw1}"}
    got = request(node_argv(nlab, "node1"), [f"{n1}:30081", f"{n1}:30081u", f"{n1}:30080"])
    assert got == {f"{n1}:30081": f"web2 {gw1}", f"{n1}:30081u": f"web2 {gw1}",
                   f"{n1}:30080": f"web1 {gw1}"}
    # A pod to its own node's node port (endpoint on the other node, and on its node).
    got = replies(nlab, "default/client1", [f"{n1}:30081", f"{n1}:30081u", f"{n1}:30080"])
    assert got == {f"{n1}:30081": f"web2 {gw1}", f"{n1}:30081u": f"web2 {gw1}",
                   f"{n1}:30080": f"web1 {gw1}"}


def test_external_traffic_policy_local(nlab: Lab) -> None:
    """Local: each node's node port only ever reaches its own endpoint, and the endpoint
    sees the external host's own address (no masquerade). Several connections each, so
    a Cluster group (two buckets) would show the other endpoint."""
    n1, n2 = nlab.node("node1").node_ip, nlab.node("node2").node_ip
    targets = [f"{n1}:30082", f"{n2}:30082", f"{n1}:30082u", f"{n2}:30082u"]
    for _ in range(4):
        got = request(netns.exec_argv(nlab.external_ns, []), targets)
        assert got == {f"{n1}:30082": f"web1 {EXT_SRC}", f"{n2}:30082": f"web2 {EXT_SRC}",
                       f"{n1}:30082u": f"web1 {EXT_SRC}",
                       f"{n2}:30082u": f"web2 {EXT_SRC}"}


def test_internal_traffic_policy_local(nlab: Lab) -> None:
    """internalTrafficPolicy Local: a pod's ClusterIP connections stay on its node, while
    the same selector through a Cluster Service (etl's ClusterIP) spreads over both: both
    endpoints answer it within 40 connections (all on one, by chance: 2**-39), while
    every Local connection, asked in the same rounds, stays on its node."""
    ip = {p.name: p.ip for p in nlab.pods()}
    both = {f"web1 {ip['client1']}", f"web2 {ip['client1']}"}
    seen: set[str] = set()
    for i in range(40):
        if i >= 6 and seen == both:
            break
        assert replies(nlab, "default/client1", [f"{VIP_ITL}:8080"]) == {
            f"{VIP_ITL}:8080": f"web1 {ip['client1']}"}
        assert replies(nlab, "default/client2", [f"{VIP_ITL}:8080"]) == {
            f"{VIP_ITL}:8080": f"web2 {ip['client2']}"}
        seen.add(replies(nlab, "default/client1", [f"{VIP_ETL}:8080"])[f"{VIP_ETL}:8080"])
    assert seen == both, seen


def test_external_and_load_balancer_ips(nlab: Lab) -> None:
    """An external IP and a LoadBalancer ingress IP, routed to node1 by the external host,
    reach the endpoint on node2 (SNATed to node1's gateway); a pod reaches the external IP too."""
    gw1 = gateway_ip(nlab, "node1")
    ip = {p.name: p.ip for p in nlab.pods()}
    got = request(netns.exec_argv(nlab.external_ns, []),
                  [f"{EXT_IP}:8080", f"{EXT_IP}:53u", f"{LB_IP}:8080"])
    assert got == {f"{EXT_IP}:8080": f"web2 {gw1}", f"{EXT_IP}:53u": f"web2 {gw1}",
                   f"{LB_IP}:8080": f"web2 {gw1}"}
    assert replies(nlab, "default/client1", [f"{EXT_IP}:8080"]) == {
        f"{EXT_IP}:8080": f"web2 {ip['client1']}"}


def test_node_to_clusterip(nlab: Lab) -> None:
    """The node's own stack (host-network clients) to ClusterIPs whose endpoint is on
    another node and on this node, TCP and UDP; it connects from its gateway address."""
    gw1 = gateway_ip(nlab, "node1")
    got = request(node_argv(nlab, "node1"),
                  [f"{VIP_NP}:8080", f"{VIP_NP}:53u", f"{VIP_NPL}:8080"])
    assert got == {f"{VIP_NP}:8080": f"web2 {gw1}", f"{VIP_NP}:53u": f"web2 {gw1}",
                   f"{VIP_NPL}:8080": f"web1 {gw1}"}


def test_hairpin(nlab: Lab) -> None:
    """A pod reaching a Service whose only endpoint is itself, TCP and UDP: it sees the
    connection come from the hairpin address, and the replies reach it from the
    ClusterIP; another pod's connection to the same Service keeps its own source."""
    ip = {p.name: p.ip for p in nlab.pods()}
    for _ in range(2):  # later connections reuse the SNAT zone's flows
        got = replies(nlab, "default/web1", [f"{VIP_HP}:8080", f"{VIP_HP}:53u"])
        assert got == {f"{VIP_HP}:8080": f"web1 {HAIRPIN_IP}",
                       f"{VIP_HP}:53u": f"web1 {HAIRPIN_IP}"}
    assert replies(nlab, "default/client1", [f"{VIP_HP}:8080"]) == {
        f"{VIP_HP}:8080": f"web1 {ip['client1']}"}
    # Through its own node's node port (externalTrafficPolicy Cluster): it enters OVS
    # from the gateway with its own address, is DNATed to itself and SNATed to the
    # gateway address (not the hairpin one: it must go to its port, not back out of
    # the gateway).
    n1, gw1 = nlab.node("node1").node_ip, gateway_ip(nlab, "node1")
    assert replies(nlab, "default/web1", [f"{n1}:30080", f"{n1}:30080"]) == {
        f"{n1}:30080": f"web1 {gw1}"}


def test_session_affinity_client_ip(nlab: Lab) -> None:
    """sessionAffinity ClientIP: ten TCP connections and ten UDP sockets of one client all
    land on the endpoint its first one got (two endpoints: 1 in 512 by chance), and
    node1 holds the flows it learned for that client, with the Service's timeout."""
    ip = {p.name: p.ip for p in nlab.pods()}
    first = replies(nlab, "default/client1", [f"{VIP_AFF}:8080"])[f"{VIP_AFF}:8080"]
    assert first in (f"web1 {ip['client1']}", f"web2 {ip['client1']}"), first
    for _ in range(9):
        assert replies(nlab, "default/client1", [f"{VIP_AFF}:8080"]) == {
            f"{VIP_AFF}:8080": first}
    udp = {replies(nlab, "default/client1", [f"{VIP_AFF}:53u"])[f"{VIP_AFF}:53u"]
           for _ in range(10)}
    assert len(udp) == 1 and next(iter(udp)).startswith("web"), udp
    table = nlab.node("node1").ovs.ofctl("-O", "OpenFlow13", "dump-flows", "br-int",
                                         f"table={DEFAULT.id('SessionAffinity')}")
    learned = [ln for ln in table.splitlines()
               if f"nw_src={ip['client1']}" in ln and f"nw_dst={VIP_AFF}" in ln]
    assert len(learned) == 2, table  # one per port (TCP and UDP)
    assert all(f"idle_timeout={AFFINITY_TIMEOUT}" in ln for ln in learned), learned


def test_sctp_through_a_node_port(nlab: Lab) -> None:
    """SCTP from the external host to node1's node port (its endpoint web2 is on node2)
    and node2's (local): the INIT reaches web2 and the INIT-ACK comes back from the
    node address and port the client sent to (sctp_init refuses any other)."""
    n1, n2 = nlab.node("node1").node_ip, nlab.node("node2").node_ip
    ext = netns.exec_argv(nlab.external_ns, [])
    assert {ip: sctp_init(ext, ip, SCTP_NP) for ip in (n1, n2)} == {
        n1: "web2 init", n2: "web2 init"}


def test_sctp_two_external_clients_through_one_node_port(nlab: Lab) -> None:
    """Two external clients' SCTP associations through node1's node port, one after the
    other, without a conntrack flush between: both reach web2 (node2) and each INIT-ACK
    comes back to its own client from the address and port it sent to (sctp_init
    checks). SCTP is masqueraded by the node (flows/nodeport.py NODE_MASQUERADED): an
    SNAT to the gateway in OVS would fail for the second client (OVS 3.1 tracks SCTP
    without ports), whose INIT-ACK then came from web2's own address."""
    n1 = nlab.node("node1").node_ip
    ext = netns.exec_argv(nlab.external_ns, [])
    got = {src: sctp_init(ext, n1, SCTP_NP, src) for src in (EXT_SRC, EXTERNAL_IP)}
    assert got == {EXT_SRC: "web2 init", EXTERNAL_IP: "web2 init"}, got


def test_session_affinity_through_a_node_port(nlab: Lab) -> None:
    """sessionAffinity ClientIP through node ports, externalTrafficPolicy Cluster, two
    endpoints (web1, web2): from the external host, ten TCP connections and ten UDP
    sockets through each node's node port each stay on the endpoint the first one got
    (1 in 2**9 by chance), and the endpoint sees the entry node's gateway address. Each
    node learns the external client's own address (the SNAT to the gateway comes after
    the endpoint is chosen, flows/nodeport.py), towards the node-port address."""
    ext = netns.exec_argv(nlab.external_ns, [])
    for node in ("node1", "node2"):
        nip, gw = nlab.node(node).node_ip, gateway_ip(nlab, node)
        first = request(ext, [f"{nip}:30087"])[f"{nip}:30087"]
        assert first in (f"web1 {gw}", f"web2 {gw}"), first
        for _ in range(9):
            assert request(ext, [f"{nip}:30087"]) == {f"{nip}:30087": first}
        udp = {request(ext, [f"{nip}:30087u"])[f"{nip}:30087u"] for _ in range(10)}
        assert len(udp) == 1 and next(iter(udp)).startswith("web"), udp
        table = nlab.node(node).ovs.ofctl("-O", "OpenFlow13", "dump-flows", "br-int",
                                          f"table={DEFAULT.id('SessionAffinity')}")
        learned = [ln for ln in table.splitlines()
                   if f"nw_src={EXT_SRC}," in ln and f"nw_dst={NODEPORT_VIP}," in ln]
        assert len([ln for ln in learned if "tp_dst=30087" in ln]) == 2, table  # TCP, UDP
        assert not [ln for ln in table.splitlines()
                    if f"nw_src={gw}," in ln and "tp_dst=30087" in ln], table
        assert all(f"idle_timeout={AFFINITY_TIMEOUT}" in ln for ln in learned), learned


def test_sctp_session_affinity_through_a_node_port(nlab: Lab) -> None:
    """SCTP with sessionAffinity through node1's node port: six associations from the
    external host all reach the endpoint the first one got (1 in 2**5 by chance).

    OVS 3.1's userspace conntrack tracks SCTP by addresses only (no ports), so a
    second association between the same two addresses would follow the first one's
    conntrack entry whatever the affinity. node1's OVS conntrack is flushed before
    each association, so each is new to OVS and meets ServiceLB: what keeps them on
    one endpoint is then the flow node1 learned, whose packet count shows each of the
    five later INITs went through it. It is keyed on node1's gateway address: the node
    masquerades SCTP before OVS (flows/nodeport.py NODE_MASQUERADED)."""
    ovs = nlab.node("node1").ovs
    n1, gw1 = nlab.node("node1").node_ip, gateway_ip(nlab, "node1")
    ext = netns.exec_argv(nlab.external_ns, [])
    got = set()
    for _ in range(6):
        ovs.appctl("dpctl/flush-conntrack")
        got.add(sctp_init(ext, n1, SCTP_AFF_NP))
    assert len(got) == 1 and next(iter(got)) in ("web1 init", "web2 init"), got

    def learned() -> list[str]:
        table = ovs.ofctl("-O", "OpenFlow13", "dump-flows", "br-int",
                          f"table={DEFAULT.id('SessionAffinity')}")
        return [ln for ln in table.splitlines() if f"nw_src={gw1}," in ln
                and f"nw_dst={NODEPORT_VIP}," in ln and f"tp_dst={SCTP_AFF_NP}" in ln]
    assert eventually(lambda: len(learned()) == 1 and int(re.search(  # type: ignore[union-attr]
        r"n_packets=(\d+)", learned()[0]).group(1)) >= 5, timeout=20), learned()
    assert "sctp," in learned()[0] and f"idle_timeout={AFFINITY_TIMEOUT}" in learned()[0]


# One TCP connection (or UDP socket, target suffix u) per target from the source address
# argv[1]: the external host has two, its underlay address and EXTERNAL_IP on its lo.
FROM_SOURCE = r"""
import json, socket, sys
out = []
for t in json.loads(sys.argv[2]):
    ip, port = t.rsplit(":", 1)
    udp = port.endswith("u")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.bind((sys.argv[1], 0)); s.connect((ip, int(port.rstrip("u")))); s.send(b"ping")
        out.append(s.recv(2000).decode())
    except OSError as e:
        out.append(f"ERR {type(e).__name__} {e}")
    s.close()
print(json.dumps(out))
"""


def from_source(lab: Lab, src: str, targets: list[str]) -> list[str]:
    p = subprocess.run(netns.exec_argv(lab.external_ns, [sys.executable, "-c", FROM_SOURCE,
                                                         src, json.dumps(targets)]),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


def test_session_affinity_through_a_node_port_is_per_external_client(nlab: Lab) -> None:
    """Two external clients (the external host's two addresses) through node1's node port
    with sessionAffinity, externalTrafficPolicy Cluster: node1 learns one entry per
    client, keyed on the client's own address (not on node1's gateway address, which
    would make every client entering node1 share one endpoint), each client's ten TCP
    connections and ten UDP sockets stay on its endpoint, and the endpoint sees node1's
    gateway address as the source (the SNAT, after the endpoint was chosen)."""
    n1, gw1 = nlab.node("node1").node_ip, gateway_ip(nlab, "node1")
    ovs = nlab.node("node1").ovs

    def learned(src: str, proto: str) -> list[str]:
        table = ovs.ofctl("-O", "OpenFlow13", "dump-flows", "br-int",
                          f"table={DEFAULT.id('SessionAffinity')}")
        return [ln for ln in table.splitlines() if f"{proto},nw_src={src}," in ln
                and f"nw_dst={NODEPORT_VIP}," in ln and "tp_dst=30087" in ln]

    def one_learned(src: str, proto: str) -> bool:
        return len(learned(src, proto)) == 1
    for src in (EXT_SRC, EXTERNAL_IP):
        for target, proto in ((f"{n1}:30087", "tcp"), (f"{n1}:30087u", "udp")):
            first = from_source(nlab, src, [target])[0]
            assert first in (f"web1 {gw1}", f"web2 {gw1}"), (src, target, first)
            # The learned flow is what keeps the later ones there (one per client).
            assert eventually(functools.partial(one_learned, src, proto), timeout=20), \
                (src, proto)
            got = set(from_source(nlab, src, [target] * 9))
            assert got == {first}, (src, target, first, got)
    table = ovs.ofctl("-O", "OpenFlow13", "dump-flows", "br-int",
                      f"table={DEFAULT.id('SessionAffinity')}")
    assert not [ln for ln in table.splitlines()  # (SCTP is masqueraded by the node)
                if f"nw_src={gw1}," in ln and "tp_dst=30087" in ln], table


def test_network_policy_sees_a_cluster_node_port_as_the_entry_node(nlab: Lab) -> None:
    """A policy on web1 that admits only role=client pods: the external host still
    reaches web1 through node1's node port (web1's own node: the connection is let in
    as the node's own traffic, as when the node masqueraded it to its gateway
    address, which NetworkPolicy always allows), but not through node2's (it arrives
    from node2's gateway address, which the policy does not admit), while a client pod
    still reaches web1 through the ClusterIP."""
    n1, n2, gw1 = nlab.node("node1").node_ip, nlab.node("node2").node_ip, gateway_ip(
        nlab, "node1")
    pol = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web1-clients, namespace: default}
spec:
  podSelector: {matchLabels: {w: "1"}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
"""
    store = nlab.store()
    objs = load(pol)
    for kind, ns, name, body in objs:
        store.put(kind, ns, name, body)
    nlab.wait_realized(timeout=30)
    try:
        ip = {p.name: p.ip for p in nlab.pods()}
        got = request(netns.exec_argv(nlab.external_ns, []), [f"{n1}:30080", f"{n2}:30080"])
        assert got[f"{n1}:30080"] == f"web1 {gw1}", got
        assert got[f"{n2}:30080"].startswith("ERR"), got
        assert replies(nlab, "default/client2", [f"{VIP_NPL}:8080"]) == {
            f"{VIP_NPL}:8080": f"web1 {ip['client2']}"}
    finally:
        for kind, ns, name, _ in objs:
            store.delete(kind, ns, name)
        nlab.wait_realized(timeout=30)
    assert request(netns.exec_argv(nlab.external_ns, []), [f"{n2}:30080"]) == {
        f"{n2}:30080": f"web1 {gateway_ip(nlab, 'node2')}"}


# Endpoint churn through a node port (test_udp_through_a_node_port_moves_off_a_removed...):
# its own Service, servers and label, so the lab's other Services never change.
VIP_NPU, NPU_NP, NPU_UDP, NPU_TCP = "10.96.2.11", 30089, 5300, 7000
NPU = f"""
apiVersion: v1
kind: Service
metadata: {{name: npu, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP_NPU}
  selector: {{u: "1"}}
  ports:
  - {{name: dns, port: {NPU_UDP}, targetPort: {NPU_UDP}, nodePort: {NPU_NP}, protocol: UDP}}
  - {{name: stream, port: {NPU_TCP}, targetPort: {NPU_TCP}, nodePort: {NPU_NP}}}
"""
# A UDP server answering "<name> <source address> <source port>".
PEER_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2000); s.sendto(f"{sys.argv[1]} {a[0]} {a[1]}".encode(), a)
"""
# One UDP socket (one source port, one conntrack "connection") kept open: prints its
# port, then for each line on stdin sends a datagram and prints the reply or "ERR ...".
UDP_SESSION = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.bind((sys.argv[1], 0)); s.connect((sys.argv[2], int(sys.argv[3])))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    try:
        s.send(b"x"); print(s.recv(2000).decode(), flush=True)
    except OSError as e:
        print(f"ERR {type(e).__name__}", flush=True)
"""


class UDPSession:
    """UDP_SESSION in the external host's namespace."""

    def __init__(self, lab: Lab, src: str, ip: str, port: int) -> None:
        self.p = subprocess.Popen(netns.exec_argv(lab.external_ns, [
            sys.executable, "-c", UDP_SESSION, src, ip, str(port)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdin is not None and self.p.stdout is not None
        self.stdin, self.stdout = self.p.stdin, self.p.stdout
        self.port = int(self.stdout.readline())

    def send(self) -> str:
        self.stdin.write("x\n")
        self.stdin.flush()
        return self.stdout.readline().strip()

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def snat_entries(lab: Lab, node: str) -> list[str]:
    """The node's SNAT zone entries, as OVS dumps them."""
    return [ln for ln in lab.node(node).ovs.appctl(
        "dpctl/dump-conntrack", f"zone={F.SNAT_ZONE}").splitlines() if ln.startswith("udp")]


def test_udp_through_a_node_port_moves_off_a_removed_endpoint(nlab: Lab) -> None:
    """An external client's UDP "connection" (one socket, one source port) through
    node1's node port (externalTrafficPolicy Cluster: SNATed in OVS to node1's gateway
    address, from a source port of snat_port_range, clear of the node's ephemeral range) and
    a TCP stream through the same node port to the other endpoint. The UDP endpoint
    leaves the Service: the client's next datagram goes to the surviving endpoint, and
    node1 holds no entry of that client to the removed endpoint in either conntrack
    zone (before, the SNAT zone's stayed until it expired, mapping the removed
    endpoint's replies to the client); the stream is neither reset nor short of a
    byte. Then the survivor leaves too: the client gets a port unreachable, and its
    SNAT entry to it is gone as well."""
    n1, gw1 = nlab.node("node1").node_ip, gateway_ip(nlab, "node1")
    ip = {p.name: p.ip for p in nlab.pods()}
    labels = {n: dict(nlab.pod(f"default/{n}").labels) for n in ("web1", "web2")}
    store = nlab.store()
    procs: list[subprocess.Popen[str]] = []
    session: UDPSession | None = None
    stream: Stream | None = None
    try:
        for n in ("web1", "web2"):
            nlab.set_labels(f"default/{n}", {**labels[n], "u": "1"})
            p = subprocess.Popen(nlab.exec_argv(f"default/{n}", [
                sys.executable, "-c", PEER_SERVER, n, str(NPU_UDP)]),
                stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            procs.append(start_stream_server(nlab.exec_argv(f"default/{n}", []), n, NPU_TCP))
        for kind, ns, name, body in load(NPU):
            store.put(kind, ns, name, body)
        nlab.wait_realized(timeout=30)
        session = UDPSession(nlab, EXT_SRC, n1, NPU_NP)
        first = session.send().split()
        assert len(first) == 3 and first[0] in ("web1", "web2") and first[1] == gw1, first
        gone = first[0]
        survivor = "web2" if gone == "web1" else "web1"
        # The endpoint sees a source port from the SNAT's range (not the node's own).
        ephemeral = subprocess.run(netns.exec_argv(nlab.node("node1").netns, [
            "cat", "/proc/sys/net/ipv4/ip_local_port_range"]), capture_output=True,
            text=True, check=True).stdout.split()
        snat = snat_port_range((int(ephemeral[0]), int(ephemeral[1])),
                               store.cluster().node_ports)
        assert snat is not None and snat[0] <= int(first[2]) <= snat[1], (first, snat)
        assert not int(ephemeral[0]) <= int(first[2]) <= int(ephemeral[1]), first
        for _ in range(20):  # a stream that the select group gave to the survivor
            stream = Stream(netns.exec_argv(nlab.external_ns, []), n1, NPU_NP, 10)
            if stream.serving == survivor:
                break
            stream.p.kill()
            stream.p.wait()
            stream = None
        assert stream is not None, "no TCP stream landed on the surviving endpoint"

        def mine(entries: list[str], endpoint: str) -> list[str]:
            return [e for e in entries if f"src={EXT_SRC},dst={ip[endpoint]},sport="
                    f"{session.port if session else 0}," in e]
        assert mine(snat_entries(nlab, "node1"), gone), snat_entries(nlab, "node1")
        nlab.set_labels(f"default/{gone}", labels[gone])
        nlab.wait_realized(timeout=30)
        assert eventually(lambda: session is not None
                          and session.send().startswith(f"{survivor} {gw1} "), timeout=20)
        entries = snat_entries(nlab, "node1")
        assert not mine(entries, gone), entries
        assert mine(entries, survivor), entries  # control: the client's new entry is seen
        r = stream.result()
        assert r["got"] == r["sent"] and r["name"] == survivor, r
        stream = None
        nlab.set_labels(f"default/{survivor}", labels[survivor])
        nlab.wait_realized(timeout=30)
        assert eventually(lambda: session is not None
                          and session.send() == "ERR ConnectionRefusedError", timeout=20)
        entries = snat_entries(nlab, "node1")
        assert not mine(entries, survivor) and not mine(entries, gone), entries
    finally:
        if session is not None:
            session.close()
        if stream is not None:
            stream.p.kill()
            stream.p.wait()
        for kind, ns, name, _ in load(NPU, identity_only=True):
            store.delete(kind, ns, name)
        for n in ("web1", "web2"):
            nlab.set_labels(f"default/{n}", labels[n])
        for p in procs:
            p.kill()
            p.wait()
        nlab.wait_realized(timeout=30)


HEALTH_GET = r"""
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(json.dumps([r.status, json.loads(r.read())]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, json.loads(e.read())]))
"""


def test_health_check_node_port(nlab: Lab) -> None:
    """LoadBalancer + externalTrafficPolicy Local: the external host asks each node on the
    healthCheckNodePort; node1 (web1 is there) answers 200 with one local endpoint,
    node2 (none) 503, as kube-proxy does; the node port itself reaches web1 from node1."""
    def ask(node: str) -> list[Any]:
        url = f"http://{nlab.node(node).node_ip}:{HEALTH_PORT}/healthz"
        out = subprocess.run(netns.exec_argv(nlab.external_ns, [
            sys.executable, "-c", HEALTH_GET, url]), capture_output=True, text=True,
            timeout=30)
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))
    svc = {"namespace": "default", "name": "hc"}
    assert ask("node1") == [200, {"service": svc, "localEndpoints": 1,
                                  "serviceProxyHealthy": True}]
    assert ask("node2") == [503, {"service": svc, "localEndpoints": 0,
                                  "serviceProxyHealthy": True}]
    n1 = nlab.node("node1").node_ip
    assert request(netns.exec_argv(nlab.external_ns, []), [f"{n1}:30084"]) == {
        f"{n1}:30084": f"web1 {EXT_SRC}"}


def _learned(lab: Lab, client_ip: str) -> list[str]:
    table = lab.node("node1").ovs.ofctl("-O", "OpenFlow13", "dump-flows", "br-int",
                                        f"table={DEFAULT.id('SessionAffinity')}")
    return [ln for ln in table.splitlines()
            if f"nw_src={client_ip}" in ln and f"nw_dst={VIP_AFF}" in ln]


def test_session_affinity_survives_an_agent_restart(nlab: Lab) -> None:
    """One connection of client1 before node1's agent is SIGKILLed and restarted (a new
    round), ten after it: all on the same endpoint (1 in 1024 by chance with two), and
    the flows OVS learned before the restart are still there (cookie 0) while the
    agent's own flows now carry the new round."""
    ip = {p.name: p.ip for p in nlab.pods()}
    first = replies(nlab, "default/client1", [f"{VIP_AFF}:8080"])[f"{VIP_AFF}:8080"]
    assert first in (f"web1 {ip['client1']}", f"web2 {ip['client1']}"), first
    before = _learned(nlab, ip["client1"])
    assert len(before) >= 1 and all("cookie=0x0," in ln for ln in before), before
    ovs = nlab.node("node1").ovs
    old_round = ovs.vsctl("get", "Bridge", "br-int", "external_ids:flowcni-round")
    nlab.restart_agent("node1")
    assert ovs.vsctl("get", "Bridge", "br-int", "external_ids:flowcni-round") != old_round
    after = _learned(nlab, ip["client1"])
    assert {ln.split("actions=")[1] for ln in after} >= {
        ln.split("actions=")[1] for ln in before}, (before, after)
    for _ in range(10):
        assert replies(nlab, "default/client1", [f"{VIP_AFF}:8080"]) == {
            f"{VIP_AFF}:8080": first}


def test_flowctl_services_shows_node_ports_policies_and_affinity(
        nlab: Lab, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`flowctl services` on node1: node ports, external and LoadBalancer IPs, traffic
    policies (with the Local group apart from the ClusterIP's) and the affinity timeout."""
    from flowcni.ctl.flowctl import main as flowctl
    monkeypatch.setenv("FLOWCNI_LAB_DIR", nlab.base)
    monkeypatch.setenv("FLOWCNI_LAB_PREFIX", nlab.prefix)
    assert flowctl(["services", "--node", "node1", "--json"]) == 0
    rows = {(r["service"], r["port"]): r for r in json.loads(capsys.readouterr().out)}
    etl = rows[("default/etl", "8080/TCP")]
    assert (etl["type"], etl["nodePort"], etl["trafficPolicy"]) == (
        "NodePort", 30082, "ext=Local,int=Cluster")
    assert etl["externalGroup"] not in (None, etl["group"]) and len(etl["endpoints"]) == 2
    assert rows[("default/np", "53/UDP")]["external"] == [EXT_IP]
    assert rows[("default/lb", "8080/TCP")]["external"] == [LB_IP]
    assert rows[("default/itl", "8080/TCP")]["trafficPolicy"] == "ext=Cluster,int=Local"
    assert rows[("default/aff", "8080/TCP")]["affinity"] == AFFINITY_TIMEOUT
    assert flowctl(["services", "default/etl", "--node", "node1"]) == 0
    out = capsys.readouterr().out
    assert "NODEPORT" in out and "30082" in out and "ext=Local,int=Cluster" in out, out


def test_agent_restart_keeps_node_ports_and_routes(nlab: Lab) -> None:
    """SIGKILL node1's agent: while it is down and after it is back, the external host
    still reaches node1's node ports and node1's stack its ClusterIPs; the node's rules
    and routes after the restart are the ones before it."""
    def node1(*argv: str) -> str:
        return subprocess.run(netns.exec_argv(nlab.node("node1").netns, list(argv)),
                              capture_output=True, text=True, check=True).stdout
    n1, gw1 = nlab.node("node1").node_ip, gateway_ip(nlab, "node1")
    want = {f"{n1}:30081": f"web2 {gw1}", f"{n1}:30080": f"web1 {gw1}"}
    rules, routes = node1("nft", "list", "table", "ip", "flowcni-proxy"), node1(
        "ip", "route", "show", "proto", "192")
    node = nlab.node("node1")
    os.kill(node.agent_pid, signal.SIGKILL)
    assert request(netns.exec_argv(nlab.external_ns, []), list(want)) == want
    nlab.restart_agent("node1")
    assert request(netns.exec_argv(nlab.external_ns, []), list(want)) == want
    assert request(node_argv(nlab, "node1"), [f"{VIP_NP}:8080"]) == {
        f"{VIP_NP}:8080": f"web2 {gw1}"}
    assert node1("nft", "list", "table", "ip", "flowcni-proxy") == rules
    assert node1("ip", "route", "show", "proto", "192") == routes

def test_deleted_service_leaves_no_node_rules_or_routes(nlab: Lab) -> None:
    """Deleting a Service takes its node port out of the node's nftables table and its
    ClusterIP and LoadBalancer IP routes off the gateway, while another Service's
    stay (runs last: it removes the lb Service)."""
    def node1(*argv: str) -> str:
        return subprocess.run(netns.exec_argv(nlab.node("node1").netns, list(argv)),
                              capture_output=True, text=True, check=True).stdout
    before = node1("ip", "route", "show", "proto", "192")
    assert VIP_LB in before and LB_IP in before and VIP_NP in before, before
    assert "dport 30083" in node1("nft", "list", "table", "ip", "flowcni-proxy")
    store = nlab.store()
    for kind, ns, name, _ in load(SERVICES, identity_only=True):
        if name == "lb":
            store.delete(kind, ns, name)
    nlab.wait_realized(timeout=30)
    after = node1("ip", "route", "show", "proto", "192")
    assert VIP_LB not in after and LB_IP not in after and VIP_NP in after, after
    rules = node1("nft", "list", "table", "ip", "flowcni-proxy")
    assert "dport 30083" not in rules and "dport 30081" in rules, rules
