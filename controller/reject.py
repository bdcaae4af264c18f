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

from flowcni.controller.ofapp import Switch
from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp

LOG = logging.getLogger(__name__)

MAX_PER_SECOND = 200


def answer(data: bytes) -> bytes | None:
    """The RST or ICMP port-unreachable for `data` (a new connection's first packet)."""
    pkt = packet.Packet(data)
    eth = pkt.get_protocol(ethernet.ethernet)
    ip = pkt.get_protocol(ipv4.ipv4)
    if eth is None or ip is None:
        return None
    out = packet.Packet()
    out.add_protocol(ethernet.ethernet(dst=eth.src, src=eth.dst, ethertype=eth.ethertype))
    t = pkt.get_protocol(tcp.tcp)
    if t is not None:
        if t.bits & tcp.TCP_RST:
            return None  # never answer a reset
        out.add_protocol(ipv4.ipv4(src=ip.dst, dst=ip.src, proto=ip.proto, ttl=64))
        seg_len = len(pkt.protocols[-1]) if isinstance(pkt.protocols[-1], bytes) else 0
        ack = (t.seq + seg_len + (1 if t.bits & tcp.TCP_SYN else 0)
               + (1 if t.bits & tcp.TCP_FIN else 0)) & 0xFFFFFFFF
        out.add_protocol(tcp.tcp(src_port=t.dst_port, dst_port=t.src_port, seq=0, ack=ack,
                                 bits=tcp.TCP_RST | tcp.TCP_ACK, window_size=0))
    else:
        if ip.proto == 1:
            return None  # no ICMP error about ICMP
        # The quoted packet: the offending IP header and the first 8 bytes after it.
        raw_ip = data[14:14 + ip.header_length * 4 + 8]
        out.add_protocol(ipv4.ipv4(src=ip.dst, dst=ip.src, proto=1, ttl=64))
        out.add_protocol(icmp.icmp(type_=icmp.ICMP_DEST_UNREACH, code=icmp.ICMP_PORT_UNREACH_CODE,
                                   data=icmp.dest_unreach(data=raw_ip)))
    out.serialize()
    return bytes(out.data)


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
