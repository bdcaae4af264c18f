"""Service proxy operations with real OVS and real packets: endpoints beyond one
group (chained select groups), stale UDP conntrack of a removed endpoint,
`flowctl trace --to` a Service, and policy through a ClusterIP.

One 2-node lab for the module. Services without a selector get their
endpoints from EndpointSlices written to the embedded store by hand, as a
controller would, so a test can hold thousands of endpoints without pods.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from flowcni.datastore.manifests import load
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually
from tests.support.svc import endpoint_slice, replies, start_server

VIP_BIG, VIP_UDP = "10.96.7.1", "10.96.7.2"
N_BIG = 2000


def put_service(lab: Lab, name: str, vip: str, ports: str, selector: str = "") -> None:
    text = f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
{f"  selector: {{{selector}}}" if selector else ""}
  ports: {ports}
"""
    store = lab.store()
    for kind, ns, n, body in load(text):
        store.put(kind, ns, n, body)


def put_slice(lab: Lab, service: str, ips: list[str], port: int, protocol: str) -> None:
    """The Service's one EndpointSlice, every address ready, one unnamed port."""
    lab.store().put(*endpoint_slice("default", service, ips, [("", port, protocol)]))


@pytest.fixture(scope="module")
def olab() -> Iterator[Lab]:
    with running_lab("svcops", nodes=2, encap="geneve") as lab:
        lab.pod_add("client1", "node1", labels={"role": "client"})
        lab.pod_add("u1", "node1", labels={"app": "u"})
        lab.pod_add("u2", "node2", labels={"app": "u"})
        servers: list[subprocess.Popen[str]] = []
        try:
            for n in ("u1", "u2"):
                servers.append(start_server(lab.exec_argv(f"default/{n}", []), n, "53u,80"))
            big = [f"10.250.{i // 250}.{i % 250 + 1}" for i in range(N_BIG)]
            put_service(lab, "big", VIP_BIG, "[{port: 80, protocol: TCP}]")
            put_slice(lab, "big", big, 8080, "TCP")
            lab.wait_realized(timeout=60)
            yield lab
        finally:
            for s in servers:
                s.kill()
                s.wait()


def groups_of(lab: Lab, node: str) -> dict[int, str]:
    out = lab.node(node).ovs.ofctl("dump-groups", "br-int")
    return {int(m.group(1)): ln for ln in out.splitlines()
            if (m := re.search(r"group_id=(\d+)", ln))}


def test_endpoints_beyond_one_group_are_chained(olab: Lab) -> None:
    """2,000 endpoints on one port (more than one group message holds): OVS holds a top
    group whose weighted buckets lead to sub-groups that together hold every endpoint
    once, and ofproto/trace of connections from many source ports lands in every
    sub-group and on many different endpoints."""
    node = olab.node("node1")
    groups = groups_of(olab, "node1")
    flows = node.ovs.ofctl("dump-flows", "br-int")
    lb = [ln for ln in flows.splitlines() if f"nw_dst={VIP_BIG}" in ln and "group:" in ln]
    assert len(lb) == 1, flows
    top_id = int(re.search(r"group:(\d+)", lb[0]).group(1))  # type: ignore[union-attr]
    top = groups[top_id]
    subs = [int(x) for x in re.findall(r"group:(\d+)", top)]
    weights = [int(w) for w in re.findall(r"weight:(\d+)", top)]
    sizes = [groups[s].count("bucket=") for s in subs]
    assert len(subs) == 3 and sum(sizes) == N_BIG, top
    # ofctl omits weight:1 only; every bucket here weighs hundreds
    assert weights == sizes, (weights, sizes)
    eps = [ep for s in subs for ep in re.findall(r"nat\(dst=([\d.:]+)\)", groups[s])]
    assert len(eps) == len(set(eps)) == N_BIG and all(e.endswith(":8080") for e in eps)
    # Real connections: 300 SYNs from distinct source ports (no endpoint answers; each
    # SYN is a new connection that takes a bucket of the top group, then of a sub-group).
    run_in(olab, "default/client1", SYNS, VIP_BIG, "80", "300")
    per_group: dict[int, list[int]] = {}

    def counted() -> bool:  # datapath stats reach the groups when revalidators pull them
        stats = node.ovs.ofctl("dump-group-stats", "br-int")
        per_group.clear()
        per_group.update({int(m.group(1)): [int(x) for x in re.findall(
            r"bucket\d+:packet_count=(\d+)", ln)] for ln in stats.splitlines()
            if (m := re.search(r"group_id=(\d+)", ln))})
        return sum(per_group[top_id]) >= 240  # most of the 300 (a socket burst loses a few)
    assert eventually(counted, timeout=30), per_group.get(top_id)
    assert all(n > 0 for n in per_group[top_id]), per_group[top_id]
    assert all(sum(per_group[s]) > 0 for s in subs)
    hit = [n for s in subs for n in per_group[s] if n > 0]
    assert len(hit) > 150, len(hit)  # ~300 connections over 2,000 endpoints: mostly distinct
    # flowctl trace follows both levels: the top group's bucket, then the sub-group's
    from flowcni.ctl.trace import Tracer
    hop = Tracer(olab).trace("default/client1", "default/big").service
    assert hop["endpoint"] in eps and hop["group"] == top_id, hop
    assert len(hop["buckets"]) == 2, hop


SYNS = r"""
import socket, sys, time
socks = []
for i in range(int(sys.argv[3])):
    s = socket.socket(); s.setblocking(False)
    s.connect_ex((sys.argv[1], int(sys.argv[2]))); socks.append(s)
time.sleep(1)
"""


def run_in(lab: Lab, pod: str, script: str, *args: str) -> str:
    p = subprocess.run(lab.exec_argv(pod, [sys.executable, "-c", script, *args]),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


UDP_CLIENT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3)
s.bind(("0.0.0.0", 40053))  # one source port: one conntrack entry for the whole run
end = time.time() + float(sys.argv[2])
while time.time() < end:
    s.sendto(b"x", (sys.argv[1], 53))
    try:
        print(s.recv(100).decode().split()[0], flush=True)
    except OSError:
        print("-", flush=True)
    time.sleep(0.1)
"""


def test_removed_udp_endpoint_conntrack_is_flushed(olab: Lab) -> None:
    """A UDP client that keeps one source port sticks to its endpoint through the
    conntrack entry. When that endpoint leaves the Service (the pod itself stays up
    and would keep answering), the entry is flushed and the client's next datagrams
    reach the remaining endpoint."""
    ips = {p.name: p.ip for p in olab.pods()}
    put_service(olab, "udp", VIP_UDP, "[{port: 53, protocol: UDP}]")
    put_slice(olab, "udp", [ips["u1"], ips["u2"]], 53, "UDP")
    olab.wait_realized(timeout=30)
    p = subprocess.Popen(olab.exec_argv("default/client1",
                                        [sys.executable, "-c", UDP_CLIENT, VIP_UDP, "40"]),
                         stdout=subprocess.PIPE, text=True)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(ln.strip() for ln in p.stdout or []),
                              daemon=True)
    reader.start()
    try:
        assert eventually(lambda: len([g for g in got if g != "-"]) >= 5, timeout=20), got
        first = next(g for g in got if g != "-")
        assert all(g in (first, "-") for g in got), got  # one entry: one endpoint
        other = "u2" if first == "u1" else "u1"
        put_slice(olab, "udp", [ips[other]], 53, "UDP")
        # realized = the new groups installed and the stale entries flushed (the agent
        # flushes before it reports the revision), so from here on every answer is the
        # remaining endpoint's; two entries are left for a datagram in flight (its
        # answer, or the timeout it printed before that answer was read)
        olab.wait_realized(timeout=30)
        mark = len(got) + 2
        time.sleep(1.5)
        after = [g for g in got[mark:] if g != "-"]
        assert after and all(g == other for g in after), got[mark:]
        # The Service goes: its last endpoint's entries go too (one flush for the
        # ClusterIP and port), so the still-running pod stops answering this client,
        # while the same pod answers on its own address (the control, at the same time).
        olab.store().delete("EndpointSlice", "default", "udp-1")
        olab.store().delete("Service", "default", "udp")
        olab.wait_realized(timeout=30)
        mark = len(got) + 2
        direct = replies(olab, "default/client1", [f"{ips[other]}:53u"])
        time.sleep(1.5)
        assert direct == {f"{ips[other]}:53u": f"{other} ping"}, direct
        assert got[mark:] and all(g == "-" for g in got[mark:]), got[mark:]
    finally:
        p.kill()
        p.wait()
        olab.store().delete("EndpointSlice", "default", "udp-1")
        olab.store().delete("Service", "default", "udp")
        olab.wait_realized(timeout=30)


VIP_TR1, VIP_TR2 = "10.96.7.3", "10.96.7.4"


def test_trace_to_a_service_shows_the_hop_and_agrees_with_a_probe(
        olab: Lab, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`flowctl trace --to NS/NAME`: the ServiceLB step, the group, the bucket taken and
    the endpoint it DNATs to, then the endpoint's node and pod. With one endpoint (on the
    other node) the trace and a real request must name the same pod; with two, the
    trace must end at the pod of the endpoint it reports."""
    from flowcni.ctl.flowctl import main as flowctl
    from flowcni.ctl.trace import Tracer

    from tests.support.svc import replies
    ips = {p.name: p.ip for p in olab.pods()}
    put_service(olab, "tr1", VIP_TR1, "[{port: 80, protocol: TCP}]")
    put_slice(olab, "tr1", [ips["u2"]], 80, "TCP")
    put_service(olab, "tr2", VIP_TR2, "[{name: web, port: 8080, targetPort: 80}]", "app: u")
    olab.wait_realized(timeout=30)
    try:
        tracer = Tracer(olab)
        v = tracer.trace("default/client1", "default/tr1")
        assert v.delivered and v.pod == "default/u2" and v.node == "node2", v.detail
        assert v.service["endpoint"] == f"{ips['u2']}:80", v.service
        assert v.service["service"] == "default/tr1" and v.service["group"]
        assert any("select group" in s.story for s in v.steps if s.table == "ServiceLB")
        assert {s.node for s in v.steps} == {"node1", "node2"}
        assert replies(olab, "default/client1", [f"{VIP_TR1}:80"]) == {
            f"{VIP_TR1}:80": "u2 ping"}
        # two endpoints: the datapath hashes, the trace resumes with a stand-in hash
        v = Tracer(olab).trace("default/client1", "default/tr2:web")
        ep = v.service["endpoint"]
        assert ep in (f"{ips['u1']}:80", f"{ips['u2']}:80"), v.service
        owner = "u1" if ep.startswith(ips["u1"] + ":") else "u2"
        assert v.delivered and v.pod == f"default/{owner}", (v.detail, ep)
        assert v.service["dp_hash"] and len(v.service["buckets"]) == 1
        # the same by ClusterIP and port, and on the command line
        assert Tracer(olab).trace("default/client1", VIP_TR2, dport=8080).service["endpoint"] == ep
        monkeypatch.setenv("FLOWCNI_LAB_DIR", olab.base)
        monkeypatch.setenv("FLOWCNI_LAB_PREFIX", olab.prefix)
        assert flowctl(["trace", "--from", "default/client1", "--to", "default/tr1"]) == 0
        out = capsys.readouterr().out
        assert f"Service default/tr1 {VIP_TR1}:80/TCP: group" in out, out
        assert f"endpoint {ips['u2']}:80" in out and "delivered to pod default/u2" in out, out
        assert flowctl(["trace", "--from", "default/client1", "--to", "default/tr1:99"]) != 0
        assert "has no port '99'" in capsys.readouterr().err
    finally:
        for kind, name in (("EndpointSlice", "tr1-1"), ("Service", "tr1"), ("Service", "tr2")):
            olab.store().delete(kind, "default", name)
        olab.wait_realized(timeout=30)
