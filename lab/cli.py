"""The lab's part of flowctl: `flowctl lab ...`, `flowctl demo` and the lab node provider.

flowctl finds these through entry points (pyproject: flowcni.flowctl_commands and
flowcni.node_providers), so the CLI never imports the lab; the lab builds on the
CLI's library functions instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Callable
from typing import Any

from flowcni.ctl.flowctl import print_table
from flowcni.ctl.providers import NodeAgent
from flowcni.lab.lab import DEFAULT_BASE, Lab, LabError, parse_labels, parse_ports


class LabProvider:
    """flowctl's view of a lab: its nodes' agents and its embedded store."""

    kind = "lab"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def describe(self) -> str:
        return f"the lab in {self.lab.base}"

    def agents(self) -> list[NodeAgent]:
        return self.lab.agents()

    @property
    def store_path(self) -> str:
        return self.lab.store_path


def provider(required: bool = False) -> LabProvider | None:
    """The lab in $FLOWCNI_LAB_DIR (default /run/flowcni-lab) if there is one.
    With `required` (flowctl --lab), a missing lab is an error, not None."""
    lab = Lab()
    if os.path.exists(lab.state_path) or os.path.exists(lab.store_path):
        return LabProvider(lab)
    if required:
        raise LabError(f"--lab: no lab in {lab.base} (run `flowctl lab up`, or set "
                       "FLOWCNI_LAB_DIR)")
    return None


def _root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, OVS)")


def node_rows(lab: Lab) -> list[dict[str, Any]]:
    return [{"name": n.name, "node_ip": n.node_ip or "-", "pod_cidr": n.pod_cidr,
             "netns": n.netns, "agent_pid": n.agent_pid, "api_socket": n.api_socket}
            for n in lab.nodes()]


def pod_rows(lab: Lab) -> list[dict[str, Any]]:
    return [{"name": p.name, "namespace": p.namespace, "node": p.node, "ip": p.ip,
             "mac": p.mac, "labels": p.labels, "netns": p.netns} for p in lab.pods()]


def show_nodes(lab: Lab, as_json: bool = False) -> None:
    rows = node_rows(lab)
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows, ["name", "node_ip", "pod_cidr", "netns"])


def show_pods(lab: Lab, as_json: bool = False) -> None:
    rows = pod_rows(lab)
    if as_json:
        print(json.dumps(rows, indent=1))
    else:
        print_table([{**r, "labels": ",".join(f"{k}={v}" for k, v in r["labels"].items())}
                     for r in rows], ["namespace", "name", "node", "ip", "mac", "labels"])


def cmd_lab(a: argparse.Namespace) -> int:
    _root()
    lab = Lab()
    if a.lab_cmd == "up":
        nodes = lab.up(a.nodes, a.cluster_cidr, a.node_cidr_size, a.encap, a.proxy)
        print(f"lab up ({a.encap}, proxy {a.proxy}): "
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
        show_nodes(lab, a.json)
    elif a.lab_cmd == "pods":
        show_pods(lab, a.json)
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


def cmd_demo(a: argparse.Namespace) -> int:
    _root()
    from flowcni.lab.demo import run_demo
    return run_demo(Lab(), keep=a.keep)


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `lab` and `demo` to flowctl's subcommands (`sub` is its subparsers)."""
    lab = sub.add_parser("lab", help=f"the embedded multi-node lab ($FLOWCNI_LAB_DIR, default "
                         f"{DEFAULT_BASE}; netns prefix $FLOWCNI_LAB_PREFIX, default fc-)")
    ls = lab.add_subparsers(dest="lab_cmd", required=True)
    up = ls.add_parser("up", help="create nodes (netns + OVS + agent)")
    up.add_argument("--nodes", type=int, default=1, help="how many (default: %(default)s)")
    up.add_argument("--cluster-cidr", default="10.244.0.0/16",
                    help="pod addresses of the cluster (default: %(default)s)")
    up.add_argument("--node-cidr-size", type=int, default=24,
                    help="prefix length of each node's pod CIDR (default: %(default)s)")
    up.add_argument("--encap", default="geneve", choices=["geneve", "vxlan", "gre", "none"],
                    help="encapsulation, none = routed (default: %(default)s)")
    up.add_argument("--proxy", default="flowcni", choices=["flowcni", "kube-proxy"],
                    help="who implements Services: flowcni's proxy in OVS, or kube-proxy "
                    "(node DNAT rules you write, as kube-proxy would) (default: %(default)s)")
    nd = ls.add_parser("node", help="add or remove a node of a running lab")
    nds = nd.add_subparsers(dest="node_cmd", required=True)
    nds.add_parser("add", help="one more node")
    ndd = nds.add_parser("del", help="remove a node and its pods")
    ndd.add_argument("name")
    ls.add_parser("down", help="remove every namespace, process and file of the lab")
    for name in ("nodes", "pods"):
        x = ls.add_parser(name, help=f"list the lab's {name}")
        x.add_argument("--json", action="store_true")
    pod = ls.add_parser("pod", help="add or delete a pod")
    ps = pod.add_subparsers(dest="pod_cmd", required=True)
    pa = ps.add_parser("add", help="a pod attached by the real flowcni plugin")
    pa.add_argument("name")
    pa.add_argument("--node", required=True)
    pa.add_argument("--namespace", default="default", help="(default: %(default)s)")
    pa.add_argument("--labels", default="", help="k=v,... (default: none)")
    pa.add_argument("--ports", default="",
                    help="named container ports: http=80/TCP,... (default: none)")
    pd = ps.add_parser("del", help="delete a pod (CNI DEL)")
    pd.add_argument("name")
    pd.add_argument("--namespace", default="default", help="(default: %(default)s)")
    ex = ls.add_parser("exec", help="run a command in a pod: lab exec NS/POD -- CMD")
    ex.add_argument("pod")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ra = ls.add_parser("restart-agent", help="kill -9 a node's agent and start it again")
    ra.add_argument("node")
    dm = sub.add_parser("demo", help="lab demo: nodes, pods, traffic, flow tables")
    dm.add_argument("--keep", action="store_true",
                    help="leave the lab up afterwards (default: take it down)")
    return {"lab": cmd_lab, "demo": cmd_demo}
