"""The Kubernetes datastore against a fake API server speaking list and watch.

Each test drives the server (tests.support.fakeapi) to do what a real API
server does on a bad day (drop or stall watches, compact history, answer
slowly) and checks the change stream the agent would see. No root needed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flowcni.datastore import kube, kubeconv
from flowcni.datastore.kube import (
    CLUSTER_CONFIG_ENV,
    Cache,
    KubeDatastore,
    Timeouts,
    load_cluster_config,
)
from flowcni.datastore.kubeconv import Malformed
from flowcni.datastore.store import Change, ClusterConfig, StoreError

from tests.support.fakeapi import (
    Control,
    FakeAPIServer,
    endpoint_slice_obj,
    namespace_obj,
    node_obj,
    pod_obj,
    policy_obj,
    service_obj,
    tenant_network_obj,
    write_kubeconfig,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = Timeouts(watch=30, read_grace=5, connect=2, list_read=5, backoff_initial=0.05,
                backoff_max=0.2)
POLICY_SPEC = {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}},
                                      "podSelector": {"matchExpressions": [
                                          {"key": "role", "operator": "In",
                                           "values": ["api"]}]}}],
                            "ports": [{"protocol": "TCP", "port": "http", "endPort": None}]}]}


def eventually(cond: Callable[[], Any], timeout: float = 5.0,
               what: str | Callable[[], str] = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.01)


class Collector:
    """Runs KubeDatastore.watch in a thread, keeping every change delivered."""

    def __init__(self, ds: KubeDatastore, since: int = 0) -> None:
        self.changes: list[Change] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=ds.watch, args=(since, self.changes.extend,
                                                              self.stop), daemon=True)
        self.thread.start()

    def of(self, kind: str) -> list[tuple[str, str, dict[str, Any] | None]]:
        return [(c.op, c.name, c.body) for c in list(self.changes) if c.kind == kind]

    def wait(self, kind: str, n: int, timeout: float = 5.0) -> list[tuple[str, str, Any]]:
        return eventually(lambda: len(self.of(kind)) >= n and self.of(kind), timeout,
                          lambda: f"{n} {kind} changes (have {self.of(kind)})")


@pytest.fixture
def server() -> Iterator[FakeAPIServer]:
    srv = FakeAPIServer(bookmark_interval=0.2).start()
    yield srv
    srv.stop()


@pytest.fixture
def open_ds(server: FakeAPIServer, tmp_path: Any) -> Iterator[Callable[..., KubeDatastore]]:
    made: list[KubeDatastore] = []
    kc = write_kubeconfig(str(tmp_path / "kubeconfig"), server.url)

    def make(**kw: Any) -> KubeDatastore:
        kw.setdefault("timeouts", FAST)
        ds = KubeDatastore(kc, **kw)
        made.append(ds)
        return ds

    yield make
    for ds in made:
        ds.close()


def seed(srv: FakeAPIServer) -> None:
    srv.put("namespaces", namespace_obj("web", {"team": "a"}))
    srv.put("nodes", node_obj("node1", "192.168.77.1", "10.244.1.0/24"))
    srv.put("pods", pod_obj("web", "api", "node1", "10.244.1.5", {"role": "api"},
                            [{"name": "http", "containerPort": 8080}]))
    srv.put("networkpolicies", policy_obj("web", "db-in", POLICY_SPEC))
    srv.put("services", service_obj("web", "api", {"selector": {"role": "api"},
                                                    "ports": [{"port": 80}]}))
    srv.put("endpointslices", endpoint_slice_obj("web", "api-x1", "api", ["10.244.1.5"],
                                                 [{"name": "http", "port": 8080}]))
    srv.put("tenantnetworks", tenant_network_obj("blue", TENANT_SPEC))


TENANT_SPEC = {"namespaceSelector": {"matchLabels": {"tenant": "blue"}},
               "subnets": ["10.50.0.0/16"]}

EXPECTED: dict[str, list[dict[str, Any]]] = {
    "TenantNetwork": [{"name": "blue", "labels": {}, "spec": TENANT_SPEC,
                       "created": "2026-01-01T00:00:00Z"}],
    "Namespace": [{"name": "web", "labels": {"kubernetes.io/metadata.name": "web",
                                            "team": "a"}}],
    "Node": [{"name": "node1", "nodeIP": "192.168.77.1", "podCIDR": "10.244.1.0/24"}],
    "Pod": [{"namespace": "web", "name": "api", "labels": {"role": "api"},
             "ip": "10.244.1.5", "node": "node1",
             "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
    "NetworkPolicy": [{"namespace": "web", "name": "db-in", "spec": POLICY_SPEC}],
    "Service": [{"namespace": "web", "name": "api",
                 "spec": {"selector": {"role": "api"}, "ports": [{"port": 80}]}}],
    "EndpointSlice": [{"namespace": "web", "name": "api-x1",
                       "labels": {"kubernetes.io/service-name": "api"},
                       "endpoints": [{"addresses": ["10.244.1.5"],
                                      "conditions": {"ready": True}}],
                       "ports": [{"name": "http", "port": 8080}], "addressType": "IPv4"}],
}


# -- through the fake API server -------------------------------------------------------------

def test_initial_sync_of_every_kind(server: FakeAPIServer,
                                    open_ds: Callable[..., KubeDatastore]) -> None:
    seed(server)
    ds = open_ds()
    for kind, want in EXPECTED.items():
        assert ds.objects(kind) == want, kind
    # The initial list is itself a change: a watcher from revision 0 sees every object.
    seen = Collector(ds)
    for kind, want in EXPECTED.items():
        assert seen.wait(kind, 1) == [("put", want[0]["name"], want[0])]
    for path in ("/api/v1/nodes", "/api/v1/namespaces", "/api/v1/pods", "/api/v1/services",
                 "/apis/networking.k8s.io/v1/networkpolicies",
                 "/apis/discovery.k8s.io/v1/endpointslices",
                 "/apis/flowcni.io/v1alpha1/tenantnetworks"):
        reqs = server.requests(path)
        assert reqs[0]["query"].get("watch") is None, "lists first"
        watch = eventually(functools.partial(_watches, server, path))[0]
        assert watch["query"]["allowWatchBookmarks"] == "true"
        assert int(watch["query"]["timeoutSeconds"]) >= FAST.watch
        assert watch["query"]["resourceVersion"] == str(server.revision())


def _objects(kind: str, version: int) -> tuple[str, dict[str, Any]]:
    """(resource, object) of `kind`, differing per version."""
    return {
        "Node": ("nodes", node_obj("n9", "192.168.77.9", f"10.244.{9 + version}.0/24")),
        "Namespace": ("namespaces", namespace_obj("ns9", {"v": str(version)})),
        "Pod": ("pods", pod_obj("web", "p9", "n9", f"10.244.9.{version + 2}", {"v": "x"})),
        "NetworkPolicy": ("networkpolicies", policy_obj("web", "np9", {
            "podSelector": {"matchLabels": {"v": str(version)}}})),
        "Service": ("services", service_obj("web", "s9", {"ports": [{"port": 80 + version}]})),
        "EndpointSlice": ("endpointslices", endpoint_slice_obj(
            "web", "s9-a", "s9", [f"10.244.9.{version + 2}"], [{"port": 80}])),
        "TenantNetwork": ("tenantnetworks", tenant_network_obj("t9", {
            **TENANT_SPEC, "egress": {"masquerade": bool(version % 2)}})),
    }[kind]


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_add_modify_delete(kind: str, server: FakeAPIServer,
                           open_ds: Callable[..., KubeDatastore]) -> None:
    ds = open_ds()
    assert ds.objects(kind) == []
    seen = Collector(ds, ds.revision())
    res, v1 = _objects(kind, 1)
    name = v1["metadata"]["name"]
    ns = v1["metadata"].get("namespace", "")
    # One step at a time: a watcher that reads after all three would only get the
    # newest change of the object (the delete), which is all the agent needs.
    server.create(res, v1)
    seen.wait(kind, 1)
    server.update(res, _objects(kind, 2)[1])
    seen.wait(kind, 2)
    server.delete(res, name, ns)
    got = seen.wait(kind, 3)
    b1, b2 = kubeconv.convert(kind, v1)[1], kubeconv.convert(kind, _objects(kind, 2)[1])[1]
    assert got == [("put", name, b1), ("put", name, b2), ("delete", name, None)]
    assert all(c.namespace == ns for c in seen.changes)
    revs = [c.rev for c in seen.changes]
    assert revs == sorted(revs) and len(set(revs)) == 3
    assert ds.objects(kind) == []


def test_unchanged_update_emits_nothing(server: FakeAPIServer,
                                        open_ds: Callable[..., KubeDatastore]) -> None:
    """A Node status heartbeat changes nothing the agent uses, so nothing is delivered."""
    n = node_obj("n1", "192.168.77.1", "10.244.1.0/24")
    server.put("nodes", n)
    ds = open_ds(kinds=["Node"])
    ds.objects("Node")
    seen = Collector(ds, ds.revision())
    n["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    server.put("nodes", n)
    server.put("nodes", node_obj("n2", "192.168.77.2", "10.244.2.0/24"))
    assert [x[1] for x in seen.wait("Node", 1)] == ["n2"]
    time.sleep(0.1)
    assert len(seen.changes) == 1


def test_changes_are_ordered_across_kinds(server: FakeAPIServer,
                                          open_ds: Callable[..., KubeDatastore]) -> None:
    ds = open_ds()
    ds.wait_synced(timeout=5)
    seen = Collector(ds, ds.revision())
    server.put("namespaces", namespace_obj("a"))
    eventually(lambda: seen.of("Namespace"))
    server.put("pods", pod_obj("a", "p", "n1", "10.244.1.9"))
    eventually(lambda: seen.of("Pod"))
    server.delete("namespaces", "a")
    eventually(lambda: len(seen.changes) == 3)
    assert [(c.kind, c.op) for c in seen.changes] == [
        ("Namespace", "put"), ("Pod", "put"), ("Namespace", "delete")]
    assert [c.rev for c in seen.changes] == sorted(c.rev for c in seen.changes)


def _watches(server: FakeAPIServer, path: str) -> list[dict[str, Any]]:
    return [r for r in server.requests(path) if r["query"].get("watch") == "true"]


def test_dropped_watch_resumes_from_last_resource_version(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    ds = open_ds(kinds=["Node"], timeouts=Timeouts(
        watch=30, read_grace=5, connect=2, backoff_initial=0.4, backoff_max=0.4))
    ds.objects("Node")
    seen = Collector(ds, ds.revision())
    for i in range(1, 4):
        server.put("nodes", node_obj(f"n{i}", f"192.168.77.{i}", f"10.244.{i}.0/24"))
    seen.wait("Node", 3)
    last_seen = server.revision()
    assert ds.informers["Node"].resource_version == str(last_seen)
    server.drop_watches(lose_pending=True)
    # While the agent is disconnected (backing off), more happens.
    for i in range(4, 7):
        server.put("nodes", node_obj(f"n{i}", f"192.168.77.{i}", f"10.244.{i}.0/24"))
    server.delete("nodes", "n2")
    got = seen.wait("Node", 7)
    assert [(op, name) for op, name, _ in got] == [
        ("put", "n1"), ("put", "n2"), ("put", "n3"),
        ("put", "n4"), ("put", "n5"), ("put", "n6"), ("delete", "n2")]
    rewatch = _watches(server, "/api/v1/nodes")[1]
    assert rewatch["query"]["resourceVersion"] == str(last_seen), "resumed, not re-listed"
    assert len([r for r in server.requests("/api/v1/nodes") if "watch" not in r["query"]]) == 1
    # Every server event handled exactly once: none lost, none replayed twice.
    assert ds.informers["Node"].stats["events"] == 7
    assert [n["name"] for n in ds.objects("Node")] == ["n1", "n3", "n4", "n5", "n6"]


def test_stalled_watch_times_out_and_resumes(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    """A connection that goes silent without closing must not hang the informer."""
    ds = open_ds(kinds=["Node"], timeouts=Timeouts(watch=1, read_grace=1, connect=2,
                                                   backoff_initial=0.05, backoff_max=0.1))
    ds.objects("Node")
    seen = Collector(ds, ds.revision())
    server.bookmark_interval = 60  # no keep-alive traffic on the stalled stream either
    assert eventually(server.watch_count) == 1
    before = server.revision()
    stalled_at = time.time()
    server.stall_watches()
    server.put("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
    assert seen.wait("Node", 1, timeout=10) == [
        ("put", "n1", {"name": "n1", "nodeIP": "192.168.77.1", "podCIDR": "10.244.1.0/24"})]
    after = [w for w in _watches(server, "/api/v1/nodes") if w["time"] > stalled_at]
    assert after[0]["query"]["resourceVersion"] == str(before)
    assert "ReadTimeout" in ds.informers["Node"].last_error


def test_server_timeout_rewatches_from_bookmark(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    """A watch the server ends on time is resumed from the newest bookmark, with no list."""
    server.put("pods", pod_obj("default", "other", "n1", "10.244.1.7"))
    ds = open_ds(kinds=["Node"], timeouts=Timeouts(watch=1, read_grace=2, connect=2,
                                                   backoff_initial=0.05, backoff_max=0.1))
    ds.objects("Node")
    server.put("pods", pod_obj("default", "more", "n1", "10.244.1.8"))  # other resources move rv
    rv = server.revision()
    eventually(lambda: ds.informers["Node"].resource_version == str(rv), what="a bookmark")
    eventually(lambda: any(w["query"]["resourceVersion"] == str(rv)
                           for w in _watches(server, "/api/v1/nodes")), timeout=6)
    assert ds.informers["Node"].stats["lists"] == 1
    assert ds.informers["Node"].stats["errors"] == 0


@pytest.mark.parametrize("gone_mode", ["event", "http"])
def test_gone_relists_and_diffs(gone_mode: str, server: FakeAPIServer,
                                open_ds: Callable[..., KubeDatastore]) -> None:
    server.set_gone_mode(gone_mode)
    for i in (1, 2, 3):
        server.put("nodes", node_obj(f"n{i}", f"192.168.77.{i}", f"10.244.{i}.0/24"))
    server.put("pods", pod_obj("web", "gone", "n2", "10.244.2.5"))
    server.put("pods", pod_obj("web", "stays", "n1", "10.244.1.5"))
    ds = open_ds(kinds=["Node", "Pod"])
    ds.wait_synced(timeout=5)
    seen = Collector(ds, ds.revision())
    eventually(lambda: server.watch_count() == 2)
    server.pause_watches()
    server.drop_watches()
    # While the watches are down: n2 and its pod vanish, n3 changes, n4 joins ...
    server.delete("nodes", "n2")
    server.delete("pods", "gone", "web")
    server.put("nodes", node_obj("n3", "192.168.77.33", "10.244.3.0/24"))
    server.put("nodes", node_obj("n4", "192.168.77.4", "10.244.4.0/24"))
    # ... and the history that would tell about it is compacted away.
    server.compact()
    server.resume_watches()
    got = seen.wait("Node", 3)
    assert sorted((op, name) for op, name, _ in got) == [
        ("delete", "n2"), ("put", "n3"), ("put", "n4")]
    assert dict((name, body) for _, name, body in got)["n3"]["nodeIP"] == "192.168.77.33"
    assert seen.wait("Pod", 1) == [("delete", "gone", None)]
    assert [p["name"] for p in ds.objects("Pod")] == ["stays"]
    for path in ("/api/v1/nodes", "/api/v1/pods"):
        reqs = server.requests(path)
        lists = [r for r in reqs if "watch" not in r["query"]]
        assert len(lists) == 2, f"{path}: re-listed once after 410"
        assert lists[1]["time"] > _watches(server, path)[1]["time"]
    assert ds.informers["Node"].stats["gone"] == 1


def test_malformed_objects_are_skipped(server: FakeAPIServer,
                                       open_ds: Callable[..., KubeDatastore],
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flowcni.datastore.kube")
    server.put("nodes", node_obj("no-cidr", "192.168.77.8", None))  # in the first list
    server.put("nodes", node_obj("good1", "192.168.77.1", "10.244.1.0/24"))
    ds = open_ds(kinds=["Node", "Pod", "NetworkPolicy"])
    assert [n["name"] for n in ds.objects("Node")] == ["good1"]
    seen = Collector(ds, ds.revision())
    server.put("pods", {"metadata": "not-a-dict", "spec": {}})
    server.put("pods", pod_obj("web", "bad-labels", "n1", "10.244.1.3", {"a": 1}))  # type: ignore
    server.put("networkpolicies", {"metadata": {"namespace": "web", "name": "np-bad"},
                                   "spec": ["not", "a", "map"]})
    server.put("nodes", node_obj("no-ip", None, "10.244.9.0/24"))
    server.put("pods", pod_obj("web", "fine", "good1", "10.244.1.4"))
    server.put("nodes", node_obj("good2", "192.168.77.2", "10.244.2.0/24"))
    assert [x[1] for x in seen.wait("Pod", 1)] == ["fine"]
    assert [x[1] for x in seen.wait("Node", 1)] == ["good2"]
    # A node that loses what the agent needs is dropped, as a re-list would drop it.
    server.put("nodes", node_obj("good1", "192.168.77.1", None))
    assert seen.wait("Node", 2)[-1] == ("delete", "good1", None)
    assert ds.objects("NetworkPolicy") == []
    assert [p["name"] for p in ds.objects("Pod")] == ["fine"]
    log = caplog.text
    for name in ("Node no-cidr", "Node no-ip", "Pod web/bad-labels", "NetworkPolicy web/np-bad",
                 "Pod (unnamed)", "Node good1: no spec.podCIDR"):
        assert name in log, name
    assert ds.informers["Pod"].stats["errors"] == 0, "the watch kept going"
    assert ds.cache.skipped[("Node", ("", "no-cidr"))].startswith("Node no-cidr: no spec.podCIDR")


def test_objects_waits_for_the_first_list(server: FakeAPIServer,
                                          open_ds: Callable[..., KubeDatastore]) -> None:
    server.put("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
    server.pause_lists()
    ds = open_ds(kinds=["Node"])
    assert ds.revision() == 0  # never blocks
    with pytest.raises(StoreError, match="not listed"):
        ds.objects("Node", timeout=0.2)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(ds.objects("Node")), daemon=True)
    t.start()
    time.sleep(0.3)
    assert result == [], "answered before the list completed"
    server.resume_lists()
    t.join(5)
    assert result == [[{"name": "n1", "nodeIP": "192.168.77.1", "podCIDR": "10.244.1.0/24"}]]


def test_paged_list(server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    for i in range(7):
        server.put("pods", pod_obj("web", f"p{i}", "n1", f"10.244.1.{10 + i}"))
    server.put("pods", pod_obj("web\tx", "tab\tname", "n1", "10.244.1.30", {"a": "b\tc\n"}))
    ds = open_ds(kinds=["Pod"], page_size=3)
    assert [p["name"] for p in ds.objects("Pod")] == [f"p{i}" for i in range(7)] + [
        "tab\tname"]  # names that cannot be valid still round-trip
    assert ds.objects("Pod")[0] == kubeconv.pod(pod_obj("web", "p0", "n1", "10.244.1.10"))
    assert ds.objects("Pod")[-1]["labels"] == {"a": "b\tc\n"}
    lists = [r for r in server.requests("/api/v1/pods") if "watch" not in r["query"]]
    assert [bool(r["query"].get("continue")) for r in lists] == [False, True, True]
    assert ds.cache.get("Pod", ("web\tx", "tab\tname")) is not None
    assert all(r["query"]["limit"] == "3" for r in lists)


def test_watch_redelivers_after_a_failing_callback(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    ds = open_ds(kinds=["Node"])
    ds.objects("Node")
    calls: list[list[Change]] = []

    def flaky(batch: list[Change]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("transient")

    stop = threading.Event()
    threading.Thread(target=ds.watch, args=(ds.revision(), flaky, stop), daemon=True).start()
    server.put("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
    eventually(lambda: len(calls) >= 2, timeout=5)
    stop.set()
    assert calls[0] == calls[1]


def test_register_node(server: FakeAPIServer, open_ds: Callable[..., KubeDatastore],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CLUSTER_CONFIG_ENV, raising=False)
    server.put("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
    server.put("nodes", node_obj("bare", "192.168.77.2", None))
    server.put("nodes", node_obj("outside", "192.168.77.3", "10.99.0.0/24"))
    ds = open_ds(kinds=["Node"], node_wait=0.3)
    assert ds.register_node("n1", "192.168.77.1") == "10.244.1.0/24"
    assert ds.register_node("n1", "192.168.77.1", "10.244.1.0/24") == "10.244.1.0/24"
    assert ds.node_ip("n1") == "192.168.77.1"
    with pytest.raises(StoreError, match="differs from the Node's spec.podCIDR 10.244.1.0/24"):
        ds.register_node("n1", "192.168.77.1", "10.244.7.0/24")
    with pytest.raises(StoreError, match="node bare: Node bare: no spec.podCIDR"):
        ds.register_node("bare", "192.168.77.2")
    with pytest.raises(StoreError, match="node ghost: no Node of that name"):
        ds.register_node("ghost", "192.168.77.9")
    with pytest.raises(StoreError, match="outside cluster_cidr 10.244.0.0/16"):
        ds.register_node("outside", "192.168.77.3")
    # The controller manager fills podCIDR in shortly after the kubelet registers the node.
    ds.node_wait = 5
    threading.Timer(0.3, lambda: server.put(
        "nodes", node_obj("bare", "192.168.77.2", "10.244.2.0/24"))).start()
    assert ds.register_node("bare", "192.168.77.2") == "10.244.2.0/24"


def test_cluster_config_from_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                 open_ds: Callable[..., KubeDatastore]) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("cluster_cidr: 10.200.0.0/16\nencap: vxlan\nip_masq: false\nmtu: 1400\n")
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(path))
    ds = open_ds(kinds=["Node"])
    assert ds.cluster() == ClusterConfig("10.200.0.0/16", 24, "vxlan", False, 1400)


def test_bad_client_configuration_is_a_store_error(tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reports StoreError as "cannot start: ..." and exits 2, not a traceback."""
    with pytest.raises(StoreError, match=r"missing\): kubeconfig .*missing: .*No such file"):
        KubeDatastore(str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(StoreError, match="in-cluster service account"):
        KubeDatastore(None)


def test_fakeapi_as_a_process(tmp_path: Any) -> None:
    """The mode a lab uses: a separate process, driven through its unix control socket."""
    sock = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fakeapi", "--listen",
                             "127.0.0.1:0", "--control", sock, "--bookmark-interval", "0.2"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        ctl = Control(ready["control"])
        ctl.put("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
        ds = KubeDatastore(write_kubeconfig(str(tmp_path / "kc"), ready["url"]),
                           kinds=["Node"], timeouts=FAST)
        try:
            assert ds.register_node("n1", "192.168.77.1") == "10.244.1.0/24"
            seen = Collector(ds, ds.revision())
            eventually(lambda: ctl.watch_count() == 1)
            assert ctl.drop_watches() == 1
            ctl.put("nodes", node_obj("n2", "192.168.77.2", "10.244.2.0/24"))
            assert [x[:2] for x in seen.wait("Node", 1)] == [("put", "n2")]
            assert len([r for r in ctl.requests("/api/v1/nodes")
                        if r["query"].get("watch")]) >= 2
            with pytest.raises(RuntimeError, match="409 AlreadyExists"):
                ctl.create("nodes", node_obj("n1", "192.168.77.1", "10.244.1.0/24"))
        finally:
            ds.close()
        ctl.shutdown()
        assert proc.wait(10) == 0
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the cache ---------------------------------------------------------------------------------

def test_cache_keeps_the_newest_change_per_object() -> None:
    c = Cache()
    c.put("Pod", ("a", "p1"), {"v": 1})
    c.put("Pod", ("a", "p2"), {"v": 1})
    assert c.put("Pod", ("a", "p1"), {"v": 1}) is None  # unchanged: no change
    c.put("Pod", ("a", "p1"), {"v": 2})
    c.delete("Pod", ("a", "p2"))
    assert c.delete("Pod", ("a", "p2")) is None
    assert [(x.rev, x.op, x.name, x.body) for x in c.since(0)] == [
        (3, "put", "p1", {"v": 2}), (4, "delete", "p2", None)]
    assert c.since(3) == c.since(0)[1:]
    assert c.since(4) == []


def test_cache_packs_bodies_and_gives_them_back_whole() -> None:
    """Bodies are deflated with their kind's first body as dictionary: what comes
    back is equal to what went in, for the first body, later ones, other kinds,
    a re-put after a delete, and a watcher reading the log (op from the table)."""
    c = Cache()
    pods = {("ns1", f"p{i}"): {"namespace": "ns1", "name": f"p{i}", "ip": f"10.0.0.{i}",
                               "labels": {"app": "a" * i}, "ports": []} for i in range(50)}
    c.replace("Pod", pods)
    c.put("Node", ("", "n1"), {"name": "n1", "nodeIP": "192.0.2.1"})
    assert c.objects("Pod") == [pods[k] for k in sorted(pods)]
    assert c.get("Node", ("", "n1")) == {"name": "n1", "nodeIP": "192.0.2.1"}
    blob = c._objects["Pod"][("ns1", "p7")]
    assert len(blob) < len(kube.encode(pods[("ns1", "p7")]))  # packed smaller than its JSON
    assert c.put("Pod", ("ns1", "p7"), dict(reversed(list(pods[("ns1", "p7")].items())))) is None
    rev = c.revision()
    c.delete("Pod", ("ns1", "p7"))
    c.put("Pod", ("ns1", "p8"), {**pods[("ns1", "p8")], "ip": ""})
    c.put("Pod", ("ns1", "p7"), {"namespace": "ns1", "name": "p7", "ip": "10.0.1.7"})
    assert [(x.op, x.name, x.body) for x in c.since(rev)] == [
        ("put", "p8", {**pods[("ns1", "p8")], "ip": ""}),
        ("put", "p7", {"namespace": "ns1", "name": "p7", "ip": "10.0.1.7"})]


def test_cache_lists_share_equal_ints() -> None:
    """One int object per distinct value across an initial list (datastore.store
    list_decoder): what the engines keep of each body must not be made in the
    middle of its transient dicts (see there)."""
    c = Cache()
    for i in range(3):
        c.put("NetworkPolicy", ("ns", f"np{i}"), {"spec": {"ports": [{"port": 8443 + i % 2}]}})
    ports = [b["spec"]["ports"][0]["port"] for b in c.objects("NetworkPolicy")]
    assert ports == [8443, 8444, 8443]
    assert ports[0] is ports[2]


def test_cache_replace_diffs_against_what_it_had() -> None:
    c = Cache()
    c.replace("Node", {("", "a"): {"x": 1}, ("", "b"): {"x": 1}})
    rev = c.revision()
    changes = c.replace("Node", {("", "a"): {"x": 1}, ("", "c"): {"x": 3}})
    assert [(op, key[1]) for op, key in changes] == [("delete", "b"), ("put", "c")]
    assert [(x.op, x.name) for x in c.since(rev)] == [("delete", "b"), ("put", "c")]
    assert c.objects("Node") == [{"x": 1}, {"x": 3}]


def test_cache_forgets_old_tombstones() -> None:
    c = Cache(max_tombstones=10)
    for i in range(30):
        c.put("Pod", ("a", f"p{i}"), {})
        c.delete("Pod", ("a", f"p{i}"))
    assert len(c.since(0)) <= 10
    assert c.horizon > 0


# -- conversions -------------------------------------------------------------------------------

def test_node_conversion() -> None:
    raw = node_obj("n1", "192.168.77.1", "10.244.1.0/24")
    raw["status"]["addresses"].insert(0, {"type": "InternalIP", "address": "fd00::1"})
    raw["status"]["addresses"].append({"type": "ExternalIP", "address": "203.0.113.1"})
    assert kubeconv.node(raw) == {"name": "n1", "nodeIP": "192.168.77.1",
                                  "podCIDR": "10.244.1.0/24"}
    with pytest.raises(Malformed, match="^Node n1: no spec.podCIDR"):
        kubeconv.node(node_obj("n1", "192.168.77.1", None))
    with pytest.raises(Malformed, match="^Node n1: no InternalIP"):
        kubeconv.node(node_obj("n1", None, "10.244.1.0/24"))
    with pytest.raises(Malformed, match="^Node n1: "):
        kubeconv.node(node_obj("n1", "192.168.77.1", "10.244.1.0/33"))


def test_namespace_conversion() -> None:
    assert kubeconv.namespace({"metadata": {"name": "a"}}) == {"name": "a", "labels": {}}
    assert kubeconv.namespace(namespace_obj("a", {"t": "x"}))["labels"] == {
        "kubernetes.io/metadata.name": "a", "t": "x"}
    with pytest.raises(Malformed, match="^Namespace a: metadata.labels"):
        kubeconv.namespace({"metadata": {"name": "a", "labels": ["x"]}})


def test_pod_conversion() -> None:
    raw = pod_obj("web", "p", "n1", "10.244.1.5", {"app": "x"},
                  [{"name": "http", "containerPort": 80},
                   {"containerPort": 53, "protocol": "UDP"}])
    raw["status"]["podIPs"].append({"ip": "fd00::5"})
    raw["spec"]["containers"].append({"name": "side", "ports": [
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]})
    raw["spec"]["initContainers"] = [
        {"name": "once", "ports": [{"containerPort": 1}]},
        {"name": "sidecar", "restartPolicy": "Always", "ports": [{"containerPort": 15001}]}]
    assert kubeconv.pod(raw) == {
        "namespace": "web", "name": "p", "labels": {"app": "x"}, "ip": "10.244.1.5",
        "node": "n1", "ports": [
            {"name": "http", "containerPort": 80, "protocol": "TCP"},
            {"name": "", "containerPort": 53, "protocol": "UDP"},
            {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
            {"name": "", "containerPort": 15001, "protocol": "TCP"}]}


def test_pod_ip_rules() -> None:
    pending = pod_obj("web", "p", "", None, phase="Pending")
    assert kubeconv.pod(pending)["ip"] == "" and kubeconv.pod(pending)["node"] == ""
    old_style = pod_obj("web", "p", "n1", None)
    old_style["status"]["podIP"] = "10.244.1.6"
    assert kubeconv.pod(old_style)["ip"] == "10.244.1.6"
    assert kubeconv.pod(pod_obj("web", "p", "n1", "10.244.1.7", phase="Succeeded"))["ip"] == ""
    assert kubeconv.pod(pod_obj("web", "p", "n1", "10.244.1.7", phase="Failed"))["ip"] == ""
    with pytest.raises(Malformed, match="^Pod web/p: "):
        kubeconv.pod(pod_obj("web", "p", "n1", "not-an-ip"))


def test_pod_malformed() -> None:
    with pytest.raises(Malformed, match=r"^Pod \(unnamed\): metadata is not an object"):
        kubeconv.pod({"metadata": "x"})
    with pytest.raises(Malformed, match=r"^Pod \(unnamed\): metadata.name missing"):
        kubeconv.pod({"metadata": {"namespace": "a"}})
    with pytest.raises(Malformed, match="^Pod web/p: container 'main': bad containerPort"):
        kubeconv.pod(pod_obj("web", "p", "n1", None, ports=[{"containerPort": "80"}]))
    with pytest.raises(Malformed, match="^Pod web/p: spec is not an object"):
        kubeconv.pod({"metadata": {"namespace": "web", "name": "p"}, "spec": []})


def test_policy_spec_is_verbatim_and_a_copy() -> None:
    raw = policy_obj("web", "np", POLICY_SPEC)
    body = kubeconv.network_policy(raw)
    assert body == {"namespace": "web", "name": "np", "spec": POLICY_SPEC}
    body["spec"]["podSelector"]["matchLabels"]["app"] = "changed"
    assert raw["spec"]["podSelector"]["matchLabels"]["app"] == "db"
    with pytest.raises(Malformed, match="^NetworkPolicy web/np: spec is not an object"):
        kubeconv.network_policy({"metadata": {"namespace": "web", "name": "np"}})


def test_service_and_endpoint_slice_conversion() -> None:
    assert kubeconv.service(service_obj("web", "s", {"clusterIP": "10.96.0.10"})) == {
        "namespace": "web", "name": "s", "spec": {"clusterIP": "10.96.0.10"}}
    raw = endpoint_slice_obj("web", "s-1", "s", [], [])
    raw["ports"] = None  # the API leaves ports null when the Service has none
    assert kubeconv.endpoint_slice(raw) == {
        "namespace": "web", "name": "s-1", "labels": {"kubernetes.io/service-name": "s"},
        "endpoints": [], "ports": [], "addressType": "IPv4"}
    del raw["addressType"]
    with pytest.raises(Malformed, match="^EndpointSlice web/s-1: addressType"):
        kubeconv.endpoint_slice(raw)


def test_convert_reports_surprises_as_malformed() -> None:
    raw = node_obj("n1", "192.168.77.1", "10.244.1.0/24")
    raw["status"]["addresses"] = 7  # not iterable
    with pytest.raises(Malformed, match="^Node n1: TypeError"):
        kubeconv.convert("Node", raw)
    assert kubeconv.convert("Namespace", namespace_obj("a"))[0] == ("", "a")


# -- cluster settings --------------------------------------------------------------------------

def test_load_cluster_config(tmp_path: Any) -> None:
    assert load_cluster_config(None) == ClusterConfig()
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"cluster_cidr": "10.9.0.0/16", "node_cidr_size": 26}))
    assert load_cluster_config(str(p)) == ClusterConfig("10.9.0.0/16", 26)
    for text, err in (("clustr_cidr: 10.0.0.0/8", "unknown key 'clustr_cidr'"),
                      ("mtu: true", "mtu: True is not a int"),
                      ("encap: ipip", "encap 'ipip' unknown"),
                      ("- a", "not a mapping"),
                      ("a: [", "not valid YAML")):
        p.write_text(text)
        with pytest.raises(StoreError, match=err):
            load_cluster_config(str(p))
    with pytest.raises(StoreError, match="No such file"):
        load_cluster_config(str(tmp_path / "missing.yaml"))


def test_host_network_pods_are_not_pod_network_pods(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    """A hostNetwork pod reports its node's IP as podIP; it must not become a policy
    subject or peer (or the node's address would be isolated or allowed as that pod)."""
    from flowcni.flows.policy import World, parse_policy, pod_from_body
    seed(server)
    host = pod_obj("web", "agent", "node1", "192.168.77.1", {"role": "api"})
    host["spec"]["hostNetwork"] = True
    server.put("pods", host)
    ds = open_ds()
    listed = eventually(lambda: len(ds.objects("Pod")) == 2 and ds.objects("Pod"), 30.0,
                        "both pods listed")
    pods = {p["name"]: p for p in listed}
    assert pods["agent"]["ip"] == "" and pods["agent"]["node"] == "node1"
    assert pods["api"]["ip"] == "10.244.1.5"
    w = World()
    w.namespaces = {"web": {"team": "a"}}
    for body in pods.values():
        w.put_pod(pod_from_body(body))
    pol = parse_policy("web", "all", {"podSelector": {"matchLabels": {"role": "api"}},
                                      "ingress": [{"from": [{"podSelector": {}}]}]})
    w.put_policy(pol)
    assert [p.name for p in w.selected(pol)] == ["api"]
    peers = pol.rules[0].peers
    assert peers is not None
    assert [p.ip for p in w.peer_pods(peers[0], "web")] == ["10.244.1.5"]
    bad = pod_obj("web", "x", "node1", "192.168.77.1")
    bad["spec"]["hostNetwork"] = "yes"
    with pytest.raises(Malformed, match="^Pod web/x: spec.hostNetwork is not a boolean"):
        kubeconv.pod(bad)


def test_tenant_networks_without_their_crd_are_none(server: FakeAPIServer,
                                                    open_ds: Callable[..., KubeDatastore]
                                                    ) -> None:
    """A cluster without flowcni's CRD: TenantNetworks list as empty (404), the agent
    does not wait for them forever, and everything else flows as before."""
    server.absent.add("tenantnetworks")
    seed(server)
    ds = open_ds()
    assert ds.objects("TenantNetwork", timeout=5) == []
    assert ds.objects("Node") == EXPECTED["Node"]
    assert ds.status()["TenantNetwork"]["synced"]


def test_invalid_tenant_network_reaches_the_agent(server: FakeAPIServer,
                                                   open_ds: Callable[..., KubeDatastore]
                                                   ) -> None:
    """An invalid spec is not dropped: resolution turns it into a condition."""
    server.put("tenantnetworks", tenant_network_obj("bad", {"subnets": ["10.1.0.0/16"]}))
    ds = open_ds()
    bodies = ds.objects("TenantNetwork", timeout=5)
    assert [b["name"] for b in bodies] == ["bad"]
    from flowcni.datastore.tenantconv import resolve
    t = resolve(bodies, [], [], "10.244.0.0/16").tenants["bad"]
    assert not t.ok and t.conditions[0].message.startswith("spec.namespaceSelector")
ANP_SPEC = {"priority": 10, "subject": {"namespaces": {}},
            "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}


def test_cluster_policies_are_listed_and_watched(server: FakeAPIServer,
                                                 open_ds: Callable[..., KubeDatastore]) -> None:
    """The upstream CRDs (both versions) flow through like built-in kinds; one that is
    not a valid object is skipped and logged, the others still arrive."""
    server.put("adminnetworkpolicies", {"metadata": {"name": "a"}, "spec": ANP_SPEC})
    kinds = ("AdminNetworkPolicy", "BaselineAdminNetworkPolicy", "ClusterNetworkPolicy")
    ds = open_ds(kinds=kinds)
    assert ds.wait_synced(timeout=10)
    assert [o["name"] for o in ds.objects("AdminNetworkPolicy")] == ["a"]
    assert ds.objects("AdminNetworkPolicy")[0]["spec"] == ANP_SPEC
    col = Collector(ds, ds.revision())
    server.put("clusternetworkpolicies", {"metadata": {"name": "c"}, "spec": {
        **ANP_SPEC, "tier": "Baseline"}})
    server.put("baselineadminnetworkpolicies", {"metadata": {"name": "default"}})  # no spec
    eventually(lambda: col.of("ClusterNetworkPolicy"), what="the v1alpha2 object")
    body = col.of("ClusterNetworkPolicy")[0][2]
    assert body is not None and body["spec"]["tier"] == "Baseline"
    server.delete("adminnetworkpolicies", "a")
    eventually(lambda: ("delete", "a", None) in col.of("AdminNetworkPolicy"), what="delete")
    assert not ds.objects("BaselineAdminNetworkPolicy")
    col.stop.set()


def test_cluster_policy_crds_not_installed_mean_none(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the CRDs (404) the kinds count as listed and empty: the agent starts."""
    from tests.support import fakeapi
    monkeypatch.delitem(fakeapi.RESOURCES, "clusternetworkpolicies")
    server.put("namespaces", namespace_obj("web"))
    ds = open_ds(kinds=("Namespace", "ClusterNetworkPolicy"))
    assert ds.wait_synced(timeout=10)
    assert ds.objects("ClusterNetworkPolicy", timeout=1) == []
    assert [o["name"] for o in ds.objects("Namespace")] == ["web"]
def test_watch_takes_a_burst_whole(server: FakeAPIServer,
                                   open_ds: Callable[..., KubeDatastore]) -> None:
    """Changes arriving one by one in a burst are applied as one batch, not one each."""
    ds = open_ds(kinds=["Node"])
    ds.objects("Node")
    rev = ds.revision()
    ds.cache.put("Pod", ("a", "p0"), {"v": 0})

    def trickle() -> None:
        for i in range(1, 21):
            time.sleep(0.005)
            ds.cache.put("Pod", ("a", f"p{i}"), {"v": i})

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    # A generous quiet time: the test is about coalescing, not about timing.
    got = ds._settled(rev, ds.cache.since(rev), threading.Event(), quiet=1.0, most=60.0)
    t.join()
    assert [c.name for c in got] == [f"p{i}" for i in range(21)]
    # A lone change is taken as it is once nothing follows it.
    ds.cache.put("Pod", ("a", "q"), {"v": 0})
    lone = ds.cache.since(got[-1].rev)
    assert ds._settled(got[-1].rev, lone, threading.Event(), quiet=0.01) == lone


def test_rbac_denial_names_the_resource_and_recovers(
        server: FakeAPIServer, open_ds: Callable[..., KubeDatastore]) -> None:
    """A ClusterRole without pods: the agent's error says which resource and what to grant,
    the other kinds still sync, and once the grant arrives the pods are listed."""
    seed(server)
    server.forbidden.add("pods")
    ds = open_ds(kinds=["Node", "Pod"])
    assert ds.objects("Node", timeout=5) == EXPECTED["Node"]
    with pytest.raises(StoreError, match=r"Pods not listed .*HTTP 403 Forbidden: pods is "
                       r"forbidden: .*cannot list resource \"pods\".*ClusterRole must grant "
                       r"list and watch on pods\)"):
        ds.objects("Pod", timeout=1)
    assert ds.status()["Pod"]["errors"] >= 1 and not ds.status()["Pod"]["synced"]
    server.forbidden.clear()
    assert ds.objects("Pod", timeout=10) == EXPECTED["Pod"]


def test_forbidden_watch_names_the_group(server: FakeAPIServer,
                                         open_ds: Callable[..., KubeDatastore]) -> None:
    """Granted list but not watch: the watch's 403 names plural.group for the RBAC rule."""
    ds = open_ds(kinds=["NetworkPolicy"])
    ds.wait_synced(timeout=5)
    server.forbidden.add("networkpolicies")
    server.drop_watches()
    eventually(lambda: "networkpolicies.networking.k8s.io" in
               ds.informers["NetworkPolicy"].last_error, what="the watch's 403")
    err = ds.informers["NetworkPolicy"].last_error
    assert "cannot watch resource" in err and "HTTP 403" in err


def test_token_from_the_kubeconfig_is_sent(server: FakeAPIServer, tmp_path: Any) -> None:
    """A bearer token (inline, or a tokenFile re-read on every request, as rotated
    service-account tokens need) reaches the server with each list and watch."""
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    kc = tmp_path / "kc.yaml"
    kc.write_text(f"""
apiVersion: v1
kind: Config
current-context: c
clusters: [{{name: k, cluster: {{server: "{server.url}"}}}}]
users: [{{name: u, user: {{tokenFile: {token_file.name}}}}}]
contexts: [{{name: c, context: {{cluster: k, user: u}}}}]
""")
    ds = KubeDatastore(str(kc), kinds=["Node"], timeouts=FAST)
    try:
        ds.wait_synced(timeout=5)
        assert {r["auth"] for r in server.requests("/api/v1/nodes")} == {"Bearer first"}
        token_file.write_text("second\n")
        eventually(server.watch_count)
        server.drop_watches()
        eventually(lambda: any(r["auth"] == "Bearer second"
                               for r in _watches(server, "/api/v1/nodes")), what="new token")
    finally:
        ds.close()
