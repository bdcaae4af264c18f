"""Tests for the flowcni CNI plugin executable and its agent wire protocol.

The plugin is run as a real subprocess (as a runtime would exec it). The agent
side is a tiny unix-socket server thread: these tests check the plugin's half
of the protocol only, so no OVS or network namespaces are needed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flowcni.cni import plugin, spec
from flowcni.cni.spec import CNIError

AGENT_RESULT: dict[str, Any] = {
    "interfaces": [
        {"name": "veth0a1b2c3d", "mac": "0a:58:0a:f4:00:01"},
        {"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": "/var/run/netns/cni-1"},
    ],
    "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
    "dns": {},
}

CNI_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"


class CompletedPlugin:
    """Exit code plus decoded stdout of one plugin run."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout.decode()
        self.stderr = proc.stderr.decode()
        self.json: Any = json.loads(self.stdout) if self.stdout.strip() else None


def run_plugin(env: dict[str, str], stdin: bytes | str | dict[str, Any] = b"") -> CompletedPlugin:
    """Exec the plugin like a runtime would: CNI_* env, config on stdin."""
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "FLOWCNI_"))}
    base.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "flowcni.cni.plugin"],
        input=stdin,
        env=base,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return CompletedPlugin(proc)


def make_conf(sock: Path | str, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "flowcni",
        "type": "flowcni",
        "agentSocket": str(sock),
        "mtu": 1450,
    }
    conf.update(extra)
    return conf


@pytest.fixture
def netns(tmp_path: Path) -> Path:
    """Stands in for /var/run/netns/x: the plugin only checks that it exists."""
    path = tmp_path / "ns"
    path.write_text("")
    return path


def attach_env(command: str, netns: Path | str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": str(netns),
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": CNI_ARGS,
        "CNI_PATH": "/opt/cni/bin",
    }


class FakeAgent:
    """Accepts one connection, records the request, answers with ``reply``."""

    def __init__(self, path: Path, reply: Callable[[dict[str, Any]], bytes | None]) -> None:
        self.path = path
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.release = threading.Event()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.server.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        """Serve connections until closed (a failed ADD is followed by the plugin's DEL)."""
        try:
            while not self.release.is_set():
                conn, _ = self.server.accept()
                with conn:
                    conn.settimeout(30)
                    data = b""
                    while chunk := conn.recv(4096):
                        data += chunk
                    request = json.loads(data)
                    self.requests.append(request)
                    answer = self.reply(request)
                    if answer is None:  # simulate a hung agent: hold the connection open
                        self.release.wait(30)
                        return
                    conn.sendall(answer)
        except BaseException as exc:  # surfaced by the fixture teardown
            if not self.release.is_set():
                self.errors.append(exc)

    def close(self) -> None:
        self.release.set()
        try:  # wakes the accept() of the serving thread (Linux: EINVAL)
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        self.thread.join(timeout=30)


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Callable[..., FakeAgent]]:
    agents: list[FakeAgent] = []

    def start(reply: Callable[[dict[str, Any]], bytes | None] | dict[str, Any]) -> FakeAgent:
        if isinstance(reply, dict):
            fixed = json.dumps(reply).encode()

            def responder(_req: dict[str, Any]) -> bytes | None:
                return fixed

            agent = FakeAgent(tmp_path / "agent.sock", responder)
        else:
            agent = FakeAgent(tmp_path / "agent.sock", reply)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()
        # A request the agent could not decode is a protocol bug in the plugin.
        assert not [e for e in agent.errors if not isinstance(e, OSError)], agent.errors


def assert_error(out: CompletedPlugin, code: int, *needles: str) -> dict[str, Any]:
    assert out.rc == 1, out.stdout + out.stderr
    assert out.stderr == ""  # no traceback leaks
    err = out.json
    assert set(err) == {"cniVersion", "code", "msg", "details"}
    assert err["code"] == code, err
    for needle in needles:
        assert needle in err["msg"] + " " + err["details"], err
    return dict(err)


# --- VERSION ----------------------------------------------------------------


def test_version_with_empty_stdin_reports_latest() -> None:
    out = run_plugin({"CNI_COMMAND": "VERSION"})
    assert out.rc == 0
    assert out.json == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_version_echoes_requested_version() -> None:
    out = run_plugin({"CNI_COMMAND": "VERSION"}, {"cniVersion": "0.4.0"})
    assert out.rc == 0
    assert out.json["cniVersion"] == "0.4.0"
    assert out.json["supportedVersions"] == list(spec.SUPPORTED_VERSIONS)


def test_version_never_contacts_agent(tmp_path: Path) -> None:
    # An agentSocket that would fail with 11 if the plugin tried to use it.
    out = run_plugin({"CNI_COMMAND": "VERSION"}, make_conf(tmp_path / "none.sock"))
    assert out.rc == 0
    assert out.json["cniVersion"] == "1.1.0"


# --- environment validation -------------------------------------------------


@pytest.mark.parametrize("command", [None, "", "FROB"])
def test_bad_cni_command(command: str | None, tmp_path: Path) -> None:
    env = {} if command is None else {"CNI_COMMAND": command}
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_COMMAND")


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_missing_container_id(command: str, netns: Path, tmp_path: Path) -> None:
    env = attach_env(command, netns)
    del env["CNI_CONTAINERID"]
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_CONTAINERID")


def test_missing_ifname(netns: Path, tmp_path: Path) -> None:
    env = attach_env("ADD", netns)
    del env["CNI_IFNAME"]
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_IFNAME")


@pytest.mark.parametrize("ifname", ["a" * 16, "eth/0", "eth 0", "eth0:1", "..", "\teth"])
def test_invalid_ifname(ifname: str, netns: Path, tmp_path: Path) -> None:
    env = attach_env("ADD", netns)
    env["CNI_IFNAME"] = ifname
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_IFNAME")


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_missing_netns(command: str, netns: Path, tmp_path: Path) -> None:
    env = attach_env(command, netns)
    del env["CNI_NETNS"]
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_NETNS")


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_netns_path_does_not_exist(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ns"
    out = run_plugin(attach_env(command, missing), make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_NETNS", str(missing))


def test_malformed_cni_args(netns: Path, tmp_path: Path) -> None:
    env = attach_env("ADD", netns)
    env["CNI_ARGS"] = "K8S_POD_NAME"
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "CNI_ARGS", "K8S_POD_NAME")


def test_bad_agent_timeout_env(netns: Path, tmp_path: Path) -> None:
    env = attach_env("ADD", netns)
    env["FLOWCNI_AGENT_TIMEOUT"] = "soon"
    out = run_plugin(env, make_conf(tmp_path / "a.sock"))
    assert_error(out, spec.ERR_INVALID_ENV, "FLOWCNI_AGENT_TIMEOUT")


# --- config validation ------------------------------------------------------


def test_malformed_stdin(netns: Path) -> None:
    out = run_plugin(attach_env("ADD", netns), b'{"cniVersion": ')
    err = assert_error(out, spec.ERR_DECODE, "stdin")
    assert err["cniVersion"] == "1.1.0"


def test_unknown_cni_version(netns: Path, tmp_path: Path) -> None:
    out = run_plugin(attach_env("ADD", netns), make_conf(tmp_path / "a.sock", version="0.2.0"))
    assert_error(out, spec.ERR_INCOMPATIBLE_VERSION, "0.2.0", "1.1.0")


def test_error_uses_config_version(netns: Path, tmp_path: Path) -> None:
    env = attach_env("ADD", netns)
    del env["CNI_CONTAINERID"]
    out = run_plugin(env, make_conf(tmp_path / "a.sock", version="0.3.1"))
    assert assert_error(out, spec.ERR_INVALID_ENV)["cniVersion"] == "0.3.1"


@pytest.mark.parametrize(("command", "version"), [("CHECK", "0.3.1"), ("GC", "1.0.0")])
def test_command_too_new_for_config_version(
    command: str, version: str, netns: Path, tmp_path: Path
) -> None:
    out = run_plugin(attach_env(command, netns), make_conf(tmp_path / "a.sock", version=version))
    assert_error(out, spec.ERR_INCOMPATIBLE_VERSION, command, version)


# --- agent unreachable ------------------------------------------------------


def test_agent_socket_missing_is_try_again(netns: Path, tmp_path: Path) -> None:
    sock = tmp_path / "absent.sock"
    out = run_plugin(attach_env("ADD", netns), make_conf(sock))
    assert_error(out, spec.ERR_TRY_AGAIN_LATER, str(sock))


def test_agent_socket_missing_status_is_not_available(tmp_path: Path) -> None:
    sock = tmp_path / "absent.sock"
    out = run_plugin({"CNI_COMMAND": "STATUS"}, make_conf(sock))
    assert_error(out, spec.ERR_PLUGIN_NOT_AVAILABLE, str(sock))


def test_agent_connection_refused_is_try_again(netns: Path, tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # socket file exists but nobody listens: ECONNREFUSED
    stale.close()
    out = run_plugin(attach_env("DEL", netns), make_conf(sock))
    assert_error(out, spec.ERR_TRY_AGAIN_LATER, str(sock))


def test_agent_timeout_is_try_again(
    netns: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent(lambda _req: None)
    env = attach_env("ADD", netns)
    env["FLOWCNI_AGENT_TIMEOUT"] = "0.5"
    out = run_plugin(env, make_conf(agent.path))
    assert_error(out, spec.ERR_TRY_AGAIN_LATER, str(agent.path))
    assert len(agent.requests) == 1


def _full_backlog_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is already full (backlog 0, one queued)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(0)
    queued: list[socket.socket] = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(str(path))
        except BlockingIOError:
            c.close()
            return srv, queued
        queued.append(c)


def test_full_agent_queue_is_waited_for_not_failed(tmp_path: Path) -> None:
    """EAGAIN from a full accept queue is overload: the plugin keeps trying."""
    path = tmp_path / "busy.sock"
    srv, queued = _full_backlog_listener(path)
    served: list[bytes] = []

    def drain_then_serve() -> None:
        threading.Event().wait(0.2)
        for _ in range(len(queued) + 1):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                served.append(data)
                if data:
                    conn.sendall(b'{"ok": true}')

    t = threading.Thread(target=drain_then_serve, daemon=True)
    t.start()
    try:
        for c in queued:
            c.close()
        reply = plugin.call_agent(str(path), {"command": "STATUS"}, 5.0)
    finally:
        t.join(5)
        srv.close()
    assert reply == {"ok": True}
    assert any(b"STATUS" in d for d in served)


def test_full_agent_queue_until_deadline_is_try_again(tmp_path: Path) -> None:
    path = tmp_path / "stuck.sock"
    srv, queued = _full_backlog_listener(path)
    try:
        with pytest.raises(CNIError) as err:
            plugin.call_agent(str(path), {"command": "ADD"}, 0.3)
    finally:
        for c in queued:
            c.close()
        srv.close()
    assert err.value.code == spec.ERR_TRY_AGAIN_LATER
    assert str(path) in err.value.msg


# --- forwarding to a fake agent --------------------------------------------


def test_add_forwards_request_and_prints_1_1_result(
    netns: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent({"ok": True, "result": AGENT_RESULT})
    conf = make_conf(agent.path, version="1.1.0", ipam={}, extra={"nested": [1, {"a": None}]})
    out = run_plugin(attach_env("ADD", netns), conf)

    assert out.rc == 0, out.stdout
    assert agent.requests == [
        {
            "command": "ADD",
            "containerID": "c0ffee",
            "netns": str(netns),
            "ifname": "eth0",
            "args": {
                "IgnoreUnknown": "1",
                "K8S_POD_NAMESPACE": "default",
                "K8S_POD_NAME": "web-0",
            },
            "path": "/opt/cni/bin",
            "config": conf,
        }
    ]
    assert out.json == {
        "cniVersion": "1.1.0",
        "interfaces": AGENT_RESULT["interfaces"],
        "ips": [{"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
        "dns": {},
    }


def test_add_prints_0_4_result(netns: Path, fake_agent: Callable[..., FakeAgent]) -> None:
    agent = fake_agent({"ok": True, "result": AGENT_RESULT})
    out = run_plugin(attach_env("ADD", netns), make_conf(agent.path, version="0.4.0"))
    assert out.rc == 0, out.stdout
    assert agent.requests[0]["config"]["cniVersion"] == "0.4.0"
    assert out.json == {
        "cniVersion": "0.4.0",
        "interfaces": AGENT_RESULT["interfaces"],
        "ips": [
            {"address": "10.244.0.5/24", "gateway": "10.244.0.1", "interface": 1, "version": "4"}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
        "dns": {},
    }


def test_add_chains_prev_result(netns: Path, fake_agent: Callable[..., FakeAgent]) -> None:
    agent = fake_agent({"ok": True, "result": AGENT_RESULT})
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [],
        "dns": {"nameservers": ["10.96.0.10"]},
    }
    out = run_plugin(attach_env("ADD", netns), make_conf(agent.path, prevResult=prev))
    assert out.rc == 0, out.stdout
    assert [i["name"] for i in out.json["interfaces"]] == ["lo", "veth0a1b2c3d", "eth0"]
    assert out.json["ips"][0]["interface"] == 2
    assert out.json["dns"] == {"nameservers": ["10.96.0.10"]}


def test_agent_error_is_passed_through(
    netns: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent(
        {"ok": False, "code": 7, "msg": "no IPAM pool for node", "details": "podCIDR unset"}
    )
    out = run_plugin(attach_env("ADD", netns), make_conf(agent.path, version="0.4.0"))
    err = assert_error(out, spec.ERR_INVALID_NETWORK_CONFIG)
    assert err == {
        "cniVersion": "0.4.0",
        "code": 7,
        "msg": "no IPAM pool for node",
        "details": "podCIDR unset",
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"",
        b"[]",
        b'{"result": {}}',
        b'{"ok": false, "code": "7", "msg": "x"}',
        b'{"ok": true}',
        b'{"ok": true, "result": {"ips": "10.0.0.2/24"}}',
    ],
)
def test_malformed_agent_reply_is_io_failure(
    raw: bytes, netns: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent(lambda _req: raw)
    out = run_plugin(attach_env("ADD", netns), make_conf(agent.path))
    assert_error(out, spec.ERR_IO_FAILURE)
    # An ADD the agent carried out but the plugin cannot report is undone.
    commands = [r["command"] for r in agent.requests]
    assert commands == (["ADD", "DEL"] if raw.startswith(b'{"ok": true') else ["ADD"])


def test_del_prints_nothing_and_forwards_missing_netns(
    tmp_path: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent({"ok": True, "result": {}})
    env = attach_env("DEL", tmp_path / "gone")
    del env["CNI_NETNS"]
    out = run_plugin(env, make_conf(agent.path, version="0.3.1"))
    assert (out.rc, out.stdout) == (0, "")
    assert agent.requests[0]["command"] == "DEL"
    assert agent.requests[0]["netns"] == ""
    assert agent.requests[0]["containerID"] == "c0ffee"


def test_del_with_vanished_netns_is_forwarded(
    tmp_path: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent({"ok": True})
    gone = tmp_path / "gone"
    out = run_plugin(attach_env("DEL", gone), make_conf(agent.path))
    assert (out.rc, out.stdout) == (0, "")
    assert agent.requests[0]["netns"] == str(gone)


def test_check_prints_nothing(netns: Path, fake_agent: Callable[..., FakeAgent]) -> None:
    agent = fake_agent({"ok": True})
    prev = {"cniVersion": "0.4.0", "interfaces": [], "ips": []}
    out = run_plugin(attach_env("CHECK", netns), make_conf(agent.path, "0.4.0", prevResult=prev))
    assert (out.rc, out.stdout) == (0, "")
    assert agent.requests[0]["command"] == "CHECK"
    assert agent.requests[0]["config"]["prevResult"] == prev


def test_gc_forwards_valid_attachments(
    tmp_path: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent({"ok": True})
    keep = [{"containerID": "c0ffee", "ifname": "eth0"}]
    conf = make_conf(agent.path)
    conf["cni.dev/valid-attachments"] = keep
    out = run_plugin({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, conf)
    assert (out.rc, out.stdout) == (0, "")
    request = agent.requests[0]
    assert request["command"] == "GC"
    assert request["config"]["cni.dev/valid-attachments"] == keep
    assert (request["containerID"], request["ifname"], request["netns"]) == ("", "", "")


def test_gc_rejects_malformed_valid_attachments(tmp_path: Path) -> None:
    conf = make_conf(tmp_path / "a.sock")
    conf["cni.dev/valid-attachments"] = [{"ifname": 1}]
    out = run_plugin({"CNI_COMMAND": "GC"}, conf)
    assert_error(out, spec.ERR_INVALID_NETWORK_CONFIG, "cni.dev/valid-attachments")


def test_status_ok_prints_nothing(tmp_path: Path, fake_agent: Callable[..., FakeAgent]) -> None:
    agent = fake_agent({"ok": True})
    out = run_plugin({"CNI_COMMAND": "STATUS"}, make_conf(agent.path))
    assert (out.rc, out.stdout) == (0, "")
    assert agent.requests[0]["command"] == "STATUS"


def test_status_agent_reports_limited_connectivity(
    tmp_path: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    agent = fake_agent({"ok": False, "code": 51, "msg": "tunnel to node-b down"})
    out = run_plugin({"CNI_COMMAND": "STATUS"}, make_conf(agent.path))
    err = assert_error(out, spec.ERR_LIMITED_CONNECTIVITY, "tunnel to node-b down")
    assert err["details"] == ""


# --- in-process helpers -----------------------------------------------------


@pytest.mark.parametrize("name", ["eth0", "a" * 15, "net1", "veth-x_y.1"])
def test_validate_ifname_accepts(name: str) -> None:
    plugin.validate_ifname(name)


def test_agent_timeout_env() -> None:
    assert plugin.agent_timeout({}) == 60.0
    assert plugin.agent_timeout({"FLOWCNI_AGENT_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(CNIError) as info:
            plugin.agent_timeout({"FLOWCNI_AGENT_TIMEOUT": bad})
        assert info.value.code == spec.ERR_INVALID_ENV


def test_reply_version_best_effort() -> None:
    assert plugin.reply_version(b'{"cniVersion": "0.3.0"}') == "0.3.0"
    assert plugin.reply_version(b'{"cniVersion": "9.0.0"}') == "1.1.0"
    assert plugin.reply_version(b"\xff") == "1.1.0"
    assert plugin.reply_version(b"") == "1.1.0"


# Load the package by path under ``-I -S`` (no site-packages, as the runtime
# may launch us), then report which modules importing the plugin pulled in.
_BARE_IMPORT = """
import importlib.util, sys, types
root = types.ModuleType("flowcni"); root.__path__ = []; sys.modules["flowcni"] = root
spec = importlib.util.spec_from_file_location(
    "flowcni.cni", sys.argv[1], submodule_search_locations=[sys.argv[2]])
pkg = importlib.util.module_from_spec(spec); sys.modules["flowcni.cni"] = pkg
spec.loader.exec_module(pkg)
before = set(sys.modules)
import flowcni.cni.plugin
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_plugin_imports_only_light_stdlib_modules() -> None:
    cni_dir = Path(plugin.__file__).parent
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _BARE_IMPORT, str(cni_dir / "__init__.py"), cni_dir],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(proc.stdout.split())
    assert {"flowcni.cni.plugin", "flowcni.cni.spec"} <= loaded
    heavy = {"typing", "logging", "argparse", "ipaddress", "subprocess", "asyncio", "threading"}
    heavy |= {"json", "socket", "re", "enum", "selectors", "__future__"}
    assert not loaded & heavy, loaded & heavy


# --- the installed launcher, as a runtime execs it ----------------------------------

# Run the launcher's own code under ``-I -S`` (its shebang flags), then list
# every module the process holds. ``importlib.util`` (used above) itself loads
# ``os``, ``types`` and ``functools``, which would hide them; this does not.
_RUN_LAUNCHER = """
import sys
launcher, report = sys.argv[1], sys.argv[2]
with open(launcher) as f:
    code = compile(f.read(), launcher, "exec")
rc = 0
try:
    exec(code, {"__name__": "__main__"})
except SystemExit as done:
    rc = done.code
with open(report, "w") as f:
    f.write(" ".join(sorted(sys.modules)))
sys.exit(rc)
"""

#: What the launcher may add to a bare ``python3 -IS``: its package mapping,
#: the two plugin modules and three small C extensions (``binascii`` decodes
#: the embedded code; it is built into Debian's python3).
LAUNCHER_MODULES = {
    "flowcni",
    "flowcni.cni",
    "flowcni.cni.plugin",
    "flowcni.cni.spec",
    "_json",
    "_socket",
    "binascii",
}
#: Each costs milliseconds of start-up per pod under gVisor.
SLOW_MODULES = {"re", "enum", "json", "socket", "typing", "selectors", "os", "__future__"}


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    from flowcni.cni import install

    return Path(install.install(str(tmp_path / "bin")))


def test_launcher_survives_its_sources_removed(tmp_path: Path) -> None:
    # The checkout (or the venv) the launcher came from may be moved or removed.
    from flowcni.cni import install

    sources = tmp_path / "checkout" / "cni"
    shutil.copytree(Path(install.__file__).parent, sources)
    path = install.install(str(tmp_path / "bin"), pkgdir=str(sources))
    shutil.rmtree(tmp_path / "checkout")
    text = Path(path).read_text()
    assert str(sources) not in text and "site-packages" not in text
    assert text.startswith(f"#!{install.base_python()} -IS\n")
    proc = subprocess.run([path], env=_clean_env({"CNI_COMMAND": "VERSION"}), cwd="/",
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (0, b""), proc.stdout
    assert json.loads(proc.stdout)["cniVersion"] == "1.1.0"


def test_launcher_for_another_interpreter_version_is_a_cni_error(launcher: Path) -> None:
    # Compiled code is only valid for the version that wrote it: refuse, don't crash.
    tag = sys.implementation.cache_tag
    launcher.write_text(launcher.read_text().replace(repr(tag), repr("cpython-30")))
    proc = subprocess.run([str(launcher)], env=_clean_env({"CNI_COMMAND": "ADD"}),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == spec.ERR_PLUGIN_NOT_AVAILABLE
    assert tag in err["msg"] and "install-cni" in err["msg"]


def test_launcher_embeds_what_the_plugin_imports() -> None:
    from flowcni.cni import install

    assert [name for name, _ in install.plugin_modules()] == ["spec", "plugin"]


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}


def test_installed_launcher_answers_version(launcher: Path) -> None:
    proc = subprocess.run(
        [str(launcher)],
        env=_clean_env({"CNI_COMMAND": "VERSION"}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": list(spec.SUPPORTED_VERSIONS),
    }


def _launcher_modules(
    launcher: Path, tmp_path: Path, env: dict[str, str], stdin: bytes
) -> tuple[CompletedPlugin, set[str]]:
    """Run the launcher's code like its shebang does; return its output and modules."""
    report = tmp_path / "modules.txt"
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RUN_LAUNCHER, str(launcher), str(report)],
        input=stdin,
        env=_clean_env(env),
        capture_output=True,
        timeout=60,
        check=False,
    )
    return CompletedPlugin(proc), set(report.read_text().split())


def _bare_interpreter_modules() -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(proc.stdout.split())


def test_launcher_version_loads_no_slow_modules(launcher: Path, tmp_path: Path) -> None:
    out, loaded = _launcher_modules(launcher, tmp_path, {"CNI_COMMAND": "VERSION"}, b"")
    assert (out.rc, out.stderr) == (0, "")
    assert out.json["cniVersion"] == "1.1.0"
    assert not loaded & SLOW_MODULES, loaded & SLOW_MODULES
    assert loaded - _bare_interpreter_modules() <= LAUNCHER_MODULES


def test_launcher_add_loads_no_slow_modules(
    launcher: Path, tmp_path: Path, netns: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    # The whole ADD path (encode, socket exchange, decode, print) stays light.
    agent = fake_agent({"ok": True, "result": AGENT_RESULT})
    conf = make_conf(agent.path)
    out, loaded = _launcher_modules(
        launcher, tmp_path, attach_env("ADD", netns), json.dumps(conf).encode()
    )
    assert (out.rc, out.stderr) == (0, ""), out.stdout
    assert out.json["ips"] == AGENT_RESULT["ips"]
    assert agent.requests[0]["config"] == conf
    assert not loaded & SLOW_MODULES, loaded & SLOW_MODULES
    assert loaded - _bare_interpreter_modules() <= LAUNCHER_MODULES


@pytest.mark.parametrize(
    ("stdin", "where"),
    [
        # _json raises these through json.decoder, absent from the launcher.
        (b'{"cniVersion": "1.0.0",', "line 1 column 24 (char 23)"),
        (b'{"cniVersion": "1.0.0"\n "name": "x"}', "line 2 column 2 (char 24)"),
        (b'{"cniVersion": "1.0.0", "name": "unterminated}', "line 1 column 33 (char 32)"),
        # The scanner finds no value here itself (StopIteration).
        (b'{"cniVersion": ', "line 1 column 16 (char 15)"),
        (b'{"cniVersion": "1.0.0"} x', "line 1 column 25 (char 24)"),
    ],
)
def test_launcher_malformed_config_is_decode_error_with_position(
    stdin: bytes, where: str, launcher: Path, tmp_path: Path, netns: Path
) -> None:
    out, _ = _launcher_modules(launcher, tmp_path, attach_env("ADD", netns), stdin)
    err = assert_error(out, spec.ERR_DECODE, "stdin", where)
    with pytest.raises(json.JSONDecodeError) as stdlib:
        json.loads(stdin)
    assert stdlib.value.msg in err["msg"]  # same diagnosis as the json package


def test_launcher_output_matches_json_dumps(
    launcher: Path, tmp_path: Path, netns: Path, fake_agent: Callable[..., FakeAgent]
) -> None:
    result = dict(AGENT_RESULT, dns={"nameservers": ["10.96.0.10"], "search": ["ü.example"]})
    agent = fake_agent({"ok": True, "result": result})
    out, _ = _launcher_modules(
        launcher, tmp_path, attach_env("ADD", netns), json.dumps(make_conf(agent.path)).encode()
    )
    assert out.rc == 0, out.stdout
    assert out.stdout == json.dumps(out.json, indent=2) + "\n"
