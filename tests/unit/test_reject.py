"""The answers the agent sends for a Service port without endpoints (pure packet logic)."""

from __future__ import annotations

from flowcni.controller import frames
from flowcni.controller.frames import parse_ipv4
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


def test_a_reset_counts_the_payload_and_fin_it_acknowledges() -> None:
    seg = frame(tcp.tcp(src_port=40000, dst_port=80, seq=0xFFFFFFF0,
                        bits=tcp.TCP_SYN | tcp.TCP_FIN), 6, b"hello")
    t = packet.Packet(answer(seg)).get_protocol(tcp.tcp)
    assert t.ack == (0xFFFFFFF0 + 5 + 2) & 0xFFFFFFFF


def test_icmp_is_never_answered() -> None:
    ping = frame(icmp.icmp(type_=icmp.ICMP_ECHO_REQUEST, data=icmp.echo(id_=1, seq=1)), 1)
    assert answer(ping) is None


def test_answers_are_byte_for_byte_what_os_ken_builds() -> None:
    """The agent writes its answers with the stdlib (frames.py); os-ken's packet
    library is the reference for the bytes, checksums included."""
    syn = frame(tcp.tcp(src_port=40000, dst_port=8080, seq=7, bits=tcp.TCP_SYN), 6)
    ref = packet.Packet()
    ref.add_protocol(ethernet.ethernet(dst=CLIENT_MAC, src=ROUTER_MAC))
    ref.add_protocol(ipv4.ipv4(src="10.96.1.4", dst="10.244.1.2", proto=6, ttl=64))
    ref.add_protocol(tcp.tcp(src_port=8080, dst_port=40000, seq=0, ack=8,
                             bits=tcp.TCP_RST | tcp.TCP_ACK, window_size=0))
    ref.serialize()
    assert answer(syn) == bytes(ref.data)

    dgram = frame(udp.udp(src_port=40000, dst_port=53), 17, b"query")
    ref = packet.Packet()
    ref.add_protocol(ethernet.ethernet(dst=CLIENT_MAC, src=ROUTER_MAC))
    ref.add_protocol(ipv4.ipv4(src="10.96.1.4", dst="10.244.1.2", proto=1, ttl=64))
    ref.add_protocol(icmp.icmp(type_=icmp.ICMP_DEST_UNREACH, code=icmp.ICMP_PORT_UNREACH_CODE,
                               data=icmp.dest_unreach(data=dgram[14:14 + 20 + 8])))
    ref.serialize()
    assert answer(dgram) == bytes(ref.data)


def test_frames_that_are_not_plain_ipv4_get_no_answer() -> None:
    assert answer(b"") is None
    assert answer(b"\x00" * 60) is None  # ethertype 0
    syn = frame(tcp.tcp(src_port=40000, dst_port=8080, seq=1, bits=tcp.TCP_SYN), 6)
    assert answer(syn[:14 + 20 + 10]) is None  # TCP header cut short
    bad_version = syn[:14] + bytes([0x65]) + syn[15:]
    assert answer(bad_version) is None


def probe_reference(proto: str, dport: int | None, dscp: int) -> bytes:
    """The live-trace probe as it was built with os-ken's packet library."""
    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst=ROUTER_MAC, src=CLIENT_MAC, ethertype=0x0800))
    pkt.add_protocol(ipv4.ipv4(src="10.244.1.2", dst="10.244.2.3",
                               proto={"tcp": 6, "udp": 17, "icmp": 1}[proto], ttl=64,
                               tos=dscp << 2))
    if proto == "tcp":
        pkt.add_protocol(tcp.tcp(src_port=40001, dst_port=dport or 80, seq=1,
                                 bits=tcp.TCP_SYN, window_size=64240))
    elif proto == "udp":
        pkt.add_protocol(udp.udp(src_port=40001, dst_port=dport or 53))
        pkt.add_protocol(b"flowcni-traceflow")
    else:
        pkt.add_protocol(icmp.icmp(type_=icmp.ICMP_ECHO_REQUEST, code=0,
                                   data=icmp.echo(id_=0x7fc, seq=1, data=b"flowcni")))
    pkt.serialize()
    return bytes(pkt.data)


def test_live_trace_probes_are_what_os_ken_builds() -> None:
    from flowcni.controller.livetrace import probe_packet
    for proto, dport, dscp in [("tcp", None, 5), ("tcp", 8443, 63), ("udp", None, 1),
                               ("udp", 5353, 9), ("icmp", None, 17)]:
        got = probe_packet(CLIENT_MAC, ROUTER_MAC, "10.244.1.2", "10.244.2.3", proto, dport, dscp)
        assert got == probe_reference(proto, dport, dscp), (proto, dport, dscp)
        parsed = parse_ipv4(got)
        assert parsed is not None and parsed.tos >> 2 == dscp


def test_the_ipv4_header_is_found_behind_a_vlan_tag() -> None:
    untagged = probe_reference("udp", None, 12)
    tagged = untagged[:12] + b"\x81\x00\x00\x07" + untagged[12:]
    ip = parse_ipv4(tagged)
    assert ip is not None and (ip.offset, ip.tos >> 2, ip.src) == (18, 12, "10.244.1.2")


def test_a_udp_checksum_of_zero_is_sent_as_all_ones() -> None:
    """RFC 768: 0 means "no checksum", so a computed 0 goes out as 0xffff."""
    for port in range(1, 65536):  # find a payload whose checksum comes out 0
        seg = frames.udp("10.0.0.1", "10.0.0.2", 1, port, b"")
        pseudo_ok = frames.checksum(
            bytes([10, 0, 0, 1, 10, 0, 0, 2, 0, 17, 0, 8]) + seg) == 0
        assert pseudo_ok, port  # a correct checksum sums to 0 either way
        if seg[6:8] == b"\xff\xff":
            return
    raise AssertionError("no datagram with a computed checksum of 0 in the range")
