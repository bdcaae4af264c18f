"""The answers the agent sends for a Service port without endpoints (pure packet logic)."""

from __future__ import annotations

from flowcni.controller.reject import answer
from os_ken.lib.packet import ethernet, icmp, ipv4, packet, tcp, udp

CLIENT_MAC, ROUTER_MAC = "0a:00:00:00:00:02", "aa:bb:cc:dd:ee:ff"


def frame(l4: object, proto: int, payload: bytes = b"") -> bytes:
    p = packet.Packet()
    p.add_protocol(ethernet.ethernet(dst=ROUTER_MAC, src=CLIENT_MAC))
    p.add_protocol(ipv4.ipv4(src="10.244.1.2", dst="10.96.1.4", proto=proto))
    p.add_protocol(l4)
    if payload:
        p.add_protocol(payload)
    p.serialize()
    return bytes(p.data)


def test_syn_gets_a_reset_from_the_service_address() -> None:
    syn = frame(tcp.tcp(src_port=40000, dst_port=8080, seq=1000, bits=tcp.TCP_SYN), 6)
    out = packet.Packet(answer(syn))
    eth, ip, t = (out.get_protocol(c) for c in (ethernet.ethernet, ipv4.ipv4, tcp.tcp))
    assert (eth.src, eth.dst) == (ROUTER_MAC, CLIENT_MAC)
    assert (ip.src, ip.dst) == ("10.96.1.4", "10.244.1.2")
    assert (t.src_port, t.dst_port, t.ack) == (8080, 40000, 1001)
    assert t.bits == tcp.TCP_RST | tcp.TCP_ACK


def test_a_reset_is_never_answered() -> None:
    assert answer(frame(tcp.tcp(src_port=1, dst_port=2, bits=tcp.TCP_RST), 6)) is None


def test_udp_gets_port_unreachable_quoting_the_datagram() -> None:
    dgram = frame(udp.udp(src_port=40000, dst_port=53), 17, b"query")
    out = packet.Packet(answer(dgram))
    ip, ic = out.get_protocol(ipv4.ipv4), out.get_protocol(icmp.icmp)
    assert (ip.src, ip.dst, ip.proto) == ("10.96.1.4", "10.244.1.2", 1)
    assert (ic.type, ic.code) == (icmp.ICMP_DEST_UNREACH, icmp.ICMP_PORT_UNREACH_CODE)
    quoted = ic.data.data
    assert quoted == dgram[14:14 + 20 + 8]  # the offending IP header and 8 bytes after it
