"""Kubernetes YAML validation and `flowctl apply/delete -f` against a store file."""

from __future__ import annotations

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
