"""flowctl: the operator's tool (lab, flows, status, install-cni).

Flows are read from OVS itself (ovs-ofctl in the node's netns) and shown
with the table names the agent published on the bridge, so what is printed
is what the switch holds, not what the agent believes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

from flowcni.ctl import inspect
from flowcni.ctl.client import AgentClient, AgentError
from flowcni.lab.lab import Lab, LabError, parse_labels, parse_ports


def cmd_flows(lab: Lab, a: argparse.Namespace) -> int:
    """A node's flows as OVS holds them, with table names and owners; or the drift."""
    out: list[dict[str, Any]] = []
    for node in ([lab.node(a.node)] if a.node else lab.nodes()):
        agent = AgentClient(node.socket)
        if a.stale:
            st = agent.call("_stale")
            out.append({"node": node.name, "missing": st["missing"],
                        "unexpected": st["unexpected"]})
            continue
        rows = inspect.node_flows(node.ovs, agent.call("_owners")["owners"])
        if a.table:
            rows = [r for r in rows if r.table == a.table]
        if a.pod:
            pod = lab.pod(a.pod)
            wanted = {f"pod:{pod.container_id}/eth0", f"isolation:{pod.ref}"}
            rows = [r for r in rows if r.owner in wanted]
        if a.service:
            rows = [r for r in rows if r.owner == f"service:{a.service}"]
        if a.policy:
            rules = [r for r in agent.call("_policy")["rules"]
                     if r["rule"].startswith(a.policy + "/")]
            ids = {r["conj_id"] for r in rules if r["conj_id"]}
            conj = re.compile(r"conjunction\((\d+),")
            rows = [r for r in rows if r.owner.startswith(f"rule:{a.policy}/")
                    or any(int(x) in ids for x in conj.findall(r.actions))]
        out.append({"node": node.name, "flows": [r.as_dict() for r in rows]})
        if not a.json:
            print(f"# {node.name}: {len(rows)} flows")
            for r in rows:
                print(r.text(stats=not a.no_stats))
    if a.json:
        print(json.dumps(out, indent=1))
    elif a.stale:
        for n in out:
            print(f"# {n['node']}: {len(n['missing'])} missing, "
                  f"{len(n['unexpected'])} unexpected")
            for f in n["missing"]:
                print(f"missing     {f}")
            for f in n["unexpected"]:
                print(f"unexpected  {f}")
    return 0


def cmd_status(lab: Lab, a: argparse.Namespace) -> int:
    out = []
    for node in ([lab.node(a.node)] if a.node else lab.nodes()):
        try:
            out.append(AgentClient(node.socket).status())
        except (OSError, AgentError) as e:
            out.append({"node": node.name, "error": str(e)})
    print(json.dumps(out, indent=1))
    return 0 if all("error" not in s for s in out) else 1


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def cmd_lab(lab: Lab, a: argparse.Namespace) -> int:
    if a.lab_cmd == "up":
        nodes = lab.up(a.nodes, a.cluster_cidr, a.node_cidr_size, a.encap)
        print(f"lab up ({a.encap}): "
              f"{', '.join(f'{n.name} {n.node_ip} pods {n.pod_cidr}' for n in nodes)}")
    elif a.lab_cmd == "node":
        if a.node_cmd == "add":
            n = lab.node_add()
            print(f"node {n.name} up: {n.node_ip}, pods {n.pod_cidr}")
        else:
            lab.node_del(a.name)
            print(f"node {a.name} removed")
    elif a.lab_cmd == "down":
        removed = lab.down()
        print(f"lab down: removed {len(removed)} namespaces")
    elif a.lab_cmd == "nodes":
        rows = []
        for n in lab.nodes():
            rows.append({"name": n.name, "node_ip": n.node_ip or "-", "pod_cidr": n.pod_cidr,
                         "netns": n.netns, "agent_pid": n.agent_pid})
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            _print_table(rows, ["name", "node_ip", "pod_cidr", "netns"])
    elif a.lab_cmd == "pods":
        rows = [{"name": p.name, "namespace": p.namespace, "node": p.node, "ip": p.ip,
                 "mac": p.mac, "labels": p.labels, "netns": p.netns} for p in lab.pods()]
        if a.json:
            print(json.dumps(rows, indent=1))
        else:
            _print_table([{**r, "labels": ",".join(f"{k}={v}" for k, v in r["labels"].items())}
                          for r in rows], ["namespace", "name", "node", "ip", "mac", "labels"])
    elif a.lab_cmd == "pod":
        if a.pod_cmd == "add":
            p = lab.pod_add(a.name, a.node, a.namespace, parse_labels(a.labels),
                            parse_ports(a.ports))
            print(f"pod {p.ref} on {p.node}: {p.ip} {p.mac}")
        else:
            p = lab.pod_del(f"{a.namespace}/{a.name}")
            print(f"pod {p.ref} deleted")
    elif a.lab_cmd == "exec":
        argv = a.argv[1:] if a.argv and a.argv[0] == "--" else a.argv
        if not argv:
            raise LabError("lab exec POD -- CMD: no command given")
        return subprocess.call(lab.exec_argv(a.pod, argv))
    elif a.lab_cmd == "restart-agent":
        lab.restart_agent(a.node, kill=True)
        print(f"agent of {a.node} restarted")
    return 0


def cmd_apply(lab: Lab, a: argparse.Namespace) -> int:
    """apply -f / delete -f: validate every object first, then write them all."""
    from flowcni.datastore.manifests import ManifestError, load
    try:
        with (sys.stdin if a.file == "-" else open(a.file)) as f:
            objs = load(f.read(), identity_only=a.cmd == "delete")
    except (OSError, ManifestError) as e:
        print(f"flowctl: {a.file}: {e}", file=sys.stderr)
        return 1
    store = lab.store()
    for kind, ns, name, body in objs:
        ref = f"{kind.lower()}/{ns + '/' if ns else ''}{name}"
        if a.cmd == "apply":
            store.put(kind, ns, name, body)
            print(f"{ref} applied")
        else:
            print(f"{ref} {'deleted' if store.delete(kind, ns, name) else 'not found'}")
    return 0


def _conj_packets(node_ovs: Any) -> dict[int, int]:
    """conj_id -> packets allowed by it, from the flow stats OVS holds."""
    out: dict[int, int] = {}
    for line in node_ovs.ofctl("dump-flows", "br-int").splitlines():
        m = re.search(r"conj_id=(\d+)", line)
        n = re.search(r"n_packets=(\d+)", line)
        if m and n and "conjunction(" not in line:
            out[int(m[1])] = out.get(int(m[1]), 0) + int(n[1])
    return out


def cmd_policy(lab: Lab, a: argparse.Namespace) -> int:
    """Each rule as realized on each node: pods, peers, ports, flows, packets allowed."""
    rows = []
    for node in ([lab.node(a.node)] if a.node else lab.nodes()):
        rules = AgentClient(node.socket).call("_policy")["rules"]
        packets = _conj_packets(node.ovs)
        for r in rules:
            ns, name, direction, idx = r["rule"].split("/")
            if a.policy and a.policy != f"{ns}/{name}":
                continue
            rows.append({"node": node.name, "policy": f"{ns}/{name}", "rule": f"{direction}[{idx}]",
                         "pods": len(r["pods"]),
                         "peers": "any" if r["peers"] is None else len(r["peers"]),
                         "ports": "any" if r["ports"] is None else ",".join(r["ports"]),
                         "flows": r["flows"], "conj_id": r["conj_id"],
                         "packets": packets.get(r["conj_id"], 0) if r["conj_id"] else "-",
                         "detail": r})
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows, ["node", "policy", "rule", "pods", "peers", "ports", "flows",
                            "packets"])
    return 0


def cmd_services(lab: Lab, a: argparse.Namespace) -> int:
    """Each Service port per node: ClusterIP, endpoints, group, packets per bucket."""
    from flowcni.ctl.services import service_rows
    rows = service_rows([lab.node(a.node)] if a.node else lab.nodes(), a.service)
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table([{**r, "endpoints": ",".join(r["endpoints"]) or "-",
                       "packets": ",".join(map(str, r["packets"])) or "-"} for r in rows],
                     ["node", "service", "clusterIP", "port", "endpoints", "group", "packets"])
    return 0


def cmd_trace(lab: Lab, a: argparse.Namespace) -> int:
    """Trace a new connection through OVS on every node it crosses; exit 0 if delivered."""
    from flowcni.ctl.trace import Tracer
    if a.live:
        r = Tracer(lab).live(a.src, a.dst, a.proto, a.dport)
        if a.json:
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
    v = Tracer(lab).trace(a.src, a.dst, a.proto, a.dport)
    if a.json:
        print(json.dumps(v.as_dict(), indent=1))
    else:
        node = None
        for s in v.steps:
            if s.node != node:
                node = s.node
                print(f"# {node}")
            print(f"  {s.story}")
        print(f"verdict: {'DELIVERED' if v.delivered else 'DROPPED'}: {v.detail}")
    return 0 if v.delivered else 3


def cmd_demo(lab: Lab, a: argparse.Namespace) -> int:
    from flowcni.lab.demo import run_demo
    return run_demo(lab, keep=a.keep)


def probe(socket_path: str, ready: bool, timeout: float) -> int:
    """Liveness (the agent answers) and readiness (and it is synced with OVS) checks."""
    try:
        st = AgentClient(socket_path, timeout=timeout).status()
    except (OSError, ValueError, AgentError) as e:
        print(f"flowcni agent not answering on {socket_path}: {e}")
        return 1
    if ready and not st.get("synced"):
        print(f"flowcni agent on {st.get('node')} not synced with Open vSwitch yet")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowctl", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    lab = sub.add_parser("lab", help="the embedded multi-node lab")
    ls = lab.add_subparsers(dest="lab_cmd", required=True)
    up = ls.add_parser("up", help="create nodes (netns + OVS + agent)")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--cluster-cidr", default="10.244.0.0/16")
    up.add_argument("--node-cidr-size", type=int, default=24)
    up.add_argument("--encap", default="geneve",
                    help="geneve (default), vxlan, gre, or none (routed)")
    nd = ls.add_parser("node", help="add or remove a node of a running lab")
    nds = nd.add_subparsers(dest="node_cmd", required=True)
    nds.add_parser("add")
    ndd = nds.add_parser("del")
    ndd.add_argument("name")
    ls.add_parser("down", help="remove every namespace, process and file of the lab")
    for name in ("nodes", "pods"):
        x = ls.add_parser(name)
        x.add_argument("--json", action="store_true")
    pod = ls.add_parser("pod", help="add or delete a pod")
    ps = pod.add_subparsers(dest="pod_cmd", required=True)
    pa = ps.add_parser("add")
    pa.add_argument("name")
    pa.add_argument("--node", required=True)
    pa.add_argument("--namespace", default="default")
    pa.add_argument("--labels", default="")
    pa.add_argument("--ports", default="", help="named container ports: http=80/TCP,...")
    pd = ps.add_parser("del")
    pd.add_argument("name")
    pd.add_argument("--namespace", default="default")
    ex = ls.add_parser("exec", help="run a command in a pod: lab exec NS/POD -- CMD")
    ex.add_argument("pod")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ra = ls.add_parser("restart-agent", help="kill -9 a node's agent and start it again")
    ra.add_argument("node")

    for verb in ("apply", "delete"):
        ap = sub.add_parser(verb, help=f"{verb} Kubernetes YAML objects in the lab's datastore")
        ap.add_argument("-f", "--file", required=True, help="YAML file, or - for stdin")
    tr = sub.add_parser("trace", help="trace a packet from a pod through every node it crosses")
    tr.add_argument("--from", dest="src", required=True, help="NS/POD")
    tr.add_argument("--to", dest="dst", required=True, help="NS/POD or IP")
    tr.add_argument("--proto", default="tcp", choices=["tcp", "udp", "icmp", "sctp"])
    tr.add_argument("--dport", type=int)
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--live", action="store_true",
                    help="inject a real marked packet and report where it went")
    po = sub.add_parser("policy", help="NetworkPolicy rules as realized on each node")
    po.add_argument("policy", nargs="?", help="NS/NAME")
    po.add_argument("--node")
    po.add_argument("--json", action="store_true")
    sv = sub.add_parser("services", help="Services as each node's agent programs them")
    sv.add_argument("service", nargs="?", help="NS/NAME")
    sv.add_argument("--node")
    sv.add_argument("--json", action="store_true")
    fl = sub.add_parser("flows", help="a node's flows, with table names")
    fl.add_argument("--node")
    fl.add_argument("--table")
    fl.add_argument("--no-stats", action="store_true")
    fl.add_argument("--pod", help="NS/NAME: only the flows this pod owns")
    fl.add_argument("--policy", help="NS/NAME: only the flows this policy's rules use")
    fl.add_argument("--service", help="NS/NAME: only this Service's flows (its groups: "
                    "flowctl services)")
    fl.add_argument("--json", action="store_true", help="machine-readable (see README)")
    fl.add_argument("--stale", action="store_true",
                    help="what OVS holds that the agent does not want, and the reverse")
    st = sub.add_parser("status", help="agent status per node")
    st.add_argument("--node")
    pr = sub.add_parser("probe", help="liveness/readiness probe of a node's agent")
    pr.add_argument("--socket", default="/run/flowcni/cni.sock")
    pr.add_argument("--ready", action="store_true", help="also require sync with OVS")
    pr.add_argument("--timeout", type=float, default=5.0)
    ic = sub.add_parser("install-cni", help="install the flowcni plugin launcher")
    ic.add_argument("--dest", default="/opt/cni/bin")
    dm = sub.add_parser("demo", help="lab demo: nodes, pods, traffic, flow tables")
    dm.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `flowctl flows | head` ends quietly
    if a.cmd == "probe":
        return probe(a.socket, a.ready, a.timeout)
    if a.cmd == "install-cni":
        from flowcni.cni.install import install
        print(install(a.dest))
        return 0
    if os.geteuid() != 0:
        print("flowctl: needs root (network namespaces, OVS)", file=sys.stderr)
        return 1
    lab = Lab()
    try:
        return {"lab": cmd_lab, "flows": cmd_flows, "status": cmd_status,
                "demo": cmd_demo, "apply": cmd_apply, "delete": cmd_apply,
                "policy": cmd_policy, "trace": cmd_trace,
                "services": cmd_services}[a.cmd](lab, a)
    except (LabError, AgentError) as e:
        print(f"flowctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
