"""Pod interface plumbing with pyroute2, run inside the agent.

A netlink socket is opened inside the pod's network namespace by switching
only the calling thread into it (setns is per thread) and straight back:
pyroute2's own netns support forks a helper process per socket, which costs
more than the rest of a CNI ADD.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class PodIfError(RuntimeError):
    """Plumbing failed; `code` is the CNI error code to report."""

    def __init__(self, msg: str, code: int = 5) -> None:
        super().__init__(msg)
        self.code = code


HOST_IF_PREFIX = "fcv"

# With the userspace datapath a pod's host-side veth is an ordinary interface
# of the node's network stack: OVS reads its frames through AF_PACKET, but the
# kernel also receives them, answers ARP for the node's own addresses with the
# veth's MAC and takes IP addressed to it, so pod traffic to the node could
# bypass the pipeline. These rules make the node's stack ignore the host ends
# (AF_PACKET sees frames before any netfilter hook, so OVS still gets them).
# The kernel datapath consumes port frames itself and needs none of this.
ISOLATION_RULES = f"""
table inet flowcni {{}}
delete table inet flowcni
table inet flowcni {{
  chain pre {{ type filter hook prerouting priority -300; iifname "{HOST_IF_PREFIX}*" drop; }}
  chain out {{ type filter hook output priority 0; oifname "{HOST_IF_PREFIX}*" drop; }}
}}
table arp flowcni {{}}
delete table arp flowcni
table arp flowcni {{
  chain in {{ type filter hook input priority 0; iifname "{HOST_IF_PREFIX}*" drop; }}
  chain out {{ type filter hook output priority 0; oifname "{HOST_IF_PREFIX}*" drop; }}
}}
"""


def isolate_host_ends() -> None:
    """Install ISOLATION_RULES in the current netns (atomically, idempotently)."""
    p = subprocess.run(["nft", "-f", "-"], input=ISOLATION_RULES, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise PodIfError(f"nft: {p.stderr.strip()}")


def host_ifname(container_id: str, ifname: str) -> str:
    """Deterministic host-side veth name: DEL finds it without any saved state."""
    return HOST_IF_PREFIX + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def netlink_socket_in(netns_path: str) -> socket.socket:
    """A NETLINK_ROUTE socket living in `netns_path`."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
        except OSError as e:
            raise PodIfError(f"CNI_NETNS {netns_path}: {e.strerror}", code=4) from e
        try:
            _setns(fd)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)
            finally:
                _setns(own)
        finally:
            os.close(fd)
    finally:
        os.close(own)


@contextmanager
def ipr_in(netns_path: str) -> Iterator[IPRoute]:
    ipr = IPRoute(use_socket=netlink_socket_in(netns_path))
    try:
        yield ipr
    finally:
        ipr.close()


@dataclass(frozen=True)
class PodIf:
    host_name: str
    mac: str


def create(container_id: str, netns: str, ifname: str, ip: str, prefixlen: int,
           gateway: str, mtu: int) -> PodIf:
    """Make the veth pair, the pod end named `ifname` inside `netns`, addressed and routed.

    On failure the host end (and with it the pod end) is removed.
    """
    host = host_ifname(container_id, ifname)
    try:
        nsfd = os.open(netns, os.O_RDONLY)
    except OSError as e:
        raise PodIfError(f"CNI_NETNS {netns}: {e.strerror}", code=4) from e
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                     peer={"ifname": ifname, "net_ns_fd": nsfd, "mtu": mtu})
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise PodIfError(f"interface {ifname} or {host} already exists "
                                 f"(CNI_IFNAME in {netns})", code=4) from e
            raise PodIfError(f"creating veth {host}: {e}") from e
        finally:
            os.close(nsfd)
        try:
            idx = ipr.link_lookup(ifname=host)[0]
            ipr.link("set", index=idx, state="up")
            with ipr_in(netns) as pipr:
                pidx = pipr.link_lookup(ifname=ifname)[0]
                mac = pipr.get_links(pidx)[0].get_attr("IFLA_ADDRESS")
                pipr.addr("add", index=pidx, address=ip, prefixlen=prefixlen)
                pipr.link("set", index=pidx, state="up")
                pipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=pidx)
        except Exception:
            delete(host)
            raise
    return PodIf(host, mac)


def delete(host_name: str) -> bool:
    """Remove the host end (the kernel removes the pod end). False if it was gone."""
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=host_name)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise
    return True


def exists(host_name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=host_name))


def check(netns: str, ifname: str, ip: str) -> str | None:
    """None if the pod interface is there with its address, else what is wrong."""
    try:
        with ipr_in(netns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return f"interface {ifname} missing in {netns}"
            addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx[0])]
            if ip not in addrs:
                return f"interface {ifname} in {netns} lacks address {ip} (has {addrs})"
    except PodIfError as e:
        return str(e)
    return None
