"""CNI specification concepts used by the flowcni plugin, kept in one place.

The plugin executable is started by the container runtime for every pod
sandbox, with ``python3 -I -S``, so every millisecond of module loading is
paid on each pod ADD/DEL. This module therefore imports only the C
accelerator ``_json`` (no ``json``: its decoder pulls in ``re`` and ``enum``,
~15 ms here; no ``typing``, no ``ipaddress``) and carries a tiny JSON
front-end of its own (:func:`loads`, :func:`dumps`). For the same reason it
has no ``from __future__ import annotations``: that statement imports the
``__future__`` module at run time, so annotations naming typing-only types
are written as strings instead.

Everything here is a pure function of its arguments, so the same rules can be
unit-tested without a runtime, a socket or Open vSwitch.
"""

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs several ms at start-up; only mypy needs it
    from typing import Any

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION: str = SUPPORTED_VERSIONS[-1]

#: Where the flowcni agent listens unless the network config says otherwise.
DEFAULT_AGENT_SOCKET = "/run/flowcni/cni.sock"

#: Config key (CNI 1.1) listing the attachments a GC call must keep.
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"

# Well-known error codes from the CNI specification ("Error" section).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO_FAILURE = 5
ERR_DECODE = 6
ERR_INVALID_NETWORK_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
# flowcni's own codes (the spec leaves 100 and above to plugins).
#: The node's pod CIDR has no free address; retrying does not help until a pod goes.
ERR_IP_EXHAUSTED = 100

#: Largest network config (and so agent request) flowcni accepts. Real configs
#: are a few KiB; a runtime sending more has a bug that retrying will not fix,
#: so going over it is a permanent error (code 7), never "try again later".
MAX_CONFIG_BYTES = 1 << 20
#: The agent reads at most this much of a request: a config plus the CNI env.
MAX_REQUEST_BYTES = MAX_CONFIG_BYTES + (64 << 10)
#: Error texts travel in JSON to a runtime's log line; keep them short.
MAX_ERROR_TEXT = 400

CMD_ADD = "ADD"
CMD_DEL = "DEL"
CMD_CHECK = "CHECK"
CMD_VERSION = "VERSION"
CMD_GC = "GC"
CMD_STATUS = "STATUS"

#: The oldest spec version in which each command exists. A runtime that speaks
#: an older version must never send a newer command, so receiving one is an
#: incompatibility rather than a generic error.
COMMAND_MIN_VERSION: dict[str, str] = {
    CMD_ADD: "0.3.0",
    CMD_DEL: "0.3.0",
    CMD_VERSION: "0.3.0",
    CMD_CHECK: "0.4.0",
    CMD_GC: "1.1.0",
    CMD_STATUS: "1.1.0",
}
ALL_COMMANDS: tuple[str, ...] = tuple(COMMAND_MIN_VERSION)

#: Keys a Kubernetes runtime (kubelet/containerd/CRI-O) puts in CNI_ARGS.
KNOWN_CNI_ARGS: frozenset[str] = frozenset(
    {
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
        "IgnoreUnknown",
    }
)

MTU_MIN = 576
MTU_MAX = 65535


class CNIError(Exception):
    """An error the plugin reports to the runtime as a CNI error object.

    Carrying the spec code (rather than only a message) lets the runtime react
    to it: e.g. code 11 makes it retry later instead of failing the pod.
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> "dict[str, Any]":
        """Return the JSON-ready error object to print on stdout."""
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": one_line(self.msg),
            "details": one_line(self.details),
        }

    def __repr__(self) -> str:
        return f"CNIError(code={self.code!r}, msg={self.msg!r}, details={self.details!r})"


def one_line(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` squeezed onto one line of at most ``limit`` characters.

    Error messages and details end up in a runtime's log next to a pod's
    events: a multi-line traceback or a kilobyte of library repr there helps
    nobody, so every error the agent or the plugin reports goes through this.
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def version_tuple(version: str) -> tuple[int, ...]:
    """Turn "1.0.0" into (1, 0, 0) so versions compare numerically, not as text."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION, f"malformed CNI version {version!r}"
        ) from None


def is_supported_version(version: object) -> bool:
    """True when ``version`` is a spec version this plugin implements."""
    return isinstance(version, str) and version in SUPPORTED_VERSIONS


def is_legacy_version(cni_version: str) -> bool:
    """True for the 0.x result format, whose IP entries carry a "version" key."""
    return version_tuple(cni_version) < (1, 0, 0)


def command_allowed(command: str, cni_version: str) -> bool:
    """Whether ``command`` exists in spec ``cni_version`` (e.g. CHECK needs 0.4.0)."""
    minimum = COMMAND_MIN_VERSION.get(command)
    if minimum is None:
        return False
    return version_tuple(cni_version) >= version_tuple(minimum)


def check_command_allowed(command: str, cni_version: str) -> None:
    """Raise code 1 when the runtime's config version predates ``command``."""
    if not command_allowed(command, cni_version):
        minimum = COMMAND_MIN_VERSION.get(command, "?")
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"command {command} is not defined by cniVersion {cni_version}",
            f"{command} requires cniVersion >= {minimum}",
        )


def version_result(cni_version: str) -> "dict[str, Any]":
    """The VERSION answer: which spec versions this plugin understands."""
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def parse_cni_args(s: str) -> dict[str, str]:
    """Parse CNI_ARGS ("K=V;K=V") into a dict, rejecting what we don't understand.

    Unknown keys are an error unless the runtime sets IgnoreUnknown, because
    the spec lets runtimes demand that a plugin honour every argument it gets.
    Empty segments (e.g. a trailing ';') are tolerated.
    """
    args: dict[str, str] = {}
    for pair in s.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(
                ERR_INVALID_ENV,
                f"CNI_ARGS: invalid pair {pair!r}",
                "expected KEY=VALUE pairs separated by ';'",
            )
        args[key] = value
    ignore_unknown = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    if not ignore_unknown:
        for key in args:
            if key not in KNOWN_CNI_ARGS:
                raise CNIError(
                    ERR_INVALID_ENV,
                    f"CNI_ARGS: unknown argument {key!r}",
                    "set IgnoreUnknown=1 to ignore arguments flowcni does not understand",
                )
    return args


# --- JSON without the json package -------------------------------------------------
#
# ``json`` itself costs ~15 ms to import under gVisor (its decoder compiles
# regular expressions, which loads ``re`` and ``enum``), more than the rest of
# a plugin run. Its C accelerator ``_json`` has everything needed to parse, and
# writing the few JSON types flowcni exchanges is a screenful of code.


class JSONDecodeError(ValueError):
    """Malformed JSON, with the position of the problem (like ``json.JSONDecodeError``).

    Kept separate from the stdlib class because that one lives in
    ``json.decoder``, whose import is exactly the cost this module avoids.
    """

    def __init__(self, msg: str, doc: str, pos: int) -> None:
        self.msg = msg
        self.pos = pos
        self.lineno = doc.count("\n", 0, pos) + 1
        self.colno = pos - doc.rfind("\n", 0, pos)
        super().__init__(f"{msg}: line {self.lineno} column {self.colno} (char {pos})")


_CONSTANTS: "dict[str, float]" = {
    "NaN": float("nan"),
    "Infinity": float("inf"),
    "-Infinity": float("-inf"),
}


class _ScanContext:
    """What ``_json.make_scanner`` reads from its argument: json's default decoder settings.

    The C scanner (CPython 3.11 Modules/_json.c, ``scanner_new``) takes these
    six attributes; ``int`` and ``float`` select its built-in number fast paths.
    """

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


# typeshed declares the argument as a make_scanner; the C code only reads attributes.
_scan_once = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
_WHITESPACE = " \t\n\r"  # JSON's insignificant whitespace; str.isspace() accepts more


def _skip_whitespace(text: str, idx: int) -> int:
    end = len(text)
    while idx < end and text[idx] in _WHITESPACE:
        idx += 1
    return idx


def _diagnose(text: str, fallback_pos: int) -> JSONDecodeError:
    """Say where ``text`` is malformed when the C scanner could not.

    ``_json`` reports most syntax errors through ``json.decoder.JSONDecodeError``
    and, in 3.11, only finds that class if ``json.decoder`` is already imported;
    in the plugin it is not, and the scanner fails with a SystemError that has
    no position. Rather than re-implementing the grammar, ask the stdlib
    decoder: importing it costs ~15 ms, but only for input that is wrong anyway.
    """
    import json  # error path only; see the module docstring

    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return JSONDecodeError(exc.msg, text, exc.pos)
    except (ValueError, RecursionError) as exc:  # e.g. int() refusing 5000 digits
        return JSONDecodeError(str(exc), text, fallback_pos)
    return JSONDecodeError("invalid JSON", text, fallback_pos)  # decoders disagree


def loads(data: "str | bytes") -> "Any":
    """Parse one JSON document, like ``json.loads`` with default arguments.

    Bytes must be UTF-8 (a leading BOM is skipped): RFC 8259 requires UTF-8
    between systems, so json's UTF-16/32 sniffing is not carried over.
    Raises :class:`JSONDecodeError` (a ValueError) with a position, or
    UnicodeDecodeError (also a ValueError) for bytes that are not UTF-8.
    """
    if isinstance(data, str):
        text = data
        if text.startswith("\ufeff"):
            raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    else:
        # Not the "utf-8-sig" codec: unlike "utf-8" it is a Python module to import.
        # json.loads decodes with "surrogatepass" too, so lone surrogates survive.
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        text = data[bom:].decode("utf-8", "surrogatepass")
    start = _skip_whitespace(text, 0)
    try:
        obj, end = _scan_once(text, start)
    except StopIteration as stop:  # no value where one must start (at stop.value)
        raise JSONDecodeError("Expecting value", text, stop.value) from None
    except ValueError as exc:  # json.decoder happened to be loaded: a proper error
        pos = getattr(exc, "pos", None)
        msg = getattr(exc, "msg", None)
        if isinstance(pos, int) and isinstance(msg, str):
            raise JSONDecodeError(msg, text, pos) from None
        raise _diagnose(text, start) from None
    except SystemError:  # see _diagnose
        raise _diagnose(text, start) from None
    except RecursionError:  # the C scanner recurses once per nested array/object
        raise JSONDecodeError("nesting too deep", text, start) from None
    end = _skip_whitespace(text, end)
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return obj


def _float_text(value: float) -> str:
    """JSON text for a float, spelled as json.dumps does (it allows NaN/Infinity)."""
    if value != value:
        return "NaN"
    if value == _CONSTANTS["Infinity"]:
        return "Infinity"
    if value == _CONSTANTS["-Infinity"]:
        return "-Infinity"
    return float.__repr__(value)


def _key_text(key: object) -> str:
    """Object keys must be strings in JSON; json.dumps converts scalars the same way."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return _float_text(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _encode(obj: object, out: "list[str]", indent: "str | None", depth: int) -> None:
    """Append the JSON text of ``obj`` to ``out`` (``indent``: one level's padding)."""
    if isinstance(obj, str):
        out.append(_json.encode_basestring_ascii(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))  # repr of an int subclass (IntEnum) may differ
    elif isinstance(obj, float):
        out.append(_float_text(obj))
    elif isinstance(obj, (dict, list, tuple)):
        if not obj:
            out.append("{}" if isinstance(obj, dict) else "[]")
            return
        if indent is None:
            sep, pad_in, pad_out = ", ", "", ""
        else:
            pad_out = "\n" + indent * depth
            pad_in = pad_out + indent
            sep = "," + pad_in
        if isinstance(obj, dict):
            out.append("{" + pad_in)
            for i, (key, value) in enumerate(obj.items()):
                if i:
                    out.append(sep)
                out.append(_json.encode_basestring_ascii(_key_text(key)) + ": ")
                _encode(value, out, indent, depth + 1)
            out.append(pad_out + "}")
        else:
            out.append("[" + pad_in)
            for i, value in enumerate(obj):
                if i:
                    out.append(sep)
                _encode(value, out, indent, depth + 1)
            out.append(pad_out + "]")
    else:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: object, indent: "int | None" = None) -> str:
    """Serialize ``obj`` to ASCII JSON text, exactly as ``json.dumps(obj, indent=indent)``.

    Covers what CNI configs and results hold: dict, list/tuple, str, int,
    float, bool and None. There is no cycle check: values built from parsed
    JSON cannot be cyclic, and a cycle would end in RecursionError anyway.
    """
    out: list[str] = []
    _encode(obj, out, None if indent is None else " " * indent, 0)
    return "".join(out)


def _config_error(msg: str, details: str = "") -> CNIError:
    return CNIError(ERR_INVALID_NETWORK_CONFIG, msg, details)


#: Deepest nesting of arrays/objects a config may have. Real configs nest a
#: handful of levels; the limit keeps every later step (our encoder, the
#: agent's json module) far from Python's recursion limit.
MAX_NESTING = 64


def _nesting_depth(obj: object, limit: int) -> int:
    """Depth of nested lists/dicts in ``obj``, counted without recursion, up to ``limit + 1``."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return deepest


def parse_config(stdin_bytes: bytes) -> "dict[str, Any]":
    """Decode and validate the network configuration the runtime sent on stdin.

    Only fields flowcni itself relies on are checked; the dict is returned
    unmodified so it can be forwarded verbatim to the agent (defaults are
    applied by accessor functions such as :func:`agent_socket`).
    """
    if len(stdin_bytes) > MAX_CONFIG_BYTES:
        raise _config_error(
            f"network config is {len(stdin_bytes)} bytes, over flowcni's limit of "
            f"{MAX_CONFIG_BYTES} bytes (MAX_CONFIG_BYTES)",
        )
    try:
        text = stdin_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CNIError(
            ERR_DECODE, "failed to decode network config from stdin: not UTF-8", str(exc)
        ) from None
    try:
        conf = loads(text)
    except JSONDecodeError as exc:
        raise CNIError(
            ERR_DECODE,
            f"failed to decode network config from stdin: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno} (char {exc.pos})",
            str(exc),
        ) from None
    if not isinstance(conf, dict):
        raise CNIError(
            ERR_DECODE,
            "failed to decode network config from stdin: expected a JSON object, "
            f"got {type(conf).__name__}",
        )

    if "cniVersion" not in conf:
        raise _config_error("network config is missing cniVersion")
    version = conf["cniVersion"]
    if not isinstance(version, str):
        raise _config_error("network config field cniVersion must be a string")
    if not is_supported_version(version):
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"unsupported cniVersion {version!r}; supported versions: "
            + ", ".join(SUPPORTED_VERSIONS),
        )

    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise _config_error("network config field name must be a non-empty string")
    if not isinstance(conf.get("type"), str):
        raise _config_error("network config field type must be a string")

    if "agentSocket" in conf:
        sock = conf["agentSocket"]
        if not isinstance(sock, str) or not sock.startswith("/"):
            raise _config_error(
                "network config field agentSocket must be an absolute path",
                f"got {sock!r}",
            )
    if "mtu" in conf:
        mtu = conf["mtu"]
        # bool is an int subclass; "mtu": true is a config mistake, not 1.
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
            raise _config_error(
                f"network config field mtu must be an integer in {MTU_MIN}..{MTU_MAX}",
                f"got {mtu!r}",
            )
    if "prevResult" in conf and not isinstance(conf["prevResult"], dict):
        raise _config_error("network config field prevResult must be an object")
    if _nesting_depth(conf, MAX_NESTING) > MAX_NESTING:
        raise CNIError(
            ERR_DECODE,
            f"failed to decode network config from stdin: nested deeper than {MAX_NESTING} "
            "levels",
        )
    if "defaultRoute" in conf and not isinstance(conf["defaultRoute"], bool):
        raise _config_error("network config field defaultRoute must be true or false",
                            f"got {conf['defaultRoute']!r}")
    _check_runtime_config(conf)
    return conf


def _check_runtime_config(conf: "dict[str, Any]") -> None:
    """Shape of the runtimeConfig capabilities flowcni honours (``ips``, ``mac``).

    A runtime passes these only when the conflist declares the capability, and
    then the pod must get exactly what was asked for: the agent refuses what it
    cannot give, before it touches anything. Values are checked there (it knows
    the node's range); here only their JSON types.
    """
    rc = conf.get("runtimeConfig")
    if rc is None:
        return
    if not isinstance(rc, dict):
        raise _config_error("network config field runtimeConfig must be an object")
    ips = rc.get("ips")
    if ips is not None and (
        not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips)
    ):
        raise _config_error("runtimeConfig.ips must be a list of address strings",
                            f"got {ips!r}")
    mac = rc.get("mac")
    if mac is not None and not isinstance(mac, str):
        raise _config_error("runtimeConfig.mac must be a string", f"got {mac!r}")


def check_prev_result(conf: "dict[str, Any]", command: str) -> None:
    """Validate ``prevResult`` before the agent does anything (ADD, CHECK).

    A malformed prevResult found only when the result is rendered would come
    after the agent created the pod's interface; and the spec makes CHECK
    without a prevResult an error.
    """
    prev = conf.get("prevResult")
    if prev is None:
        if command == CMD_CHECK:
            raise _config_error("CHECK needs prevResult in the network config (CNI spec)")
        return
    try:
        _split_result(prev, "prevResult")
    except ValueError as exc:
        raise _config_error("malformed prevResult in network config", str(exc)) from None


def agent_socket(conf: "dict[str, Any]") -> str:
    """The agent's unix socket path for this network (config value or default)."""
    sock = conf.get("agentSocket")
    return sock if isinstance(sock, str) and sock else DEFAULT_AGENT_SOCKET


def _list_of_dicts(result: "dict[str, Any]", key: str, where: str) -> "list[dict[str, Any]]":
    """Copy ``result[key]`` as a list of fresh dicts, so callers never mutate input."""
    value = result.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"{where}: field {key!r} must be a list of objects")
    return [dict(item) for item in value]


def _split_result(
    result: object, where: str
) -> "tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]":
    """Validate the shape of a result and return copies of its four parts."""
    if not isinstance(result, dict):
        raise ValueError(f"{where}: expected an object, got {type(result).__name__}")
    interfaces = _list_of_dicts(result, "interfaces", where)
    ips = _list_of_dicts(result, "ips", where)
    routes = _list_of_dicts(result, "routes", where)
    dns = result.get("dns")
    if dns is None:
        dns = {}
    if not isinstance(dns, dict):
        raise ValueError(f"{where}: field 'dns' must be an object")
    for entry in interfaces:
        if not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: every interfaces entry needs a string 'name'")
    for ip in ips:
        if not isinstance(ip.get("address"), str):
            raise ValueError(f"{where}: every ips entry needs a string 'address'")
        iface = ip.get("interface")
        if iface is not None and (isinstance(iface, bool) or not isinstance(iface, int)):
            raise ValueError(f"{where}: ips 'interface' must be an integer index")
    return interfaces, ips, routes, dict(dns)


def _ip_family(address: str) -> str:
    """Return the 0.x "version" field ("4"/"6"); only IPv6 text contains a colon."""
    return "6" if ":" in address else "4"


def format_result(
    result: "dict[str, Any]",
    cni_version: str,
    prev_result: "dict[str, Any] | None" = None,
) -> "dict[str, Any]":
    """Render the agent's 1.x-shaped result in the runtime's ``cni_version``.

    When flowcni runs after another plugin in a conflist, ``prev_result``
    (which may be in 0.x or 1.x form) is merged in front of ours, so the
    runtime sees every interface; our IP entries' interface indexes are
    shifted to keep pointing at our own interfaces.
    """
    try:
        interfaces, ips, routes, dns = _split_result(result, "agent result")
    except ValueError as exc:
        raise CNIError(ERR_IO_FAILURE, "malformed result from flowcni agent", str(exc)) from None

    if prev_result is not None:
        try:
            p_ifaces, p_ips, p_routes, p_dns = _split_result(prev_result, "prevResult")
        except ValueError as exc:
            raise _config_error("malformed prevResult in network config", str(exc)) from None
        shift = len(p_ifaces)
        for ip in ips:
            if "interface" in ip:
                ip["interface"] = ip["interface"] + shift
        interfaces = p_ifaces + interfaces
        ips = p_ips + ips
        routes = p_routes + routes
        if not dns:
            dns = p_dns

    legacy = is_legacy_version(cni_version)
    for ip in ips:
        if legacy:
            ip["version"] = _ip_family(ip["address"])
        else:
            ip.pop("version", None)

    return {
        "cniVersion": cni_version,
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dns,
    }
