"""Services: what makes a Service's connections work through the pipeline.

Next to kube-proxy (or any node-level DNAT), a pod's packet to a ClusterIP
leaves br-int through the gateway, the node rewrites its destination to an
endpoint, and routes it back into br-int through the gateway. The endpoint's
reply is addressed to the client pod, which br-int (or the tunnel) could
reach directly; delivered that way, it would skip the node's conntrack and
reach the client from the endpoint's address instead of the Service's, and
the client would reset it. So every connection whose first packet entered
from the gateway is committed with a conntrack mark, and its replies are
sent back to the gateway, on the node where the connection entered (a reply
from another node arrives over the tunnel and meets the same conntrack
entry there). The node's conntrack then un-NATs the reply and routes it to
the client through the gateway. NodePort traffic the node forwards into
br-int and hairpin connections (which kube-proxy masquerades) take the same
path. These flows do not depend on the proxy mode: connections the node's
own stack starts (probes, host-network pods) need their replies back at the
gateway too.
"""

from __future__ import annotations

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import CT, Flow, SetField
from flowcni.flows.node import Gateway
from flowcni.flows.tables import DEFAULT, Pipeline

GATEWAY_CT_OWNER = "gateway-conntrack"

# Above the policy engine's commit (200) and above local-pod and remote-node
# forwarding (200, 190): a marked reply must never take the direct path.
PRIO_GATEWAY_COMMIT = 210
PRIO_GATEWAY_REPLY = 210


def gateway_reply_flows(gw: Gateway, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Mark connections entering from the gateway; send their replies back to it."""
    kw = dict(feature=Feature.GATEWAY, owner=GATEWAY_CT_OWNER, pipeline=pipeline)
    return [
        Flow.make("ConntrackCommit", PRIO_GATEWAY_COMMIT,
                  {"eth_type": 0x0800, "ct_state": "+new+trk",
                   "reg0": F.SOURCE.value(F.FROM_GATEWAY)},
                  [CT(commit=True, mark=F.CT_MARK_FROM_GATEWAY)], goto="Output", **kw),
        Flow.make("L3Forwarding", PRIO_GATEWAY_REPLY,
                  {"eth_type": 0x0800, "ct_state": "+rpl+trk",
                   "ct_mark": (F.CT_MARK_FROM_GATEWAY, F.CT_MARK_FROM_GATEWAY)},
                  [SetField("eth_dst", gw.mac)], goto="L3DecTTL", **kw),
    ]
