"""The agent loads os-ken trimmed (controller/oskenlite.py): only OpenFlow 1.3, no packet
library until asked for, and the same bytes on the wire as os-ken whole.

Each case runs in a fresh interpreter: what a process has imported is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: Modules the agent must not import at start (4.4 MB + 6.5 MB of its RSS, measured).
CUT = [
    "os_ken.ofproto.ofproto_v1_0_parser", "os_ken.ofproto.ofproto_v1_2_parser",
    "os_ken.ofproto.ofproto_v1_4", "os_ken.ofproto.ofproto_v1_4_parser",
    "os_ken.ofproto.ofproto_v1_5", "os_ken.ofproto.ofproto_v1_5_parser",
    "os_ken.lib.packet.packet", "os_ken.lib.packet.ethernet", "os_ken.lib.packet.bgp",
    "os_ken.lib.packet.zebra", "os_ken.lib.packet.ospf", "os_ken.flags",
]


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_agent_import_leaves_other_openflow_versions_and_the_packet_library_out() -> None:
    got = run("""
        import json, sys
        import flowcni.controller.agent
        from os_ken.ofproto import ofproto_protocol, get_ofp_modules
        from flowcni.controller import ofapp
        print(json.dumps({"loaded": sorted(m for m in sys.modules),
                          "trimmed": ofapp.OSKEN_TRIMMED,
                          "protocol": ofproto_protocol.__name__,
                          "versions": sorted(get_ofp_modules())}))
    """)
    assert [m for m in CUT if m in got["loaded"]] == []
    assert got["trimmed"] is True
    assert got["protocol"] == "flowcni.controller.oskenlite"
    assert got["versions"] == [4]


def test_flowctl_and_the_plugin_get_os_ken_whole() -> None:
    got = run("""
        import json, sys
        import flowcni.ctl.flowctl, flowcni.cni.plugin
        from os_ken.ofproto import ofproto_protocol, get_ofp_modules
        print(json.dumps({"protocol": ofproto_protocol.__name__,
                          "versions": sorted(get_ofp_modules())}))
    """)
    assert got == {"protocol": "os_ken.ofproto.ofproto_protocol", "versions": [1, 3, 4, 5, 6]}


# A session's messages, encoded by os-ken: a packet-out with bytes (what the agent
# sends), a hello, a flow mod, a barrier; then a packet-out carrying an os-ken Packet,
# which loads the packet library on demand.
SESSION = """
    import json, sys
    {setup}
    from os_ken.ofproto import ofproto_v1_3 as ofp, ofproto_v1_3_parser as p
    from os_ken.ofproto.ofproto_protocol import ProtocolDesc
    from os_ken.controller import ofp_event
    dp = ProtocolDesc(ofp.OFP_VERSION)
    out = []
    def enc(msg):
        msg.set_xid(7)
        msg.serialize()
        out.append(bytes(msg.buf).hex())
    enc(p.OFPPacketOut(dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=ofp.OFPP_CONTROLLER,
                       actions=[p.OFPActionOutput(3, 0)], data=b"\\x01" * 60))
    enc(p.OFPHello(dp))
    enc(p.OFPFlowMod(dp, cookie=5, table_id=2, priority=100,
                     match=p.OFPMatch(in_port=1, eth_type=0x800, ipv4_dst="10.0.0.1"),
                     instructions=[p.OFPInstructionGotoTable(3)]))
    enc(p.OFPBarrierRequest(dp))
    before = "os_ken.lib.packet.packet" in sys.modules
    from os_ken.lib.packet import ethernet, packet
    pkt = packet.Packet()
    pkt.add_protocol(ethernet.ethernet(dst="0a:00:00:00:00:01", src="0a:00:00:00:00:02"))
    enc(p.OFPPacketOut(dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=ofp.OFPP_CONTROLLER,
                       actions=[p.OFPActionOutput(3, 0)], data=pkt))
    events = [hasattr(ofp_event, e) for e in ("EventOFPSwitchFeatures", "EventOFPPacketIn",
              "EventOFPErrorMsg", "EventONFBundleCtrlMsg", "EventOFPAggregateStatsReply")]
    print(json.dumps({"wire": out, "packet_before": before, "events": events,
                      "version": dp.ofproto.OFP_VERSION}))
"""


def test_a_session_is_encoded_as_by_os_ken_whole() -> None:
    trimmed = run(SESSION.replace(
        "{setup}", "from flowcni.controller import oskenlite; assert oskenlite.install()"))
    whole = run(SESSION.replace("{setup}", "import os_ken.ofproto"))
    assert trimmed["packet_before"] is False  # the packet-out of bytes did not load it
    assert whole["packet_before"] is True
    assert trimmed["wire"] == whole["wire"]
    assert trimmed["events"] == whole["events"] == [True] * 5
    assert trimmed["version"] == whole["version"] == 4


def test_install_is_a_no_op_once_os_ken_is_loaded_whole() -> None:
    got = run("""
        import json
        import os_ken.ofproto
        from flowcni.controller import oskenlite
        from os_ken.ofproto import get_ofp_modules
        print(json.dumps({"installed": oskenlite.install(),
                          "versions": sorted(get_ofp_modules())}))
    """)
    assert got == {"installed": False, "versions": [1, 3, 4, 5, 6]}


def test_packet_submodules_load_on_first_use() -> None:
    got = run("""
        import json, sys
        from flowcni.controller import oskenlite
        oskenlite.install()
        import os_ken.lib.packet as pk
        before = "os_ken.lib.packet.tcp" in sys.modules
        t = pk.tcp.tcp(src_port=1, dst_port=2)
        try:
            pk.no_such_protocol
            missing = "no error"
        except AttributeError as e:
            missing = str(e)
        print(json.dumps({"before": before, "after": "os_ken.lib.packet.tcp" in sys.modules,
                          "port": t.dst_port, "missing": missing}))
    """)
    assert got["before"] is False and got["after"] is True and got["port"] == 2
    assert "no_such_protocol" in got["missing"]


@pytest.mark.parametrize("versions", [[4], [1, 4]])
def test_apps_narrow_the_versions_as_in_os_ken(versions: list[int]) -> None:
    got = run(f"""
        import json
        from flowcni.controller import oskenlite
        oskenlite.install()
        from os_ken.ofproto import ofproto_protocol as pp
        pp.set_app_supported_versions({versions})
        print(json.dumps({{"supported": sorted(pp.ProtocolDesc().supported_ofp_version)}}))
    """)
    assert got == {"supported": [4]}


# The switch's HELLO arrives in the highest version the bridge allows (OVS: 1.5, with a
# version bitmap), before any version is agreed; then what os-ken's handshake reads of it.
HELLOS = """
    import json, struct
    {setup}
    from os_ken.ofproto import ofproto_parser
    from os_ken.controller import ofp_event
    def hello(version, body=b""):
        return struct.pack("!BBHI", version, 0, 8 + len(body), 9) + body
    bitmap = struct.pack("!HHI", 1, 8, (1 << 1) | (1 << 4) | (1 << 6))  # 1.0, 1.3, 1.5
    out = []
    for version, body in [(6, bitmap), (5, bitmap), (4, bitmap), (4, b""), (6, b""),
                          (1, b""), (3, b""), (1, b"junk")]:
        buf = bytearray(hello(version, body))
        m = ofproto_parser.msg(None, version, 0, len(buf), 9, buf)
        els = getattr(m, "elements", None)
        out.append([type(ofp_event.ofp_msg_to_ev(m)).__name__, m.version, m.xid,
                    None if els is None else [sorted(e.versions) for e in els]])
    print(json.dumps({"hellos": out}))
"""


def test_the_switch_hello_in_any_version_reads_as_in_os_ken_whole() -> None:
    trimmed = run(HELLOS.replace(
        "{setup}", "from flowcni.controller import oskenlite; assert oskenlite.install()"))
    whole = run(HELLOS.replace("{setup}", "import os_ken.ofproto"))
    assert [h[:3] for h in trimmed["hellos"]] == [h[:3] for h in whole["hellos"]]
    # os-ken's handshake reads the bitmap when there is one (`if elements:`), else
    # the header's version: empty and absent elements are the same to it.
    assert [h[3] or None for h in trimmed["hellos"]] == [h[3] or None for h in whole["hellos"]]
    assert trimmed["hellos"][0][3] == [[1, 4, 6]]


def test_other_versions_messages_but_hello_are_ignored() -> None:
    got = run("""
        import json, struct
        from flowcni.controller import oskenlite
        oskenlite.install()
        from os_ken.ofproto import ofproto_parser
        buf = bytearray(struct.pack("!BBHI", 6, 2, 8, 1))  # a 1.5 echo request
        print(json.dumps({"msg": repr(ofproto_parser.msg(None, 6, 2, 8, 1, buf))}))
    """)
    assert got == {"msg": "None"}
