"""The few Ethernet/IPv4 frames the agent reads and writes itself, in the stdlib.

The agent builds two kinds of packet: the answer to a new connection to a
Service without endpoints (TCP RST, ICMP port unreachable; reject.py) and
live traceflow's probe (livetrace.py), and it reads the IPv4 header of the
packet-ins those produce. That is a few fixed headers. os-ken's packet
library does it too, but importing any of it loads the whole library (BGP,
OSPF, Zebra with its oslo.config options, ...: 6.5 MB of the agent's RSS);
see oskenlite.py, which keeps it out of the agent.

The frames are what os-ken's library writes for the same fields (identification
0, no IP or TCP options, Ethernet padded to its 60-byte minimum); the unit
tests compare the bytes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH_IPV4 = 0x0800
_VLAN_TPIDS = (0x8100, 0x88A8)
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
ICMP_ECHO_REQUEST = 8
ICMP_DEST_UNREACH, ICMP_PORT_UNREACH = 3, 3

_ETH_MIN_PAYLOAD = 46


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet frame, padded to the 60-byte minimum (without FCS)."""
    pad = b"\x00" * max(0, _ETH_MIN_PAYLOAD - len(payload))
    return _mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload + pad


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, tos: int = 0) -> bytes:
    """An IPv4 packet: a 20-byte header (no options, not fragmented) and `payload`."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 0, 0, ttl, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def _l4_checksum(src: str, dst: str, proto: int, segment: bytes) -> int:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(
        "!xBH", proto, len(segment))
    return checksum(pseudo + segment)


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
        window: int, payload: bytes = b"") -> bytes:
    """A TCP segment (no options) with its checksum over the IPv4 pseudo-header."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0) + payload
    return seg[:16] + struct.pack("!H", _l4_checksum(src, dst, PROTO_TCP, seg)) + seg[18:]


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with its checksum (a computed 0 is sent as 0xffff, RFC 768)."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _l4_checksum(src, dst, PROTO_UDP, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def icmp(type_: int, code: int, body: bytes) -> bytes:
    """An ICMP message: type, code, checksum, then `body` (rest of header and data)."""
    msg = struct.pack("!BBH", type_, code, 0) + body
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


@dataclass(frozen=True)
class IPv4:
    """An IPv4 packet found in a frame: the header fields the agent reads."""

    offset: int       #: where the IP header starts in the frame
    header_len: int   #: bytes
    tos: int
    proto: int
    src: str
    dst: str
    payload: bytes    #: up to the packet's total length (Ethernet padding cut off)


def parse_ipv4(frame: bytes) -> IPv4 | None:
    """The IPv4 packet in an Ethernet frame (behind VLAN tags, if any), or None."""
    off = 12
    while len(frame) >= off + 2:
        (ethertype,) = struct.unpack_from("!H", frame, off)
        if ethertype in _VLAN_TPIDS:
            off += 4
            continue
        off += 2
        break
    else:
        return None
    if ethertype != ETH_IPV4 or len(frame) < off + 20:
        return None
    ver_ihl, tos, total = struct.unpack_from("!BBH", frame, off)
    hlen = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or hlen < 20 or total < hlen or len(frame) < off + hlen:
        return None
    proto = frame[off + 9]
    src = socket.inet_ntoa(frame[off + 12:off + 16])
    dst = socket.inet_ntoa(frame[off + 16:off + 20])
    return IPv4(off, hlen, tos, proto, src, dst, bytes(frame[off + hlen:off + total]))


@dataclass(frozen=True)
class TCP:
    """The TCP header fields the agent reads, and the segment's payload length."""

    sport: int
    dport: int
    seq: int
    flags: int
    payload_len: int


def parse_tcp(segment: bytes) -> TCP | None:
    """The TCP header at the start of an IPv4 payload, or None if it is cut short."""
    if len(segment) < 20:
        return None
    sport, dport, seq, _ack, off, flags = struct.unpack_from("!HHIIBB", segment)
    hlen = (off >> 4) * 4
    if hlen < 20 or len(segment) < hlen:
        return None
    return TCP(sport, dport, seq, flags & 0x3F, len(segment) - hlen)
