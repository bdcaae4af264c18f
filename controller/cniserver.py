"""The agent's unix socket: CNI requests from the plugin, status for flowctl.

One JSON request per connection (the client half-closes after sending), one
JSON reply. The socket is created mode 0600 in a 0700 directory: only root
can attach pods.
"""

from __future__ import annotations

import json
import logging
import socketserver
import time
from collections.abc import Callable
from typing import Any

from flowcni.cni import spec
from flowcni.controller.unixserver import Server, UnixServer

LOG = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def _refuse(code: int, msg: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "msg": msg, "details": ""}


class _Conn(socketserver.StreamRequestHandler):
    server: Server

    def handle(self) -> None:
        raw = self.rfile.read(spec.MAX_REQUEST_BYTES + 1)
        if len(raw) > spec.MAX_REQUEST_BYTES:
            # Permanent: the same request would be refused again.
            reply = _refuse(spec.ERR_INVALID_NETWORK_CONFIG,
                            f"request over the agent's limit of {spec.MAX_REQUEST_BYTES} "
                            "bytes (MAX_REQUEST_BYTES)")
            self.wfile.write(json.dumps(reply).encode())
            return
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("request is not a JSON object")
        except (ValueError, RecursionError) as e:
            reply = _refuse(spec.ERR_DECODE, spec.one_line(f"bad request: {e}"))
        else:
            reply = self.server.context(req)
        self.wfile.write(json.dumps(reply).encode())


class CNIServer(UnixServer):
    def __init__(self, path: str, dispatch: Handler) -> None:
        super().__init__(path, _Conn, dispatch, name="cni-server")


def timed(fn: Handler, observe: Callable[[str, float, bool], None]) -> Handler:
    """Wrap a dispatcher to report each command's latency and whether it succeeded."""
    def run(req: dict[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        reply = fn(req)
        observe(str(req.get("command", "?")), time.perf_counter() - t, bool(reply.get("ok")))
        return reply
    return run
