"""A node's host network reaches pods on every node, in every encapsulation and routed mode.

The upstream e2e "Networking Granular Checks: Pods should function for
node-pod communication" cases (HTTP over TCP and UDP, to pods on the same
node and on other nodes) with real packets: the client is a hostNetwork
process, i.e. a process in the node's own network namespace with no pod
netns, on each lab node, and the servers answer like the e2e netexec image
(/hostName, /clientip, and a datagram "hostName" answered with the pod name).

Source addresses (see flows/tunnel.py and controller/peers.py): in the
encapsulating modes the node reaches every pod from its gateway address (its
cluster-CIDR route through flowcni-gw0 picks it), in routed mode remote pods
see the node IP (the route to a peer's pod CIDR goes via that peer over the
underlay). NetworkPolicy: a node's own host traffic to its local pods is
always allowed; other nodes' host traffic meets ipBlock rules like any other
source. One 2-node lab per mode serves every test of that mode.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flowcni.lab import netns
from flowcni.lab.lab import EXTERNAL_IP, Lab, Node

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually

ENCAPS = ["geneve", "vxlan", "gre", "none"]
HTTP_PORT, UDP_PORT = 8083, 8081  # the e2e netexec ports

# netexec-like server: GET /hostName -> pod name, GET /clientip -> "ip:port",
# POST /upload -> bytes received; UDP "hostName" -> pod name, "clientip" -> ip.
SERVER = r"""
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, hport, uport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class H(BaseHTTPRequestHandler):
    def _send(self, body):
        b = body.encode(); self.send_response(200)
        self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def do_GET(self):
        if self.path == "/clientip":
            self._send("%s:%d" % self.client_address)
        else:
            self._send(name)
    def do_POST(self):
        n = int(self.headers["Content-Length"]); got = 0
        while got < n:
            got += len(self.rfile.read(min(65536, n - got)))
        self._send(str(got))
    def log_message(self, *a):
        pass
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", uport))
    while True:
        d, a = s.recvfrom(100)
        s.sendto((a[0] if d.strip() == b"clientip" else name).encode(), a)
threading.Thread(target=udp, daemon=True).start()
srv = ThreadingHTTPServer(("0.0.0.0", hport), H)
print("ready", flush=True)
srv.serve_forever()
"""

# One request: http GET PATH, http POST of N bytes, or a udp datagram; prints the answer.
CLIENT = r"""
import http.client, socket, sys
kind, ip, port, arg, src, timeout = sys.argv[1:7]
port, timeout = int(port), float(timeout)
if kind == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
    s.bind((src, 0)); s.sendto(arg.encode(), (ip, port))
    print(s.recvfrom(200)[0].decode())
else:
    c = http.client.HTTPConnection(ip, port, timeout=timeout,
                                   source_address=(src, 0) if src else None)
    if kind == "post":
        c.request("POST", "/upload", body=b"x" * int(arg))
    else:
        c.request("GET", arg)
    print(c.getresponse().read().decode())
"""


def request(ns: str, kind: str, ip: str, arg: str, src: str = "",
            timeout: float = 2.0, port: int = 0) -> str | None:
    """One request from a process in netns `ns`; the answer, or None if there was none."""
    port = port or (UDP_PORT if kind == "udp" else HTTP_PORT)
    p = subprocess.run(netns.exec_argv(ns, [sys.executable, "-c", CLIENT, kind, ip, str(port),
                                            arg, src, str(timeout)]),
                       capture_output=True, text=True, timeout=timeout + 20)
    return p.stdout.strip() if p.returncode == 0 else None


def answer(ns: str, kind: str, ip: str, arg: str, src: str = "",
           port: int = 0) -> str | None:
    """The answer once there is one (the first packets to a peer may wait for its ARP)."""
    got: list[str | None] = [None]

    def once() -> bool:
        got[0] = request(ns, kind, ip, arg, src, port=port)
        return got[0] is not None

    eventually(once, timeout=15, interval=0.5)
    return got[0]


@pytest.fixture(scope="module", params=ENCAPS)
def nlab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """Two nodes; a server pod on each (w1, w2) and a client pod on node1 (c1)."""
    encap = request.param
    pods = [("w1", "node1", {"app": "web"}), ("w2", "node2", {"app": "web"}),
            ("c1", "node1", {"app": "client"})]
    with running_lab(f"h{encap[:3]}", nodes=2, encap=encap, pods=pods) as lab:
        lab.encap = encap  # type: ignore[attr-defined]
        servers = []
        try:
            for w in ("w1", "w2"):
                p = subprocess.Popen(lab.exec_argv(w, [sys.executable, "-c", SERVER, w,
                                                       str(HTTP_PORT), str(UDP_PORT)]),
                                     stdout=subprocess.PIPE, text=True)
                servers.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            yield lab
        finally:
            for p in servers:
                p.kill()
                p.wait()


def gateway_ip(node: Node) -> str:
    """The first address of the node's pod CIDR (where flowcni-gw0 lives)."""
    net, _ = node.pod_cidr.split("/")
    a, b, c, d = (int(x) for x in net.split("."))
    return f"{a}.{b}.{c}.{d + 1}"


def host_source(lab: Lab, node: Node, pod_node: str) -> str:
    """The address a pod on `pod_node` sees the host network of `node` come from."""
    routed_remote = lab.encap == "none" and pod_node != node.name  # type: ignore[attr-defined]
    return node.node_ip if routed_remote else gateway_ip(node)


def test_node_to_pod_http_and_udp_same_and_other_node(nlab: Lab) -> None:
    """e2e node-pod: each node's host network reaches each server pod over HTTP and UDP,
    and the pod sees the source address this mode promises."""
    failed = []
    for node in nlab.nodes():
        for w in ("w1", "w2"):
            pod = nlab.pod(w)
            case = f"{node.name} -> {w} ({pod.node})"
            if answer(node.netns, "http", pod.ip, "/hostName") != w:
                failed.append(f"{case}: http")
            if answer(node.netns, "udp", pod.ip, "hostName") != w:
                failed.append(f"{case}: udp")
            seen = answer(node.netns, "http", pod.ip, "/clientip")
            want = host_source(nlab, node, pod.node)
            if seen is None or seen.split(":")[0] != want:
                failed.append(f"{case}: pod saw {seen}, want {want}")
            if answer(node.netns, "udp", pod.ip, "clientip") != want:
                failed.append(f"{case}: udp source not {want}")
    assert failed == []


def test_node_uploads_to_remote_pod(nlab: Lab) -> None:
    """A megabyte from the node's stack to a pod on the other node: full-size TCP
    segments through flowcni-gw0 (the tunnel drops them if gw0 keeps tx offload on)."""
    n = 1_000_000
    for node, w in (("node1", "w2"), ("node2", "w1")):
        assert answer(nlab.node(node).netns, "post", nlab.pod(w).ip, str(n)) == str(n), node


def test_gateway_tx_offload_follows_the_encapsulation(nlab: Lab) -> None:
    for node in nlab.nodes():
        out = subprocess.run(["ip", "netns", "exec", node.netns, "ethtool", "-k",
                              "flowcni-gw0"], capture_output=True, text=True).stdout
        state = "on" if nlab.encap == "none" else "off"  # type: ignore[attr-defined]
        assert f"tx-checksumming: {state}" in out, (node.name, out)


def supported_sources(lab: Lab, node: Node, pod_node: str) -> list[str]:
    """Source addresses a hostNetwork socket of `node` may bind to reach a pod on `pod_node`.

    Local pods: the gateway and the node IP (both local addresses behind the
    gateway port). Remote pods, routed mode: both too (every pod CIDR is routed
    over the underlay, and so are replies). Remote pods, encapsulated: the
    gateway address only; a reply to a node IP would leave the pod's node
    through its own stack, not the tunnel.
    """
    if pod_node == node.name or lab.encap == "none":  # type: ignore[attr-defined]
        return [gateway_ip(node), node.node_ip]
    return [gateway_ip(node)]


def test_node_binds_each_supported_source(nlab: Lab) -> None:
    """A hostNetwork process bound to each supported source address reaches the pod,
    which sees that address."""
    failed = []
    for node in nlab.nodes():
        for w in ("w1", "w2"):
            pod = nlab.pod(w)
            for src in supported_sources(nlab, node, pod.node):
                seen = answer(node.netns, "http", pod.ip, "/clientip", src=src)
                if seen is None or seen.split(":")[0] != src:
                    failed.append(f"{node.name} from {src} -> {w}: pod saw {seen}")
    assert failed == []


NODE_PORT = 30083


def test_nodeport_snat_to_the_node_with_the_endpoint_elsewhere(nlab: Lab) -> None:
    """kube-proxy style NodePort, externalTrafficPolicy Cluster: the external host calls
    node1's IP, node1's stack DNATs to w2 on node2 and masquerades to itself; the
    endpoint's replies must come back to node1's stack (else conntrack stays UNREPLIED)."""
    n1 = nlab.node("node1")
    w2 = nlab.pod("w2").ip
    rules = f"""table ip fcb-kproxy {{
  chain pre {{ type nat hook prerouting priority -100;
    ip daddr {n1.node_ip} tcp dport {NODE_PORT} dnat to {w2}:{HTTP_PORT}; }}
  chain post {{ type nat hook postrouting priority 100; ct status dnat masquerade; }}
}}
"""
    subprocess.run(netns.exec_argv(n1.netns, ["nft", "-f", "-"]), input=rules, text=True,
                   check=True)
    try:
        seen = answer(nlab.external_ns, "http", n1.node_ip, "/clientip", port=NODE_PORT)
        assert seen is not None, "no answer through the NodePort"
        assert seen.split(":")[0] == host_source(nlab, n1, "node2"), seen
        assert answer(nlab.external_ns, "http", n1.node_ip, "/hostName",
                      port=NODE_PORT) == "w2"
    finally:
        subprocess.run(netns.exec_argv(n1.netns, ["nft", "delete", "table", "ip",
                                                  "fcb-kproxy"]), check=False)


# -- NetworkPolicy -------------------------------------------------------------------------

def ingress_from_ipblock(cidr: str) -> dict[str, Any]:
    """NetworkPolicy `web` on the app=web pods: ingress only from `cidr` on the HTTP port."""
    return {"namespace": "default", "name": "web", "spec": {
        "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}],
                     "ports": [{"protocol": "TCP", "port": HTTP_PORT}]}]}}


def at_once(probes: dict[str, tuple[str, str]]) -> dict[str, bool]:
    """Run HTTP probes {label: (netns, pod ip)} at the same time; {label: answered}."""
    with ThreadPoolExecutor(len(probes)) as ex:
        futs = {k: ex.submit(request, ns, "http", ip, "/hostName", "", 1.5)
                for k, (ns, ip) in probes.items()}
        return {k: f.result() is not None for k, f in futs.items()}


def denied_while_allowed(lab: Lab, deny: dict[str, tuple[str, str]],
                         allow: dict[str, tuple[str, str]]) -> dict[str, bool]:
    """Probe both sets together until every allowed probe answers (a cold tunnel
    neighbour may lose a first packet) and no denied one does; the last round.

    A denied probe that gets through ends the rounds at once: it is a wrong cell,
    never retried (the agent's datapath-cache guard must have made it right).
    """
    got: dict[str, bool] = {}
    for _ in range(5):
        got = at_once({**deny, **allow})
        if any(got[k] for k in deny) or all(got[k] for k in allow):
            break
    return got


@pytest.fixture
def policy(nlab: Lab) -> Iterator[Any]:
    store = nlab.store()

    def put(body: dict[str, Any]) -> None:
        store.put("NetworkPolicy", "default", "web", body)
        nlab.wait_realized()

    try:
        yield put
    finally:
        store.delete("NetworkPolicy", "default", "web")
        nlab.wait_realized()


def test_other_nodes_host_network_meets_ipblock_rules(nlab: Lab, policy: Any) -> None:
    """w2 (node2) admits only node1's host address: node1's host gets in, the pod c1 on
    node1 does not, and node2's own host (kubelet probes) always does."""
    n1, n2 = nlab.node("node1"), nlab.node("node2")
    w2 = nlab.pod("w2").ip
    policy(ingress_from_ipblock(f"{host_source(nlab, n1, 'node2')}/32"))
    c1 = nlab.pod("c1").netns
    got = denied_while_allowed(nlab, {"pod c1 -> w2": (c1, w2)},
                               {"node1 host -> w2": (n1.netns, w2),
                                "node2 host -> w2": (n2.netns, w2)})
    assert got == {"pod c1 -> w2": False, "node1 host -> w2": True,
                   "node2 host -> w2": True}


def test_other_nodes_host_network_is_denied_outside_the_ipblock(nlab: Lab,
                                                                 policy: Any) -> None:
    """With an ipBlock that holds neither node, node1's host is refused by w2 while
    node2's host reaches w2 and node1's host still reaches its own pod w1."""
    n1, n2 = nlab.node("node1"), nlab.node("node2")
    policy(ingress_from_ipblock(f"{EXTERNAL_IP}/32"))
    got = denied_while_allowed(nlab, {"node1 host -> w2": (n1.netns, nlab.pod("w2").ip)},
                               {"node2 host -> w2": (n2.netns, nlab.pod("w2").ip),
                                "node1 host -> w1": (n1.netns, nlab.pod("w1").ip)})
    assert got == {"node1 host -> w2": False, "node2 host -> w2": True,
                   "node1 host -> w1": True}
