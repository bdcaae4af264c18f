"""Read back what controller.ofwire encodes, with os-ken's parsers (for fake switches).

FlowSync sends FlowMods as bytes; a test switch that applies them decodes
them here instead of trusting the encoder's own idea of what it wrote.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from os_ken.ofproto import ofproto_common
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser


class _Dp:
    ofproto = ofp
    ofproto_parser = parser
    id = 1


def message(buf: bytes) -> Any:
    """One encoded OpenFlow 1.3 message as os-ken's parsed object (a FlowMod here)."""
    version, msg_type, length, xid = struct.unpack_from("!BBHI", buf)
    assert length == len(buf), (length, len(buf))
    return parser.msg_parser(_Dp(), version, msg_type, length, xid, bytearray(buf))


def bundle_adds(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(xid, bundle id, inner message bytes) of each ONF bundle-add in a chunk of them."""
    off = 0
    while off < len(buf):
        version, msg_type, length, xid, exp, exp_type, bid = struct.unpack_from(
            "!BBHIIII", buf, off)
        assert (version, msg_type, exp, exp_type) == (
            ofp.OFP_VERSION, ofp.OFPT_EXPERIMENTER, ofproto_common.ONF_EXPERIMENTER_ID,
            ofp.ONF_ET_BUNDLE_ADD_MESSAGE), buf[off:off + 24].hex()
        inner = buf[off + 24:off + length]
        assert struct.unpack_from("!I", inner, 4)[0] == xid  # the extension's rule
        yield xid, bid, inner
        off += length


def as_message(m: Any) -> Any:
    """A bundled message as an os-ken object, whether FlowSync passed bytes or os-ken."""
    return message(m) if isinstance(m, bytes) else m
