"""healthCheckNodePort answers (controller/healthcheck.py) on the loopback, and the
local endpoint counts ServiceProxy gives them: what a load balancer sees of a node."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

from flowcni.controller.healthcheck import HealthChecks, answer
from flowcni.flows.services import ServiceProxy


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def get(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_answer_is_200_with_local_endpoints_and_503_without() -> None:
    assert answer("d/web", 2) == (200, json.dumps({
        "service": {"namespace": "d", "name": "web"}, "localEndpoints": 2,
        "serviceProxyHealthy": True}).encode())
    assert answer("d/web", 0)[0] == 503


def test_listeners_follow_sync_and_counts_change_in_place() -> None:
    hc = HealthChecks("127.0.0.1")
    a, b = free_port(), free_port()
    try:
        assert hc.sync({a: ("d/web", 1), b: ("d/db", 0)}) == []
        assert get(a) == (200, {"service": {"namespace": "d", "name": "web"},
                                "localEndpoints": 1, "serviceProxyHealthy": True})
        assert get(b)[0] == 503 and get(b)[1]["localEndpoints"] == 0
        assert hc.sync({a: ("d/web", 0), b: ("d/db", 3)}) == []
        assert get(a)[0] == 503 and get(b) == (200, {"service": {"namespace": "d",
                                                                 "name": "db"},
                                                     "localEndpoints": 3,
                                                     "serviceProxyHealthy": True})
        hc.sync({b: ("d/db", 3)})
        assert hc.ports() == [b]
        probe = socket.socket()
        assert probe.connect_ex(("127.0.0.1", a)) != 0  # the listener is gone
        probe.close()
    finally:
        hc.stop()
    assert hc.ports() == []


def test_a_port_held_by_another_process_is_reported_and_retried() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = int(holder.getsockname()[1])
    hc = HealthChecks("127.0.0.1")
    try:
        problems = hc.sync({port: ("d/web", 1)})
        assert len(problems) == 1 and problems[0].startswith(
            f"service d/web: healthCheckNodePort {port}: "), problems
        assert hc.ports() == []
        holder.close()
        assert hc.sync({port: ("d/web", 1)}) == [] and get(port)[0] == 200
    finally:
        holder.close()
        hc.stop()


def test_service_proxy_counts_this_nodes_endpoints() -> None:
    spec = {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 30500,
            "ports": [{"port": 80, "nodePort": 30080}]}
    pods = [{"namespace": "d", "name": n, "ip": ip, "labels": {"app": "web"}, "node": "n",
             "ports": []} for n, ip in (("a", "10.244.1.5"), ("b", "10.244.1.6"),
                                        ("c", "10.244.2.5"))]
    here = ServiceProxy(local_cidr="10.244.1.0/24")
    assert here.load([{"namespace": "d", "name": "web", "spec": spec}], pods)[2] == []
    assert here.health_checks() == {30500: ("d/web", 2)}
    empty = ServiceProxy(local_cidr="10.244.3.0/24")
    empty.load([{"namespace": "d", "name": "web", "spec": spec}], pods)
    assert empty.health_checks() == {30500: ("d/web", 0)}
    plain = ServiceProxy(local_cidr="10.244.1.0/24")
    plain.load([{"namespace": "d", "name": "web", "spec": {
        **spec, "externalTrafficPolicy": "Cluster", "healthCheckNodePort": None}}], pods)
    assert plain.health_checks() == {}
