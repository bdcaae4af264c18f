"""Pure parts of the agent's pod handling: recorded attachments, requested values, labels."""

from __future__ import annotations

from typing import Any

import pytest
from flowcni.controller.podrecords import LabelError, PodRecords, parse_labels
from flowcni.controller.pods import Attachment, CNIFailure, PodManager


def test_attachment_round_trips_and_reads_ports_of_older_agents() -> None:
    a = Attachment("c/net1", "c", "net1", "/run/netns/p", "ns", "n", "10.0.0.5",
                   "0a:00:00:00:00:01", "fcvabc", 7, "othernet", "0a:00:00:00:00:02", False)
    assert Attachment.from_external_ids(a.external_ids(), 7) == a
    legacy = {k: v for k, v in a.external_ids().items()
              if k not in ("flowcni-network", "flowcni-host-mac", "flowcni-default-route")}
    old = Attachment.from_external_ids(legacy, 7)
    assert (old.network, old.host_mac, old.default_route) == ("", "", True)


def test_parse_labels() -> None:
    assert parse_labels("app=web,example.com/tier=db,empty=") == {
        "app": "web", "example.com/tier": "db", "empty": ""}
    assert parse_labels("") == {}
    for bad in ("app", "app=has space", "=v", "a=" + "x" * 64):
        with pytest.raises(LabelError):
            parse_labels(bad)


def _manager() -> PodManager:
    pm = PodManager.__new__(PodManager)  # wanted() reads only these two
    pm.prefixlen = 24
    pm.gw = type("GW", (), {"pod_cidr": "10.244.1.0/24"})()  # type: ignore[assignment]
    return pm


def _req(rc: dict[str, Any] | None = None, **conf: Any) -> dict[str, Any]:
    return {"config": {"runtimeConfig": rc or {}, **conf}, "args": {}}


def test_wanted_reads_runtime_config() -> None:
    w = _manager().wanted(_req({"ips": ["10.244.1.9/24"], "mac": "0A:58:00:00:00:01"},
                               defaultRoute=False))
    assert (w.ip, w.mac, w.default_route) == ("10.244.1.9", "0a:58:00:00:00:01", False)
    assert _manager().wanted(_req()).ip is None


@pytest.mark.parametrize("rc", [{"ips": ["10.244.1.9/16"]},
                                {"ips": ["10.244.1.9", "10.244.1.10"]},
                                {"mac": "01:00:5e:00:00:01"}, {"mac": "zz"},
                                {"mac": "00:00:00:00:00:00"}])
def test_wanted_refuses_what_cannot_be_given(rc: dict[str, Any]) -> None:
    with pytest.raises(CNIFailure) as exc:
        _manager().wanted(_req(rc))
    assert exc.value.code == 7


class _FakeStore:
    def __init__(self) -> None:
        self.objs: dict[tuple[str, str, str], dict[str, Any]] = {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objs.get((kind, namespace, name))

    def put(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> int:
        self.objs[(kind, namespace, name)] = body
        return len(self.objs)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self.objs.pop((kind, namespace, name), None) is not None


def test_pod_records_keep_labels_and_spare_a_newer_container() -> None:
    store = _FakeStore()
    rec = PodRecords(store, "node1")
    rec.attached("prod", "web", "10.0.0.5", "c1", {"app": "web"})
    assert store.get("Pod", "prod", "web") == {
        "namespace": "prod", "name": "web", "labels": {"app": "web"}, "ip": "10.0.0.5",
        "node": "node1", "containerID": "c1", "ports": []}
    rec.attached("prod", "web", "10.0.0.6", "c2", None)  # labels kept without new ones
    assert store.get("Pod", "prod", "web")["labels"] == {"app": "web"}  # type: ignore[index]
    rec.detached("prod", "web", "c1")  # the old container's DEL: not its record any more
    assert store.get("Pod", "prod", "web") is not None
    rec.detached("prod", "web", "c2")
    assert store.get("Pod", "prod", "web") is None
