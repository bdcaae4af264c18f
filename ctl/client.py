"""Talking to an agent's API socket (flowctl and the lab use this; the CNI plugin has
its own stdlib copy of the CNI wire format in flowcni.cni.plugin)."""

from __future__ import annotations

import socket
from typing import Any, Protocol

from flowcni.api import schema as api
from flowcni.api.schema import APIError, Request


class AgentError(RuntimeError):
    """The agent answered with an error, or could not be reached (`code` says which)."""

    def __init__(self, message: str, code: str = api.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


UNREACHABLE = "unreachable"


class Caller(Protocol):
    def call(self, verb: str, **args: Any) -> dict[str, Any]: ...


class AgentClient:
    """One agent's API over its unix socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout

    def exchange(self, raw: bytes) -> bytes:
        """Send one encoded request, return the raw reply."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.path)
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
                return b"".join(iter(lambda: s.recv(65536), b""))
        except FileNotFoundError as e:
            raise AgentError(f"no agent API socket at {self.path} (is flowcni-agent running "
                             "on this node? set --agent-socket or FLOWCNI_AGENT_SOCKET)",
                             UNREACHABLE) from e
        except OSError as e:
            raise AgentError(f"agent API at {self.path}: {e}", UNREACHABLE) from e

    def call(self, verb: str, **args: Any) -> dict[str, Any]:
        return decode(verb, self.exchange(Request(verb, args).encode()))

    def status(self) -> dict[str, Any]:
        return self.call("status")


def decode(verb: str, raw: bytes) -> dict[str, Any]:
    if not raw:
        raise AgentError(f"{verb}: the agent closed the connection without a reply",
                         UNREACHABLE)
    try:
        return api.decode_reply(raw)
    except APIError as e:
        raise AgentError(f"{verb}: {e.message}", e.code) from e
