"""The os-ken app: OpenFlow connection to the node's bridge, request/reply by xid, bundles.

os-ken runs with its native (threading) hub: no eventlet, no monkey
patching. Its event thread only records replies and hands connection changes
to the agent; every blocking exchange (bundle, barrier, stats) is made from
the agent's writer thread through `Switch`, which waits on a per-xid future.
Doing that wait on the event thread would deadlock, since the reply arrives
on it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("OSKEN_HUB_TYPE", "native")

from os_ken import cfg  # noqa: E402
from os_ken.base import app_manager  # noqa: E402
from os_ken.controller import ofp_event  # noqa: E402
from os_ken.controller.handler import (  # noqa: E402
    DEAD_DISPATCHER,
    MAIN_DISPATCHER,
    set_ev_cls,
)
from os_ken.ofproto import ofproto_v1_3  # noqa: E402

LOG = logging.getLogger(__name__)


class OFError(RuntimeError):
    """The switch refused a message, or did not answer in time."""


class _Pending:
    def __init__(self, multipart: bool = False) -> None:
        self.event = threading.Event()
        self.replies: list[Any] = []
        self.error: Any = None
        self.multipart = multipart


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
                self._errors[msg.xid] = msg
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

    def bundle(self, msgs: Sequence[Any], timeout: float = 30.0) -> None:
        """Apply `msgs` atomically in one ONF bundle, or not at all.

        A message rejected when it is added to the bundle does not abort the
        commit by itself, so errors are collected by xid and checked after a
        barrier, and the bundle is discarded if any arrived.
        """
        if not msgs:
            return
        ofp, parser = self.ofp, self.parser
        bid = self._xid()
        flags = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED
        self.request(parser.ONFBundleCtrlMsg(self.dp, bid, ofp.ONF_BCT_OPEN_REQUEST,
                                             flags, []), timeout)
        xids = []
        try:
            for m in msgs:
                add = parser.ONFBundleAddMsg(self.dp, bid, flags, m, [])
                xids.append(self.send(add))
            self.barrier(timeout)
            with self._lock:
                errs = [self._errors.pop(x) for x in xids if x in self._errors]
            if errs:
                raise OFError(f"{len(errs)} of {len(msgs)} bundled messages refused; "
                              f"first: {describe_error(errs[0])}")
            self.request(parser.ONFBundleCtrlMsg(self.dp, bid, ofp.ONF_BCT_COMMIT_REQUEST,
                                                 flags, []), timeout)
        except Exception:
            if self.alive:
                try:
                    self.request(parser.ONFBundleCtrlMsg(
                        self.dp, bid, ofp.ONF_BCT_DISCARD_REQUEST, flags, []), timeout)
                except OFError:
                    pass
            raise

    def packet_out(self, in_port: int, data: bytes) -> None:
        """Inject `data` as if it arrived on `in_port`, through the whole pipeline."""
        p, o = self.parser, self.ofp
        self.send(p.OFPPacketOut(self.dp, buffer_id=o.OFP_NO_BUFFER, in_port=in_port,
                                 actions=[p.OFPActionOutput(o.OFPP_TABLE, 0)], data=data))

    def flow_stats(self, table_id: int | None = None, timeout: float = 30.0) -> list[Any]:
        ofp, parser = self.ofp, self.parser
        req = parser.OFPFlowStatsRequest(
            self.dp, 0, ofp.OFPTT_ALL if table_id is None else table_id,
            ofp.OFPP_ANY, ofp.OFPG_ANY, 0, 0, parser.OFPMatch())
        replies = self.request(req, timeout, multipart=True)
        return [s for r in replies for s in r.body]

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
        self._lock = threading.Lock()

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    def _state_change(self, ev: Any) -> None:
        dp = ev.datapath
        if ev.state == MAIN_DISPATCHER:
            sw = Switch(dp)
            with self._lock:
                old, self.switch = self.switch, sw
            if old is not None:
                old.on_dead()
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
                 ofp_event.EventOFPFlowStatsReply, ofp_event.EventOFPGroupDescStatsReply],
                MAIN_DISPATCHER)
    def _reply(self, ev: Any) -> None:
        sw = self._current(ev.msg.datapath)
        if sw:
            sw.on_reply(ev.msg)


def start(listen_host: str, listen_port: int) -> FlowcniOFApp:
    """Start os-ken's OpenFlow listener and our app in this process; return the app."""
    conf = cfg.CONF
    conf(args=[], project="os_ken")
    conf.set_override("ofp_listen_host", listen_host)
    conf.set_override("ofp_tcp_listen_port", listen_port)
    conf.set_override("echo_request_interval", 5.0)
    conf.set_override("maximum_unreplied_echo_requests", 3)
    mgr = app_manager.AppManager.get_instance()
    mgr.load_apps(["os_ken.controller.ofp_handler", __name__])
    contexts = mgr.create_contexts()
    mgr.instantiate_apps(**contexts)
    app = mgr.applications["FlowcniOFApp"]
    assert isinstance(app, FlowcniOFApp)
    return app
