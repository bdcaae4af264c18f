"""Kubernetes YAML validation and `flowctl apply/delete -f` against a store file."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flowcni.datastore.manifests import ManifestError, load
from flowcni.datastore.store import Store

NS = """
apiVersion: v1
kind: Namespace
metadata:
  name: prod
  labels: {team: a, "example.com/tier": web}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev}
"""


def test_namespaces_parse() -> None:
    assert load(NS) == [("Namespace", "", "prod", {"name": "prod", "labels": {
        "team": "a", "example.com/tier": "web"}}),
        ("Namespace", "", "dev", {"name": "dev", "labels": {}})]


@pytest.mark.parametrize("text,msg", [
    ("kind: Namespace\napiVersion: v2\nmetadata: {name: a}", "apiVersion"),
    ("kind: Gadget\napiVersion: v1\nmetadata: {name: a}", "kind: 'Gadget' not supported"),
    ("kind: Namespace\napiVersion: v1\nmetadata: {name: Bad_Name}", "metadata.name"),
    ("kind: Namespace\napiVersion: v1\nmetadata: {name: a, labels: {'-x': y}}",
     "metadata.labels.-x"),
    ("kind: Namespace\napiVersion: v1\nmetadata: {name: a, labels: {x: 'a b'}}",
     "invalid label value"),
    ("kind: [", "not valid YAML"),
    ("", "no objects"),
])
def test_bad_manifests_name_the_field(text: str, msg: str) -> None:
    with pytest.raises(ManifestError, match=msg):
        load(text)


def _flowctl(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWCNI_LAB_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", *args],
                          input=stdin, capture_output=True, text=True, env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="flowctl needs root")
def test_apply_and_delete_cli(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store.db"))
    (tmp_path / "ns.yaml").write_text(NS)
    p = _flowctl(tmp_path, "apply", "-f", str(tmp_path / "ns.yaml"))
    assert p.returncode == 0, p.stderr
    assert store.get("Namespace", "", "prod") == {"name": "prod", "labels": {
        "team": "a", "example.com/tier": "web"}}
    bad = NS + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: X}\n"
    p = _flowctl(tmp_path, "apply", "-f", "-", stdin=bad)
    assert p.returncode == 1 and "metadata.name" in p.stderr
    p = _flowctl(tmp_path, "delete", "-f", str(tmp_path / "ns.yaml"))
    assert p.returncode == 0 and "namespace/prod deleted" in p.stdout
    assert store.objects("Namespace") == []


def _flowctl_node(tmp_path: Path, *args: str,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # No FLOWCNI_LAB_DIR: a node outside any lab (the default lab dir is not read).
    base = {k: v for k, v in os.environ.items()
            if k not in ("FLOWCNI_LAB_DIR", "FLOWCNI_DATASTORE")}
    return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", *args],
                          capture_output=True, text=True, env={**base, **(env or {})})


def test_apply_and_delete_to_a_nodes_own_store(tmp_path: Path) -> None:
    # The store a single node's agent runs on (--datastore sqlite:PATH), no lab at all.
    path = tmp_path / "node" / "store.db"
    path.parent.mkdir()
    store = Store(str(path))
    (tmp_path / "ns.yaml").write_text(NS)
    p = _flowctl_node(tmp_path, "apply", "--datastore", f"sqlite:{path}",
                      "-f", str(tmp_path / "ns.yaml"))
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    assert "namespace/prod applied" in p.stdout
    assert [n["name"] for n in store.objects("Namespace")] == ["dev", "prod"]
    # The same through the environment.
    p = _flowctl_node(tmp_path, "delete", "-f", str(tmp_path / "ns.yaml"),
                      env={"FLOWCNI_DATASTORE": f"sqlite:{path}"})
    assert p.returncode == 0 and "namespace/dev deleted" in p.stdout, p.stderr
    assert store.objects("Namespace") == []


@pytest.mark.parametrize("spec,msg", [
    ("sqlite:{missing}", "no store at"),
    ("kubernetes", "sqlite:PATH"),
    ("sqlite:", "sqlite:PATH"),
])
def test_apply_to_a_wrong_store_fails_and_creates_nothing(tmp_path: Path, spec: str,
                                                          msg: str) -> None:
    missing = tmp_path / "nowhere.db"
    (tmp_path / "ns.yaml").write_text(NS)
    p = _flowctl_node(tmp_path, "apply", "--datastore", spec.format(missing=missing),
                      "-f", str(tmp_path / "ns.yaml"))
    assert p.returncode == 1 and msg in p.stderr and "--datastore" in p.stderr, p.stderr
    assert p.stdout == "" and not missing.exists()


def test_a_nodes_own_store_takes_the_cluster_config_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A single node has no lab to set cluster CIDR etc.: the DaemonSet's file format.
    from flowcni.datastore.base import open_datastore
    from flowcni.datastore.store import CLUSTER_CONFIG_ENV, ClusterConfig

    conf = tmp_path / "cluster.yaml"
    conf.write_text("cluster_cidr: 10.77.0.0/16\nnode_cidr_size: 26\nencap: none\n")
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(conf))
    ds = open_datastore(f"sqlite:{tmp_path / 'store.db'}")
    assert ds is not None
    assert ds.cluster() == ClusterConfig("10.77.0.0/16", 26, "none")
    pod_cidr = ipaddress.IPv4Network(ds.register_node("node1", "192.168.1.5"))
    assert pod_cidr.prefixlen == 26 and pod_cidr.subnet_of(ipaddress.IPv4Network("10.77.0.0/16"))
    monkeypatch.delenv(CLUSTER_CONFIG_ENV)
    assert Store(str(tmp_path / "store.db")).cluster().cluster_cidr == "10.77.0.0/16"
