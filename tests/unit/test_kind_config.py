"""kind-config/: manifests valid offline, RBAC read-only, the pieces agree with each other.

Nothing here needs Docker or a cluster: the manifests are validated against
the Kubernetes OpenAPI schemas bundled with kubernetes-validate, and every
cross-reference (agent flags, conflist, ConfigMap keys, mounts, RBAC vs the
resources the datastore watches) is checked against the code that consumes it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from flowcni.cni import install as cni_install
from flowcni.cni.spec import DEFAULT_AGENT_SOCKET, parse_config
from flowcni.controller.agent import parse_args
from flowcni.datastore.kube import CLUSTER_CONFIG_ENV, KINDS, load_cluster_config

KIND_DIR = Path(__file__).resolve().parents[2] / "kind-config"
SCRIPTS = ["up.sh", "down.sh", "ovs-start.sh", "agent-start.sh", "cni-shim.sh"]
# What KubeDatastore lists and watches, as RBAC names it: kind -> (API group, resource).
RBAC_NAMES = {"Node": ("", "nodes"), "Namespace": ("", "namespaces"), "Pod": ("", "pods"),
              "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
              "Service": ("", "services"),
              "EndpointSlice": ("discovery.k8s.io", "endpointslices"),
              "TenantNetwork": ("flowcni.io", "tenantnetworks"),

              "AdminNetworkPolicy": ("policy.networking.k8s.io", "adminnetworkpolicies"),
              "BaselineAdminNetworkPolicy": ("policy.networking.k8s.io",
                                             "baselineadminnetworkpolicies"),
              "ClusterNetworkPolicy": ("policy.networking.k8s.io", "clusternetworkpolicies")}
K8S_VERSIONS = ["1.29", "latest"]  # the oldest we claim, and the newest bundled schemas


def manifests() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((KIND_DIR / "flowcni.yaml").read_text()) if d]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    found = [c for c in spec["containers"] + spec.get("initContainers", [])
             if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pyproject test extra)")
    if version == "latest":
        version = kv.latest_version()
    kinds = []
    for doc in manifests():
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {path}: {e.message}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["Namespace", "ServiceAccount", "ClusterRole",
                                    "ClusterRoleBinding", "ConfigMap", "DaemonSet"])


def test_validator_catches_mistakes() -> None:
    """The validation above has teeth: a typo'd field or a wrong type fails."""
    kv = pytest.importorskip("kubernetes_validate")
    ds = one("DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, "1.29", strict=True)
    ds = one("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = "yes"
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, "1.29", strict=True)


def test_rbac_is_read_only_and_covers_what_the_agent_watches() -> None:
    role = one("ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        assert not rule.get("nonResourceURLs"), rule
        granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
        assert set(rule["verbs"]) == {"get", "list", "watch"}, "list and watch go together"
    assert granted == {RBAC_NAMES[k] for k in KINDS}
    from flowcni.datastore.kube import RESOURCES  # the paths the informers really request
    assert {k: (r.group, r.plural) for k, r in RESOURCES.items()} == RBAC_NAMES
    assert not [d for d in manifests() if d["kind"] in ("Role", "RoleBinding")]
    binding = one("ClusterRoleBinding")
    sa = one("ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert pod_spec()["serviceAccountName"] == sa["metadata"]["name"]
    assert one("Namespace")["metadata"]["name"] == sa["metadata"]["namespace"]


def conflist() -> dict[str, Any]:
    data = one("ConfigMap")["data"]["10-flowcni.conflist"]
    conf: dict[str, Any] = json.loads(data)
    return conf


def test_conflist_is_accepted_by_the_plugin_parser() -> None:
    conf = conflist()
    assert conf["name"] == "flowcni" and conf["cniVersion"] == "1.0.0"
    assert [p["type"] for p in conf["plugins"]] == ["flowcni"]
    for plugin in conf["plugins"]:
        # What a runtime hands each plugin of a list: its entry plus name and version.
        net = dict(plugin, name=conf["name"], cniVersion=conf["cniVersion"])
        parsed = parse_config(json.dumps(net).encode())
        assert parsed["agentSocket"] == DEFAULT_AGENT_SOCKET
    agent = parse_args(agent_argv())
    assert agent.cni_socket == conf["plugins"][0]["agentSocket"]


def agent_argv() -> list[str]:
    """The agent's command line as kubelet would expand it on a kind worker."""
    c = container("agent")
    env = {"NODE_NAME": "flowcni-worker", "NODE_IP": "172.18.0.3"}
    argv = []
    for a in c["args"]:
        for k, v in env.items():
            a = a.replace(f"$({k})", v)
        argv.append(a)
    return argv


def test_agent_container_runs_the_agent_with_valid_flags() -> None:
    c = container("agent")
    assert c["command"] == ["/opt/flowcni/agent-start.sh"]
    assert "exec flowcni-agent \"$@\"" in (KIND_DIR / "agent-start.sh").read_text()
    a = parse_args(agent_argv())
    assert (a.node, a.node_ip, a.datastore, a.kubeconfig) == (
        "flowcni-worker", "172.18.0.3", "kubernetes", None)  # in-cluster service account
    assert a.ovsdb == "unix:/var/run/openvswitch/db.sock"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env[CLUSTER_CONFIG_ENV]["value"] == "/etc/flowcni/cluster.yaml"


def test_cluster_config_matches_the_kind_pod_subnet(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(one("ConfigMap")["data"]["cluster.yaml"])
    cfg = load_cluster_config(str(path))
    kind = yaml.safe_load((KIND_DIR / "cluster.yaml").read_text())
    assert cfg.cluster_cidr == kind["networking"]["podSubnet"]
    # kind's controller manager hands out /24s, as node_cidr_size says.
    assert cfg.node_cidr_size == 24


def test_kind_cluster_config() -> None:
    """kind's own config: no published schema in the validator, so checked field by field."""
    kind = yaml.safe_load((KIND_DIR / "cluster.yaml").read_text())
    assert (kind["kind"], kind["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert set(kind) <= {"kind", "apiVersion", "name", "networking", "nodes"}
    assert [n["role"] for n in kind["nodes"]] == ["control-plane", "worker", "worker"]
    net = kind["networking"]
    assert net["disableDefaultCNI"] is True
    assert net.get("kubeProxyMode", "iptables") != "none", "kube-proxy is kept for now"
    assert not ipaddress.ip_network(net["podSubnet"]).overlaps(
        ipaddress.ip_network(net["serviceSubnet"]))


def test_daemonset_shape() -> None:
    ds = one("DaemonSet")
    spec = pod_spec()
    assert ds["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert any(t.get("key") == "node-role.kubernetes.io/control-plane" or
               (t.get("operator") == "Exists" and "key" not in t) for t in spec["tolerations"])
    names = [c["name"] for c in spec["containers"]]
    assert names == ["ovs", "agent"]
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"]["privileged"] is True, c["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"] + spec["initContainers"]:
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']}: mount of unknown volume {m['name']}"
    host = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert {"/run/flowcni", "/var/run/openvswitch", "/etc/openvswitch", "/opt/cni/bin",
            "/etc/cni/net.d", "/lib/modules", "/var/lib/flowcni"} <= host

    def mounts(name: str) -> dict[str, str]:
        vols = volumes
        return {m["mountPath"]: vols[m["name"]].get("hostPath", {}).get("path", "")
                for m in container(name)["volumeMounts"]}

    agent = mounts("agent")
    a = parse_args(agent_argv())
    assert agent["/run/flowcni"] == "/run/flowcni" == os.path.dirname(a.cni_socket)
    assert agent["/var/lib/flowcni"] == a.state_dir
    assert agent["/var/run/openvswitch"] == "/var/run/openvswitch"
    assert mounts("ovs")["/var/run/openvswitch"] == "/var/run/openvswitch"
    netns = [m for m in container("agent")["volumeMounts"] if m["mountPath"] == "/var/run/netns"]
    assert netns and netns[0]["mountPropagation"] == "HostToContainer"
    assert container("ovs")["command"] == ["/opt/flowcni/ovs-start.sh"]


def test_init_container_installs_shim_and_conflist() -> None:
    c = container("install-cni")
    script = c["command"][-1]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/host/opt/cni/bin", "/host/etc/cni/net.d", "/etc/flowcni"} <= mounts
    assert "/opt/flowcni/cni-shim.sh /host/opt/cni/bin/.flowcni.tmp" in script
    assert "/host/opt/cni/bin/flowcni\n" in script
    assert "/host/etc/cni/net.d/10-flowcni.conflist" in script
    dockerfile = (KIND_DIR / "Dockerfile").read_text()
    assert "flowctl install-cni --dest /opt/flowcni/cni" in dockerfile
    assert "cni-shim.sh" in dockerfile and "ovs-start.sh" in dockerfile
    assert "agent-start.sh" in dockerfile


def test_dockerfile() -> None:
    text = (KIND_DIR / "Dockerfile").read_text()
    args = dict(ln.split()[1].split("=", 1) for ln in text.splitlines()
                if ln.startswith("ARG ") and "=" in ln)
    froms = [ln.split()[1] for ln in text.splitlines() if ln.startswith("FROM ")]
    # One stage, on Debian 12 unless the builder names another Debian 12 base.
    assert froms == ["${BASE}"] and args["BASE"].startswith("debian:12")
    for pkg in ("openvswitch-switch", "iproute2", "nftables", "python3-venv"):
        assert pkg in text, pkg
    for src in [ln.split()[1:-1] for ln in text.splitlines() if ln.startswith("COPY ")
                and "--from" not in ln]:
        for s in src:
            assert (KIND_DIR.parent / s).exists(), f"COPY source {s} missing"
    # Every package pyproject installs is in the image (api/ was once left out).
    copied = {s for ln in text.splitlines() if ln.startswith("COPY ") for s in ln.split()[1:-1]}
    pyproject = (KIND_DIR.parent / "pyproject.toml").read_text()
    dirs = set(re.findall(r'^"flowcni\.\w+" = "(\w+)"$', pyproject, re.M))
    assert dirs and dirs <= copied, f"packages not copied into the image: {dirs - copied}"


def test_probes_use_an_existing_command() -> None:
    """Liveness/readiness run `flowctl probe`; it has to exist in flowctl."""
    from flowcni.ctl.flowctl import build_parser
    c = container("agent")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"][:2] == ["flowctl", "probe"], probe
    sub = [a for a in build_parser()._actions if a.dest == "cmd"]
    choices = getattr(sub[0], "choices", None) or {} if sub else {}
    if "probe" not in choices:
        pytest.skip("flowctl has no `probe` subcommand yet (requested in the issue 5 report)")
    for probe in ("livenessProbe", "readinessProbe"):
        build_parser().parse_args(c[probe]["exec"]["command"][1:])


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script: str) -> None:
    path = KIND_DIR / script
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    subprocess.run([shell, "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (Debian package shellcheck)")
def test_shellcheck() -> None:
    p = subprocess.run(["shellcheck", *(str(KIND_DIR / s) for s in SCRIPTS)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _shim(env: dict[str, str], stdin: str = "{}") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(KIND_DIR / "cni-shim.sh")], input=stdin, text=True,
                          capture_output=True, timeout=30,
                          env={"PATH": os.environ["PATH"], **env})


def test_cni_shim_reports_a_missing_agent(tmp_path: Path) -> None:
    p = _shim({"CNI_COMMAND": "ADD", "FLOWCNI_AGENT_PIDFILE": str(tmp_path / "none.pid")})
    assert p.returncode == 1
    err = json.loads(p.stdout)
    assert err["code"] == 11 and "not running" in err["msg"]
    (tmp_path / "bad.pid").write_text("12x\n")
    p = _shim({"CNI_COMMAND": "ADD", "FLOWCNI_AGENT_PIDFILE": str(tmp_path / "bad.pid")})
    assert json.loads(p.stdout)["code"] == 11 and "not a pid" in p.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nsenter") is None,
                    reason="entering a mount namespace needs root and nsenter")
def test_cni_shim_runs_the_plugin_in_the_agents_mount_namespace(tmp_path: Path) -> None:
    """The real plugin launcher, reached through nsenter, answers VERSION."""
    launcher = cni_install.install(str(tmp_path / "cni"))
    (tmp_path / "agent.pid").write_text(f"{os.getpid()}\n")  # our own mount namespace
    p = _shim({"CNI_COMMAND": "VERSION", "FLOWCNI_AGENT_PIDFILE": str(tmp_path / "agent.pid"),
               "FLOWCNI_PLUGIN": launcher}, stdin='{"cniVersion": "1.0.0"}')
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1.0.0" in json.loads(p.stdout)["supportedVersions"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_tenant_network_crd_validates_and_matches_the_informer(version: str) -> None:
    from flowcni.datastore.kube import RESOURCES
    crd = yaml.safe_load((KIND_DIR / "tenantnetwork-crd.yaml").read_text())
    res = RESOURCES["TenantNetwork"]
    assert crd["spec"]["group"] == res.group == RBAC_NAMES["TenantNetwork"][0]
    assert crd["spec"]["names"]["plural"] == res.plural == RBAC_NAMES["TenantNetwork"][1]
    assert [v["name"] for v in crd["spec"]["versions"]] == [res.version]
    assert crd["spec"]["scope"] == "Cluster"
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pyproject test extra)")
    if version == "latest":
        version = kv.latest_version()
    kv.validate(crd, version, strict=True)
