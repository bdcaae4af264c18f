"""FlowSync's notion of "installed": a change made while the switch is away is pending
until the next full sync, and whoever reports it realized must wait for that."""

from __future__ import annotations

import threading
from typing import Any

from flowcni.controller.flowsync import FlowSync
from flowcni.flows import cookie as ck
from flowcni.flows.model import CT, Flow, Group, GroupAction
from flowcni.flows.tables import DEFAULT
from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser

from tests.support import ofdecode


class RecordingSwitch:
    """Enough of ofapp.Switch for FlowSync: builds real os-ken messages, keeps bundles."""

    def __init__(self) -> None:
        self.dp = None
        self.ofp = ofproto_v1_3
        self.parser = ofproto_v1_3_parser
        self.alive = True
        self.bundles: list[list[Any]] = []
        self.group_ids: list[int] = []  # what group_desc reports as on the bridge

    def bundle(self, msgs: list[Any]) -> None:
        # FlowMods come encoded (controller.ofwire): kept decoded, as os-ken objects.
        self.bundles.append([ofdecode.as_message(m) for m in msgs])

    def group_desc(self) -> list[Any]:
        return [ofproto_v1_3_parser.OFPGroupDescStats(ofproto_v1_3.OFPGT_SELECT, i, [])
                for i in self.group_ids]


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


def group(gid: int, n: int, owner: str = "service:d/s") -> Group:
    return Group.make(gid, [[CT(commit=True, table="AdminEgress", nat=f"10.244.1.{i + 2}:80")]
                            for i in range(n)], owner=owner, table="ServiceLB")


def lb(vip: str, gid: int, owner: str = "service:d/s") -> Flow:
    return Flow.make("ServiceLB", 200, {"ipv4_dst": vip, "tcp_dst": 80},
                     [GroupAction(gid)], feature=ck.Feature.SERVICE, owner=owner)


def kinds(msgs: list[Any]) -> list[str]:
    """Each message as 'group+N' / 'group-N' / 'flow+' / 'flow-' (in bundle order)."""
    out = []
    for m in msgs:
        if isinstance(m, ofproto_v1_3_parser.OFPGroupMod):
            out.append(f"group{'-' if m.command == ofproto_v1_3.OFPGC_DELETE else '+'}"
                       f"{m.group_id}")
        elif m.command == ofproto_v1_3.OFPFC_ADD:
            out.append("flow+")
        elif m.cookie_mask == 0:  # not one of the 16 other-round deletes
            out.append("flow-")
    return out


def test_groups_travel_with_their_flows_in_order() -> None:
    """A group is put before the flow that uses it and deleted after the flow goes."""
    fs = FlowSync(DEFAULT, iter(range(1, 100)).__next__)
    sw = RecordingSwitch()
    fs.full_sync(sw)  # type: ignore[arg-type]
    fs.set_owners({"service:d/s": [lb("10.96.0.1", 7)]}, {"service:d/s": [group(7, 2)]})
    assert kinds(sw.bundles[-1]) == ["group+7", "flow+"]
    fs.set_owners({"service:d/s": [lb("10.96.0.1", 7)]}, {"service:d/s": [group(7, 3)]})
    assert kinds(sw.bundles[-1]) == ["group+7"]  # only the bucket change
    fs.set_owners({"service:d/s": []}, {"service:d/s": []})
    assert kinds(sw.bundles[-1]) == ["flow-", "group-7"]
    assert fs.desired_groups() == []


def test_full_sync_puts_desired_groups_and_deletes_the_others() -> None:
    """After a restart OVS may hold groups of Services deleted meanwhile: they go."""
    fs = FlowSync(DEFAULT, iter(range(1, 100)).__next__)
    fs.set_owners({"service:d/s": [lb("10.96.0.1", 7)]}, {"service:d/s": [group(7, 2)]})
    sw = RecordingSwitch()
    sw.group_ids = [7, 9]
    fs.full_sync(sw)  # type: ignore[arg-type]
    k = kinds(sw.bundles[-1])
    assert k[0] == "group+7" and k[-1] == "group-9" and "group-7" not in k


def test_group_owned_by_another_owner_is_refused() -> None:
    fs = FlowSync(DEFAULT, iter(range(1, 100)).__next__)
    fs.set_owners({}, {"service:d/a": [group(7, 1, "service:d/a")]})
    try:
        fs.set_owners({}, {"service:d/b": [group(7, 1, "service:d/b")]})
    except ValueError as e:
        assert "already belongs to service:d/a" in str(e)
    else:
        raise AssertionError("a group id taken by another owner was accepted")
