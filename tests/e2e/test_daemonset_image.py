"""The DaemonSet image built without Docker and its containers run as the manifest says.

The image (kind-config/Dockerfile) is built with `podman build` on a Debian 12
root filesystem made with debootstrap and imported into podman. Then the
DaemonSet's containers run with podman exactly as kind-config/flowcni.yaml
declares them (read from the manifest here, so the two cannot drift apart):
the init container first, then ovs and agent, with their commands, args,
env (fieldRefs filled in as the kubelet would), mounts, privileges,
hostNetwork (the node: a network namespace this test makes) and hostPID.
The probes are the manifest's own exec commands. What the kubelet adds to
every pod is added here too: the service account (token, CA) and the
KUBERNETES_SERVICE_* variables, pointing at a fake API server (TLS) in the
node's namespace. Host paths map into this test's directory, except the
netns volume: CNI_NETNS must name the same file inside and outside the
agent's container, as on a real node, so it stays /run/netns (where this
test's pod namespaces are, under its own prefix).

Then, as a runtime would, the test attaches two pods through the shim that
the init container installed in (the test's) /opt/cni/bin, with the conflist
it installed, and checks traffic between them, the CNI STATUS verb, and DEL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import REPO
from tests.support import debian_root
from tests.support.fakeapi import Control, namespace_obj, node_obj, pod_obj
from tests.support.runtimes import PODMAN_ULIMITS, PodmanEnv, _rmtree

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]

MANIFEST = REPO / "kind-config" / "flowcni.yaml"
PREFIX = os.environ.get("FLOWCNI_TEST_PREFIX", "fct")
NODE_NAME = "node1"
NODE_IP = "192.168.251.10"
POD_CIDR = "10.244.7.0/24"
API_PORT = 6443
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: hostPath volumes that keep their host path (see the module docstring).
SAME_PATH_VOLUMES = {"/var/run/netns": "/run/netns"}


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          **kw)


def _check(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"{' '.join(p.args)} -> rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def eventually(what: str, fn: Callable[[], bool], timeout: float, step: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(step)


def manifest() -> tuple[dict[str, Any], dict[str, str]]:
    """The DaemonSet's pod spec and the ConfigMap's data, from the manifest file."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return ds["spec"]["template"]["spec"], cm["data"]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args ($$ escapes; unknown stays)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  text)


@dataclass
class Node:
    """The lab-like node: a network namespace and a directory standing for its disk."""

    base: Path
    netns: str
    config_dir: Path
    sa_dir: Path
    names: list[str] = field(default_factory=list)

    def host(self, path: str) -> str:
        if path in SAME_PATH_VOLUMES:
            return SAME_PATH_VOLUMES[path]
        return str(self.base / "host" / path.lstrip("/"))

    def field_ref(self, path: str) -> str:
        return {"spec.nodeName": NODE_NAME, "status.hostIP": NODE_IP}[path]

    def env(self, c: dict[str, Any]) -> dict[str, str]:
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
               "KUBERNETES_SERVICE_PORT": str(API_PORT)}  # the kubelet's
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            else:
                env[e["name"]] = self.field_ref(e["valueFrom"]["fieldRef"]["fieldPath"])
        return env

    def run_argv(self, pod: dict[str, Any], c: dict[str, Any], detach: bool) -> list[str]:
        """`podman run` arguments for container `c` of the pod spec, as the kubelet runs it."""
        assert pod["hostNetwork"] is True and pod["hostPID"] is True
        name = f"{PREFIX}-ds-{c['name']}"
        self.names.append(name)
        argv = ["run", "-d" if detach else "--rm", "--name", name, "--pull", "never",
                "--network", f"ns:/run/netns/{self.netns}", "--pid", "host",
                "--hostname", NODE_NAME, *PODMAN_ULIMITS]
        if (c.get("securityContext") or {}).get("privileged"):
            argv.append("--privileged")
        env = self.env(c)
        for k, v in env.items():
            argv += ["--env", f"{k}={v}"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for m in c.get("volumeMounts", []):
            vol = volumes[m["name"]]
            if "hostPath" in vol:
                src = self.host(vol["hostPath"]["path"])
                os.makedirs(src, exist_ok=True)
            else:
                assert vol["configMap"]["name"] == "flowcni-config", vol
                src = str(self.config_dir)
            opts = ["ro" if m.get("readOnly") else "rw"]
            prop = m.get("mountPropagation", "None")
            opts += {"None": [], "HostToContainer": ["rslave"], "Bidirectional": ["rshared"]}[prop]
            argv += ["--volume", f"{src}:{m['mountPath']}:{','.join(opts)}"]
        argv += ["--volume", f"{self.sa_dir}:{SA_DIR}:ro"]  # the kubelet's projected token
        argv += ["--entrypoint", json.dumps([expand(s, env) for s in c["command"]]),
                 c["image"], *(expand(s, env) for s in c.get("args", []))]
        return argv


def make_node(node: Node, cm_data: dict[str, str]) -> Node:
    netns = node.netns
    _check(_run(["ip", "netns", "add", netns]))
    for cmd in (["ip", "link", "set", "lo", "up"],
                # The node's uplink (a veth: kernels without modules have no dummy).
                ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"],
                ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0-peer", "up"],
                ["ip", "link", "set", "eth0", "up"]):
        _check(_run(["ip", "netns", "exec", netns, *cmd]))
    node.config_dir.mkdir()
    for key, text in cm_data.items():
        (node.config_dir / key).write_text(text)
    node.sa_dir.mkdir()
    return node


def start_api(node: Node) -> tuple[subprocess.Popen[str], Control]:
    """The fake API server in the node's namespace, with a certificate for 127.0.0.1."""
    cert, key = node.sa_dir / "ca.crt", node.base / "api.key"
    _check(_run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert)]))
    (node.sa_dir / "token").write_text("test-token")
    (node.sa_dir / "namespace").write_text("flowcni-system")
    sock = str(node.base / "fakeapi.sock")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, sys.executable, "-m", "tests.support.fakeapi",
         "--listen", f"127.0.0.1:{API_PORT}", "--control", sock,
         "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    assert proc.stdout.readline(), "fake API server did not start"
    ctl = Control(sock)
    for ns in ("default", "kube-system", "flowcni-system"):
        ctl.put("namespaces", namespace_obj(ns))
    ctl.put("nodes", node_obj(NODE_NAME, NODE_IP, POD_CIDR))
    return proc, ctl


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[PodmanEnv]:
    """A podman with private storage and config of this test's own, removed after it.

    Its directory is a short one beside the test's: podman's overlay driver
    refuses a runroot path longer than 50 characters.
    """
    base = tempfile.mkdtemp(prefix=f"{PREFIX}-pm-", dir="/tmp")
    penv = PodmanEnv(base_dir=base, conf_dir=str(tmp_path / "net.d"),
                     plugin_dirs=["/usr/lib/cni"], storage_driver="overlay")
    os.makedirs(penv.conf_dir)
    penv.write_config()
    try:
        yield penv
    finally:
        with contextlib.suppress(Exception):
            penv.run("rm", "--all", "--force", "--time", "10", check=False, timeout=120)
        with contextlib.suppress(Exception):
            penv.run("rmi", "--all", "--force", check=False, timeout=120)
        _rmtree(penv.base_dir)


def build_image(podman: PodmanEnv, base_tar: str, image: str) -> None:
    base_ref = f"localhost/{PREFIX}-debian:bookworm"
    podman.run("import", base_tar, base_ref, timeout=600)
    ca = debian_root.host_ca_bundle()
    podman.run("build", "--network", "host", *PODMAN_ULIMITS,
               "--build-arg", f"BASE={base_ref}", "--build-arg", "PIP_CERT=/run/host-ca.crt",
               "--volume", f"{ca}:/run/host-ca.crt:ro",
               "-f", str(REPO / "kind-config" / "Dockerfile"), "-t", image, str(REPO),
               timeout=1200)


class Pods:
    """Pods attached as a runtime does: their netns, then the installed plugin shim."""

    def __init__(self, node: Node, conf: dict[str, Any], shim: str, pidfile: str) -> None:
        self.node, self.conf, self.shim, self.pidfile = node, conf, shim, pidfile
        self.netns: list[str] = []

    def cni(self, command: str, name: str = "", netns: str = "",
            conf: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command,
               "CNI_PATH": os.path.dirname(self.shim), "FLOWCNI_AGENT_PIDFILE": self.pidfile}
        if name:
            env.update(CNI_CONTAINERID=f"{PREFIX}-{name}", CNI_IFNAME="eth0",
                       CNI_NETNS=f"/var/run/netns/{netns}",
                       CNI_ARGS=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}")
        return subprocess.run([self.shim], input=json.dumps(conf or self.conf), env=env,
                              capture_output=True, text=True, timeout=120)

    def add(self, name: str) -> str:
        netns = f"{PREFIX}-ds{name}"
        _check(_run(["ip", "netns", "add", netns]))
        self.netns.append(netns)
        p = self.cni("ADD", name, netns)
        assert p.returncode == 0, p.stdout + p.stderr
        result = json.loads(p.stdout)
        return str(result["ips"][0]["address"].split("/")[0])

    def delete(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.cni("DEL", name, f"{PREFIX}-ds{name}")

    def cleanup(self) -> None:
        for ns in self.netns:
            _run(["ip", "netns", "del", ns])


def probe(podman: PodmanEnv, container: str, spec: dict[str, Any]) -> bool:
    cmd = spec["exec"]["command"]
    return podman.run("exec", container, *cmd, check=False,
                      timeout=spec.get("timeoutSeconds", 1) + 30).returncode == 0


def test_daemonset_image_on_a_lab_node(
    debian12: tuple[str, str], podman: PodmanEnv, tmp_path: Path
) -> None:
    pod, cm_data = manifest()
    images = {c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert len(images) == 1
    image = images.pop()
    build_image(podman, debian12[1], f"localhost/{image}")

    node = Node(tmp_path, f"{PREFIX}-dsnode", tmp_path / "configmap", tmp_path / "sa")
    api: subprocess.Popen[str] | None = None
    pods: Pods | None = None
    try:
        node = make_node(node, cm_data)
        api, ctl = start_api(node)
        for c in pod["initContainers"]:  # in order, each to completion
            podman.run(*node.run_argv(pod, c, detach=False), timeout=300)
        conflist = json.loads(Path(node.host("/etc/cni/net.d"), "10-flowcni.conflist")
                              .read_text())
        shim = os.path.join(node.host("/opt/cni/bin"), "flowcni")
        assert os.access(shim, os.X_OK)

        containers = {c["name"]: c for c in pod["containers"]}
        for c in pod["containers"]:
            podman.run(*node.run_argv(pod, c, detach=True), timeout=300)

        def logs() -> str:
            return "\n".join(
                f"--- {n}:\n" + podman.run("logs", "--tail", "40", n, check=False).stderr[-4000:]
                + podman.run("logs", "--tail", "40", n, check=False).stdout[-2000:]
                for n in node.names)

        agent, ovs = f"{PREFIX}-ds-agent", f"{PREFIX}-ds-ovs"
        try:
            # The kubelet's order: startup, then liveness and readiness.
            a = containers["agent"]
            eventually("agent startupProbe", lambda: probe(podman, agent, a["startupProbe"]),
                       timeout=180, step=2)
            eventually("agent readinessProbe",
                       lambda: probe(podman, agent, a["readinessProbe"]), timeout=120, step=2)
            assert probe(podman, agent, a["livenessProbe"])
            assert probe(podman, ovs, containers["ovs"]["livenessProbe"])
        except AssertionError as e:
            raise AssertionError(f"{e}\n{logs()}") from None

        # The runtime's view: plugin config = conflist's entry plus name and version.
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"],
                **conflist["plugins"][0]}
        pods = Pods(node, conf, shim, os.path.join(node.host("/run/flowcni"), "agent.pid"))
        # STATUS exists from CNI 1.1.0 on (the manifest's conflist says 1.0.0,
        # for runtimes that know no newer): ask as a 1.1.0 runtime does.
        status = pods.cni("STATUS", conf={**conf, "cniVersion": "1.1.0"})
        assert (status.returncode, status.stdout) == (0, ""), status.stdout + status.stderr
        ips = {name: pods.add(name) for name in ("web", "client")}
        for name, ip in ips.items():
            ctl.put("pods", pod_obj("default", name, NODE_NAME, ip))  # as the kubelet reports
        assert all(ip.startswith("10.244.7.") for ip in ips.values()), ips

        def ping(src: str, dst: str) -> bool:
            return _run(["ip", "netns", "exec", f"{PREFIX}-ds{src}", "ping", "-c1", "-W2",
                         ips[dst]]).returncode == 0

        def ports() -> set[str]:
            # The node's OVS, as the ovs container serves it to the agent.
            out = podman.run("exec", ovs, "ovs-vsctl", "list-ports", "br-int").stdout
            return set(out.split())

        with_pods = ports()
        eventually("client -> web ping", lambda: ping("client", "web"), timeout=60)
        assert ping("web", "client")

        for name in ips:
            p = pods.delete(name)
            assert p.returncode == 0, p.stdout + p.stderr
            link = _run(["ip", "netns", "exec", f"{PREFIX}-ds{name}", "ip", "link", "show",
                         "eth0"])
            assert link.returncode != 0, f"{name}: eth0 left after DEL"
        # Two pod ports came and went; the gateway (and tunnel) port stays.
        without = ports()
        assert len(with_pods - without) == 2 and without < with_pods, (with_pods, without)
        assert "flowcni-gw0" in without
    finally:
        if pods is not None:
            pods.cleanup()
        podman.run("rm", "--force", "--ignore", "--time", "10", *node.names, check=False,
                   timeout=120)
        if api is not None:
            api.kill()
            api.wait()
        _run(["ip", "netns", "del", node.netns])
        shutil.rmtree(tmp_path / "host", ignore_errors=True)
