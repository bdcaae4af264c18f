"""Pod interface plumbing over raw rtnetlink (cni/rtnl.py), run inside the agent.

A netlink socket is opened inside the pod's network namespace by switching
only the calling thread into it (setns is per thread) and straight back:
pyroute2's own netns support forks a helper process per socket, which costs
more than the rest of a CNI ADD. pyroute2 itself is not used on this path:
its per-object event loops fragmented the agent's heap a little with every
pod (see cni/rtnl.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flowcni.cni import spec
from flowcni.cni.rtnl import NetlinkError, Rtnl

CLONE_NEWNET = 0x40000000
#: ioctl on a namespace file: which kind of namespace it is (linux/nsfs.h).
NS_GET_NSTYPE = 0xB703
_libc = ctypes.CDLL(None, use_errno=True)


class PodIfError(RuntimeError):
    """Plumbing failed; `code` is the CNI error code to report."""

    def __init__(self, msg: str, code: int = spec.ERR_IO_FAILURE) -> None:
        super().__init__(msg)
        self.code = code


def check_netns(path: str) -> None:
    """Raise (code 4, naming CNI_NETNS) unless `path` is a network namespace the agent sees.

    A regular file, a directory or /dev/null opens fine and only fails later,
    deep in setns or in creating the veth, as "Invalid argument"; asking the
    kernel what the file is says what is wrong before anything is created.
    The agent may live in another mount namespace than the runtime, so a path
    the plugin saw can still be missing here.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PodIfError(f"CNI_NETNS {path} cannot be opened by the flowcni agent: "
                         f"{e.strerror}", code=spec.ERR_INVALID_ENV) from e
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = -1
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise PodIfError(f"CNI_NETNS {path} is not a network namespace",
                         code=spec.ERR_INVALID_ENV)


def same_netns(a: str, b: str) -> bool:
    """Whether two netns paths name one namespace (/run/netns/x and /proc/PID/ns/net may)."""
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def has_default_route(netns: str) -> bool:
    """Whether the pod already routes 0.0.0.0/0 (an earlier interface owns it)."""
    with rtnl_in(netns) as nl:
        return nl.has_default_route()


HOST_IF_PREFIX = "fcv"

def host_ifname(container_id: str, ifname: str) -> str:
    """Deterministic host-side veth name: DEL finds it without any saved state."""
    return HOST_IF_PREFIX + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def socket_in(netns_path: str, family: int = socket.AF_NETLINK,
              type_: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
    """A socket living in `netns_path` (the netns is fixed when a socket is created)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
        except OSError as e:
            raise PodIfError(f"CNI_NETNS {netns_path}: {e.strerror}",
                             code=spec.ERR_INVALID_ENV) from e
        try:
            _setns(fd)
            try:
                return socket.socket(family, type_, proto)
            finally:
                _setns(own)
        finally:
            os.close(fd)
    finally:
        os.close(own)


SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


def set_tx_checksum(netns_path: str, ifname: str, on: bool) -> None:
    """ethtool -K IFNAME tx on|off inside the pod.

    Turning tx checksum offload off also turns off TSO/GSO for the device.
    Tunnels of the userspace datapath (OVS 3.1) drop packets that still
    carry offload flags, so pods of an encapsulating cluster send finished
    packets instead.
    """
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, int(on)))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value))
    with socket_in(netns_path, socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)


@contextmanager
def rtnl_in(netns_path: str) -> Iterator[Rtnl]:
    """An rtnetlink client inside `netns_path`, closed on exit."""
    with Rtnl(socket_in(netns_path)) as nl:
        yield nl


@dataclass(frozen=True)
class PodIf:
    host_name: str
    host_mac: str
    mac: str


def create(container_id: str, netns: str, ifname: str, ip: str, prefixlen: int,
           gateway: str, mtu: int, tx_offload: bool = True, default_route: bool = True,
           mac: str | None = None) -> PodIf:
    """Make the veth pair, the pod end named `ifname` inside `netns`, addressed and routed.

    `default_route`: whether this interface carries the pod's default route
    (the first interface of a pod does; a second one, Multus-style, only
    reaches its own subnet). `mac`: the pod end's address when the runtime
    asked for one. On failure the host end (and with it the pod end) is removed.
    """
    host = host_ifname(container_id, ifname)
    try:
        nsfd = os.open(netns, os.O_RDONLY)
    except OSError as e:
        raise PodIfError(f"CNI_NETNS {netns}: {e.strerror}", code=spec.ERR_INVALID_ENV) from e
    with Rtnl() as nl:
        try:
            nl.add_veth(host, mtu, ifname, nsfd, peer_mac=mac)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                raise PodIfError(f"interface {ifname} or {host} already exists "
                                 f"(CNI_IFNAME in {netns})", code=spec.ERR_INVALID_ENV) from e
            raise PodIfError(f"creating veth {host}: {e}") from e
        finally:
            os.close(nsfd)
        try:
            link = nl.link(host)
            if link is None:
                raise PodIfError(f"veth {host} vanished right after it was made")
            nl.set_up(link.index)
            host_mac = link.mac
            with rtnl_in(netns) as pnl:
                plink = pnl.link(ifname)
                if plink is None:
                    raise PodIfError(f"veth peer {ifname} missing in {netns}")
                pod_mac = plink.mac
                pnl.add_address(plink.index, ip, prefixlen)
                pnl.set_up(plink.index)
                if default_route:
                    pnl.replace_default_route(gateway, plink.index)
            if not tx_offload:
                set_tx_checksum(netns, ifname, False)
        except Exception:
            delete(host)
            raise
    return PodIf(host, host_mac, pod_mac)


def delete(host_name: str) -> bool:
    """Remove the host end (the kernel removes the pod end). False if it was gone."""
    with Rtnl() as nl:
        try:
            nl.delete_link(host_name)
        except NetlinkError as e:
            if e.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise
    return True


def exists(host_name: str) -> bool:
    with Rtnl() as nl:
        return nl.link(host_name) is not None


def check(netns: str, ifname: str, ip: str) -> str | None:
    """None if the pod interface is there with its address, else what is wrong."""
    try:
        with rtnl_in(netns) as nl:
            link = nl.link(ifname)
            if link is None:
                return f"interface {ifname} missing in {netns}"
            addrs = nl.addresses(link.index)
            if ip not in addrs:
                return f"interface {ifname} in {netns} lacks address {ip} (has {addrs})"
    except PodIfError as e:
        return str(e)
    return None
