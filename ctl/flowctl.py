"""flowctl: the operator's tool, a client of the flowcni agent API.

Every command asks agents; where they are comes from a node provider:
  this node      --agent-socket PATH, or $FLOWCNI_AGENT_SOCKET, or the default
                 socket (/run/flowcni/agent.sock)
  a cluster      --kubeconfig FILE / --context NAME: the DaemonSet's agent pods,
                 reached by pod exec through the API server
  the lab        --lab (and `flowctl lab ...`); without any option, a lab that is
                 up is used (flowctl says so on stderr), else the default socket
--node NAME picks one node in all three. Flows are what OVS holds (OpenFlow flow
stats read by the agent), shown with table names and owners.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any

from flowcni.api import schema as api
from flowcni.api.schema import FlowRow
from flowcni.ctl.client import AgentClient, AgentError
from flowcni.ctl.providers import (
    AGENT_NAMESPACE,
    AGENT_SELECTOR,
    COMMAND_GROUP,
    NodeAgent,
    from_args,
    plugins,
    select,
)
from flowcni.ctl.services import service_rows
from flowcni.ctl.trace import PROTOS, Tracer
from flowcni.datastore.store import Store, StoreError
from flowcni.flows.tables import DEFAULT as PIPELINE

TABLES = list(PIPELINE.ids)
Handler = Callable[[argparse.Namespace], int]


class CLIError(RuntimeError):
    pass


def _agents(a: argparse.Namespace) -> list[NodeAgent]:
    p = from_args(a)
    if getattr(a, "announce", True) and p.kind == "lab" and not getattr(a, "lab", False):
        print(f"flowctl: using {p.describe()} (choose with --agent-socket, --kubeconfig "
              "or --lab)", file=sys.stderr)
    return select(p, a.node)


def print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip())


# -- status ---------------------------------------------------------------------------


STATUS_COLS = ["node", "connected", "synced", "round", "pods", "flows", "pod_cidr", "node_ip",
               "encap", "bridge", "datastore", "applied_revision", "change_failures"]


def status_rows(statuses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per node; a node whose agent failed shows the error."""
    rows = []
    for st in statuses:
        if "error" in st:
            rows.append({"node": st["node"], "connected": "ERROR", "synced": st["error"]})
        else:
            row = {c: ("yes" if st.get(c) else "no") if c in ("connected", "synced")
                   else st.get(c, "") for c in STATUS_COLS}
            # how many objects' changes the agent could not apply (--json names them)
            row["change_failures"] = len(st.get("change_failures") or ())
            rows.append(row)
    return rows


def cmd_status(a: argparse.Namespace) -> int:
    return show_status(_agents(a), a.json)


def show_status(agents: list[NodeAgent], as_json: bool = False) -> int:
    out: list[dict[str, Any]] = []
    for n in agents:
        try:
            out.append({**n.call("status"), "node": n.name})
        except AgentError as e:
            out.append({"node": n.name, "error": str(e)})
    if as_json:
        print(json.dumps(out, indent=1))
    else:
        print_table(status_rows(out), STATUS_COLS)
    return 0 if all("error" not in s for s in out) else 1


# -- flows, groups, tables --------------------------------------------------------------


def _pod_owners(n: NodeAgent, ref: str) -> set[str]:
    ns, _, name = ref.rpartition("/")
    ns = ns or "default"
    for p in n.call("pods")["pods"]:
        if p["namespace"] == ns and p["name"] == name:
            return {f"pod:{p['key']}", f"isolation:{ns}/{name}"}
    return set()


def _tenant_owners(n: NodeAgent, name: str) -> set[str]:
    """The owners of the flows tenant network `name` meets on node `n`, as its agent
    names them (its own, its pods', its Services', and those every tenant shares);
    empty: no such tenant."""
    t = next((t for t in n.call("tenants")["tenants"] if t["name"] == name), None)
    if t is None:
        return set()
    if "owners" not in t:  # an agent from before the owners were named by the agent
        raise CLIError(f"node {n.name}: its agent does not name tenant {name}'s flows "
                       "(older than this flowctl); upgrade the agent")
    return {*t["owners"], *t.get("shared_owners", ())}


def cmd_tenants(a: argparse.Namespace) -> int:
    """Tenant networks as each node resolves them: VNI, zone, slice, pods, conditions."""
    return show_tenants(_agents(a), a.tenant, a.json)


def show_tenants(agents: list[NodeAgent], tenant: str | None = None,
                 as_json: bool = False) -> int:
    rows: list[dict[str, Any]] = []
    for n in agents:
        r = n.call("tenants")
        for t in r["tenants"]:
            if tenant and t["name"] != tenant:
                continue
            rows.append({"node": n.name, **t})
    if tenant and not rows:
        raise CLIError(f"no TenantNetwork {tenant}")
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print_table([{
        "node": r["node"], "tenant": r["name"], "vni": r["vni"] or "-",
        "zone": r["zone"] or "-", "subnets": ",".join(r["subnets"]) or "-",
        "namespaces": ",".join(r["namespaces"]) or "-", "slice": r["node_slice"] or "-",
        "pods": len(r["pods"]),
        "status": "ok" if r["ok"] else "refused",
    } for r in rows], ["node", "tenant", "vni", "zone", "subnets", "namespaces", "slice",
                       "pods", "status"])
    seen: set[tuple[str, str, str]] = set()
    for r in rows:  # conditions are the same on every node: say each once
        for c in r["conditions"]:
            key = (r["name"], c["type"], c["message"])
            if key in seen or (c["type"] == "Ready" and c["status"] == "True"):
                continue
            seen.add(key)
            print(f"{r['name']}: {c['type']} ({c['reason']}): {c['message']}")
        for p in r.get("stale_pods") or []:
            print(f"{r['name']}: pod {p} on {r['node']} runs on the network its namespace "
                  "had when it started; restart it to move it")
    return 0


def cmd_flows(a: argparse.Namespace) -> int:
    """A node's flows as OVS holds them, with table names and owners; or the drift."""
    return show_flows(_agents(a), a)


def show_flows(agents: list[NodeAgent], a: Any) -> int:
    """`a` carries the options of `flows` (table, pod, policy, stale, json, no_stats)."""
    out: list[dict[str, Any]] = []
    pod_found = tenant_found = False
    for n in agents:
        if a.stale:
            st = n.call("stale")
            out.append({"node": n.name, "missing": st["missing"],
                        "unexpected": st["unexpected"],
                        # cached datapath flows the installed tables no longer give
                        "datapath": st.get("datapath", [])})
            continue
        args = {"table": a.table} if a.table else {}
        rows = [FlowRow.from_dict(r) for r in n.call("flows", **args)["flows"]]
        if a.pod:
            wanted = _pod_owners(n, a.pod)
            pod_found |= bool(wanted)
            rows = [r for r in rows if r.owner in wanted]
        if a.service:
            rows = [r for r in rows if r.owner == f"service:{a.service}"]
        if getattr(a, "tenant", None):
            wanted = _tenant_owners(n, a.tenant)
            tenant_found |= bool(wanted)
            rows = [r for r in rows if r.owner in wanted]
        if a.policy:
            rules = [r for r in n.call("policy")["rules"]
                     if r["rule"].startswith(a.policy + "/")]
            ids = {r["conj_id"] for r in rules if r["conj_id"]}
            conj = re.compile(r"conjunction\((\d+),")
            rows = [r for r in rows if r.owner.startswith(f"rule:{a.policy}/")
                    or any(int(x) in ids for x in conj.findall(r.actions))]
        out.append({"node": n.name, "flows": [r.to_dict() for r in rows]})
        if not a.json:
            print(f"# {n.name}: {len(rows)} flows")
            for r in rows:
                print(r.text(stats=not a.no_stats))
    if getattr(a, "tenant", None) and not tenant_found:
        raise CLIError(f"--tenant {a.tenant}: no TenantNetwork of that name on "
                       f"{', '.join(x['node'] for x in out) or 'any node'}")
    if a.pod and not pod_found:
        raise CLIError(f"--pod {a.pod}: no such pod on "
                       f"{', '.join(x['node'] for x in out) or 'any node'}")
    if a.json:
        print(json.dumps(out, indent=1))
    elif a.stale:
        for x in out:
            print(f"# {x['node']}: {len(x['missing'])} missing, "
                  f"{len(x['unexpected'])} unexpected, "
                  f"{len(x['datapath'])} stale datapath flows")
            for f in x["missing"]:
                print(f"missing     {f}")
            for f in x["unexpected"]:
                print(f"unexpected  {f}")
            for f in x["datapath"]:
                print(f"datapath    {f}")
    return 0


def cmd_groups(a: argparse.Namespace) -> int:
    out = [{"node": n.name, "groups": n.call("groups")["groups"]} for n in _agents(a)]
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    for x in out:
        print(f"# {x['node']}: {len(x['groups'])} groups")
        for g in x["groups"]:
            print(f"group_id={g['group_id']},type={g['type']},"
                  + ",".join(f"bucket={b}" for b in g["buckets"]))
    return 0


def cmd_tables(a: argparse.Namespace) -> int:
    out = [{"node": n.name, "tables": n.call("tables")["tables"]} for n in _agents(a)]
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    for x in out:
        print(f"# {x['node']}")
        print_table(x["tables"], ["id", "name"])
    return 0


# -- policy ----------------------------------------------------------------------------


def policy_rows(node: str, rep: dict[str, Any], only: str | None) -> list[dict[str, Any]]:
    """Rules as realized, then what isolation does: a pod selected by a policy
    without a rule that allows a packet drops it (deny-all policies have no rules
    at all, and this is where they show)."""
    rows = []
    for r in rep["rules"]:
        ns, name, direction, idx = r["rule"].split("/")
        if only and only != f"{ns}/{name}":
            continue
        rows.append({"node": node, "policy": f"{ns}/{name}", "rule": f"{direction}[{idx}]",
                     "pods": len(r["pods"]),
                     "peers": "any" if r["peers"] is None else len(r["peers"]),
                     "ports": "any" if r["ports"] is None else ",".join(r["ports"]),
                     "flows": r["flows"], "conj_id": r["conj_id"],
                     "packets": "-" if r.get("packets") is None else r["packets"],
                     "detail": r})
    isolated: dict[tuple[str, str], list[str]] = {}
    for pod, dirs in sorted(rep.get("isolation", {}).items()):
        for direction, pols in dirs.items():
            for pol in pols:
                if not only or only == pol:
                    isolated.setdefault((pol, direction), []).append(pod)
    for (pol, direction), pods in sorted(isolated.items()):
        rows.append({"node": node, "policy": pol, "rule": f"{direction}: isolates",
                     "pods": len(pods), "peers": "-", "ports": "-", "flows": "-",
                     "conj_id": None, "packets": "-",
                     "detail": {"isolated_pods": pods, "direction": direction,
                                "effect": f"{direction} not allowed by a rule is dropped"}})
    return rows


def cluster_policy_rows(node: str, rep: dict[str, Any], only: str | None
                        ) -> list[dict[str, Any]]:
    """Cluster policies in evaluation order (tier, priority, then the tie-break by name
    and kind the agent uses), one row per rule as realized on the node."""
    rows = []
    for pol in rep.get("cluster", []):
        ref = f"{pol['kind']}/{pol['name']}"
        if only and only not in (ref, pol["name"]):
            continue
        for r in pol["rules"]:
            rows.append({"node": node, "order": pol["order"], "tier": pol["tier"],
                         "priority": pol["priority"], "policy": ref,
                         "rule": f"{r['direction']}[{r['index']}]"
                         + (f" {r['name']}" if r["name"] else ""),
                         "action": r["action"], "pods": r["subjects"], "flows": r["flows"],
                         "of_priority": r["of_priority"] if r["of_priority"] is not None
                         else "-", "packets": r.get("packets", "-"), "detail": r})
    return rows


def cmd_policy(a: argparse.Namespace) -> int:
    """Each rule as realized on each node, and the pods each policy isolates."""
    return show_policy(_agents(a), a.policy, a.json)


def show_policy(agents: list[NodeAgent], policy: str | None = None,
                as_json: bool = False) -> int:
    rows: list[dict[str, Any]] = []
    crows: list[dict[str, Any]] = []
    for n in agents:
        rep = n.call("policy")
        rows += policy_rows(n.name, rep, policy)
        crows += cluster_policy_rows(n.name, rep, policy)
    if policy and not rows and not crows:
        raise CLIError(f"policy {policy}: not realized on any node (no such policy, or it "
                       "selects no pod there)")
    if as_json:
        print(json.dumps(rows + crows, indent=1))
        return 0
    if crows:
        print("cluster policies (Admin tier, then NetworkPolicy, then Baseline tier):")
        print_table(crows, ["node", "order", "tier", "priority", "policy", "rule", "action",
                            "pods", "flows", "of_priority", "packets"])
    if rows or not crows:
        print_table(rows, ["node", "policy", "rule", "pods", "peers", "ports", "flows",
                           "packets"])
        for r in rows:
            if "isolated_pods" in r["detail"]:
                print(f"  {r['node']}: {r['policy']} isolates "
                      f"{', '.join(r['detail']['isolated_pods'])} ({r['detail']['effect']})")
    return 0


def cmd_services(a: argparse.Namespace) -> int:
    """Each Service port per node: ClusterIP, endpoints, group, packets per bucket."""
    return show_services(_agents(a), a.service, a.json)


def show_services(agents: list[NodeAgent], service: str | None = None,
                  as_json: bool = False) -> int:
    rows = service_rows(agents, service)
    if service and not rows:
        raise CLIError(f"no Service {service} on {', '.join(n.name for n in agents)}")
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        print_table([{**r, "endpoints": ",".join(r["endpoints"]) or "-",
                      "packets": ",".join(map(str, r["packets"])) or "-",
                      "nodePort": r.get("nodePort") or "-",
                      "external": ",".join(r.get("external") or []) or "-",
                      "affinity": f"{r['affinity']}s" if r.get("affinity") else "-",
                      "tenant": (f"{r['tenant']} (VNI {r['vni']})" if r.get("tenant")
                                 else "-")}
                     for r in rows],
                    ["node", "tenant", "service", "type", "clusterIP", "port", "nodePort",
                     "external", "trafficPolicy", "affinity", "endpoints", "group", "packets"])
    return 0


# -- trace -----------------------------------------------------------------------------


class _Agents:
    def __init__(self, agents: list[NodeAgent]) -> None:
        self._a = agents

    def agents(self) -> list[NodeAgent]:
        return self._a


def cmd_trace(a: argparse.Namespace) -> int:
    """Trace a new connection through OVS on every node it crosses; exit 0 if it reaches
    its destination (a pod, the node, or out of the node), 3 if not."""
    return show_trace(_agents(a), a.src, a.dst, a.proto, a.dport, a.live, a.json)


def show_trace(agents: list[NodeAgent], src: str, dst: str, proto: str = "tcp",
               dport: int | None = None, live: bool = False, as_json: bool = False) -> int:
    tracer = Tracer(_Agents(agents))
    if live:
        r = tracer.live(src, dst, proto, dport)
        if as_json:
            print(json.dumps(r, indent=1))
        else:
            for o in r["observations"]:
                what = f"left through {o['output']}" if not o["dropped"] else "dropped"
                print(f"  {o['node']}: {o['table']}: {what} ({o['owner'] or 'table default'})")
            verdict = "DELIVERED" if r["delivered"] else "DROPPED"
            print(f"live verdict: {verdict} on {r['node'] or '?'} at {r['table'] or '?'}"
                  f"{' to ' + r['output'] if r['delivered'] else ''}; "
                  f"ofproto/trace {'agrees' if r['matches_trace'] else 'DISAGREES'}: "
                  f"{r['trace']['detail']}")
        return 0 if r["delivered"] else 3
    v = tracer.trace(src, dst, proto, dport)
    if as_json:
        print(json.dumps(v.as_dict(), indent=1))
    else:
        node = None
        for s in v.steps:
            if s.node != node:
                node = s.node
                print(f"# {node}")
            print(f"  {s.story}")
        if v.service:
            print(f"  {service_line(v.service)}")
        word = {"delivered": "DELIVERED", "left-node": "LEAVES THE NODE",
                "dropped": "DROPPED", "nowhere": "NOWHERE"}[v.outcome]
        net = f" (tenant network {v.tenant}, VNI {v.vni})" if v.tenant else ""
        print(f"verdict: {word}: {v.detail}{net}")
    return 0 if v.delivered else 3


def service_line(hop: dict[str, Any]) -> str:
    """The Service hop of a trace in words: which bucket took the packet, and why that one."""
    head = (f"Service {hop['service']} {hop['cluster_ip']}:{hop['port']}/"
            f"{hop['protocol'].upper()}" if "service" in hop else "Service")
    if "endpoint" not in hop:
        return f"{head}: no endpoint took the packet (endpoints: {len(hop.get('endpoints', []))})"
    how = (f"dp_hash {hop['dp_hash']} (the tracer's stand-in: the datapath hashes the real "
           "packet, so a real connection may take another bucket)" if hop.get("dp_hash")
           else "picked by OVS from the packet's fields")
    n = len(hop.get("endpoints", []))
    return (f"{head}: group {hop['group']}, bucket {'/'.join(map(str, hop['buckets']))} by "
            f"{how} -> endpoint {hop['endpoint']}" + (f" (one of {n})" if n else ""))


# -- apply, call, probe ------------------------------------------------------------------


def _store_path(a: argparse.Namespace) -> str:
    """--datastore sqlite:PATH (or $FLOWCNI_DATASTORE), else the lab's store, else the
    embedded store the local agent uses.

    A node outside the lab keeps its objects in the file its agent was started with;
    a missing file means a wrong path, so it is never created empty here.
    """
    if a.datastore:
        spec = str(a.datastore)
        path = spec[len("sqlite:"):] if spec.startswith("sqlite:") else ""
        if not path:
            raise CLIError(f"--datastore {spec!r}: flowctl writes to an embedded store, "
                           "sqlite:PATH (on Kubernetes, use kubectl apply)")
        if not os.path.isfile(path):
            raise CLIError(f"--datastore {spec}: no store at {path} (the agent creates it: "
                           f"flowcni-agent --datastore {spec} ...)")
        return path
    p = from_args(a)
    lab_store = getattr(p, "store_path", None)
    if lab_store:
        return str(lab_store)
    ds = str(select(p, a.node)[0].call("status").get("datastore", ""))
    if ds.startswith("sqlite:"):
        return ds[len("sqlite:"):]
    raise CLIError(f"the agent's datastore is {ds!r}: apply Kubernetes objects with kubectl, "
                   "or give --datastore sqlite:PATH")


def cmd_apply(a: argparse.Namespace) -> int:
    """apply -f / delete -f: validate every object first, then write them all."""
    try:
        with (sys.stdin if a.file == "-" else open(a.file)) as f:
            text = f.read()
    except OSError as e:
        raise CLIError(f"{a.file}: {e}") from e
    path = _store_path(a)
    if not os.path.exists(path):
        raise CLIError(f"no embedded store at {path}")
    store = Store(path)
    from flowcni.datastore.manifests import ManifestError, load
    try:
        # Parsed and checked before the store's write lock is taken: agents' writes
        # (pod records, VNIs) wait for that lock, not for a big file's parse.
        rng = store.cluster().node_ports
        objs = load(text, identity_only=a.cmd == "delete", node_port_range=rng,
                    require_node_ports=False)
    except (ManifestError, StoreError) as e:
        raise CLIError(f"{a.file}: {e}") from e
    try:
        # One write transaction from the first read to the last write: two applies at
        # once (or an apply next to an agent's write) are serialised, so both cannot
        # read the same free node ports and allocate one twice, and a refused file
        # writes nothing.
        with store.exclusive():
            done = _apply_locked(a, store, objs, rng)
    except StoreError as e:
        raise CLIError(f"{a.file}: {e}") from e
    for line in done:  # once committed
        print(line)
    return 0


def _apply_locked(a: argparse.Namespace, store: Store, objs: list[Any],
                  rng: tuple[int, int]) -> list[str]:
    """cmd_apply's reads, checks and writes of the parsed objects, inside the store's
    exclusive transaction; what was done, one line per object."""
    from flowcni.datastore import nodeports
    from flowcni.datastore.manifests import ManifestError
    from flowcni.flows.services import ServiceError, parse_service
    try:
        # The store is the API server here: node ports are checked against the
        # cluster's range and missing ones allocated (datastore/nodeports.py).
        if a.cmd == "apply":
            objs = nodeports.assign(objs, store.objects("Service"), rng)
            for k, ns, n, b in objs:  # what is written is checked as the agents will
                if k == "Service":
                    try:
                        parse_service(ns, n, b["spec"], b.get("status"), rng)
                    except ServiceError as e:
                        raise ManifestError(f"Service {ns}/{n}: {e}") from e
    except (ManifestError, nodeports.NodePortError) as e:
        raise CLIError(f"{a.file}: {e}") from e
    if a.cmd == "apply":  # refused updates refuse the whole file, before any write
        objs = [(k, ns, n, _tenant_update(store, n, b) if k == "TenantNetwork" else b)
                for k, ns, n, b in objs]
    done = []
    for kind, ns, name, body in objs:
        ref = f"{kind.lower()}/{ns + '/' if ns else ''}{name}"
        if a.cmd == "apply":
            store.put(kind, ns, name, body)
            done.append(f"{ref} applied")
        else:
            done.append(f"{ref} {'deleted' if store.delete(kind, ns, name) else 'not found'}")
    return done


def _tenant_update(store: Store, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """A TenantNetwork keeps its creation time; its immutable fields stay as they are."""
    import datetime

    from flowcni.datastore.tenantconv import TenantError, for_update
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        return for_update(store.get("TenantNetwork", "", name), body, now)
    except TenantError as e:
        raise CLIError(f"TenantNetwork {name}: {e}") from e


def cmd_call(a: argparse.Namespace) -> int:
    """One raw API request to the local agent; prints the reply as the agent sent it
    (this is what cluster mode runs inside each agent pod)."""
    path = a.agent_socket or os.environ.get(api.SOCKET_ENV) or api.DEFAULT_SOCKET
    try:
        args = json.loads(a.args)
        raw = api.Request(a.verb, args if isinstance(args, dict) else {}).encode()
        reply = AgentClient(path).exchange(raw)
    except (ValueError, AgentError) as e:
        code = getattr(e, "code", api.BAD_REQUEST)
        reply = api.encode_reply(error=api.APIError(code, str(e)))
    sys.stdout.write(reply.decode())
    sys.stdout.flush()
    return 0 if json.loads(reply).get("ok") else 1


def probe(socket_path: str, ready: bool, timeout: float) -> int:
    """Liveness (the agent answers CNI STATUS at all) and readiness (STATUS says ready:
    synced with OVS). Uses the CNI socket's own STATUS verb, so a probe needs nothing
    the plugin would not."""
    import socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(json.dumps({"command": "STATUS"}).encode())
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(b"".join(iter(lambda: s.recv(65536), b"")))
    except (OSError, ValueError) as e:
        print(f"flowcni agent not answering on {socket_path}: {e}")
        return 1
    if ready and not reply.get("ok"):
        print(f"flowcni agent not ready: {reply.get('msg')} (code {reply.get('code')})")
        return 1
    return 0


# -- parser ----------------------------------------------------------------------------


def _connection_options(p: argparse.ArgumentParser, top: bool) -> None:
    """Where the agents are; on the top level and again after each verb (there they
    only override when given)."""
    d: Any = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("where the agents are")
    g.add_argument("--agent-socket", metavar="PATH", default=d(None),
                   help=f"this node's agent API socket (default: ${api.SOCKET_ENV}, else "
                   f"{api.DEFAULT_SOCKET}, unless a lab is up)")
    g.add_argument("--kubeconfig", metavar="FILE", default=d(None),
                   help="a cluster: reach the DaemonSet's agents through this kubeconfig")
    g.add_argument("--context", default=d(None),
                   help="a cluster: kubeconfig context (default: the current one)")
    g.add_argument("--agent-namespace", default=d(AGENT_NAMESPACE),
                   help="a cluster: namespace of the agent pods (default: %(default)s)"
                   if top else argparse.SUPPRESS)
    g.add_argument("--agent-selector", default=d(AGENT_SELECTOR),
                   help="a cluster: label selector of the agent pods (default: %(default)s)"
                   if top else argparse.SUPPRESS)
    g.add_argument("--lab", action="store_true", default=d(False),
                   help="the embedded lab ($FLOWCNI_LAB_DIR, default /run/flowcni-lab)")
    g.add_argument("--node", default=d(None),
                   help="only this node (default: every node the provider knows)")


def build_parser(extra: dict[str, Callable[..., dict[str, Handler]]] | None = None
                 ) -> argparse.ArgumentParser:
    """flowctl's parser; each command's handler is its `func` default. `extra`: command
    plugins (default: the `flowcni.flowctl_commands` entry points, i.e. the lab's)."""
    p = argparse.ArgumentParser(prog="flowctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def verb(name: str, fn: Handler, help_: str, conn: bool = True) -> argparse.ArgumentParser:
        x = sub.add_parser(name, help=help_, description=help_)
        if conn:
            _connection_options(x, top=False)
        x.set_defaults(func=fn)
        return x

    st = verb("status", cmd_status, "agent status per node (a table; --json for all fields)")
    st.add_argument("--json", action="store_true", help="every status field, as JSON")
    fl = verb("flows", cmd_flows, "flows as OVS holds them, with table names and owners")
    fl.add_argument("--table", choices=TABLES, metavar="TABLE",
                    help="only this table; one of: " + ", ".join(TABLES))
    fl.add_argument("--no-stats", action="store_true", help="leave packet/byte counts out")
    fl.add_argument("--pod", metavar="NS/NAME", help="only the flows this pod owns")
    fl.add_argument("--policy", metavar="NS/NAME",
                    help="only the flows this policy's rules use")
    fl.add_argument("--service", metavar="NS/NAME",
                    help="only this Service's flows (its groups: flowctl services)")
    fl.add_argument("--tenant", metavar="NAME",
                    help="only this tenant network's flows and its pods' flows")
    fl.add_argument("--json", action="store_true", help="machine-readable (see README)")
    fl.add_argument("--stale", action="store_true",
                    help="what OVS holds that the agent does not want, and the reverse; "
                    "and cached datapath flows the installed tables no longer give")
    gr = verb("groups", cmd_groups, "OpenFlow groups as OVS holds them")
    gr.add_argument("--json", action="store_true")
    tb = verb("tables", cmd_tables, "the pipeline's tables (name and number)")
    tb.add_argument("--json", action="store_true")
    po = verb("policy", cmd_policy, "NetworkPolicy rules as realized on each node, and the "
              "pods each policy isolates")
    po.add_argument("policy", nargs="?", metavar="NS/NAME", help="only this policy "
                    "(default: all)")
    po.add_argument("--json", action="store_true")
    sv = verb("services", cmd_services, "Services as each node's agent programs them: "
              "ClusterIP, ports, endpoints, group, packets per bucket")
    sv.add_argument("service", nargs="?", metavar="NS/NAME", help="only this Service "
                    "(default: all)")
    sv.add_argument("--json", action="store_true")
    tn = verb("tenants", cmd_tenants, "tenant networks as each node resolves them: VNI, "
              "conntrack zone, subnets, namespaces, this node's slice, pods, conditions")
    tn.add_argument("tenant", nargs="?", metavar="NAME", help="only this tenant network")
    tn.add_argument("--json", action="store_true")
    tr = verb("trace", cmd_trace, "trace a packet from a pod through every node it crosses "
              "(exit 3 when it does not get there)")
    tr.add_argument("--from", dest="src", required=True, metavar="NS/POD",
                    help="source pod (namespace defaults to 'default')")
    tr.add_argument("--to", dest="dst", required=True, metavar="NS/NAME[:PORT]|IP",
                    help="destination: a Service (NS/NAME, optionally :PORT, a number or a "
                    "port name; a Service wins over a pod of the same name), a pod, or an IP "
                    "address (a ClusterIP is traced through its Service)")
    tr.add_argument("--proto", default="tcp", choices=PROTOS,
                    help="protocol (default: %(default)s)")
    tr.add_argument("--dport", type=int, metavar="PORT",
                    help="destination port, tcp/udp/sctp only (default: 80)")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--live", action="store_true",
                    help="inject a real marked packet and report where it went "
                    "(default: ofproto/trace only)")
    for name in ("apply", "delete"):
        ap = verb(name, cmd_apply, f"{name} Kubernetes YAML objects in an embedded datastore "
                  "(the lab's, or the one the agent uses)")
        ap.add_argument("-f", "--file", required=True, help="YAML file, or - for stdin")
        ap.add_argument("--datastore", metavar="sqlite:PATH",
                        default=os.environ.get("FLOWCNI_DATASTORE"),
                        help="the embedded store of a node (the path its agent's --datastore "
                        "names; default: $FLOWCNI_DATASTORE, else the lab's store, else the "
                        "local agent's)")
    ca = verb("call", cmd_call, "one raw agent API request to the local agent, reply "
              "printed as JSON (used by cluster mode inside agent pods)", conn=False)
    ca.add_argument("--agent-socket", metavar="PATH", default=argparse.SUPPRESS,
                    help=f"agent API socket (default: ${api.SOCKET_ENV}, else "
                    f"{api.DEFAULT_SOCKET})")
    ca.add_argument("verb", choices=list(api.VERBS), metavar="VERB",
                    help="one of: " + ", ".join(api.VERBS))
    ca.add_argument("args", nargs="?", default="{}", help="arguments as a JSON object "
                    "(default: {})")
    pr = verb("probe", lambda a: probe(a.socket, a.ready, a.timeout),
              "liveness/readiness probe of this node's agent (CNI STATUS)", conn=False)
    pr.add_argument("--socket", default="/run/flowcni/cni.sock",
                    help="the agent's CNI socket (default: %(default)s)")
    pr.add_argument("--ready", action="store_true",
                    help="also require sync with OVS (default: only that it answers)")
    pr.add_argument("--timeout", type=float, default=5.0, help="seconds (default: %(default)s)")
    ic = verb("install-cni", _install_cni, "install the flowcni plugin launcher", conn=False)
    ic.add_argument("--dest", default="/opt/cni/bin", help="directory (default: %(default)s)")
    ic.add_argument("--python", default=None,
                    help="interpreter the launcher runs (default: the base interpreter of this "
                         "one, outside any venv); it must be this one's version")
    for register in (extra if extra is not None else plugins(COMMAND_GROUP)).values():
        for name, fn in register(sub).items():
            sub.choices[name].set_defaults(func=fn)
    return p


def _install_cni(a: argparse.Namespace) -> int:
    from flowcni.cni.install import install
    print(install(a.dest, python=a.python))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if argv is None:
        # the command itself (not a caller passing argv, such as a test or the lab, whose
        # own sockets must keep raising BrokenPipeError): `flowctl flows | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        rc: int = a.func(a)
        return rc
    except (RuntimeError, OSError, StoreError) as e:  # CLIError, ProviderError, AgentError,
        # TraceError; StoreError: e.g. the store is locked
        print(f"flowctl: {e}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
