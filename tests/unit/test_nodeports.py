"""Node-port range and allocation in the embedded store (datastore/nodeports.py,
ClusterConfig.node_port_range, `flowctl apply -f`): pure logic and the CLI on a
temporary store."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from flowcni.ctl import flowctl
from flowcni.datastore.manifests import ManifestError, load
from flowcni.datastore.nodeports import NodePortError, assign, pick, static_band
from flowcni.datastore.store import ClusterConfig, Store, StoreError, load_cluster_config
from flowcni.flows.services import ServiceError, ServiceProxy, parse_service

RANGE = (30000, 32767)


def svc(name: str, *ports: dict[str, Any], stype: str = "NodePort", ns: str = "d"
        ) -> tuple[str, str, str, dict[str, Any]]:
    return ("Service", ns, name, {"namespace": ns, "name": name, "labels": {}, "spec": {
        "type": stype, "clusterIP": "10.96.0.10", "selector": {"app": name},
        "ports": [dict(p) for p in ports]}})


def node_ports(obj: tuple[str, str, str, dict[str, Any]]) -> list[int | None]:
    return [p.get("nodePort") for p in obj[3]["spec"]["ports"]]


def stored(*objs: tuple[str, str, str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [o[3] for o in objs]


def test_cluster_config_range_default_parse_and_refusal(tmp_path: Path) -> None:
    assert ClusterConfig().node_ports == (30000, 32767)
    assert ClusterConfig(node_port_range="40000-40010").validate().node_ports == (40000, 40010)
    for bad in ("30000", "x-y", "32767-30000", "0-100", "1-70000", "1-2-3"):
        with pytest.raises(StoreError, match=f"node-port-range '{bad}'"):
            ClusterConfig(node_port_range=bad).validate()
    f = tmp_path / "c.yaml"
    f.write_text("node_port_range: 31000-31999\n")
    assert load_cluster_config(str(f)).node_ports == (31000, 31999)
    f.write_text("node_port_range: 31000\n")
    with pytest.raises(StoreError, match="node_port_range: 31000 is not a str"):
        load_cluster_config(str(f))


def test_node_port_outside_the_range_is_refused_naming_the_field() -> None:
    spec = svc("web", {"port": 80, "nodePort": 22})[3]["spec"]
    with pytest.raises(ServiceError, match=r"spec.ports\[0\].nodePort: 22 is outside the "
                       "node-port range 30000-32767"):
        parse_service("d", "web", spec, node_port_range=RANGE)
    assert parse_service("d", "web", spec).exposure.node_ports == (22,)  # Kubernetes checked
    sp = ServiceProxy(node_port_range=RANGE)
    flows, _, problems = sp.load([svc("web", {"port": 80, "nodePort": 22})[3]], [])
    assert problems == ["service d/web: spec.ports[0].nodePort: 22 is outside the node-port "
                        "range 30000-32767"]
    assert sp.services == {}
    with pytest.raises(ManifestError, match=r"Service d/web: spec.ports\[0\].nodePort: 22"):
        load("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: d}\nspec: "
             "{type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 80, nodePort: 22}]}\n",
             node_port_range=RANGE)


def test_missing_node_ports_are_allocated_at_random_from_the_upper_band() -> None:
    """Free, distinct, in the range above the static band (86 ports at 30000-32767),
    and random: different draws give different ports."""
    assert static_band(*RANGE) == 86 and static_band(30000, 30009) == 16
    other = svc("other", {"port": 80, "nodePort": 30100})
    objs = [svc("web", {"port": 80}, {"port": 81, "protocol": "UDP"}),
            svc("lb", {"port": 80}, stype="LoadBalancer"),
            svc("cip", {"port": 80}, stype="ClusterIP")]
    seen: set[tuple[int | None, ...]] = set()
    for seed in range(20):
        out = assign(objs, stored(other), RANGE, random.Random(seed))
        got = [n for o in out[:2] for n in node_ports(o)]
        assert node_ports(out[2]) == [None]
        assert all(isinstance(n, int) and 30086 <= n <= 32767 for n in got), got
        assert len(set(got)) == 3 and 30100 not in got
        seen.add(tuple(got))
    assert len(seen) > 15  # random, not one fixed order
    assert node_ports(objs[0]) == [None, None]  # the input is not changed
    # Without a seeded generator too (what flowctl apply uses).
    assert all(30086 <= (n or 0) <= 32767 for n in node_ports(assign(objs, [], RANGE)[0]))


def test_a_full_upper_band_falls_back_to_the_static_band() -> None:
    lo, hi = 30000, 30039  # static band 16: 30000-30015
    held = [svc(f"h{n}", {"port": 80, "nodePort": n})[3] for n in range(30016, 30040)]
    out = assign([svc("web", {"port": 80})], held, (lo, hi), random.Random(1))
    assert node_ports(out[0])[0] in range(30000, 30016)
    # The last free port is still found (a scan after the random draws).
    held += [svc(f"s{n}", {"port": 80, "nodePort": n})[3] for n in range(30000, 30016)
             if n != 30007]
    for seed in range(5):
        assert node_ports(assign([svc("web", {"port": 80})], held, (lo, hi),
                                 random.Random(seed))[0]) == [30007]


def test_pick_never_returns_a_taken_port() -> None:
    rng = random.Random(7)
    taken: set[int] = set()
    for _ in range(40):
        n = pick(30000, 30039, taken, rng)
        assert n is not None and n not in taken and 30000 <= n <= 30039
        taken.add(n)
    assert pick(30000, 30039, taken, rng) is None


def test_same_port_number_with_two_protocols_shares_one_node_port() -> None:
    out = assign([svc("dns", {"port": 53}, {"port": 53, "protocol": "UDP"},
                      {"port": 54, "nodePort": 30500},
                      {"port": 54, "protocol": "UDP"})], [], RANGE, random.Random(3))
    a, b, c, d = node_ports(out[0])
    assert a == b and a not in (None, 30500) and (c, d) == (30500, 30500)


def test_allocation_is_stable_over_re_apply() -> None:
    """A re-applied Service keeps its node ports, whatever a new Service earlier in the
    same file draws: its old ports are reserved before any draw."""
    first = assign([svc("web", {"port": 80}, {"port": 443})], [], RANGE, random.Random(0))
    kept = node_ports(first[0])
    for seed in range(10):
        again = assign([svc("new", {"port": 80}), svc("web", {"port": 80}, {"port": 443})],
                       stored(*first), RANGE, random.Random(seed))
        assert node_ports(again[1]) == kept and node_ports(again[0])[0] not in kept
    # A port added later gets a new one; the kept ones stay.
    more = assign([svc("web", {"port": 80}, {"port": 443}, {"port": 8080})],
                  stored(*again), RANGE, random.Random(1))
    new = node_ports(more[0])
    assert new[:2] == kept and new[2] not in (*kept, *node_ports(again[0]))


def test_a_node_port_held_by_another_service_is_refused() -> None:
    held = svc("a", {"port": 80, "nodePort": 30080})
    with pytest.raises(NodePortError, match=r"Service d/b: spec.ports\[0\].nodePort: 30080 "
                       "is already used by Service d/a"):
        assign([svc("b", {"port": 80, "nodePort": 30080})], stored(held), RANGE)
    with pytest.raises(NodePortError, match="already used by Service d/a"):
        assign([svc("a", {"port": 80, "nodePort": 30090}),
                svc("b", {"port": 80, "nodePort": 30090})], [], RANGE)
    # The holder itself may re-apply it, and give it up to another in the same file.
    assert node_ports(assign([held], stored(held), RANGE)[0]) == [30080]


def test_an_exhausted_range_is_refused() -> None:
    with pytest.raises(NodePortError, match=r"Service d/c: spec.ports\[0\].nodePort: no free "
                       "node port left in 30000-30001"):
        assign([svc("ab", {"port": 80}, {"port": 81}), svc("c", {"port": 80})], [],
               (30000, 30001))


def test_load_balancer_without_node_ports_is_left_alone() -> None:
    o = svc("lb", {"port": 80}, stype="LoadBalancer")
    o[3]["spec"]["allocateLoadBalancerNodePorts"] = False
    assert node_ports(assign([o], [], RANGE)[0]) == [None]
    assert parse_service("d", "lb", o[3]["spec"]).exposure.node_ports == (None,)


SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: d}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
"""


def test_flowctl_apply_allocates_checks_the_range_and_re_applies_stably(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "store.db")
    store = Store(db)
    store.set_cluster(ClusterConfig(node_port_range="31000-31009"))
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICE)
    args = ["apply", "-f", str(f), "--datastore", f"sqlite:{db}"]
    assert flowctl.main(args) == 0
    body = store.get("Service", "d", "web")
    assert body is not None
    got = [p["nodePort"] for p in body["spec"]["ports"]]
    assert len(set(got)) == 2 and all(31000 <= n <= 31009 for n in got), got
    rev = store.revision()
    assert flowctl.main(args) == 0
    assert store.get("Service", "d", "web") == body and store.revision() > rev
    # Out of the cluster's range: refused, naming the Service and the field; nothing written.
    f.write_text(SERVICE.replace("{name: http, port: 80}", "{name: http, port: 80, "
                                 "nodePort: 30080}"))
    rev = store.revision()
    capsys.readouterr()
    assert flowctl.main(args) == 1
    err = capsys.readouterr().err
    assert "Service d/web: spec.ports[0].nodePort: 30080 is outside the node-port range " \
        "31000-31009" in err, err
    assert store.revision() == rev and store.get("Service", "d", "web") == body


def test_health_check_node_port_is_allocated_for_load_balancer_local_only() -> None:
    lb = svc("lb", {"port": 80}, stype="LoadBalancer")
    lb[3]["spec"]["externalTrafficPolicy"] = "Local"
    cluster = svc("lbc", {"port": 80}, stype="LoadBalancer")
    out = assign([lb, cluster], [svc("x", {"port": 80, "nodePort": 30001})[3]], RANGE,
                 random.Random(5))
    hc = out[0][3]["spec"]["healthCheckNodePort"]
    ports = [node_ports(out[0])[0], hc, node_ports(out[1])[0]]
    assert all(isinstance(n, int) and 30086 <= n <= 32767 for n in ports)
    assert len(set(ports)) == 3 and "healthCheckNodePort" not in out[1][3]["spec"]
    again = assign([svc("new", {"port": 80}), lb], stored(*out), RANGE, random.Random(6))
    assert again[1][3]["spec"]["healthCheckNodePort"] == hc
    assert node_ports(again[1]) == node_ports(out[0])
    lb2 = svc("lb2", {"port": 80, "nodePort": 31000}, stype="LoadBalancer")
    lb2[3]["spec"].update(externalTrafficPolicy="Local", healthCheckNodePort=hc)
    with pytest.raises(NodePortError, match=fr"Service d/lb2: spec.healthCheckNodePort: {hc} "
                       "is already used by Service d/lb"):
        assign([lb2], stored(*out), RANGE)


@pytest.mark.parametrize("patch,msg", [
    ({"healthCheckNodePort": 30500}, "only for type LoadBalancer with externalTrafficPolicy"),
    ({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 80},
     "80 is outside the node-port range 30000-32767"),
    ({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30080},
     "30080 is also a nodePort of this Service"),
])
def test_bad_health_check_node_port_is_refused_by_name(patch: dict[str, Any], msg: str) -> None:
    spec = {**svc("web", {"port": 80, "nodePort": 30080})[3]["spec"], **patch}
    with pytest.raises(ServiceError, match=f"spec.healthCheckNodePort: {msg}"):
        parse_service("d", "web", spec, node_port_range=RANGE)



def _apply_in_turns(db: str, me: str, others: str, rounds: int, barrier: Any,
                    out: Any) -> None:
    """Each round: `flowctl apply` this process's Service at the moment the other
    processes apply theirs (barrier); then note the exit code, the port it got and
    whether the others' Services are stored too; then delete it (flowctl delete)."""
    import contextlib
    import io
    got = []
    store = Store(db)
    for i in range(rounds):
        f = f"{db}.{me}{i}.yaml"
        with open(f, "w") as fh:
            fh.write(f"""
apiVersion: v1
kind: Service
metadata: {{name: {me}{i}, namespace: d}}
spec:
  type: NodePort
  clusterIP: 10.96.{ord(me)}.{i + 1}
  selector: {{app: {me}}}
  ports:
  - {{name: http, port: 80}}
""")
        barrier.wait(timeout=60)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = flowctl.main(["apply", "-f", f, "--datastore", f"sqlite:{db}"])
        barrier.wait(timeout=60)
        mine = store.get("Service", "d", f"{me}{i}")
        theirs = [store.get("Service", "d", f"{o}{i}") for o in others]
        got.append((code, err.getvalue(), mine and mine["spec"]["ports"][0]["nodePort"],
                    None not in theirs))
        barrier.wait(timeout=60)
        with contextlib.redirect_stdout(io.StringIO()):
            flowctl.main(["delete", "-f", f, "--datastore", f"sqlite:{db}"])
    out.put((me, got))


def test_concurrent_flowctl_applies_lose_nothing_and_never_share_a_node_port(
        tmp_path: Path) -> None:
    """Three processes run `flowctl apply` at the same moment, 60 times, each on its own
    Service that wants an allocated node port, against a range of three ports: every
    apply succeeds, all three Services are stored, and no two hold the same port.
    (Reads, allocation and writes are one store transaction; without it two applies
    whose reads both came before either write drew from the same free ports, and
    the same one in a few rounds of 60: seen in most runs.)"""
    import multiprocessing
    rounds, names = 60, "abc"
    db = str(tmp_path / "store.db")
    Store(db).set_cluster(ClusterConfig(node_port_range="31000-31002"))
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(len(names)), ctx.Queue()
    procs = [ctx.Process(target=_apply_in_turns,
                         args=(db, me, names.replace(me, ""), rounds, barrier, out))
             for me in names]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [r for rs in results.values() for r in rs if r[0] != 0 or not r[3]] == []
    shared = [(i, ports) for i in range(rounds)
              if len(set(ports := [results[n][i][2] for n in names])) < len(names)]
    assert shared == []
    assert Store(db).objects("Service") == []
