"""Reading a Service hop out of ofproto/trace text, and the tracer's resume helpers."""

from __future__ import annotations

from flowcni.controller.ofproto_trace import parse
from flowcni.ctl.trace import _rewrite, stand_in_hash

# The shape OVS 3.1 prints when a trace resumes a select group after the
# datapath's hash recirculation (trimmed).
RESUMED = """\
Flow: recirc_id=0x5,dp_hash=0x3,ct_state=new|trk,ct_zone=65520,eth,udp,in_port=3

bridge("br-int")
----------------
    thaw
            Resuming from table 0
        Restoring actions: unroll_xlate(table=5, cookie=288311845344156),group:2497843024
    unroll_xlate(table=5, cookie=288311845344156)
    restored state: table=5, cookie=0x9c5320d537060100
    group:2497843024
     -> using bucket 1
    bucket 1
            ct(commit,table=6,zone=65520,nat(dst=10.244.2.2:53))
            nat(dst=10.244.2.2:53)

Final flow: recirc_id=0x5
Megaflow: recirc_id=0x5,dp_hash=0x3/0xf,eth,ip,in_port=3,nw_frag=no
Datapath actions: ct(commit,zone=65520,nat(dst=10.244.2.2:53)),recirc(0x6)

===============================================================================
recirc(0x6) - resume conntrack with default ct_state=trk|new (use --ct-next to customize)
===============================================================================

Flow: recirc_id=0x6,eth,udp,in_port=3,nw_dst=10.244.2.2,tp_dst=53

bridge("br-int")
----------------
    thaw
        Resuming from table 6
 6. priority 0, cookie 0x10196122db282
    goto_table:7
14. priority 0, cookie 0x10196122db282
    output:NXM_NX_REG1[]
     -> output port is 2
     -> output to native tunnel

Final flow: unchanged
Datapath actions: tnl_push(tnl_port(5)),out_port(2)
"""


def test_parse_reports_the_bucket_and_the_dnat() -> None:
    r = parse(RESUMED, "br-int", {6: "EgressRule", 14: "Output"}, "node1")
    assert r.groups == [(2497843024, 1)]
    assert r.nat_dst == "10.244.2.2:53"
    assert [s.table for s in r.steps] == ["EgressRule", "Output"]
    assert r.output_port == 2 and r.tunnel


def test_resume_helpers() -> None:
    flow = "in_port=3,udp,nw_src=10.244.1.2,nw_dst=10.96.7.2,udp_src=40000,udp_dst=53"
    assert stand_in_hash(flow) == stand_in_hash(flow + ",nw_ttl=64")  # the 5-tuple only
    assert stand_in_hash(flow) != stand_in_hash(flow.replace("40000", "40001"))
    assert _rewrite(flow, "10.244.2.2", 5353) == (
        "in_port=3,udp,nw_src=10.244.1.2,nw_dst=10.244.2.2,udp_src=40000,udp_dst=5353")
