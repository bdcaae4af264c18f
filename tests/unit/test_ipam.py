"""Unit tests for flowcni.cni.ipam (no root, no OVS)."""

from __future__ import annotations

import json
import os
import threading
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from flowcni.cni import ipam as ipam_mod
from flowcni.cni.ipam import EXHAUSTED_CODE, IO_FAILURE_CODE, IPAM, IPAMError, first_host

CIDR = "10.244.1.0/24"
SMALL = "10.244.1.0/29"  # pool .2 - .6: five pod addresses


def ip(last_octet: int) -> IPv4Address:
    return IPv4Address(f"10.244.1.{last_octet}")


def read_checkpoint(path: Path) -> dict:
    return json.loads(path.read_text())


# -- layout ------------------------------------------------------------------


def test_first_host_is_gateway() -> None:
    assert first_host(CIDR) == ip(1)
    assert first_host("192.168.0.64/26") == IPv4Address("192.168.0.65")
    assert IPAM(CIDR, None).gateway == ip(1)


def test_gateway_network_broadcast_never_allocated() -> None:
    ipam = IPAM(SMALL, None)
    got = [ipam.allocate(f"c{i}/eth0") for i in range(5)]
    assert got == [ip(2), ip(3), ip(4), ip(5), ip(6)]
    assert ipam.gateway not in got
    assert ipam.capacity == 5


@pytest.mark.parametrize("cidr", ["10.244.1.0/31", "10.244.1.0/32"])
def test_too_small_cidr_rejected(cidr: str) -> None:
    with pytest.raises(ValueError, match=cidr):
        IPAM(cidr, None)


def test_slash30_has_one_pod_address() -> None:
    ipam = IPAM("10.244.1.0/30", None)
    assert ipam.allocate("a/eth0") == ip(2)
    with pytest.raises(IPAMError):
        ipam.allocate("b/eth0")


@pytest.mark.parametrize("cidr", ["10.244.1.5/24", "fd00::/64", "not-a-cidr"])
def test_invalid_cidr_rejected(cidr: str) -> None:
    with pytest.raises(ValueError, match="CIDR"):
        IPAM(cidr, None)


# -- allocation ----------------------------------------------------------------


def test_concurrent_allocations_are_distinct(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    ipam = IPAM(CIDR, str(path))
    n = 50
    barrier = threading.Barrier(n)
    results: dict[int, IPv4Address] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = ipam.allocate(f"ctr{i}/eth0", {"pod": f"p{i}"})
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    assert len(results) == n
    assert len(set(results.values())) == n
    net = IPv4Network(CIDR)
    assert all(a in net and a != ipam.gateway for a in results.values())
    assert {k: v[0] for k, v in ipam.leases().items()} == {
        f"ctr{i}/eth0": results[i] for i in range(n)
    }
    on_disk = read_checkpoint(path)["leases"]
    assert {k: IPv4Address(v["ip"]) for k, v in on_disk.items()} == {
        f"ctr{i}/eth0": results[i] for i in range(n)
    }


def test_exhaustion(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    ipam = IPAM(SMALL, str(path))
    for i in range(5):
        ipam.allocate(f"c{i}/eth0")
    before_disk = path.read_text()
    before = ipam.leases()

    with pytest.raises(IPAMError) as info:
        ipam.allocate("late/eth0")

    assert info.value.code == EXHAUSTED_CODE
    assert "10.244.1.0/29" in str(info.value)
    assert "5 addresses in use" in str(info.value)
    assert ipam.lease("late/eth0") is None
    assert ipam.leases() == before
    assert path.read_text() == before_disk
    # Freeing one address makes allocation possible again.
    assert ipam.release("c2/eth0") == ip(4)
    assert ipam.allocate("late/eth0") == ip(4)


def test_release_round_robin_and_wrap() -> None:
    ipam = IPAM(SMALL, None)
    assert ipam.allocate("a/eth0") == ip(2)
    assert ipam.allocate("b/eth0") == ip(3)
    assert ipam.allocate("c/eth0") == ip(4)

    assert ipam.release("a/eth0") == ip(2)
    assert ipam.lease("a/eth0") is None
    assert ipam.release("a/eth0") is None  # second DEL is harmless
    assert ipam.release("never/eth0") is None

    # .2 is free but must not be reused before the rest of the pool.
    assert ipam.allocate("d/eth0") == ip(5)
    assert ipam.allocate("e/eth0") == ip(6)
    # End of the pool: wrap around to the freed address.
    assert ipam.allocate("f/eth0") == ip(2)


def test_released_last_address_comes_back_only_when_everything_else_is_used() -> None:
    ipam = IPAM(SMALL, None)
    for i in range(4):
        ipam.allocate(f"c{i}/eth0")  # .2 - .5, last = .5
    assert ipam.release("c3/eth0") == ip(5)
    assert ipam.allocate("x/eth0") == ip(6)
    assert ipam.allocate("y/eth0") == ip(5)


def test_allocate_is_idempotent() -> None:
    ipam = IPAM(CIDR, None)
    first = ipam.allocate("a/eth0", {"pod": "one"})
    again = ipam.allocate("a/eth0", {"pod": "other"})
    assert again == first
    assert ipam.leases() == {"a/eth0": (first, {"pod": "one"})}
    # The repeated call did not advance the round-robin position.
    assert ipam.allocate("b/eth0") == first + 1


def test_leases_returns_copies() -> None:
    ipam = IPAM(CIDR, None)
    ipam.allocate("a/eth0", {"pod": "one"})
    snapshot = ipam.leases()
    snapshot["a/eth0"][1]["pod"] = "mutated"
    del snapshot["a/eth0"]
    assert ipam.leases() == {"a/eth0": (ip(2), {"pod": "one"})}


# -- persistence ---------------------------------------------------------------


def test_checkpoint_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ipam.json"  # directory created on first write
    ipam = IPAM(CIDR, str(path))
    ipam.allocate("a/eth0", {"pod": "ns/a"})
    ipam.allocate("b/eth0", {"pod": "ns/b"})
    ipam.allocate("c/eth0")
    ipam.release("c/eth0")

    data = read_checkpoint(path)
    assert data["version"] == 1
    assert data["cidr"] == CIDR
    assert data["last"] == "10.244.1.4"
    assert data["leases"]["a/eth0"] == {"ip": "10.244.1.2", "meta": {"pod": "ns/a"}}
    assert os.listdir(path.parent) == ["ipam.json"]  # no temp files left behind

    again = IPAM(CIDR, str(path))
    assert again.leases() == {
        "a/eth0": (ip(2), {"pod": "ns/a"}),
        "b/eth0": (ip(3), {"pod": "ns/b"}),
    }
    # Continues after "last" (.4, released) instead of reusing it.
    assert again.allocate("d/eth0") == ip(5)


def test_missing_checkpoint_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    ipam = IPAM(CIDR, str(path))
    assert ipam.leases() == {}
    assert not path.exists()  # nothing written until something changes


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        json.dumps({"version": 2, "cidr": CIDR, "last": "10.244.1.1", "leases": {}}),
        json.dumps({"version": 1, "cidr": CIDR, "last": "nope", "leases": {}}),
        json.dumps({"version": 1, "cidr": CIDR, "last": "10.244.1.1", "leases": []}),
        json.dumps(
            {
                "version": 1,
                "cidr": CIDR,
                "last": "10.244.1.1",
                "leases": {"a/eth0": {"ip": "10.244.1.1", "meta": {}}},  # the gateway
            }
        ),
        json.dumps(
            {
                "version": 1,
                "cidr": CIDR,
                "last": "10.244.1.1",
                "leases": {
                    "a/eth0": {"ip": "10.244.1.9", "meta": {}},
                    "b/eth0": {"ip": "10.244.1.9", "meta": {}},
                },
            }
        ),
    ],
    ids=["garbage", "empty", "list", "version", "last", "leases-list", "gateway", "duplicate"],
)
def test_corrupt_checkpoint_rejected(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ipam.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="corrupt") as info:
        IPAM(CIDR, str(path))
    assert str(path) in str(info.value)


def test_checkpoint_for_other_cidr_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    IPAM("10.244.2.0/24", str(path)).allocate("a/eth0")
    with pytest.raises(ValueError) as info:
        IPAM(CIDR, str(path))
    assert "10.244.2.0/24" in str(info.value)
    assert CIDR in str(info.value)


def test_failed_checkpoint_write_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ipam.json"
    ipam = IPAM(CIDR, str(path))
    ipam.allocate("a/eth0")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ipam_mod.os, "replace", broken_replace)
    with pytest.raises(IPAMError) as info:
        ipam.allocate("b/eth0")
    assert info.value.code == IO_FAILURE_CODE
    assert ipam.lease("b/eth0") is None
    with pytest.raises(IPAMError):
        ipam.release("a/eth0")
    assert ipam.lease("a/eth0") == ip(2)
    assert os.listdir(tmp_path) == ["ipam.json"]

    monkeypatch.undo()
    assert ipam.allocate("b/eth0") == ip(3)  # position did not move on the failed attempt


# -- restore and gc ------------------------------------------------------------


def test_restore_merges_and_reports_conflicts(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    IPAM(CIDR, str(path)).allocate("ckpt/eth0", {"pod": "ns/ckpt"})  # gets .2
    ipam = IPAM(CIDR, str(path))

    rejected = ipam.restore(
        {
            "ckpt/eth0": "10.244.1.2",  # same as checkpoint: fine, not a conflict
            "ovs-a/eth0": "10.244.1.3",  # new: merged
            "thief/eth0": "10.244.1.2",  # address held by the checkpoint's key
            "bad/eth0": "garbage",
            "gw/eth0": "10.244.1.1",
            "outside/eth0": "10.9.9.9",
            "zz-dup/eth0": "10.244.1.3",  # same address as an earlier extra entry
        }
    )

    assert rejected == ["bad/eth0", "gw/eth0", "outside/eth0", "thief/eth0", "zz-dup/eth0"]
    assert ipam.leases() == {
        "ckpt/eth0": (ip(2), {"pod": "ns/ckpt"}),
        "ovs-a/eth0": (ip(3), {}),
    }
    # Persisted, and the merged address is skipped by later allocations.
    assert IPAM(CIDR, str(path)).lease("ovs-a/eth0") == ip(3)
    assert ipam.allocate("new/eth0") == ip(4)


def test_restore_key_with_different_address_keeps_checkpoint() -> None:
    ipam = IPAM(CIDR, None)
    ipam.allocate("a/eth0")  # .2
    assert ipam.restore({"a/eth0": "10.244.1.50"}) == ["a/eth0"]
    assert ipam.lease("a/eth0") == ip(2)
    assert ipam.allocate("b/eth0") == ip(3)


def test_gc_releases_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    ipam = IPAM(SMALL, str(path))
    for name in ("a", "b", "c", "d"):
        ipam.allocate(f"{name}/eth0")  # .2 - .5

    released = ipam.gc({"b/eth0", "d/eth0", "gone/eth0"})

    assert released == ["a/eth0", "c/eth0"]
    assert {k: v[0] for k, v in ipam.leases().items()} == {"b/eth0": ip(3), "d/eth0": ip(5)}
    assert sorted(read_checkpoint(path)["leases"]) == ["b/eth0", "d/eth0"]
    assert ipam.gc({"b/eth0", "d/eth0"}) == []
    # The freed addresses are usable again (after the rest of the pool).
    got = {ipam.allocate(f"n{i}/eth0") for i in range(3)}
    assert got == {ip(6), ip(2), ip(4)}


# -- runtimeConfig ips and per-network GC (issue 13) -------------------------------------

def test_allocate_exact_gives_that_address_or_a_code_7_error() -> None:
    ipam = IPAM("10.244.1.0/24", None)
    assert ipam.allocate_exact("a/eth0", "10.244.1.77") == IPv4Address("10.244.1.77")
    assert ipam.allocate_exact("a/eth0", "10.244.1.77") == IPv4Address("10.244.1.77")
    for key, ip, words in [("b/eth0", "10.244.1.77", "in use"),
                           ("b/eth0", "10.244.2.5", "not assignable"),
                           ("b/eth0", "10.244.1.1", "not assignable"),
                           ("b/eth0", "10.244.1.255", "not assignable"),
                           ("b/eth0", "nope", "not an IPv4"),
                           ("a/eth0", "10.244.1.78", "already holds")]:
        with pytest.raises(IPAMError) as exc:
            ipam.allocate_exact(key, ip)
        assert exc.value.code == 7 and words in exc.value.msg, (ip, exc.value.msg)
    assert set(ipam.leases()) == {"a/eth0"}
    # The round-robin allocator skips the address taken on request.
    ipam2 = IPAM("10.244.1.0/24", None)
    ipam2.allocate_exact("x/eth0", "10.244.1.2")
    assert ipam2.allocate("y/eth0") == IPv4Address("10.244.1.3")


def test_gc_limited_to_owned_leases() -> None:
    ipam = IPAM("10.244.1.0/24", None)
    ipam.allocate("a/eth0", {"network": "one"})
    ipam.allocate("b/eth0", {"network": "two"})
    ipam.allocate("c/eth0", {})
    removed = ipam.gc(set(), lambda meta: meta.get("network", "") in ("one", ""))
    assert removed == ["a/eth0", "c/eth0"]
    assert set(ipam.leases()) == {"b/eth0"}
