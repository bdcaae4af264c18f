"""The os-ken app: OpenFlow connection to the node's bridge, request/reply by xid, bundles.

Who may be "the switch" is the security boundary of the agent: whoever holds
the OpenFlow session gets the full flow set and receives every later change,
so an impostor silently takes the node's pods off the network. The agent
therefore has no TCP endpoint at all. It listens on a unix socket in a
root-only directory (ovs-vswitchd connects to it as its controller
`unix:PATH`), accepts only peers whose credentials are root's (or its own), only
the datapath id it expects for its bridge, and never lets a second session
displace a live one: the newcomer is closed and the live session kept. When
the live session dies, ovs-vswitchd reconnects by itself (its controller
backoff), so the agent recovers without a restart.

os-ken runs with its native (threading) hub: no eventlet, no monkey
patching. Its event thread only records replies and hands connection changes
to the agent; every blocking exchange (bundle, barrier, stats) is made from
the agent's writer thread through `Switch`, which waits on a per-xid future.
Doing that wait on the event thread would deadlock, since the reply arrives
on it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flowcni.controller import oskenlite

os.environ.setdefault("OSKEN_HUB_TYPE", "native")
#: before anything from os-ken: only OpenFlow 1.3 is loaded (False: os-ken was already whole)
OSKEN_TRIMMED = oskenlite.install()

from flowcni.controller import ofwire  # noqa: E402
from os_ken import cfg  # noqa: E402
from os_ken.base import app_manager  # noqa: E402
from os_ken.controller import ofp_event  # noqa: E402
from os_ken.controller.controller import Datapath  # noqa: E402
from os_ken.controller.handler import (  # noqa: E402
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    set_ev_cls,
)
from os_ken.controller.ofp_handler import OFPHandler  # noqa: E402
from os_ken.lib import hub  # noqa: E402
from os_ken.ofproto import ofproto_v1_3  # noqa: E402

LOG = logging.getLogger(__name__)
_SEND_CHUNK = 1 << 16  # bytes of bundled messages per socket write


class OFError(RuntimeError):
    """The switch refused a message, or did not answer in time."""


class _Pending:
    def __init__(self, multipart: bool = False) -> None:
        self.event = threading.Event()
        self.replies: list[Any] = []
        self.error: Any = None
        self.multipart = multipart


#: Errors of messages sent without waiting (bundle adds) kept until claimed.
MAX_UNCLAIMED_ERRORS = 1024


class Switch:
    """One connected datapath; thread-safe for the agent's threads."""

    _xids = itertools.count(0x40000000)

    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.ofp = dp.ofproto
        self.parser = dp.ofproto_parser
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._errors: dict[int, Any] = {}
        self.alive = True

    def _xid(self) -> int:
        with self._lock:
            return next(self._xids) & 0xFFFFFFFF

    # -- called from the os-ken event thread -----------------------------------

    def on_reply(self, msg: Any) -> None:
        with self._lock:
            p = self._pending.get(msg.xid)
        if p is None:
            return
        p.replies.append(msg)
        more = getattr(msg, "flags", 0) & self.ofp.OFPMPF_REPLY_MORE if p.multipart else 0
        if not more:
            p.event.set()

    def on_error(self, msg: Any) -> None:
        with self._lock:
            p = self._pending.get(msg.xid)
            if p is None:
                # Kept for bundle() to collect by xid; an error for a message
                # nobody collects (a packet-out) must not stay forever.
                self._errors[msg.xid] = msg
                while len(self._errors) > MAX_UNCLAIMED_ERRORS:
                    del self._errors[next(iter(self._errors))]
        if p is not None:
            p.error = msg
            p.event.set()

    def on_dead(self) -> None:
        self.alive = False
        with self._lock:
            pend = list(self._pending.values())
        for p in pend:
            p.error = "connection lost"
            p.event.set()

    # -- called from agent threads ---------------------------------------------

    def send(self, msg: Any) -> int:
        if not self.alive:
            raise OFError("not connected to the switch")
        if msg.xid is None:
            msg.set_xid(self._xid())
        if not self.dp.send_msg(msg):
            raise OFError("connection to the switch is closing")
        return int(msg.xid)

    def _send_bytes(self, buf: bytes) -> None:
        """Queue already encoded messages (their xids set) for the switch."""
        if not self.alive:
            raise OFError("not connected to the switch")
        if not self.dp.send(buf):
            raise OFError("connection to the switch is closing")

    def request(self, msg: Any, timeout: float = 10.0, multipart: bool = False) -> list[Any]:
        msg.set_xid(self._xid())
        p = _Pending(multipart)
        with self._lock:
            self._pending[msg.xid] = p
        try:
            self.send(msg)
            if not p.event.wait(timeout):
                raise OFError(f"no reply to {type(msg).__name__} within {timeout}s")
        finally:
            with self._lock:
                self._pending.pop(msg.xid, None)
        if p.error is not None:
            raise OFError(describe_error(p.error))
        return p.replies

    def barrier(self, timeout: float = 10.0) -> None:
        self.request(self.parser.OFPBarrierRequest(self.dp), timeout)

    def bundle(self, msgs: Iterable[Any], timeout: float = 30.0) -> None:
        """Apply `msgs` atomically in one ONF bundle, or not at all.

        A message rejected when it is added to the bundle does not abort the
        commit by itself, so errors are collected by xid and checked after a
        barrier, and the bundle is discarded if any arrived.

        `msgs` may be a generator: each message is serialized as it is sent
        and dropped, so a full sync of 100,000 flows never holds 100,000
        messages at once. A message is an os-ken message or the bytes of one
        (controller.ofwire; its xid is set here).
        """
        it = iter(msgs)
        first = next(it, None)
        if first is None:
            return
        ofp, parser = self.ofp, self.parser
        bid = self._xid()
        flags = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED
        self.request(parser.ONFBundleCtrlMsg(self.dp, bid, ofp.ONF_BCT_OPEN_REQUEST,
                                             flags, []), timeout)
        xids: list[int] = []
        try:
            # Bundle-adds go out in chunks of about _SEND_CHUNK bytes: one
            # send-queue entry and one socket write per chunk instead of per
            # message (100,000 of them in a full sync).
            chunk: list[bytes] = []
            size = 0
            for m in itertools.chain((first,), it):
                xid = self._xid()
                if isinstance(m, bytes):
                    data = ofwire.bundle_add(bid, flags, xid, m)
                else:
                    add = parser.ONFBundleAddMsg(self.dp, bid, flags, m, [])
                    add.set_xid(xid)
                    add.serialize()
                    data = bytes(add.buf)
                xids.append(xid)
                chunk.append(data)
                size += len(data)
                if size >= _SEND_CHUNK:
                    self._send_bytes(b"".join(chunk))
                    chunk, size = [], 0
            if chunk:
                self._send_bytes(b"".join(chunk))
            self.barrier(timeout)
            errs = self._claim_errors(xids)
            if errs:
                raise OFError(f"{len(errs)} of {len(xids)} bundled messages refused; "
                              f"first: {describe_error(errs[0])}")
            self.request(parser.ONFBundleCtrlMsg(self.dp, bid, ofp.ONF_BCT_COMMIT_REQUEST,
                                                 flags, []), timeout)
        except Exception:
            self._claim_errors(xids)  # a bundle given up on leaves none behind
            if self.alive:
                try:
                    self.request(parser.ONFBundleCtrlMsg(
                        self.dp, bid, ofp.ONF_BCT_DISCARD_REQUEST, flags, []), timeout)
                except OFError:
                    pass
            raise

    def _claim_errors(self, xids: list[int]) -> list[Any]:
        with self._lock:
            return [self._errors.pop(x) for x in xids if x in self._errors]

    def packet_out(self, in_port: int, data: bytes) -> None:
        """Inject `data` as if it arrived on `in_port`, through the whole pipeline."""
        p, o = self.parser, self.ofp
        self.send(p.OFPPacketOut(self.dp, buffer_id=o.OFP_NO_BUFFER, in_port=in_port,
                                 actions=[p.OFPActionOutput(o.OFPP_TABLE, 0)], data=data))

    def flow_counts(self, queries: list[tuple[int, int, int]],
                    timeout: float = 10.0) -> list[int]:
        """How many flows each (table_id, cookie, cookie_mask) selects, in one round trip.

        One small aggregate reply each: the drift check dumps only tables whose
        counts are off (a 100,000-flow dump is parsed into os-ken objects on the
        event thread, which answers nothing else meanwhile, and held hundreds of MB).
        Every request goes out before any reply is awaited. The drift check
        counts each table twice under the flow writer's lock, and asking one
        at a time held that lock for some 50 round trips through the event
        thread, which a change arriving meanwhile waited out.
        """
        ofp, parser = self.ofp, self.parser
        pend: list[tuple[int, _Pending]] = []
        try:
            for table_id, cookie, cookie_mask in queries:
                req = parser.OFPAggregateStatsRequest(self.dp, 0, table_id, ofp.OFPP_ANY,
                                                      ofp.OFPG_ANY, cookie, cookie_mask,
                                                      parser.OFPMatch())
                req.set_xid(self._xid())
                p = _Pending(multipart=True)
                with self._lock:
                    self._pending[req.xid] = p
                pend.append((req.xid, p))
                self.send(req)
            deadline = time.monotonic() + timeout
            out = []
            for _, p in pend:
                if not p.event.wait(max(0.0, deadline - time.monotonic())):
                    raise OFError(f"no reply to {len(pend)} aggregate requests within {timeout}s")
                if p.error is not None:
                    raise OFError(describe_error(p.error))
                out.append(int(p.replies[0].body.flow_count))
            return out
        finally:
            with self._lock:
                for xid, _ in pend:
                    self._pending.pop(xid, None)

    def flow_stats(self, table_id: int | None = None, timeout: float = 30.0) -> list[Any]:
        ofp, parser = self.ofp, self.parser
        req = parser.OFPFlowStatsRequest(
            self.dp, 0, ofp.OFPTT_ALL if table_id is None else table_id,
            ofp.OFPP_ANY, ofp.OFPG_ANY, 0, 0, parser.OFPMatch())
        replies = self.request(req, timeout, multipart=True)
        return [s for r in replies for s in r.body]

    def group_packets(self, timeout: float = 30.0) -> dict[int, list[int]]:
        """{group id: packets each bucket took} (group stats)."""
        ofp, parser = self.ofp, self.parser
        replies = self.request(parser.OFPGroupStatsRequest(self.dp, 0, ofp.OFPG_ALL), timeout,
                               multipart=True)
        return {g.group_id: [b.packet_count for b in g.bucket_stats]
                for r in replies for g in r.body}

    def group_desc(self, timeout: float = 30.0) -> list[Any]:
        """Every group on the bridge (id, type, buckets)."""
        replies = self.request(self.parser.OFPGroupDescStatsRequest(self.dp, 0), timeout,
                               multipart=True)
        return [s for r in replies for s in r.body]


def describe_error(err: Any) -> str:
    if isinstance(err, str):
        return err
    if getattr(err, "experimenter", None) is not None:  # e.g. ONF bundle errors
        return (f"OpenFlow error type={err.type} experimenter={err.experimenter:#x} "
                f"exp_type={err.exp_type}")
    return f"OpenFlow error type={err.type} code={err.code}"


class FlowcniOFApp(app_manager.OSKenApp):  # type: ignore[misc]
    """Routes os-ken events to the agent's `listener` (connect / disconnect)."""

    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.switch: Switch | None = None
        self.on_connect: Callable[[Switch], None] | None = None
        self.on_disconnect: Callable[[Switch], None] | None = None
        self.on_packet_in: Callable[[Any], None] | None = None
        # The datapath id of the agent's bridge; sessions from any other are refused.
        self.expected_dpid: Callable[[], int | None] | None = None
        self._lock = threading.Lock()

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    def _state_change(self, ev: Any) -> None:
        dp = ev.datapath
        if ev.state == MAIN_DISPATCHER:
            want = self.expected_dpid() if self.expected_dpid else None
            if want is not None and dp.id != want:
                LOG.error("refusing OpenFlow peer with datapath id %016x: the bridge's is "
                          "%016x", dp.id or 0, want)
                dp.close()
                return
            with self._lock:
                cur = self.switch
                if cur is not None and cur.alive and cur.dp.is_active:
                    refused = True
                else:
                    refused = False
                    self.switch = sw = Switch(dp)
            if refused:
                # A live session is never displaced: if it is really dead, its
                # echo timeout ends it and ovs-vswitchd reconnects.
                LOG.error("refusing a second OpenFlow session for datapath %016x while "
                          "one is live", dp.id or 0)
                dp.close()
                return
            if cur is not None:
                cur.on_dead()
            LOG.info("switch %016x connected", dp.id or 0)
            if self.on_connect:
                self.on_connect(sw)
        elif ev.state == DEAD_DISPATCHER:
            with self._lock:
                cur = self.switch
                if cur is None or cur.dp is not dp:
                    return
                self.switch = None
            cur.on_dead()
            LOG.warning("switch disconnected")
            if self.on_disconnect:
                self.on_disconnect(cur)

    def _current(self, dp: Any) -> Switch | None:
        sw = self.switch
        return sw if sw is not None and sw.dp is dp else None

    @set_ev_cls(ofp_event.EventOFPErrorMsg, MAIN_DISPATCHER)
    def _error(self, ev: Any) -> None:
        sw = self._current(ev.msg.datapath)
        if sw:
            sw.on_error(ev.msg)

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev: Any) -> None:
        if self.on_packet_in is not None:
            self.on_packet_in(ev.msg)

    @set_ev_cls([ofp_event.EventOFPBarrierReply, ofp_event.EventONFBundleCtrlMsg,
                 ofp_event.EventOFPFlowStatsReply, ofp_event.EventOFPGroupDescStatsReply,
                 ofp_event.EventOFPGroupStatsReply, ofp_event.EventOFPAggregateStatsReply],
                MAIN_DISPATCHER)
    def _reply(self, ev: Any) -> None:
        sw = self._current(ev.msg.datapath)
        if sw:
            sw.on_reply(ev.msg)


class _UnixSocket(socket.socket):
    """An accepted unix stream socket that os-ken's Datapath can take.

    Datapath sets TCP_NODELAY on whatever socket it gets; that option has no
    meaning on a unix socket, so it is ignored here.
    """

    def setsockopt(self, level: int, optname: int, value: Any, *rest: Any) -> None:
        if level == socket.IPPROTO_TCP:
            return
        super().setsockopt(level, optname, value, *rest)


class UnixOFPHandler(OFPHandler):  # type: ignore[misc]
    """os-ken's handshake handler without its TCP listener (we accept on a unix socket)."""

    def start(self) -> Any:
        return app_manager.OSKenApp.start(self)


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def private_dir(path: str) -> None:
    """Make `path` a directory only root (the agent's user) can enter.

    An existing directory owned by someone else is refused: whoever owns it
    could swap the socket for their own.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OFError(f"{path} is not a directory owned by uid {os.geteuid()}: refusing to "
                      "put the OpenFlow socket there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


class UnixListener:
    """Accepts ovs-vswitchd's controller connections on a unix socket in a private dir."""

    def __init__(self, path: str) -> None:
        self.path = path
        private_dir(os.path.dirname(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.listen(16)

    def serve_forever(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            uid = peer_uid(conn)
            if uid not in (0, os.geteuid()):
                LOG.error("refusing OpenFlow peer with uid %d on %s", uid, self.path)
                conn.close()
                continue
            sock = _UnixSocket(socket.AF_UNIX, socket.SOCK_STREAM, 0, conn.detach())
            hub.spawn(_serve, sock, self.path)

    def close(self) -> None:
        self.sock.close()


class _Datapath(Datapath):  # type: ignore[misc]
    """os-ken's Datapath, reporting its death as soon as the peer hangs up.

    os-ken reports DEAD only after its echo thread wakes up (up to
    echo_request_interval later); until then a reconnecting ovs-vswitchd
    would find the old session still live and be refused.
    """

    def _recv_loop(self) -> None:
        try:
            super()._recv_loop()
        finally:
            self.set_state(DEAD_DISPATCHER)


def _serve(sock: socket.socket, address: str) -> None:
    with contextlib.closing(_Datapath(sock, address)) as dp:
        try:
            dp.serve()
        except Exception:
            LOG.exception("OpenFlow session on %s failed", address)


def controller_target(socket_path: str) -> str:
    """The Controller row target that makes ovs-vswitchd connect to our socket."""
    return f"unix:{socket_path}"


def start(socket_path: str, dpid: int) -> FlowcniOFApp:
    """Start os-ken (handshake handler and our app) and our unix listener; return the app.

    Only sessions from datapath `dpid` are accepted."""
    if OSKEN_TRIMMED:
        LOG.info("os-ken loaded trimmed: OpenFlow 1.3 only, packet library on demand")
    else:
        LOG.warning("os-ken loaded whole (it was imported before flowcni.controller.ofapp): "
                    "about 12 MB more RSS")
    conf = cfg.CONF
    conf(args=[], project="os_ken")
    conf.set_override("echo_request_interval", 2.0)
    conf.set_override("maximum_unreplied_echo_requests", 3)
    mgr = app_manager.AppManager.get_instance()
    mgr.load_apps([__name__])
    # os-ken pulls in its handshake handler, which would listen on TCP 6653:
    # the same handler minus the listener takes its place.
    mgr.applications_cls["os_ken.controller.ofp_handler"] = UnixOFPHandler
    contexts = mgr.create_contexts()
    mgr.instantiate_apps(**contexts)
    app = mgr.applications["FlowcniOFApp"]
    assert isinstance(app, FlowcniOFApp)
    app.expected_dpid = lambda: dpid
    listener = UnixListener(socket_path)
    threading.Thread(target=listener.serve_forever, name="of-listen", daemon=True).start()
    return app
