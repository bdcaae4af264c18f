"""Keeps OVS holding exactly the desired flows: incremental per owner, full on connect.

Desired flows are kept per owner (the node, the gateway, each pod). Changing
an owner diffs only its flows and sends the difference in one bundle. On
every (re)connection the agent takes a new round: it re-adds every desired
flow with the new round in its cookie and, in the same bundle, deletes every
flow whose cookie carries another round. Flows that did not change are
overwritten in place, so traffic never sees a missing flow.

Groups (a Service port's select group) travel in the same bundles. They carry
no cookie, so they are reconciled by id: the agent owns every group on its
bridge, each desired group has an owner whose key derives its id, a full
sync adds or modifies every desired group and deletes every other one, and
the drift check compares ids and bucket counts.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from flowcni.controller.ofapp import OFError, Switch
from flowcni.controller.ofwire import Encoder
from flowcni.flows import cookie as ck
from flowcni.flows.diff import diff, index
from flowcni.flows.model import Flow, Group, Match, OwnerKey
from flowcni.flows.tables import LEARNED, Pipeline

LOG = logging.getLogger(__name__)


def match_key(match: Any) -> tuple[Any, ...]:
    """An os-ken OFPMatch as a comparable tuple (same fields, same values)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in match.items()))


# Open vSwitch's "add, or modify if it exists" group command (an OpenFlow 1.1+
# extension), so a restarted agent re-asserts its groups without knowing
# which of them survived.
OFPGC_ADD_OR_MOD = 0x8000


def group_put(sw: Switch, g: Group, pipeline: Pipeline) -> Any:
    p, o = sw.parser, sw.ofp
    return p.OFPGroupMod(sw.dp, command=OFPGC_ADD_OR_MOD, type_=o.OFPGT_SELECT,
                         group_id=g.group_id, buckets=g.osken_buckets(p, o, pipeline))


def group_delete(sw: Switch, group_id: int) -> Any:
    p, o = sw.parser, sw.ofp
    return p.OFPGroupMod(sw.dp, command=o.OFPGC_DELETE, type_=o.OFPGT_SELECT,
                         group_id=group_id, buckets=[])


def other_rounds_deletes(sw: Switch, round_: int, tables: Collection[int] = (),
                         learned: Collection[int] = ()) -> list[Any]:
    """Delete every flow whose round differs from `round_`, by cookie mask, no dump.

    A cookie's round differs from ours iff some round bit differs; one
    delete per bit selects the flows whose bit b is the opposite of ours (16
    messages over all tables). Flows OVS learned (in the tables `learned`,
    see tables.LEARNED: sessionAffinity) carry cookie 0, which such a delete
    also selects when our bit b is 1. So that a restart keeps them, the
    deletes for those bits go table by table over `tables` minus `learned`,
    and in a learned table select only cookies with a feature bit set (every
    flow the agent makes has a feature; a learned flow has none).
    """
    p, o = sw.parser, sw.ofp
    kept = sorted(set(tables) - set(learned))
    out = []

    def delete(tid: int, cookie: int, mask: int) -> None:
        out.append(p.OFPFlowMod(sw.dp, cookie=cookie, cookie_mask=mask, table_id=tid,
                                command=o.OFPFC_DELETE, out_port=o.OFPP_ANY,
                                out_group=o.OFPG_ANY, match=p.OFPMatch()))

    for b in range(ck.ROUND_BITS):
        bit = 1 << (ck.ROUND_SHIFT + b)
        if not round_ & (1 << b):
            delete(o.OFPTT_ALL, bit, bit)  # cookie 0 never has the bit: learned flows stay
        elif not learned:
            delete(o.OFPTT_ALL, 0, bit)
        else:
            for tid in kept:
                delete(tid, 0, bit)
            for tid in sorted(set(learned)):
                for f in range(ck.FEATURE_BITS):
                    fbit = 1 << (ck.OWNER_BITS + f)
                    delete(tid, fbit, bit | fbit)
    return out


#: Drift counts asked without the writer lock before one try holds it (see FlowSync._counts).
_UNLOCKED_COUNT_TRIES = 3


def _flows(held: Flow | tuple[Flow, ...]) -> tuple[Flow, ...]:
    """An owner's flows as held in FlowSync._desired (a lone flow is held bare)."""
    return held if isinstance(held, tuple) else (held,)


# Several owners' new flow sets: by owner name, or (self-owned flows, see
# model.MatchOwner) by the flow's key, or both.
Changes = Mapping[str, Sequence[Flow]] | Mapping[OwnerKey, Sequence[Flow]]


class FlowSync:
    """The desired flow set and the one writer that applies it."""

    def __init__(self, pipeline: Pipeline, new_round: Callable[[], int]) -> None:
        self.pipeline = pipeline
        # FlowMods are encoded straight to bytes (os-ken's objects were most of
        # a 100k-flow full sync's time); groups and deletes by cookie stay os-ken.
        self._enc = Encoder(pipeline)
        self._new_round = new_round
        self._lock = threading.RLock()  # one writer at a time
        # Named owner -> its flows (a lone flow held bare: a 1-tuple each cost
        # 8 MB at 100k flows). Self-owned flows (model.MatchOwner: the policy
        # clause flows, 95% of them at cluster scale) are not here: they are
        # held in `_owner_index` alone, each under its own identity. Once
        # synced, OVS holds exactly the desired set (a change is in OVS before
        # set_owners returns, or `pending`), so there is no second "installed"
        # copy (it was 11 MB).
        self._desired: dict[str, Flow | tuple[Flow, ...]] = {}
        self._count = 0  # flows in _desired, kept in step (status asks it often)
        # Desired flows per table name, kept in step: the drift check compares
        # OVS's counts with these without walking 100k flows under the lock.
        self._table_counts: dict[str, int] = {}
        # Bumped (under the lock) before each bundle of ours goes out: the drift
        # check's counts, asked without the lock, are kept only if it did not move.
        self._generation = 0
        # (table, priority) -> match -> who holds that OpenFlow identity: a
        # named owner, or the self-owned flow itself. Split so the keys are the
        # flows' own match tuples, not a new (table, priority, match) tuple per
        # flow (6 MB at 100k flows).
        self._owner_index: dict[tuple[str, int], dict[Match, str | Flow]] = {}
        self._groups: dict[str, dict[int, Group]] = {}  # owner -> group id -> group
        self._installed_groups: dict[int, Group] = {}
        self.switch: Switch | None = None
        self.round = 0
        self.synced = threading.Event()
        # Desired changes made while the switch was away, waiting for the next full sync.
        self._pending = False
        self._installed_cv = threading.Condition(self._lock)
        self.stats: dict[str, float] = {"bundles": 0, "bundle_errors": 0, "full_syncs": 0,
                                        "last_full_sync_s": 0.0}

    def desired_flows(self) -> list[Flow]:
        with self._lock:
            out = [f for fl in self._desired.values() for f in _flows(fl)]
            out += [f for by in self._owner_index.values() for f in by.values()
                    if not isinstance(f, str)]
            return out

    def _held(self, owner: OwnerKey) -> tuple[Flow, ...]:
        """The desired flows of `owner` now (the caller holds the lock)."""
        if isinstance(owner, str):
            return _flows(self._desired.get(owner, ()))
        by_match = self._owner_index.get((owner[0], owner[1]))
        f = None if by_match is None else by_match.get(owner[2])
        return () if f is None or isinstance(f, str) else (f,)

    def flow_count(self) -> int:
        """How many flows are desired: a counter, since status polls it (summing over
        98k owners took 5 ms, a fifth of the agent's time under a 5 ms poll)."""
        return self._count

    def flows_of(self, owners: Iterable[OwnerKey]) -> list[Flow]:
        """The desired flows of these owners now (what a change is about to replace).

        Owners by key: a self-owned flow's owner is its flow's key (model.MatchOwner)."""
        with self._lock:
            return [f for o in owners for f in self._held(o)]

    def desired_groups(self) -> list[Group]:
        with self._lock:
            return [g for gs in self._groups.values() for g in gs.values()]

    def owners(self, self_owned: bool = True) -> dict[str, int]:
        """Owner name -> how many desired flows it has (a self-owned flow's: 1).

        `self_owned=False`: named owners only, without making a name for each
        self-owned flow (95,000 at cluster scale: 0.1 s)."""
        with self._lock:
            out = {o: len(_flows(f)) for o, f in self._desired.items()}
            for by in self._owner_index.values() if self_owned else ():
                for f in by.values():
                    if not isinstance(f, str):
                        out[f.owner_name] = 1
            return out

    def owner_keys(self) -> tuple[set[OwnerKey], set[str]]:
        """Every owner key holding flows (names, and self-owned flows' keys) and every
        owner holding groups: what an initial load that failed half-way set is what
        is here now and was not before it (Agent._load drops it before trying again)."""
        with self._lock:
            keys: set[OwnerKey] = set(self._desired)
            for (table, prio), by in self._owner_index.items():
                keys.update((table, prio, m) for m, f in by.items() if not isinstance(f, str))
            return keys, set(self._groups)

    def set_owner(self, owner: str, flows: Iterable[Flow]) -> None:
        """Make OVS hold exactly `flows` for `owner`; raises OFError if OVS refused."""
        self.set_owners({owner: list(flows)})

    def set_owners(self, changes: Changes,
                   groups: dict[str, list[Group]] | None = None) -> None:
        """Several owners' new flow sets (empty: remove the owner), in one bundle.

        Owners by key: a name, or for a self-owned flow (model.MatchOwner)
        its Flow.key, whose set is that one flow or nothing. `groups`:
        owners' new group sets, in the same bundle (an owner not named keeps
        its groups). Either OVS takes all of it or none: a refused bundle
        leaves the desired set as it was, so a later full sync does not
        install what the caller was told failed.
        """
        news: dict[OwnerKey, tuple[Flow, ...]] = {}
        for o, fl in changes.items():
            named = isinstance(o, str)
            for f in fl:
                if isinstance(f.owner, str) != named or not named and (
                        len(fl) > 1 or f.table != o[0] or f.priority != o[1]
                        or f.match != o[2]):
                    raise ValueError(f"flow {f.ofctl(self.pipeline, names=True)} of "
                                     f"{f.owner_name} given as owner {o}: a self-owned "
                                     "flow goes alone under its own key, any other under "
                                     "a name")
            # a name's flows by identity (one claimed twice is a builder's bug)
            news[o] = tuple(index(fl).values()) if named and len(fl) > 1 else tuple(fl)
        gnews = {o: {g.group_id: g for g in gl} for o, gl in (groups or {}).items()}
        with self._lock:
            for o, new in news.items():
                for f in new:
                    holder = self._holder(f)
                    if holder not in (None, o) and holder not in news:
                        who = (holder if isinstance(holder, str)
                               else self._held(holder)[0].owner_name)
                        raise ValueError(f"flow {f.ofctl(self.pipeline, names=True)} of "
                                         f"{o if isinstance(o, str) else f.owner_name} "
                                         f"already belongs to {who}")
            for o, gnew in gnews.items():
                for gid in gnew:
                    gholder = next((h for h, gs in self._groups.items() if gid in gs), None)
                    if gholder not in (None, o) and gholder not in gnews:
                        raise ValueError(f"group {gid} of {o} already belongs to {gholder}")
            olds = {o: self._held(o) for o in news}
            golds = {o: self._groups.get(o, {}) for o in gnews}
            self._replace(news, olds)
            self._replace_groups(gnews)
            gold_all = {i: g for gs in golds.values() for i, g in gs.items()}
            gnew_all = {i: g for gs in gnews.values() for i, g in gs.items()}
            try:
                self._apply(olds, news, gold_all, gnew_all)
            except OFError:
                self._replace(olds, news)
                self._replace_groups(golds)
                raise

    def _replace_groups(self, sets: dict[str, dict[int, Group]]) -> None:
        for o, new in sets.items():
            if new:
                self._groups[o] = new
            else:
                self._groups.pop(o, None)

    @property
    def pending(self) -> bool:
        """Whether some desired change is not in OVS yet (the switch was away)."""
        return self._pending

    def wait_installed(self, stop: threading.Event) -> bool:
        """Block until OVS holds every desired change (False if `stop` came first).

        A change made while the switch is away is only in the desired set; it
        reaches OVS with the next full sync. Whoever reports a change as
        realized (the datastore revision) waits here first, so "applied" never
        means "queued for a switch that is not there".
        """
        with self._installed_cv:
            while self._pending and not stop.is_set():
                self._installed_cv.wait(0.2)
            return not self._pending

    def _holder(self, f: Flow) -> OwnerKey | None:
        """The owner whose desired set has a flow of `f`'s OpenFlow identity."""
        by_match = self._owner_index.get((f.table, f.priority))
        h = None if by_match is None else by_match.get(f.match)
        return h if h is None or isinstance(h, str) else h.key

    def _learned_tables(self) -> set[int]:
        """Ids of the tables whose flows OVS learns (tables.LEARNED) in this pipeline."""
        return {self.pipeline.id(n) for n in LEARNED if n in self.pipeline.ids}

    def _is_desired(self, f: Flow) -> bool:
        holder = self._holder(f)
        return holder is not None and f in self._held(holder)

    def _replace(self, sets: dict[OwnerKey, tuple[Flow, ...]],
                 prev: dict[OwnerKey, tuple[Flow, ...]]) -> None:
        """Swap owners' desired sets (prev: what each held before this call, read
        before any of them changed: a flow identity moving between a self-owned flow
        and a named owner in one call must not be counted by the index's new state),
        keeping the flow -> owner index in step."""
        idx = self._owner_index
        tc = self._table_counts
        for o, new in sets.items():
            named = isinstance(o, str)
            old = prev[o]
            if named:
                self._desired.pop(o, None)
            self._count -= len(old)
            for f in old:
                tc[f.table] -= 1
                by_match = idx.get((f.table, f.priority))
                h = None if by_match is None else by_match.get(f.match)
                if by_match is not None and (h == o if named else h is f):
                    del by_match[f.match]
                    if not by_match:
                        del idx[(f.table, f.priority)]
            if new:
                if isinstance(o, str):
                    self._desired[o] = new[0] if len(new) == 1 else new
                self._count += len(new)
                for f in new:
                    idx.setdefault((f.table, f.priority), {})[f.match] = (
                        o if isinstance(o, str) else f)
                    tc[f.table] = tc.get(f.table, 0) + 1

    def remove_owner(self, owner: str) -> None:
        self.set_owner(owner, [])

    def _apply(self, olds: dict[OwnerKey, tuple[Flow, ...]],
               news: dict[OwnerKey, tuple[Flow, ...]],
               gold: dict[int, Group] | None = None,
               gnew: dict[int, Group] | None = None) -> None:
        """Send the difference between owners' old and new flows (and groups) in one
        bundle; or, with no synced switch, leave it to the next full sync."""
        sw = self.switch
        if sw is None or not sw.alive or not self.synced.is_set():
            self._pending = True  # the full sync on (re)connect will install it
            return
        gold, gnew = gold or {}, gnew or {}
        adds, dels = diff({f.key: f for fl in olds.values() for f in fl},
                          {f.key: f for fl in news.values() for f in fl})
        gputs = [g for i, g in gnew.items() if gold.get(i) != g]
        gdels = [i for i in gold if i not in gnew]
        # Groups before the flows that use them; flows gone before their groups.
        # Generators, as in full_sync: a datastore list applied as one change
        # (100k flows) must not hold 100k os-ken FlowMods at once.
        enc, rnd = self._enc, self.round
        msgs = itertools.chain((group_put(sw, g, self.pipeline) for g in gputs),
                               (enc.flow_delete(f) for f in dels),
                               (enc.flow_add(f, rnd) for f in adds),
                               (group_delete(sw, i) for i in gdels))
        self._bundle(sw, msgs)
        for i in gdels:
            self._installed_groups.pop(i, None)
        for g in gputs:
            self._installed_groups[g.group_id] = g

    def _bundle(self, sw: Switch, msgs: Iterable[Any]) -> None:
        self._generation += 1  # callers hold the lock (see _counts)
        try:
            sw.bundle(msgs)
            self.stats["bundles"] += 1
        except OFError:
            self.stats["bundle_errors"] += 1
            raise

    def full_sync(self, sw: Switch) -> None:
        """Take a new round: install everything, drop all other rounds, atomically."""
        with self._lock:
            t0 = time.perf_counter()
            self.synced.clear()
            self.switch = sw
            rnd = self._new_round()
            flows = self.desired_flows()
            groups = {g.group_id: g for g in self.desired_groups()}
            present = {d.group_id for d in sw.group_desc()}
            # A generator: each FlowMod is encoded, sent and dropped in turn.
            # Groups nobody wants any more (a Service deleted while the agent was
            # away) go last, after the old rounds' flows that may still point at them.
            msgs = itertools.chain((group_put(sw, g, self.pipeline) for g in groups.values()),
                                   (self._enc.flow_add(f, rnd) for f in flows),
                                   other_rounds_deletes(sw, rnd, self.pipeline.ids.values(),
                                                        self._learned_tables()),
                                   (group_delete(sw, i) for i in sorted(present - set(groups))))
            self._bundle(sw, msgs)
            self.round = rnd
            self._installed_groups = groups
            self.stats["full_syncs"] += 1
            self.stats["last_full_sync_s"] = time.perf_counter() - t0
            self._pending = False
            self._installed_cv.notify_all()
            self.synced.set()
            LOG.info("round %d: %d flows and %d groups installed in %.2fs", rnd, len(flows),
                     len(groups), self.stats["last_full_sync_s"])

    # -- drift -------------------------------------------------------------------

    def drift(self) -> tuple[list[Flow], list[Any]]:
        """(desired flows OVS lacks, flows OVS holds that nobody wants).

        Compared on OpenFlow identity (table, priority, match) and cookie: a
        flow added or deleted by hand, or left by another round, shows up.
        Counts first (a few bytes per table); only a table whose counts are
        off is dumped and compared flow by flow. What counts cannot see: a
        desired flow deleted by hand and another added with this round's
        cookie in the same table. Reading OVS's flows takes a while, so it
        happens outside the writer lock; `repair` re-checks each finding
        under the lock before acting.
        """
        sw, rnd, tids, counts, expected = self._counts()
        learned = self._learned_tables()
        suspect = [tid for i, tid in enumerate(tids) if tid not in learned
                   and not counts[2 * i] == expected.get(tid, 0) == counts[2 * i + 1]]
        undeclared = sum(counts[0:-1:2]) != counts[-1]
        if not (suspect or undeclared):
            return [], []
        with self._lock:
            flows = self.desired_flows()
        if undeclared:  # flows in tables the pipeline does not declare
            return self._compare(sw, flows, sw.flow_stats(), rnd)
        by_table: dict[int, list[Flow]] = {}
        for f in flows:
            by_table.setdefault(self.pipeline.id(f.table), []).append(f)
        missing: list[Flow] = []
        unexpected: list[Any] = []
        for tid in suspect:
            m, u = self._compare(sw, by_table.get(tid, []), sw.flow_stats(tid), rnd)
            missing += m
            unexpected += u
        return missing, unexpected

    def _expected_counts(self) -> dict[int, int]:
        """Desired flows per table id (from the per-table counters; caller holds the lock)."""
        out: dict[int, int] = {}
        for name, n in self._table_counts.items():
            tid = self.pipeline.id(name)
            out[tid] = out.get(tid, 0) + n
        return out

    def _counts(self, tries: int = _UNLOCKED_COUNT_TRIES
                ) -> tuple[Switch, int, list[int], list[int], dict[int, int]]:
        """(switch, round, table ids, OVS's counts, desired counts per table id).

        OVS's counts: per table, all flows then this round's, then all tables
        together, taken while no bundle of ours was in flight. Counting 100,000
        flows takes OVS a few hundred ms under load, and the writer lock used
        to be held for that round trip, so a change arriving meanwhile waited
        it out (the change path's 300 ms tail). Now the counts are asked
        without the lock and kept only if no bundle of ours started meanwhile
        (`_generation`: every bundle bumps it first, under the lock); if
        changes race every try, the last one holds the lock throughout.
        """
        tids = sorted(set(self.pipeline.ids.values()))
        for attempt in range(tries + 1):
            hold = attempt == tries
            if hold:
                self._lock.acquire()
            try:
                with self._lock:
                    sw = self.switch
                    if sw is None or not self.synced.is_set():
                        raise OFError("not synced with the switch")
                    rnd, gen = self.round, self._generation
                cookie, mask = ck.round_match(rnd)
                counts = sw.flow_counts([q for tid in tids for q in ((tid, 0, 0),
                                                                     (tid, cookie, mask))]
                                        + [(sw.ofp.OFPTT_ALL, 0, 0)])
                with self._lock:
                    if self._generation == gen and self.switch is sw:
                        return sw, rnd, tids, counts, self._expected_counts()
            finally:
                if hold:
                    self._lock.release()
        raise OFError("the switch changed while counting")  # reconnected meanwhile

    def _compare(self, sw: Switch, flows: list[Flow], stats: list[Any],
                 rnd: int) -> tuple[list[Flow], list[Any]]:
        parser = sw.parser
        want = {(self.pipeline.id(f.table), f.priority,
                 match_key(f.osken_match(parser))): f for f in flows}
        learned = self._learned_tables()
        have = {(s.table_id, s.priority, match_key(s.match)): s for s in stats
                if s.table_id not in learned}
        want = {k: f for k, f in want.items() if k[0] not in learned}
        missing = [f for k, f in want.items()
                   if k not in have or have[k].cookie != f.cookie(rnd)]
        unexpected = [s for k, s in have.items()
                      if k not in want or s.cookie != want[k].cookie(rnd)]
        return missing, unexpected

    def group_drift(self) -> tuple[list[Group], list[int]]:
        """(desired groups OVS lacks or holds with other buckets, group ids nobody wants).

        Buckets are compared by count: a bucket edited by hand in place is not
        seen, one added or removed is.
        """
        with self._lock:
            sw = self.switch
            if sw is None or not self.synced.is_set():
                raise OFError("not synced with the switch")
            want = {g.group_id: g for g in self.desired_groups()}
        have = {d.group_id: len(d.buckets) for d in sw.group_desc()}
        missing = [g for i, g in want.items() if have.get(i) != len(g.buckets)]
        return missing, sorted(set(have) - set(want))

    def repair(self) -> tuple[int, int]:
        """Re-add missing flows and delete unexpected ones in one bundle.

        Findings are re-checked against the desired set as it is now: a flow
        changed meanwhile by a normal update is left to that update.
        """
        missing, unexpected = self.drift()
        gmissing, gunexpected = self.group_drift()
        if not (missing or unexpected or gmissing or gunexpected):
            return 0, 0
        with self._lock:
            sw = self.switch
            if sw is None:
                return 0, 0
            p, o = sw.parser, sw.ofp
            missing = [f for f in missing if self._is_desired(f)]
            # Flows of another round (or cookie 0: added by hand) are never wanted;
            # one of this round is unwanted only if it is still not desired now.
            ours = [s for s in unexpected if ck.round_of(s.cookie) == self.round]
            if ours:
                current = {(self.pipeline.id(f.table), f.priority,
                            match_key(f.osken_match(p))) for f in self.desired_flows()}
                unexpected = [s for s in unexpected if ck.round_of(s.cookie) != self.round
                              or (s.table_id, s.priority, match_key(s.match)) not in current]
            msgs = [p.OFPFlowMod(sw.dp, table_id=s.table_id, command=o.OFPFC_DELETE_STRICT,
                                 priority=s.priority, out_port=o.OFPP_ANY,
                                 out_group=o.OFPG_ANY, match=s.match) for s in unexpected]
            msgs += [self._enc.flow_add(f, self.round) for f in missing]
            # Re-checked like flows: only groups still desired as they were found.
            gmissing = [g for g in gmissing if self._installed_groups.get(g.group_id) == g]
            wanted = {g.group_id for g in self.desired_groups()}
            gunexpected = [i for i in gunexpected if i not in wanted]
            msgs = ([group_put(sw, g, self.pipeline) for g in gmissing] + msgs
                    + [group_delete(sw, i) for i in gunexpected])
            if msgs:
                self._bundle(sw, msgs)
        return len(missing) + len(gmissing), len(unexpected) + len(gunexpected)

    def disconnected(self, sw: Switch) -> None:
        with self._lock:
            if self.switch is sw:
                self.switch = None
                self.synced.clear()
