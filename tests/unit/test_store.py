"""The embedded datastore: cluster config validation, node CIDR allocation, the change log."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from flowcni.datastore.store import Change, ClusterConfig, Store, StoreError, StoreGone


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
    # one row per key, its newest: watchers see the object's final state
    assert [(c.op, c.name, c.body) for c in ch] == [("delete", "prod", None)]
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


def _log_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM log").fetchone()[0])


def test_log_stays_bounded_under_pod_churn(tmp_path: Path) -> None:
    """Named pods come and go (a put, updates, a delete each): the log holds one row per
    live object plus at most max_tombstones deletions, not every change ever made."""
    path = tmp_path / "s.db"
    s = Store(str(path), max_tombstones=20)
    s.put("Namespace", "", "default", {"name": "default"})
    for i in range(300):
        s.put("Pod", "default", f"p{i}", {"name": f"p{i}", "ip": "10.244.1.2"})
        s.put("Pod", "default", f"p{i}", {"name": f"p{i}", "ip": "10.244.1.3"})
        if i >= 5:
            s.delete("Pod", "default", f"p{i - 5}")
    assert len(s.objects("Pod")) == 5
    assert _log_rows(path) <= 1 + 5 + 20 + 5  # counted every 20 // 4 revisions
    assert s.horizon() > 0
    last = s.changes(s.horizon())  # from the horizon on: every change still there
    assert [(c.op, c.name) for c in last[-2:]] == [("put", "p299"), ("delete", "p294")]
    with pytest.raises(StoreGone, match="list again"):
        s.changes(s.horizon() - 1)


def test_a_watcher_behind_the_horizon_relists(tmp_path: Path) -> None:
    """A watcher stalled in its callback while more deletions happen than the log keeps
    gets one relist batch: replaying what it got from its list ends at the store's state
    (the pods deleted behind the horizon included), without a restart."""
    s = Store(str(tmp_path / "s.db"), max_tombstones=4)
    for i in range(6):
        s.put("Pod", "default", f"old{i}", {"name": f"old{i}"})
    rev = s.revision()
    state = {("Pod", "default", o["name"]): o for o in s.objects("Pod")}  # the list
    first, release = threading.Event(), threading.Event()
    batches: list[list[Change]] = []

    def callback(batch: list[Change]) -> None:
        batches.append(batch)
        first.set()
        assert release.wait(10)

    stop = threading.Event()
    t = threading.Thread(target=s.watch, args=(rev, callback, stop, 0.01))
    t.start()
    try:
        s.put("Node", "", "x", {"name": "x"})
        assert first.wait(10)  # the watcher is now stuck in its callback
        for i in range(6):
            s.delete("Pod", "default", f"old{i}")
        for i in range(8):
            s.put("Pod", "default", f"new{i}", {"name": f"new{i}"})
            if i % 2:
                s.delete("Pod", "default", f"new{i}")
        assert s.horizon() > batches[0][-1].rev
        release.set()
        for _ in range(500):
            if batches and batches[-1][-1].rev == s.revision():
                break
            threading.Event().wait(0.01)
    finally:
        release.set()
        stop.set()
        t.join()
    for batch in batches:
        for c in batch:
            k = (c.kind, c.namespace, c.name)
            if c.op == "delete":
                state.pop(k, None)
            else:
                assert c.body is not None
                state[k] = c.body
    want = {("Pod", "default", o["name"]): o for o in s.objects("Pod")}
    want[("Node", "", "x")] = {"name": "x"}
    assert state == want
    assert any(c.op == "delete" and c.name == "old0" for b in batches for c in b)


def test_log_stays_bounded_when_deletes_never_land_on_a_check_revision(tmp_path: Path) -> None:
    """A put and a delete per object (what pod records do on CNI ADD and DEL): every
    delete lands on an odd revision, never on a multiple of the check interval; the
    deletions are still forgotten past max_tombstones."""
    path = tmp_path / "s.db"
    s = Store(str(path), max_tombstones=64)
    s.put("Namespace", "", "default", {"name": "default"})
    for i in range(1000):
        s.put("Pod", "default", f"p{i}", {"name": f"p{i}"})
        s.delete("Pod", "default", f"p{i}")
    assert s.horizon() > 0
    assert _log_rows(path) <= 1 + 64 + 16


def test_exclusive_is_one_transaction_that_other_writers_wait_for(tmp_path: Path) -> None:
    """Store.exclusive (flowctl apply's read-allocate-write): its writes land together,
    or none of them when the block raises; another connection's write waits for it
    and lands after; it does not nest."""
    path = str(tmp_path / "s.db")
    s, other = Store(path), Store(path, timeout=10)
    with pytest.raises(RuntimeError, match="boom"), s.exclusive():
        s.put("Pod", "d", "a", {"n": 1})
        raise RuntimeError("boom")
    assert s.get("Pod", "d", "a") is None and s.revision() == 0
    waited: list[int] = []
    inside = threading.Event()

    def write() -> None:
        inside.wait(10)
        waited.append(other.put("Pod", "d", "c", {"n": 3}))
    t = threading.Thread(target=write)
    t.start()
    with s.exclusive():
        s.put("Pod", "d", "a", {"n": 1})
        inside.set()
        t.join(0.5)  # the other writer is blocked on the lock meanwhile
        assert t.is_alive() and other.get("Pod", "d", "a") is None
        s.put("Pod", "d", "b", {"n": 2})
        with pytest.raises(RuntimeError, match="not nestable"), s.exclusive():
            pass
    t.join(10)
    assert [c.name for c in s.changes(0)] == ["a", "b", "c"] and waited == [3]


def test_objects_share_equal_ints(store: Store) -> None:
    """One int object per distinct value across an initial list (list_decoder): a
    policy's port kept by the engine must not pin the arena of its transient dicts."""
    store.put_many("NetworkPolicy", [("ns", f"np{i}", {"spec": {"port": 8443 + i % 2}})
                                     for i in range(3)])
    ports = [b["spec"]["port"] for b in store.objects("NetworkPolicy")]
    assert ports == [8443, 8444, 8443]
    assert ports[0] is ports[2]
