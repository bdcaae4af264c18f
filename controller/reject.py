"""Answers for new connections to a Service port that has no endpoint.

kube-proxy rejects them (TCP RST, ICMP port unreachable) rather than
letting clients time out. OpenFlow cannot build either answer (a RST must
acknowledge the SYN's sequence number; an ICMP error quotes the packet), so
ServiceLB sends such packets to the agent, which writes the answer and puts
it out of the port the packet came in on, from the Service's address. It is
rate-limited, so a client hammering an empty Service costs the agent little.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flowcni.controller import frames
from flowcni.controller.ofapp import Switch

LOG = logging.getLogger(__name__)

MAX_PER_SECOND = 200


def answer(data: bytes) -> bytes | None:
    """The RST or ICMP port-unreachable for `data` (a new connection's first packet).

    Only untagged IPv4 frames are answered (ServiceLB sees no other)."""
    ip = frames.parse_ipv4(data)
    if ip is None or ip.offset != 14:
        return None
    client_mac, our_mac = data[6:12].hex(":"), data[0:6].hex(":")
    if ip.proto == frames.PROTO_TCP:
        t = frames.parse_tcp(ip.payload)
        if t is None or t.flags & frames.TCP_RST:
            return None  # never answer a reset
        # RFC 793: the reset acknowledges everything the segment occupied.
        ack = (t.seq + t.payload_len + (1 if t.flags & frames.TCP_SYN else 0)
               + (1 if t.flags & frames.TCP_FIN else 0)) & 0xFFFFFFFF
        l4 = frames.tcp(ip.dst, ip.src, t.dport, t.sport, seq=0, ack=ack,
                        flags=frames.TCP_RST | frames.TCP_ACK, window=0)
        proto = frames.PROTO_TCP
    else:
        if ip.proto == frames.PROTO_ICMP:
            return None  # no ICMP error about ICMP
        # The quoted packet: the offending IP header and the first 8 bytes after it
        # (after 4 bytes of the message's header that port unreachable leaves zero).
        quoted = data[14:14 + ip.header_len + 8]
        l4 = frames.icmp(frames.ICMP_DEST_UNREACH, frames.ICMP_PORT_UNREACH,
                         b"\x00" * 4 + quoted)
        proto = frames.PROTO_ICMP
    return frames.ethernet(client_mac, our_mac, frames.ETH_IPV4,
                           frames.ipv4(ip.dst, ip.src, proto, l4, ttl=64))


class Rejecter:
    """Packet-ins from ServiceLB -> answers sent back out of their in_port."""

    def __init__(self, switch: Callable[[], Switch | None]) -> None:
        self._switch = switch
        self._lock = threading.Lock()
        self._window = 0.0
        self._count = 0
        self.sent = 0

    def _allowed(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= 1.0:
                self._window, self._count = now, 0
            self._count += 1
            return self._count <= MAX_PER_SECOND

    def packet_in(self, msg: Any) -> None:
        """Called on os-ken's event thread: build and send, never wait."""
        sw = self._switch()
        if sw is None or not self._allowed():
            return
        try:
            reply = answer(bytes(msg.data))
        except Exception:  # a packet we cannot parse is not worth an answer
            LOG.debug("cannot answer packet-in", exc_info=True)
            return
        if reply is None:
            return
        in_port = dict(msg.match.items()).get("in_port")
        p, o = sw.parser, sw.ofp
        try:
            sw.send(p.OFPPacketOut(sw.dp, buffer_id=o.OFP_NO_BUFFER, in_port=o.OFPP_CONTROLLER,
                                   actions=[p.OFPActionOutput(in_port, 0)], data=reply))
            self.sent += 1
        except Exception:
            LOG.debug("cannot send reject", exc_info=True)
