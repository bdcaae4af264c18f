"""The flowcni CNI plugin executable: validate, forward to the agent, report.

The runtime execs this once per pod sandbox operation, so it is kept thin and
fast to start: it validates the CNI environment and network config, forwards
the request over a unix socket to the long-running flowcni agent (which owns
OVS, IPAM and the netns plumbing) and translates the agent's reply into the
CNI result or error format.

Start-up is most of a plugin run, so only modules that are built into the
interpreter or are small C extensions are imported: ``posix`` rather than
``os`` (whose frozen import still builds ``_collections_abc``, ~2 ms),
``_socket`` rather than ``socket`` (``enum``, ``selectors``, ``array``) and
:mod:`flowcni.cni.spec`'s JSON helpers rather than ``json`` (``re``, ``enum``).
There is no ``from __future__ import annotations`` (it imports a module);
annotations naming typing-only types are strings.
"""

import _socket
import posix
import sys
import time

from flowcni.cni import spec
from flowcni.cni.spec import CNIError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs several ms at start-up; only mypy needs it
    from collections.abc import Mapping
    from typing import Any, BinaryIO, TextIO

#: Seconds to wait for the agent; ADD may include IPAM and OVS work.
DEFAULT_AGENT_TIMEOUT = 60.0
TIMEOUT_ENV = "FLOWCNI_AGENT_TIMEOUT"
#: A sane reply is a few KiB; refuse to buffer an endless stream.
MAX_REPLY_BYTES = 16 * 1024 * 1024
#: Linux IFNAMSIZ is 16 including the trailing NUL.
MAX_IFNAME_LEN = 15

FORWARDED_COMMANDS = (spec.CMD_ADD, spec.CMD_DEL, spec.CMD_CHECK, spec.CMD_GC, spec.CMD_STATUS)
#: Commands acting on one container attachment, which need the container env.
ATTACHMENT_COMMANDS = (spec.CMD_ADD, spec.CMD_DEL, spec.CMD_CHECK)


def environ() -> "dict[str, str]":
    """The process environment as text, decoded as ``os.environ`` would.

    ``posix.environ`` holds bytes; ``os`` decodes with the filesystem encoding
    and "surrogateescape", so undecodable bytes survive the round trip.
    """
    enc = sys.getfilesystemencoding()
    return {
        key.decode(enc, "surrogateescape"): value.decode(enc, "surrogateescape")
        for key, value in posix.environ.items()
    }


def path_exists(path: str) -> bool:
    """``os.path.exists`` without ``os``: false for missing, unreadable or invalid paths."""
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def read_stdin(stream: "BinaryIO | None") -> bytes:
    """Read the whole config; a terminal or closed stdin counts as empty.

    Treating a tty as empty lets an operator run ``CNI_COMMAND=VERSION flowcni``
    by hand without the plugin hanging on input.
    """
    if stream is None:
        return b""
    try:
        if stream.isatty():
            return b""
    except (OSError, ValueError):
        return b""
    return stream.read()


def reply_version(stdin_bytes: bytes) -> str:
    """Version to stamp on our output: the config's if we support it, else latest.

    Errors can happen before (or because) the config parses, so this is a
    best-effort look that never raises.
    """
    try:
        conf = spec.loads(stdin_bytes)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return spec.LATEST_VERSION
    if isinstance(conf, dict) and spec.is_supported_version(conf.get("cniVersion")):
        return str(conf["cniVersion"])
    return spec.LATEST_VERSION


def validate_ifname(ifname: str) -> None:
    """Reject names the kernel would refuse, before asking the agent to create one."""
    bad = (
        not ifname
        or len(ifname) > MAX_IFNAME_LEN
        or ifname in (".", "..")
        or any(ch == "/" or ch == ":" or ch.isspace() for ch in ifname)
    )
    if bad:
        raise CNIError(
            spec.ERR_INVALID_ENV,
            f"CNI_IFNAME {ifname!r} is not a valid interface name",
            f"must be 1..{MAX_IFNAME_LEN} characters without '/', ':' or whitespace",
        )


def _require_env(env: "Mapping[str, str]", name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CNIError(spec.ERR_INVALID_ENV, f"required environment variable {name} is not set")
    return value


def agent_timeout(env: "Mapping[str, str]") -> float:
    """Seconds to wait for the agent, overridable for slow nodes or tests."""
    raw = env.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_AGENT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    # NaN fails both comparisons, so it is rejected too.
    if not 0 < value < float("inf"):
        raise CNIError(
            spec.ERR_INVALID_ENV,
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds",
        )
    return value


def _check_valid_attachments(conf: "dict[str, Any]") -> None:
    """GC must not delete attachments the runtime still uses, so insist on a sane list."""
    if spec.VALID_ATTACHMENTS_KEY not in conf:
        return
    items = conf[spec.VALID_ATTACHMENTS_KEY]
    ok = isinstance(items, list) and all(
        isinstance(item, dict)
        and isinstance(item.get("containerID"), str)
        and isinstance(item.get("ifname"), str)
        for item in items
    )
    if not ok:
        raise CNIError(
            spec.ERR_INVALID_NETWORK_CONFIG,
            f"{spec.VALID_ATTACHMENTS_KEY} must be a list of {{containerID, ifname}} objects",
        )


def build_request(
    command: str, env: "Mapping[str, str]", conf: "dict[str, Any]"
) -> "dict[str, Any]":
    """Validate the CNI environment for ``command`` and build the agent request."""
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    netns = env.get("CNI_NETNS", "")
    if command in ATTACHMENT_COMMANDS:
        container_id = _require_env(env, "CNI_CONTAINERID")
        ifname = _require_env(env, "CNI_IFNAME")
        validate_ifname(ifname)
    if command in (spec.CMD_ADD, spec.CMD_CHECK):
        netns = _require_env(env, "CNI_NETNS")
        if not path_exists(netns):
            raise CNIError(
                spec.ERR_INVALID_ENV,
                f"CNI_NETNS path {netns!r} does not exist",
            )
    # DEL: a missing or vanished netns is normal (sandbox already gone); the
    # agent still has to release IPs and OVS ports, so forward it as-is.
    if command == spec.CMD_GC:
        _check_valid_attachments(conf)
    return {
        "command": command,
        "containerID": container_id,
        "netns": netns,
        "ifname": ifname,
        "args": spec.parse_cni_args(env.get("CNI_ARGS", "")),
        "path": env.get("CNI_PATH", ""),
        "config": conf,
    }


def _unavailable(command: str, path: str, why: str) -> CNIError:
    """Agent unreachable: ask the runtime to retry (STATUS: say we're not ready)."""
    if command == spec.CMD_STATUS:
        return CNIError(
            spec.ERR_PLUGIN_NOT_AVAILABLE, f"flowcni agent at {path} is not available", why
        )
    return CNIError(
        spec.ERR_TRY_AGAIN_LATER,
        f"flowcni agent at {path} is not reachable; try again later",
        why,
    )


def _connect(path: str, deadline: float) -> "Any":
    """Return a socket connected to the agent, retrying while its queue is full.

    A Unix socket with a timeout is non-blocking underneath, so a full listen
    backlog shows up as EAGAIN at once instead of a wait; that is overload,
    not absence, and is retried (on a fresh socket) until the deadline.
    """
    pause = 0.002
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out connecting to the agent")
        # The bare C socket has no context manager; it raises the same
        # OSError subclasses as socket.socket (its timeout is TimeoutError).
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(remaining)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.05)
        except BaseException:
            sock.close()
            raise


def exchange(path: str, request: "dict[str, Any]", timeout: float) -> bytes:
    """Send one JSON request to the agent and return its raw reply.

    The protocol is one object each way; half-closing the write side marks the
    end of the request, EOF marks the end of the reply. ``timeout`` bounds the
    whole exchange, not each read. Socket errors propagate to the caller.
    """
    deadline = time.monotonic() + timeout
    payload = spec.dumps(request).encode("utf-8")
    sock = _connect(path, deadline)
    try:
        sock.sendall(payload)
        sock.shutdown(_socket.SHUT_WR)
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the agent's reply")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                raise CNIError(
                    spec.ERR_IO_FAILURE,
                    f"reply from flowcni agent at {path} exceeds {MAX_REPLY_BYTES} bytes",
                )
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks)


def call_agent(path: str, request: "dict[str, Any]", timeout: float) -> "dict[str, Any]":
    """Forward ``request`` and map transport failures to CNI error codes."""
    command = str(request.get("command", ""))
    try:
        raw = exchange(path, request, timeout)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _unavailable(command, path, f"socket does not exist: {exc}") from None
    except (TimeoutError, ConnectionError, BlockingIOError) as exc:
        # Refused/reset/timed out: the agent is down, restarting or overloaded.
        raise _unavailable(command, path, f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise CNIError(
            spec.ERR_IO_FAILURE, f"talking to flowcni agent at {path} failed", str(exc)
        ) from None
    return parse_reply(raw, path)


def parse_reply(raw: bytes, path: str) -> "dict[str, Any]":
    """Decode the agent's reply; raise its error, or return it when ``ok``."""
    try:
        reply = spec.loads(raw)
    except ValueError as exc:  # includes UnicodeDecodeError
        raise CNIError(
            spec.ERR_IO_FAILURE, f"malformed reply from flowcni agent at {path}", str(exc)
        ) from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise CNIError(
            spec.ERR_IO_FAILURE,
            f"malformed reply from flowcni agent at {path}",
            "expected an object with a boolean 'ok'",
        )
    if reply["ok"]:
        return reply
    code, msg, details = reply.get("code"), reply.get("msg"), reply.get("details", "")
    if (
        isinstance(code, bool)
        or not isinstance(code, int)
        or not isinstance(msg, str)
        or not isinstance(details, str)
    ):
        raise CNIError(
            spec.ERR_IO_FAILURE,
            f"malformed error reply from flowcni agent at {path}",
            "expected integer 'code' and string 'msg'/'details'",
        )
    raise CNIError(code, msg, details)


def run(env: "Mapping[str, str]", stdin_bytes: bytes) -> "dict[str, Any] | None":
    """Execute one CNI invocation; return the object to print, or None for silence."""
    command = env.get("CNI_COMMAND", "")
    if command not in spec.ALL_COMMANDS:
        raise CNIError(
            spec.ERR_INVALID_ENV,
            f"CNI_COMMAND {command!r} is not set or not supported",
            "expected one of " + ", ".join(spec.ALL_COMMANDS),
        )
    if command == spec.CMD_VERSION:
        # Discovery must work whatever the caller sends, so never fail here.
        return spec.version_result(reply_version(stdin_bytes))

    conf = spec.parse_config(stdin_bytes)
    cni_version: str = conf["cniVersion"]
    spec.check_command_allowed(command, cni_version)
    request = build_request(command, env, conf)
    if command in (spec.CMD_ADD, spec.CMD_CHECK):
        spec.check_prev_result(conf, command)
    path, timeout = spec.agent_socket(conf), agent_timeout(env)
    reply = call_agent(path, request, timeout)
    if command != spec.CMD_ADD:
        return None
    try:
        result = reply.get("result")
        if not isinstance(result, dict):
            raise CNIError(
                spec.ERR_IO_FAILURE,
                "malformed reply from flowcni agent: ADD succeeded without a result object",
            )
        return spec.format_result(result, cni_version, conf.get("prevResult"))
    except CNIError:
        # The agent attached the pod but the runtime gets an error: it will not
        # send a DEL for an ADD it saw fail, so undo the attachment here.
        try:
            call_agent(path, {**request, "command": spec.CMD_DEL}, timeout)
        except CNIError:
            pass
        raise


def _emit(out: "TextIO", obj: "dict[str, Any]") -> None:
    out.write(spec.dumps(obj, indent=2) + "\n")
    out.flush()


def main() -> int:
    """Entry point: run the command, print result or error JSON, return exit code."""
    stdin_bytes = b""
    try:
        stdin_bytes = read_stdin(sys.stdin.buffer if sys.stdin is not None else None)
        output = run(environ(), stdin_bytes)
    except CNIError as err:
        _emit(sys.stdout, err.to_json(reply_version(stdin_bytes)))
        return 1
    except Exception as exc:  # never let a traceback reach the runtime
        generic = CNIError(spec.ERR_IO_FAILURE, f"unexpected error: {type(exc).__name__}: {exc}")
        _emit(sys.stdout, generic.to_json(reply_version(stdin_bytes)))
        return 1
    if output is not None:
        _emit(sys.stdout, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
