"""flowctl trace: a packet built from the model, traced through OVS on every node it crosses.

The packet is what the source pod would send for a new connection (its MAC
and IP, the MAC its ARP would get for the destination, a fresh source port).
`ofproto/trace` runs on the source node; when the packet leaves through the
tunnel (or, in routed mode, through the gateway towards another node's pod
CIDR), the packet as it arrives is traced on the destination node too. Each
step is told with the owner of the flow that matched, decoded from its
cookie, and the verdict names the table and the owner that decided.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flowcni.ctl.client import AgentClient
from flowcni.ctl.inspect import table_names
from flowcni.flows import cookie as ck
from flowcni.flows.fields import VIRTUAL_ROUTER_MAC
from flowcni.lab.lab import Lab, LabError, Node, Pod

_STEP_RE = re.compile(r"^\s*(\d+)\. (.*?)(?:, priority (\d+))?(?:, cookie (0x[0-9a-f]+))?$")
SRC_PORT = 40000


@dataclass
class Step:
    node: str
    table: str
    story: str
    owner: str = ""
    object: str = ""
    actions: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    delivered: bool
    node: str
    table: str
    detail: str
    owner: str = ""
    port: str = ""
    pod: str = ""
    policies: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NodeView:
    """What the tracer needs to know about one node, fetched once."""

    def __init__(self, lab: Lab, node: Node) -> None:
        self.node = node
        agent = AgentClient(node.socket)
        self.status = agent.status()
        self.pods = {a["ofport"]: a for a in agent.call("_pods")["pods"]}
        self.owners = agent.call("_owners")["owners"]
        pol = agent.call("_policy")
        self.isolation: dict[str, dict[str, list[str]]] = pol.get("isolation", {})
        self.names = table_names(node.ovs)
        self.tunnel_ofport = self.status.get("tunnel_ofport")

    def owner(self, cookie: str | None) -> tuple[str, str]:
        if not cookie:
            return "", ""
        o = self.owners.get(f"{ck.owner_of(int(cookie, 16)):#x}")
        return (o["owner"], o["object"]) if o else ("", "")

    def port_name(self, ofport: int) -> tuple[str, str]:
        if ofport == self.status["gateway"]["ofport"]:
            return "gateway", ""
        if ofport == self.tunnel_ofport:
            return "tunnel", ""
        a = self.pods.get(ofport)
        if a:
            return f"pod {a['namespace']}/{a['name']}", f"{a['namespace']}/{a['name']}"
        return f"port {ofport}", ""


def _parse(view: NodeView, out: str) -> tuple[list[Step], str, int | None, bool]:
    """Steps of every resumed pipeline, final datapath actions, output port, tunnelled?"""
    steps: list[Step] = []
    out_port: int | None = None
    tunnel = False
    cur: Step | None = None
    in_br_int = False
    dp_actions = ""
    for line in out.splitlines():
        if line.startswith("bridge("):
            in_br_int = line.startswith('bridge("br-int")')
            continue
        if line.startswith(("Final flow:", "Megaflow:", "===", "Flow:")):
            in_br_int = False
        if line.startswith("Datapath actions:"):
            dp_actions = line.split(":", 1)[1].strip()
            continue
        if not in_br_int:
            continue
        m = _STEP_RE.match(line)
        if m and not line.startswith("     "):
            table = view.names.get(int(m[1]), m[1])
            owner, obj = view.owner(m[4])
            cur = Step(view.node.name, table, "", owner, obj)
            if m[2].strip() == "No match.":
                cur.story = "no flow matched"
            steps.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("-> output port is"):
            out_port = int(s.rsplit(" ", 1)[1])
        elif s.startswith("-> output to native tunnel"):
            tunnel = True
        elif s and not s.startswith("->") and not s.startswith("Resuming") and s != "thaw":
            cur.actions.append(s)
    return steps, dp_actions, out_port, tunnel


def _story(step: Step, names: dict[int, str]) -> str:
    acts = [re.sub(r"goto_table:(\d+)", lambda m: f"goto_table:{names.get(int(m[1]), m[1])}",
                   a) for a in step.actions]
    who = step.object or step.owner or "table default"
    if step.owner == "node" and len(acts) == 1 and acts[0].startswith("goto_table:"):
        return f"{step.table}: no rule for this packet, on to {acts[0].split(':')[1]}"
    if step.story:
        return f"{step.table}: {step.story}, dropped"
    if not acts or acts == ["drop"]:
        return f"{step.table}: dropped by {who}"
    if step.table == "SpoofGuard":
        return f"{step.table}: {who} ok"
    if any(a.startswith("ct(") for a in acts):
        return f"{step.table}: conntrack ({', '.join(a for a in acts if a.startswith('ct('))})"
    if step.owner.startswith("rule:"):
        return f"{step.table}: allowed by {step.owner[5:]}"
    if step.owner.startswith("node:"):
        tun = next((a.split(":")[1].split("->")[0] for a in acts if "->tun_dst" in a), "")
        return f"{step.table}: remote node {step.owner[5:]} via tunnel to {tun}"
    return f"{step.table}: {who} -> {', '.join(acts)}"


def first_hop_mac(dst_ip: str, gw: dict[str, Any], pod_cidr: str) -> str:
    """The MAC a pod's ARP resolves for `dst_ip`'s first hop: the gateway's for the
    gateway and anything off its subnet, the virtual router MAC for its subnet."""
    on_link = ipaddress.ip_address(dst_ip) in ipaddress.ip_network(pod_cidr)
    return gw["mac"] if dst_ip == gw["ip"] or not on_link else VIRTUAL_ROUTER_MAC


def packet(src: Pod, dst_ip: str, gw: dict[str, Any], pod_cidr: str, proto: str,
           dport: int | None) -> str:
    """The flow the source pod sends for a new connection."""
    dmac = first_hop_mac(dst_ip, gw, pod_cidr)
    f = f"{proto},dl_src={src.mac},dl_dst={dmac},nw_src={src.ip},nw_dst={dst_ip},nw_ttl=64"
    if proto in ("tcp", "udp", "sctp"):
        f += f",{proto}_src={SRC_PORT},{proto}_dst={dport or 80}"
    elif proto == "icmp":
        f += ",icmp_type=8,icmp_code=0"
    return f


class Tracer:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.views: dict[str, NodeView] = {}

    def view(self, node: str) -> NodeView:
        if node not in self.views:
            self.views[node] = NodeView(self.lab, self.lab.node(node))
        return self.views[node]

    def _run(self, view: NodeView, flow: str) -> str:
        return view.node.ovs.appctl("ofproto/trace", "br-int", flow)

    def trace(self, src_ref: str, dst: str, proto: str = "tcp",
              dport: int | None = None) -> Verdict:
        src = self.lab.pod(src_ref)
        try:
            dst_ip = self.lab.pod(dst).ip
        except LabError:
            try:
                dst_ip = str(ipaddress.ip_address(dst))
            except ValueError as e:
                raise LabError(f"--to {dst!r}: neither a lab pod nor an IP address") from e
        v = self.view(src.node)
        ofport = next((p for p, a in v.pods.items()
                       if a["namespace"] == src.namespace and a["name"] == src.name), None)
        if ofport is None:
            raise LabError(f"pod {src.ref} has no port on {src.node}")
        gw = v.status["gateway"]
        flow = f"in_port={ofport}," + packet(src, dst_ip, gw, v.status["pod_cidr"], proto,
                                              dport)
        steps, verdict = self._follow(v, flow, dst_ip, proto, dport)
        verdict.steps = steps
        return verdict

    def _follow(self, v: NodeView, flow: str, dst_ip: str, proto: str, dport: int | None,
                hops: int = 0) -> tuple[list[Step], Verdict]:
        steps, dp, out_port, tunnel = _parse(v, self._run(v, flow))
        for s in steps:
            s.story = _story(s, v.names)
        last = steps[-1] if steps else Step(v.node.name, "?", "no steps")
        if out_port is None or dp in ("", "drop"):
            pols = self._isolating(v, last)
            detail = last.story + (f" (pod isolated by {', '.join(pols)})" if pols else "")
            return steps, Verdict(False, v.node.name, last.table, detail, last.owner,
                                  policies=pols)
        name, pod = v.port_name(out_port)
        if hops == 0 and (tunnel or name == "gateway"):
            nxt = self._destination_node(dst_ip)
            if nxt is not None and nxt.node.name != v.node.name:
                arrive = self._arrival(v, nxt, flow, tunnel)
                more, verdict = self._follow(nxt, arrive, dst_ip, proto, dport, hops + 1)
                return steps + more, verdict
        where = (" (leaves through the node's own network stack)" if name == "gateway"
                 else "")
        return steps, Verdict(True, v.node.name, last.table,
                              f"delivered to {name} on {v.node.name}{where}", last.owner,
                              port=str(out_port), pod=pod)

    def live(self, src_ref: str, dst: str, proto: str = "tcp", dport: int | None = None,
             wait: float = 1.5) -> dict[str, Any]:
        """Inject a real marked probe at the source pod and report what each node saw.

        Returns the observations, the live verdict, and the ofproto/trace verdict
        for the same packet, which must agree.
        """
        modelled = self.trace(src_ref, dst, proto, dport)
        src = self.lab.pod(src_ref)
        try:
            dst_ip = self.lab.pod(dst).ip
        except LabError:
            dst_ip = dst
        v = self.view(src.node)
        dst_mac = first_hop_mac(dst_ip, v.status["gateway"], v.status["pod_cidr"])
        dscp = secrets.randbelow(62) + 1
        nodes = self.lab.nodes()
        agents = {n.name: AgentClient(n.socket) for n in nodes}
        # Leaving through the gateway is a hop, not the end, only when the
        # destination is another node's pod (routed mode).
        dst_node = self._destination_node(dst_ip)
        transit = {"tunnel"} | ({"gateway"} if dst_node and dst_node.node.name != src.node
                                else set())

        def collect() -> list[dict[str, Any]]:
            return [{"node": n, **o} for n, a in agents.items()
                    for o in a.call("_traceflow_collect", dscp=dscp)["observations"]]

        def terminal(o: dict[str, Any]) -> bool:
            return bool(o["dropped"]) or o["output"] not in transit

        seen: list[dict[str, Any]] = []
        try:
            for a in agents.values():
                a.call("_traceflow_arm", dscp=dscp)
            agents[src.node].call("_traceflow_inject", dscp=dscp, pod=src.ref, dst_ip=dst_ip,
                                  dst_mac=dst_mac, proto=proto, dport=dport)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                seen = collect()
                if any(terminal(o) for o in seen):
                    time.sleep(0.1)  # let the earlier hops' packet-ins arrive too
                    seen = collect()
                    break
                time.sleep(0.05)
        finally:
            for a in agents.values():
                a.call("_traceflow_disarm", dscp=dscp)
        # One hop per node, in path order (source node first), up to the first end:
        # anything after it is the destination answering (ICMP and RST reflect DSCP).
        seen.sort(key=lambda o: (o["node"] != src.node, o["t"]))
        path: list[dict[str, Any]] = []
        for o in seen:
            if any(p["node"] == o["node"] for p in path):
                continue
            path.append(o)
            if terminal(o):
                break
        seen = path
        last: dict[str, Any] = seen[-1] if seen else {}
        delivered = bool(last) and not last["dropped"]
        same_end = bool(last) and last["node"] == modelled.node and (
            last["table"] == modelled.table if not delivered
            else (last["output"] == f"pod {modelled.pod}" if modelled.pod
                  else last["output"] == "gateway"))
        return {
            "dscp": dscp, "observations": seen, "delivered": delivered,
            "node": last.get("node", ""), "table": last.get("table", ""),
            "owner": last.get("owner", ""), "output": last.get("output", ""),
            "nodes": [o["node"] for o in seen],
            "trace": modelled.as_dict(),
            "matches_trace": delivered == modelled.delivered and same_end,
        }

    def _destination_node(self, ip: str) -> NodeView | None:
        for n in self.lab.nodes():
            if n.pod_cidr and ipaddress.ip_address(ip) in ipaddress.ip_network(n.pod_cidr):
                return self.view(n.name)
        return None

    def _arrival(self, src: NodeView, dst: NodeView, flow: str, tunnel: bool) -> str:
        """The packet as it enters br-int on the destination node."""
        fields = dict(kv.split("=", 1) for kv in flow.split(",") if "=" in kv)
        proto = flow.split(",")[1]
        rest = ",".join(f"{k}={v}" for k, v in fields.items()
                        if k in ("nw_src", "nw_dst", "icmp_type", "icmp_code")
                        or k.endswith(("_src", "_dst")) and k.split("_")[0] in (
                            "tcp", "udp", "sctp"))
        if tunnel:
            port = dst.tunnel_ofport
            head = (f"in_port={port},tun_id=0,tun_src={src.node.node_ip},"
                    f"tun_dst={dst.node.node_ip},{proto},dl_src={src.status['gateway']['mac']},"
                    f"dl_dst={VIRTUAL_ROUTER_MAC}")
        else:  # routed: the destination node's stack hands it to its gateway
            gw = dst.status["gateway"]
            head = f"in_port={gw['ofport']},{proto},dl_src={gw['mac']},dl_dst={VIRTUAL_ROUTER_MAC}"
        return f"{head},{rest},nw_ttl=63"

    def _isolating(self, v: NodeView, last: Step) -> list[str]:
        if not last.owner.startswith("isolation:"):
            return []
        pod = last.owner.split(":", 1)[1]
        direction = "ingress" if last.table == "IngressDefault" else "egress"
        return v.isolation.get(pod, {}).get(direction, [])
