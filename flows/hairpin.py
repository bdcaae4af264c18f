"""Hairpin: a pod that reaches a Service and is picked as its endpoint.

After the Service's DNAT the packet goes from the pod to itself. Delivered
as it is, it would leave by the port it came in (which OpenFlow refuses
unless told IN_PORT) and the pod's kernel would drop a packet claiming its
own address as the source. So such a packet is SNATed, in a conntrack zone
of its own (the main zone already holds the DNAT), to HAIRPIN_IP, and sent
back out of its in_port. The pod's reply, addressed to HAIRPIN_IP, has the
SNAT undone first (a ct() in ConntrackZone that recirculates back into it,
where its destination is now the pod's), then the DNAT by the usual lookup;
it is marked on the way, and Output sends it back out of its in_port too.
kube-proxy does the same with a masquerade to the node.

One Output flow per local endpoint address (a pod's own address as source
and destination); endpoints of no Service need none.
"""

from __future__ import annotations

from collections.abc import Iterable

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import CT, Flow, Load, Output
from flowcni.flows.nodeport import HAIRPIN_IP
from flowcni.flows.tables import DEFAULT, Pipeline

HAIRPIN_OWNER = "service-hairpin"
PRIO_HAIRPIN = 210


def hairpin_flows(endpoint_ips: Iterable[str], pipeline: Pipeline = DEFAULT) -> list[Flow]:
    kw = dict(feature=Feature.SERVICE, owner=HAIRPIN_OWNER, pipeline=pipeline)
    flows = [
        Flow.make("ConntrackZone", PRIO_HAIRPIN, {"ipv4_dst": HAIRPIN_IP},
                  [Load(F.HAIRPIN_REPLY, 1),
                   CT(table="ConntrackZone", zone=F.SNAT_ZONE, nat="")], **kw),
        Flow.make("Output", PRIO_HAIRPIN, {"reg0": F.HAIRPIN_REPLY.value(1)},
                  [Output("IN_PORT")], **kw),
    ]
    for ip in sorted(set(endpoint_ips)):
        flows.append(Flow.make(
            "Output", PRIO_HAIRPIN, {"ipv4_src": ip, "ipv4_dst": ip},
            [CT(commit=True, zone=F.SNAT_ZONE, snat=HAIRPIN_IP), Output("IN_PORT")], **kw))
    return flows
