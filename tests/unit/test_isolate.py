"""One change the agent cannot apply must not stall the rest (controller/isolate.py).

The pure split first, then the agent's change callback behind both datastores'
real watch loops (the embedded store, and the Kubernetes datastore on the fake
API server), with an applier that fails on one named object.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flowcni.controller import hostnet, metrics
from flowcni.controller.agent import Agent
from flowcni.controller.flowsync import FlowSync
from flowcni.controller.isolate import apply_isolating
from flowcni.controller.peers import Peers
from flowcni.datastore.kube import KubeDatastore
from flowcni.datastore.store import Change, ClusterConfig, Store, StoreUnavailable
from flowcni.flows.node import Gateway
from flowcni.flows.tables import DEFAULT as PIPELINE

from tests.support.fakeapi import FakeAPIServer, node_obj, write_kubeconfig
from tests.unit.test_kube_watch import FAST, eventually


def ch(rev: int, name: str, op: str = "put", version: int = 1) -> Change:
    return Change(rev, op, "Pod", "default", name,
                  {"name": name, "version": version} if op == "put" else None)


class Applier:
    """Applies a batch whole or not at all (as the agent's engines and FlowSync
    bundle), refusing any batch that holds a change `bad` says is bad."""

    def __init__(self, bad: Callable[[Change], bool]) -> None:
        self.bad = bad
        self.applied: list[Change] = []
        self.calls = 0

    def __call__(self, batch: list[Change]) -> None:
        self.calls += 1
        for c in batch:
            if self.bad(c):
                raise AttributeError(f"'list' object has no attribute 'items' ({c.name})")
        self.applied.extend(batch)


def test_a_bad_change_is_isolated_and_the_rest_land_in_order() -> None:
    batch = [ch(i, f"p{i}") for i in range(1, 10)]
    batch[4] = ch(5, "bad")
    batch.append(ch(10, "bad", version=2))  # a later version of it, which applies
    batch.append(ch(11, "p3", op="delete"))  # a delete after its put
    app = Applier(lambda c: c.name == "bad" and c.body is not None and c.body["version"] == 1)
    pauses: list[int] = []

    def pause() -> bool:
        pauses.append(1)
        return True

    failed = apply_isolating(batch, app, pause)
    assert [(c.rev, e.__class__) for c, e in failed] == [(5, AttributeError)]
    assert app.applied == [c for c in batch if c.rev != 5]  # every other, in order
    assert pauses == [1]  # one pause, one retry of the whole, then the split
    assert app.calls <= 2 + 2 * 4  # whole twice, then about log2(11) levels of halves


def test_a_passing_fault_is_retried_whole_and_a_store_fault_raised() -> None:
    tries: list[int] = []

    def once(batch: list[Change]) -> None:
        tries.append(len(batch))
        if len(tries) == 1:
            raise RuntimeError("switch reconnecting")

    assert apply_isolating([ch(1, "a"), ch(2, "b")], once, lambda: True) == []
    assert tries == [2, 2]  # the whole batch again, not split

    def locked(batch: list[Change]) -> None:
        raise StoreUnavailable("database is locked")

    with pytest.raises(StoreUnavailable):  # the watch loop retries it, as before
        apply_isolating([ch(1, "a")], locked, lambda: True)
    # stopping during the pause: nothing blamed
    assert apply_isolating([ch(1, "a")], Applier(lambda c: True), lambda: False) == []


# -- the agent's callback behind the real watch loops ------------------------------------


def skeleton_agent(apply: Callable[[list[Change]], None]) -> Agent:
    """An Agent with only what its change callback uses: the engines and OVS behind
    it are `apply` (the agent's _apply_changes)."""
    a = Agent.__new__(Agent)
    a.stop_event = threading.Event()
    a.change_failures = {}
    a.applied_revision = 0
    a._apply_changes = apply  # type: ignore[method-assign]
    return a


def failures_counted(kind: str) -> float:
    text = metrics.exposition(metrics.REGISTRY).decode()
    line = f'flowcni_datastore_change_failures_total{{kind="{kind}"}} '
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line)),
                0.0)


def check_agent_behind_watch(kind: str, put: Callable[[str, int], None],
                             watch: Callable[[Agent], None],
                             caplog: pytest.LogCaptureFixture) -> None:
    """Puts good1, bad (v1, refused), good2, then bad v2 (accepted) through `watch`."""
    app = Applier(lambda c: c.name == "bad" and c.body is not None
                  and "v1" in str(c.body))
    agent = skeleton_agent(app)
    before = failures_counted(kind)
    watch(agent)
    try:
        put("good1", 1)
        put("bad", 1)
        put("good2", 1)
        names = lambda: [c.name for c in app.applied]  # noqa: E731
        eventually(lambda: {"good1", "good2"} <= set(names()), timeout=20,
                   what=lambda: f"good changes applied past the bad one ({names()})")
        eventually(lambda: agent.change_failures, timeout=10, what="the failure recorded")
        (key, f), = agent.change_failures.items()
        assert key == (kind, "", "bad") and isinstance(f.error, AttributeError)
        assert failures_counted(kind) == before + 1
        logged = [r for r in caplog.records if r.levelno == logging.ERROR
                  and f"{kind} bad" in r.getMessage()]
        assert len(logged) == 1 and "AttributeError" in logged[0].getMessage()
        assert "bad" not in names()
        # later changes keep landing, and the bad object's next version is applied
        put("good3", 1)
        put("bad", 2)
        eventually(lambda: "good3" in names() and "bad" in names(), timeout=20,
                   what=lambda: f"later changes applied ({names()})")
        eventually(lambda: not agent.change_failures, timeout=5,
                   what="the failure cleared by the object's good version")
        assert agent.applied_revision > 0
        assert failures_counted(kind) == before + 1  # reported once
    finally:
        agent.stop_event.set()


def test_embedded_store_watch_with_a_bad_object(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    store = Store(str(tmp_path / "store.db"))
    store.set_cluster(ClusterConfig(cluster_cidr="10.244.0.0/16", node_cidr_size=24))
    rev = store.revision()

    def put(name: str, v: int) -> None:
        store.put("Node", "", name, {"name": name, "note": f"v{v}"})

    def watch(agent: Agent) -> None:
        threading.Thread(target=store.watch, args=(rev, agent._on_changes, agent.stop_event),
                         daemon=True).start()

    caplog.set_level(logging.INFO)
    check_agent_behind_watch("Node", put, watch, caplog)


@pytest.fixture
def kube_ds(tmp_path: Path) -> Iterator[tuple[FakeAPIServer, KubeDatastore]]:
    srv = FakeAPIServer(bookmark_interval=0.2).start()
    ds = KubeDatastore(write_kubeconfig(str(tmp_path / "kubeconfig"), srv.url),
                       kinds=["Node"], timeouts=FAST)
    yield srv, ds
    ds.close()
    srv.stop()


def test_kube_datastore_watch_with_a_bad_object(kube_ds: tuple[FakeAPIServer, KubeDatastore],
                                                caplog: pytest.LogCaptureFixture) -> None:
    srv, ds = kube_ds
    ds.objects("Node")
    rev = ds.revision()
    n = iter(range(1, 1000))

    def put(name: str, v: int) -> None:
        # the version rides in a label (kubeconv keeps a Node's labels)
        i = next(n)
        srv.put("nodes", node_obj(name, f"192.168.77.{i}", f"10.244.{i}.0/24",
                                  labels={"v": f"v{v}"}))

    def watch(agent: Agent) -> None:
        threading.Thread(target=ds.watch, args=(rev, agent._on_changes, agent.stop_event),
                         daemon=True).start()

    caplog.set_level(logging.INFO)
    check_agent_behind_watch("Node", put, watch, caplog)


@pytest.mark.parametrize("at", [0, 3, 6])  # 6: the last object (the last try fails)
def test_initial_load_skips_a_bad_object_and_keeps_the_rest(at: int) -> None:
    """An object that makes the engines' load raise no longer aborts start-up: the
    lists load again, from scratch each time, without it; it is reported as failed."""
    objs: dict[str, list[dict[str, Any]]] = {
        "Node": [{"name": "n2"}],
        "Pod": [{"namespace": "default", "name": f"p{i}"} for i in range(7)]}
    objs["Pod"][at] = {"namespace": "default", "name": "bad", "labels": ["x"]}
    state: list[str] = []  # the engines' state, as loaded
    resets: list[int] = []

    def load_objects(changes: list[Change]) -> None:
        for c in changes:  # half-way state on a failure, as a real engine leaves it
            if c.name == "bad":
                raise AttributeError("'list' object has no attribute 'items'")
            state.append(c.name)

    def reset(base: Any) -> None:
        resets.append(1)
        state.clear()

    class FakeStore:
        def objects(self, kind: str) -> list[dict[str, Any]]:
            return objs.get(kind, [])

    a = skeleton_agent(lambda b: None)
    a.flows = FlowSync(PIPELINE, lambda: 1)
    a._load_objects = load_objects  # type: ignore[method-assign]
    a._reset_engines = reset  # type: ignore[method-assign]
    a._load(FakeStore(), 42)  # type: ignore[arg-type]
    assert state == ["n2", *(f"p{i}" for i in range(7) if i != at)]
    assert list(a.change_failures) == [("Pod", "default", "bad")]
    assert a.change_failures[("Pod", "default", "bad")].change.rev == 42
    assert resets  # every attempt after a failure from scratch


def test_peers_take_a_node_again_after_a_refused_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent gives a failed batch again: a node whose flows OVS (or FlowSync) did
    not take must not be skipped then as already known."""
    monkeypatch.setattr(hostnet, "sync_routes", lambda want: None)
    monkeypatch.setattr(hostnet, "nudge_neighbors", lambda ips: None)
    fs = FlowSync(PIPELINE, lambda: 1)
    gw = Gateway("10.244.1.1", "02:00:00:00:00:01", 2, "10.244.1.0/24")
    peers = Peers("me", ClusterConfig(cluster_cidr="10.244.0.0/16", encap="geneve"), gw, 3, fs)
    batch = [Change(1, "put", "Node", "", "n2",
                    {"name": "n2", "nodeIP": "192.168.77.2", "podCIDR": "10.244.2.0/24"})]
    real = fs.set_owners

    def refuse(*a: Any, **kw: Any) -> None:
        raise ValueError("flow ... already belongs to someone")

    monkeypatch.setattr(fs, "set_owners", refuse)
    with pytest.raises(ValueError):
        peers.apply(batch)
    monkeypatch.setattr(fs, "set_owners", real)
    peers.apply(batch)
    assert any(o.startswith("node:") for o in fs.owners()) and "n2" in peers.nodes
