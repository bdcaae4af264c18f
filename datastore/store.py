"""The embedded datastore: one SQLite file shared by every agent of a lab.

It stands in for the Kubernetes API where there is none. Objects are kept as
Kubernetes-shaped JSON (kind, namespace, name) and every write appends to a
revision log, which agents poll to learn what changed since the revision
they last saw; that is the same list-then-watch model the Kubernetes
datastore uses, so the agent's model code does not care which one feeds it.

The log keeps one row per object key, its newest: a row's change always
carries the object's current body, so an older row of the same key tells a
watcher nothing the newer one does not, and writing a key deletes its older
row. What is left grows only with deleted keys (a named pod's put and delete
were two rows forever); the oldest deletions are forgotten beyond
`max_tombstones`, and a watcher still behind them gets StoreGone from
`changes` (the Kubernetes API's 410): `watch` then lists again.

Node registration allocates each node's pod CIDR from the cluster CIDR inside
one write transaction, so two nodes can never get overlapping ranges.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

LOG = logging.getLogger(__name__)

ENCAPS = ("geneve", "vxlan", "gre", "none")
DEFAULT_NODE_PORT_RANGE = "30000-32767"  # Kubernetes' default
#: A YAML file of ClusterConfig keys (the DaemonSet's ConfigMap, or a single node's file).
CLUSTER_CONFIG_ENV = "FLOWCNI_CLUSTER_CONFIG"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
  kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
  body TEXT NOT NULL, rev INTEGER NOT NULL,
  PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS log (
  rev INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, op TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenant_vni (name TEXT PRIMARY KEY, vni INTEGER NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS log_key ON log (kind, namespace, name);
CREATE INDEX IF NOT EXISTS log_deletes ON log (rev) WHERE op = 'delete';
"""
# Deletions the log remembers; beyond this the older half is forgotten (the horizon).
MAX_TOMBSTONES = 10_000
# Counted on a delete whose revision is a multiple of this (counting walks the kept
# deletions: on every delete it tripled a write's cost), so up to this many more.
TOMBSTONE_CHECK = 16


class StoreError(ValueError):
    """A write the store refuses; the message names the field and the conflict."""


class StoreUnavailable(StoreError):
    """The store could not be read or written (locked, busy or unreadable file)."""


class StoreGone(StoreError):
    """Changes asked for from before the horizon: deletions since then were forgotten,
    so the caller must list again (the Kubernetes API's 410 Gone)."""


F = TypeVar("F", bound=Callable[..., Any])


def _unavailable_as_error(fn: F) -> F:
    """sqlite's OperationalError ("database is locked", "locking protocol") as a
    StoreUnavailable naming the file and how long it was tried, not a traceback."""
    @functools.wraps(fn)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(
                f"datastore {self.path} unreachable after {time.monotonic() - t0:.1f}s "
                f"(tried for up to {self.timeout:g}s): {e}") from e
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class ClusterConfig:
    cluster_cidr: str = "10.244.0.0/16"
    node_cidr_size: int = 24
    encap: str = "geneve"
    ip_masq: bool = True
    mtu: int = 0  # 0: uplink MTU minus the encapsulation's overhead
    # Where node ports of NodePort/LoadBalancer Services may lie ("FIRST-LAST", as
    # kube-apiserver's --service-node-port-range): the embedded store refuses others
    # (a node port captures that port on every node address, so 22 would take SSH)
    # and allocates missing ones from it.
    node_port_range: str = DEFAULT_NODE_PORT_RANGE

    @property
    def node_ports(self) -> tuple[int, int]:
        """node_port_range as (first, last); raises StoreError naming the setting."""
        return parse_port_range(self.node_port_range, "node-port-range")

    def validate(self) -> ClusterConfig:
        if self.encap not in ENCAPS:
            raise StoreError(f"encap {self.encap!r} unknown (one of: {', '.join(ENCAPS)})")
        try:
            net = ipaddress.ip_network(self.cluster_cidr)
        except ValueError as e:
            raise StoreError(f"cluster-cidr {self.cluster_cidr!r}: {e}") from e
        if net.version != 4:
            raise StoreError(f"cluster-cidr {self.cluster_cidr}: only IPv4 for now")
        if not net.prefixlen < self.node_cidr_size <= 30:
            raise StoreError(f"node-cidr-size {self.node_cidr_size} does not fit cluster-cidr "
                             f"{self.cluster_cidr} (need {net.prefixlen + 1}..30)")
        if self.mtu and not 576 <= self.mtu <= 65535:
            raise StoreError(f"mtu {self.mtu}: out of range 576..65535")
        parse_port_range(self.node_port_range, "node-port-range")
        return self


def parse_port_range(text: Any, what: str) -> tuple[int, int]:
    """"FIRST-LAST" (1 <= FIRST <= LAST <= 65535) -> (FIRST, LAST); StoreError naming `what`."""
    parts = text.split("-") if isinstance(text, str) else []
    try:
        first, last = (int(x) for x in parts) if len(parts) == 2 else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last <= 65535:
        raise StoreError(f"{what} {text!r}: want FIRST-LAST with 1 <= FIRST <= LAST <= 65535")
    return first, last


# -- cluster settings --------------------------------------------------------------------

def load_cluster_config(path: str | None) -> ClusterConfig:
    """ClusterConfig from a YAML/JSON file (keys as ClusterConfig's fields), or the defaults.

    The API server has no place for these settings, so the DaemonSet mounts
    them from a ConfigMap; a single node on the embedded store reads the same
    file (`FLOWCNI_CLUSTER_CONFIG`). Unknown keys are refused so a typo is
    not ignored.
    """
    if not path:
        return ClusterConfig().validate()
    import yaml  # here, not at the top: 1 MB of the agent's RSS for a file it rarely has

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise StoreError(f"cluster config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise StoreError(f"cluster config {path}: not valid YAML: {e}") from e
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise StoreError(f"cluster config {path}: not a mapping")
    types = {"cluster_cidr": str, "node_cidr_size": int, "encap": str, "ip_masq": bool,
             "mtu": int, "node_port_range": str}
    known = [f.name for f in fields(ClusterConfig)]
    for k, v in data.items():
        if k not in known:
            raise StoreError(f"cluster config {path}: unknown key {k!r} (known: "
                             f"{', '.join(known)})")
        want = types[k]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise StoreError(f"cluster config {path}: {k}: {v!r} is not a {want.__name__}")
    return ClusterConfig(**data).validate()


@dataclass(frozen=True)
class Change:
    rev: int
    op: str  # "put" | "delete"
    kind: str
    namespace: str
    name: str
    body: dict[str, Any] | None


def list_decoder() -> Callable[[str | bytes], Any]:
    """json.loads for one initial list: each distinct integer is made once and shared.

    Why: what the engines keep of a body (a policy's port numbers, in PortSpec)
    is made in the middle of the body's transient dicts; once the bodies were
    freed after the load, a pool of such ints left every third allocator arena
    of the policies' decode in use, and so resident: 14 MB of the Kubernetes
    agent's RSS and 5 MB of the embedded store's at the bench's 1,000 policies
    (two live pools of ints in each of those arenas, found by a census of the
    live objects' arenas after the load). Made once per list, an int is made
    at its first body and shared by every later one.
    """
    ints: dict[str, int] = {}

    def parse_int(text: str) -> int:
        value = ints.get(text)
        if value is None:
            value = ints[text] = int(text)
        return value

    decode = json.JSONDecoder(parse_int=parse_int).decode

    def loads(doc: str | bytes) -> Any:
        return decode(doc if isinstance(doc, str) else doc.decode())

    return loads


class Store:
    """SQLite-backed store; safe to share between processes (WAL, busy timeout)."""

    @_unavailable_as_error
    def __init__(self, path: str, timeout: float = 30.0,
                 max_tombstones: int = MAX_TOMBSTONES) -> None:
        self.path = path
        self.timeout = timeout  # how long a locked store is waited for
        self.max_tombstones = max_tombstones
        self._check_every = max(1, min(TOMBSTONE_CHECK, max_tombstones // 4))
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # idempotent; executescript commits by itself

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: the write lock is taken at once, so
        what it reads stays true until it commits); inside exclusive(), part of that."""
        db = self._db()
        if getattr(self._local, "exclusive", False):
            yield db
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Several reads and writes of this thread as one write transaction: another
        writer (another `flowctl apply`, an agent) waits for it (up to the busy
        timeout), so a read-decide-write (node-port allocation) cannot interleave with
        another and hand out what the other just took. Everything is written, or
        nothing if an exception leaves the block. Not nestable."""
        if getattr(self._local, "exclusive", False):
            raise RuntimeError("Store.exclusive() is not nestable")
        t0 = time.monotonic()
        try:
            with self._tx() as _:
                self._local.exclusive = True
                try:
                    yield
                finally:
                    self._local.exclusive = False
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(
                f"datastore {self.path} unreachable after {time.monotonic() - t0:.1f}s "
                f"(tried for up to {self.timeout:g}s): {e}") from e

    # -- cluster configuration ------------------------------------------------------

    @_unavailable_as_error
    def set_cluster(self, cfg: ClusterConfig) -> None:
        cfg.validate()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('cluster', ?)",
                       (json.dumps(cfg.__dict__),))

    @_unavailable_as_error
    def cluster(self) -> ClusterConfig:
        row = self._db().execute("SELECT value FROM meta WHERE key='cluster'").fetchone()
        return ClusterConfig(**json.loads(row[0])) if row else ClusterConfig()

    # -- objects ---------------------------------------------------------------------

    def _log(self, db: sqlite3.Connection, op: str, kind: str, ns: str, name: str) -> int:
        """Append a change of one key; its older row goes (see the module docstring)."""
        db.execute("DELETE FROM log WHERE kind=? AND namespace=? AND name=?", (kind, ns, name))
        cur = db.execute("INSERT INTO log (kind, namespace, name, op) VALUES (?,?,?,?)",
                         (kind, ns, name, op))
        rev = int(cur.lastrowid or 0)
        if op == "delete":
            # Checked when the deletions cross a multiple of _check_every revisions since
            # the previous one, not when this revision is one: writes in a fixed cycle (a
            # put and a delete per pod record) may never land a delete on a multiple.
            prev = db.execute("SELECT MAX(rev) FROM log WHERE op='delete' AND rev < ?",
                              (rev,)).fetchone()[0] or 0
            if rev // self._check_every != prev // self._check_every:
                self._forget_tombstones(db)
        return rev

    def _forget_tombstones(self, db: sqlite3.Connection) -> None:
        """Past max_tombstones deletions, forget the older half and move the horizon."""
        row = db.execute("SELECT rev FROM log WHERE op='delete' ORDER BY rev DESC "
                         "LIMIT 1 OFFSET ?", (self.max_tombstones,)).fetchone()
        if row is None:
            return
        cut = db.execute("SELECT rev FROM log WHERE op='delete' ORDER BY rev DESC "
                         "LIMIT 1 OFFSET ?", (self.max_tombstones // 2,)).fetchone()[0]
        db.execute("DELETE FROM log WHERE op='delete' AND rev <= ?", (cut,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('horizon', ?)", (str(cut),))

    @_unavailable_as_error
    def horizon(self) -> int:
        """Deletions at or below this revision are forgotten (0: none ever was)."""
        row = self._db().execute("SELECT value FROM meta WHERE key='horizon'").fetchone()
        return int(row[0]) if row else 0

    def _put(self, db: sqlite3.Connection, kind: str, ns: str, name: str,
             body: dict[str, Any]) -> int:
        rev = self._log(db, "put", kind, ns, name)
        db.execute("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?)",
                   (kind, ns, name, json.dumps(body, sort_keys=True), rev))
        return rev

    @_unavailable_as_error
    def put(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> int:
        with self._tx() as db:
            return self._put(db, kind, namespace, name, body)

    @_unavailable_as_error
    def put_many(self, kind: str, items: list[tuple[str, str, dict[str, Any]]]) -> int:
        """Several objects of one kind (namespace, name, body) in one transaction.

        Watchers see them as one batch of changes, as an API server's watch
        delivers a burst; returns the revision of the last one.
        """
        rev = 0
        with self._tx() as db:
            for ns, name, body in items:
                rev = self._put(db, kind, ns, name, body)
        return rev

    @_unavailable_as_error
    def delete(self, kind: str, namespace: str, name: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
                             (kind, namespace, name))
            if not cur.rowcount:
                return False
            self._log(db, "delete", kind, namespace, name)
            return True

    @_unavailable_as_error
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        row = self._db().execute(
            "SELECT body FROM objects WHERE kind=? AND namespace=? AND name=?",
            (kind, namespace, name)).fetchone()
        return json.loads(row[0]) if row else None

    @_unavailable_as_error
    def wait_synced(self) -> bool:
        """Always listable: the table is the truth (datastore.base.Datastore)."""
        return True

    def objects(self, kind: str) -> list[dict[str, Any]]:
        # row by row: an initial list's raw JSON is never all held next to its decode
        loads = list_decoder()
        return [loads(r[0]) for r in self._db().execute(
            "SELECT body FROM objects WHERE kind=? ORDER BY namespace, name", (kind,))]

    # -- the tenant networks' VNIs (datastore/tenantconv.py resolve) -------------------

    @_unavailable_as_error
    def vnis(self) -> dict[str, int]:
        """Every TenantNetwork's recorded VNI (name -> VNI)."""
        return {str(n): int(v) for n, v in
                self._db().execute("SELECT name, vni FROM tenant_vni").fetchall()}

    @_unavailable_as_error
    def record_vnis(self, want: dict[str, int]) -> dict[str, int]:
        """Record each tenant's VNI unless the tenant or the VNI already has a record
        (the first agent to record wins; the others read its answer back); returns
        every record, in one transaction."""
        with self._tx() as db:
            for name, vni in sorted(want.items()):
                db.execute("INSERT OR IGNORE INTO tenant_vni VALUES (?, ?)", (name, vni))
            return {str(n): int(v) for n, v in
                    db.execute("SELECT name, vni FROM tenant_vni").fetchall()}

    @_unavailable_as_error
    def forget_vni(self, name: str) -> None:
        """A deleted TenantNetwork's record (its VNI may be given again)."""
        with self._tx() as db:
            db.execute("DELETE FROM tenant_vni WHERE name=?", (name,))

    @_unavailable_as_error
    def revision(self) -> int:
        row = self._db().execute("SELECT COALESCE(MAX(rev), 0) FROM log").fetchone()
        return int(row[0])

    @_unavailable_as_error
    def changes(self, since: int) -> list[Change]:
        """The newest change of every key changed after revision `since`, with the
        object's current body; StoreGone if deletions after `since` were forgotten."""
        rows = self._db().execute(
            "SELECT l.rev, l.op, l.kind, l.namespace, l.name, o.body FROM log l "
            "LEFT JOIN objects o ON o.kind=l.kind AND o.namespace=l.namespace "
            "AND o.name=l.name AND l.op='put' WHERE l.rev > ? ORDER BY l.rev", (since,)
        ).fetchall()
        # read after the rows: a pruning in between makes this a needless relist, never
        # a silently missed deletion
        horizon = self.horizon()
        if since < horizon:
            raise StoreGone(f"changes after revision {since}: deletions up to revision "
                            f"{horizon} were forgotten; list again")
        return [Change(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]) if r[5] else None)
                for r in rows]

    @_unavailable_as_error
    def _keys(self, since: int) -> set[tuple[str, str, str]]:
        """The keys of every object now and of every change after `since`."""
        rows = self._db().execute(
            "SELECT kind, namespace, name FROM objects UNION "
            "SELECT kind, namespace, name FROM log WHERE rev > ?", (since,)).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}

    @_unavailable_as_error
    def _relist(self, known: set[tuple[str, str, str]]) -> tuple[int, list[Change]]:
        """A watcher past the horizon: a delete for every key it may hold that is gone,
        a put of every object (it cannot tell which changed), at the current revision
        (returned first: the batch may be empty)."""
        db = self._db()
        db.execute("BEGIN")  # one snapshot: the revision and the objects agree
        try:
            rev = int(db.execute("SELECT COALESCE(MAX(rev), 0) FROM log").fetchone()[0])
            rows = db.execute("SELECT kind, namespace, name, body FROM objects "
                              "ORDER BY kind, namespace, name").fetchall()
        finally:
            db.execute("COMMIT")
        now = {(r[0], r[1], r[2]) for r in rows}
        return rev, ([Change(rev, "delete", *k, None) for k in sorted(known - now)]
                     + [Change(rev, "put", r[0], r[1], r[2], json.loads(r[3])) for r in rows])

    def watch(self, since: int, callback: Callable[[list[Change]], None],
              stop: threading.Event, interval: float = 0.02) -> None:
        """Poll for changes until `stop` is set; callback gets each batch in order.

        The keys the caller may hold are tracked (what existed when it listed, and
        every change since), so a watcher that fell behind the horizon is brought to
        the current state by one relist batch (StoreGone, logged) without a restart.
        A failing callback gets the same batch again a second later; the agent's
        raises only for faults of the moment (controller/isolate.py).
        """
        rev = since
        known: set[tuple[str, str, str]] | None = None
        while not stop.is_set():
            try:
                if known is None:
                    known = self._keys(rev)
                try:
                    batch, last = self.changes(rev), None
                except StoreGone as e:
                    LOG.warning("%s: relisting", e)
                    last, batch = self._relist(known)
                if batch:
                    callback(batch)
                    rev = batch[-1].rev
                if last is not None:
                    rev = last  # a relist: the current revision even with nothing to say
                for c in batch:
                    k = (c.kind, c.namespace, c.name)
                    if c.op == "delete":
                        known.discard(k)
                    else:
                        known.add(k)
            except Exception:
                LOG.exception("applying store changes after revision %d; retrying", rev)
                stop.wait(1.0)
            stop.wait(interval)

    def close(self, timeout: float = 5.0) -> None:
        """Close the calling thread's connection (the others close with their
        threads; a watcher stops with its `stop` event). Nothing to wait for."""
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            db.close()

    # -- nodes -------------------------------------------------------------------------

    @_unavailable_as_error
    def register_node(self, name: str, node_ip: str, pod_cidr: str | None = None) -> str:
        """Record a node; return its pod CIDR (kept, requested, or the first free one)."""
        cfg = self.cluster()
        cluster = ipaddress.ip_network(cfg.cluster_cidr)
        try:
            ipaddress.ip_address(node_ip)
        except ValueError as e:
            raise StoreError(f"node {name}: node IP {node_ip!r} invalid") from e
        with self._tx() as db:
            rows = db.execute("SELECT body FROM objects WHERE kind='Node'").fetchall()
            others = {n["name"]: n for n in (json.loads(r[0]) for r in rows) if n["name"] != name}
            mine = next((json.loads(r[0]) for r in rows if json.loads(r[0])["name"] == name),
                        None)
            taken = {ipaddress.ip_network(n["podCIDR"]): n["name"] for n in others.values()}
            if pod_cidr is None and mine is not None:
                pod_cidr = mine["podCIDR"]
            if pod_cidr is not None:
                try:
                    want = ipaddress.ip_network(pod_cidr)
                except ValueError as e:
                    raise StoreError(f"node {name}: pod CIDR {pod_cidr!r}: {e}") from e
                if not want.subnet_of(cluster):  # type: ignore[arg-type]
                    raise StoreError(f"node {name}: pod CIDR {want} is outside the cluster "
                                     f"CIDR {cluster}")
                for net, owner in taken.items():
                    if net.overlaps(want):
                        raise StoreError(f"node {name}: pod CIDR {want} overlaps node "
                                         f"{owner}'s {net}")
            else:
                subnets = cluster.subnets(new_prefix=cfg.node_cidr_size)
                next(subnets)  # the first subnet stays free: node N gets the N-th
                want = next((s for s in subnets
                             if not any(s.overlaps(t) for t in taken)), None)  # type: ignore
                if want is None:
                    raise StoreError(f"cluster CIDR {cluster} has no free /"
                                     f"{cfg.node_cidr_size} for node {name}")
            for other in others.values():
                if other["nodeIP"] == node_ip:
                    raise StoreError(f"node {name}: node IP {node_ip} already used by "
                                     f"node {other['name']}")
            self._put(db, "Node", "", name, {"name": name, "nodeIP": node_ip,
                                             "podCIDR": str(want),
                                             "registered": time.time()})
        return str(want)

    @_unavailable_as_error
    def nodes(self) -> list[dict[str, Any]]:
        return self.objects("Node")
