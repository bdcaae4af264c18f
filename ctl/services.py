"""`flowctl services`: each Service port as each node's agent programs it.

Kept apart from flowctl.py's other commands: it asks the agent (`_services`)
and reads one thing from the switch, the packets each group bucket took.
"""

from __future__ import annotations

import re
from typing import Any

from flowcni.ctl.client import AgentClient

_BUCKET = re.compile(r"bucket(\d+):packet_count=(\d+)")


def bucket_packets(group_stats: str) -> dict[int, list[int]]:
    """`ovs-ofctl dump-group-stats` text -> {group id: packets per bucket}."""
    out: dict[int, list[int]] = {}
    for line in group_stats.splitlines():
        m = re.search(r"group_id=(\d+)", line)
        if m:
            pk = sorted((int(i), int(n)) for i, n in _BUCKET.findall(line))
            out[int(m.group(1))] = [n for _, n in pk]
    return out


def service_rows(nodes: list[Any], service: str | None = None) -> list[dict[str, Any]]:
    """One row per node, Service and port: ClusterIP, endpoints, group, packets per bucket."""
    rows = []
    for node in nodes:
        reply = AgentClient(node.socket).call("_services")
        stats = bucket_packets(node.ovs.ofctl("-O", "OpenFlow13", "dump-group-stats", "br-int"))
        for s in reply["services"]:
            if service and s["service"] != service:
                continue
            for p in s["ports"]:
                rows.append({"node": node.name, "proxy": reply["proxy"],
                             "service": s["service"], "clusterIP": s["clusterIP"],
                             "port": f"{p['port']}/{p['protocol']}",
                             "endpoints": p["endpoints"], "group": p["group"],
                             "packets": stats.get(p["group"], []) if p["endpoints"] else []})
    return rows
