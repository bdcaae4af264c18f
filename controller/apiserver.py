"""The agent API: a root-only unix socket for inspection and control, apart from CNI.

The CNI socket carries only the CNI verbs the plugin sends; everything an
operator asks (status, flows, groups, drift, policy, traces) comes here, in
the schema of flowcni.api.schema. The agent answers from what it holds:
flows and groups are read from OVS over its own OpenFlow connection, traces
run `ofproto/trace` on its own bridge. The socket is mode 0600 (root only),
or 0660 owned by `--api-group` for an operators' group.
"""

from __future__ import annotations

import grp
import logging
import os
import re
import socketserver
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowcni.api import schema as api
from flowcni.api.schema import APIError, FlowRow, GroupRow, Request, TraceResult
from flowcni.controller import ofproto_trace
from flowcni.controller.flowsync import match_key
from flowcni.controller.ofapp import OFError
from flowcni.controller.unixserver import Server, UnixServer
from flowcni.flows import cookie as ck
from os_ken.lib import ofctl_v1_3

if TYPE_CHECKING:
    from flowcni.controller.agent import Agent

LOG = logging.getLogger(__name__)
_NXM_RE = re.compile(r"_nxm\b")


def _action_text(act: Any) -> str:
    """One action: os-ken's text where it has one, else the action's own fields. Field
    names are the OXM ones (os-ken parses some moves back with an `_nxm` suffix)."""
    try:
        return _NXM_RE.sub("", str(ofctl_v1_3.action_to_str(act)))
    except Exception:  # os-ken lacks a renderer for some Nicira actions
        try:
            name, body = next(iter(act.to_jsondict().items()))
        except Exception:
            name, body = type(act).__name__, dict(vars(act))
        keep = {k: v for k, v in body.items()
                if k not in ("len", "type", "experimenter", "subtype")}
        return f"{name}({','.join(f'{k}={v}' for k, v in sorted(keep.items()))})"


def render_actions(instructions: list[Any], names: dict[int, str]) -> str:
    """OpenFlow instructions in short text, goto targets by table name."""
    out = []
    for i in instructions:
        if hasattr(i, "actions"):
            acts = [_action_text(a) for a in i.actions]
            kind = {3: "write_actions", 5: "clear_actions"}.get(i.type)
            out += [f"{kind}({','.join(acts)})"] if kind else acts
        elif hasattr(i, "table_id"):
            out.append(f"goto_table:{names.get(i.table_id, i.table_id)}")
        else:
            out.append(type(i).__name__)
    return ",".join(out) or "drop"


def render_match(match: Any) -> str:
    return ",".join(f"{k}={v[0]:#x}/{v[1]:#x}" if isinstance(v, tuple) and len(v) == 2
                    and all(isinstance(x, int) for x in v) else f"{k}={v}"
                    for k, v in sorted(match.items()))


class AgentAPI:
    """Handlers of the API verbs, over the agent's state."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.pipeline = agent.flows.pipeline
        self.names = {i: n for n, i in self.pipeline.ids.items()}
        ovsdb = agent.args.ovsdb
        self.rundir = os.environ.get("OVS_RUNDIR") or (
            os.path.dirname(ovsdb[5:]) if ovsdb.startswith("unix:") else "/var/run/openvswitch")

    def handle(self, req: Request) -> dict[str, Any]:
        fn: Callable[[Request], dict[str, Any]] = getattr(self, "v_" + req.verb)
        return fn(req)

    # -- helpers ------------------------------------------------------------------

    def _switch(self) -> Any:
        sw = self.agent.flows.switch
        if sw is None or not sw.alive:
            raise APIError(api.UNAVAILABLE, "the agent is not connected to Open vSwitch")
        return sw

    def _table_id(self, name: str) -> int:
        if name not in self.pipeline.ids:
            raise APIError(api.NOT_FOUND, f"no table {name!r}; tables: "
                                          f"{', '.join(self.pipeline.ids)}")
        return self.pipeline.id(name)

    def port_name(self, ofport: int) -> str:
        a = self.agent
        if ofport == a.gateway.ofport:
            return "gateway"
        if a.tun_ofport is not None and ofport == a.tun_ofport:
            return "tunnel"
        for p in a.pods.attachments.values():
            if p.ofport == ofport:
                return f"pod {p.namespace}/{p.name}"
        return f"port {ofport}"

    # -- verbs --------------------------------------------------------------------

    def v_status(self, req: Request) -> dict[str, Any]:
        st = dict(self.agent.status())
        st.setdefault("cluster_cidr", self.agent.cluster.cluster_cidr)
        st.setdefault("ip_masq", self.agent.cluster.ip_masq)
        st.setdefault("api_socket", self.agent.args.api_socket)
        return st

    def v_tables(self, req: Request) -> dict[str, Any]:
        return {"tables": [{"name": n, "id": i} for n, i in self.pipeline.ids.items()]}

    def v_owners(self, req: Request) -> dict[str, Any]:
        return {"owners": self.agent.owner_names()}

    def v_pods(self, req: Request) -> dict[str, Any]:
        return {"pods": [{k: getattr(a, k) for k in a.__dataclass_fields__}
                         for a in self.agent.pods.attachments.values()]}

    def flow_rows(self, table: str | None = None) -> list[FlowRow]:
        """Every flow OVS holds (or one table's), with owners; actions as the agent
        wrote them when OVS holds exactly those, else as OVS reports them."""
        sw = self._switch()
        tid = self._table_id(table) if table else None
        try:
            stats = sw.flow_stats(tid)
        except OFError as e:
            raise APIError(api.UNAVAILABLE, f"flow stats: {e}") from e
        p, o = sw.parser, sw.ofp
        desired = {(self.pipeline.id(f.table), f.priority, match_key(f.osken_match(p))): f
                   for f in self.agent.flows.desired_flows()}
        owners = self.agent.owner_names()
        rows = []
        for s in sorted(stats, key=lambda s: (s.table_id, -s.priority)):
            feat = ck.feature_of(s.cookie)
            f = desired.get((s.table_id, s.priority, match_key(s.match)))
            have = render_actions(s.instructions, self.names)
            same = f is not None and have == render_actions(
                f.osken_instructions(p, o, self.pipeline), self.names)
            o_id = f"{ck.owner_of(s.cookie):#x}"
            own = owners.get(o_id) if feat is not None else None
            rows.append(FlowRow(
                table=self.names.get(s.table_id, str(s.table_id)), table_id=s.table_id,
                priority=s.priority,
                match=f.match_text() if f is not None else render_match(s.match),
                actions=f.actions_text(self.pipeline, names=True) if same and f else have,
                cookie=f"{s.cookie:#x}", round=ck.round_of(s.cookie),
                feature=feat.name.lower() if feat else "foreign", owner_id=o_id,
                owner=own["owner"] if own else "",
                object=own["object"] if own else ("" if feat else "not made by flowcni"),
                n_packets=s.packet_count, n_bytes=s.byte_count,
                duration_s=s.duration_sec + s.duration_nsec / 1e9,
                as_desired=f is None or same))
        return rows

    def v_flows(self, req: Request) -> dict[str, Any]:
        table = api.arg(req, "table", str, required=False)
        return {"flows": [r.to_dict() for r in self.flow_rows(table)]}

    def v_groups(self, req: Request) -> dict[str, Any]:
        sw = self._switch()
        try:
            replies = sw.request(sw.parser.OFPGroupDescStatsRequest(sw.dp, 0), multipart=True)
        except OFError as e:
            raise APIError(api.UNAVAILABLE, f"group stats: {e}") from e
        types = {0: "all", 1: "select", 2: "indirect", 3: "ff"}
        rows = [GroupRow(g.group_id, types.get(g.type, str(g.type)),
                         [f"weight={b.weight}," + render_actions(
                             [sw.parser.OFPInstructionActions(sw.ofp.OFPIT_APPLY_ACTIONS,
                                                              b.actions)], self.names)
                          for b in g.buckets])
                for r in replies for g in r.body]
        return {"groups": [g.to_dict() for g in sorted(rows, key=lambda g: g.group_id)]}

    def v_services(self, req: Request) -> dict[str, Any]:
        svc = self.agent.services
        try:
            packets = self._switch().group_packets() if svc else {}
        except OFError as e:
            raise APIError(api.UNAVAILABLE, f"group stats: {e}") from e
        return {"proxy": self.agent.args.proxy,
                "services": [*svc.describe(), *self.agent.tenants.describe_services()]
                if svc else [],
                "packets": {str(g): n for g, n in packets.items()}}

    def v_tenants(self, req: Request) -> dict[str, Any]:
        return {"node": self.agent.args.node, "encap": self.agent.cluster.encap,
                "tenants": self.agent.tenants.describe()}

    def v_stale(self, req: Request) -> dict[str, Any]:
        try:
            missing, unexpected = self.agent.flows.drift()
            gmissing, gunexpected = self.agent.flows.group_drift()
        except OFError as e:
            raise APIError(api.UNAVAILABLE, str(e)) from e
        out: dict[str, Any] = {
            "missing": [f.ofctl(self.pipeline, names=True) for f in missing],
            "unexpected": [
                f"cookie={s.cookie:#x},table={self.names.get(s.table_id, s.table_id)},"
                f"priority={s.priority}" + (f",{render_match(s.match)}"
                                            if render_match(s.match) else "")
                for s in unexpected]}
        out["missing"] += [g.ofctl(self.pipeline) for g in gmissing]
        out["unexpected"] += [f"group_id={i}" for i in gunexpected]
        guard = self.agent.dpguard
        if guard is not None:  # report only: the guard's own runs repair
            res = guard.check(None, post_ct_only=False, repair=False)
            out["datapath"] = [d.describe() for d in res.stale or []]
            out["datapath_checked"] = res.checked
        return out

    def v_policy(self, req: Request) -> dict[str, Any]:
        """Rules with the packets their conjunctions let through (unless `packets` is
        false: no flow dump), and isolated pods."""
        packets: dict[int, int] = {}
        if api.arg(req, "packets", bool, required=False, default=True) and \
                self.agent.flows.switch is not None:
            for r in self.flow_rows():
                if "conj_id=" in r.match and "conjunction(" not in r.actions:
                    cid = int(r.match.split("conj_id=")[1].split(",")[0])
                    packets[cid] = packets.get(cid, 0) + r.n_packets
        rules = self.agent.policy.describe()
        for r in rules:
            r["packets"] = packets.get(r["conj_id"], 0) if r["conj_id"] else None
        cluster = self.agent.cluster_policy.describe()
        for pol in cluster:
            for cr in pol["rules"]:
                cr["packets"] = sum(packets.get(c, 0) for c in cr["conj_ids"])
        return {"rules": rules, "isolation": self.agent.policy.isolation_report(),
                "cluster": cluster}

    def v_trace(self, req: Request) -> dict[str, Any]:
        flow = api.arg(req, "flow", str)
        if "\n" in flow or len(flow) > 4096:
            raise APIError(api.BAD_REQUEST, "trace: 'flow' must be one line of flow syntax")
        bridge = self.agent.args.bridge
        try:
            out = ofproto_trace.run(self.rundir, bridge, flow)
        except (ofproto_trace.TraceError, OSError) as e:
            raise APIError(api.BAD_REQUEST, str(e)) from e
        node = self.agent.args.node
        parsed = ofproto_trace.parse(out, bridge, self.names, node)
        owners = self.agent.owner_names()
        tun = ""
        for s in parsed.steps:
            if s.cookie:
                o = owners.get(f"{ck.owner_of(int(s.cookie, 16)):#x}")
                if o:
                    s.owner, s.object = o["owner"], o["object"]
            tun = next((a.split(":")[1].split("->")[0] for a in s.actions if "->tun_dst" in a),
                       tun)
        res = TraceResult(node, parsed.steps, parsed.datapath_actions, parsed.output_port,
                          self.port_name(parsed.output_port)
                          if parsed.output_port is not None else "",
                          parsed.tunnel, tun, [list(g) for g in parsed.groups],
                          parsed.nat_dst)
        return res.to_dict()

    def v_traceflow(self, req: Request) -> dict[str, Any]:
        step = api.arg(req, "step", str)
        if step not in ("arm", "inject", "collect", "disarm"):
            raise APIError(api.BAD_REQUEST, f"traceflow: step {step!r}: use arm, inject, "
                                            "collect or disarm")
        api.arg(req, "dscp", int)
        try:
            return self.agent.traceflow.handle(step, req.args)
        except (ValueError, KeyError) as e:
            raise APIError(api.NOT_FOUND if "not on this node" in str(e) else api.BAD_REQUEST,
                           f"traceflow {step}: {e}") from e


class _Conn(socketserver.StreamRequestHandler):
    server: Server

    def handle(self) -> None:
        raw = self.rfile.read(api.MAX_MESSAGE)
        try:
            req = Request.decode(raw)
            reply = api.encode_reply(self.server.context.handle(req))
        except APIError as e:
            reply = api.encode_reply(error=e)
        except Exception as e:
            LOG.exception("agent API request failed")
            reply = api.encode_reply(error=APIError(api.INTERNAL, f"{type(e).__name__}: {e}"))
        self.wfile.write(reply)


class APIServer(UnixServer):
    """The socket: mode 0600, or 0660 with `group` (the directory then 0710 to it)."""

    def __init__(self, path: str, handler: AgentAPI, group: str = "") -> None:
        gid = -1
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError as e:
                raise ValueError(f"--api-group {group!r}: no such group") from e
        super().__init__(path, _Conn, handler, name="api-server", gid=gid)
