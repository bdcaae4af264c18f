"""Live traceflow: observation points for one marked probe packet.

The probe carries a DSCP value no pod traffic uses while the trace runs.
For every flow that drops IP packets, and for the Output flow, a copy is
made one priority higher with `ip_dscp=<mark>` added and a packet-in to the
agent added to its actions: a drop copy sends the probe to the agent instead
of dropping it silently, the Output copy sends a copy and still outputs. The
packet-in's table and cookie then say where the probe really ended, and its
registers which port it left through.
"""

from __future__ import annotations

from collections.abc import Iterable

from flowcni.flows.cookie import Feature
from flowcni.flows.model import ETH_ARP, Controller, Flow, OutputReg
from flowcni.flows.tables import DEFAULT, Pipeline

TRACEFLOW_OWNER = "traceflow"


def is_ip_drop(f: Flow) -> bool:
    m = dict(f.match)
    return not f.actions and f.goto is None and m.get("eth_type") != ETH_ARP \
        and "arp_op" not in m


def observation_flows(flows: Iterable[Flow], dscp: int,
                      pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Copies of the drop and output flows that report a probe marked `dscp`."""
    if not 0 < dscp < 64:
        raise ValueError(f"DSCP {dscp} out of range 1..63")
    out = []
    for f in flows:
        output = f.table == "Output" and any(isinstance(a, OutputReg) for a in f.actions)
        if not (output or is_ip_drop(f)):
            continue
        m = {k: v for k, v in f.match}
        m["eth_type"] = 0x0800
        m["ip_dscp"] = dscp
        acts = [Controller(), *f.actions] if output else [Controller()]
        out.append(Flow.make(f.table, min(f.priority + 1, 0xFFFF), m, acts,
                             feature=Feature.BASE, owner=f"{TRACEFLOW_OWNER}|{f.owner_name}",
                             pipeline=pipeline))
    return out
