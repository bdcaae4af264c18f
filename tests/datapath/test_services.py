"""flowcni's own Service proxy (the default, `--proxy flowcni`), with real packets.

Services are applied as Kubernetes YAML to the embedded store, as `flowctl
apply -f` does; each agent derives the endpoints from the pods the selector
picks and programs ServiceLB flows and select groups. Clients check who
answered and from which address (see tests.support.svc).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flowcni.datastore.manifests import load
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually
from tests.support.svc import (
    Stream,
    replies,
    sctp_init,
    start_sctp_responder,
    start_server,
    start_stream_server,
)

VIP_W1, VIP_W2, VIP_WEB, VIP_EMPTY = "10.96.1.1", "10.96.1.2", "10.96.1.3", "10.96.1.4"
STREAM_PORT = 7000


def service(name: str, vip: str, selector: dict[str, str], ports: str = "") -> str:
    ports = ports or """
  - {name: http, port: 8080, targetPort: http}
  - {name: dns, port: 53, targetPort: 53, protocol: UDP}
  - {name: stream, port: 7000, targetPort: 7000}
  - {name: sctp, port: 9999, targetPort: 9999, protocol: SCTP}"""
    sel = ", ".join(f"{k}: {v}" for k, v in selector.items())
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{{sel}}}
  ports:{ports}
"""


def apply(lab: Lab, text: str) -> None:
    store = lab.store()
    for kind, ns, name, body in load(text):
        store.put(kind, ns, name, body)
    lab.wait_realized(timeout=30)


def delete(lab: Lab, text: str) -> None:
    store = lab.store()
    for kind, ns, name, _ in load(text, identity_only=True):
        store.delete(kind, ns, name)
    lab.wait_realized(timeout=30)


@pytest.fixture(scope="module")
def slab() -> Iterator[Lab]:
    http = [{"name": "http", "containerPort": 80, "protocol": "TCP"}]
    with running_lab("svc", nodes=2, encap="geneve") as lab:
        lab.pod_add("client1", "node1", labels={"role": "client"})
        lab.pod_add("client2", "node2", labels={"role": "other"})
        lab.pod_add("web1", "node1", labels={"app": "web", "w": "1"}, ports=http)
        lab.pod_add("web2", "node2", labels={"app": "web", "w": "2"}, ports=http)
        servers: list[subprocess.Popen[str]] = []
        try:
            for n in ("web1", "web2"):
                servers.append(start_server(lab.exec_argv(f"default/{n}", []), n, "80,53u"))
                servers.append(start_stream_server(lab.exec_argv(f"default/{n}", []), n,
                                                   STREAM_PORT))
                servers.append(start_sctp_responder(lab.exec_argv(f"default/{n}", []), n, 9999))
            apply(lab, service("w1", VIP_W1, {"w": "1"}) + "---"
                  + service("w2", VIP_W2, {"w": "2"}) + "---"
                  + service("web", VIP_WEB, {"app": "web"}) + "---"
                  + service("empty", VIP_EMPTY, {"app": "nothing"}))
            yield lab
        finally:
            for s in servers:
                s.kill()
                s.wait()


@pytest.mark.parametrize("client", ["default/client1", "default/client2"])
def test_clusterip_reaches_local_and_remote_endpoints(slab: Lab, client: str) -> None:
    """From each node, TCP (named target port) and UDP, endpoint on node1 and on node2."""
    got = replies(slab, client, [f"{VIP_W1}:8080", f"{VIP_W1}:53u",
                                 f"{VIP_W2}:8080", f"{VIP_W2}:53u"])
    assert got == {f"{VIP_W1}:8080": "web1 ping", f"{VIP_W1}:53u": "web1 ping",
                   f"{VIP_W2}:8080": "web2 ping", f"{VIP_W2}:53u": "web2 ping"}


def test_clusterip_sctp(slab: Lab) -> None:
    """SCTP (INIT answered by INIT-ACK, raw sockets) through a ClusterIP to a remote and a
    local endpoint; the answer must come from the ClusterIP and its port.

    The target port equals the Service port: OVS 3.1's userspace conntrack
    tracks SCTP without ports, so it rewrites the address but not the port
    (measured: with targetPort 9998 the INIT reached no one)."""
    got = {vip: sctp_init(slab.exec_argv("default/client1", []), vip, 9999)
           for vip in (VIP_W1, VIP_W2)}
    assert got == {VIP_W1: "web1 init", VIP_W2: "web2 init"}


def test_select_group_spreads_connections(slab: Lab) -> None:
    """A Service with two endpoints: one group, two buckets, and both answer over time."""
    groups = slab.node("node1").ovs.ofctl("-O", "OpenFlow13", "dump-groups", "br-int")
    web = [ln for ln in groups.splitlines() if "type=select" in ln and ":80)" in ln
           and ln.count("bucket=") == 2]
    assert web, groups
    seen: set[str] = set()

    def both() -> bool:
        got = replies(slab, "default/client1", [f"{VIP_WEB}:8080"] * 1)
        seen.add(next(iter(got.values())))
        return seen == {"web1 ping", "web2 ping"}

    assert eventually(both, timeout=60, interval=0), seen


def test_flowctl_services_shows_endpoints_and_bucket_packets(
        slab: Lab, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """After the traffic above, `flowctl services default/web --json` on node1 lists both
    endpoints and the packets each bucket of the port's group took."""
    from flowcni.ctl.flowctl import main as flowctl
    monkeypatch.setenv("FLOWCNI_LAB_DIR", slab.base)
    monkeypatch.setenv("FLOWCNI_LAB_PREFIX", slab.prefix)
    assert flowctl(["services", "default/web", "--node", "node1", "--json"]) == 0
    rows = {r["port"]: r for r in json.loads(capsys.readouterr().out)}
    ips = sorted(p.ip for p in slab.pods() if p.name.startswith("web"))
    http = rows["8080/TCP"]
    assert http["clusterIP"] == VIP_WEB and http["proxy"] == "flowcni"
    assert sorted(e.split(":")[0] for e in http["endpoints"]) == ips
    assert len(http["packets"]) == 2 and all(n > 0 for n in http["packets"]), http
    assert rows["53/UDP"]["packets"] == [0, 0]
    assert flowctl(["flows", "--node", "node1", "--service", "default/web", "--json"]) == 0
    flows = json.loads(capsys.readouterr().out)[0]["flows"]
    assert sorted(f["table"] for f in flows) == ["ServiceLB"] * 4
    assert {f["owner"] for f in flows} == {"service:default/web"}
    assert any(f"group:{http['group']}" in f["actions"] for f in flows)


def test_metrics_count_services_endpoints_and_groups(slab: Lab) -> None:
    """Four Services; web's four ports have two endpoints each, w1's and w2's one each,
    empty's none (no group): 4 + 4 + 4 = 12 groups, 8 + 4 + 4 = 16 buckets."""
    from tests.datapath.test_inspect import scrape
    m = scrape(slab, "node1")
    assert (m["flowcni_services"], m["flowcni_service_endpoints"], m["flowcni_groups"]) == \
        (4, 16, 12), {k: v for k, v in m.items() if "service" in k or "group" in k}


def test_service_without_endpoints_rejects(slab: Lab) -> None:
    """As kube-proxy does: TCP gets a reset, UDP an ICMP port unreachable (both seen by
    the client as "connection refused", not a timeout); another Service still works."""
    got = replies(slab, "default/client1", [f"{VIP_EMPTY}:8080", f"{VIP_EMPTY}:53u",
                                            f"{VIP_W2}:8080"])
    assert got[f"{VIP_W2}:8080"] == "web2 ping"
    assert got[f"{VIP_EMPTY}:8080"].startswith("ERR ConnectionRefusedError"), got
    assert got[f"{VIP_EMPTY}:53u"].startswith("ERR ConnectionRefusedError"), got


UDP_SAME_SOCKET = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.connect((sys.argv[1], 53)); out = []
for i in range(3):
    s.send(b"x%d" % i)
    try:
        out.append(s.recv(100).decode())
    except OSError:
        out.append("ERR")
print(" ".join(o.replace(" ", "_") for o in out))
"""


def udp_same_socket(lab: Lab, src: str, vip: str) -> list[str]:
    """Three datagrams from one socket to vip:53; each reply, or "ERR"."""
    p = subprocess.run(lab.exec_argv(src, [sys.executable, "-c", UDP_SAME_SOCKET, vip]),
                       capture_output=True, text=True, timeout=30)
    return [o.replace("_", " ") for o in p.stdout.split()]


def test_policy_applies_after_dnat(slab: Lab) -> None:
    """A policy on web1 that admits role=client on port 80 admits it through the Service
    (real source pod, real destination port) and denies client2 the same way."""
    pol = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web1-clients, namespace: default}
spec:
  podSelector: {matchLabels: {w: "1"}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 80}, {port: 53, protocol: UDP}]
"""
    apply(slab, pol)
    try:
        ok = replies(slab, "default/client1", [f"{VIP_W1}:8080"])
        denied = replies(slab, "default/client2", [f"{VIP_W1}:8080", f"{VIP_W2}:8080"])
        assert ok == {f"{VIP_W1}:8080": "web1 ping"}
        assert denied[f"{VIP_W1}:8080"].startswith("ERR"), denied
        assert denied[f"{VIP_W2}:8080"] == "web2 ping"  # control: client2 works elsewhere
        # The first datagram's DNAT is committed before policy drops it: later ones on
        # the same socket (same conntrack entry) must be denied as well.
        assert udp_same_socket(slab, "default/client2", VIP_W1) == ["ERR"] * 3
        assert udp_same_socket(slab, "default/client1", VIP_W1) == ["web1 x0", "web1 x1",
                                                                    "web1 x2"]
    finally:
        delete(slab, pol)


def test_endpoint_churn_keeps_a_running_stream(slab: Lab) -> None:
    """While a stream runs to one endpoint of `web`, the other leaves the Service and comes
    back: the stream is neither reset nor short of a byte."""
    s = Stream(slab.exec_argv("default/client1", []), VIP_WEB, STREAM_PORT, 6)
    assert s.serving in ("web1", "web2"), s.serving
    other = "default/web2" if s.serving == "web1" else "default/web1"
    labels = dict(slab.pod(other).labels)
    slab.set_labels(other, {"w": labels["w"]})  # no longer app=web
    slab.wait_realized(timeout=30)
    groups = slab.node("node1").ovs.ofctl("-O", "OpenFlow13", "dump-groups", "br-int")
    slab.set_labels(other, labels)
    slab.wait_realized(timeout=30)
    r = s.result()
    assert r["got"] == r["sent"] and r["name"] == s.serving, r
    assert any(":7000)" in ln and ln.count("bucket=") == 1 for ln in groups.splitlines()), \
        groups


def test_agent_restart_under_traffic(slab: Lab) -> None:
    """The client's node agent is killed and restarted mid-stream: nothing is lost, and the
    restarted agent holds the same groups (reconciled by id, none left over)."""
    before = sorted(ln for ln in slab.node("node2").ovs.ofctl(
        "-O", "OpenFlow13", "dump-groups", "br-int").splitlines() if "group_id" in ln)
    s = Stream(slab.exec_argv("default/client2", []), VIP_W1, STREAM_PORT, 6)
    assert s.serving == "web1"
    slab.restart_agent("node2")
    r = s.result()
    assert r["got"] == r["sent"] and r["name"] == "web1", r
    after = sorted(ln for ln in slab.node("node2").ovs.ofctl(
        "-O", "OpenFlow13", "dump-groups", "br-int").splitlines() if "group_id" in ln)
    assert after == before
    assert replies(slab, "default/client2", [f"{VIP_W2}:53u"]) == {f"{VIP_W2}:53u": "web2 ping"}


def test_deleted_service_takes_its_groups_and_drift_restores_them(slab: Lab) -> None:
    from flowcni.ctl.client import AgentClient
    node = slab.node("node1")
    extra = service("extra", "10.96.1.9", {"app": "web"})
    apply(slab, extra)
    n_with = node.ovs.ofctl("-O", "OpenFlow13", "dump-groups", "br-int").count("group_id")
    delete(slab, extra)
    n_without = node.ovs.ofctl("-O", "OpenFlow13", "dump-groups", "br-int").count("group_id")
    assert n_with == n_without + 4  # one group per port
    # A group deleted by hand is missing; the drift repair puts it back.
    gid = next(ln.split("group_id=")[1].split(",")[0] for ln in node.ovs.ofctl(
        "-O", "OpenFlow13", "dump-groups", "br-int").splitlines() if "group_id" in ln)
    node.ovs.ofctl("-O", "OpenFlow13", "del-groups", "br-int", f"group_id={gid}")
    stale = AgentClient(node.api_socket).call("stale")
    assert any(f"group_id={gid}," in m for m in stale["missing"]), stale
    assert eventually(lambda: f"group_id={gid}," in node.ovs.ofctl(
        "-O", "OpenFlow13", "dump-groups", "br-int"), timeout=40)
