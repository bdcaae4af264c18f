"""What the agent keeps per pod it has seen must go when the pod goes."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from flowcni.controller.keylocks import KeyLocks
from flowcni.flows import model


def test_key_locks_are_dropped_when_idle() -> None:
    locks = KeyLocks()
    for i in range(1000):
        with locks.held(f"container{i}/eth0"):
            assert len(locks) == 1
    assert len(locks) == 0


def test_key_lock_excludes_and_survives_while_waited_for() -> None:
    locks = KeyLocks()
    locks.acquire("k")
    got = threading.Event()

    def waiter() -> None:
        with locks.held("k"):
            got.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not got.wait(0.2), "a second holder got the key while it was held"
    # Released from another thread, as a DEL's background teardown does.
    threading.Thread(target=locks.release, args=("k",)).start()
    t.join(10)
    assert got.is_set() and len(locks) == 0


def test_value_cache_holds_addresses_not_per_pod_macs() -> None:
    model._canon_address.cache_clear()
    for i in range(500):
        mac = f"AA:BB:CC:00:{i // 256:02X}:{i % 256:02X}"
        assert model._canon_value("eth_src", mac) == mac.lower()
        assert model._canon_value("ipv4_dst", "10.0.0.5") == "10.0.0.5"  # fast path
        assert model._canon_value("ipv4_dst", "10.0.0.0/24") == "10.0.0.0/24"
    assert model._canon_address.cache_info().currsize == 1


class _FakeDatapath:
    """Answers bundle open/commit/discard, refuses every bundled message, never
    answers a barrier: a bundle that is given up on after its adds were refused."""

    def __init__(self) -> None:
        from os_ken.ofproto import ofproto_v1_3, ofproto_v1_3_parser
        self.ofproto, self.ofproto_parser = ofproto_v1_3, ofproto_v1_3_parser
        self.switch: Any = None

    def send_msg(self, msg: Any) -> bool:
        p = self.ofproto_parser
        reply = SimpleNamespace(xid=msg.xid, flags=0)
        if isinstance(msg, p.ONFBundleAddMsg):
            self.switch.on_error(reply)
        elif isinstance(msg, p.ONFBundleCtrlMsg):
            self.switch.on_reply(reply)
        return True

    def send(self, buf: bytes) -> bool:
        """Bundle adds the switch sends already encoded (controller.ofwire): each refused."""
        from tests.support import ofdecode
        for xid, _bid, _inner in ofdecode.bundle_adds(buf):
            self.switch.on_error(SimpleNamespace(xid=xid, flags=0))
        return True


def test_switch_keeps_no_unclaimed_errors() -> None:
    from flowcni.controller.ofapp import MAX_UNCLAIMED_ERRORS, OFError, Switch
    dp = _FakeDatapath()
    sw = dp.switch = Switch(dp)
    parser = dp.ofproto_parser
    msgs = [parser.OFPFlowMod(dp, priority=i) for i in range(50)]
    with pytest.raises(OFError, match="no reply to OFPBarrierRequest"):
        sw.bundle(msgs, timeout=0.2)
    assert len(sw._errors) == 0, "refused adds of an abandoned bundle stayed behind"
    for xid in range(3 * MAX_UNCLAIMED_ERRORS):  # errors nobody waits for (packet-outs)
        sw.on_error(SimpleNamespace(xid=xid))
    assert len(sw._errors) == MAX_UNCLAIMED_ERRORS


def test_heap_is_trimmed_only_after_churn() -> None:
    import ctypes

    from flowcni.controller.heap import HeapTrimmer

    class M2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = M2
    h = HeapTrimmer(interval=0.05)
    assert h.available  # glibc here, as in the DaemonSet image
    assert not h.trim_if_due() and h.trims == 0  # nothing changed: no trim
    junk = [bytearray(n % 3000 + 16) for n in range(20000)]
    del junk[::2]  # free chunks between live ones, like request threads leave
    h.churned()
    assert h.trim_if_due() and h.trims == 1
    assert libc.mallinfo2().keepcost < 128 * 1024  # the arena's free top went back
    assert not h.trim_if_due() and h.trims == 1  # once per churn
    stop = threading.Event()
    t = threading.Thread(target=h.run, args=(stop,))
    t.start()
    h.churned()
    deadline = 100
    while h.trims < 2 and deadline:
        stop.wait(0.05)
        deadline -= 1
    stop.set()
    t.join()
    assert h.trims == 2
    del junk
