"""sessionAffinity ClientIP: a client keeps its endpoint for timeoutSeconds.

A new connection to a front (ClusterIP, node port or external IP, and port)
of such a Service meets, in ServiceLB, resubmit(SessionAffinity) and then
AffinityDNAT:

- SessionAffinity holds flows OVS learned: (client IP, front IP, protocol,
  port) -> load the endpoint's address and port, and a hit bit, into
  registers. Each lookup by a new connection of that client keeps the learned
  flow alive (idle_timeout = timeoutSeconds), as kube-proxy's "recent" match
  is refreshed by each new connection.
- AffinityDNAT: with the hit bit and an endpoint of this front in the
  registers, learn (again: each new connection refreshes the learned flow)
  and DNAT there; otherwise the front's select group, whose bucket loads
  its endpoint into the registers and resubmits to AffinityDNAT, which then
  learns and DNATs as for a hit.

A learned endpoint that has left the Service matches no AffinityDNAT flow of
that front, so the client is balanced again (and learns anew).
"""

from __future__ import annotations

from typing import Any

from flowcni.flows import fields as F
from flowcni.flows.model import CT, Action, Flow, Group, GroupAction, Learn, Load, Resubmit
from flowcni.flows.tables import DEFAULT, Pipeline

PRIO_HIT = 210
PRIO_NEW = 200
PROTOS = {"tcp_dst": 6, "udp_dst": 17, "sctp_dst": 132}


def with_affinity(flows: list[Flow], groups: list[Group], timeout: int,
                  pipeline: Pipeline = DEFAULT) -> tuple[list[Flow], list[Group]]:
    """A Service's ServiceLB flows and groups (as built without affinity), turned
    into the affinity form above. Flows that go to no group (reject, drop) stay."""
    by_gid = {g.group_id: g for g in groups}
    out: list[Flow] = []
    learned: dict[int, Group] = {}

    def dnats(gid: int) -> list[CT]:
        """The DNAT of every endpoint `gid` leads to, through chained sub-groups too."""
        found: list[CT] = []
        for b in by_gid[gid].buckets:
            sub = next((a.group_id for a in b if isinstance(a, GroupAction)), None)
            if sub is not None:
                found += dnats(sub)
            else:
                found.append(next(a for a in b if isinstance(a, CT) and a.nat))
        return found

    def rewrite(gid: int) -> None:
        """The group (and its sub-groups) with each endpoint bucket naming its
        endpoint in the registers instead of DNATing; a bucket leading to a
        sub-group stays as it is."""
        if gid in learned:
            return
        g = by_gid[gid]
        buckets: list[list[Action]] = []
        for b in g.buckets:
            sub = next((a.group_id for a in b if isinstance(a, GroupAction)), None)
            if sub is not None:
                rewrite(sub)
                buckets.append(list(b))
                continue
            dnat = next(a for a in b if isinstance(a, CT) and a.nat)
            buckets.append([*(Load(r, v) for r, v in _loads(dnat)), Resubmit("AffinityDNAT")])
        learned[gid] = Group.make(gid, buckets, owner=g.owner, table="AffinityDNAT",
                                  pipeline=pipeline, weights=None if g.weights is None
                                  else list(g.weights))

    for f in flows:
        gid = next((a.group_id for a in f.actions if isinstance(a, GroupAction)), None)
        if gid is None or gid not in by_gid:
            out.append(f)
            continue
        m: dict[str, Any] = dict(f.match)
        port_field = next(k for k in PROTOS if k in m)
        kw = dict(feature=f.feature, owner=f.owner, pipeline=pipeline)
        # Register loads before the group (a node port's SNAT_TO_GATEWAY) stay with
        # the entry flow: registers survive the resubmit and the DNAT's recirculation.
        regs = [a for a in f.actions if isinstance(a, Load)]
        out.append(Flow.make("ServiceLB", f.priority, m, [*regs, Resubmit("SessionAffinity")],
                             goto="AffinityDNAT", **kw))
        out.append(Flow.make("AffinityDNAT", PRIO_NEW, m, [GroupAction(gid)], **kw))
        for dnat in dnats(gid):
            loads = _loads(dnat)
            ip, port = loads[0][1], loads[1][1]
            # learn() inside a select group's bucket is not carried out by OVS 3.1
            # (measured: no flow learned), so the bucket only names its endpoint in
            # the registers and resubmits to this table, whose endpoint flow learns.
            out.append(Flow.make(
                "AffinityDNAT", PRIO_HIT,
                {**m, "reg6": ip,
                 "reg7": ((1 << F.AFFINITY_HIT.start) | port,
                          F.AFFINITY_HIT.mask | F.AFFINITY_PORT.mask)},
                [Learn("SessionAffinity", timeout, PROTOS[port_field],
                       ("ipv4_src", "ipv4_dst", port_field), loads), dnat], **kw))
        rewrite(gid)
    # Two fronts sharing a group and an endpoint: one DNAT flow each (their matches differ).
    return out, [learned.get(g.group_id, g) for g in groups]


def _loads(dnat: CT) -> tuple[tuple[F.RegField, int], ...]:
    """The register loads naming `dnat`'s endpoint (address, port) and the hit bit."""
    assert dnat.nat
    ip, _, port = dnat.nat.rpartition(":")
    return ((F.AFFINITY_IP, F.ip_int(ip)), (F.AFFINITY_PORT, int(port)), (F.AFFINITY_HIT, 1))
