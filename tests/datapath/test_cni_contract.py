"""The CNI contract as runtimes and meta plugins use it, with the real plugin binary.

Each test drives the installed `flowcni` (and, for chaining, Debian's reference
plugins from /usr/lib/cni, invoked one after the other as libcni does) against
a lab node, then checks the node itself: leases, OVS ports, veths, flows,
routes in the pod, tc qdiscs, the datastore, and packets.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from flowcni.datastore import manifests
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.datapath.test_cni_errors import good_env, run_plugin, snapshot
from tests.support.probe import eventually, ping

REF_PLUGINS = "/usr/lib/cni"


@pytest.fixture(scope="module")
def clab() -> Iterator[Lab]:
    with running_lab("ctr", pods=[("anchor", "node1", {}), ("peer", "node1", {})]) as lab:
        yield lab


@pytest.fixture
def new_ns(clab: Lab) -> Iterator[Any]:
    """Make pod namespaces on demand; every one is deleted afterwards."""
    made: list[str] = []

    def make(tag: str) -> str:
        name = f"{clab.prefix}k-{tag}"
        netns.delete(name)
        made.append(name)
        return netns.add(name)

    yield make
    for name in made:
        netns.delete(name)


def diff(now: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot gained (+) and lost (-), for failure messages."""
    return {k: {"+": sorted(set(now[k]) - set(then[k])), "-": sorted(set(then[k]) - set(now[k]))}
            for k in now if now[k] != then[k]}


def conf(lab: Lab, **extra: Any) -> dict[str, Any]:
    return {**json.loads(lab.net_conf(lab.node("node1"))), **extra}


def in_pod(ns_path: str, *argv: str) -> str:
    return subprocess.run(["ip", "-n", os.path.basename(ns_path), *argv], check=True,
                          capture_output=True, text=True).stdout


def ports(lab: Lab) -> list[str]:
    return lab.node("node1").ovs.vsctl("list-ports", "br-int").split()


def gw(lab: Lab) -> str:
    return lab.node("node1").pod_cidr.rsplit(".", 1)[0] + ".1"


def addr(lab: Lab, last: int) -> str:
    return lab.node("node1").pod_cidr.rsplit(".", 1)[0] + f".{last}"


# -- 1: GC is per network --------------------------------------------------------------

def test_gc_leaves_other_networks_attachments(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    ns = new_ns("gc")
    cid = secrets.token_hex(32)
    other = conf(clab, name="othernet")
    rc, out = run_plugin(clab, good_env(clab, ns, cid), json.dumps(other))
    assert rc == 0, out
    added = snapshot(clab)
    anchor = clab.pod("anchor")
    keep = [{"containerID": p.container_id, "ifname": "eth0"}
            for p in (anchor, clab.pod("peer"))]
    gc = conf(clab, cniVersion="1.1.0", **{"cni.dev/valid-attachments": keep})
    rc, out = run_plugin(clab, {"CNI_COMMAND": "GC", "CNI_PATH": clab.bin_dir}, json.dumps(gc))
    assert rc == 0, out
    assert snapshot(clab) == added, "GC of network flowcni removed an othernet attachment"
    # The network it belongs to collects it.
    gc_other = {**gc, "name": "othernet", "cni.dev/valid-attachments": []}
    rc, out = run_plugin(clab, {"CNI_COMMAND": "GC", "CNI_PATH": clab.bin_dir},
                         json.dumps(gc_other))
    assert rc == 0, out
    assert eventually(lambda: snapshot(clab) == before), (snapshot(clab), before)
    assert ping(clab, "anchor", clab.pod("peer").ip)


# -- 2: chaining the reference meta plugins ---------------------------------------------

def run_ref(lab: Lab, plugin: str, env: dict[str, str], netconf: dict[str, Any]
            ) -> tuple[int, dict[str, Any]]:
    """One plugin of a chain, run in the node's network namespace as a runtime there would."""
    path = os.path.join(lab.bin_dir, "flowcni") if plugin == "flowcni" else \
        os.path.join(REF_PLUGINS, plugin)
    p = subprocess.run(["ip", "netns", "exec", lab.node("node1").netns, path],
                       input=json.dumps(netconf), capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], **env,
                            "CNI_PATH": f"{lab.bin_dir}:{REF_PLUGINS}"})
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {"stderr": p.stderr})


def run_chain(lab: Lab, command: str, env: dict[str, str], conflist: dict[str, Any],
              prev: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """libcni's order: ADD front to back feeding each result on; DEL back to front."""
    plugins = conflist["plugins"] if command == "ADD" else list(reversed(conflist["plugins"]))
    result = prev
    for plugin in plugins:
        netconf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        if result is not None:
            netconf["prevResult"] = result
        rc, out = run_ref(lab, plugin["type"], {**env, "CNI_COMMAND": command}, netconf)
        assert rc == 0, (plugin["type"], command, out)
        if command == "ADD":
            result = out
    return result


def qdiscs(lab: Lab, dev: str) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.node("node1").netns, "tc", "qdisc",
                           "show", "dev", dev], capture_output=True, text=True).stdout


def links(lab: Lab) -> str:
    return subprocess.run(["ip", "-n", lab.node("node1").netns, "-o", "link"],
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(not all(os.path.exists(os.path.join(REF_PLUGINS, p))
                            for p in ("portmap", "bandwidth", "tuning", "firewall")),
                    reason="Debian's containernetworking-plugins not installed")
@pytest.mark.skipif(shutil.which("tc") is None, reason="tc not installed")
def test_chain_with_portmap_bandwidth_tuning_firewall(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    ns = new_ns("chain")
    cid = secrets.token_hex(32)
    first = json.loads(clab.net_conf(clab.node("node1")))
    flowcni = {k: v for k, v in first.items() if k not in ("name", "cniVersion")}
    conflist = {"cniVersion": "1.0.0", "name": "flowcni", "plugins": [
        flowcni,
        {"type": "portmap", "capabilities": {"portMappings": True},
         "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80,
                                             "protocol": "tcp"}]}},
        {"type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 80_000,
         "egressRate": 8_000_000, "egressBurst": 80_000},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.log_martians": "1"}},
        {"type": "firewall", "backend": "iptables"},
    ]}
    env = good_env(clab, ns, cid)
    result = run_chain(clab, "ADD", env, conflist)
    assert result is not None
    host = [i for i in result["interfaces"] if "sandbox" not in i]
    assert host and host[0]["name"].startswith("fcv") and host[0].get("mac"), result
    veth = host[0]["name"]
    assert "tbf" in qdiscs(clab, veth), qdiscs(clab, veth)  # ingress shaping on the veth
    assert "bwp" in links(clab)  # egress shaping: the ifb device bandwidth made
    assert in_pod(ns, "-o", "link", "show", "eth0")
    sysctl = subprocess.run(["ip", "netns", "exec", os.path.basename(ns), "sysctl", "-n",
                             "net.ipv4.conf.eth0.log_martians"], capture_output=True,
                            text=True).stdout.strip()
    assert sysctl == "1"
    run_chain(clab, "DEL", env, conflist, prev=result)
    assert eventually(lambda: snapshot(clab) == before), (snapshot(clab), before)
    assert "bwp" not in links(clab) and veth not in links(clab)


# -- 3: a second interface in the same pod ------------------------------------------------

def test_second_interface_in_the_same_pod(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    ns = new_ns("multi")
    cid = secrets.token_hex(32)
    env = good_env(clab, ns, cid)
    c = json.dumps(conf(clab))
    rc, first = run_plugin(clab, env, c)
    assert rc == 0, first
    rc, second = run_plugin(clab, {**env, "CNI_IFNAME": "net1"}, c)
    assert rc == 0, second
    assert second["routes"] == [], second  # the first interface owns the default route
    routes = in_pod(ns, "route", "show", "default")
    assert routes.count("default") == 1 and "dev eth0" in routes, routes
    net1_ip = second["ips"][0]["address"].split("/")[0]
    assert net1_ip in in_pod(ns, "-o", "addr", "show", "net1")
    # Both interfaces are attached and reachable.
    assert ping(clab, "anchor", first["ips"][0]["address"].split("/")[0])
    for ifname in ("net1", "eth0"):
        rc, out = run_plugin(clab, {**env, "CNI_IFNAME": ifname, "CNI_COMMAND": "DEL"}, c)
        assert rc == 0, out
    assert eventually(lambda: snapshot(clab) == before), (snapshot(clab), before)


def test_agent_failure_details_are_one_line(clab: Lab, new_ns: Any) -> None:
    """An interface name taken inside the pod: one readable line, no traceback."""
    before = snapshot(clab)
    ns = new_ns("dup")
    subprocess.run(["ip", "-n", os.path.basename(ns), "link", "add", "eth0", "type", "veth",
                    "peer", "name", "other0"], check=True)
    rc, out = run_plugin(clab, good_env(clab, ns), json.dumps(conf(clab)))
    assert rc == 1, out
    assert "Traceback" not in out["details"] and "\n" not in out["msg"] + out["details"], out
    assert snapshot(clab) == before


# -- 5: runtimeConfig ips and mac ---------------------------------------------------------

def test_runtime_config_ips_and_mac_are_honoured(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    ns = new_ns("rcfg")
    cid = secrets.token_hex(32)
    want_ip, want_mac = addr(clab, 77), "0a:58:0a:f4:01:4d"
    c = conf(clab, capabilities={"ips": True, "mac": True},
             runtimeConfig={"ips": [want_ip + "/24"], "mac": want_mac})
    env = good_env(clab, ns, cid)
    rc, out = run_plugin(clab, env, json.dumps(c))
    assert rc == 0, out
    assert out["ips"][0]["address"] == want_ip + "/24"
    pod_if = [i for i in out["interfaces"] if i.get("sandbox")][0]
    assert pod_if["mac"] == want_mac
    shown = in_pod(ns, "-o", "addr", "show", "eth0") + in_pod(ns, "-o", "link", "show", "eth0")
    assert want_ip in shown and want_mac in shown, shown
    assert ping(clab, "anchor", want_ip)
    held = snapshot(clab)
    # The same address for another pod, and one outside the node's range: code 7, no leak.
    for ip in (want_ip, "10.99.0.5", gw(clab)):
        other = conf(clab, runtimeConfig={"ips": [ip]})
        rc2, err = run_plugin(clab, good_env(clab, new_ns(f"r{ip.rsplit('.', 1)[1]}")),
                              json.dumps(other))
        assert (rc2, err.get("code")) == (1, 7), err
        assert ip in err["msg"], err
        assert snapshot(clab) == held
    bad_mac = conf(clab, runtimeConfig={"mac": "01:00:5e:00:00:01"})
    rc2, err = run_plugin(clab, good_env(clab, new_ns("rmac")), json.dumps(bad_mac))
    assert (rc2, err.get("code")) == (1, 7) and "mac" in err["msg"], err
    assert snapshot(clab) == held
    rc, out = run_plugin(clab, {**env, "CNI_COMMAND": "DEL"}, json.dumps(c))
    assert rc == 0, out
    assert eventually(lambda: snapshot(clab) == before), (snapshot(clab), before)


# -- 6: runtime pods become Pods in the embedded store --------------------------------------

DENY_ALL = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: iso}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""


def test_runtime_pod_is_recorded_and_policy_isolates_it(clab: Lab, new_ns: Any) -> None:
    store = clab.store()
    before = snapshot(clab)
    ns = new_ns("iso")
    cid = secrets.token_hex(32)
    env = {**good_env(clab, ns, cid),
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=iso;K8S_POD_NAME=boxed;"
                       "FLOWCNI_POD_LABELS=app=boxed,tier=db"}
    c = json.dumps(conf(clab))
    rc, out = run_plugin(clab, env, c)
    assert rc == 0, out
    ip = out["ips"][0]["address"].split("/")[0]
    try:
        rec = store.get("Pod", "iso", "boxed")
        assert rec is not None
        assert (rec["ip"], rec["node"], rec["containerID"], rec["labels"]) == (
            ip, "node1", cid, {"app": "boxed", "tier": "db"}), rec
        assert ping(clab, "anchor", ip)
        for kind, pns, name, body in manifests.load(DENY_ALL):
            store.put(kind, pns, name, body)
        clab.wait_realized()
        peer_ip = clab.pod("peer").ip
        # The deny shows while the control path works at the same moment.
        assert eventually(lambda: not ping(clab, "anchor", ip) and ping(clab, "anchor", peer_ip),
                          timeout=15)
    finally:
        store.delete("NetworkPolicy", "iso", "deny-all")
        rc, out = run_plugin(clab, {**env, "CNI_COMMAND": "DEL"}, c)
    assert rc == 0, out
    assert store.get("Pod", "iso", "boxed") is None
    assert eventually(lambda: snapshot(clab) == before, timeout=15), diff(snapshot(clab), before)


def test_bad_labels_are_refused_before_anything(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    env = {**good_env(clab, new_ns("lbl")),
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=iso;K8S_POD_NAME=x;"
                       "FLOWCNI_POD_LABELS=app=no spaces"}
    rc, out = run_plugin(clab, env, json.dumps(conf(clab)))
    assert (rc, out.get("code")) == (1, 4) and "FLOWCNI_POD_LABELS" in out["msg"], out
    assert snapshot(clab) == before
    assert clab.store().get("Pod", "iso", "x") is None


# -- 7, 10, 12: bad input refused before any side effect ------------------------------------

def deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = [v]
    return v


BAD_NETNS = [("regular-file", "file"), ("directory", "dir"), ("dev-null", "/dev/null")]


@pytest.mark.parametrize("kind", [k for k, _ in BAD_NETNS])
def test_netns_that_is_not_a_network_namespace(clab: Lab, kind: str, tmp_path: Any) -> None:
    path = dict(BAD_NETNS)[kind]
    if path == "file":
        path = str(tmp_path / "netns-file")
        open(path, "w").close()
    elif path == "dir":
        path = str(tmp_path)
    before = snapshot(clab)
    for command in ("ADD", "CHECK"):
        c = conf(clab, prevResult={"interfaces": [], "ips": []})
        rc, out = run_plugin(clab, {**good_env(clab, path), "CNI_COMMAND": command},
                             json.dumps(c))
        assert (rc, out.get("code")) == (1, 4), out
        assert "CNI_NETNS" in out["msg"] and "not a network namespace" in out["msg"], out
    assert snapshot(clab) == before


BAD_PREV = [{"ips": "x"}, {"interfaces": 5}, {"ips": [{"address": 5}]},
            {"interfaces": [{"mac": "x"}]}]


@pytest.mark.parametrize("prev", BAD_PREV, ids=[json.dumps(p) for p in BAD_PREV])
def test_malformed_prev_result_leaves_nothing(clab: Lab, new_ns: Any,
                                              prev: dict[str, Any]) -> None:
    before = snapshot(clab)
    rc, out = run_plugin(clab, good_env(clab, new_ns("prev")),
                         json.dumps(conf(clab, prevResult=prev)))
    assert (rc, out.get("code")) == (1, 7) and "prevResult" in out["msg"], out
    assert snapshot(clab) == before


def test_check_without_prev_result_is_an_error(clab: Lab) -> None:
    anchor = clab.pod("anchor")
    env = {**clab.plugin_env("CHECK", anchor)}
    rc, out = run_plugin(clab, env, json.dumps(conf(clab)))
    assert (rc, out.get("code")) == (1, 7) and "prevResult" in out["msg"], out


def test_add_again_with_another_netns_is_an_error(clab: Lab, new_ns: Any) -> None:
    anchor = clab.pod("anchor")
    before = snapshot(clab)
    env = {**clab.plugin_env("ADD", anchor), "CNI_NETNS": new_ns("again")}
    rc, out = run_plugin(clab, env, json.dumps(conf(clab)))
    assert (rc, out.get("code")) == (1, 4), out
    assert "CNI_NETNS" in out["msg"], out
    assert snapshot(clab) == before
    # The same ADD with its own netns still answers with its attachment.
    rc, out = run_plugin(clab, clab.plugin_env("ADD", anchor), json.dumps(conf(clab)))
    assert rc == 0 and out["ips"][0]["address"].startswith(anchor.ip + "/"), out
    assert ping(clab, "anchor", clab.pod("peer").ip)


def test_huge_config_is_a_permanent_error_naming_the_limit(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    big = json.dumps(conf(clab, padding="x" * (10 << 20)))
    rc, out = run_plugin(clab, good_env(clab, new_ns("big")), big)
    assert (rc, out.get("code")) == (1, 7), {k: str(v)[:200] for k, v in out.items()}
    assert "limit" in out["msg"] and "bytes" in out["msg"], out
    assert snapshot(clab) == before


def test_deep_nesting_is_a_decode_error(clab: Lab, new_ns: Any) -> None:
    before = snapshot(clab)
    for depth in (100, 5000):
        rc, out = run_plugin(clab, good_env(clab, new_ns("deep")),
                             json.dumps(conf(clab, extra=deep(depth - 2)))
                             if depth < 900 else
                             json.dumps(conf(clab))[:-1] + ', "extra": ' + "[" * depth
                             + "]" * depth + "}")
        assert (rc, out.get("code")) == (1, 6), out
        assert "nest" in out["msg"], out
    assert snapshot(clab) == before
