"""Tenant networks on a 3-node lab: two tenants with the same subnet, real packets.

blue and red both use 10.50.0.0/16, so their first pods on a node get the
same address: blue/a and red/a are both 10.50.1.2 on node1, blue/b and red/b
both 10.50.2.2 on node2. Every server answers with its own name, so a probe
shows which pod it reached, not only that something answered. A deny is
always shown next to an allowed probe from the same source, run at the same
time. The underlay capture shows each tenant's VNI in the Geneve header.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flowcni.ctl import flowctl
from flowcni.ctl.client import AgentClient
from flowcni.ctl.trace import Tracer
from flowcni.datastore.manifests import load
from flowcni.datastore.tenantconv import for_update
from flowcni.flows.tables import DEFAULT
from flowcni.lab import netns
from flowcni.lab.lab import EXTERNAL_IP, Lab

from tests.datapath.conftest import make_lab
from tests.support.probe import Capture, eventually, ping
from tests.support.svc import endpoint_slice

BLUE_VNI, RED_VNI = 101, 202

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: blue, labels: {tenant: blue}}
---
apiVersion: v1
kind: Namespace
metadata: {name: red, labels: {tenant: red}}
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: blue}
spec:
  namespaceSelector: {matchLabels: {tenant: blue}}
  subnets: [10.50.0.0/16]
  vni: 101
  egress: {masquerade: true}
  connectTo: [green]
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: red}
spec:
  namespaceSelector: {matchLabels: {tenant: red}}
  subnets: [10.50.0.0/16]
  vni: 202
  egress: {masquerade: true}
---
apiVersion: v1
kind: Namespace
metadata: {name: green, labels: {tenant: green}}
---
apiVersion: v1
kind: Namespace
metadata: {name: yellow, labels: {tenant: yellow}}
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: green}
spec:
  namespaceSelector: {matchLabels: {tenant: green}}
  subnets: [10.60.0.0/16]
  connectTo: [blue]
---
apiVersion: flowcni.io/v1alpha1
kind: TenantNetwork
metadata: {name: yellow}
spec:
  namespaceSelector: {matchLabels: {tenant: yellow}}
  subnets: [10.70.0.0/16]
  connectTo: [blue]
"""

# pod ref -> node; order matters: the first pod of a tenant on a node gets .2
PODS = [("blue/a", "node1"), ("red/a", "node1"), ("blue/b", "node2"), ("red/b", "node2"),
        ("red/c", "node3"), ("red/d", "node1"), ("default/d", "node1"),
        ("default/e", "node2"), ("green/g", "node1"), ("green/h", "node2"),
        ("yellow/y", "node1"), ("blue/c", "node3"), ("yellow/z", "node2")]

SERVER = r"""
import socket, sys, threading
name = sys.argv[1].encode()
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 80)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(name); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53))
    while True:
        d, a = s.recvfrom(100); s.sendto(name, a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

PROBER = r"""
import json, socket, subprocess, sys, threading
targets = json.loads(sys.argv[1]); out = {}
def probe(ip, kind):
    try:
        if kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
            s.sendto(b"who", (ip, 53)); out[f"{ip}/{kind}"] = s.recvfrom(100)[0].decode()
        elif kind == "tcp":
            s = socket.create_connection((ip, 80), timeout=3)
            out[f"{ip}/{kind}"] = s.recv(100).decode(); s.close()
        else:
            p = subprocess.run(["ping", "-n", "-c", "1", "-W", "3", ip], capture_output=True)
            out[f"{ip}/{kind}"] = "icmp" if p.returncode == 0 else None
    except OSError:
        out[f"{ip}/{kind}"] = None
ts = [threading.Thread(target=probe, args=(ip, k))
      for ip in targets for k in ("tcp", "udp", "icmp")]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def probe_all(lab: Lab, plan: dict[str, list[str]]) -> dict[str, dict[str, str | None]]:
    """From each source pod, TCP, UDP and ICMP to each IP, all at the same time."""
    procs = {src: subprocess.Popen(lab.exec_argv(src, [sys.executable, "-c", PROBER,
                                                       json.dumps(ips)]),
                                   stdout=subprocess.PIPE, text=True)
             for src, ips in plan.items()}
    return {src: json.loads(p.communicate(timeout=60)[0]) for src, p in procs.items()}


def reached(res: dict[str, str | None], ip: str) -> tuple[str | None, str | None, str | None]:
    return res[f"{ip}/tcp"], res[f"{ip}/udp"], res[f"{ip}/icmp"]


@pytest.fixture(scope="module")
def tlab() -> Iterator[Lab]:
    lab = make_lab("tn")
    lab.down()
    servers: list[subprocess.Popen[str]] = []
    try:
        lab.up(nodes=3, encap="geneve")
        store = lab.store()
        for kind, ns, name, body in load(MANIFEST):
            if kind == "TenantNetwork":
                body = for_update(store.get(kind, ns, name), body, name)
            store.put(kind, ns, name, body)
        lab.wait_realized()
        for ref, node in PODS:
            ns, name = ref.split("/")
            lab.pod_add(name, node, namespace=ns)
        for ref, _ in PODS:
            p = subprocess.Popen(lab.exec_argv(ref, [sys.executable, "-c", SERVER, ref]),
                                 stdout=subprocess.PIPE, text=True)
            servers.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        lab.wait_realized()
        yield lab
    finally:
        for p in servers:
            p.kill()
            p.wait()
        lab.down()


def test_same_subnet_same_addresses(tlab: Lab) -> None:
    ip = {ref: tlab.pod(ref).ip for ref, _ in PODS}
    assert ip["blue/a"] == ip["red/a"] == "10.50.1.2"
    assert ip["blue/b"] == ip["red/b"] == "10.50.2.2"
    assert ip["red/c"] == "10.50.3.2" and ip["red/d"] == "10.50.1.3"
    assert ip["default/d"].startswith("10.244.1.")


def test_each_tenant_reaches_its_own_and_not_the_other(tlab: Lab) -> None:
    ip = {ref: tlab.pod(ref).ip for ref, _ in PODS}
    res = probe_all(tlab, {
        "blue/a": ["10.50.2.2", "10.50.3.2", "10.50.1.3", ip["default/d"], ip["default/e"]],
        "red/a": ["10.50.2.2", "10.50.3.2", "10.50.1.3"],
        "blue/b": ["10.50.1.2"],
        "red/b": ["10.50.1.2"],
        "default/d": [ip["default/e"]],
    })
    # the same address answers as each source's own tenant's pod (cross-node)
    assert reached(res["blue/a"], "10.50.2.2") == ("blue/b", "blue/b", "icmp")
    assert reached(res["red/a"], "10.50.2.2") == ("red/b", "red/b", "icmp")
    assert reached(res["blue/b"], "10.50.1.2") == ("blue/a", "blue/a", "icmp")
    assert reached(res["red/b"], "10.50.1.2") == ("red/a", "red/a", "icmp")
    # node3: 10.50.3.2 is red/c and blue/c, each answering its own tenant
    assert reached(res["red/a"], "10.50.3.2") == ("red/c", "red/c", "icmp")
    assert reached(res["blue/a"], "10.50.3.2") == ("blue/c", "blue/c", "icmp")
    # red/d (same node as blue/a) is out of blue's reach, at the same moment as blue's
    # allowed probes above
    assert reached(res["red/a"], "10.50.1.3") == ("red/d", "red/d", "icmp")
    assert reached(res["blue/a"], "10.50.1.3") == (None, None, None)
    # so is the default network, which keeps working for its own pods
    assert reached(res["blue/a"], ip["default/d"]) == (None, None, None)
    assert reached(res["blue/a"], ip["default/e"]) == (None, None, None)
    assert reached(res["default/d"], ip["default/e"]) == ("default/e", "default/e", "icmp")


EXT_SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64)
print("ready", flush=True)
while True:
    c, a = s.accept(); c.sendall(f"{a[0]}:{a[1]}".encode()); c.close()
"""

EXT_CLIENT = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 41000)); s.settimeout(5)
try:
    s.connect((sys.argv[1], 8080)); print(s.recv(100).decode())
except OSError as e:
    print(f"failed: {e}")
"""


def test_masquerade_with_identical_sources(tlab: Lab) -> None:
    """blue/a and red/a (both 10.50.1.2, both from port 41000) reach the external host
    at the same time; each gets its own answer, from the node's address."""
    ext = subprocess.Popen(netns.exec_argv(tlab.external_ns, [sys.executable, "-c",
                                                              EXT_SERVER]),
                           stdout=subprocess.PIPE, text=True)
    try:
        assert ext.stdout is not None and ext.stdout.readline().strip() == "ready"
        procs = {ref: subprocess.Popen(tlab.exec_argv(ref, [sys.executable, "-c", EXT_CLIENT,
                                                            EXTERNAL_IP]),
                                       stdout=subprocess.PIPE, text=True)
                 for ref in ("blue/a", "red/a", "default/d")}
        seen = {ref: p.communicate(timeout=30)[0].strip() for ref, p in procs.items()}
    finally:
        ext.kill()
        ext.wait()
    node_ip = tlab.node("node1").node_ip
    for ref, answer in seen.items():
        assert answer.startswith(f"{node_ip}:"), (ref, answer)
    # three connections, three distinct translated source ports
    assert len(set(seen.values())) == 3, seen
    egress = {t["name"]: t["egress_ip"] for t in AgentClient(
        tlab.node("node1").api_socket).call("tenants")["tenants"]}
    assert egress["blue"] != egress["red"] and egress["blue"].startswith("10.244.1.")


def test_connect_to_opens_exactly_the_agreed_pair(tlab: Lab) -> None:
    """blue and green list each other: they reach each other's pods (same node and across,
    both ways). yellow lists blue, blue does not list yellow: nothing between them. red
    lists nobody: green is out of its reach. All probes at once."""
    res = probe_all(tlab, {
        "blue/a": ["10.60.1.2", "10.60.2.2", "10.70.1.2"],
        "green/h": ["10.50.1.2", "10.50.2.2"],
        "yellow/y": ["10.50.1.2", "10.50.2.2", "10.70.2.2"],
        "red/a": ["10.60.1.2", "10.60.2.2", "10.50.2.2"],
    })
    # the controls: each source that is denied somewhere reaches its own tenant meanwhile
    assert reached(res["yellow/y"], "10.70.2.2") == ("yellow/z", "yellow/z", "icmp")
    assert reached(res["red/a"], "10.50.2.2") == ("red/b", "red/b", "icmp")
    assert reached(res["blue/a"], "10.60.1.2") == ("green/g", "green/g", "icmp")
    assert reached(res["blue/a"], "10.60.2.2") == ("green/h", "green/h", "icmp")
    # 10.50.1.2 is blue/a and red/a: green, connected to blue only, reaches blue's
    assert reached(res["green/h"], "10.50.1.2") == ("blue/a", "blue/a", "icmp")
    assert reached(res["green/h"], "10.50.2.2") == ("blue/b", "blue/b", "icmp")
    assert reached(res["blue/a"], "10.70.1.2") == (None, None, None)
    assert reached(res["yellow/y"], "10.50.1.2") == (None, None, None)
    assert reached(res["yellow/y"], "10.50.2.2") == (None, None, None)
    assert reached(res["red/a"], "10.60.1.2") == (None, None, None)
    assert reached(res["red/a"], "10.60.2.2") == (None, None, None)
    t = {x["name"]: x for x in AgentClient(tlab.node("node1").api_socket).call(
        "tenants")["tenants"]}
    assert t["blue"]["connected"] == ["green"] and t["yellow"]["connected"] == []
    assert any(c["type"] == "ConnectRefused" and c["message"].startswith("spec.connectTo[0]")
               for c in t["yellow"]["conditions"])


POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: blue}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.50.1.2/32}}]
"""


GREEN_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-blue-b, namespace: green}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.50.2.2/32}}]
"""


def test_connect_to_meets_the_destination_tenants_policy(tlab: Lab) -> None:
    """green admits only 10.50.2.2 (blue/b): from blue, blue/b gets to green/h (same
    node) and green/g (across), blue/a to neither, all probes at once."""
    store = tlab.store()
    [(kind, ns, name, body)] = load(GREEN_POLICY)
    store.put(kind, ns, name, body)
    try:
        tlab.wait_realized()
        res = probe_all(tlab, {"blue/a": ["10.60.1.2", "10.60.2.2", "10.50.2.2"],
                               "blue/b": ["10.60.1.2", "10.60.2.2"]})
        # blue/a's control: its own tenant, at the same time as its denied probes
        assert reached(res["blue/a"], "10.50.2.2") == ("blue/b", "blue/b", "icmp")
        assert reached(res["blue/b"], "10.60.2.2") == ("green/h", "green/h", "icmp")
        assert reached(res["blue/b"], "10.60.1.2") == ("green/g", "green/g", "icmp")
        assert reached(res["blue/a"], "10.60.1.2") == (None, None, None)
        assert reached(res["blue/a"], "10.60.2.2") == (None, None, None)
    finally:
        store.delete(kind, ns, name)
        tlab.wait_realized()
    res = probe_all(tlab, {"blue/a": ["10.60.1.2"]})
    assert reached(res["blue/a"], "10.60.1.2") == ("green/g", "green/g", "icmp")


def test_network_policy_inside_a_tenant(tlab: Lab) -> None:
    """blue's pods accept only 10.50.1.2 (blue/a), an ipBlock in blue's address space:
    blue/c (10.50.3.2) is denied at blue/b while blue/a gets through, and red, whose
    pods have exactly those addresses, is not touched by blue's policy."""
    store = tlab.store()
    [(kind, ns, name, body)] = load(POLICY)
    store.put(kind, ns, name, body)
    try:
        tlab.wait_realized()
        res = probe_all(tlab, {"blue/a": ["10.50.2.2"], "blue/c": ["10.50.2.2"],
                               "red/c": ["10.50.2.2"], "red/a": ["10.50.2.2"]})
        assert reached(res["blue/a"], "10.50.2.2") == ("blue/b", "blue/b", "icmp")
        assert reached(res["blue/c"], "10.50.2.2") == (None, None, None)
        assert reached(res["red/c"], "10.50.2.2") == ("red/b", "red/b", "icmp")
        assert reached(res["red/a"], "10.50.2.2") == ("red/b", "red/b", "icmp")
        v = Tracer(tlab).trace("blue/c", "blue/b", "tcp", 80)
        assert not v.delivered and v.table == "IngressDefault"
        assert v.owner == "tenant-policy:blue"
    finally:
        store.delete(kind, ns, name)
        tlab.wait_realized()
    res = probe_all(tlab, {"blue/c": ["10.50.2.2"]})
    assert reached(res["blue/c"], "10.50.2.2") == ("blue/b", "blue/b", "icmp")


SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: blue}
spec:
  clusterIP: 10.96.0.90
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: red}
spec:
  clusterIP: 10.96.0.90
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: only, namespace: red}
spec:
  clusterIP: 10.96.0.92
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.91
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
"""
TENANT_VIP, RED_ONLY_VIP, DEFAULT_VIP, DNS_VIP = (
    "10.96.0.90", "10.96.0.92", "10.96.0.91", "10.96.0.10")


def _slice(ns: str, service: str, ip: str) -> tuple[str, str, str, dict[str, Any]]:
    """The selector-less Service's EndpointSlice: one endpoint, both ports."""
    return endpoint_slice(ns, service, [ip], [("http", 80, "TCP"), ("dns", 53, "UDP")])


def test_services_inside_tenants(tlab: Lab, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """blue and red each have a Service at 10.96.0.90 whose one endpoint is 10.50.2.2
    (blue/b and red/b, on node2): each tenant's clients reach their own endpoint, by
    name, from node1 and node3; red's other Service is out of blue's reach, and so is
    the default network's; the default network does not see tenant Services; green
    (connected with blue) reaches blue's, yellow (one-sided) does not; every tenant
    reaches the cluster DNS Service (kube-system/kube-dns, a default pod). All probes
    run at the same time, so every deny has concurrent allowed probes next to it."""
    ip = {ref: tlab.pod(ref).ip for ref, _ in PODS}
    store = tlab.store()
    objs = [*load(SERVICES), _slice("blue", "web", ip["blue/b"]),
            _slice("red", "web", ip["red/b"]), _slice("red", "only", ip["red/b"]),
            _slice("default", "web", ip["default/e"]),
            _slice("kube-system", "kube-dns", ip["default/e"])]
    for kind, ns, name, body in objs:
        store.put(kind, ns, name, body)
    try:
        tlab.wait_realized()
        res = probe_all(tlab, {
            "blue/a": [TENANT_VIP, RED_ONLY_VIP, DEFAULT_VIP, DNS_VIP],
            "red/a": [TENANT_VIP, RED_ONLY_VIP, DNS_VIP],
            "blue/c": [TENANT_VIP],
            "red/c": [TENANT_VIP],
            "green/g": [TENANT_VIP, DNS_VIP],
            "green/h": [TENANT_VIP],
            "yellow/y": [TENANT_VIP, DNS_VIP],
            "default/d": [TENANT_VIP, DEFAULT_VIP],
        })
        tcp_udp = {src: {dst: reached(r, dst)[:2] for dst in
                         {k.rsplit("/", 1)[0] for k in r}} for src, r in res.items()}
        # the same ClusterIP and endpoint address: each tenant's own endpoint answers
        assert tcp_udp["blue/a"][TENANT_VIP] == ("blue/b", "blue/b"), tcp_udp
        assert tcp_udp["red/a"][TENANT_VIP] == ("red/b", "red/b"), tcp_udp
        assert tcp_udp["blue/c"][TENANT_VIP] == ("blue/b", "blue/b"), tcp_udp
        assert tcp_udp["red/c"][TENANT_VIP] == ("red/b", "red/b"), tcp_udp
        # red's other Service: red reaches it, blue does not (concurrently)
        assert tcp_udp["red/a"][RED_ONLY_VIP] == ("red/b", "red/b"), tcp_udp
        assert tcp_udp["blue/a"][RED_ONLY_VIP] == (None, None), tcp_udp
        # the default network's Service: out of a (masquerading) tenant's reach, while a
        # default pod reaches it; and the default network does not see tenant Services
        assert tcp_udp["default/d"][DEFAULT_VIP] == ("default/e", "default/e"), tcp_udp
        assert tcp_udp["blue/a"][DEFAULT_VIP] == (None, None), tcp_udp
        assert tcp_udp["default/d"][TENANT_VIP] == (None, None), tcp_udp
        # connectTo: green reaches blue's Service across nodes and on the endpoint's node
        assert tcp_udp["green/g"][TENANT_VIP] == ("blue/b", "blue/b"), tcp_udp
        assert tcp_udp["green/h"][TENANT_VIP] == ("blue/b", "blue/b"), tcp_udp
        assert tcp_udp["yellow/y"][TENANT_VIP] == (None, None), tcp_udp
        # cluster DNS, the one exception: every tenant reaches the default network's
        for src in ("blue/a", "red/a", "green/g", "yellow/y"):
            assert tcp_udp[src][DNS_VIP] == ("default/e", "default/e"), (src, tcp_udp)

        # what OVS holds on node1: the two tenants' ServiceLB flows, told apart by reg4
        node1 = tlab.node("node1")
        lb = [ln for ln in node1.ovs.ofctl("dump-flows", "br-int", "--no-stats").splitlines()
              if f"nw_dst={TENANT_VIP}" in ln and "tp_dst=80" in ln]
        vnis = {t["name"]: t["vni"] for t in AgentClient(node1.api_socket).call(
            "tenants")["tenants"]}
        # blue's and red's own, and blue's copy for green (connected); none for yellow
        assert sorted(ln.split("reg4=")[1].split(",")[0] for ln in lb) == sorted(
            f"{0x10000 | vnis[n]:#x}/0x1ffff" for n in ("blue", "red", "green")), lb
        groups = node1.ovs.ofctl("dump-groups", "br-int")
        rows = AgentClient(node1.api_socket).call("services")["services"]
        by = {(s["service"], s.get("tenant")): s for s in rows}
        assert ("blue/web", "blue") in by and ("red/web", "red") in by
        assert ("default/web", None) in by and ("blue/web", None) not in by
        for (svc, tenant), vni in ((("blue/web", "blue"), BLUE_VNI),
                                   (("red/web", "red"), RED_VNI)):
            gid = by[(svc, tenant)]["ports"][0]["group"]
            (g,) = [ln for ln in groups.splitlines() if f"group_id={gid}," in ln]
            assert f"zone={vni}" in g and f"nat(dst={ip['blue/b']}:80)" in g, g
        # flowctl services names the tenant
        monkeypatch.setenv("FLOWCNI_LAB_DIR", tlab.base)
        monkeypatch.setenv("FLOWCNI_LAB_PREFIX", tlab.prefix)
        capsys.readouterr()
        assert flowctl.main(["services", "--node", "node1"]) == 0
        out = capsys.readouterr().out
        assert any("blue (VNI 101)" in ln and "blue/web" in ln for ln in out.splitlines())
        assert any("red (VNI 202)" in ln and "red/web" in ln for ln in out.splitlines())
        _flows_tenant_shows_all_it_owns(tlab, capsys)
    finally:
        for kind, ns, name, _ in objs:
            store.delete(kind, ns, name)
        tlab.wait_realized()


SELF_VIP, STICKY_VIP = "10.96.0.93", "10.96.0.94"
REPEAT = r"""
import json, socket, sys
out = []
for _ in range(int(sys.argv[2])):
    try:
        s = socket.create_connection((sys.argv[1], 80), timeout=3)
        out.append(s.recv(100).decode()); s.close()
    except OSError:
        out.append(None)
print(json.dumps(out))
"""


def _svc(ns: str, name: str, vip: str, ips: list[str], **spec: object
         ) -> list[tuple[str, str, str, dict[str, object]]]:
    """A selector-less Service at `vip` (TCP 80, UDP 53) and its EndpointSlice."""
    body: dict[str, object] = {"namespace": ns, "name": name, "spec": {
        "clusterIP": vip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                    {"name": "dns", "port": 53, "protocol": "UDP"}],
        **spec}}
    kind, sns, sname, sl = _slice(ns, name, ips[0])
    sl["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]
    return [("Service", ns, name, body), (kind, sns, sname, sl)]


def test_hairpin_and_affinity_inside_tenants(tlab: Lab) -> None:
    """Hairpin: blue's and red's Service at 10.96.0.93 each have one endpoint, the very
    pod that asks (blue/a and red/a: both 10.50.1.2 on node1), and each reaches itself
    by TCP and UDP. sessionAffinity ClientIP: blue's and red's Service at 10.96.0.94
    each have two endpoints (pods b and c of the tenant, 10.50.2.2 and 10.50.3.2 in
    both); blue/a and red/a (one client address) each stick to one endpoint of their
    own tenant, and node1 holds one learned flow per tenant (keyed by reg4)."""
    ip = {ref: tlab.pod(ref).ip for ref, _ in PODS}
    assert ip["blue/a"] == ip["red/a"] and ip["blue/c"] == ip["red/c"]
    store = tlab.store()
    aff = {"sessionAffinity": "ClientIP",
           "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}}}
    objs = [*_svc("blue", "self", SELF_VIP, [ip["blue/a"]]),
            *_svc("red", "self", SELF_VIP, [ip["red/a"]]),
            *_svc("blue", "sticky", STICKY_VIP, [ip["blue/b"], ip["blue/c"]], **aff),
            *_svc("red", "sticky", STICKY_VIP, [ip["red/b"], ip["red/c"]], **aff)]
    for kind, ns, name, body in objs:
        store.put(kind, ns, name, body)
    try:
        tlab.wait_realized()
        procs = {src: subprocess.Popen(tlab.exec_argv(src, [sys.executable, "-c", REPEAT,
                                                            STICKY_VIP, "8"]),
                                       stdout=subprocess.PIPE, text=True)
                 for src in ("blue/a", "red/a")}
        res = probe_all(tlab, {"blue/a": [SELF_VIP], "red/a": [SELF_VIP]})
        sticky = {src: json.loads(p.communicate(timeout=60)[0]) for src, p in procs.items()}
        # hairpin: each pod reaches itself through its own tenant's Service
        assert reached(res["blue/a"], SELF_VIP)[:2] == ("blue/a", "blue/a"), res
        assert reached(res["red/a"], SELF_VIP)[:2] == ("red/a", "red/a"), res
        # affinity: every answer from one endpoint, of the client's own tenant
        for src, tenant in (("blue/a", "blue"), ("red/a", "red")):
            answers = set(sticky[src])
            assert len(answers) == 1 and answers <= {f"{tenant}/b", f"{tenant}/c"}, sticky
        learned = [ln for ln in tlab.node("node1").ovs.ofctl(
            "-O", "OpenFlow13", "dump-flows", "br-int",
            f"table={DEFAULT.id('SessionAffinity')}").splitlines()
            if f"nw_dst={STICKY_VIP}" in ln]
        regs = {ln.split("reg4=")[1].split(",")[0] for ln in learned if "reg4=" in ln}
        assert regs == {f"{0x10000 | BLUE_VNI:#x}", f"{0x10000 | RED_VNI:#x}"}, learned
    finally:
        for kind, ns, name, _ in objs:
            store.delete(kind, ns, name)
        tlab.wait_realized()


NP_PROBE = r"""
import json, socket, sys, threading
out = {}
def probe(t):
    ip, port, proto = t.split(":")
    try:
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
            s.sendto(b"who", (ip, int(port))); out[t] = s.recvfrom(100)[0].decode()
        else:
            s = socket.create_connection((ip, int(port)), timeout=3)
            out[t] = s.recv(100).decode(); s.close()
    except OSError:
        out[t] = None
ts = [threading.Thread(target=probe, args=(t,)) for t in json.loads(sys.argv[1])]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(out))
"""


def test_node_ports_into_tenants(tlab: Lab) -> None:
    """blue's and red's NodePort Services (30090 and 30091, TCP and UDP) each have one
    endpoint, 10.50.2.2 in both (blue/b and red/b, node2): the lab's external host
    reaches each tenant's own pod through node1 (across nodes, under the tenant's VNI)
    and node2 (the endpoint's node), all at the same time; a node port no Service has
    (30092) answers nothing meanwhile."""
    ip = {ref: tlab.pod(ref).ip for ref, _ in PODS}
    assert ip["blue/b"] == ip["red/b"]
    store = tlab.store()
    objs = [*_svc("blue", "np", "10.96.0.95", [ip["blue/b"]], type="NodePort"),
            *_svc("red", "np", "10.96.0.95", [ip["red/b"]], type="NodePort")]
    for (_, _, _, body), np in ((objs[0], 30090), (objs[2], 30091)):
        for port in body["spec"]["ports"]:  # type: ignore[index]
            port["nodePort"] = np
    for kind, ns, name, body in objs:
        store.put(kind, ns, name, body)
    try:
        tlab.wait_realized()
        n1, n2 = tlab.node("node1").node_ip, tlab.node("node2").node_ip
        targets = [f"{n}:{port}:{proto}" for n in (n1, n2) for port in (30090, 30091, 30092)
                   for proto in ("tcp", "udp")]
        got = json.loads(subprocess.run(
            netns.exec_argv(tlab.external_ns, [sys.executable, "-c", NP_PROBE,
                                               json.dumps(targets)]),
            capture_output=True, text=True, check=True, timeout=60).stdout)
        for n in (n1, n2):
            for proto in ("tcp", "udp"):
                assert got[f"{n}:30090:{proto}"] == "blue/b", got
                assert got[f"{n}:30091:{proto}"] == "red/b", got
                assert got[f"{n}:30092:{proto}"] is None, got
        # on node1, each tenant's connection to its endpoint is in its own zone, from
        # its own gateway address there (the SNAT that brings the answer back)
        ct = tlab.node("node1").ovs.appctl("dpctl/dump-conntrack", check=False)
        for vni in (BLUE_VNI, RED_VNI):
            assert any(f"zone={vni}" in ln and "orig=(src=10.50.1.1," in ln
                       and f"reply=(src={ip['blue/b']}," in ln for ln in ct.splitlines()), ct
    finally:
        for kind, ns, name, _ in objs:
            store.delete(kind, ns, name)
        tlab.wait_realized()


def test_a_node_port_stays_with_the_tenant_service_that_had_it_first(tlab: Lab) -> None:
    """blue's NodePort Service has 30093; a default-network Service then asks for 30093
    too (the later one: refused, in the agent's log naming its nodePort). Through a
    later tenant change (red gets a Service) the external host still reaches blue's pod
    on both nodes (before, that change handed the port to the default Service and
    refused blue's). When blue's Service goes, the default one gets the port."""
    ip = {ref: tlab.pod(ref).ip for ref, _ in PODS}
    store = tlab.store()
    blue = _svc("blue", "np3", "10.96.0.96", [ip["blue/b"]], type="NodePort")
    dflt = _svc("default", "np3", "10.96.0.97", [ip["default/e"]], type="NodePort")
    red = _svc("red", "other", "10.96.0.98", [ip["red/b"]])
    for body in (blue[0][3], dflt[0][3]):
        for port in body["spec"]["ports"]:  # type: ignore[index]
            port["nodePort"] = 30093
    n1, n2 = tlab.node("node1").node_ip, tlab.node("node2").node_ip
    targets = [f"{n}:30093:{proto}" for n in (n1, n2) for proto in ("tcp", "udp")]

    def probe() -> dict[str, str | None]:
        return dict(json.loads(subprocess.run(
            netns.exec_argv(tlab.external_ns, [sys.executable, "-c", NP_PROBE,
                                               json.dumps(targets)]),
            capture_output=True, text=True, check=True, timeout=60).stdout))
    try:
        for objs in (blue, dflt, red):  # one at a time: blue first, then the default
            for kind, ns, name, body in objs:
                store.put(kind, ns, name, body)
            tlab.wait_realized()
        assert probe() == dict.fromkeys(targets, "blue/b")
        for kind, ns, name, _ in blue:
            store.delete(kind, ns, name)
        tlab.wait_realized()
        assert eventually(lambda: probe() == dict.fromkeys(targets, "default/e"),
                          timeout=20), probe()
    finally:
        for kind, ns, name, _ in (*blue, *dflt, *red):
            store.delete(kind, ns, name)
        tlab.wait_realized()


def _flows_tenant_shows_all_it_owns(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """`flowctl flows --tenant blue` on node1, with blue's policy, Service, copies for
    green, connect and DNS flows all installed: every flow OVS holds that matches blue's
    tenant id is shown (by cookie: round | feature | owner), and none matching red's."""
    [(kind, ns, name, body)] = load(POLICY)
    store = lab.store()
    store.put(kind, ns, name, body)
    try:
        lab.wait_realized()
        capsys.readouterr()
        assert flowctl.main(["flows", "--tenant", "blue", "--node", "node1", "--json",
                             "--no-stats"]) == 0
        rows = json.loads(capsys.readouterr().out)[0]["flows"]
        shown = {int(r["cookie"], 16) for r in rows}
        owners = {r["owner"] for r in rows}
        held = lab.node("node1").ovs.ofctl("dump-flows", "br-int", "--no-stats").splitlines()
        blue_id, red_id = (f"reg4={0x10000 | v:#x}/0x1ffff" for v in (BLUE_VNI, RED_VNI))
        blue = [ln for ln in held if blue_id in ln]
        missing = [ln for ln in blue
                   if int(ln.split("cookie=")[1].split(",")[0], 16) not in shown]
        assert blue and not missing, missing
        assert not [r for r in rows if red_id in r["match"]], rows
        for want in ("tenant:blue", "tenant-policy:blue", "tenant-dns:blue",
                     "tenant-connect:blue", "tenant-service:blue/web",
                     "tenant-service:blue/web@green"):
            assert want in owners, (want, owners)
        assert not any(o.startswith("tenant-service:red/") for o in owners), owners
    finally:
        store.delete(kind, ns, name)
        lab.wait_realized()


def _geneve_vnis(lab: Lab, src: str, dst_ip: str) -> set[str]:
    """VNIs of Geneve packets on the underlay while `src` pings `dst_ip`."""
    cap = subprocess.Popen(netns.exec_argv(lab.underlay_ns, [
        "tcpdump", "-n", "-l", "-vv", "-i", "br0", "-c", "4", "udp port 6081"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cap.stderr is not None
    for line in cap.stderr:
        if "listening on" in line:
            break
    try:
        assert ping(lab, src, dst_ip, count=3, timeout=2)
        out, _ = cap.communicate(timeout=10)
    finally:
        cap.kill()
        cap.wait()
    return {w.rstrip(",") for line in out.splitlines() if "vni" in line
            for w in [line.split("vni", 1)[1].split()[0]]}


def test_underlay_carries_each_tenants_vni(tlab: Lab) -> None:
    assert _geneve_vnis(tlab, "blue/a", "10.50.2.2") == {hex(BLUE_VNI)}
    assert _geneve_vnis(tlab, "red/a", "10.50.2.2") == {hex(RED_VNI)}


def test_trace_follows_the_tenant(tlab: Lab) -> None:
    """The trace goes to the tenant's pod behind the shared address, with its VNI."""
    v = Tracer(tlab).trace("blue/a", "10.50.2.2", "tcp", 80)
    assert v.delivered and v.pod == "blue/b" and v.node == "node2"
    assert (v.tenant, v.vni) == ("blue", BLUE_VNI)
    assert any(f"VNI {BLUE_VNI}" in s.story for s in v.steps)
    assert any(s.node == "node2" and f"VNI) {BLUE_VNI}: tenant blue" in s.story
               for s in v.steps)
    live = Tracer(tlab).live("blue/a", "10.50.2.2", "tcp", 80)
    assert live["delivered"] and live["output"] == "pod blue/b" and live["matches_trace"]
    v = Tracer(tlab).trace("red/a", "10.50.2.2", "udp", 53)
    assert v.delivered and v.pod == "red/b" and v.vni == RED_VNI
    # blue has no pod at red/d's address on node1: the trace ends in blue's drop
    v = Tracer(tlab).trace("blue/a", "10.50.1.3", "tcp", 80)
    assert not v.delivered and v.table == "L3Forwarding" and v.owner == "tenant:blue"
    assert "no pod of it has that address" in v.detail


def test_flowctl_tenants_and_flows(tlab: Lab, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCNI_LAB_DIR", tlab.base)
    monkeypatch.setenv("FLOWCNI_LAB_PREFIX", tlab.prefix)
    assert flowctl.main(["tenants", "--node", "node1"]) == 0
    out = capsys.readouterr().out
    assert "blue" in out and "101" in out and "10.50.1.0/24" in out
    assert flowctl.main(["flows", "--tenant", "red", "--node", "node1", "--json",
                         "--no-stats"]) == 0
    rows = json.loads(capsys.readouterr().out)[0]["flows"]
    owners = {r["owner"] for r in rows}
    assert "tenant:red" in owners and len([o for o in owners if o.startswith("pod:")]) == 2
    assert any("tun_id=0xca" in r["match"] or "tun_id=202" in r["match"] for r in rows)
    assert flowctl.main(["flows", "--tenant", "nope", "--node", "node1"]) == 1
    assert "--tenant nope" in capsys.readouterr().err


def test_agent_reports_tenants(tlab: Lab) -> None:
    t = {x["name"]: x for x in AgentClient(tlab.node("node1").api_socket).call(
        "tenants")["tenants"]}
    assert t["blue"]["ok"] and t["blue"]["vni"] == BLUE_VNI and t["blue"]["zone"] == BLUE_VNI
    assert t["blue"]["node_slice"] == "10.50.1.0/24"
    assert {p["name"] for p in t["red"]["pods"]} == {"a", "d"}
    assert t["red"]["namespaces"] == ["red"]
    out = subprocess.run(netns.exec_argv(tlab.node("node1").netns, [
        "python3", "-c", "import urllib.request;print(urllib.request.urlopen("
        "'http://127.0.0.1:9153/metrics', timeout=5).read().decode())"]),
        capture_output=True, text=True, check=True).stdout
    assert 'flowcni_tenant_pods{tenant="red",vni="202"} 2.0' in out
    assert 'flowcni_tenant_pods{tenant="blue",vni="101"} 1.0' in out
    assert 'flowcni_tenant_ready{tenant="blue",vni="101"} 1.0' in out
    # green and yellow have no spec.vni: theirs was allocated, and recorded in the store
    recorded = tlab.store().vnis()
    for name in ("green", "yellow"):
        assert t[name]["vni_source"] == "recorded" and recorded[name] == t[name]["vni"]
    assert t["blue"]["vni_source"] == "spec"


SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        s.sendto(b"tenant-check", (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass
    time.sleep(0.02)
"""


def test_agent_restarts_keep_tenants_apart(tlab: Lab) -> None:
    """Both nodes' agents restart while blue/a and red/a stream UDP to 10.50.2.2 (blue
    to port 9998, red to 9999): captures on blue/b and red/b see only their own
    tenant's stream, throughout, and each sees its own (the control)."""
    caps = {(ref, port): Capture(tlab, ref, f"udp dst port {port}")
            for ref in ("blue/b", "red/b") for port in (9998, 9999)}
    senders = [subprocess.Popen(tlab.exec_argv(ref, [sys.executable, "-c", SENDER,
                                                     "10.50.2.2", port, "25"]))
               for ref, port in (("blue/a", "9998"), ("red/a", "9999"))]
    try:
        time.sleep(1)
        for node in ("node2", "node1"):
            tlab.restart_agent(node)
        time.sleep(2)
        # after the restarts, each stream still arrives where it belongs
        late = {k: Capture(tlab, k[0], f"udp dst port {k[1]}")
                for k in (("blue/b", 9998), ("red/b", 9999))}
        time.sleep(1)
        after = {k: len(c.count()) for k, c in late.items()}
    finally:
        for p in senders:
            p.kill()
            p.wait()
    seen = {k: len(c.count()) for k, c in caps.items()}
    assert seen[("blue/b", 9999)] == 0 and seen[("red/b", 9998)] == 0, seen
    assert seen[("blue/b", 9998)] > 0 and seen[("red/b", 9999)] > 0, seen
    assert all(n > 0 for n in after.values()), after


def test_relabel_reports_running_pods(tlab: Lab) -> None:
    """A namespace of the default network with a running pod moves into blue: the pod
    keeps its default-network address, and node1's agent reports it by name in blue's
    PodsOnOldNetwork condition until it is gone."""
    store = tlab.store()
    store.put("Namespace", "", "purple", {"name": "purple", "labels": {}})
    pod = tlab.pod_add("p", "node1", namespace="purple")
    client = AgentClient(tlab.node("node1").api_socket)

    def moved() -> list[str]:
        blue = next(t for t in client.call("tenants")["tenants"] if t["name"] == "blue")
        return [c["message"] for c in blue["conditions"] if c["type"] == "PodsOnOldNetwork"]
    try:
        store.put("Namespace", "", "purple", {"name": "purple",
                                              "labels": {"tenant": "blue"}})
        deadline = time.monotonic() + 60
        while not moved() and time.monotonic() < deadline:
            time.sleep(0.5)
        [msg] = moved()
        assert ("purple/p (started on the default network, its namespace is now in blue)"
                in msg), msg
        assert tlab.pod("purple/p").ip == pod.ip and pod.ip.startswith("10.244."), pod.ip
    finally:
        tlab.pod_del("purple/p")
        store.delete("Namespace", "", "purple")
    deadline = time.monotonic() + 60
    while moved() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert moved() == []


def test_cluster_policy_selecting_a_tenant_is_reported(tlab: Lab) -> None:
    """An AdminNetworkPolicy whose subject selects blue's namespace does not apply to
    blue's pods (not supported inside tenants): node1's agent says so in blue's
    AdminPolicyNotApplied condition, naming the policy, and red has none."""
    store = tlab.store()
    client = AgentClient(tlab.node("node1").api_socket)

    def notes() -> dict[str, list[str]]:
        return {t["name"]: [c["message"] for c in t["conditions"]
                            if c["type"] == "AdminPolicyNotApplied"]
                for t in client.call("tenants")["tenants"]}
    store.put("AdminNetworkPolicy", "", "deny-blue", {"name": "deny-blue", "spec": {
        "priority": 5, "subject": {"namespaces": {"matchLabels": {"tenant": "blue"}}},
        "ingress": [{"name": "d", "action": "Deny", "from": [{"namespaces": {}}]}]}})
    try:
        deadline = time.monotonic() + 60
        while not notes()["blue"] and time.monotonic() < deadline:
            time.sleep(0.5)
        got = notes()
        assert len(got["blue"]) == 1 and "AdminNetworkPolicy/deny-blue" in got["blue"][0], got
        assert got["red"] == [], got
    finally:
        store.delete("AdminNetworkPolicy", "", "deny-blue")
    deadline = time.monotonic() + 60
    while notes()["blue"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert notes()["blue"] == []
