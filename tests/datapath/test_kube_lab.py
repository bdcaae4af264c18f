"""Agents on the Kubernetes datastore: a lab whose nodes watch a (fake) API server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import make_lab
from tests.support.fakeapi import endpoint_slice_obj, policy_obj, service_obj
from tests.support.kubelab import KubeLabDatastore
from tests.support.probe import eventually, ping
from tests.support.svc import request, start_server


@pytest.fixture(scope="module")
def klab() -> Iterator[Lab]:
    lab = make_lab("kube", datastore=KubeLabDatastore)
    lab.down()
    try:
        lab.up(nodes=2, encap="geneve")
        lab.pod_add("a", "node1", labels={"app": "a"})
        lab.pod_add("b", "node2", labels={"app": "b"})
        lab.pod_add("c", "node2", labels={"app": "c"})
        yield lab
    finally:
        ds = lab.datastore
        assert isinstance(ds, KubeLabDatastore)
        ds.stop()
        lab.down()


def test_pods_on_two_nodes_reach_each_other(klab: Lab) -> None:
    a, b = klab.pod("a"), klab.pod("b")
    assert ping(klab, "a", b.ip, count=3)
    assert ping(klab, "b", a.ip, count=3)


def test_networkpolicy_created_through_the_api_is_enforced(klab: Lab) -> None:
    ds = klab.datastore
    assert isinstance(ds, KubeLabDatastore)
    b = klab.pod("b")
    ds.control().put("networkpolicies", policy_obj("default", "b-from-c", {
        "podSelector": {"matchLabels": {"app": "b"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}]}))
    try:
        assert eventually(lambda: not ping(klab, "a", b.ip, timeout=0.5), timeout=10)
        assert ping(klab, "c", b.ip, count=2)
    finally:
        ds.control().delete("networkpolicies", "b-from-c", "default")
    assert eventually(lambda: ping(klab, "a", b.ip, timeout=0.5), timeout=10)


def flowctl(klab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """flowctl with only a kubeconfig, from where the API server is reachable."""
    ds = klab.datastore
    assert isinstance(ds, KubeLabDatastore)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWCNI_")}
    env["FLOWCNI_LAB_DIR"] = os.path.join(klab.base, "no-lab")
    return subprocess.run(netns.exec_argv(klab.external_ns, [
        sys.executable, "-m", "flowcni.ctl.flowctl", "--kubeconfig", ds.kubeconfig, *args]),
        capture_output=True, text=True, env=env, timeout=300)


def test_flowctl_across_the_cluster_through_pod_exec(klab: Lab) -> None:
    p = flowctl(klab, "status", "--json")
    assert p.returncode == 0, p.stderr
    assert [(s["node"], s["synced"]) for s in json.loads(p.stdout)] == [
        ("node1", True), ("node2", True)]
    p = flowctl(klab, "trace", "--from", "default/a", "--to", "default/b", "--proto", "icmp")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "# node1" in p.stdout and "# node2" in p.stdout
    assert "verdict: DELIVERED: delivered to pod default/b on node2" in p.stdout
    p = flowctl(klab, "flows", "--node", "node2", "--table", "Classifier", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [n["node"] for n in out] == ["node2"] and out[0]["flows"]
    assert {f["table"] for f in out[0]["flows"]} == {"Classifier"}
    p = flowctl(klab, "status", "--node", "node9")
    assert p.returncode == 1 and "no node 'node9'" in p.stderr
    p = flowctl(klab, "trace", "--from", "default/zz", "--to", "default/b")
    assert p.returncode == 1 and "no pod default/zz" in p.stderr


def test_flowctl_shows_a_deny_all_policy_made_through_the_api(klab: Lab) -> None:
    ds = klab.datastore
    assert isinstance(ds, KubeLabDatastore)
    b = klab.pod("b")
    ds.control().put("networkpolicies", policy_obj("default", "deny-b", {
        "podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}))
    try:
        assert eventually(lambda: not ping(klab, "a", b.ip, timeout=0.5), timeout=10)
        assert ping(klab, "b", klab.pod("a").ip, count=2)
        p = flowctl(klab, "policy", "--node", "node2")
        assert p.returncode == 0 and "default/deny-b isolates default/b" in p.stdout, p.stdout
        p = flowctl(klab, "trace", "--from", "default/a", "--to", "default/b", "--proto",
                    "icmp")
        assert p.returncode == 3 and "isolated by default/deny-b" in p.stdout, p.stdout
    finally:
        ds.control().delete("networkpolicies", "deny-b", "default")
    assert eventually(lambda: ping(klab, "a", b.ip, timeout=0.5), timeout=10)


def test_service_from_the_api_balances_to_its_endpointslice(klab: Lab) -> None:
    """A Service and its EndpointSlice (as the controller would write them) from the API:
    the ClusterIP reaches the endpoint on the other node; when the slice marks it not
    ready (serving, terminating) and a ready one appears, only the ready one is used."""
    ds = klab.datastore
    assert isinstance(ds, KubeLabDatastore)
    b, c = klab.pod("b"), klab.pod("c")
    servers = [start_server(klab.exec_argv(f"default/{n}", []), n, "80,53u") for n in "bc"]
    api = ds.control()
    port = [{"name": "http", "port": 80, "protocol": "TCP"}]
    try:
        api.put("services", service_obj("default", "web", {
            "clusterIP": "10.96.5.5", "ports": [{"name": "http", "port": 8080,
                                                  "targetPort": 80}]}))
        api.put("endpointslices", endpoint_slice_obj("default", "web-1", "web", [b.ip], port))
        argv = klab.exec_argv("default/a", [])
        assert eventually(lambda: request(argv, ["10.96.5.5:8080"])["10.96.5.5:8080"]
                          == "b ping", timeout=20, interval=0.2)
        sl = endpoint_slice_obj("default", "web-1", "web", [b.ip, c.ip], port)
        sl["endpoints"][0]["conditions"] = {"ready": False, "serving": True,
                                            "terminating": True}
        api.put("endpointslices", sl)
        assert eventually(lambda: all(request(argv, ["10.96.5.5:8080"])["10.96.5.5:8080"]
                                      == "c ping" for _ in range(4)), timeout=20, interval=0.2)
    finally:
        api.delete("endpointslices", "web-1", "default")
        api.delete("services", "web", "default")
        for s in servers:
            s.kill()
            s.wait()
