"""Agents on the Kubernetes datastore: a lab whose nodes watch a (fake) API server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flowcni.lab.lab import Lab

from tests.datapath.conftest import make_lab
from tests.support.fakeapi import policy_obj
from tests.support.kubelab import KubeLabDatastore
from tests.support.probe import eventually, ping


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
