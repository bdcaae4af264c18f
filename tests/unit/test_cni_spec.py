"""Unit tests for flowcni.cni.spec: CNI_ARGS, config validation, result formats."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flowcni.cni import spec
from flowcni.cni.spec import CNIError


def _conf(**overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "flowcni-net", "type": "flowcni"}
    conf.update(overrides)
    return conf


def _encode(conf: Any) -> bytes:
    return json.dumps(conf).encode()


# --- CNIError ---------------------------------------------------------------


def test_cnierror_to_json_carries_all_fields() -> None:
    err = CNIError(spec.ERR_TRY_AGAIN_LATER, "busy", "agent restarting")
    assert err.to_json("0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 11,
        "msg": "busy",
        "details": "agent restarting",
    }
    assert str(err) == "busy"


def test_error_code_values_match_spec() -> None:
    assert (
        spec.ERR_INCOMPATIBLE_VERSION,
        spec.ERR_UNSUPPORTED_FIELD,
        spec.ERR_UNKNOWN_CONTAINER,
        spec.ERR_INVALID_ENV,
        spec.ERR_IO_FAILURE,
        spec.ERR_DECODE,
        spec.ERR_INVALID_NETWORK_CONFIG,
        spec.ERR_TRY_AGAIN_LATER,
        spec.ERR_PLUGIN_NOT_AVAILABLE,
        spec.ERR_LIMITED_CONNECTIVITY,
    ) == (1, 2, 3, 4, 5, 6, 7, 11, 50, 51)


# --- versions and commands --------------------------------------------------


@pytest.mark.parametrize(
    ("command", "version", "allowed"),
    [
        ("ADD", "0.3.0", True),
        ("DEL", "0.3.1", True),
        ("VERSION", "0.3.0", True),
        ("CHECK", "0.3.1", False),
        ("CHECK", "0.4.0", True),
        ("CHECK", "1.1.0", True),
        ("GC", "1.0.0", False),
        ("GC", "1.1.0", True),
        ("STATUS", "0.4.0", False),
        ("STATUS", "1.1.0", True),
        ("BOGUS", "1.1.0", False),
    ],
)
def test_command_allowed(command: str, version: str, allowed: bool) -> None:
    assert spec.command_allowed(command, version) is allowed


def test_check_command_allowed_raises_code_1_naming_both() -> None:
    with pytest.raises(CNIError) as info:
        spec.check_command_allowed("GC", "1.0.0")
    assert info.value.code == spec.ERR_INCOMPATIBLE_VERSION
    assert "GC" in info.value.msg and "1.0.0" in info.value.msg
    assert "1.1.0" in info.value.details


def test_version_compare_is_numeric() -> None:
    assert spec.version_tuple("0.10.0") > spec.version_tuple("0.4.0")


def test_version_result() -> None:
    assert spec.version_result("0.4.0") == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


# --- CNI_ARGS ---------------------------------------------------------------


def test_parse_cni_args_kubernetes_keys() -> None:
    s = (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
        "K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1f2e-3d"
    )
    assert spec.parse_cni_args(s) == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "default",
        "K8S_POD_NAME": "web-0",
        "K8S_POD_INFRA_CONTAINER_ID": "abc123",
        "K8S_POD_UID": "1f2e-3d",
    }


def test_parse_cni_args_empty_and_trailing_separator() -> None:
    assert spec.parse_cni_args("") == {}
    assert spec.parse_cni_args("K8S_POD_NAME=a;") == {"K8S_POD_NAME": "a"}


def test_parse_cni_args_allows_empty_value() -> None:
    assert spec.parse_cni_args("K8S_POD_UID=") == {"K8S_POD_UID": ""}


@pytest.mark.parametrize("bad", ["K8S_POD_NAME", "=value"])
def test_parse_cni_args_malformed_pair(bad: str) -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_cni_args(f"K8S_POD_NAMESPACE=ns;{bad}")
    assert info.value.code == spec.ERR_INVALID_ENV
    assert "CNI_ARGS" in info.value.msg
    assert bad in info.value.msg


def test_parse_cni_args_unknown_key_rejected() -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_cni_args("K8S_POD_NAME=a;MAC=00:11:22:33:44:55")
    assert info.value.code == spec.ERR_INVALID_ENV
    assert "MAC" in info.value.msg


@pytest.mark.parametrize("flag", ["1", "true", "TRUE", "True"])
def test_parse_cni_args_unknown_key_ignored(flag: str) -> None:
    args = spec.parse_cni_args(f"MAC=aa;IgnoreUnknown={flag}")
    assert args["MAC"] == "aa"
    assert args["IgnoreUnknown"] == flag


@pytest.mark.parametrize("flag", ["0", "false", "yes"])
def test_parse_cni_args_ignore_unknown_false_still_rejects(flag: str) -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_cni_args(f"IgnoreUnknown={flag};MAC=aa")
    assert info.value.code == spec.ERR_INVALID_ENV
    assert "MAC" in info.value.msg


# --- network config ---------------------------------------------------------


def test_parse_config_returns_config_verbatim() -> None:
    conf = _conf(mtu=1450, agentSocket="/run/x.sock", extra={"k": [1, 2]})
    assert spec.parse_config(_encode(conf)) == conf


def test_parse_config_malformed_json_is_decode_error() -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(b'{"cniVersion": "1.0.0",')
    assert info.value.code == spec.ERR_DECODE
    assert "stdin" in info.value.msg
    assert "line 1 column" in info.value.msg


def test_parse_config_empty_stdin_is_decode_error() -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(b"")
    assert info.value.code == spec.ERR_DECODE


def test_parse_config_non_utf8_is_decode_error() -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(b"\xff\xfe{}")
    assert info.value.code == spec.ERR_DECODE


def test_parse_config_non_object_is_decode_error() -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(b"[1, 2]")
    assert info.value.code == spec.ERR_DECODE
    assert "object" in info.value.msg


def test_parse_config_missing_cni_version() -> None:
    conf = _conf()
    del conf["cniVersion"]
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(conf))
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "cniVersion" in info.value.msg


@pytest.mark.parametrize("version", ["0.2.0", "2.0.0", "banana"])
def test_parse_config_unknown_cni_version(version: str) -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(_conf(cniVersion=version)))
    assert info.value.code == spec.ERR_INCOMPATIBLE_VERSION
    assert version in info.value.msg
    for supported in spec.SUPPORTED_VERSIONS:
        assert supported in info.value.msg


@pytest.mark.parametrize("name", [None, "", 5])
def test_parse_config_bad_name(name: Any) -> None:
    conf = _conf(name=name)
    if name is None:
        del conf["name"]
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(conf))
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "name" in info.value.msg


def test_parse_config_missing_type() -> None:
    conf = _conf()
    del conf["type"]
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(conf))
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "type" in info.value.msg


@pytest.mark.parametrize("mtu", [575, 65536, 0, -1, "1500", 1500.0, True, None])
def test_parse_config_bad_mtu(mtu: Any) -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(_conf(mtu=mtu)))
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "mtu" in info.value.msg


@pytest.mark.parametrize("mtu", [576, 1450, 9000, 65535])
def test_parse_config_good_mtu(mtu: int) -> None:
    assert spec.parse_config(_encode(_conf(mtu=mtu)))["mtu"] == mtu


@pytest.mark.parametrize("sock", ["run/flowcni.sock", "", 3])
def test_parse_config_bad_agent_socket(sock: Any) -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(_conf(agentSocket=sock)))
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "agentSocket" in info.value.msg


def test_agent_socket_default_and_override() -> None:
    assert spec.agent_socket(_conf()) == "/run/flowcni/cni.sock"
    assert spec.agent_socket(_conf(agentSocket="/tmp/a.sock")) == "/tmp/a.sock"


def test_parse_config_prev_result_must_be_object() -> None:
    with pytest.raises(CNIError) as info:
        spec.parse_config(_encode(_conf(prevResult=[1])))
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "prevResult" in info.value.msg


# --- result formatting ------------------------------------------------------


def _agent_result() -> dict[str, Any]:
    return {
        "interfaces": [
            {"name": "veth1234", "mac": "aa:aa:aa:aa:aa:01"},
            {"name": "eth0", "mac": "aa:aa:aa:aa:aa:02", "sandbox": "/var/run/netns/p1"},
        ],
        "ips": [
            {"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1},
            {"address": "fd00:10:244::5/64", "gateway": "fd00:10:244::1", "interface": 1},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}, {"dst": "::/0"}],
        "dns": {},
    }


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_format_result_legacy_versions_add_ip_version(version: str) -> None:
    out = spec.format_result(_agent_result(), version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert out["ips"][0] == {
        "address": "10.244.0.5/24",
        "gateway": "10.244.0.1",
        "interface": 1,
        "version": "4",
    }
    assert out["interfaces"] == _agent_result()["interfaces"]
    assert out["routes"] == _agent_result()["routes"]
    assert out["dns"] == {}


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_format_result_1x_has_no_ip_version(version: str) -> None:
    out = spec.format_result(_agent_result(), version)
    assert out["cniVersion"] == version
    assert all("version" not in ip for ip in out["ips"])
    assert out["ips"] == _agent_result()["ips"]
    assert out["interfaces"] == _agent_result()["interfaces"]


def test_format_result_does_not_mutate_inputs() -> None:
    result = _agent_result()
    prev = {"interfaces": [{"name": "x"}], "ips": [], "routes": []}
    before = copy.deepcopy((result, prev))
    spec.format_result(result, "0.4.0", prev)
    assert (result, prev) == before


def test_format_result_missing_sections_become_empty() -> None:
    out = spec.format_result({"ips": [{"address": "10.0.0.2/24"}]}, "1.1.0")
    assert out == {
        "cniVersion": "1.1.0",
        "interfaces": [],
        "ips": [{"address": "10.0.0.2/24"}],
        "routes": [],
        "dns": {},
    }


def _prev_result_legacy() -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "cni0", "mac": "bb:bb:bb:bb:bb:01"},
            {"name": "net1", "mac": "bb:bb:bb:bb:bb:02", "sandbox": "/var/run/netns/p1"},
            {"name": "lo", "sandbox": "/var/run/netns/p1"},
        ],
        "ips": [{"version": "4", "address": "192.168.1.9/24", "interface": 1}],
        "routes": [{"dst": "192.168.0.0/16"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    }


def test_format_result_chains_prev_result_into_1x() -> None:
    out = spec.format_result(_agent_result(), "1.1.0", _prev_result_legacy())
    assert [i["name"] for i in out["interfaces"]] == ["cni0", "net1", "lo", "veth1234", "eth0"]
    assert [ip["address"] for ip in out["ips"]] == [
        "192.168.1.9/24",
        "10.244.0.5/24",
        "fd00:10:244::5/64",
    ]
    # prev ip keeps its index; ours are shifted past the 3 prev interfaces.
    assert [ip["interface"] for ip in out["ips"]] == [1, 4, 4]
    assert out["interfaces"][out["ips"][1]["interface"]]["name"] == "eth0"
    # 0.x "version" keys from the prevResult must not leak into 1.x output.
    assert all("version" not in ip for ip in out["ips"])
    assert [r["dst"] for r in out["routes"]] == ["192.168.0.0/16", "0.0.0.0/0", "::/0"]
    # ours is empty, so the earlier plugin's DNS survives.
    assert out["dns"] == {"nameservers": ["10.96.0.10"]}
    assert out["cniVersion"] == "1.1.0"


def test_format_result_chains_1x_prev_result_into_legacy() -> None:
    prev = {
        "interfaces": [{"name": "cni0"}],
        "ips": [{"address": "fd00::9/64", "interface": 0}],
        "dns": {"nameservers": ["1.1.1.1"]},
    }
    ours = _agent_result()
    ours["dns"] = {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
    out = spec.format_result(ours, "0.4.0", prev)
    assert [ip["version"] for ip in out["ips"]] == ["6", "4", "6"]
    assert [ip["interface"] for ip in out["ips"]] == [0, 2, 2]
    # our DNS is non-empty, so it wins.
    assert out["dns"] == {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}


def test_format_result_ip_without_interface_is_not_shifted() -> None:
    out = spec.format_result(
        {"ips": [{"address": "10.0.0.2/24"}]}, "1.0.0", {"interfaces": [{"name": "a"}]}
    )
    assert out["ips"] == [{"address": "10.0.0.2/24"}]


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"ips": {"address": "10.0.0.1/24"}},
        {"ips": [{"gateway": "10.0.0.1"}]},
        {"ips": [{"address": "10.0.0.2/24", "interface": "0"}]},
        {"interfaces": ["eth0"]},
        {"dns": []},
    ],
)
def test_format_result_malformed_agent_result_is_io_failure(bad: Any) -> None:
    with pytest.raises(CNIError) as info:
        spec.format_result(bad, "1.0.0")
    assert info.value.code == spec.ERR_IO_FAILURE


def test_format_result_malformed_prev_result_is_config_error() -> None:
    with pytest.raises(CNIError) as info:
        spec.format_result(_agent_result(), "1.0.0", {"interfaces": "eth0"})
    assert info.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert "prevResult" in info.value.msg


# --- JSON without the json package ------------------------------------------

JSON_VALUES: list[Any] = [
    {},
    [],
    "",
    0,
    None,
    True,
    -12.5,
    1e100,
    10**30,
    {"cniVersion": "1.1.0", "name": "n", "mtu": 1450, "ok": False, "nothing": None},
    {"nested": [1, [2, [3, {}]], {"a": {"b": []}}], "t": (1, "x")},
    {"text": 'quote " backslash \\ newline \n tab \t nul \x00 del \x7f'},
    {"unicode": "grüße ✓ 🐍", "ключ": "значение"},
    [float("inf"), float("-inf"), 0.1, -0.0, 1.5e-7],
    {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
]


@pytest.mark.parametrize("value", JSON_VALUES)
@pytest.mark.parametrize("indent", [None, 0, 2])
def test_dumps_matches_json_dumps(value: Any, indent: int | None) -> None:
    assert spec.dumps(value, indent=indent) == json.dumps(value, indent=indent)


def test_dumps_nan_like_json() -> None:
    assert spec.dumps([float("nan")]) == json.dumps([float("nan")]) == "[NaN]"


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", {(1, 2): "tuple key"}, object()])
def test_dumps_rejects_what_json_rejects(value: Any) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        spec.dumps(value)


@pytest.mark.parametrize("value", [v for v in JSON_VALUES if not isinstance(v, dict) or v])
def test_loads_round_trips_like_json(value: Any) -> None:
    for indent in (None, 2):
        text = json.dumps(value, indent=indent)
        assert spec.loads(text) == json.loads(text)
        assert spec.loads(text.encode()) == json.loads(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        ' \t\r\n {"a": 1} \n',
        '"\\u00fc\\ud83d\\udc0d\\/"',
        "[NaN, Infinity, -Infinity]",
        '{"a": 1, "a": 2}',
        "1.0e+3",
        "\xef\xbb\xbf{}",  # UTF-8 BOM, as bytes below
    ],
)
def test_loads_edge_cases_like_json(text: str) -> None:
    data = text.encode("latin-1") if text.startswith("\xef") else text.encode()
    expected = json.loads(data)
    got = spec.loads(data)
    # NaN != NaN, so compare the text form.
    assert json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '{"cniVersion": ',
        '{"cniVersion": "1.0.0",',
        '{"a" 1}',
        "[1 2]",
        '{"a": 1,}',
        "[1,]",
        '"unterminated',
        '"control \x01 char"',
        '"bad \\x escape"',
        '"\\u12"',
        "{'single': 1}",
        '{"a": 1}\n\n  extra',
        "tru",
        "\ufeff{}",
    ],
)
def test_loads_errors_match_json(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as stdlib:
        json.loads(text)
    with pytest.raises(spec.JSONDecodeError) as ours:
        spec.loads(text)
    expected, got = stdlib.value, ours.value
    assert issubclass(spec.JSONDecodeError, ValueError)  # callers catch ValueError
    assert (got.msg, got.pos, got.lineno, got.colno) == (
        expected.msg,
        expected.pos,
        expected.lineno,
        expected.colno,
    )
    assert str(got) == str(expected)


def test_loads_bytes_must_be_utf8() -> None:
    with pytest.raises(ValueError):
        spec.loads(b'{"a": "\xff"}')


# The launcher never imports json.decoder, and then _json reports most syntax
# errors without a position (see spec._diagnose). Exercise that path in a
# bare interpreter and compare with the stdlib's diagnosis.
_BARE_LOADS = """
import sys, types
root = types.ModuleType("flowcni"); root.__path__ = []; sys.modules["flowcni"] = root
pkg = types.ModuleType("flowcni.cni"); pkg.__path__ = [sys.argv[1]]
sys.modules["flowcni.cni"] = pkg
from flowcni.cni import spec
assert "json.decoder" not in sys.modules
for line in sys.stdin.read().splitlines():
    try:
        spec.loads(spec.loads(line))
        print("parsed")
    except spec.JSONDecodeError as exc:
        print(spec.dumps([exc.msg, exc.pos]))
"""


def test_loads_errors_have_positions_without_json_package() -> None:
    docs = ['{"a": 1,', '{"a" 1}', "[1 2]", '"open', '"\\q"', '{"a": 1} x', '{"a": [1]}']
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _BARE_LOADS, str(Path(spec.__file__).parent)],
        input="\n".join(json.dumps(d) for d in docs),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    got = [json.loads(line) if line != "parsed" else line for line in proc.stdout.splitlines()]
    expected: list[Any] = []
    for doc in docs:
        try:
            json.loads(doc)
            expected.append("parsed")
        except json.JSONDecodeError as exc:
            expected.append([exc.msg, exc.pos])
    assert got == expected


# -- limits, prevResult, runtimeConfig (issue 13) ----------------------------------------

def _raw_conf(**extra: Any) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "flowcni", **extra}).encode()


def test_config_over_the_size_limit_is_a_permanent_error_naming_it() -> None:
    with pytest.raises(CNIError) as exc:
        spec.parse_config(_raw_conf(pad="x" * spec.MAX_CONFIG_BYTES))
    assert exc.value.code == spec.ERR_INVALID_NETWORK_CONFIG
    assert str(spec.MAX_CONFIG_BYTES) in exc.value.msg


@pytest.mark.parametrize("depth", [spec.MAX_NESTING + 1, 3000])
def test_deep_nesting_is_a_decode_error(depth: int) -> None:
    raw = _raw_conf()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(CNIError) as exc:
        spec.parse_config(raw)
    assert exc.value.code == spec.ERR_DECODE
    assert "nest" in exc.value.msg


def test_nesting_within_the_limit_is_fine() -> None:
    inner: Any = 1
    for _ in range(spec.MAX_NESTING - 2):
        inner = [inner]
    assert spec.parse_config(_raw_conf(x=inner))["x"] == inner


@pytest.mark.parametrize("prev", [{"ips": "x"}, {"interfaces": 5}, {"ips": [{"address": 5}]},
                                  {"interfaces": [{"mac": "m"}]}])
def test_check_prev_result_refuses_malformed_shapes(prev: dict[str, Any]) -> None:
    for command in (spec.CMD_ADD, spec.CMD_CHECK):
        with pytest.raises(CNIError) as exc:
            spec.check_prev_result({"prevResult": prev}, command)
        assert exc.value.code == spec.ERR_INVALID_NETWORK_CONFIG
        assert "prevResult" in exc.value.msg


def test_check_needs_prev_result_but_add_does_not() -> None:
    spec.check_prev_result({}, spec.CMD_ADD)
    with pytest.raises(CNIError) as exc:
        spec.check_prev_result({}, spec.CMD_CHECK)
    assert exc.value.code == spec.ERR_INVALID_NETWORK_CONFIG


@pytest.mark.parametrize("rc", [[], {"ips": "10.0.0.1"}, {"ips": [5]}, {"mac": 5}])
def test_runtime_config_shapes(rc: Any) -> None:
    with pytest.raises(CNIError) as exc:
        spec.parse_config(_raw_conf(runtimeConfig=rc))
    assert exc.value.code == spec.ERR_INVALID_NETWORK_CONFIG


def test_default_route_must_be_a_bool() -> None:
    assert spec.parse_config(_raw_conf(defaultRoute=False))["defaultRoute"] is False
    with pytest.raises(CNIError):
        spec.parse_config(_raw_conf(defaultRoute="no"))


def test_one_line_squeezes_and_bounds_error_text() -> None:
    text = "Traceback (most recent call last):\n  File x\n" + "y" * 1000
    out = spec.one_line(text)
    assert "\n" not in out and len(out) == spec.MAX_ERROR_TEXT and out.endswith("...")
    err = CNIError(5, "a\nb", "c\n d").to_json("1.0.0")
    assert (err["msg"], err["details"]) == ("a b", "c d")
