"""Flows of one local pod: classify, spoof guard, route to it, switch to it.

Five flows per pod, none of which depends on any other pod: a pod ADD or DEL
touches exactly these and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowcni.flows import fields as F
from flowcni.flows.cookie import Feature
from flowcni.flows.model import Flow, Load, SetField
from flowcni.flows.node import PRIO_HIGH, PRIO_NORMAL, Gateway
from flowcni.flows.tables import DEFAULT, INGRESS_POLICY, Pipeline


@dataclass(frozen=True)
class LocalPod:
    """A pod attached to this node's bridge."""

    key: str        # attachment key: containerID/ifname
    ofport: int
    ip: str
    mac: str

    @property
    def owner(self) -> str:
        return pod_owner(self.key)


def pod_owner(key: str) -> str:
    return f"pod:{key}"


def pod_flows(pod: LocalPod, gw: Gateway, pipeline: Pipeline = DEFAULT) -> list[Flow]:
    kw = dict(feature=Feature.POD, owner=pod.owner, pipeline=pipeline)
    port = pod.ofport
    return [
        Flow.make("Classifier", PRIO_HIGH, {"in_port": port},
                  [Load(F.SOURCE, F.FROM_POD)], goto="SpoofGuard", **kw),
        Flow.make("SpoofGuard", PRIO_HIGH,
                  {"in_port": port, "eth_src": pod.mac, "ipv4_src": pod.ip},
                  goto="ConntrackZone", **kw),
        Flow.make("SpoofGuard", PRIO_HIGH,
                  {"in_port": port, "eth_src": pod.mac, "arp_sha": pod.mac, "arp_spa": pod.ip},
                  goto="ARPResponder", **kw),
        Flow.make("L3Forwarding", PRIO_HIGH, {"ipv4_dst": pod.ip},
                  [SetField("eth_src", gw.mac), SetField("eth_dst", pod.mac)],
                  goto="L3DecTTL", **kw),
        Flow.make("L2ForwardingCalc", PRIO_NORMAL, {"eth_dst": pod.mac},
                  [Load(F.OUT_PORT, port)], goto=INGRESS_POLICY, **kw),
    ]
