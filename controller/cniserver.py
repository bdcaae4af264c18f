"""The agent's unix socket: CNI requests from the plugin, status for flowctl.

One JSON request per connection (the client half-closes after sending), one
JSON reply. The socket is created mode 0600 in a 0700 directory: only root
can attach pods.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from flowcni.cni import spec

LOG = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def _refuse(code: int, msg: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "msg": msg, "details": ""}


class _Conn(socketserver.StreamRequestHandler):
    server: _Server

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
            reply = self.server.dispatch(req)
        self.wfile.write(json.dumps(reply).encode())


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # socketserver's default backlog of 5 makes a burst of plugin calls (a
    # node starting 50 pods at once) fail to connect with EAGAIN; the kernel
    # caps this at net.core.somaxconn.
    request_queue_size = 1024
    dispatch: Handler


class CNIServer:
    def __init__(self, path: str, dispatch: Handler) -> None:
        self.path = path
        d = os.path.dirname(path)
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self.server = _Server(path, _Conn)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.server.dispatch = dispatch
        self.thread = threading.Thread(target=self.server.serve_forever, name="cni-server",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def timed(fn: Handler, observe: Callable[[str, float, bool], None]) -> Handler:
    """Wrap a dispatcher to report each command's latency and whether it succeeded."""
    def run(req: dict[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        reply = fn(req)
        observe(str(req.get("command", "?")), time.perf_counter() - t, bool(reply.get("ok")))
        return reply
    return run
