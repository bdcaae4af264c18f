"""Removing the conntrack entries of UDP connections to a Service endpoint that is gone.

The proxy (flows.services.ServiceProxy) says which endpoints left which
ClusterIP UDP port; once the new groups are in OVS, this deletes the entries
of exactly those connections from the node's datapath, in the pods' zone:
the ones whose original destination is the ClusterIP and port and whose
reply comes from the endpoint (the DNAT it got). The client's next datagram
is then a new connection and picks a remaining endpoint, as kube-proxy's
conntrack cleanup does for UDP.

A node-port (or external / LoadBalancer IP) connection with externalTrafficPolicy
Cluster has a second entry, in the SNAT zone (flows.nodeport.gateway_snat_flows):
client -> endpoint, SNATed to the gateway address after the DNAT; a hairpin
connection too (pod -> itself, SNATed to HAIRPIN_IP). Left there, it would go on
mapping replies from the removed endpoint (still running when it only left the
Service) to the client until it expires, and hold its SNAT port. So the default
network's flush also removes the SNAT zone's UDP entries to each removed endpoint
(by its address and port: that zone's entries do not know the Service). The cost:
another Service's UDP connection through a node port to the same endpoint address
and port loses its SNAT entry too; its next datagram is SNATed anew (the main
zone still holds its DNAT), possibly from another source port. Tenant node ports
need no such flush: they are SNATed into the tenant before their DNAT
(flows.tenantservices.nodeport_flows), so their SNAT entry names no endpoint and
stays right for the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from flowcni.flows.fields import SNAT_ZONE
from flowcni.flows.model import CT_ZONE
from flowcni.flows.services import StaleUDP

LOG = logging.getLogger(__name__)


class Caller(Protocol):
    def call(self, method: str, *params: str) -> str: ...


def flush_args(s: StaleUDP, zone: int = CT_ZONE) -> list[str]:
    """dpctl/flush-conntrack's arguments: zone, original tuple, reply tuple (both partial).

    Both tuples: the original one (ClusterIP and port) alone would also drop
    the clients of the endpoints that remain, the reply one alone would also
    drop direct connections to the endpoint's pod IP. When none remains, the
    original one alone.
    """
    orig = [f"zone={zone}", f"ct_nw_dst={s.cluster_ip},ct_nw_proto=17,ct_tp_dst={s.port}"]
    if not s.endpoint:  # no endpoint left: every entry of the ClusterIP and port
        return orig
    return [*orig, f"ct_nw_src={s.endpoint},ct_nw_proto=17,ct_tp_src={s.endpoint_port}"]


def snat_flush_args(endpoint: str, port: int) -> list[str]:
    """dpctl/flush-conntrack's arguments for the SNAT zone's UDP entries to endpoint:port
    (their original tuple is the one after the main zone's DNAT)."""
    return [f"zone={SNAT_ZONE}", f"ct_nw_dst={endpoint},ct_nw_proto=17,ct_tp_dst={port}"]


def flush_stale(vswitchd: Caller, stale: Iterable[StaleUDP], zone: int = CT_ZONE,
                snat_zone: bool = True) -> int:
    """Flush each stale endpoint's entries; how many flushes OVS accepted. A failure is
    logged and costs only that endpoint (its clients then wait for the entry to expire).
    zone: a tenant's (its VNI) for a tenant Service's entries. snat_zone: also the SNAT
    zone's entries to each removed endpoint (the default network's; see the module doc)."""
    done = 0
    endpoints: dict[tuple[str, int], None] = {}
    for s in stale:
        try:
            vswitchd.call("dpctl/flush-conntrack", *flush_args(s, zone))
            done += 1
        except Exception as e:  # UnixctlError, or OVS refusing the tuple
            LOG.warning("conntrack of %s:%d -> %s:%d not flushed: %s", s.cluster_ip, s.port,
                        s.endpoint or "*", s.endpoint_port, e)
        endpoints.update(dict.fromkeys(s.endpoints))
    for ip, port in endpoints if snat_zone else ():
        try:
            vswitchd.call("dpctl/flush-conntrack", *snat_flush_args(ip, port))
            done += 1
        except Exception as e:
            LOG.warning("SNAT conntrack to %s:%d not flushed: %s", ip, port, e)
    return done
