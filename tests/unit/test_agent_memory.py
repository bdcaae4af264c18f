"""What the agent keeps per pod it has seen must go when the pod goes."""

from __future__ import annotations

import threading

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
