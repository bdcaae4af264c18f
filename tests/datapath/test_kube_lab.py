"""Agents on the Kubernetes datastore: a lab whose nodes watch a (fake) API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
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
