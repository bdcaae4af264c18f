"""A minimal rtnetlink client (stdlib only) for the few calls a pod's interface needs.

Why not pyroute2 here: every ``IPRoute`` builds an asyncio event loop,
thread-local state and protocol objects, and the agent makes several per
CNI ADD/DEL, each on a fresh request thread. That churn fragments glibc's
per-thread malloc arenas: in a loop of fresh threads each making three
``IPRoute`` lookups, RSS grew ~0.6 MB per 1,000 iterations after a warm-up
while malloc's in-use bytes stayed flat (+6 KB) and ``malloc_trim(0)`` gave
nothing back; the same loop on a raw netlink socket grew 12 KB. The soak
(bench/cni_soak.py) showed the agent's RSS growing ~3 KB per pod for the
same reason. One request, one reply, no objects kept: nothing here outlives
the call.

Messages follow rtnetlink(7): a ``nlmsghdr``, the family header
(``ifinfomsg``/``ifaddrmsg``/``rtmsg``) and 4-byte aligned attributes.
Every request asks for an ACK, so an error always comes back as
:class:`NetlinkError` carrying the kernel's errno (``code``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NLMSG_ERROR = 2
NLMSG_DONE = 3

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST = 1

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTN_UNSPEC = 0
RTN_UNICAST = 1

_HDR = struct.Struct("=IHHII")        # nlmsghdr
_IFINFO = struct.Struct("=BxHiII")    # ifinfomsg
_IFADDR = struct.Struct("=BBBBi")     # ifaddrmsg
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg
_NDMSG = struct.Struct("=BxxxiHBB")   # ndmsg
_ATTR = struct.Struct("=HH")
_RECV_BYTES = 65536
#: The kernel answers at once; a reply this late means something is badly wrong,
#: and a CNI request must fail rather than hang.
TIMEOUT_S = 10.0


class NetlinkError(OSError):
    """The kernel refused a request; `code` is its errno (as pyroute2's error has)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.code = code


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def parse_attrs(buf: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attributes from `offset` to the end of `buf`: {type: payload} (nested bit cleared)."""
    out: dict[int, bytes] = {}
    while offset + _ATTR.size <= len(buf):
        length, kind = _ATTR.unpack_from(buf, offset)
        if length < _ATTR.size:
            break
        out[kind & 0x3FFF] = bytes(buf[offset + _ATTR.size:offset + length])
        offset += _align(length)
    return out


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str
    up: bool
    mtu: int = 0


class Rtnl:
    """One NETLINK_ROUTE socket; `sock` may be one made inside another netns.

    Used as a context manager, the socket is closed on exit (it is closed
    even when it was passed in: the caller hands it over).
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.sock.settimeout(TIMEOUT_S)
            self.sock.bind((0, 0))
        except OSError:
            self.sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[tuple[int, bytes]]:
        """Send one message; return the (type, payload) replies before the ACK or DONE."""
        self._seq += 1
        seq = self._seq
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        flags |= NLM_F_REQUEST | (0 if dump else NLM_F_ACK)
        self.sock.send(_HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self.sock.recv(_RECV_BYTES)
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _mflags, mseq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    raise NetlinkError(94, f"{what}: malformed netlink reply")  # EBADMSG
                payload = data[off + _HDR.size:off + length]
                off += _align(length)
                if mseq != seq:
                    continue  # a stale reply of an earlier, abandoned request
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload)
                    if err:
                        raise NetlinkError(-err, what)
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append((mtype, payload))

    # -- links -------------------------------------------------------------

    @staticmethod
    def _link(payload: bytes) -> Link:
        _fam, _type, index, flags, _change = _IFINFO.unpack_from(payload)
        a = parse_attrs(payload, _IFINFO.size)
        mtu = a.get(IFLA_MTU)
        return Link(index=index, name=a.get(IFLA_IFNAME, b"\0").rstrip(b"\0").decode(),
                    mac=mac_text(a.get(IFLA_ADDRESS, b"")), up=bool(flags & IFF_UP),
                    mtu=struct.unpack("=I", mtu)[0] if mtu and len(mtu) == 4 else 0)

    def link(self, name: str | None = None, index: int = 0) -> Link | None:
        """The link named `name` (or with `index`), None if there is none."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        if name is not None:
            body += attr(IFLA_IFNAME, _name(name))
        try:
            replies = self.request(RTM_GETLINK, 0, body, f"get link {name or index}")
        except NetlinkError as e:
            if e.code in (19, 2):  # ENODEV, ENOENT
                return None
            raise
        return next((self._link(p) for t, p in replies if t == RTM_NEWLINK), None)

    def add_veth(self, name: str, mtu: int, peer_name: str, peer_netns_fd: int,
                 peer_mac: str | None = None) -> None:
        """`ip link add NAME mtu MTU type veth peer PEER netns FD [address MAC]`."""
        peer = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _name(peer_name))
                + attr(IFLA_MTU, struct.pack("=I", mtu))
                + attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd)))
        if peer_mac:
            peer += attr(IFLA_ADDRESS, bytes.fromhex(peer_mac.replace(":", "")))
        info = attr(IFLA_INFO_KIND, b"veth\0") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer))
        body = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _name(name))
                + attr(IFLA_MTU, struct.pack("=I", mtu)) + attr(IFLA_LINKINFO, info))
        self.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"add veth {name}")

    def set_up(self, index: int) -> None:
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        self.request(RTM_NEWLINK, 0, body, f"set link {index} up")

    def set_link(self, index: int, up: bool = True, mtu: int | None = None) -> None:
        """`ip link set INDEX up [mtu MTU]`."""
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        if mtu is not None:
            body += attr(IFLA_MTU, struct.pack("=I", mtu))
        self.request(RTM_NEWLINK, 0, body, f"set link {index}")

    def delete_link(self, name: str) -> None:
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, _name(name))
        self.request(RTM_DELLINK, 0, body, f"delete link {name}")

    # -- addresses and routes ----------------------------------------------

    def add_address(self, index: int, ip: str, prefixlen: int) -> None:
        raw = ipaddress.IPv4Address(ip).packed
        body = (_IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
                + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {ip}")

    def addresses(self, index: int) -> list[str]:
        """IPv4 addresses on the link with `index`."""
        body = _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)
        out = []
        for t, p in self.request(RTM_GETADDR, NLM_F_DUMP, body, "list addresses"):
            if t != RTM_NEWADDR:
                continue
            _fam, _plen, _flags, _scope, idx = _IFADDR.unpack_from(p)
            a = parse_attrs(p, _IFADDR.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if idx == index and raw and len(raw) == 4:
                out.append(str(ipaddress.IPv4Address(raw)))
        return out

    def all_addresses(self) -> list[tuple[str, int]]:
        """(IPv4 address, link index) of every address of the namespace."""
        body = _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)
        out = []
        for t, p in self.request(RTM_GETADDR, NLM_F_DUMP, body, "list addresses"):
            if t != RTM_NEWADDR:
                continue
            idx = _IFADDR.unpack_from(p)[4]
            a = parse_attrs(p, _IFADDR.size)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw and len(raw) == 4:
                out.append((str(ipaddress.IPv4Address(raw)), idx))
        return out

    def _main_routes(self) -> Iterator[tuple[int, int, dict[int, bytes]]]:
        """(prefix length, protocol, attributes) of each IPv4 route of the main table:
        the one dump `routes` and `has_default_route` read."""
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        for t, p in self.request(RTM_GETROUTE, NLM_F_DUMP, body, "list routes"):
            if t != RTM_NEWROUTE:
                continue
            _fam, dst_len, _s, _tos, table, rproto, _scope, _type, _fl = _RTMSG.unpack_from(p)
            a = parse_attrs(p, _RTMSG.size)
            tab = a.get(RTA_TABLE)
            if tab is not None:
                table = struct.unpack("=I", tab)[0]
            if table == RT_TABLE_MAIN:
                yield dst_len, rproto, a

    def routes(self, proto: int) -> list[str]:
        """Destinations ("10.0.0.0/24") of the main table's IPv4 routes of protocol `proto`."""
        out = []
        for dst_len, rproto, a in self._main_routes():
            if rproto == proto:
                dst = a.get(RTA_DST)
                out.append(f"{ipaddress.IPv4Address(dst) if dst else '0.0.0.0'}/{dst_len}")
        return out

    def route(self, op: str, dst: str, proto: int, gateway: str | None = None,
              oif: int | None = None, scope: int | None = None) -> None:
        """`ip route replace|del DST [via GATEWAY] [dev OIF] proto PROTO [scope SCOPE]`
        in the main table. A delete without `scope` matches the route whatever its scope."""
        net = ipaddress.IPv4Network(dst)
        if op == "replace":
            kind, flags, rtype = RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, RTN_UNICAST
            sc = RT_SCOPE_UNIVERSE if scope is None else scope
        elif op == "del":
            kind, flags, rtype = RTM_DELROUTE, 0, RTN_UNSPEC
            sc = RT_SCOPE_NOWHERE if scope is None else scope
        else:
            raise ValueError(f"route operation {op!r}: replace or del")
        body = (_RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, RT_TABLE_MAIN, proto, sc,
                            rtype, 0)
                + attr(RTA_DST, net.network_address.packed))
        if gateway:
            body += attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
        if oif is not None:
            body += attr(RTA_OIF, struct.pack("=I", oif))
        self.request(kind, flags, body, f"{op} route {dst}")

    def replace_default_route(self, gateway: str, oif: int) -> None:
        """`ip route replace default via GATEWAY dev OIF` in the main table."""
        body = (_RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                            RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
                + attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
                + attr(RTA_OIF, struct.pack("=I", oif)))
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, "replace default route")

    def has_default_route(self) -> bool:
        """Whether the main table holds an IPv4 default route."""
        return any(dst_len == 0 for dst_len, _proto, _a in self._main_routes())

    # -- neighbours --------------------------------------------------------

    def neighbours(self) -> list[tuple[str, int]]:
        """(IPv4 address, ifindex) of every entry of the neighbour table."""
        body = _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        out = []
        for t, p in self.request(RTM_GETNEIGH, NLM_F_DUMP, body, "list neighbours"):
            if t != RTM_NEWNEIGH:
                continue
            _fam, ifindex, _state, _flags, _type = _NDMSG.unpack_from(p)
            dst = parse_attrs(p, _NDMSG.size).get(NDA_DST)
            if dst and len(dst) == 4:
                out.append((str(ipaddress.IPv4Address(dst)), ifindex))
        return out

    def delete_neighbour(self, ip: str, ifindex: int) -> None:
        body = (_NDMSG.pack(socket.AF_INET, ifindex, 0, 0, 0)
                + attr(NDA_DST, ipaddress.IPv4Address(ip).packed))
        self.request(RTM_DELNEIGH, 0, body, f"delete neighbour {ip}")
