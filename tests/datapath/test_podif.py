"""Pod interface plumbing (cni/podif.py over cni/rtnl.py) against the kernel, checked with `ip`.

The calls run on a thread switched into a throwaway "node" namespace (setns
is per thread), so nothing is made in the test runner's own namespace; what
they did is read back with iproute2, not with the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from flowcni.cni import podif, spec
from flowcni.cni.rtnl import Rtnl

T = TypeVar("T")
RUN = os.environ.get("FLOWCNI_TEST_PREFIX", "fct")


def ip(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread whose network namespace is /run/netns/NAME."""
    box: dict[str, Any] = {}

    def body() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            podif._setns(fd)
            box["v"] = fn()
        except BaseException as e:  # handed to the caller
            box["e"] = e
        finally:
            os.close(fd)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]  # type: ignore[no-any-return]


@pytest.fixture
def spaces() -> Iterator[tuple[str, str]]:
    node, pod = f"{RUN}pi-node", f"{RUN}pi-pod"
    for n in (node, pod):
        subprocess.run(["ip", "netns", "del", n], capture_output=True)  # our own leftover
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        yield node, f"/run/netns/{pod}"
    finally:
        for n in (node, pod):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_create_check_delete(spaces: tuple[str, str]) -> None:
    node, pod = spaces
    pod_ns = os.path.basename(pod)
    assert not in_netns(node, lambda: podif.has_default_route(pod))
    pif = in_netns(node, lambda: podif.create("c1", pod, "eth0", "10.9.0.5", 24, "10.9.0.1",
                                              1400, mac="0a:58:0a:09:00:05"))
    host = ip("-n", node, "link", "show", pif.host_name)[0]
    assert host["address"] == pif.host_mac and "UP" in host["flags"] and host["mtu"] == 1400
    eth0 = ip("-n", pod_ns, "addr", "show", "eth0")[0]
    assert eth0["address"] == pif.mac == "0a:58:0a:09:00:05"
    assert "UP" in eth0["flags"] and eth0["mtu"] == 1400
    assert [(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["family"] == "inet"] \
        == [("10.9.0.5", 24)]
    routes = ip("-n", pod_ns, "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.9.0.1", "eth0")]
    assert in_netns(node, lambda: podif.has_default_route(pod))
    assert in_netns(node, lambda: podif.exists(pif.host_name))
    assert in_netns(node, lambda: podif.check(pod, "eth0", "10.9.0.5")) is None
    assert "lacks address 10.9.0.6" in str(in_netns(node, lambda: podif.check(pod, "eth0",
                                                                               "10.9.0.6")))
    assert "eth1 missing" in str(in_netns(node, lambda: podif.check(pod, "eth1", "10.9.0.5")))

    # a second interface: no default route of its own, an existing name is code 4
    in_netns(node, lambda: podif.create("c1", pod, "net1", "10.9.0.6", 24, "10.9.0.1", 1400,
                                        default_route=False))
    assert [r["dev"] for r in ip("-n", pod_ns, "route", "show", "default")] == ["eth0"]
    with pytest.raises(podif.PodIfError) as ei:
        in_netns(node, lambda: podif.create("c2", pod, "eth0", "10.9.0.7", 24, "10.9.0.1", 1400))
    assert ei.value.code == spec.ERR_INVALID_ENV and "already exists" in str(ei.value)
    assert not in_netns(node, lambda: podif.exists(podif.host_ifname("c2", "eth0")))

    assert in_netns(node, lambda: podif.delete(pif.host_name))
    assert not in_netns(node, lambda: podif.exists(pif.host_name))
    assert not in_netns(node, lambda: podif.delete(pif.host_name))
    assert [x["ifname"] for x in ip("-n", pod_ns, "link", "show")] == ["lo", "net1"]


def test_rtnl_error_carries_errno(spaces: tuple[str, str]) -> None:
    node, _ = spaces

    def add_twice() -> None:
        with Rtnl() as nl:
            lo = nl.link("lo")
            assert lo is not None and lo.index == 1
            nl.add_address(lo.index, "10.9.9.9", 32)
            assert "10.9.9.9" in nl.addresses(lo.index)
            nl.add_address(lo.index, "10.9.9.9", 32)
    with pytest.raises(OSError) as ei:
        in_netns(node, add_twice)
    assert getattr(ei.value, "code", None) == 17  # EEXIST
    def missing() -> object:
        with Rtnl() as nl:
            return nl.link("nosuchlink0")
    assert in_netns(node, missing) is None


def test_nudge_neighbors_drops_the_entry_and_asks_again(spaces: tuple[str, str]) -> None:
    """hostnet.nudge_neighbors over rtnl: the stale entry goes, a fresh resolution starts."""
    from flowcni.controller import hostnet
    node, _ = spaces
    for cmd in (["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                ["link", "set", "d0", "up"],
                ["addr", "add", "10.8.0.1/24", "dev", "d0"],
                ["neigh", "add", "10.8.0.9", "lladdr", "02:00:00:00:00:09", "dev", "d0",
                 "nud", "stale"],
                ["neigh", "add", "10.8.0.10", "lladdr", "02:00:00:00:00:0a", "dev", "d0",
                 "nud", "permanent"]):
        subprocess.run(["ip", "-n", node, *cmd], check=True)

    def listed() -> list[tuple[str, int]]:
        with Rtnl() as nl:
            return nl.neighbours()
    idx = ip("-n", node, "link", "show", "d0")[0]["ifindex"]
    assert {("10.8.0.9", idx), ("10.8.0.10", idx)} <= set(in_netns(node, listed))
    in_netns(node, lambda: hostnet.nudge_neighbors(["10.8.0.9"]))
    left = {n["dst"]: n.get("lladdr") for n in ip("-n", node, "neigh", "show", "dev", "d0")}
    assert left.get("10.8.0.9") is None  # gone, or being resolved afresh (no lladdr yet)
    assert left["10.8.0.10"] == "02:00:00:00:00:0a"


def test_proxy_routes_over_rtnl(spaces: tuple[str, str], monkeypatch: pytest.MonkeyPatch
                                ) -> None:
    """hostnet.sync_proxy_routes makes the proxy's /32 routes exactly the given set and
    touches no one else's, over cni/rtnl.py: a Service change builds no pyroute2 object
    (each one fragments the agent's heap, see controller/heap.py)."""
    from flowcni.controller import hostnet

    # any import of pyroute2 from here on raises ImportError (and hostnet holds none)
    monkeypatch.setitem(sys.modules, "pyroute2", None)
    assert not any(k.startswith("pyroute2") for k in vars(hostnet))
    node, _ = spaces
    for cmd in (["link", "add", "gw0", "type", "veth", "peer", "name", "gw1"],
                ["link", "set", "gw0", "up"],
                ["route", "add", "10.96.0.99/32", "dev", "gw0", "proto", "static"],
                ["route", "add", "10.96.7.0/24", "dev", "gw0", "proto", "192"]):
        subprocess.run(["ip", "-n", node, *cmd], check=True)

    def proxy_routes() -> dict[str, tuple[str, str]]:
        return {r["dst"]: (r["dev"], r.get("scope", "")) for r in
                ip("-n", node, "route", "show", "proto", str(hostnet.PROXY_RT_PROTO))}
    sync = hostnet.sync_proxy_routes
    assert in_netns(node, lambda: sync(["10.96.0.10", "10.96.0.11"], "gw0")) == (2, 1)
    assert proxy_routes() == {"10.96.0.10": ("gw0", "link"), "10.96.0.11": ("gw0", "link")}
    assert in_netns(node, lambda: sync(["10.96.0.11", "10.96.0.12"], "gw0")) == (1, 1)
    assert set(proxy_routes()) == {"10.96.0.11", "10.96.0.12"}
    assert in_netns(node, lambda: sync(["10.96.0.11", "10.96.0.12"], "gw0")) == (0, 0)
    static = ip("-n", node, "route", "show", "10.96.0.99")
    assert [r["dst"] for r in static] == ["10.96.0.99"]  # someone else's: kept
    with pytest.raises(hostnet.HostNetError, match="device nosuch0 missing"):
        in_netns(node, lambda: sync([], "nosuch0"))
    assert in_netns(node, lambda: sync([], "gw0")) == (0, 2)
    assert proxy_routes() == {}
