"""`flowctl services`: each Service port as each node's agent programs it.

Kept apart from flowctl.py's other commands; the agent answers everything
(`services` verb: its Service model and the packets each group bucket took,
from OpenFlow group stats).
"""

from __future__ import annotations

from typing import Any

from flowcni.ctl.providers import NodeAgent


def service_rows(agents: list[NodeAgent], service: str | None = None) -> list[dict[str, Any]]:
    """One row per node, Service and port: ClusterIP, endpoints, group, packets per bucket,
    and the tenant network a tenant Service belongs to (None: the default network)."""
    rows = []
    for n in agents:
        reply = n.call("services")
        packets = reply.get("packets", {})
        for s in reply["services"]:
            if service and s["service"] != service:
                continue
            for p in s["ports"]:
                rows.append({"node": n.name, "proxy": reply["proxy"],
                             "service": s["service"], "tenant": s.get("tenant"),
                             "vni": s.get("vni"), "clusterIP": s["clusterIP"],
                             "port": f"{p['port']}/{p['protocol']}",
                             "endpoints": p["endpoints"], "group": p["group"],
                             "packets": (packets.get(str(p["group"]), [])
                                         if p["endpoints"] else []),
                             **_exposure(s, p)})
    return rows


def _exposure(s: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    """What flows.nodeport adds to a row: node port, external addresses, policies,
    affinity (absent from an older agent's answer: shown as unset)."""
    return {"type": s.get("type", "ClusterIP"), "nodePort": p.get("nodePort"),
            "external": [*s.get("externalIPs", []), *s.get("loadBalancerIPs", [])],
            "trafficPolicy": f"ext={s.get('externalTrafficPolicy', 'Cluster')},"
                             f"int={s.get('internalTrafficPolicy', 'Cluster')}",
            "affinity": s.get("sessionAffinityTimeout"),
            "externalGroup": p.get("externalGroup")}
