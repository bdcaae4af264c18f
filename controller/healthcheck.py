"""healthCheckNodePort: each node tells load balancers whether it has a local endpoint.

A LoadBalancer Service with externalTrafficPolicy Local only serves from
nodes that hold one of its endpoints (flows.nodeport drops the rest, keeping
the client's address). The cloud load balancer learns which nodes those are
by asking every node on `spec.healthCheckNodePort`; kube-proxy answers there
over HTTP, 200 when the node has local endpoints and 503 when it has none,
with a small JSON body naming the Service and the count. With flowcni's own
proxy (no kube-proxy) the agent answers instead, in the node's network
namespace, on every node address.

One listener per port, started and stopped as Services come and go; the
counts change in place (an endpoint moving does not restart a listener).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOG = logging.getLogger("flowcni.healthcheck")

Checks = dict[int, tuple[str, int]]  # port -> (Service "ns/name", local endpoints)


def answer(service: str, local: int) -> tuple[int, bytes]:
    """HTTP status and body for a Service with `local` endpoints on this node."""
    ns, _, name = service.partition("/")
    body = {"service": {"namespace": ns, "name": name}, "localEndpoints": local,
            "serviceProxyHealthy": True}
    return (200 if local > 0 else 503), json.dumps(body).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], checks: HealthChecks) -> None:
        self.checks = checks
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        got = self.server.checks.lookup(self.server.server_address[1])
        status, body = answer(*got) if got else (404, b"{}")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a load balancer probes every few seconds: not worth a log line each


class HealthChecks:
    """The node's health-check listeners, one per healthCheckNodePort."""

    def __init__(self, host: str = "") -> None:
        self.host = host  # "": every IPv4 address of the node
        self._lock = threading.Lock()
        self._checks: Checks = {}
        self._servers: dict[int, _Server] = {}

    def lookup(self, port: int) -> tuple[str, int] | None:
        with self._lock:
            return self._checks.get(port)

    def ports(self) -> list[int]:
        """The ports listened on now."""
        with self._lock:
            return sorted(self._servers)

    def sync(self, checks: Checks) -> list[str]:
        """Listen on exactly `checks`' ports, answering with their counts; returns the
        problems (a port another process holds), retried at the next sync."""
        problems = []
        with self._lock:
            self._checks = dict(checks)
            gone = [p for p in self._servers if p not in checks]
            stopping = [self._servers.pop(p) for p in gone]
            for port, (svc, _) in sorted(checks.items()):
                if port in self._servers:
                    continue
                try:
                    srv = _Server((self.host, port), self)
                except OSError as e:
                    problems.append(f"service {svc}: healthCheckNodePort {port}: {e.strerror}")
                    continue
                self._servers[port] = srv
                threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                 name=f"healthcheck-{port}", daemon=True).start()
        for srv in stopping:
            srv.shutdown()
            srv.server_close()
        return problems

    def stop(self) -> None:
        self.sync({})
