"""Talking to an agent's unix socket (flowctl and the lab use this; the plugin has its own
stdlib copy of the wire format in flowcni.cni.plugin)."""

from __future__ import annotations

import json
import socket
from typing import Any


class AgentError(RuntimeError):
    pass


class AgentClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout

    def call(self, command: str, **fields: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(json.dumps({"command": command, **fields}).encode())
            s.shutdown(socket.SHUT_WR)
            buf = b"".join(iter(lambda: s.recv(65536), b""))
        reply: dict[str, Any] = json.loads(buf)
        if not reply.get("ok"):
            raise AgentError(f"{command}: {reply.get('msg')} (code {reply.get('code')})")
        return reply

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = self.call("_status")["status"]
        return st
