"""NetworkPolicy truth table on a 2-node lab: real connections for every cell.

Each case in policy_cases.yaml is a sequence of steps (apply or delete YAML,
relabel a pod or a namespace, re-create a pod) and expected reachability
matrices. After each change the runner waits until every agent has applied
the datastore revision (flows committed), then probes every pair of pods on
TCP 80, TCP 81 and UDP 53, and the external host on TCP 80, with fresh
connections, and compares every cell.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from flowcni.controller.dpcache import traced_actions
from flowcni.ctl.trace import Tracer
from flowcni.datastore.manifests import load
from flowcni.lab.lab import EXTERNAL_IP, Lab

from tests.datapath.conftest import make_lab
from tests.support import reach
from tests.support.reach import (
    PROBE_PACKET,
    PROBES,
    differing,
    matrix,
    start_netns_server,
    start_pod_server,
)
from tests.support.svc import endpoint_slice

CASES = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "policy_cases.yaml")))
PODS = {  # name -> (namespace, node, labels, ports)
    "web": ("default", "node1", {"app": "web"}, "http=80/TCP"),
    "client": ("default", "node2", {"app": "client"}, ""),
    "api": ("prod", "node2", {"app": "api", "tier": "backend"}, "http=81/TCP"),
    "tool": ("dev", "node1", {"app": "tool"}, ""),
}
NAMESPACES = {"default": {}, "prod": {"env": "prod"}, "dev": {"env": "dev"}}


class PolicyLab:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.servers: dict[str, subprocess.Popen[str]] = {}
        self.errors: dict[str, str] = {}  # of the last matrix: "SRC -> DST PROBE" -> why

    def ref(self, name: str) -> str:
        return f"{PODS[name][0]}/{name}"

    def add_pod(self, name: str) -> None:
        from flowcni.lab.lab import parse_ports
        ns, node, labels, ports = PODS[name]
        self.lab.pod_add(name, node, ns, dict(labels), parse_ports(ports))
        self.servers[name] = start_pod_server(self.lab, self.ref(name))

    def del_pod(self, name: str) -> None:
        srv = self.servers.pop(name, None)
        if srv:
            srv.kill()
            srv.wait()
        self.lab.pod_del(self.ref(name))

    def set_namespace(self, name: str, labels: dict[str, str]) -> None:
        self.lab.store().put("Namespace", "", name, {"name": name, "labels": labels})

    def reset(self) -> None:
        store = self.lab.store()
        for p in store.objects("NetworkPolicy"):
            store.delete("NetworkPolicy", p["namespace"], p["name"])
        for ns, labels in NAMESPACES.items():
            self.set_namespace(ns, labels)
        for name, (_ns, _node, labels, _ports) in PODS.items():
            if self.lab.pod(self.ref(name)).labels != labels:
                self.lab.set_labels(self.ref(name), dict(labels))
        self.lab.wait_realized()

    def observed(self) -> dict[str, dict[str, set[str]]]:
        """What each pod (by short name) reached, probed now; why each failed probe
        failed goes to self.errors."""
        self.errors.clear()
        dests = {n: self.lab.pod(self.ref(n)).ip for n in PODS}
        got = matrix(self.lab, [self.ref(n) for n in PODS], dests, (EXTERNAL_IP, "80"),
                     errors=self.errors)
        return {s.split("/")[1]: row for s, row in got.items()}


@pytest.fixture(scope="module")
def plab() -> Iterator[PolicyLab]:
    lab = make_lab("pol")
    lab.down()
    pl = PolicyLab(lab)
    ext = None
    try:
        lab.up(nodes=2, encap="geneve")
        for ns, labels in NAMESPACES.items():
            pl.set_namespace(ns, labels)
        for name in PODS:
            pl.add_pod(name)
        ext = start_netns_server(lab.external_ns, ["80"])
        yield pl
    finally:
        for s in [*pl.servers.values(), *([ext] if ext else [])]:
            s.kill()
            s.wait()
        lab.down()


def expected(spec: dict[str, Any]) -> dict[str, dict[str, set[str]]]:
    """The full matrix of a step's `expect`: every pod to every pod and the external host."""
    return reach.expected(spec, list(PODS), [*PODS, "ext"])


def run_step(pl: PolicyLab, step: dict[str, Any]) -> None:
    store = pl.lab.store()
    if "apply" in step:
        for kind, ns, name, body in load(step["apply"]):
            store.put(kind, ns, name, body)
    elif "delete" in step:
        for kind, ns, name, _ in load(step["delete"], identity_only=True):
            store.delete(kind, ns, name)
    elif "label_pod" in step:
        pl.lab.set_labels(step["label_pod"]["pod"], step["label_pod"]["labels"])
    elif "label_ns" in step:
        pl.set_namespace(step["label_ns"]["name"], step["label_ns"]["labels"])
    elif "recreate_pod" in step:
        name = step["recreate_pod"].split("/")[1]
        old_ip = pl.lab.pod(step["recreate_pod"]).ip
        pl.del_pod(name)
        pl.add_pod(name)
        assert pl.lab.pod(step["recreate_pod"]).ip != old_ip, "re-created pod kept its IP"
    else:
        raise AssertionError(f"unknown step {step}")
    pl.lab.wait_realized()


def check_traces(pl: PolicyLab, got: dict[str, dict[str, set[str]]], step: int) -> None:
    """flowctl trace must agree with every probe, and name the policy behind each drop."""
    tracer = Tracer(pl.lab)
    wrong = []
    for s, row in got.items():
        for d in [*PODS, "ext"]:
            if d == s:
                continue
            for probe in (["80"] if d == "ext" else PROBES):
                proto, port = PROBE_PACKET[probe]
                dst = EXTERNAL_IP if d == "ext" else pl.ref(d)
                v = tracer.trace(pl.ref(s), dst, proto, port)
                if v.delivered != (probe in row.get(d, set())):
                    wrong.append(f"{s} -> {d} {probe}: trace says {v.detail}")
                elif not v.delivered and v.table in ("IngressDefault", "EgressDefault") \
                        and not v.policies:
                    wrong.append(f"{s} -> {d} {probe}: drop names no policy: {v.detail}")
    assert not wrong, f"step {step}:\n" + "\n".join(wrong)


def diagnose(pl: PolicyLab, diff: list[str], errors: dict[str, str],
             vips: dict[str, str] | None = None) -> str:
    """What the datapath says about the differing cells: why each probe failed, trace
    verdicts, conntrack, the cached datapath flows re-translated against today's tables.

    `vips`: the cells were probed through these ClusterIPs (pod name -> address),
    so that is what is traced and looked up."""
    tracer = Tracer(pl.lab)
    lines = []
    for d in diff:
        s, _, dst = d.split(":")[0].partition(" -> ")
        lines += [f"probe {k}: {v}" for k, v in errors.items()
                  if k.split(" ")[0].split("/")[-1] == s and k.split(" ")[2] == dst]
        for probe, (proto, port) in PROBE_PACKET.items():
            target = (vips[dst] if vips else EXTERNAL_IP if dst == "ext"
                      else pl.ref(dst))
            try:
                detail = tracer.trace(pl.ref(s), target, proto, port).detail
            except Exception as e:  # a diagnosis must not hide the failure it explains
                detail = f"trace failed: {e}"
            lines.append(f"trace {s} -> {target} {probe}: {detail}")
        dst_ips = {EXTERNAL_IP} if dst == "ext" else {pl.lab.pod(pl.ref(dst)).ip}
        if vips:
            dst_ips.add(vips[dst])
        src_ip = pl.lab.pod(pl.ref(s)).ip

        def about(text: str, src_ip: str = src_ip, dst_ips: set[str] = dst_ips) -> bool:
            return src_ip in text and any(ip in text for ip in dst_ips)

        for n in pl.lab.nodes():
            ct = n.ovs.appctl("dpctl/dump-conntrack", check=False)
            lines += [f"{n.name} ct: {c}" for c in ct.splitlines()
                      if about(c) and "TIME_WAIT" not in c]
            dp = n.ovs.appctl("dpctl/dump-flows", check=False)
            for c in dp.splitlines():
                if about(c):
                    # what OVS would make of this cached flow's key with today's tables
                    # (the key's own actions: the first line; a recirculating trace
                    # goes on with the resumed packet, another cached flow)
                    now = n.ovs.appctl("ofproto/trace", "ovs-netdev",
                                       c.split(", packets:")[0], check=False)
                    acts = traced_actions(now)
                    lines.append(f"{n.name} dp: {c}\n    retranslated: "
                                 f"{acts if acts is not None else now[-200:]}")
            lines += [f"{n.name} upcall/show: " + " ".join(
                n.ovs.appctl("upcall/show", check=False).split())]
            drops = [x for x in n.ovs.appctl("coverage/show", check=False).splitlines()
                     if "drop" in x or "xlate" in x or "upcall" in x]
            lines += [f"{n.name} coverage: {x.strip()}" for x in drops]
            try:
                with open(n.agent_log) as f:
                    lines += [f"{n.name} agent: {x.rstrip()}" for x in f
                              if " WARNING " in x or " ERROR " in x or "round " in x]
            except OSError as e:
                lines.append(f"{n.name} agent log: {e}")
    return "\n" + "\n".join(lines)


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_policy_case(plab: PolicyLab, case: dict[str, Any]) -> None:
    plab.reset()
    try:
        for i, step in enumerate(case["steps"]):
            if "expect" not in step:
                run_step(plab, step)
                continue
            want = expected(step["expect"])
            got = plab.observed()
            diff = differing(want, got)
            # A realized change covers the datapath cache too (the agent's guard
            # re-translates the cached flows it touches): a wrong cell is a failure.
            assert not diff, (f"step {i}:\n" + "\n".join(diff)
                              + diagnose(plab, diff, plab.errors))
            check_traces(plab, got, i)
    finally:
        plab.reset()


# -- Service variants: the same cells through a ClusterIP per pod ---------------------------
#
# Policy applies to the endpoint pod after the Service's DNAT (the real source
# pod, the real destination port), so probing every pod through a ClusterIP
# that leads only to it must give the pod-IP matrix cell for cell. The
# Services are named svc-<pod> (a Service named like a pod would win in
# `flowctl trace --to`), have no selector, and their EndpointSlices follow
# the pods' current IPs (a case may re-create a pod).

SERVICE_CASES = ["default-deny-ingress", "default-deny-egress", "allow-from-namespace",
                 "named-ports-resolve-per-pod", "udp-only", "egress-and-ingress-on-the-same-pair",
                 "pod-recreated-with-new-ip"]
SVC_PORTS = [("t80", 80, "TCP"), ("t81", 81, "TCP"), ("u53", 53, "UDP")]


def pod_services(pl: PolicyLab) -> dict[str, str]:
    """A ClusterIP Service per pod (name -> ClusterIP), endpoints synced."""
    vips = {}
    for i, name in enumerate(PODS):
        ns, vip = PODS[name][0], f"10.96.201.{i + 1}"
        pl.lab.store().put("Service", ns, f"svc-{name}", {
            "namespace": ns, "name": f"svc-{name}", "spec": {"clusterIP": vip, "ports": [
                {"name": n, "port": p, "protocol": proto} for n, p, proto in SVC_PORTS]}})
        vips[name] = vip
    sync_slices(pl)
    return vips


def sync_slices(pl: PolicyLab) -> None:
    for name in PODS:
        pl.lab.store().put(*endpoint_slice(PODS[name][0], f"svc-{name}",
                                           [pl.lab.pod(pl.ref(name)).ip], SVC_PORTS))
    pl.lab.wait_realized()


@pytest.mark.parametrize("case", [c for c in CASES if c["name"] in SERVICE_CASES],
                         ids=[c["name"] for c in CASES if c["name"] in SERVICE_CASES])
def test_policy_case_through_services(plab: PolicyLab, case: dict[str, Any]) -> None:
    plab.reset()
    store = plab.lab.store()
    try:
        vips = pod_services(plab)
        for i, step in enumerate(case["steps"]):
            if "expect" not in step:
                run_step(plab, step)
                sync_slices(plab)
                continue
            want = {s: {d: v for d, v in row.items() if d != "ext"}
                    for s, row in expected(step["expect"]).items()}
            errors: dict[str, str] = {}
            got = matrix(plab.lab, [plab.ref(n) for n in PODS], vips, errors=errors)
            got = {s.split("/")[1]: row for s, row in got.items()}
            diff = differing(want, got)
            assert not diff, (f"step {i} (through ClusterIPs):\n" + "\n".join(diff)
                              + diagnose(plab, diff, errors, vips))
    finally:
        for name in PODS:
            ns = PODS[name][0]
            store.delete("EndpointSlice", ns, f"svc-{name}-1")
            store.delete("Service", ns, f"svc-{name}")
        plab.reset()
