"""NetworkPolicy under churn and continuous traffic: every probe matches the objects.

Issue 14: after policy churn, a cached datapath flow kept allowing a pod that
the installed tables denied. These tests keep new TCP connections flowing
from pods the whole time and compare every probe that ran entirely after a
change was realized (and before the next one) with the policy verdict of the
objects then in the datastore (`World.allows`, the engine's own semantics).
No probe is retried and no datapath revalidation is waited for: a realized
change must be in force in the datapath cache too. Every connected probe that
policy denies is wrong; an allowed pair is wrong when every one of its probes
in the window failed (a single lost SYN on this shared machine is not a
verdict; a stale drop blocks them all), when one of its probes failed while
the same two pods connected on the other port, also allowed, during it, and
when two of its probes in a row failed while they connected on the other port
in between (a stall of either pod, node or switch would have blocked that too:
a drop that mends itself within the window).

FLOWCNI_CHURN_CHANGES (default 500) and FLOWCNI_CHURN_SEED tune the random
test; FLOWCNI_DATAPATH_GUARD=off runs the agents without their datapath guard.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flowcni.controller.dpcache import traced_actions
from flowcni.datastore.store import Store
from flowcni.flows.policy import World, parse_policy, pod_from_body
from flowcni.lab.lab import Lab, parse_ports

from tests.datapath.conftest import make_lab
from tests.support.churn import Probe, read_probes, start_prober
from tests.support.reach import start_server


@pytest.fixture(scope="module")
def clab() -> Iterator[Lab]:
    lab = make_lab("churn")
    lab.down()
    try:
        lab.up(nodes=3, encap="geneve")
        yield lab
    finally:
        lab.down()


def world_of(store: Store) -> World:
    """The objects in the datastore now, as the policy engine models them."""
    w = World()
    for n in store.objects("Namespace"):
        w.namespaces[n["name"]] = dict(n.get("labels") or {})
    for b in store.objects("Pod"):
        w.put_pod(pod_from_body(b))
    for p in store.objects("NetworkPolicy"):
        w.put_policy(parse_policy(p["namespace"], p["name"], p.get("spec")))
    return w


def policy(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "namespace": ns, "spec": spec}


class Probers:
    """Probers started in pods; read incrementally, stopped together."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="flowcni-churn-")
        self.procs: dict[str, Any] = {}
        self.offsets: dict[str, int] = {}

    def start(self, lab: Lab, src: str, targets: list[tuple[str, str, int]],
              timeout: float) -> None:
        path = os.path.join(self.dir, src.replace("/", "_"))
        self.procs[src] = (start_prober(lab.exec_argv(src, []), targets, path, timeout), path)
        self.offsets[src] = 0

    def poll(self) -> list[Probe]:
        """Probes completed since the last poll."""
        out: list[Probe] = []
        for src, (_p, path) in self.procs.items():
            got, self.offsets[src] = read_probes(src, path, self.offsets[src])
            out += got
        return out

    def stop(self) -> list[Probe]:
        for p, _path in self.procs.values():
            p.kill()
            p.wait()
        out = self.poll()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        return out


COUNTERS = ("revalidate_missed_dp_flow", "ukey_dp_change", "upcall_ukey_replace",
            "dumped_duplicate_flow", "dumped_inconsistent_flow", "handler_duplicate_upcall",
            "upcall_ukey_contention", "dpif_flow_put_error", "dpif_flow_del_error",
            "revalidate_inconsistent_flow")


def _stale_ufids(n: Any, src_ip: str, dst_ip: str) -> tuple[list[str], dict[str, str]]:
    lines, stale = [], {}
    for line in n.ovs.appctl("dpctl/dump-flows", "-m", "--no-names",
                             check=False).splitlines():
        if f"src={src_ip}" in line and f"dst={dst_ip}" in line and "ct_state(0x" in line:
            ufid, _, rest = line.partition(", ")
            key, _, tail = rest.partition(", packets:")
            now = traced_actions(n.ovs.appctl("ofproto/trace", "ovs-netdev", key,
                                              check=False)) or ""
            cached = tail.split("actions:", 1)[1].split(", dp-extra-info")[0]
            lines.append(f"{n.name} cached: {line}\n    tables say: {now}")
            if cached.replace(" ", "") != now.replace(" ", ""):
                stale[ufid] = line
    return lines, stale


def datapath_evidence(lab: Lab, src_ip: str, dst_ip: str) -> str:
    """What each node's datapath caches for src -> dst and what its tables say now; for a
    disagreeing flow, whether revalidation rounds fix it, and whether a forced full
    revalidation (a table-version bump) does."""
    lines = []
    for n in lab.nodes():
        got, stale = _stale_ufids(n, src_ip, dst_ip)
        lines += got
        cov = [x.strip() for x in n.ovs.appctl("coverage/show", check=False).splitlines()
               if x.split() and x.split()[0] in COUNTERS]
        lines.append(f"{n.name} upcall/show: "
                     + " ".join(n.ovs.appctl("upcall/show", check=False).split())
                     + f"\n  coverage: {cov}")
        if not stale:
            continue
        # every disagreeing flow of that node: a flow that took another's new actions
        # shows here with the actions the stale one should have got
        for line in n.ovs.appctl("dpctl/dump-flows", "-m", "--no-names",
                                 check=False).splitlines():
            if "ct_state(0x" not in line or line.split(", ", 1)[0] in stale:
                continue
            key, _, tail = line.partition(", ")[2].partition(", packets:")
            now = traced_actions(n.ovs.appctl("ofproto/trace", "ovs-netdev", key,
                                              check=False)) or ""
            cached = tail.split("actions:", 1)[1].split(", dp-extra-info")[0]
            if cached.replace(" ", "") != now.replace(" ", ""):
                lines.append(f"{n.name} ALSO disagreeing: {line}\n    tables say: {now}")
        for _ in range(2):
            n.ovs.appctl("revalidator/wait", check=False)
        _, still = _stale_ufids(n, src_ip, dst_ip)
        lines.append(f"{n.name}: after two revalidation rounds, still disagreeing: "
                     f"{sorted(set(stale) & set(still))}")
        n.ovs.ofctl("add-flow", "br-int", "table=250,priority=1,cookie=0x0,actions=drop")
        n.ovs.ofctl("del-flows", "--strict", "br-int", "table=250,priority=1")
        for _ in range(2):
            n.ovs.appctl("revalidator/wait", check=False)
        _, still2 = _stale_ufids(n, src_ip, dst_ip)
        lines.append(f"{n.name}: after a forced full revalidation, still disagreeing: "
                     f"{sorted(set(stale) & set(still2))}")
    return "\n".join(lines)


def test_issue14_namespace_and_pod_selector_after_churn(clab: Lab) -> None:
    """The issue's scenario: allow/delete churn, then namespaceSelector AND podSelector on
    a named port; labelling the namespace admits d only, never c."""
    store = clab.store()
    store.put("Namespace", "", "default", {"name": "default", "labels": {}})
    store.put("Namespace", "", "other", {"name": "other", "labels": {}})
    servers, probers = [], Probers()
    made = []
    try:
        for name, node, ns, labels, ports in [
                ("a", "node1", "default", {"app": "a"}, ""),
                ("b", "node2", "default", {"app": "b"}, "echo=8080/TCP"),
                ("c", "node3", "default", {"app": "c"}, "")]:
            clab.pod_add(name, node, ns, labels, parse_ports(ports))
            made.append(f"{ns}/{name}")
        b = clab.pod("default/b")
        servers.append(start_server(clab.exec_argv("default/b", []), ["8080"]))
        probers.start(clab, "default/c", [("b", b.ip, 8080)], timeout=0.3)
        allow = policy("default", "allow-b-from-c", {
            "podSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}}],
                         "ports": [{"protocol": "TCP", "port": 8080}]}]})
        for _ in range(5):
            store.put("NetworkPolicy", "default", "allow-b-from-c", allow)
            clab.wait_realized()
            time.sleep(0.4)
            store.delete("NetworkPolicy", "default", "allow-b-from-c")
            clab.wait_realized()
            time.sleep(0.4)
        clab.pod_add("d", "node3", "other", {"app": "c"})
        made.append("other/d")
        probers.start(clab, "other/d", [("b", b.ip, 8080)], timeout=0.3)
        store.put("NetworkPolicy", "default", "b-from-team-x", policy(
            "default", "b-from-team-x", {
                "podSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}},
                                       "podSelector": {"matchLabels": {"app": "c"}}}],
                             "ports": [{"protocol": "TCP", "port": "echo"}]}]}))
        clab.wait_realized()
        t4 = time.time()
        time.sleep(1.5)
        t5_put = time.time()
        store.put("Namespace", "", "other", {"name": "other", "labels": {"team": "x"}})
        clab.wait_realized()
        t5 = time.time()
        time.sleep(3.0)
        # probes end before the evidence, whose revalidation rounds could mend a stale
        # flow: no probe may run after a revalidation the agent did not do itself
        probes = probers.stop()
        evidence = datapath_evidence(clab, clab.pod("default/c").ip, b.ip)
    finally:
        probers.stop()
        for s in servers:
            s.kill()
            s.wait()
        store.delete("NetworkPolicy", "default", "b-from-team-x")
        store.delete("NetworkPolicy", "default", "allow-b-from-c")
        for ref in reversed(made):
            clab.pod_del(ref)
        store.delete("Namespace", "", "other")
        clab.wait_realized()
    before = [p for p in probes if t4 <= p.start and p.end < t5_put]
    after = [p for p in probes if p.start >= t5]
    # c must never connect after team-x, nor d before the label; d must connect after it
    # (a lost SYN of d's is a stall of this shared machine, not a verdict)
    wrong = [p for p in before if p.ok] + [p for p in after if p.ok and p.src == "default/c"]
    assert before and any(p.src == "default/c" for p in after), "probers did not run"
    assert any(p.ok for p in after if p.src == "other/d"), "d never connected after the label"
    assert not wrong, (f"{len(wrong)} wrong probes (c must stay blocked; d allowed only "
                       f"after the label):\n" + "\n".join(
                           f"{p.src} -> b:{p.port} at +{p.start - t5:.3f}s: "
                           f"{'connected' if p.ok else 'blocked'}" for p in wrong[:20])
                       + "\n" + evidence)


NAMESPACES = ("ch-x", "ch-y", "ch-z")
APPS = ("web", "db", "cli")
TEAMS = ("x", "y")
PROBED = [  # name, node, namespace, app
    ("p1", "node1", "ch-x", "web"), ("p2", "node2", "ch-y", "db"),
    ("p3", "node3", "ch-x", "cli"), ("p4", "node2", "ch-z", "web")]
PORTS = (80, 81)


def random_spec(rng: random.Random) -> dict[str, Any]:
    types = rng.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]])
    spec: dict[str, Any] = {"podSelector": rng.choice(
        [{}, {"matchLabels": {"app": rng.choice(APPS)}}]), "policyTypes": types}
    for t in types:
        rules = []
        for _ in range(rng.randint(0, 2)):
            rule: dict[str, Any] = {}
            kind = rng.choice(["pod", "ns", "both", "any"])
            peer: dict[str, Any] = {}
            if kind in ("pod", "both"):
                peer["podSelector"] = {"matchLabels": {"app": rng.choice(APPS)}}
            if kind in ("ns", "both"):
                peer["namespaceSelector"] = {"matchLabels": {"team": rng.choice(TEAMS)}}
            if peer:
                rule["from" if t == "Ingress" else "to"] = [peer]
            port = rng.choice([80, 81, "web", None])
            if port is not None:
                rule["ports"] = [{"protocol": "TCP", "port": port}]
            rules.append(rule)
        spec[t.lower()] = rules
    return spec


def test_random_churn_every_probe_matches_the_model(clab: Lab) -> None:
    """Policy puts and deletes, pod and namespace relabels, pod adds and deletes, under
    new-connection probes between four pods on three nodes: zero wrong probes."""
    seed = int(os.environ.get("FLOWCNI_CHURN_SEED") or random.randrange(1 << 30))
    n_changes = int(os.environ.get("FLOWCNI_CHURN_CHANGES") or 500)
    window = float(os.environ.get("FLOWCNI_CHURN_WINDOW") or 0.4)
    rng = random.Random(seed)
    store = clab.store()
    ns_labels = {ns: {"team": rng.choice(TEAMS)} for ns in NAMESPACES}
    for ns, labels in ns_labels.items():
        store.put("Namespace", "", ns, {"name": ns, "labels": labels})
    servers, probers = [], Probers()
    extras: dict[str, str] = {}  # ref -> node, pods that come and go
    policies: set[tuple[str, str]] = set()
    wrong: list[str] = []
    compared = 0
    # the change in force: (description, realized time, world after it)
    current: tuple[str, float, World] = ("start", 0.0, World())

    def check_window() -> None:
        """Compare the probes of the window that ends now with the change in force."""
        nonlocal compared
        what, realized, world = current
        until = time.time()
        blocked: dict[tuple[str, str, int], list[Probe]] = {}
        for p in probers.poll():
            if not (realized <= p.start and p.end < until):
                continue
            want = world.allows(world.pods[p.src], world.pods[p.dst], "TCP", p.port)
            compared += 1
            if p.ok and not want:
                bad(what, realized, world, p, "connected", "deny")
            elif want:
                blocked.setdefault((p.src, p.dst, p.port), []).append(p)
        for (src, dst, port), probes in blocked.items():
            # An allowed pair counts as blocked only if every probe of the window
            # failed: a persistent drop (a stale flow), not one SYN lost to a
            # stall of this shared two-core machine.
            if not any(p.ok for p in probes):
                bad(what, realized, world, probes[0], f"blocked x{len(probes)}", "allow")
                continue
            other = [p for p in blocked.get((src, dst, PORTS[PORTS.index(port) - 1]), ())
                     if p.ok]
            # one failed probe is wrong too when, during it, the same two pods connected
            # on the other port (also allowed): the path worked, this port's did not
            lone = next((a for a in probes if not a.ok and any(
                a.start <= c.start and c.end <= a.end for c in other)), None)
            if lone is not None:
                bad(what, realized, world, lone, "blocked while the other port connected",
                    "allow")
                continue
            for a, b in itertools.pairwise(sorted(probes, key=lambda p: p.start)):
                if not a.ok and not b.ok and any(a.start <= c.start and c.end <= b.end
                                                 for c in other):
                    bad(what, realized, world, a, "blocked twice in a row while the other "
                        "port connected", "allow")
                    break

    def bad(what: str, realized: float, world: World, p: Probe, got: str,
            want: str) -> None:
        if len(wrong) >= 30:
            return
        wrong.append(f"after '{what}': {p.src} -> {p.dst}:{p.port} {got}, policy says "
                     f"{want} (+{p.start - realized:.3f}s)")
        if len(wrong) == 1:
            wrong.append(datapath_evidence(clab, world.pods[p.src].ip, world.pods[p.dst].ip))

    try:
        for name, node, ns, app in PROBED:
            clab.pod_add(name, node, ns, {"app": app}, parse_ports("web=80/TCP"))
            servers.append(start_server(clab.exec_argv(f"{ns}/{name}", []), ["80", "81"]))
        ips = {f"{ns}/{n}": clab.pod(f"{ns}/{n}").ip for n, _, ns, _ in PROBED}
        for src in ips:
            probers.start(clab, src, [(dst, ip, port) for dst, ip in ips.items() if dst != src
                                      for port in PORTS], timeout=0.25)
        clab.wait_realized()
        current = ("start", time.time(), world_of(store))
        time.sleep(window)
        for k in range(n_changes):
            check_window()
            if wrong:
                break
            op = rng.choices(["put", "delete", "pod-label", "ns-label", "pod"],
                             [35, 20, 20, 15, 10])[0]
            if op == "delete" and policies:
                ns, name = rng.choice(sorted(policies))
                store.delete("NetworkPolicy", ns, name)
                policies.discard((ns, name))
                what = f"delete policy {ns}/{name}"
            elif op in ("put", "delete"):
                ns, name = rng.choice(NAMESPACES), f"pol{rng.randrange(4)}"
                spec = random_spec(rng)
                store.put("NetworkPolicy", ns, name, policy(ns, name, spec))
                policies.add((ns, name))
                what = f"put policy {ns}/{name} {spec}"
            elif op == "pod-label":
                name, _, ns, _ = rng.choice(PROBED)
                labels = {"app": rng.choice(APPS)}
                clab.set_labels(f"{ns}/{name}", labels)
                what = f"label pod {ns}/{name} {labels}"
            elif op == "ns-label":
                ns = rng.choice(NAMESPACES)
                labels = rng.choice([{}, {"team": "x"}, {"team": "y"}])
                store.put("Namespace", "", ns, {"name": ns, "labels": labels})
                what = f"label namespace {ns} {labels}"
            elif extras and rng.random() < 0.5:
                ref = rng.choice(sorted(extras))
                clab.pod_del(ref)
                del extras[ref]
                what = f"delete pod {ref}"
            else:
                ns, node = rng.choice(NAMESPACES), rng.choice(["node1", "node2", "node3"])
                name = f"e{k}"
                clab.pod_add(name, node, ns, {"app": rng.choice(APPS)},
                             parse_ports("web=81/TCP"))
                extras[f"{ns}/{name}"] = node
                what = f"add pod {ns}/{name} on {node}"
            clab.wait_realized(timeout=30)
            current = (f"#{k} {what}", time.time(), world_of(store))
            time.sleep(window)
        check_window()
    finally:
        probers.stop()
        for s in servers:
            s.kill()
            s.wait()
        for ns, name in policies:
            store.delete("NetworkPolicy", ns, name)
        for ref in [*extras, *(f"{ns}/{n}" for n, _, ns, _ in PROBED)]:
            try:
                clab.pod_del(ref)
            except Exception:  # noqa: BLE001 - a pod whose add failed; keep cleaning
                pass
        for ns in NAMESPACES:
            store.delete("Namespace", "", ns)
    print(f"churn seed {seed}: {n_changes} changes, {compared} probes compared")
    assert not wrong, (f"seed {seed} (FLOWCNI_CHURN_SEED={seed} to replay): wrong probes "
                       f"(first: with the datapath's cache of that pair):\n"
                       + "\n".join(wrong))
    assert compared > n_changes, f"seed {seed}: too few probes compared ({compared})"
