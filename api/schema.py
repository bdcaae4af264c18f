"""The agent API: one typed request/response schema for the agent and flowctl.

Why a package of its own: the agent (controller/) serves this API and the
CLI (ctl/) calls it; neither should import the other, and the schema must
stay importable where only the standard library is (a node's debug shell, a
container with flowctl alone). So both depend downwards on this module and
this module depends on nothing.

Wire format: one JSON request per connection on a unix socket (the client
half-closes after sending), one JSON reply:

    request  {"verb": "flows", "args": {"table": "Classifier"}}
    reply    {"ok": true, "result": {...}}
             {"ok": false, "error": {"code": "not-found", "message": "..."}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_SOCKET = "/run/flowcni/agent.sock"
SOCKET_ENV = "FLOWCNI_AGENT_SOCKET"
MAX_MESSAGE = 64 << 20

# verb -> what it answers (shown by `flowctl --help` and in errors).
VERBS: dict[str, str] = {
    "status": "the agent's node, bridge, datastore, OpenFlow connection and counters",
    "tables": "the pipeline's table names and numbers",
    "flows": "flows as OVS holds them (OpenFlow flow stats), with owners; args: table",
    "groups": "OpenFlow groups as OVS holds them",
    "owners": "owner ids (as in cookies) -> owner keys and objects",
    "pods": "pods attached on this node (namespace, name, IP, MAC, ofport)",
    "stale": "drift: desired flows OVS lacks and flows OVS holds that nobody wants",
    "policy": "NetworkPolicy rules and isolated pods as realized, with packets allowed; "
              "args: packets (default true)",
    "services": "Services as programmed here: ClusterIP, ports, endpoints, group and "
                "packets per bucket",
    "trace": "ofproto/trace of a flow on the agent's bridge, as structured steps; args: flow",
    "traceflow": "live trace: args: step (arm|inject|collect|disarm), dscp, ...",
    "tenants": "tenant networks as resolved here: VNI, zone, subnets, this node's slice, "
               "namespaces, pods, conditions",
}

# Error codes: what went wrong, in a word a script can test.
BAD_REQUEST = "bad-request"  # malformed request, missing or wrong argument
UNKNOWN_VERB = "unknown-verb"
NOT_FOUND = "not-found"  # a table, pod, ... named in the request does not exist
UNAVAILABLE = "unavailable"  # the agent cannot answer now (switch not connected, ...)
INTERNAL = "internal"
ERROR_CODES = (BAD_REQUEST, UNKNOWN_VERB, NOT_FOUND, UNAVAILABLE, INTERNAL)


class APIError(Exception):
    """An error reply (raised by the agent's handlers, re-raised by clients)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


@dataclass(frozen=True)
class Request:
    verb: str
    args: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"verb": self.verb, "args": self.args}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Request:
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise APIError(BAD_REQUEST, f"request is not JSON: {e}") from e
        if not isinstance(d, dict) or not isinstance(d.get("verb"), str):
            raise APIError(BAD_REQUEST, "request must be an object with a string 'verb'")
        args = d.get("args", {})
        if not isinstance(args, dict):
            raise APIError(BAD_REQUEST, "'args' must be an object")
        if d["verb"] not in VERBS:
            raise APIError(UNKNOWN_VERB, f"unknown verb {d['verb']!r}; "
                                         f"known: {', '.join(VERBS)}")
        return cls(d["verb"], args)


def encode_reply(result: dict[str, Any] | None = None, error: APIError | None = None) -> bytes:
    if error is not None:
        return json.dumps({"ok": False, "error": {"code": error.code,
                                                  "message": error.message}}).encode()
    return json.dumps({"ok": True, "result": result or {}}).encode()


def decode_reply(raw: bytes) -> dict[str, Any]:
    """The result of a reply; raises APIError for an error reply or a malformed one."""
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise APIError(INTERNAL, f"agent reply is not JSON: {raw[:200]!r}") from e
    if not isinstance(d, dict) or "ok" not in d:
        raise APIError(INTERNAL, f"agent reply has no 'ok': {raw[:200]!r}")
    if not d["ok"]:
        err = d.get("error") or {}
        raise APIError(str(err.get("code", INTERNAL)), str(err.get("message", "")))
    result: dict[str, Any] = d.get("result") or {}
    return result


def arg(req: Request, name: str, kind: type, required: bool = True, default: Any = None) -> Any:
    """One argument of a request, type-checked; the error names it."""
    if name not in req.args or req.args[name] is None:
        if required:
            raise APIError(BAD_REQUEST, f"{req.verb}: argument {name!r} is required")
        return default
    v = req.args[name]
    if kind is int and isinstance(v, bool) or not isinstance(v, kind):
        raise APIError(BAD_REQUEST, f"{req.verb}: argument {name!r} must be {kind.__name__}")
    return v


# -- result types -------------------------------------------------------------------


class _Record:
    """to_dict / from_dict for the dataclasses below (unknown keys are ignored, so an
    older client reads a newer agent's reply)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FlowRow(_Record):
    """One flow as OVS holds it (`flows` returns a list of these)."""

    table: str
    table_id: int
    priority: int
    match: str
    actions: str
    cookie: str
    round: int
    feature: str
    owner_id: str
    owner: str = ""
    object: str = ""
    n_packets: int = 0
    n_bytes: int = 0
    duration_s: float = 0.0
    # False when OVS holds actions other than the ones the agent wants for this flow.
    as_desired: bool = True

    def text(self, stats: bool = True) -> str:
        s = f"[{self.feature} r{self.round}] table={self.table} priority={self.priority}"
        if self.match:
            s += f" {self.match}"
        s += f" actions={self.actions}"
        if self.object:
            s += f"  # {self.object}"
        if not self.as_desired:
            s += "  (actions differ from the agent's)"
        if stats:
            s += f"  (packets={self.n_packets} bytes={self.n_bytes})"
        return s


@dataclass
class GroupRow(_Record):
    group_id: int
    type: str
    buckets: list[str]


@dataclass
class TraceStep(_Record):
    """One table visit of an ofproto/trace, on one node."""

    node: str
    table: str
    table_id: int
    priority: int | None = None
    cookie: str = ""
    owner: str = ""
    object: str = ""
    actions: list[str] = field(default_factory=list)
    no_match: bool = False
    story: str = ""


@dataclass
class TraceResult(_Record):
    """What the agent's `trace` verb returns: steps on its bridge and where the packet
    leaves it (`output_name`: "pod NS/NAME", "gateway", "tunnel", "port N" or "")."""

    node: str
    steps: list[TraceStep]
    datapath_actions: str
    output_port: int | None
    output_name: str
    tunnel: bool = False
    tunnel_dst: str = ""
    # [group id, bucket] of each select group the packet went through, and the
    # first DNAT a bucket applied ("IP:PORT"): a Service's chosen endpoint
    groups: list[list[int]] = field(default_factory=list)
    nat_dst: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceResult:
        return cls(node=d["node"], steps=[TraceStep.from_dict(s) for s in d["steps"]],
                   datapath_actions=d["datapath_actions"], output_port=d["output_port"],
                   output_name=d["output_name"], tunnel=bool(d.get("tunnel")),
                   tunnel_dst=d.get("tunnel_dst", ""),
                   groups=[list(g) for g in d.get("groups") or []],
                   nat_dst=d.get("nat_dst", ""))
