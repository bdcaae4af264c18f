"""The Kubernetes datastore: the API server, listed and watched, as the agent's store.

One informer thread per resource lists it (in pages), then watches from the
list's resourceVersion with bookmarks. Every watch carries a server-side
`timeoutSeconds` (jittered, so a fleet of agents does not reconnect in step)
and a client read timeout a little longer, so a connection that died without
a FIN ends the watch instead of hanging it. A watch that ends or drops is
resumed from the last resourceVersion seen (objects or bookmarks), with
backoff when it keeps failing; 410 Gone means the server no longer has that
history, so the informer lists again and the cache emits the difference:
deletes for what vanished meanwhile, puts for what changed.

Requests go through datastore.kubeapi (http.client, not the `kubernetes`
package, whose import alone was 60 MB of the agent's RSS). A 403 names the
resource the ClusterRole must grant.

All informers feed one `Cache`, which numbers every change with its own
revision counter (API resourceVersions are per-etcd and opaque, and the
agent needs one order across kinds) and keeps the newest change per object,
so `watch(since)` gives the same stream the embedded store's log does.
`objects(kind)` waits for that kind's first list, so an agent restarting
against a slow API server never sees an empty cluster and prunes live state.

The agent only reads: RBAC grants get/list/watch and nothing else; pod
CIDRs are allocated by the controller manager (`spec.podCIDR`). All pods
are watched (policy needs the labels and IPs of remote pods too); a second,
`spec.nodeName`-selected watch of the node's own pods would only repeat a
subset of the same events, so there is none.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flowcni.datastore import kubeconv
from flowcni.datastore.kubeapi import (
    ApiError,
    Client,
    ConfigError,
    ReadTimeout,
    Response,
    from_kubeconfig,
    in_cluster,
)
from flowcni.datastore.kubeconv import Body, Key, Malformed
from flowcni.datastore.store import (
    CLUSTER_CONFIG_ENV,
    Change,
    ClusterConfig,
    StoreError,
    list_decoder,
    load_cluster_config,
)

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiResource:
    """Where a kind is served: its API group ("" for the core group), version, plural."""

    group: str
    version: str
    plural: str

    @property
    def path(self) -> str:
        """The all-namespaces collection path (lists and watches)."""
        if not self.group:
            return f"/api/{self.version}/{self.plural}"
        return f"/apis/{self.group}/{self.version}/{self.plural}"

    def describe(self) -> str:
        """As RBAC names it: plural.group."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


# Custom resources of policy.networking.k8s.io: (kind, version, plural). Their CRDs
# are optional: a cluster without them has none of these objects (see Informer).
CLUSTER_POLICY_RESOURCES = (
    ("AdminNetworkPolicy", "v1alpha1", "adminnetworkpolicies"),
    ("BaselineAdminNetworkPolicy", "v1alpha1", "baselineadminnetworkpolicies"),
    ("ClusterNetworkPolicy", "v1alpha2", "clusternetworkpolicies"),
)
# kind -> where it is listed and watched (every namespace at once)
RESOURCES: dict[str, ApiResource] = {
    "Node": ApiResource("", "v1", "nodes"),
    "Namespace": ApiResource("", "v1", "namespaces"),
    "Pod": ApiResource("", "v1", "pods"),
    "NetworkPolicy": ApiResource("networking.k8s.io", "v1", "networkpolicies"),
    "Service": ApiResource("", "v1", "services"),
    "EndpointSlice": ApiResource("discovery.k8s.io", "v1", "endpointslices"),
    "TenantNetwork": ApiResource("flowcni.io", "v1alpha1", "tenantnetworks"),
    **{k: ApiResource("policy.networking.k8s.io", v, p) for k, v, p in CLUSTER_POLICY_RESOURCES},
}
KINDS = tuple(RESOURCES)
# A watch batch is taken once no change followed it for WATCH_SETTLE_S, or
# WATCH_SETTLE_MAX_S after it began (see KubeDatastore._settled).
WATCH_SETTLE_S = 0.01
WATCH_SETTLE_MAX_S = 0.2
# A list page larger than this makes the next pages' limit smaller in proportion: a page
# of 500 real pods (managedFields and all) or policies with long ipBlock lists is several
# MB of JSON and ten times that parsed, all of it transient.
PAGE_BYTES = 1 << 20

# Kinds whose CRD may not be installed (flowcni's own, the upstream policy ones): a 404
# lists them as empty (and is retried), so a cluster without them still gets a working agent.
OPTIONAL_KINDS = frozenset({"TenantNetwork", *(k for k, _, _ in CLUSTER_POLICY_RESOURCES)})


# -- the cache and its change log -------------------------------------------------------

Blob = bytes  # a body's compact JSON, deflated with its kind's dictionary (see Cache)


def encode(body: Body) -> str:
    """A body's canonical JSON: equal bodies give equal strings, whatever their key order."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


class Codec:
    """Raw deflate of one kind's bodies, primed with a dictionary: that kind's first body.

    Objects of one kind repeat their keys and most of their values (a pod's
    field names, a policy's selectors and ipBlock wrappers), so a body seen
    before is the best preset dictionary there is, and even a 116-byte pod
    shrinks by half (a dictionary-less zlib stream barely shrinks it).
    Deflate is deterministic for a given input, dictionary and level, so
    equal bodies still give equal blobs (Cache's unchanged-update check).
    """

    LEVEL = 6
    MEM_LEVEL = 8

    def __init__(self, sample: str) -> None:
        self.zdict = sample.encode()[-32768:]  # deflate's window: only the tail counts

    def pack(self, text: str) -> Blob:
        c = zlib.compressobj(self.LEVEL, zlib.DEFLATED, -15, self.MEM_LEVEL,
                             zlib.Z_DEFAULT_STRATEGY, self.zdict)
        return c.compress(text.encode()) + c.flush()

    def unpack(self, blob: Blob, loads: Callable[[bytes], Any] = json.loads) -> Body:
        d = zlib.decompressobj(-15, self.zdict)
        return loads(d.decompress(blob) + d.flush())  # type: ignore[no-any-return]


class Cache:
    """Current objects per kind plus the newest change of each, numbered in one order.

    Keeping only the newest change per object (deletes as tombstones) bounds
    the log by the number of objects, while a watcher that reads from any
    revision still ends at the current state: the same contract as the
    embedded store's log, whose rows always carry the current body.

    Bodies are held as their compact JSON (`encode`), not as dicts: a dict
    per label map, port, policy peer and ipBlock made the cache 54 MB
    (tracemalloc) for the bench's 10,000 pods, 1,000 nodes and 1,000
    policies, about ten times their JSON. That JSON is deflated with a
    dictionary per kind (`Codec`): the same cache's bodies went from 5.3 to
    0.9 MB. Readers get fresh dicts decoded from it, which is also what made
    them their own copies before (deepcopy), and an unchanged update is a
    byte-string comparison.

    The log holds only the revision of each object's newest change, per kind
    and keyed by the object table's own key tuples: the change itself is
    whatever the object table holds now (present: a put of that body;
    absent: a delete), since both are updated under one lock.
    """

    def __init__(self, max_tombstones: int = 50_000) -> None:
        self._cond = threading.Condition()
        self._rev = 0
        self._objects: dict[str, dict[Key, Blob]] = {}
        self._codecs: dict[str, Codec] = {}
        # kind -> key -> revision of its newest change; in revision order (a change
        # moves its entry to the end)
        self._log: dict[str, dict[Key, int]] = {}
        self._tombstones = 0
        self.max_tombstones = max_tombstones
        self.horizon = 0  # tombstones at or below this revision were forgotten
        self.skipped: dict[tuple[str, Key], str] = {}

    def revision(self) -> int:
        with self._cond:
            return self._rev

    def pack(self, kind: str, text: str) -> Blob:
        """`text` (encoded) as `kind`'s blob; its first body becomes the kind's dictionary."""
        codec = self._codecs.get(kind)
        if codec is None:
            codec = self._codecs.setdefault(kind, Codec(text))
        return codec.pack(text)

    def objects(self, kind: str) -> list[Body]:
        """Fresh copies of the current objects of `kind`, by (namespace, name)."""
        with self._cond:
            blobs = [b for _, b in sorted(self._objects.get(kind, {}).items())]
        if not blobs:
            return []
        unpack, loads = self._codecs[kind].unpack, list_decoder()
        return [unpack(b, loads) for b in blobs]

    def count(self, kind: str) -> int:
        with self._cond:
            return len(self._objects.get(kind, {}))

    def get(self, kind: str, key: Key) -> Body | None:
        with self._cond:
            blob = self._objects.get(kind, {}).get(key)
        return None if blob is None else self._codecs[kind].unpack(blob)

    def _emit(self, op: str, kind: str, key: Key, was_present: bool) -> int:
        """Log a change of an object that was (`was_present`) or was not in the table."""
        self._rev += 1
        log = self._log.setdefault(kind, {})
        if log.pop(key, None) is not None and not was_present:
            self._tombstones -= 1  # its entry was a delete
        log[key] = self._rev
        if op == "delete":
            self._tombstones += 1
            if self._tombstones > self.max_tombstones:
                self._forget_tombstones()
        self._cond.notify_all()
        return self._rev

    def _forget_tombstones(self) -> None:
        """Drop the older half of the deletes; a watcher that far behind is warned."""
        keep = self.max_tombstones // 2
        deletes = sorted((rev, kind, key) for kind, log in self._log.items()
                         for key, rev in log.items() if key not in self._objects.get(kind, {}))
        for rev, kind, key in deletes:
            if self._tombstones <= keep:
                break
            del self._log[kind][key]
            self._tombstones -= 1
            self.horizon = rev

    def put(self, kind: str, key: Key, body: Body) -> Change | None:
        """Store `body`; a change only if it differs from what is cached."""
        return self.put_blob(kind, key, self.pack(kind, encode(body)), body)

    def put_blob(self, kind: str, key: Key, blob: Blob, body: Body | None = None
                 ) -> Change | None:
        """`put` of a body packed by `pack`."""
        with self._cond:
            self.skipped.pop((kind, key), None)
            objs = self._objects.setdefault(kind, {})
            old = objs.get(key)
            if old == blob:
                return None
            objs[key] = blob
            rev = self._emit("put", kind, key, old is not None)
        return Change(rev, "put", kind, key[0], key[1],
                      body if body is not None else self._codecs[kind].unpack(blob))

    def delete(self, kind: str, key: Key) -> Change | None:
        with self._cond:
            self.skipped.pop((kind, key), None)
            if self._objects.get(kind, {}).pop(key, None) is None:
                return None
            rev = self._emit("delete", kind, key, True)
        return Change(rev, "delete", kind, key[0], key[1], None)

    def skip(self, kind: str, key: Key, reason: str) -> tuple[bool, bool]:
        """Mark an object unusable: (reason is new, an older usable copy was deleted).

        Dropping the older copy makes the watch path agree with a re-list,
        which would not list the object at all.
        """
        with self._cond:
            deleted = False
            if self._objects.get(kind, {}).pop(key, None) is not None:
                self._emit("delete", kind, key, True)
                deleted = True
            new = self.skipped.get((kind, key)) != reason
            self.skipped[(kind, key)] = reason
            return new, deleted

    def replace(self, kind: str, items: dict[Key, Body]) -> list[tuple[str, Key]]:
        """A full list: deletes for what is gone, puts for what is new or changed."""
        return self.replace_blobs(kind, {k: self.pack(kind, encode(b))
                                         for k, b in items.items()})

    def replace_blobs(self, kind: str, items: dict[Key, Blob]) -> list[tuple[str, Key]]:
        """`replace` of packed bodies (`pack`): the (op, key) of each change made."""
        with self._cond:
            objs = self._objects.setdefault(kind, {})
            out = []
            for k in sorted(set(objs) - set(items)):
                del objs[k]
                self._emit("delete", kind, k, True)
                out.append(("delete", k))
            for k in sorted(items):
                old = objs.get(k)
                if old != items[k]:
                    objs[k] = items[k]
                    self._emit("put", kind, k, old is not None)
                    out.append(("put", k))
            for sk in [sk for sk in self.skipped if sk[0] == kind and sk[1] in items]:
                del self.skipped[sk]
            return out

    def since(self, rev: int) -> list[Change]:
        """The newest change of every object changed after `rev`, in revision order
        (bodies decoded afresh: the caller owns them)."""
        with self._cond:
            if rev < self.horizon:
                LOG.warning("watch from revision %d: deletions up to %d were forgotten",
                            rev, self.horizon)
            found = []
            for kind, log in self._log.items():
                objs = self._objects.get(kind, {})
                for key, r in reversed(log.items()):
                    if r <= rev:
                        break
                    found.append((r, kind, key, objs.get(key)))
        found.sort(key=lambda f: f[0])
        return [Change(r, "delete", kind, key[0], key[1], None) if blob is None else
                Change(r, "put", kind, key[0], key[1], self._codecs[kind].unpack(blob))
                for r, kind, key, blob in found]

    def wait_newer(self, rev: int, timeout: float) -> bool:
        """Block until the revision passes `rev` (True) or `timeout` runs out (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._rev > rev, timeout)


# -- one informer per resource ----------------------------------------------------------

class Gone(Exception):
    """410: the server has compacted the history we asked for; list again."""


class WatchError(Exception):
    """The server ended a watch with an error event other than 410."""


class Backoff:
    """Exponential delay with jitter, so agents do not hammer a recovering API server together."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = self.initial


@dataclass
class Timeouts:
    """How long requests may take; every one of them is bounded."""

    watch: int = 300          # server-side timeoutSeconds (jittered up to twice this)
    read_grace: float = 30.0  # client read timeout = watch timeout + this
    connect: float = 10.0
    list_read: float = 60.0   # per page
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class Informer:
    """List-then-watch of one resource into the shared cache; runs in its own thread."""

    def __init__(self, kind: str, api: Client, cache: Cache, stop: threading.Event,
                 timeouts: Timeouts, page_size: int = 500,
                 parse_lock: threading.Lock | None = None) -> None:
        self.kind, self.cache, self.stop, self.timeouts = kind, cache, stop, timeouts
        self.api, self.resource = api, RESOURCES[kind]
        self.parse_lock = parse_lock or threading.Lock()
        self.page_size = page_size
        self.synced = threading.Event()
        self.resource_version: str | None = None
        self.last_error = ""
        self.stats = {"lists": 0, "watches": 0, "events": 0, "gone": 0, "errors": 0,
                      "skipped": 0}
        self._resp: Response | None = None
        self.thread = threading.Thread(target=self.run, name=f"kube-{kind}", daemon=True)

    # the loop -----------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self.timeouts.backoff_initial, self.timeouts.backoff_max)
        gone_before = False
        while not self.stop.is_set():
            delay = 0.0
            gone = False
            try:
                if self.resource_version is None:
                    self.relist()
                    backoff.reset()
                if self.watch() or self.stop.is_set():
                    backoff.reset()  # a watch that delivered or ran its time is healthy
                else:
                    delay = backoff.next()
            except Gone as e:
                self.stats["gone"] += 1
                LOG.info("%s: %s; listing again", self.kind, e)
                self.resource_version = None
                gone = True
                delay = backoff.next() if gone_before else 0.0  # twice in a row: slow down
            except ApiError as e:
                if e.status == 404 and self.kind in OPTIONAL_KINDS:
                    delay = self._absent(backoff)
                else:
                    delay = self._failed(e, backoff)
            except (OSError, http.client.HTTPException, ValueError, WatchError,
                    ConfigError) as e:
                delay = self._failed(e, backoff)
            except Exception as e:  # a bug must not end the informer for good
                LOG.exception("%s informer", self.kind)
                delay = self._failed(e, backoff)
            gone_before = gone
            if delay:
                self.stop.wait(delay)

    def _absent(self, backoff: Backoff) -> float:
        """The resource is not served (its CRD is not installed): there are none of
        these objects, which is a complete answer, so the kind counts as listed (an
        agent must not wait for it); ask again later, for a CRD installed afterwards."""
        if not self.synced.is_set():
            LOG.info("%s: not served by the API server (CRD not installed?): none", self.kind)
        self.cache.replace(self.kind, {})
        self.resource_version = None
        self.last_error = "resource not served (404)"
        self.synced.set()
        return max(backoff.next(), 1.0)

    def _failed(self, e: Exception, backoff: Backoff) -> float:
        self.stats["errors"] += 1
        self.last_error = _describe(e, self.resource)
        delay = backoff.next()
        if self.stop.is_set():
            return 0.0
        LOG.warning("%s %s from resourceVersion %s failed: %s; retrying in %.1fs", self.kind,
                    "watch" if self.resource_version else "list", self.resource_version,
                    self.last_error, delay)
        return delay

    # list -----------------------------------------------------------------------------

    def relist(self) -> None:
        """List every object (in pages of one snapshot) and make the cache match it."""
        items: dict[Key, Blob] = {}
        pages: list[str] = []
        rv: str | None = None
        cont: str | None = None
        limit = self.page_size
        while True:
            page = self._call({"limit": limit, "continue": cont}, self.timeouts.list_read)
            try:
                text = page.read()
            finally:
                page.close()
            with self.parse_lock:
                joined, cont, page_rv = self._encode_page(text, items)
            pages.append(joined)
            rv = rv or page_rv
            if len(text) > PAGE_BYTES:  # fat objects (policies, real pods): smaller pages
                limit = max(1, limit * PAGE_BYTES // len(text))
            del text, joined
            if not cont:
                break
        if rv is None:
            raise ValueError(f"{self.kind} list: response has no resourceVersion")
        with self.parse_lock:
            self._take_pages(pages, items)
            changes = self.cache.replace_blobs(self.kind, items)
        self.stats["lists"] += 1
        self.resource_version = rv
        LOG.info("%s: listed %d at resourceVersion %s (%d changes)", self.kind, len(items), rv,
                 len(changes))
        self.synced.set()

    def _take_pages(self, pages: list[str], items: dict[Key, Blob]) -> None:
        """The survivors of every page (keys and packed bodies) into `items`; each
        page's string is freed once sliced.

        A page's parse is the informer's largest transient: its dicts are
        dropped before the next page is read, and (see parse_lock) only one
        informer parses at a time, so the first lists of all kinds do not
        add their peaks together. What the cache keeps of the list (a
        twentieth of the objects the parses make) is made only once every
        page's parse is freed, from the pages' joined strings, and under the
        same lock: made after each page instead, the survivors of one page
        were scattered among the next pages' transients, and the allocator
        arenas they pinned held 4 MB of empty pools after the list (kube
        agent at the bench's size).
        """
        pack, kind = self.cache.pack, self.kind
        pages.reverse()
        while pages:
            joined = pages.pop()
            pos, end = 0, len(joined)
            while pos < end:  # "namespace TAB name TAB body NEWLINE" lines
                t1 = joined.index("\t", pos)
                t2 = joined.index("\t", t1 + 1)
                nl = joined.index("\n", t2 + 1)  # encode() escapes newlines inside strings
                items[(sys.intern(joined[pos:t1]), joined[t1 + 1:t2])] = pack(
                    kind, joined[t2 + 1:nl])
                pos = nl + 1

    def _encode_page(self, text: bytes, items: dict[Key, Blob]
                     ) -> tuple[str, str | None, str | None]:
        """A page's objects as one string of "namespace TAB name TAB body NEWLINE" lines
        (a name that could not be split so goes straight to `items`)."""
        data = json.loads(text)
        meta = data.get("metadata") if isinstance(data, dict) else None
        if not isinstance(meta, dict):
            raise ValueError(f"{self.kind} list: response has no metadata")
        parts: list[str] = []
        for raw in data.get("items") or []:
            try:
                key, body = kubeconv.convert(self.kind, raw)
            except Malformed as e:
                self._skip(raw, e)
                continue
            if any(c in key[0] or c in key[1] for c in "\t\n"):  # not a valid name anyway
                items[key] = self.cache.pack(self.kind, encode(body))
                continue
            parts += (key[0], "\t", key[1], "\t", encode(body), "\n")
        # one large allocation, outside the small-object arenas
        return "".join(parts), meta.get("continue") or None, kubeconv.resource_version(data)

    # watch ----------------------------------------------------------------------------

    def watch(self) -> bool:
        """One watch request; True if it was healthy (delivered events or ran its course)."""
        t = self.timeouts
        seconds = max(1, int(t.watch * random.uniform(1.0, 2.0)))
        started = time.monotonic()
        events = 0
        resp = self._call({"watch": True, "resourceVersion": self.resource_version,
                           "allowWatchBookmarks": True, "timeoutSeconds": seconds},
                          seconds + t.read_grace)
        self._resp = resp
        self.stats["watches"] += 1
        try:
            for line in resp.lines():
                if self.stop.is_set():
                    break
                self.handle(json.loads(line))
                events += 1
        finally:
            self._resp = None
            resp.close()
        return events > 0 or time.monotonic() - started >= min(seconds, 1.0) * 0.9

    def handle(self, event: Any) -> None:
        """Apply one watch event to the cache and remember its resourceVersion."""
        if not isinstance(event, dict):
            raise ValueError(f"{self.kind} watch: event is not an object")
        etype, raw = event.get("type"), event.get("object")
        if etype == "ERROR":
            status = raw if isinstance(raw, dict) else {}
            msg = f"{status.get('reason')}: {status.get('message')}"
            if status.get("code") == 410:
                raise Gone(f"watch from resourceVersion {self.resource_version}: {msg}")
            raise WatchError(f"error event {status.get('code')} {msg}")
        rv = kubeconv.resource_version(raw)
        if etype != "BOOKMARK":
            self.stats["events"] += 1
        if etype in ("ADDED", "MODIFIED"):
            try:
                key, body = kubeconv.convert(self.kind, raw)
                self.cache.put(self.kind, key, body)
            except Malformed as e:
                self._skip(raw, e)
        elif etype == "DELETED":
            try:
                self.cache.delete(self.kind, kubeconv.object_key(self.kind, raw))
            except Malformed as e:
                self._skip(raw, e)
        elif etype != "BOOKMARK":
            LOG.warning("%s watch: unknown event type %r ignored", self.kind, etype)
        if rv is not None:
            self.resource_version = rv

    def _skip(self, raw: Any, e: Malformed) -> None:
        self.stats["skipped"] += 1
        try:
            key = kubeconv.object_key(self.kind, raw)
        except Malformed:
            LOG.warning("skipping %s", e)  # no name to forget it by
            return
        new, _ = self.cache.skip(self.kind, key, str(e))
        if new:
            LOG.warning("skipping %s", e)

    # plumbing -------------------------------------------------------------------------

    def _call(self, query: dict[str, Any], read_timeout: float) -> Response:
        """GET the kind's collection; 410 becomes Gone (list again)."""
        try:
            return self.api.get(self.resource.path, query, self.timeouts.connect, read_timeout)
        except ApiError as e:
            if e.status == 410:
                raise Gone(f"{'watch' if query.get('watch') else 'list'}: {e}") from e
            raise

    def abort(self) -> None:
        """Cut the current watch connection so the thread notices `stop` at once."""
        resp = self._resp
        if resp is not None:
            resp.abort()


def _describe(e: Exception, resource: ApiResource) -> str:
    """The error as the agent's status and log show it; a 403 says what RBAC must grant."""
    if isinstance(e, ApiError):
        if e.status == 403:
            return (f"{e} (the flowcni ClusterRole must grant list and watch on "
                    f"{resource.describe()})")
        return str(e)
    if isinstance(e, ReadTimeout):
        return f"ReadTimeout: {e}"
    return f"{type(e).__name__}: {e}"


# -- the datastore ----------------------------------------------------------------------

def api_client(kubeconfig: str | None) -> Client:
    """A client from a kubeconfig file, or from the pod's service account."""
    try:
        return Client(from_kubeconfig(kubeconfig) if kubeconfig else in_cluster())
    except ConfigError as e:
        where = kubeconfig or "in-cluster service account"
        raise StoreError(f"Kubernetes client configuration ({where}): {e}") from e


class KubeDatastore:
    """The `Datastore` (controller.datastore) backed by the Kubernetes API server."""

    def __init__(self, kubeconfig: str | None = None, *, kinds: Iterable[str] = KINDS,
                 timeouts: Timeouts | None = None, page_size: int = 500,
                 node_wait: float = 60.0, api: Client | None = None) -> None:
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(RESOURCES)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}")
        self.timeouts = timeouts or Timeouts()
        self.node_wait = node_wait
        self.api = api or api_client(kubeconfig)
        self.cache = Cache()
        self._stop = threading.Event()
        parse_lock = threading.Lock()  # one list page parsed at a time (Informer.relist)
        self.informers = {k: Informer(k, self.api, self.cache, self._stop, self.timeouts,
                                      page_size, parse_lock) for k in self.kinds}
        for inf in self.informers.values():
            inf.thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every informer and close its watch connection, within about `timeout`
        seconds in all (the agent's shutdown; a list in flight is not waited for)."""
        self._stop.set()
        for inf in self.informers.values():
            inf.abort()
        deadline = time.monotonic() + timeout
        for inf in self.informers.values():
            inf.thread.join(max(0.0, deadline - time.monotonic()))
        self.api.close()

    # Datastore -------------------------------------------------------------------------

    def cluster(self) -> ClusterConfig:
        return load_cluster_config(os.environ.get(CLUSTER_CONFIG_ENV))

    def revision(self) -> int:
        return self.cache.revision()

    def wait_synced(self, kinds: Iterable[str] | None = None,
                    timeout: float | None = None) -> bool:
        """True once each kind has been listed once (all kinds by default).

        Without `timeout`, waits as long as it takes, warning every 30 s with
        the kind's last error (see `objects`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for k in self.kinds if kinds is None else kinds:
            if deadline is None:
                self._wait_listed(k, None)
            elif not self.informers[k].synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _wait_listed(self, kind: str, timeout: float | None) -> None:
        """Until `kind`'s first list has completed (StoreError once `timeout` runs out)."""
        inf = self.informers[kind]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not inf.synced.wait(30.0 if deadline is None
                                  else max(0.0, min(30.0, deadline - time.monotonic()))):
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreError(f"{kind}s not listed from the API server within {timeout:g}s"
                                 f": {inf.last_error or 'no answer yet'}")
            LOG.warning("still waiting for the first list of %ss: %s", kind,
                        inf.last_error or "no answer yet")

    def objects(self, kind: str, timeout: float | None = None) -> list[Body]:
        """Current objects of `kind`, after its first list has completed.

        Blocks (warning every 30 s) rather than answering from an empty cache:
        an agent that took "nothing listed yet" for "nothing exists" would
        delete the flows of every live pod and peer. With `timeout`, raises
        StoreError when it runs out.
        """
        if kind not in self.informers:
            LOG.warning("objects(%r): kind not watched; nothing to return", kind)
            return []
        self._wait_listed(kind, timeout)
        return self.cache.objects(kind)  # decoded afresh: callers own them, as with Store

    def watch(self, since: int, callback: Callable[[list[Change]], None],
              stop: threading.Event, interval: float = 0.05) -> None:
        """Deliver the changes after `since` in batches until `stop` is set.

        Each object's newest change only: a watcher that falls behind gets
        where things are now, not every step on the way (as the embedded
        store's rows carry the current body). A failing callback gets the
        same batch again a second later, as with the embedded store, so a
        transient error never skips a change. The agent's callback raises only
        for such faults (StoreUnavailable): a change it cannot apply it skips
        and reports itself (controller/isolate.py), never stalling this loop.
        """
        rev = since
        while not stop.is_set():
            batch = self.cache.since(rev)
            if not batch:
                self.cache.wait_newer(rev, max(interval, 0.25))
                continue
            batch = self._settled(rev, batch, stop)
            try:
                callback(batch)  # decoded afresh by Cache.since: the callback's own
                rev = batch[-1].rev
            except Exception:
                LOG.exception("applying API changes after revision %d; retrying", rev)
                stop.wait(1.0)

    def _settled(self, rev: int, batch: list[Change], stop: threading.Event,
                 quiet: float = WATCH_SETTLE_S, most: float = WATCH_SETTLE_MAX_S) -> list[Change]:
        """`batch`, grown by the changes that follow it closely (a burst), then taken.

        Watch events arrive one line at a time, so a burst of 1,000 pod
        changes reached the callback as dozens of small batches, each a whole
        policy pass, bundle and datapath check (13.8 s against the embedded
        store's 4.3 s for the same burst, which polls). Waiting until no
        change came for `quiet` seconds (at most `most` in all) costs a lone
        change `quiet` and lets a burst be applied in a few passes.
        """
        deadline = time.monotonic() + most
        last = batch[-1].rev
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self.cache.wait_newer(last, min(quiet, left)):
                break
            last = self.cache.revision()
        return self.cache.since(rev) if last != batch[-1].rev else batch

    # nodes -------------------------------------------------------------------------------

    def _node(self, name: str) -> Body:
        """The usable Node `name`, waiting up to node_wait for it (or for its podCIDR)."""
        deadline = time.monotonic() + self.node_wait
        inf = self.informers.get("Node")
        if inf is None:
            raise StoreError("this datastore does not watch Nodes")
        if not inf.synced.wait(self.node_wait):
            raise StoreError(f"node {name}: Nodes not listed from the API server within "
                             f"{self.node_wait:g}s: {inf.last_error or 'no answer'}")
        while True:
            rev = self.cache.revision()
            body = self.cache.get("Node", ("", name))
            if body is not None:
                return body
            left = deadline - time.monotonic()
            if left <= 0:
                why = self.cache.skipped.get(("Node", ("", name)), "no Node of that name")
                raise StoreError(f"node {name}: {why} (waited {self.node_wait:g}s)")
            self.cache.wait_newer(rev, min(left, 1.0))

    def register_node(self, name: str, node_ip: str, pod_cidr: str | None = None) -> str:
        """This node's spec.podCIDR; read-only, since the controller manager allocates it.

        Waits up to node_wait for the Node to show up with a podCIDR (the
        kubelet registers it, then the controller manager fills it in).
        """
        body = self._node(name)
        cidr = body["podCIDR"]
        net = ipaddress.ip_network(cidr)
        if pod_cidr is not None:
            try:
                want = ipaddress.ip_network(pod_cidr)
            except ValueError as e:
                raise StoreError(f"node {name}: --pod-cidr {pod_cidr!r}: {e}") from e
            if want != net:
                raise StoreError(f"node {name}: --pod-cidr {pod_cidr} differs from the Node's "
                                 f"spec.podCIDR {cidr}; drop --pod-cidr with this datastore")
        cluster = ipaddress.ip_network(self.cluster().cluster_cidr)
        if net.version != cluster.version or not net.subnet_of(cluster):  # type: ignore[arg-type]
            raise StoreError(f"node {name}: spec.podCIDR {cidr} is outside cluster_cidr "
                             f"{cluster}; set cluster_cidr in {CLUSTER_CONFIG_ENV} to the "
                             "cluster's pod subnet")
        if body["nodeIP"] != node_ip:
            LOG.warning("node %s: --node-ip %s differs from its InternalIP %s, which peers "
                        "will tunnel to", name, node_ip, body["nodeIP"])
        return str(cidr)

    def node_ip(self, name: str) -> str:
        """A node's InternalIP (its tunnel endpoint for the peers)."""
        return str(self._node(name)["nodeIP"])

    def status(self) -> dict[str, Any]:
        """Per kind: listed yet, resourceVersion, object count, counters, last error."""
        return {k: {"synced": inf.synced.is_set(), "resourceVersion": inf.resource_version,
                    "objects": self.cache.count(k), **inf.stats,
                    "lastError": inf.last_error}
                for k, inf in self.informers.items()}
