"""The embedded datastore: cluster config validation, node CIDR allocation, the change log."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flowcni.datastore.store import Change, ClusterConfig, Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(str(tmp_path / "store.db"))
    s.set_cluster(ClusterConfig(cluster_cidr="10.244.0.0/16", node_cidr_size=24))
    return s


def test_cluster_config_validation() -> None:
    with pytest.raises(StoreError, match="encap 'ipip' unknown"):
        ClusterConfig(encap="ipip").validate()
    with pytest.raises(StoreError, match="node-cidr-size 16 does not fit"):
        ClusterConfig(cluster_cidr="10.244.0.0/16", node_cidr_size=16).validate()
    with pytest.raises(StoreError, match="cluster-cidr"):
        ClusterConfig(cluster_cidr="10.244.0.0/33").validate()
    assert ClusterConfig(encap="none").validate().encap == "none"


def test_nodes_get_distinct_cidrs_and_keep_them(store: Store) -> None:
    a = store.register_node("n1", "192.168.77.1")
    b = store.register_node("n2", "192.168.77.2")
    assert (a, b) == ("10.244.1.0/24", "10.244.2.0/24")
    assert store.register_node("n1", "192.168.77.1") == a  # re-registration keeps it
    store.delete("Node", "", "n1")
    assert store.register_node("n3", "192.168.77.3") == a  # freed range is reused


def test_overlapping_cidr_and_duplicate_ip_refused(store: Store) -> None:
    store.register_node("n1", "192.168.77.1", "10.244.5.0/24")
    with pytest.raises(StoreError, match=r"10.244.5.0/24 overlaps node n1's 10.244.5.0/24"):
        store.register_node("n2", "192.168.77.2", "10.244.5.0/24")
    with pytest.raises(StoreError, match="outside the cluster CIDR"):
        store.register_node("n2", "192.168.77.2", "10.99.0.0/24")
    with pytest.raises(StoreError, match="node IP 192.168.77.1 already used by node n1"):
        store.register_node("n2", "192.168.77.1")
    assert [n["name"] for n in store.nodes()] == ["n1"]


def test_exhausted_cluster_cidr(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "s.db"))
    s.set_cluster(ClusterConfig(cluster_cidr="10.0.0.0/23", node_cidr_size=24))
    s.register_node("n1", "192.168.0.1")
    with pytest.raises(StoreError, match="no free /24"):
        s.register_node("n2", "192.168.0.2")


def test_change_log_and_watch(store: Store) -> None:
    rev = store.revision()
    store.put("Namespace", "", "prod", {"name": "prod", "labels": {"env": "prod"}})
    store.put("Namespace", "", "prod", {"name": "prod", "labels": {"env": "p2"}})
    store.delete("Namespace", "", "prod")
    assert not store.delete("Namespace", "", "prod")
    ch = store.changes(rev)
    assert [(c.op, c.name) for c in ch] == [("put", "prod"), ("put", "prod"),
                                            ("delete", "prod")]
    assert ch[0].body is None  # the object is gone now: watchers see its final state
    got: list[Change] = []
    stop = threading.Event()
    t = threading.Thread(target=store.watch, args=(store.revision(), got.extend, stop, 0.01))
    t.start()
    store.put("Node", "", "x", {"name": "x"})
    for _ in range(200):
        if got:
            break
        threading.Event().wait(0.01)
    stop.set()
    t.join()
    assert [(c.kind, c.name, c.body) for c in got] == [("Node", "x", {"name": "x"})]
