"""A stand-in Kubernetes API server: enough of list and watch for flowcni's informers.

It serves the six collections the agent reads (GET list, optionally paged
with limit/continue from one snapshot; GET one object; watch as chunked
newline-delimited JSON events with ADDED/MODIFIED/DELETED/BOOKMARK), keeps a
history of changes under one global resourceVersion, and answers 410 Gone
(an ERROR event, or an HTTP 410 if asked to) for a watch older than its
compaction point, as etcd-backed servers do. Tests drive it to misbehave on
purpose: drop every watch connection (optionally losing events in flight),
stall watches like a dead peer, compact history, hold lists back.

Pod exec (`/api/v1/namespaces/NS/pods/NAME/exec`) is served as the real server
does it: a WebSocket upgrade speaking the v4.channel.k8s.io subprotocol
(stdout on channel 1, stderr on 2, the exit status as a Status on 3). What
kubelet and the container runtime would do is stood in for by a command prefix
the test registers per pod (`set_exec`), e.g. `ip netns exec NODE-NS env ...`.

Two ways to run it:
- in-process: `FakeAPIServer().start()` serves on loopback from threads; its
  methods are the control API;
- as a process: `python3 -m tests.support.fakeapi --listen HOST:PORT --control
  SOCK` (from the repository root), controlled through a unix socket with
  `Control(SOCK)`, which has the same methods. A pathname unix socket is
  reachable from every network namespace, so a lab can run the server inside
  one of its namespaces and drive it from the host.

Plain HTTP, no authentication: `kubeconfig(url)` writes what the client needs.
As a process it can serve HTTPS instead (`--tls-cert/--tls-key`), for clients
that only speak TLS, like the in-cluster config of a pod's service account.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import queue
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    plural: str
    kind: str
    group_version: str  # "v1" or "group/version"
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"

    @property
    def path(self) -> str:
        return f"{self.prefix}/{self.plural}"


RESOURCES = {r.plural: r for r in (
    Resource("nodes", "Node", "v1", False),
    Resource("namespaces", "Namespace", "v1", False),
    Resource("pods", "Pod", "v1", True),
    Resource("networkpolicies", "NetworkPolicy", "networking.k8s.io/v1", True),
    Resource("services", "Service", "v1", True),
    Resource("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    Resource("tenantnetworks", "TenantNetwork", "flowcni.io/v1alpha1", False),
    Resource("adminnetworkpolicies", "AdminNetworkPolicy", "policy.networking.k8s.io/v1alpha1",
             False),
    Resource("baselineadminnetworkpolicies", "BaselineAdminNetworkPolicy",
             "policy.networking.k8s.io/v1alpha1", False),
    Resource("clusternetworkpolicies", "ClusterNetworkPolicy",
             "policy.networking.k8s.io/v1alpha2", False),
)}
BY_KIND = {r.kind: r for r in RESOURCES.values()}

Key = tuple[str, str]


def resource(name: str) -> Resource:
    """A resource by plural ("pods") or kind ("Pod")."""
    r = RESOURCES.get(name) or BY_KIND.get(name)
    if r is None:
        raise ValueError(f"unknown resource {name!r} (have: {', '.join(RESOURCES)})")
    return r


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


DROP, STALL = object(), object()  # watch stream sentinels


@dataclass(eq=False)  # kept in a set by identity
class WatchStream:
    res: Resource
    namespace: str
    bookmarks: bool
    q: queue.Queue[Any] = field(default_factory=queue.Queue)


class FakeAPI:
    """The state and the control API, without HTTP (FakeAPIServer adds that)."""

    def __init__(self, gone_mode: str = "event", bookmark_interval: float = 1.0) -> None:
        self.lock = threading.RLock()
        self.rv = 1000  # like a real server, versions do not start at 1
        self.objects: dict[str, dict[Key, dict[str, Any]]] = {r: {} for r in RESOURCES}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, plural, type, obj
        self.compacted = 0
        self.watches: set[WatchStream] = set()
        self.request_log: list[dict[str, Any]] = []
        self.exec_prefix: dict[Key, list[str]] = {}
        self.lists_open = threading.Event()
        self.lists_open.set()
        self.watches_open = threading.Event()
        self.watches_open.set()
        self.snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.gone_mode = gone_mode
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = 1800
        # Plurals the server does not serve (a CRD not installed): 404, as a real one.
        self.absent: set[str] = set()
        # Plurals the client may not read (RBAC without them): 403, as a real server says it.
        self.forbidden: set[str] = set()

    # -- writes ----------------------------------------------------------------------

    def _key(self, res: Resource, obj: dict[str, Any]) -> Key:
        meta = obj.get("metadata")
        if not isinstance(meta, dict):  # malformed on purpose: keep it under a made-up key
            return "", f"malformed-{self.rv + 1}"
        ns = meta.get("namespace") or ("default" if res.namespaced else "")
        if res.namespaced:
            meta["namespace"] = ns
        return ns, meta["name"]

    def _publish(self, res: Resource, etype: str, obj: dict[str, Any]) -> None:
        self.history.append((self.rv, res.plural, etype, obj))
        for w in list(self.watches):
            if w.res is res and (not w.namespace or w.namespace == _ns_of(obj)):
                w.q.put({"type": etype, "object": obj})

    def put(self, res: str, obj: dict[str, Any], mode: str = "put") -> dict[str, Any]:
        """Create or update (mode "create"/"update" insist on one); returns the stored object."""
        r = resource(res)
        obj = copy.deepcopy(obj)
        with self.lock:
            key = self._key(r, obj)
            exists = key in self.objects[r.plural]
            if mode == "create" and exists:
                raise ApiError(409, "AlreadyExists", f"{r.plural} {key[1]} already exists")
            if mode == "update" and not exists:
                raise ApiError(404, "NotFound", f"{r.plural} {key[1]} not found")
            self.rv += 1
            obj.setdefault("apiVersion", r.group_version)
            obj.setdefault("kind", r.kind)
            meta = obj.get("metadata")
            if isinstance(meta, dict):
                meta["resourceVersion"] = str(self.rv)
                old = self.objects[r.plural].get(key, {}).get("metadata", {})
                meta.setdefault("uid", old.get("uid") or str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", old.get("creationTimestamp") or
                                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.objects[r.plural][key] = obj
            self._publish(r, "MODIFIED" if exists else "ADDED", obj)
            return copy.deepcopy(obj)

    def create(self, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.put(res, obj, "create")

    def put_many(self, res: str, objs: list[dict[str, Any]]) -> int:
        """Create or update many objects (one control call for a whole burst); returns how many."""
        for obj in objs:
            self.put(res, obj)
        return len(objs)

    def update(self, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.put(res, obj, "update")

    def delete(self, res: str, name: str, namespace: str = "") -> bool:
        r = resource(res)
        with self.lock:
            key = (namespace or ("default" if r.namespaced else ""), name)
            obj = self.objects[r.plural].pop(key, None)
            if obj is None:
                return False
            self.rv += 1
            obj = copy.deepcopy(obj)
            if isinstance(obj.get("metadata"), dict):
                obj["metadata"]["resourceVersion"] = str(self.rv)
            self._publish(r, "DELETED", obj)
            return True

    def set_exec(self, namespace: str, name: str, prefix: list[str]) -> None:
        """How to run a command in the containers of pod NAMESPACE/NAME (the part of
        kubelet and the container runtime): the command is appended to `prefix`."""
        with self.lock:
            self.exec_prefix[(namespace, name)] = list(prefix)

    def get(self, res: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        r = resource(res)
        with self.lock:
            obj = self.objects[r.plural].get((namespace or ("default" if r.namespaced else ""),
                                              name))
            return copy.deepcopy(obj)

    # -- misbehaviour on demand ------------------------------------------------------

    def drop_watches(self, lose_pending: bool = False) -> int:
        """Cut every open watch connection (no final chunk, as a crashed server would).

        With lose_pending, events queued but not yet written are lost too, so
        only a re-watch from the client's last resourceVersion recovers them.
        """
        with self.lock:
            streams = list(self.watches)
            self.watches.clear()
            for w in streams:
                if lose_pending:
                    _drain(w.q)
                w.q.put(DROP)
            return len(streams)

    def stall_watches(self) -> int:
        """Open watches go silent and stay open: the peer died without closing."""
        with self.lock:
            streams = list(self.watches)
            self.watches.clear()
            for w in streams:
                w.q.put(STALL)
            return len(streams)

    def compact(self) -> int:
        """Forget history up to now; older watches get 410 Gone. Returns the compaction rv."""
        with self.lock:
            self.compacted = self.rv
            self.history.clear()
            self.snapshots.clear()
            return self.compacted

    def bookmark(self) -> int:
        """A BOOKMARK with the current resourceVersion to every watch that allows them."""
        with self.lock:
            for w in self.watches:
                if w.bookmarks:
                    w.q.put(self._bookmark(w.res))
            return self.rv

    def _bookmark(self, res: Resource) -> dict[str, Any]:
        return {"type": "BOOKMARK", "object": {
            "kind": res.kind, "apiVersion": res.group_version,
            "metadata": {"resourceVersion": str(self.rv)}}}

    def pause_lists(self) -> None:
        """Hold list requests until resume_lists (an API server slow to answer)."""
        self.lists_open.clear()

    def resume_lists(self) -> None:
        self.lists_open.set()

    def pause_watches(self) -> None:
        """Hold new watch requests until resume_watches (clients stay disconnected)."""
        self.watches_open.clear()

    def resume_watches(self) -> None:
        self.watches_open.set()

    def set_gone_mode(self, mode: str) -> None:
        """How a too-old watch is refused: "event" (200 + ERROR event 410) or "http" (410)."""
        if mode not in ("event", "http"):
            raise ValueError(f"gone mode {mode!r}: event or http")
        self.gone_mode = mode

    def revision(self) -> int:
        with self.lock:
            return self.rv

    def watch_count(self) -> int:
        with self.lock:
            return len(self.watches)

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Requests served so far (method, path, query as a flat dict, time)."""
        with self.lock:
            return [dict(r) for r in self.request_log if path is None or r["path"] == path]

    def clear_requests(self) -> None:
        with self.lock:
            self.request_log.clear()

    # -- reads for the HTTP side ------------------------------------------------------

    def list(self, res: Resource, namespace: str, limit: int,
             cont: str | None) -> dict[str, Any]:
        if not self.lists_open.wait(60):
            raise ApiError(504, "Timeout", "lists held back for too long")
        with self.lock:
            if cont:
                snap = self.snapshots.pop(cont, None)
                if snap is None:
                    raise ApiError(410, "Expired", "the provided continue parameter is too old")
                rv, items = snap
            else:
                rv = self.rv
                items = [_strip_type(o) for k, o in sorted(self.objects[res.plural].items())
                         if not namespace or k[0] == namespace]
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                token = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
                self.snapshots[token] = (rv, items[limit:])
                items, meta["continue"] = items[:limit], token
            return {"kind": f"{res.kind}List", "apiVersion": res.group_version,
                    "metadata": meta, "items": items}

    def open_watch(self, res: Resource, namespace: str, rv_param: str | None,
                   bookmarks: bool) -> WatchStream:
        """Register a stream pre-loaded with what the client has not seen yet."""
        with self.lock:
            w = WatchStream(res, namespace, bookmarks)
            if rv_param in (None, "", "0"):  # "any": synthetic ADDED for the current state
                for k, obj in sorted(self.objects[res.plural].items()):
                    if not namespace or k[0] == namespace:
                        w.q.put({"type": "ADDED", "object": obj})
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    raise ApiError(400, "BadRequest",
                                   f"invalid resourceVersion {rv_param!r}") from None
                if since < self.compacted:
                    raise ApiError(410, "Expired", f"too old resource version: {since} "
                                   f"({self.compacted})")
                for rv, plural, etype, obj in self.history:
                    if rv > since and plural == res.plural and (
                            not namespace or _ns_of(obj) == namespace):
                        w.q.put({"type": etype, "object": obj})
            self.watches.add(w)
            return w

    def close_watch(self, w: WatchStream) -> None:
        with self.lock:
            self.watches.discard(w)

    def quiet_bookmark(self, w: WatchStream) -> dict[str, Any] | None:
        """A bookmark if nothing is queued for `w` (so it cannot overtake an event)."""
        with self.lock:
            return self._bookmark(w.res) if w.bookmarks and w.q.empty() else None


def _ns_of(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("namespace") or "") if isinstance(meta, dict) else ""


def _strip_type(obj: dict[str, Any]) -> dict[str, Any]:
    """List items carry no kind/apiVersion on a real server either."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _drain(q: queue.Queue[Any]) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


EXEC_RE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/exec$")
PATH_RE = re.compile(r"^(?P<prefix>/api/v1|/apis/[^/]+/[^/]+)"
                     r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")


def route(path: str) -> tuple[Resource, str, str | None]:
    """(resource, namespace filter, object name) of a GET path."""
    if path.startswith("/api/v1/namespaces/") and path.count("/") == 4:
        return RESOURCES["namespaces"], "", path.rsplit("/", 1)[1]  # GET one Namespace
    m = PATH_RE.match(path)
    r = RESOURCES.get(m.group("plural")) if m else None
    if m is None or r is None or r.prefix != m.group("prefix") or (
            m.group("ns") and not r.namespaced):
        raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                       f"({path})")
    return r, m.group("ns") or "", m.group("name")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib's name
        api = self.server.api
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with api.lock:
            api.request_log.append({"method": "GET", "path": url.path, "query": q,
                                    "time": time.time(),
                                    "auth": self.headers.get("Authorization")})
        try:
            m = EXEC_RE.match(url.path)
            if m:
                return self._exec(m["ns"], m["name"], parse_qs(url.query))
            res, ns, name = route(url.path)
            if res.plural in api.absent:
                raise ApiError(404, "NotFound", "the server could not find the requested "
                               f"resource ({url.path})")
            if res.plural in api.forbidden:
                verb = "watch" if q.get("watch") in ("true", "1") else "list"
                group = res.group_version.rpartition("/")[0]
                raise ApiError(403, "Forbidden", f'{res.plural}{"." + group if group else ""}'
                               ' is forbidden: User "system:serviceaccount:flowcni-system:'
                               f'flowcni" cannot {verb} resource "{res.plural}" in API group '
                               f'"{group}" at the cluster scope')
            if name is not None:
                obj = api.get(res.plural, name, ns)
                if obj is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
                return self._json(200, obj)
            if q.get("watch") in ("true", "1"):
                return self._watch(res, ns, q)
            limit = int(q.get("limit") or 0)
            self._json(200, api.list(res, ns, limit, q.get("continue") or None))
        except ApiError as e:
            self._json(e.code, status(e.code, e.reason, e.message))
        except (ValueError, KeyError) as e:
            self._json(400, status(400, "BadRequest", str(e)))

    def _exec(self, ns: str, name: str, q: dict[str, list[str]]) -> None:
        """Pod exec over a WebSocket (v4.channel.k8s.io), as the API server proxies it."""
        api = self.server.api
        pod = api.get("pods", name, ns)
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        containers = [c["name"] for c in pod.get("spec", {}).get("containers", [])]
        container = (q.get("container") or [containers[0] if containers else ""])[-1]
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod "
                           f"{name}")
        command = q.get("command") or []
        if not command:
            raise ApiError(400, "BadRequest", "you must specify at least 1 command")
        key = self.headers.get("Sec-WebSocket-Key")
        protos = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            raise ApiError(400, "BadRequest", "Upgrade request required")
        if "v4.channel.k8s.io" not in protos:
            raise ApiError(400, "BadRequest", f"unsupported subprotocols {protos}")
        with api.lock:
            prefix = api.exec_prefix.get((ns, name))
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("Sec-WebSocket-Protocol", "v4.channel.k8s.io")
        self.end_headers()
        self.close_connection = True
        if prefix is None:  # no runtime stands behind this pod: as if it had no container
            self._frame(3, json.dumps(status(500, "InternalError",
                                             f"container {container} not running")).encode())
        else:
            p = subprocess.run(prefix + command, capture_output=True, timeout=120)
            for chan, data in ((1, p.stdout), (2, p.stderr)):
                for i in range(0, len(data), 1 << 16):
                    self._frame(chan, data[i:i + (1 << 16)])
            st: dict[str, Any] = {"metadata": {}, "status": "Success"}
            if p.returncode != 0:
                st = {**status(500, "NonZeroExitCode",
                               f"command terminated with non-zero exit code: {p.returncode}"),
                      "details": {"causes": [{"reason": "ExitCode",
                                              "message": str(p.returncode)}]}}
            self._frame(3, json.dumps(st).encode())
        self.wfile.write(b"\x88\x02\x03\xe8")  # close, normal closure
        self.wfile.flush()

    def _frame(self, channel: int, data: bytes) -> None:
        """One unmasked binary WebSocket frame (server to client): channel byte + data."""
        payload = bytes([channel]) + data
        n = len(payload)
        head = b"\x82" + (bytes([n]) if n < 126 else b"\x7e" + n.to_bytes(2, "big")
                           if n < 1 << 16 else b"\x7f" + n.to_bytes(8, "big"))
        self.wfile.write(head + payload)

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, res: Resource, ns: str, q: dict[str, str]) -> None:
        api = self.server.api
        seconds = min(float(q.get("timeoutSeconds") or api.max_watch_seconds),
                      api.max_watch_seconds)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        if not api.watches_open.wait(60):
            raise ApiError(504, "Timeout", "watches held back for too long")
        try:
            w = api.open_watch(res, ns, q.get("resourceVersion"), bookmarks)
        except ApiError as e:
            if e.code != 410 or api.gone_mode == "http":
                raise
            self._start_stream()  # the real server answers 200, then an ERROR event
            self._chunk({"type": "ERROR", "object": status(410, e.reason, e.message)})
            self.wfile.write(b"0\r\n\r\n")
            return
        self._start_stream()
        deadline = time.monotonic() + seconds
        next_bookmark = time.monotonic() + api.bookmark_interval
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    bm = api.quiet_bookmark(w)
                    if bm:
                        self._chunk(bm)
                    break
                try:
                    ev = w.q.get(timeout=min(deadline, next_bookmark) - now)
                except queue.Empty:
                    if time.monotonic() >= next_bookmark:
                        bm = api.quiet_bookmark(w)
                        if bm:
                            self._chunk(bm)
                        next_bookmark = time.monotonic() + api.bookmark_interval
                    continue
                if ev is DROP:
                    return self._abort()
                if ev is STALL:
                    self.server.stopping.wait()
                    return self._abort()
                self._chunk(ev)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            api.close_watch(w)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _abort(self) -> None:
        """Close without the final chunk: the client sees the stream end prematurely."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], api: FakeAPI) -> None:
        self.api = api
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        self.stopping = threading.Event()
        super().__init__(addr, Handler)


class FakeAPIServer(FakeAPI):
    """The fake API server on a TCP address (loopback by default), served from threads."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.http = Server((host, port), self)
        self._thread = threading.Thread(target=self.http.serve_forever, args=(0.05,),
                                        name="fakeapi", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        scheme = "https" if isinstance(self.http.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://{host!s}:{port}"

    def use_tls(self, cert: str, key: str) -> None:
        """Serve HTTPS with this certificate (call before start)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.http.socket = ctx.wrap_socket(self.http.socket, server_side=True)

    def start(self) -> FakeAPIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.http.stopping.set()
        self.drop_watches()
        self.lists_open.set()
        self.watches_open.set()
        self.http.shutdown()
        with self.http.conns_lock:
            conns = list(self.http.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.http.server_close()

    def __enter__(self) -> FakeAPIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# -- control over a unix socket ------------------------------------------------------------

CONTROL_OPS = ("put", "put_many", "create", "update", "delete", "get", "drop_watches",
               "stall_watches",
               "compact", "bookmark", "pause_lists", "resume_lists", "pause_watches",
               "resume_watches", "set_gone_mode",
               "revision", "watch_count", "requests", "clear_requests", "set_exec")


class ControlServer(socketserver.ThreadingUnixStreamServer):
    """One JSON request per connection: {"op": NAME, "args": {...}} -> {"ok", "result"|"error"}."""

    daemon_threads = True

    def __init__(self, path: str, api: FakeAPI, on_shutdown: Callable[[], None]) -> None:
        self.api, self.on_shutdown = api, on_shutdown
        super().__init__(path, ControlHandler)


class ControlHandler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        try:
            req = json.loads(self.rfile.read())
            op, args = req["op"], req.get("args") or {}
            if op == "shutdown":
                reply: dict[str, Any] = {"ok": True, "result": None}
                threading.Thread(target=self.server.on_shutdown, daemon=True).start()
            elif op in CONTROL_OPS:
                reply = {"ok": True, "result": getattr(self.server.api, op)(**args)}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except ApiError as e:
            reply = {"ok": False, "error": f"{e.code} {e.reason}: {e.message}"}
        except Exception as e:  # the test on the other side wants to know why
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self.wfile.write(json.dumps(reply).encode())


class Control:
    """Drives a fakeapi process through its control socket; same methods as FakeAPI."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout

    def call(self, op: str, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(json.dumps({"op": op, "args": args}).encode())
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(b"".join(iter(lambda: s.recv(65536), b"")))
        if not reply["ok"]:
            raise RuntimeError(f"fakeapi {op}: {reply['error']}")
        return reply["result"]

    def put(self, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("put", res=res, obj=obj)
        return result

    def create(self, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("create", res=res, obj=obj)
        return result

    def update(self, res: str, obj: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.call("update", res=res, obj=obj)
        return result

    def delete(self, res: str, name: str, namespace: str = "") -> bool:
        return bool(self.call("delete", res=res, name=name, namespace=namespace))

    def get(self, res: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.call("get", res=res, name=name,
                                                  namespace=namespace)
        return result

    def drop_watches(self, lose_pending: bool = False) -> int:
        return int(self.call("drop_watches", lose_pending=lose_pending))

    def stall_watches(self) -> int:
        return int(self.call("stall_watches"))

    def compact(self) -> int:
        return int(self.call("compact"))

    def bookmark(self) -> int:
        return int(self.call("bookmark"))

    def pause_lists(self) -> None:
        self.call("pause_lists")

    def resume_lists(self) -> None:
        self.call("resume_lists")

    def pause_watches(self) -> None:
        self.call("pause_watches")

    def resume_watches(self) -> None:
        self.call("resume_watches")

    def set_gone_mode(self, mode: str) -> None:
        self.call("set_gone_mode", mode=mode)

    def revision(self) -> int:
        return int(self.call("revision"))

    def watch_count(self) -> int:
        return int(self.call("watch_count"))

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("requests", path=path)
        return result

    def clear_requests(self) -> None:
        self.call("clear_requests")

    def set_exec(self, namespace: str, name: str, prefix: list[str]) -> None:
        self.call("set_exec", namespace=namespace, name=name, prefix=prefix)

    def shutdown(self) -> None:
        self.call("shutdown")


# -- objects and kubeconfig ------------------------------------------------------------------

def kubeconfig(url: str) -> str:
    """A kubeconfig for the fake server: plain HTTP, no credentials."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }, indent=1)


def write_kubeconfig(path: str, url: str) -> str:
    with open(path, "w") as f:
        f.write(kubeconfig(url))
    return path


def node_obj(name: str, ip: str | None, pod_cidr: str | None,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node as the kubelet and the controller manager leave it."""
    addrs = [{"type": "Hostname", "address": name}]
    if ip:
        addrs.insert(0, {"type": "InternalIP", "address": ip})
    spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec,
            "status": {"addresses": addrs}}


def tenant_network_obj(name: str, spec: dict[str, Any],
                       created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": created}, "spec": spec}


def namespace_obj(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name,
                         "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}}}


def pod_obj(namespace: str, name: str, node: str, ip: str | None,
            labels: dict[str, str] | None = None,
            ports: list[dict[str, Any]] | None = None, phase: str = "Running",
            container: str = "main") -> dict[str, Any]:
    """A scheduled pod; `ip` None for one whose sandbox has no address yet."""
    st: dict[str, Any] = {"phase": phase}
    if ip:
        st.update(podIP=ip, podIPs=[{"ip": ip}])
    return {"metadata": {"namespace": namespace, "name": name, "labels": labels or {}},
            "spec": {"nodeName": node,
                     "containers": [{"name": container, "image": "busybox",
                                     "ports": ports or []}]},
            "status": st}


def policy_obj(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def service_obj(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "spec": spec}


def endpoint_slice_obj(namespace: str, name: str, service: str,
                       addresses: list[str], ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
            "ports": ports}


# -- as a process ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fakeapi", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve HTTP on")
    p.add_argument("--control", required=True, help="unix socket path for the control API")
    p.add_argument("--gone-mode", default="event", choices=["event", "http"])
    p.add_argument("--bookmark-interval", type=float, default=5.0)
    p.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    srv = FakeAPIServer(host, int(port), gone_mode=a.gone_mode,
                        bookmark_interval=a.bookmark_interval)
    if a.tls_cert:
        srv.use_tls(a.tls_cert, a.tls_key or a.tls_cert)
    done = threading.Event()
    if os.path.exists(a.control):
        os.unlink(a.control)
    ctl = ControlServer(a.control, srv, done.set)
    threading.Thread(target=ctl.serve_forever, args=(0.05,), name="control",
                     daemon=True).start()
    srv.start()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(json.dumps({"url": srv.url, "control": a.control}), flush=True)  # ready
    done.wait()
    ctl.shutdown()
    ctl.server_close()
    os.unlink(a.control)
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
