"""Cross-node forwarding: one flow-based tunnel port, one flow per remote node.

The tunnel port has remote_ip=flow and key=flow, so a single port serves
every peer: the L3Forwarding flow of a remote node's pod CIDR sets tun_dst
to that node's IP. Decapsulated packets carry the virtual router MAC and go
straight to L3Forwarding, which delivers them like any routed packet (those
for the gateway address, replies to the node's own host traffic, to the
node's stack through the gateway port). In routed mode (no encapsulation)
there are no per-node flows at all: pods send remote traffic to the gateway,
and the node's routing table takes it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import Flow, Load, SetField
from flowcni.flows.node import Gateway
from flowcni.flows.tables import DEFAULT, INGRESS_POLICY, Pipeline

TUNNEL_PORT = "flowcni-tun0"
TUNNEL_OWNER = "tunnel"
PRIO_REMOTE = 190
PRIO_TO_GATEWAY = 200  # above PRIO_REMOTE; the gateway IP is in no remote pod CIDR anyway
PRIO_VMAC_DROP = 10

# Bytes the encapsulation adds to an inner IPv4 packet (outer IPv4 + its headers
# + the inner Ethernet header); the pod MTU is the uplink MTU minus this.
ENCAP_OVERHEAD = {
    "geneve": 20 + 8 + 8 + 14,
    "vxlan": 20 + 8 + 8 + 14,
    "gre": 20 + 8 + 14,  # GRE header with key (key=flow), transparent Ethernet
    "none": 0,
}


@dataclass(frozen=True)
class RemoteNode:
    name: str
    node_ip: str
    pod_cidr: str

    @property
    def owner(self) -> str:
        return f"node:{self.name}"


def pod_mtu(uplink_mtu: int, encap: str) -> int:
    return uplink_mtu - ENCAP_OVERHEAD[encap]


def tunnel_flows(tun_ofport: int, gw: Gateway, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Node-wide flows of the tunnel port."""
    kw = dict(feature=Feature.TUNNEL, owner=TUNNEL_OWNER, pipeline=pipeline)
    return [
        Flow.make("Classifier", 200, {"in_port": tun_ofport},
                  [Load(F.SOURCE, F.FROM_TUNNEL)], goto="ConntrackZone", **kw),
        # The node's own stack reaches remote pods from its gateway address (the
        # source its cluster-CIDR route through the gateway picks), so their
        # replies, and anything else a remote pod sends to that address, come
        # back through the tunnel addressed to the virtual router MAC: hand them
        # to the gateway port, i.e. to the node's stack.
        Flow.make("L3Forwarding", PRIO_TO_GATEWAY,
                  {"reg0": F.SOURCE.value(F.FROM_TUNNEL), "ipv4_dst": gw.ip},
                  [SetField("eth_src", F.VIRTUAL_ROUTER_MAC), SetField("eth_dst", gw.mac)],
                  goto="L3DecTTL", **kw),
        # Only L3Forwarding's remote flows send to the virtual MAC with the port chosen.
        Flow.make("L3Forwarding", PRIO_VMAC_DROP, {"eth_dst": F.VIRTUAL_ROUTER_MAC}, **kw),
        Flow.make("L2ForwardingCalc", 200, {"eth_dst": F.VIRTUAL_ROUTER_MAC},
                  goto=INGRESS_POLICY, **kw),
    ]


def remote_node_flows(node: RemoteNode, gw: Gateway, tun_ofport: int,
                      pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """The one flow that sends a remote node's pod CIDR into the tunnel."""
    return [Flow.make(
        "L3Forwarding", PRIO_REMOTE, {"ipv4_dst": node.pod_cidr},
        [SetField("eth_src", gw.mac), SetField("eth_dst", F.VIRTUAL_ROUTER_MAC),
         SetField("tun_ipv4_dst", node.node_ip), Load(F.OUT_PORT, tun_ofport)],
        goto="L3DecTTL", feature=Feature.TUNNEL, owner=node.owner, pipeline=pipeline)]
