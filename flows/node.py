"""Node-wide flows: table misses, the gateway port, the ARP responder, TTL and output.

These depend only on the node (its gateway address, MAC and port), not on
pods, so they are built once per connection and rarely change.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import (
    Action,
    DecTTL,
    Flow,
    Load,
    Move,
    Output,
    OutputReg,
    SetField,
)
from flowcni.flows.tables import DEFAULT, INGRESS_POLICY, Pipeline

NODE_OWNER = "node"
GATEWAY_OWNER = "gateway"

PRIO_HOST = 205
PRIO_HIGH = 200
PRIO_NORMAL = 100
PRIO_MISS = 0


@dataclass(frozen=True)
class Gateway:
    """The node's gateway port: first address of the pod CIDR.

    `node_ip` is the node's own address on the underlay ("" when the agent
    runs without one): the node's host network may talk to its pods from it
    as well as from the gateway address.
    """

    ip: str
    mac: str
    ofport: int
    pod_cidr: str
    node_ip: str = ""

    @property
    def host_ips(self) -> tuple[str, ...]:
        """The addresses the node's own stack uses towards its local pods."""
        return (self.ip, self.node_ip) if self.node_ip else (self.ip,)


def table_misses(pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """The priority-0 flow of every table, from its declared `miss`."""
    out = []
    for t in pipeline.tables:
        if not t.miss:
            continue
        goto = None if t.miss == "drop" else t.miss
        out.append(Flow.make(t.name, PRIO_MISS, goto=goto, feature=Feature.BASE,
                             owner=NODE_OWNER, pipeline=pipeline))
    return out


def _arp_reply(mac: str, ip_action: list[Action]) -> list[Action]:
    """Turn an ARP request into the reply, sent back out of its in_port."""
    return [
        Move("eth_src", "eth_dst"),
        SetField("eth_src", mac),
        SetField("arp_op", 2),
        Move("arp_sha", "arp_tha"),
        SetField("arp_sha", mac),
        *ip_action,
        Output("IN_PORT"),
    ]


def node_flows(gw: Gateway, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    """Everything that does not belong to a pod or a remote node."""
    base = dict(feature=Feature.BASE, owner=NODE_OWNER, pipeline=pipeline)
    gwf = dict(feature=Feature.GATEWAY, owner=GATEWAY_OWNER, pipeline=pipeline)
    flows = table_misses(pipeline)
    flows += [
        # ARP for the gateway address: the gateway MAC.
        Flow.make("ARPResponder", PRIO_HIGH, {"arp_op": 1, "arp_tpa": gw.ip},
                  _arp_reply(gw.mac, [Move("arp_spa", "arp_tpa"), SetField("arp_spa", gw.ip)]),
                  **base),
        # ARP for anything else: the virtual router MAC, so L3Forwarding routes it.
        Flow.make("ARPResponder", PRIO_NORMAL, {"arp_op": 1},
                  _arp_reply(F.VIRTUAL_ROUTER_MAC, [
                      Move("arp_tpa", F.SCRATCH), Move("arp_spa", "arp_tpa"),
                      Move(F.SCRATCH, "arp_spa")]),
                  **base),
        # The host already decremented TTL when it routed into the gateway.
        Flow.make("L3DecTTL", PRIO_HIGH, {"reg0": F.SOURCE.value(F.FROM_GATEWAY)},
                  goto="L2ForwardingCalc", **base),
        Flow.make("L3DecTTL", PRIO_NORMAL, {"eth_type": 0x0800}, [DecTTL()],
                  goto="L2ForwardingCalc", **base),
        Flow.make("Output", PRIO_MISS, {}, [OutputReg(F.OUT_PORT)], **base),
        # The gateway port.
        Flow.make("Classifier", PRIO_HIGH, {"in_port": gw.ofport},
                  [Load(F.SOURCE, F.FROM_GATEWAY)], goto="SpoofGuard", **gwf),
        Flow.make("SpoofGuard", PRIO_HIGH, {"in_port": gw.ofport, "eth_type": 0x0800},
                  goto="ConntrackZone", **gwf),
        Flow.make("SpoofGuard", PRIO_HIGH, {"in_port": gw.ofport, "eth_type": 0x0806},
                  goto="ARPResponder", **gwf),
        Flow.make("L2ForwardingCalc", PRIO_NORMAL, {"eth_dst": gw.mac},
                  [Load(F.OUT_PORT, gw.ofport)], goto=INGRESS_POLICY, **gwf),
    ]
    # Traffic between a pod and its own node is always allowed (Kubernetes
    # NetworkPolicy semantics: kubelet probes). The node's stack talks to its
    # pods from the gateway IP (the route's choice) or, bound explicitly, from
    # the node IP; either way it enters through the gateway port, and the kernel
    # refuses packets from outside that claim one of its own addresses. Other
    # nodes' host traffic never matches these (their addresses differ), so it
    # meets ipBlock rules like any other source.
    for ip in gw.host_ips:
        flows += [
            Flow.make("EgressRule", PRIO_HOST, {"ipv4_dst": ip}, goto="L3Forwarding", **gwf),
            Flow.make("IngressRule", PRIO_HOST,
                      {"reg0": F.SOURCE.value(F.FROM_GATEWAY), "ipv4_src": ip},
                      goto="ConntrackCommit", **gwf),
        ]
    return flows
