"""FlowSync's notion of "installed": a change made while the switch is away is pending
until the next full sync, and whoever reports it realized must wait for that."""

from __future__ import annotations

import threading
from typing import Any

from flowcni.controller.flowsync import FlowSync
from flowcni.flows import cookie as ck
from flowcni.flows.model import Flow
from flowcni.flows.tables import DEFAULT
from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser


class RecordingSwitch:
    """Enough of ofapp.Switch for FlowSync: builds real os-ken messages, keeps bundles."""

    def __init__(self) -> None:
        self.dp = None
        self.ofp = ofproto_v1_3
        self.parser = ofproto_v1_3_parser
        self.alive = True
        self.bundles: list[list[Any]] = []

    def bundle(self, msgs: list[Any]) -> None:
        self.bundles.append(list(msgs))


def drop(port: int) -> Flow:
    return Flow.make("Classifier", 10, {"in_port": port}, feature=ck.Feature.POD,
                     owner="pod:x")


def test_change_while_switch_away_is_pending_until_full_sync() -> None:
    fs = FlowSync(DEFAULT, iter(range(1, 100)).__next__)
    fs.set_owner("pod:x", [drop(3)])
    assert fs.pending  # no switch yet: only desired
    stop = threading.Event()
    done = threading.Event()

    def waiter() -> None:
        fs.wait_installed(stop)
        done.set()

    threading.Thread(target=waiter, daemon=True).start()
    assert not done.wait(0.3)  # still waiting: OVS does not hold the flow
    sw = RecordingSwitch()
    fs.full_sync(sw)  # type: ignore[arg-type]
    assert done.wait(5)
    assert not fs.pending
    assert any(getattr(m, "match", {}).get("in_port") == 3 for m in sw.bundles[-1])


def test_change_with_switch_present_is_installed_at_once() -> None:
    fs = FlowSync(DEFAULT, iter(range(1, 100)).__next__)
    sw = RecordingSwitch()
    fs.full_sync(sw)  # type: ignore[arg-type]
    fs.set_owner("pod:x", [drop(4)])
    assert not fs.pending
    assert fs.wait_installed(threading.Event())
    assert len(sw.bundles) == 2


def test_dead_switch_defers_and_stop_ends_the_wait() -> None:
    fs = FlowSync(DEFAULT, iter(range(1, 100)).__next__)
    sw = RecordingSwitch()
    fs.full_sync(sw)  # type: ignore[arg-type]
    sw.alive = False  # connection lost, not yet noticed by the disconnect hook
    fs.set_owner("pod:x", [drop(5)])
    assert fs.pending and len(sw.bundles) == 1
    stop = threading.Event()
    stop.set()
    assert fs.wait_installed(stop) is False
