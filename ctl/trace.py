"""flowctl trace: a packet built from the model, traced by the agent of every node it crosses.

The packet is what the source pod would send for a new connection (its MAC
and IP, the MAC its ARP would get for the destination, a fresh source port).
The source node's agent runs `ofproto/trace` on its bridge and returns the
steps; when the packet leaves through the tunnel (or, in routed mode, through
the gateway towards another node's pod CIDR), the destination node's agent
traces the packet as it arrives there. Each step is told with the owner of
the flow that matched, and the verdict says where the packet really ends: a
pod, the node's own stack (and out of the node, masqueraded or not), or
nowhere. Pods are found by asking the agents, so this works the same on one
node, a lab and a cluster.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flowcni.api.schema import TraceResult
from flowcni.api.schema import TraceStep as Step
from flowcni.ctl.providers import NodeAgent
from flowcni.flows.fields import VIRTUAL_ROUTER_MAC
from flowcni.flows.model import CT_ZONE
from flowcni.flows.tenant import TenantNet

SRC_PORT = 40000
PROTOS = ("tcp", "udp", "icmp", "sctp")
PORT_PROTOS = ("tcp", "udp", "sctp")

# Verdict outcomes.
DELIVERED = "delivered"  # to a pod, or to the node itself (its gateway address)
LEFT_NODE = "left-node"  # handed to the node's stack for a destination outside the cluster
DROPPED = "dropped"
NOWHERE = "nowhere"  # no pod and no node has the destination address


class TraceError(RuntimeError):
    """Bad trace input or a pod that is not found."""


class Nodes(Protocol):
    def agents(self) -> list[NodeAgent]: ...


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
    outcome: str = DELIVERED
    # The Service hop, when the packet met one: service, cluster_ip, port, protocol,
    # group, bucket, endpoint, endpoints, dp_hash (see Tracer._service_hop)
    service: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""  # the tenant network of the source pod ("" = the default network)
    vni: int = 0      # its VNI: the tunnel key of every cross-node hop

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_request(proto: str, dport: int | None) -> None:
    """Refuse what a packet cannot be (a port on ICMP, a port out of range)."""
    if proto not in PROTOS:
        raise TraceError(f"--proto {proto!r}: use one of {', '.join(PROTOS)}")
    if dport is not None:
        if proto not in PORT_PROTOS:
            raise TraceError(f"--dport {dport}: {proto} has no ports (use --proto tcp, udp "
                             "or sctp, or leave --dport out)")
        if not 0 < dport < 65536:
            raise TraceError(f"--dport {dport}: out of range 1..65535")


class NodeView:
    """What the tracer needs to know about one node, fetched once from its agent."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.name = agent.name
        self.status = agent.call("status")
        self.pods: dict[int, dict[str, Any]] = {
            a["ofport"]: a for a in agent.call("pods")["pods"]}
        self._isolation: dict[str, dict[str, list[str]]] | None = None

    @property
    def isolation(self) -> dict[str, dict[str, list[str]]]:
        if self._isolation is None:
            self._isolation = self.agent.call("policy", packets=False).get("isolation", {})
        return self._isolation

    def pod(self, ns: str, name: str) -> dict[str, Any] | None:
        return next((a for a in self.pods.values()
                     if a["namespace"] == ns and a["name"] == name), None)

    def trace(self, flow: str) -> TraceResult:
        return TraceResult.from_dict(self.agent.call("trace", flow=flow))


def story(step: Step) -> str:
    """One step in words: what the flow that matched did, and whose it is."""
    acts = step.actions
    who = step.object or step.owner or "table default"
    if step.owner == "node" and len(acts) == 1 and acts[0].startswith("goto_table:"):
        return f"{step.table}: no rule for this packet, on to {acts[0].split(':')[1]}"
    if step.no_match:
        return f"{step.table}: no flow matched, dropped"
    if step.owner.startswith("cluster-rule:"):
        verb = "denied" if not acts or acts == ["drop"] else (
            "passed to NetworkPolicy" if step.table == "AdminEgress" and "EgressRule" in acts[-1]
            or step.table == "AdminIngress" and "IngressRule" in acts[-1] else "accepted")
        return f"{step.table}: {verb} by {who}"
    if not acts or acts == ["drop"]:
        return f"{step.table}: dropped by {who}"
    if step.table == "SpoofGuard":
        return f"{step.table}: {who} ok"
    group = next((a.split(":", 1)[1] for a in acts if a.startswith("group:")), None)
    if group is not None:
        return f"{step.table}: {who} -> select group {group}"
    if any(a.startswith("ct(") for a in acts):
        return f"{step.table}: conntrack ({', '.join(a for a in acts if a.startswith('ct('))})"
    if step.owner.startswith("rule:"):
        return f"{step.table}: allowed by {step.owner[5:]}"
    if step.owner.startswith("node:"):
        tun = next((a.split(":")[1].split("->")[0] for a in acts if "->tun_dst" in a), "")
        return f"{step.table}: remote node {step.owner[5:]} via tunnel to {tun}"
    if step.owner.startswith("tenant:") and any("->tun_dst" in a for a in acts):
        tun = next(a.split(":")[1].split("->")[0] for a in acts if "->tun_dst" in a)
        vni = next((str(int(a.split(":")[1].split("->")[0], 0)) for a in acts
                    if "->tun_id" in a), "?")
        return (f"{step.table}: tenant {step.owner[7:]}: remote slice via tunnel to {tun}, "
                f"VNI {vni}")
    if step.table == "Classifier" and any("REG4[0..15]" in a for a in acts):
        vni = next(str(int(a.split(":")[1].split("->")[0], 0)) for a in acts
                   if "REG4[0..15]" in a)
        if step.owner.startswith("tenant:"):
            return f"{step.table}: tunnel key (VNI) {vni}: tenant {step.owner[7:]}"
        return f"{step.table}: {who}: on the tenant network with VNI {vni}"
    return f"{step.table}: {who} -> {', '.join(acts)}"


def first_hop_mac(dst_ip: str, gw: dict[str, Any], pod_cidr: str) -> str:
    """The MAC a pod's ARP resolves for `dst_ip`'s first hop: the gateway's for the
    gateway and anything off its subnet, the virtual router MAC for its subnet."""
    on_link = ipaddress.ip_address(dst_ip) in ipaddress.ip_network(pod_cidr)
    return gw["mac"] if dst_ip == gw["ip"] or not on_link else VIRTUAL_ROUTER_MAC


def packet(src: dict[str, Any], dst_ip: str, gw: dict[str, Any], pod_cidr: str, proto: str,
           dport: int | None) -> str:
    """The flow the source pod (an attachment: mac, ip) sends for a new connection."""
    dmac = first_hop_mac(dst_ip, gw, pod_cidr)
    f = (f"{proto},dl_src={src['mac']},dl_dst={dmac},nw_src={src['ip']},nw_dst={dst_ip},"
         f"nw_ttl=64")
    if proto in PORT_PROTOS:
        f += f",{proto}_src={SRC_PORT},{proto}_dst={dport or 80}"
    elif proto == "icmp":
        f += ",icmp_type=8,icmp_code=0"
    return f


# A select group of few buckets makes the datapath hash the packet and
# recirculate; ofproto/trace stops there, since only the datapath knows the hash.
_HASH_RECIRC = re.compile(r"hash\(.*\),recirc\((0x[0-9a-f]+)\)$")


_FIVE_TUPLE = {"nw_src", "nw_dst", *(f"{p}_{d}" for p in PORT_PROTOS for d in ("src", "dst"))}


def stand_in_hash(flow: str) -> int:
    """The dp_hash the tracer resumes with: derived from the packet's addresses and
    ports, so one packet always takes the same bucket in the trace. It is not the
    datapath's own hash (OVS does not expose it), so a real connection with the same
    5-tuple may take another bucket."""
    keep = sorted(kv for kv in flow.split(",") if kv.split("=")[0] in _FIVE_TUPLE)
    return zlib.crc32(",".join(keep).encode()) & 0xFFFFFFFF


def _rewrite(flow: str, ip: str, port: int | None) -> str:
    """`flow` with its destination DNATed to ip (and port)."""
    out = []
    for kv in flow.split(","):
        k = kv.split("=", 1)[0]
        if k == "nw_dst":
            kv = f"nw_dst={ip}"
        elif port is not None and k in ("tcp_dst", "udp_dst", "sctp_dst"):
            kv = f"{k}={port}"
        out.append(kv)
    return ",".join(out)


@dataclass
class ServiceTarget:
    key: str
    cluster_ip: str
    port: int
    protocol: str
    endpoints: list[str]
    group: int | None


def split_ref(ref: str) -> tuple[str, str]:
    ns, _, name = ref.rpartition("/")
    return ns or "default", name


class Tracer:
    def __init__(self, nodes: Nodes) -> None:
        self.agents = {a.name: a for a in nodes.agents()}
        self.views: dict[str, NodeView] = {}
        self._hop: dict[str, Any] = {}
        self.tenant, self.vni = "", 0  # of the pod being traced
        self._slices: dict[str, str] | None = None  # of self.tenant, asked once per trace

    def _tenant_slices(self) -> dict[str, str]:
        """node -> slice of the traced pod's tenant, as the first agent resolves it.

        Asked once per trace (trace() forgets it): a trace looks the destination
        node up at each hop and again for the verdict, and each look-up asking the
        agent made the "tenants" verb (the agent resolves every tenant network for
        it) the bulk of a tenant trace's calls."""
        if self._slices is None:
            first = self.agents[next(iter(self.agents))]
            self._slices = next((dict(t.get("slices") or {})
                                 for t in first.call("tenants").get("tenants", [])
                                 if t["name"] == self.tenant), {})
        return self._slices

    def view(self, node: str) -> NodeView:
        if node not in self.views:
            self.views[node] = NodeView(self.agents[node])
        return self.views[node]

    def find_pod(self, ref: str) -> tuple[NodeView, dict[str, Any]]:
        ns, name = split_ref(ref)
        for n in self.agents:
            v = self.view(n)
            a = v.pod(ns, name)
            if a is not None:
                return v, a
        raise TraceError(f"no pod {ns}/{name} on any node ({', '.join(self.agents)})")

    def resolve(self, dst: str) -> str:
        try:
            return str(ipaddress.ip_address(dst))
        except ValueError:
            return str(self.find_pod(dst)[1]["ip"])

    def services(self) -> list[dict[str, Any]]:
        """The Services as the first node's agent programs them (every agent has all)."""
        if not hasattr(self, "_services"):
            first = self.view(next(iter(self.agents)))
            try:
                self._services: list[dict[str, Any]] = first.agent.call("services").get(
                    "services", [])
            except RuntimeError:  # an agent without the verb: no Services to resolve
                self._services = []
        return self._services

    def find_service(self, dst: str) -> ServiceTarget | None:
        """`dst` as a Service, "NS/NAME[:PORT]" (PORT: a number or a port name; default:
        the first port), or a ClusterIP; None when no Service has that name or address.
        A Service wins over a pod of the same name."""
        ref, colon, want = dst.partition(":")
        try:
            ip = str(ipaddress.ip_address(ref))
        except ValueError:
            ip = ""
        if ip and colon:
            raise TraceError(f"--to {dst}: give a ClusterIP's port with --dport")
        ns, name = split_ref(ref)
        svc = next((s for s in self.services()
                    if (s["clusterIP"] == ip if ip else s["service"] == f"{ns}/{name}")), None)
        if svc is None:
            if colon:
                raise TraceError(f"--to {dst}: no Service {ns}/{name}")
            return None
        if svc["clusterIP"] is None:
            raise TraceError(f"--to {dst}: Service {svc['service']} is headless (no ClusterIP "
                             "to trace; trace to one of its pods)")
        ports = svc["ports"]
        port = (next((p for p in ports if str(p["port"]) == want or p["name"] == want), None)
                if want else ports[0] if ports else None)
        if port is None:
            have = ", ".join(f"{p['port']}/{p['protocol']}" + (f" ({p['name']})" if p["name"]
                                                                else "") for p in ports)
            raise TraceError(f"--to {dst}: Service {svc['service']} has no port {want!r} "
                             f"(ports: {have})")
        return ServiceTarget(svc["service"], svc["clusterIP"], port["port"],
                             port["protocol"].lower(), port["endpoints"], port.get("group"))

    def trace(self, src_ref: str, dst: str, proto: str = "tcp",
              dport: int | None = None) -> Verdict:
        svc = self.find_service(dst)
        if svc is not None and not (svc.cluster_ip == dst and dport is not None):
            proto, dport = svc.protocol, svc.port
        elif svc is not None:  # a ClusterIP and --dport: that port of the Service, if any
            try:
                svc = self.find_service(f"{svc.key}:{dport}")
            except TraceError:
                svc = None  # no such port: traced as a plain address
        check_request(proto, dport)
        v, src = self.find_pod(src_ref)
        self.tenant = str(src.get("tenant") or "")
        self.vni = int(src.get("tenant_vni") or 0)
        self._slices = None
        dst_ip = svc.cluster_ip if svc else self.resolve(dst)
        if self.tenant:
            # a tenant pod's ARP gets its tenant's router MAC for every address
            router = TenantNet(self.tenant, self.vni, ()).router_mac
            flow = f"in_port={src['ofport']}," + packet(
                src, dst_ip, {"ip": "", "mac": router}, "0.0.0.0/32", proto, dport)
        else:
            flow = f"in_port={src['ofport']}," + packet(src, dst_ip, v.status["gateway"],
                                                         v.status["pod_cidr"], proto, dport)
        self._hop = {}
        steps, verdict = self._follow(v, flow, dst_ip)
        verdict.steps = steps
        verdict.tenant, verdict.vni = self.tenant, self.vni
        if self._hop or svc is not None:
            verdict.service = {**({"service": svc.key, "cluster_ip": svc.cluster_ip,
                                   "port": svc.port, "protocol": svc.protocol,
                                   "endpoints": svc.endpoints} if svc else {}), **self._hop}
        return verdict

    def _service_hop(self, v: NodeView, flow: str, r: TraceResult
                     ) -> tuple[TraceResult, list[Step], str]:
        """Resume a trace that stopped at a select group's hash recirculation, with the
        stand-in hash; (the resumed result, its steps, the flow DNATed to the endpoint)."""
        steps: list[Step] = []
        h = None
        for _ in range(3):  # a chained group may hash twice (top group, then sub-group)
            m = _HASH_RECIRC.search(r.datapath_actions)
            if not m:
                break
            h = stand_in_hash(flow)
            r2 = v.trace(f"{flow},recirc_id={m[1]},dp_hash={h:#x},ct_state=new|trk,"
                         f"ct_zone={CT_ZONE}")
            r2.groups = r.groups + r2.groups
            r2.nat_dst = r.nat_dst or r2.nat_dst
            r, steps = r2, steps + r2.steps
        if r.nat_dst:
            ip, _, port = r.nat_dst.partition(":")
            self._hop = {"node": v.name, "endpoint": r.nat_dst,
                         "group": r.groups[0][0] if r.groups else None,
                         "buckets": [b for _, b in r.groups],
                         "dp_hash": None if h is None else f"{h:#x}"}
            flow = _rewrite(flow, ip, int(port) if port else None)
        return r, steps, flow

    def _follow(self, v: NodeView, flow: str, dst_ip: str, hops: int = 0
                ) -> tuple[list[Step], Verdict]:
        r = v.trace(flow)
        steps = r.steps
        if hops == 0:
            r, more_steps, flow = self._service_hop(v, flow, r)
            steps = steps + more_steps
            if self._hop:
                dst_ip = self._hop["endpoint"].partition(":")[0]
        for s in steps:
            s.story = story(s)
        last = steps[-1] if steps else Step(v.name, "?", -1, story="no steps")
        if r.output_port is None or r.datapath_actions in ("", "drop"):
            pols = self._isolating(v, last)
            iso = pols if last.owner.startswith("isolation:") else []
            detail = last.story + (f" (pod isolated by {', '.join(iso)})" if iso else "")
            nowhere = "" if pols else self._no_destination(dst_ip)
            if nowhere:
                return steps, Verdict(False, v.name, last.table, f"{detail}: {nowhere}",
                                      last.owner, outcome=NOWHERE)
            return steps, Verdict(False, v.name, last.table, detail, last.owner,
                                  policies=pols, outcome=DROPPED)
        name = r.output_name
        if hops == 0 and (r.tunnel_dst or name == "tunnel" or name == "gateway"):
            nxt = self._destination_node(dst_ip)
            if nxt is not None and nxt.name != v.name:
                more, verdict = self._follow(nxt, self._arrival(v, nxt, flow,
                                                                name == "tunnel"), dst_ip, 1)
                return steps + more, verdict
        if name.startswith("pod "):
            return steps, Verdict(True, v.name, last.table, f"delivered to {name} on {v.name}",
                                  last.owner, port=str(r.output_port), pod=name[4:])
        if name == "gateway":
            return steps, self._gateway_verdict(v, last, dst_ip, r)
        return steps, Verdict(True, v.name, last.table, f"leaves {v.name} through {name}",
                              last.owner, port=str(r.output_port))

    def _no_destination(self, dst_ip: str) -> str:
        """Why nothing can receive `dst_ip`, if so: a pod-CIDR address no pod has,
        or a cluster-CIDR address in no node's pod CIDR ("" otherwise)."""
        owner = self._destination_node(dst_ip)
        if owner is not None:
            if any(p["ip"] == dst_ip and (p.get("tenant") or "") == self.tenant
                   for p in owner.pods.values()) or dst_ip == owner.status["gateway"]["ip"]:
                return ""
            if self.tenant:
                return (f"nowhere, {dst_ip} is in {owner.name}'s slice of tenant network "
                        f"{self.tenant} but no pod of it has that address")
            return (f"nowhere, {dst_ip} is in {owner.name}'s pod CIDR "
                    f"{owner.status['pod_cidr']} but no pod has it")
        cluster = next(iter(self.views.values())).status.get("cluster_cidr")
        if cluster and ipaddress.ip_address(dst_ip) in ipaddress.ip_network(cluster):
            return f"nowhere, {dst_ip} is in the cluster CIDR {cluster} but in no node's pod CIDR"
        return ""

    def _gateway_verdict(self, v: NodeView, last: Step, dst_ip: str, r: TraceResult
                         ) -> Verdict:
        """Where a packet handed to the node's own stack really goes."""
        st = v.status
        ip = ipaddress.ip_address(dst_ip)
        port = str(r.output_port)
        if dst_ip == st["gateway"]["ip"]:
            return Verdict(True, v.name, last.table, f"delivered to the gateway of {v.name} "
                           f"(the node's own address {dst_ip})", last.owner, port=port)
        owner = self._destination_node(dst_ip)
        if owner is not None:
            return Verdict(False, v.name, last.table,
                           f"nowhere: {dst_ip} is in {owner.name}'s pod CIDR "
                           f"{owner.status['pod_cidr']} but no pod has it; OVS hands it to "
                           f"{v.name}'s stack, which has no such host", last.owner, port=port,
                           outcome=NOWHERE)
        cluster = st.get("cluster_cidr")
        if cluster and ip in ipaddress.ip_network(cluster):
            return Verdict(False, v.name, last.table,
                           f"nowhere: {dst_ip} is in the cluster CIDR {cluster} but in no "
                           f"node's pod CIDR; OVS hands it to {v.name}'s stack",
                           last.owner, port=port, outcome=NOWHERE)
        masq = (f"masqueraded to the node's address {st.get('node_ip') or '?'}"
                if st.get("ip_masq", True) else "not masqueraded (ip_masq off)")
        return Verdict(True, v.name, last.table,
                       f"leaves {v.name} through the gateway into the node's stack, then out "
                       f"of the node by its routes to {dst_ip}, {masq}", last.owner,
                       port=port, outcome=LEFT_NODE)

    def live(self, src_ref: str, dst: str, proto: str = "tcp", dport: int | None = None,
             wait: float = 1.5) -> dict[str, Any]:
        """Inject a real marked probe at the source pod and report what each node saw.

        Returns the observations, the live verdict, and the ofproto/trace verdict
        for the same packet, which must agree.
        """
        modelled = self.trace(src_ref, dst, proto, dport)
        v, src = self.find_pod(src_ref)
        svc = self.find_service(dst)
        if svc is not None and dport is None:
            proto, dport = svc.protocol, svc.port
        dst_ip = svc.cluster_ip if svc else self.resolve(dst)
        dst_mac = (TenantNet(self.tenant, self.vni, ()).router_mac if self.tenant
                   else first_hop_mac(dst_ip, v.status["gateway"], v.status["pod_cidr"]))
        dscp = secrets.randbelow(62) + 1
        agents = self.agents
        # Leaving through the gateway is a hop, not the end, only when the
        # destination is another node's pod (routed mode).
        dst_node = self._destination_node(dst_ip)
        transit = {"tunnel"} | ({"gateway"} if dst_node and dst_node.name != v.name
                                else set())

        def collect() -> list[dict[str, Any]]:
            return [{"node": n, **o} for n, a in agents.items()
                    for o in a.call("traceflow", step="collect", dscp=dscp)["observations"]]

        def terminal(o: dict[str, Any]) -> bool:
            return bool(o["dropped"]) or o["output"] not in transit

        seen: list[dict[str, Any]] = []
        try:
            for a in agents.values():
                a.call("traceflow", step="arm", dscp=dscp)
            agents[v.name].call("traceflow", step="inject", dscp=dscp,
                                pod=f"{src['namespace']}/{src['name']}", dst_ip=dst_ip,
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
                a.call("traceflow", step="disarm", dscp=dscp)
        # One hop per node, in path order (source node first), up to the first end:
        # anything after it is the destination answering (ICMP and RST reflect DSCP).
        seen.sort(key=lambda o: (o["node"] != v.name, o["t"]))
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
        if self.tenant:
            for node, cidr in self._tenant_slices().items():
                if node in self.agents and \
                        ipaddress.ip_address(ip) in ipaddress.ip_network(cidr):
                    return self.view(node)
            return None
        for n in self.agents:
            v = self.view(n)
            cidr = v.status.get("pod_cidr")
            if cidr and ipaddress.ip_address(ip) in ipaddress.ip_network(cidr):
                return v
        return None

    def _arrival(self, src: NodeView, dst: NodeView, flow: str, tunnel: bool) -> str:
        """The packet as it enters the destination node's bridge."""
        fields = dict(kv.split("=", 1) for kv in flow.split(",") if "=" in kv)
        proto = flow.split(",")[1]
        rest = ",".join(f"{k}={v}" for k, v in fields.items()
                        if k in ("nw_src", "nw_dst", "icmp_type", "icmp_code")
                        or k.endswith(("_src", "_dst")) and k.split("_")[0] in PORT_PROTOS)
        if tunnel:
            port = dst.status.get("tunnel_ofport")
            head = (f"in_port={port},tun_id={self.vni},tun_src={src.status['node_ip']},"
                    f"tun_dst={dst.status['node_ip']},{proto},"
                    f"dl_src={src.status['gateway']['mac']},dl_dst={VIRTUAL_ROUTER_MAC}")
        else:  # routed: the destination node's stack hands it to its gateway
            gw = dst.status["gateway"]
            head = f"in_port={gw['ofport']},{proto},dl_src={gw['mac']},dl_dst={VIRTUAL_ROUTER_MAC}"
        return f"{head},{rest},nw_ttl=63"

    def _isolating(self, v: NodeView, last: Step) -> list[str]:
        if last.owner.startswith("cluster-rule:"):  # tier, priority, policy and rule
            return [last.object or last.owner]
        if not last.owner.startswith("isolation:"):
            return []
        pod = last.owner.split(":", 1)[1]
        direction = "ingress" if last.table == "IngressDefault" else "egress"
        return v.isolation.get(pod, {}).get(direction, [])
