"""The node's own network stack: routes to peer pod CIDRs, masquerade, host-veth isolation.

Everything here is in the node's network namespace and is reconciled, not
appended: routes the agent made carry their own routing protocol number, so
routes of nodes that left are found and removed without touching anyone
else's, and the nftables tables are replaced atomically as a whole.
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess

from flowcni.cni.podif import HOST_IF_PREFIX
from flowcni.cni.rtnl import RT_SCOPE_LINK, NetlinkError, Rtnl
from flowcni.flows.nodeport import HostEntry

LOG = logging.getLogger(__name__)

RT_PROTO = 191  # marks routes made by flowcni (any number unused by the kernel and daemons)
GATEWAY_IF = "flowcni-gw0"


class HostNetError(RuntimeError):
    pass


def nft(rules: str) -> None:
    p = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if p.returncode != 0:
        raise HostNetError(f"nft: {p.stderr.strip()}")


def _replace_table(family: str, name: str, body: str) -> str:
    """nft script that swaps a whole table in one transaction."""
    return f"table {family} {name} {{}}\ndelete table {family} {name}\n" \
           f"table {family} {name} {{\n{body}\n}}\n"


def isolation_rules() -> str:
    """Keep the node's stack off the pods' host-side veths (userspace datapath only).

    With the userspace datapath a host-side veth is an ordinary interface of
    the node: OVS reads its frames through AF_PACKET, but the kernel also
    receives them, answers ARP for the node's addresses with the veth's MAC
    and accepts IP addressed to it, so pod traffic to the node could bypass
    the pipeline. AF_PACKET sees frames before any netfilter hook, so OVS
    still gets them. The kernel datapath consumes port frames itself.
    """
    pfx = f'"{HOST_IF_PREFIX}*"'
    return (_replace_table("inet", "flowcni", f"""
  chain pre {{ type filter hook prerouting priority -300; iifname {pfx} drop; }}
  chain out {{ type filter hook output priority 0; oifname {pfx} drop; }}""")
            + _replace_table("arp", "flowcni", f"""
  chain in {{ type filter hook input priority 0; iifname {pfx} drop; }}
  chain out {{ type filter hook output priority 0; oifname {pfx} drop; }}"""))


def masquerade_rules(cluster_cidr: str, enabled: bool) -> str:
    """Pods reaching outside the cluster CIDR leave with the node's address."""
    rule = (f'ip saddr {cluster_cidr} ip daddr != {cluster_cidr} oifname != "{GATEWAY_IF}" '
            "masquerade;" if enabled else "")
    return _replace_table("ip", "flowcni-nat", f"""
  chain post {{ type nat hook postrouting priority 100; {rule} }}""")


EPHEMERAL_SYSCTL = "/proc/sys/net/ipv4/ip_local_port_range"


def read_ephemeral_range(path: str = EPHEMERAL_SYSCTL) -> tuple[int, int]:
    """The kernel's ephemeral port range in the caller's network namespace (the agent
    runs in the node's): what the node-port SNAT's ports stay clear of
    (flows.nodeport.snat_port_range). ValueError naming the sysctl if unreadable."""
    try:
        with open(path) as f:
            first, last = f.read().split()
        return int(first), int(last)
    except (OSError, ValueError) as e:
        raise ValueError(f"net.ipv4.ip_local_port_range ({path}): {e}") from e


def set_forwarding() -> None:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1\n")


def sync_routes(want: dict[str, tuple[str | None, str | None]]) -> None:
    """Make the flowcni-owned routes exactly `want`: {dst CIDR: (gateway IP, device)}."""
    with Rtnl() as nl:
        for dst in set(nl.routes(RT_PROTO)) - set(want):
            try:
                nl.route("del", dst, RT_PROTO)
            except NetlinkError as e:
                if e.code != errno.ESRCH:
                    raise
            LOG.info("route %s removed", dst)
        for dst, (gw, dev) in want.items():
            oif = None
            if dev:
                link = nl.link(dev)
                if link is None:
                    raise HostNetError(f"route {dst}: device {dev} missing")
                oif = link.index
            nl.route("replace", dst, RT_PROTO, gateway=gw, oif=oif)


def nudge_neighbor(ip: str) -> None:
    """Make the node's stack resolve `ip` now (see nudge_neighbors)."""
    nudge_neighbors([ip])


def nudge_neighbors(ips: list[str]) -> None:
    """Make the node's stack resolve each of `ips` now (one datagram to the discard port).

    OVS's userspace tunnelling learns the MAC of a tunnel's remote end by
    snooping ARP on the bridge that holds the node IP, and drops the packets
    it has to encapsulate before it knows it. Resolving each peer as it joins,
    and again now and then, keeps the first packets to a node from being lost.
    The kernel's entry is dropped first so that an ARP exchange really happens
    (OVS may have missed an earlier one, e.g. before it knew the node IP).
    One netlink socket and one UDP socket serve the whole list: a 1,000-node
    cluster is nudged in one pass.
    """
    if not ips:
        return
    # Raw rtnetlink (cni/rtnl.py), not pyroute2: this runs every 30 s for the
    # agent's lifetime, and each pyroute2 object leaves the heap a little more
    # fragmented. One dump of the table, not one query per peer.
    with Rtnl() as nl, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        known: dict[str, list[int]] = {}
        for dst, ifindex in nl.neighbours():
            known.setdefault(dst, []).append(ifindex)
        for ip in ips:
            for ifindex in known.get(ip, ()):
                try:
                    nl.delete_neighbour(ip, ifindex)
                except OSError:
                    pass
            try:
                s.sendto(b"flowcni", (ip, 9))
            except OSError as e:
                LOG.debug("nudging %s: %s", ip, e)


def uplink_of(node_ip: str) -> tuple[str, int]:
    """(interface name, MTU) of the interface holding the node IP."""
    with Rtnl() as nl:
        for ip, index in nl.all_addresses():
            if ip == node_ip:
                link = nl.link(index=index)
                if link is not None:
                    return link.name, link.mtu
    raise HostNetError(f"no interface holds the node IP {node_ip}")


# -- flowcni's Service proxy: steering Service traffic into br-int (flows.nodeport) ---------

PROXY_RT_PROTO = 192  # routes of Service addresses to the gateway (apart from peers' routes)
PROXY_MARK = 0x20000  # packet mark: masquerade to the gateway address (HostEntry.masquerade)


def proxy_rules(entries: list[HostEntry], nodeport_vip: str) -> str:
    """The `ip flowcni-proxy` table: node ports DNATed to the NodePort VIP (routed
    into br-int); entries asking for it (tenant node ports) marked and masqueraded
    towards the gateway. The default network's externalTrafficPolicy Cluster is not
    masqueraded here: OVS SNATs it after choosing the endpoint for the real client
    (flows.nodeport.gateway_snat_flows), which sessionAffinity ClientIP needs.

    Node ports match any local address but loopback (`fib daddr type local`),
    in prerouting (from outside) and output (the node's own clients).
    """
    mark = f"meta mark set meta mark | {PROXY_MARK:#x}"
    nodeports, externals = [], []
    for e in entries:
        m = f"{mark} " if e.masquerade else ""
        if e.ip:
            if e.masquerade:
                externals.append(f"    ip daddr {e.ip} {e.protocol} dport {e.port} {mark}")
        else:
            nodeports.append(f"    {e.protocol} dport {e.port} {m}dnat to {nodeport_vip}")
    local = "fib daddr type local ip daddr != 127.0.0.0/8"
    body = (f"  chain nodeports {{\n{chr(10).join(nodeports)}\n  }}\n"
            f"  chain externals {{\n{chr(10).join(externals)}\n  }}\n"
            f"  chain pre {{ type nat hook prerouting priority dstnat; {local} jump nodeports; "
            "jump externals; }\n"
            f"  chain out {{ type nat hook output priority -100; {local} jump nodeports; "
            "jump externals; }\n"
            f"  chain post {{ type nat hook postrouting priority srcnat; oifname \"{GATEWAY_IF}\" "
            f"meta mark & {PROXY_MARK:#x} == {PROXY_MARK:#x} masquerade; }}")
    return _replace_table("ip", "flowcni-proxy", body)


def sync_proxy_routes(ips: list[str], device: str = GATEWAY_IF) -> tuple[int, int]:
    """Make the /32 routes to `device` of protocol PROXY_RT_PROTO exactly `ips`.

    Only the difference is sent (a cluster may have thousands of ClusterIPs).
    Returns (added, removed). Raw rtnetlink (cni/rtnl.py), not pyroute2: this
    runs on every Service change for the agent's lifetime (see controller/heap.py).
    """
    want = set(ips)
    with Rtnl() as nl:
        routes = [dst.split("/", 1) for dst in nl.routes(PROXY_RT_PROTO)]
        have = {dst for dst, plen in routes if plen == "32"}
        link = nl.link(device)
        if link is None:
            raise HostNetError(f"proxy routes: device {device} missing")
        stale = [f"{dst}/{plen}" for dst, plen in routes if plen != "32" or dst not in want]
        for dst in stale:
            try:  # no scope: matches the route whatever scope it was made with
                nl.route("del", dst, PROXY_RT_PROTO)
            except NetlinkError as e:
                if e.code != errno.ESRCH:
                    raise
        for ip in sorted(want - have):
            # link: on the gateway's wire (OVS answers ARP)
            nl.route("replace", f"{ip}/32", PROXY_RT_PROTO, oif=link.index, scope=RT_SCOPE_LINK)
    return len(want - have), len(stale)
