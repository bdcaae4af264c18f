"""Removing the conntrack entries of UDP connections to a Service endpoint that is gone.

The proxy (flows.services.ServiceProxy) says which endpoints left which
ClusterIP UDP port; once the new groups are in OVS, this deletes the entries
of exactly those connections from the node's datapath, in the pods' zone:
the ones whose original destination is the ClusterIP and port and whose
reply comes from the endpoint (the DNAT it got). The client's next datagram
is then a new connection and picks a remaining endpoint, as kube-proxy's
conntrack cleanup does for UDP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

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


def flush_stale(vswitchd: Caller, stale: Iterable[StaleUDP], zone: int = CT_ZONE) -> int:
    """Flush each stale endpoint's entries; how many flushes OVS accepted. A failure is
    logged and costs only that endpoint (its clients then wait for the entry to expire).
    zone: a tenant's (its VNI) for a tenant Service's entries."""
    done = 0
    for s in stale:
        try:
            vswitchd.call("dpctl/flush-conntrack", *flush_args(s, zone))
            done += 1
        except Exception as e:  # UnixctlError, or OVS refusing the tuple
            LOG.warning("conntrack of %s:%d -> %s:%d not flushed: %s", s.cluster_ip, s.port,
                        s.endpoint or "*", s.endpoint_port, e)
    return done
