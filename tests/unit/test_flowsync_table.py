"""Flow sync at scale against a flow table that applies FlowMods, behind the real Switch.

The fake datapath takes what `ofapp.Switch` sends: bundle control messages
(open / commit / discard) and bundled FlowMods (ADD overwrites by table,
priority and match; DELETE_STRICT removes one; DELETE removes by table and
cookie mask). Only a commit changes the table, as in OVS. What the tests
check is the table afterwards, not the messages.
"""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest
from flowcni.controller import hostnet, ofapp
from flowcni.controller.flowsync import FlowSync, match_key, other_rounds_deletes
from flowcni.controller.peers import Peers
from flowcni.datastore.store import ClusterConfig
from flowcni.flows import cookie as ck
from flowcni.flows.model import Flow, Output
from flowcni.flows.node import Gateway
from flowcni.flows.tables import DEFAULT
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from tests.support import ofdecode

Entry = tuple[int, int, tuple[Any, ...]]  # table id, priority, match


class FlowTableDatapath:
    """An OpenFlow 1.3 switch reduced to its flow table and ONF bundles."""

    ofproto = ofp
    ofproto_parser = parser
    id = 1

    def __init__(self) -> None:
        self.table: dict[Entry, int] = {}  # -> cookie
        self.groups: dict[int, int] = {}  # group id -> number of buckets
        self.open: dict[int, list[Any]] = {}
        self.switch: ofapp.Switch | None = None
        self.bundles_committed = 0
        self.requests = {"aggregate": 0, "dump": 0}

    def set_xid(self, msg: Any) -> None:
        msg.set_xid(1)

    def send(self, buf: bytes) -> bool:
        """Encoded bundle-adds, several per write (how FlowSync's FlowMods arrive)."""
        for _xid, bid, inner in ofdecode.bundle_adds(buf):
            self.open[bid].append(self.decode(ofdecode.message(inner)))
        return True

    def send_msg(self, msg: Any) -> bool:
        msg.serialize()  # what os-ken does: a message that cannot be encoded fails here
        sw = self.switch
        assert sw is not None
        if isinstance(msg, parser.ONFBundleCtrlMsg):
            if msg.type == ofp.ONF_BCT_OPEN_REQUEST:
                self.open[msg.bundle_id] = []
            elif msg.type == ofp.ONF_BCT_COMMIT_REQUEST:
                for m in self.open.pop(msg.bundle_id):
                    self.apply(m)
                self.bundles_committed += 1
            elif msg.type == ofp.ONF_BCT_DISCARD_REQUEST:
                self.open.pop(msg.bundle_id, None)
            sw.on_reply(types.SimpleNamespace(xid=msg.xid, flags=0))
        elif isinstance(msg, parser.ONFBundleAddMsg):
            # Keep what OVS keeps: the decoded change, not the os-ken object.
            self.open[msg.bundle_id].append(self.decode(msg.message))
        elif isinstance(msg, parser.OFPBarrierRequest):
            sw.on_reply(types.SimpleNamespace(xid=msg.xid, flags=0))
        elif isinstance(msg, parser.OFPAggregateStatsRequest):
            self.requests["aggregate"] += 1
            n = sum(1 for k, c in self.table.items()
                    if msg.table_id in (ofp.OFPTT_ALL, k[0])
                    and c & msg.cookie_mask == msg.cookie & msg.cookie_mask)
            sw.on_reply(types.SimpleNamespace(xid=msg.xid, flags=0,
                                              body=types.SimpleNamespace(flow_count=n)))
        elif isinstance(msg, parser.OFPGroupDescStatsRequest):
            body = [types.SimpleNamespace(group_id=g, buckets=[None] * n)
                    for g, n in sorted(self.groups.items())]
            sw.on_reply(types.SimpleNamespace(xid=msg.xid, flags=0, body=body))
        elif isinstance(msg, parser.OFPFlowStatsRequest):
            self.requests["dump"] += 1
            body = [types.SimpleNamespace(table_id=k[0], priority=k[1], cookie=c,
                                          match=parser.OFPMatch(**dict(k[2])))
                    for k, c in self.table.items() if msg.table_id in (ofp.OFPTT_ALL, k[0])]
            sw.on_reply(types.SimpleNamespace(xid=msg.xid, flags=0, body=body))
        return True

    @staticmethod
    def decode(fm: Any) -> tuple[Any, ...]:
        if isinstance(fm, parser.OFPGroupMod):  # add-or-modify (0x8000) or delete
            return ("group", fm.command, fm.group_id, len(fm.buckets))
        return (fm.command, fm.table_id, fm.priority, match_key(fm.match), fm.cookie,
                fm.cookie_mask)

    def apply(self, m: tuple[Any, ...]) -> None:
        if m[0] == "group":
            _, command, group_id, n = m
            if command == ofp.OFPGC_DELETE:
                self.groups.pop(group_id, None)
            else:
                self.groups[group_id] = n
            return
        command, table_id, priority, match, cookie, cookie_mask = m
        if command == ofp.OFPFC_ADD:
            self.table[(table_id, priority, match)] = cookie
        elif command == ofp.OFPFC_DELETE_STRICT:
            self.table.pop((table_id, priority, match), None)
        elif command == ofp.OFPFC_DELETE:
            assert match == ()  # the agent deletes by cookie only
            for k, c in list(self.table.items()):
                if (table_id in (ofp.OFPTT_ALL, k[0])
                        and c & cookie_mask == cookie & cookie_mask):
                    del self.table[k]
        else:
            raise AssertionError(f"unexpected FlowMod command {command}")


def connected() -> tuple[FlowTableDatapath, ofapp.Switch]:
    dp = FlowTableDatapath()
    sw = ofapp.Switch(dp)
    dp.switch = sw
    return dp, sw


def flows(n: int, owner: str, port: int = 1) -> list[Flow]:
    return [Flow.make("L3Forwarding", 100, {"ipv4_dst": f"10.{i >> 16 & 255}.{i >> 8 & 255}."
                                                        f"{i & 255}"},
                      [Output(port)], feature=ck.Feature.POLICY, owner=owner)
            for i in range(n)]


def rounds(dp: FlowTableDatapath) -> set[int]:
    return {ck.round_of(c) for c in dp.table.values()}


def test_full_sync_of_many_flows_then_restart_keeps_only_the_new_round() -> None:
    r = iter(range(1, 100))
    fs = FlowSync(DEFAULT, lambda: next(r))
    fs.set_owners({f"o{i}": flows(1000, f"o{i}")[i * 100:(i + 1) * 100] for i in range(10)})
    dp, sw = connected()
    fs.full_sync(sw)
    assert len(dp.table) == 1000 and rounds(dp) == {1}
    # The agent restarts with part of the set changed: port 2 for o0, o9 gone.
    fs2 = FlowSync(DEFAULT, lambda: next(r))
    fs2.set_owners({f"o{i}": flows(1000, f"o{i}", port=2 if i == 0 else 1)[i * 100:(i + 1) * 100]
                    for i in range(9)})
    fs2.full_sync(sw)
    assert len(dp.table) == 900 and rounds(dp) == {2}
    assert fs2.flow_count() == 900 and fs2.stats["last_full_sync_s"] > 0


def test_incremental_change_touches_only_its_owner() -> None:
    fs = FlowSync(DEFAULT, lambda: 5)
    fs.set_owners({"a": flows(10, "a"), "b": flows(20, "b")[10:]})
    dp, sw = connected()
    fs.full_sync(sw)
    before = dict(dp.table)
    fs.set_owner("b", flows(25, "b")[10:])  # five more for b
    assert len(dp.table) == 25
    assert all(dp.table[k] == c for k, c in before.items())
    fs.remove_owner("a")
    assert len(dp.table) == 15 and fs.owners() == {"b": 15} and fs.flow_count() == 15


def test_bundle_accepts_a_generator_and_sends_each_message_once() -> None:
    dp, sw = connected()
    made = []

    def gen() -> Any:
        for f in flows(500, "g"):
            m = parser.OFPFlowMod(dp, cookie=ck.make(3, f.feature, f.owner), table_id=0,
                                  command=ofp.OFPFC_ADD, priority=f.priority,
                                  match=f.osken_match(parser))
            made.append(1)
            yield m

    sw.bundle(gen())
    assert len(made) == 500 and len(dp.table) == 500 and dp.bundles_committed == 1
    sw.bundle(iter(()))  # nothing to send: no bundle at all
    assert dp.bundles_committed == 1


def test_a_thousand_nodes_join_in_one_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel side (routes, neighbour nudges) is not what this test is about.
    nudged: list[list[str]] = []
    monkeypatch.setattr(hostnet, "sync_routes", lambda want: None)
    monkeypatch.setattr(hostnet, "nudge_neighbors", nudged.append)
    fs = FlowSync(DEFAULT, lambda: 4)
    dp, sw = connected()
    fs.full_sync(sw)
    assert dp.bundles_committed == 1 and not dp.table  # the (empty) full sync's own
    gw = Gateway("10.244.1.1", "02:00:00:00:00:01", 2, "10.244.1.0/24")
    peers = Peers("me", ClusterConfig(cluster_cidr="10.0.0.0/8", encap="geneve"), gw, 3, fs)
    nodes = [{"name": f"n{j}", "nodeIP": f"192.168.{80 + j // 250}.{1 + j % 250}",
              "podCIDR": f"10.{1 + j // 256}.{j % 256}.0/24"} for j in range(1000)]
    peers.set_nodes(nodes + [{"name": "me", "nodeIP": "192.168.77.1",
                              "podCIDR": "10.0.1.0/24"}])
    assert dp.bundles_committed == 2 and len(dp.table) == 1000
    assert len(nudged) == 1 and len(nudged[0]) == 1000
    peers.set_nodes(nodes[:10])  # 990 leave, in one more bundle
    assert dp.bundles_committed == 3 and len(dp.table) == 10


def test_drift_check_counts_first_and_dumps_only_a_table_that_is_off() -> None:
    fs = FlowSync(DEFAULT, lambda: 6)
    fs.set_owners({"a": flows(300, "a"),
                   "b": [Flow.make("Classifier", 5, {"in_port": 9}, [Output(1)],
                                   feature=ck.Feature.POD, owner="b")]})
    dp, sw = connected()
    fs.full_sync(sw)
    assert fs.drift() == ([], []) and dp.requests["dump"] == 0  # counts agree: no dump
    # By hand: one L3Forwarding flow deleted, a foreign one (cookie 0) added there.
    gone = next(k for k in dp.table if k[0] == DEFAULT.id("L3Forwarding"))
    del dp.table[gone]
    dp.table[(DEFAULT.id("L3Forwarding"), 7, (("in_port", 4),))] = 0
    missing, unexpected = fs.drift()
    assert [m.key[2] for m in missing] == [f.key[2] for f in flows(300, "a")
                                           if DEFAULT.id(f.table) == gone[0]
                                           and match_key(f.osken_match(parser)) == gone[2]]
    assert [(u.table_id, u.priority, u.cookie) for u in unexpected] == [(gone[0], 7, 0)]
    assert dp.requests["dump"] == 1  # only that table
    assert fs.repair() == (1, 1)
    assert fs.drift() == ([], []) and len(dp.table) == 301
    # A flow in a table the pipeline does not declare: found by the total count.
    dp.table[(200, 1, ())] = 0
    assert [(u.table_id, u.cookie) for u in fs.drift()[1]] == [(200, 0)]


class ChangeDuringCountDatapath(FlowTableDatapath):
    """Runs `during` (a change from another thread) when the first aggregate request
    arrives, before that request is answered: a change racing the drift check."""

    def __init__(self) -> None:
        super().__init__()
        self.during: Any = None
        self.change_done = False

    def send_msg(self, msg: Any) -> bool:
        if isinstance(msg, parser.OFPAggregateStatsRequest) and self.during is not None:
            during, self.during = self.during, None
            t = threading.Thread(target=during)
            t.start()
            t.join(30)  # generous: only a change blocked on the drift check takes long
            self.change_done = not t.is_alive()
        return super().send_msg(msg)


def test_a_change_is_not_held_up_by_the_drift_counts_nor_taken_for_drift() -> None:
    """The drift check's count round trip runs without the writer lock: a change made
    meanwhile goes out at once, and counts taken across it are asked again."""
    fs = FlowSync(DEFAULT, lambda: 3)
    fs.set_owners({"a": flows(50, "a")})
    dp = ChangeDuringCountDatapath()
    sw = ofapp.Switch(dp)
    dp.switch = sw
    fs.full_sync(sw)
    dp.during = lambda: fs.set_owner("b", flows(55, "b", port=2)[50:])
    assert fs.drift() == ([], [])
    assert dp.change_done, "the change waited for the drift check's counts"
    assert len(dp.table) == 55 and dp.requests["dump"] == 0


def test_restart_keeps_learned_flows_and_drops_other_rounds_and_hand_added() -> None:
    """Flows OVS learned (cookie 0, in a tables.LEARNED table: sessionAffinity) survive a
    new round; cookie-0 flows elsewhere (added by hand) and every other round's flows in
    every table, the learned table's own miss flow included, do not."""
    aff, lb = DEFAULT.id("SessionAffinity"), DEFAULT.id("ServiceLB")
    miss = Flow.make("SessionAffinity", 0, {}, [], feature=ck.Feature.SERVICE, owner="svc-miss")
    for first, second in ((1, 2), (2, 3), (3, 4), (0x7FFF, 0x8000), (0xFFFE, 0xFFFF)):
        fs = FlowSync(DEFAULT, lambda first=first: first)
        fs.set_owners({"o": flows(3, "o"), "m": [miss]})
        dp, sw = connected()
        fs.full_sync(sw)
        learned = (aff, 10, (("ipv4_src", "10.244.1.5"),))
        dp.table[learned] = 0
        dp.table[(lb, 5, (("ipv4_dst", "10.96.0.1"),))] = 0  # by hand
        dp.table[(aff, 7, (("ipv4_src", "10.244.1.6"),))] = ck.make(
            first, ck.Feature.SERVICE, "gone")  # a desired flow of the old round, gone now
        fs2 = FlowSync(DEFAULT, lambda second=second: second)
        fs2.set_owners({"o": flows(3, "o"), "m": [miss]})
        fs2.full_sync(sw)
        assert dp.table.get(learned) == 0, (first, second)
        assert (lb, 5, (("ipv4_dst", "10.96.0.1"),)) not in dp.table
        assert {ck.round_of(c) for k, c in dp.table.items() if k != learned} == {second}, \
            (first, second, dp.table)
        assert len(dp.table) == 3 + 1 + 1


def test_learned_tables_change_only_the_bits_where_the_round_is_one() -> None:
    """Without learned tables the deletes stay 16 messages over all tables."""
    _, sw = connected()
    assert len(other_rounds_deletes(sw, 0xFFFF)) == 16
    tables = DEFAULT.ids.values()
    aff = {DEFAULT.id("SessionAffinity")}
    assert len(other_rounds_deletes(sw, 0b101, tables, aff)) == 14 + 2 * (
        len(DEFAULT.ids) - 1 + ck.FEATURE_BITS)


def _policy_world() -> tuple[list[Any], list[Any], list[Any]]:
    """Two local web pods, two remote clients, one /24 ipBlock; TCP 80 and 8000-8003."""
    nss = [{"name": "d", "labels": {}}]
    pods = [{"namespace": "d", "name": n, "ip": ip, "node": node, "labels": {"app": app}}
            for n, ip, node, app in (("web", "10.244.1.2", "n1", "web"),
                                     ("web2", "10.244.1.3", "n1", "web"),
                                     ("c1", "10.244.2.2", "n2", "client"),
                                     ("c2", "10.244.2.3", "n2", "client"))]
    pol = {"namespace": "d", "name": "a", "spec": {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}},
                              {"ipBlock": {"cidr": "192.168.7.0/24"}}],
                     "ports": [{"port": 80}, {"port": 8000, "endPort": 8003}]}]}}
    return nss, pods, [pol]


def test_self_owned_clause_flows_keep_their_names_and_cookies_and_sync_by_key() -> None:
    """Policy clause flows own themselves (model.MatchOwner): no name string is kept per
    flow, yet flowctl's owner names and the cookies are what a name per flow gave, and
    FlowSync adds, removes and repairs them by their own identity."""
    from flowcni.datastore.store import Change
    from flowcni.flows.policy import PolicyEngine

    eng = PolicyEngine("n1")
    owners, problems = eng.load(*_policy_world())
    assert not problems
    fs = FlowSync(DEFAULT, lambda: 9)
    fs.set_owners(owners)
    dp, sw = connected()
    fs.full_sync(sw)
    pre = "policy-match:IngressRule:200:"
    names = {pre + s for s in ("ipv4_dst=10.244.1.2", "ipv4_dst=10.244.1.3",
                               "ipv4_src=10.244.2.2", "ipv4_src=10.244.2.3",
                               "ipv4_src=192.168.7.0/24", "port=TCP/80", "port=TCP/8000/0xfffc")}
    assert {o for o in fs.owners() if o.startswith("policy-match:")} == names
    assert {o: n for o, n in fs.owners().items() if o in names} == dict.fromkeys(names, 1)
    assert set(fs.owners(self_owned=False)) == set(fs.owners()) - names  # named ones only
    # In OVS: each clause flow with the cookie of its owner's name, as before.
    clause = [f for f in fs.desired_flows() if not isinstance(f.owner, str)]
    assert {f.owner_name for f in clause} == names and len(clause) == len(names)
    for f in clause:
        k = (DEFAULT.id(f.table), f.priority, match_key(f.osken_match(parser)))
        assert dp.table[k] == ck.make(9, ck.Feature.POLICY, f.owner_name)
        assert fs.flows_of([f.key]) == [f]
    # A client goes: its clause flow leaves OVS, found by its key; nothing else moves.
    before = dict(dp.table)
    out, _ = eng.apply([Change(1, "delete", "Pod", "d", "c2", None)])
    gone = [k for k, fl in out.items() if not fl]
    assert len(gone) == 1 and not isinstance(gone[0], str)
    fs.set_owners(out)
    assert fs.flows_of(gone) == [] and pre + "ipv4_src=10.244.2.3" not in fs.owners()
    assert len(dp.table) == len(before) - 1 == fs.flow_count()
    assert all(before[k] == c for k, c in dp.table.items())
    # Deleted by hand: the drift check finds it by counts, repair puts it back.
    k80 = next(k for k in dp.table if dict(k[2]).get("tcp_dst") == 80)
    del dp.table[k80]
    assert [f.owner_name for f in fs.drift()[0]] == [pre + "port=TCP/80"]
    assert fs.repair() == (1, 0) and k80 in dp.table and fs.drift() == ([], [])
    # A self-owned flow goes under its own key only; no one else may claim its identity.
    f0 = clause[0]
    with pytest.raises(ValueError, match="own key"):
        fs.set_owners({"x": [f0]})
    with pytest.raises(ValueError, match="own key"):
        fs.set_owners({f0.key: flows(1, "y")})
    with pytest.raises(ValueError, match="own key"):
        fs.set_owners({clause[1].key: [f0]})
    thief = Flow.with_match(f0, f0.actions, owner="thief")
    with pytest.raises(ValueError, match=f"of thief already belongs to {f0.owner_name}"):
        fs.set_owners({"thief": [thief]})
    assert fs.flows_of([f0.key]) == [f0] and "thief" not in fs.owners()


@pytest.mark.parametrize("named_first", [True, False])
def test_a_flow_moving_from_itself_to_a_name_in_one_call_is_counted_once(
        named_first: bool) -> None:
    """One set_owners call gives a self-owned flow's identity to a named owner: the
    counts follow what is desired whichever of the two the call names first (they
    were taken from the index half-way through the swap: 2 counted, 1 desired)."""
    from flowcni.flows.cookie import Feature
    from flowcni.flows.model import MatchOwner
    base = Flow.make("IngressRule", 200, {"eth_type": 0x0800, "ipv4_src": "10.0.0.1"}, [],
                     feature=Feature.POLICY, owner="")
    mine = Flow.with_match(base, owner=MatchOwner("policy-match:x:",
                                                  lambda m: f"nw_src={dict(m)['ipv4_src']}"))
    named = Flow.with_match(base, owner="X")
    fs = FlowSync(DEFAULT, lambda: 1)
    fs.set_owners({mine.key: [mine]})
    fs.set_owners({"X": [named], mine.key: []} if named_first
                  else {mine.key: [], "X": [named]})
    assert fs.flow_count() == len(fs.desired_flows()) == 1
    fs.set_owners({"X": []})
    assert fs.flow_count() == len(fs.desired_flows()) == 0
