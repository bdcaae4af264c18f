"""Registers, marks and fixed addresses the pipeline uses.

One place for every bit the tables pass to each other, so two features can
never pick the same register bits by accident.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


def ip_int(ip: str) -> int:
    """An IPv4 address (already checked) as the integer a 32-bit field holds; per
    endpoint per build, so no ipaddress objects."""
    return int.from_bytes(socket.inet_aton(ip), "big")


@dataclass(frozen=True)
class RegField:
    """A bit range of an NXM register (`reg0[0..3]`)."""

    reg: str
    start: int
    end: int  # inclusive

    @property
    def n_bits(self) -> int:
        return self.end - self.start + 1

    @property
    def mask(self) -> int:
        return ((1 << self.n_bits) - 1) << self.start

    def value(self, v: int) -> tuple[int, int]:
        """(value, mask) for matching this field equal to v."""
        if not 0 <= v < (1 << self.n_bits):
            raise ValueError(f"{v} does not fit {self.reg}[{self.start}..{self.end}]")
        return (v << self.start, self.mask)

    def ofctl(self) -> str:
        return f"NXM_NX_{self.reg.upper()}[{self.start}..{self.end}]"


# Where the packet came from, set by Classifier.
SOURCE = RegField("reg0", 0, 3)
FROM_POD = 1
FROM_GATEWAY = 2
FROM_TUNNEL = 3

# Output port chosen by L2ForwardingCalc, used by Output.
OUT_PORT = RegField("reg1", 0, 31)

# Scratch register for swapping ARP addresses in the responder.
SCRATCH = RegField("reg2", 0, 31)

# The MAC every pod sees for every address except the gateway's: packets sent
# to it are routed by L3Forwarding, so pods never need per-peer ARP flows.
VIRTUAL_ROUTER_MAC = "aa:bb:cc:dd:ee:ff"

# Conntrack marks (ct_mark), stored on a connection when it is committed.
# FROM_GATEWAY: the connection's first packet entered br-int from the gateway
# port: the node's own stack sent or forwarded it, possibly after rewriting
# it (kube-proxy's DNAT). Its replies must go back through the gateway, where
# the node's conntrack undoes the rewrite, even when the reply's destination
# is a pod this bridge (or the tunnel) could reach directly.
CT_MARK_FROM_GATEWAY = 0x1
# NODEPORT_SNAT: a connection to a node port (or external / LoadBalancer IP) of an
# externalTrafficPolicy Cluster Service that entered from the gateway: its packets
# towards the endpoint are SNATed to the gateway address in SNAT_ZONE at Output
# (flows.nodeport.gateway_snat_flows), after the endpoint was chosen for the client.
CT_MARK_NODEPORT_SNAT = 0x2

# Tenant networks (flows/tenant.py): the tenant a packet belongs to, loaded by
# Classifier (from the pod's port, or from the tunnel key) and matched by every
# table that looks at addresses; 0 on the default network. IN_TENANT is one bit
# for "any tenant", so the tables that tenants skip need one flow, not one per tenant.
TENANT = RegField("reg4", 0, 15)
IN_TENANT = RegField("reg4", 16, 16)

# A reply of a hairpin connection (a pod that reached itself through a
# Service): set where its SNAT is undone, so Output sends it back out of the
# port it came in by (OpenFlow drops output to the in_port otherwise). A high
# bit, clear of SOURCE and of fields other features may add next to it.
HAIRPIN_REPLY = RegField("reg0", 31, 31)

# Node ports, externalTrafficPolicy Cluster (flows.nodeport.gateway_snat_flows):
# SNAT_TO_GATEWAY is loaded by the Service's entry flow in ServiceLB (a new
# connection) or by ConntrackState (a later packet, from CT_MARK_NODEPORT_SNAT), and
# Output SNATs such a packet to the gateway address. GATEWAY_UNSNAT: a packet to the
# gateway address has had that SNAT undone (or found none) in ConntrackZone, so its
# recirculation there goes on to the main zone instead of looping.
SNAT_TO_GATEWAY = RegField("reg0", 30, 30)
GATEWAY_UNSNAT = RegField("reg0", 29, 29)

# Conntrack zone of the SNATs done in OVS (hairpin, node ports with
# externalTrafficPolicy Cluster, tenant node ports): apart from the main zone
# (flows.model.CT_ZONE), which already holds the connection's DNAT to the endpoint.
SNAT_ZONE = 0xFFF1

# sessionAffinity ClientIP: the endpoint a client was given, loaded by the flow
# learned in SessionAffinity and matched in AffinityDNAT (flows.affinity).
AFFINITY_IP = RegField("reg6", 0, 31)
AFFINITY_PORT = RegField("reg7", 0, 15)
AFFINITY_HIT = RegField("reg7", 16, 16)
