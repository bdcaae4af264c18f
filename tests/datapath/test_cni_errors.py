"""Bad input to the real plugin against a real agent: right code, clear message, nothing leaked.

After every refused request the node must hold exactly what it held before:
the same leases, OVS ports, host veths and flows.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import running_lab
from tests.support.probe import eventually, ping


@pytest.fixture(scope="module")
def elab() -> Iterator[Lab]:
    with running_lab("err", pods=[("anchor", "node1", {})]) as lab:
        yield lab


def snapshot(lab: Lab) -> dict[str, Any]:
    node = lab.node("node1")
    with open(os.path.join(node.rundir, "agent", "ipam.json")) as f:
        leases = sorted(json.load(f)["leases"])
    links = subprocess.run(["ip", "-n", node.netns, "-o", "link"], capture_output=True,
                           text=True).stdout
    flows = node.ovs.ofctl("dump-flows", "br-int", "--no-stats")
    return {
        "leases": leases,
        "ports": sorted(node.ovs.vsctl("list-ports", "br-int").split()),
        "veths": sorted(ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()
                        if ": fc" in ln),
        "flows": sorted(ln.split(",", 1)[1] for ln in flows.splitlines() if "actions=" in ln),
    }


def run_plugin(lab: Lab, env: dict[str, str], stdin: str) -> tuple[int, dict[str, Any]]:
    base = {"PATH": os.environ["PATH"]}
    p = subprocess.run([os.path.join(lab.bin_dir, "flowcni")], input=stdin,
                       env={**base, **env}, capture_output=True, text=True, timeout=60)
    out = json.loads(p.stdout) if p.stdout.strip() else {}
    return p.returncode, out


def good_env(lab: Lab, ns_path: str, cid: str | None = None) -> dict[str, str]:
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid or secrets.token_hex(32),
            "CNI_NETNS": ns_path, "CNI_IFNAME": "eth0", "CNI_PATH": lab.bin_dir,
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bad"}


@pytest.fixture
def pod_ns(elab: Lab) -> Iterator[str]:
    name = f"{elab.prefix}p-bad"
    netns.delete(name)
    yield netns.add(name)
    netns.delete(name)


CASES = [
    # (id, env changes, stdin transform, expected code, words the message must contain)
    ("malformed-json", {}, lambda c: c[:-3], 6, ["decod"]),
    ("unknown-version", {}, lambda c: c.replace('"1.0.0"', '"9.9.9"'), 1, ["9.9.9"]),
    ("missing-containerid", {"CNI_CONTAINERID": None}, None, 4, ["CNI_CONTAINERID"]),
    ("missing-netns", {"CNI_NETNS": None}, None, 4, ["CNI_NETNS"]),
    ("netns-does-not-exist", {"CNI_NETNS": "/run/netns/flowcni-no-such-ns"}, None, 4,
     ["CNI_NETNS", "/run/netns/flowcni-no-such-ns"]),
    ("bad-cni-args", {"CNI_ARGS": "K8S_POD_NAME"}, None, 4, ["CNI_ARGS"]),
    ("missing-name", {}, lambda c: c.replace('"name": "flowcni", ', ""), 7, ["name"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_refused_and_nothing_leaked(elab: Lab, pod_ns: str, case: Any) -> None:
    _, env_change, transform, code, words = case
    conf = elab.net_conf(elab.node("node1"))
    assert '"name": "flowcni", ' in conf
    env = good_env(elab, pod_ns)
    for k, v in env_change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    stdin = transform(conf) if transform else conf
    before = snapshot(elab)
    rc, out = run_plugin(elab, env, stdin)
    assert rc != 0
    assert out.get("code") == code, out
    for w in words:
        assert w.lower() in out.get("msg", "").lower(), out
    assert snapshot(elab) == before


def test_agent_down_gives_try_again_and_status_50(elab: Lab, pod_ns: str) -> None:
    node = elab.node("node1")
    conf = json.loads(elab.net_conf(node))
    conf["agentSocket"] = "/run/flowcni-test-no-agent/cni.sock"
    rc, out = run_plugin(elab, good_env(elab, pod_ns), json.dumps(conf))
    assert (rc, out.get("code")) == (1, 11), out
    assert "/run/flowcni-test-no-agent/cni.sock" in out["msg"]
    conf["cniVersion"] = "1.1.0"
    rc, out = run_plugin(elab, {"CNI_COMMAND": "STATUS", "CNI_PATH": elab.bin_dir},
                         json.dumps(conf))
    assert (rc, out.get("code")) == (1, 50), out


def test_status_ok_when_agent_ready(elab: Lab) -> None:
    conf = json.loads(elab.net_conf(elab.node("node1")))
    conf["cniVersion"] = "1.1.0"
    rc, out = run_plugin(elab, {"CNI_COMMAND": "STATUS", "CNI_PATH": elab.bin_dir},
                         json.dumps(conf))
    assert rc == 0, out


def test_failed_add_in_agent_is_rolled_back(elab: Lab, pod_ns: str) -> None:
    """eth0 already exists in the netns: the veth step fails after the lease was taken."""
    subprocess.run(["ip", "-n", os.path.basename(pod_ns), "link", "add", "eth0", "type",
                    "veth", "peer", "name", "other0"], check=True)
    before = snapshot(elab)
    rc, out = run_plugin(elab, good_env(elab, pod_ns), elab.net_conf(elab.node("node1")))
    assert rc == 1 and out["code"] == 4 and "eth0" in out["msg"], out
    assert snapshot(elab) == before


def test_check_and_gc(elab: Lab, pod_ns: str) -> None:
    conf = json.loads(elab.net_conf(elab.node("node1")))
    cid = secrets.token_hex(32)
    before = snapshot(elab)
    rc, out = run_plugin(elab, good_env(elab, pod_ns, cid), json.dumps(conf))
    assert rc == 0, out
    check_env = {**good_env(elab, pod_ns, cid), "CNI_COMMAND": "CHECK"}
    conf["prevResult"] = out
    rc, out2 = run_plugin(elab, check_env, json.dumps(conf))
    assert rc == 0, out2
    # CHECK notices the address being gone.
    subprocess.run(["ip", "-n", os.path.basename(pod_ns), "addr", "flush", "dev", "eth0"],
                   check=True)
    rc, out2 = run_plugin(elab, check_env, json.dumps(conf))
    assert rc == 1 and "lacks address" in out2["msg"], out2
    # GC with only the anchor pod valid removes the new attachment.
    anchor = elab.pod("anchor")
    gc_conf = {**json.loads(elab.net_conf(elab.node("node1"))), "cniVersion": "1.1.0",
               "cni.dev/valid-attachments": [{"containerID": anchor.container_id,
                                              "ifname": "eth0"}]}
    rc, out2 = run_plugin(elab, {"CNI_COMMAND": "GC", "CNI_PATH": elab.bin_dir},
                          json.dumps(gc_conf))
    assert rc == 0, out2
    assert eventually(lambda: snapshot(elab) == before), (snapshot(elab), before)
    assert ping(elab, "anchor", elab.node("node1").pod_cidr.replace("0/24", "1"))


def test_50_concurrent_adds_get_distinct_addresses(elab: Lab) -> None:
    names = [f"{elab.prefix}c{i}" for i in range(50)]
    paths = [netns.add(n) for n in names]
    conf = elab.net_conf(elab.node("node1"))
    envs = [good_env(elab, p) for p in paths]
    results: list[Any] = [None] * 50
    before = snapshot(elab)
    try:
        def add(i: int) -> None:
            results[i] = run_plugin(elab, envs[i], conf)

        threads = [threading.Thread(target=add, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is not None and r[0] == 0 for r in results), \
            [r for r in results if r is None or r[0] != 0][:3]
        ips = {r[1]["ips"][0]["address"] for r in results}
        assert len(ips) == 50
    finally:
        for e in envs:
            run_plugin(elab, {**e, "CNI_COMMAND": "DEL"}, conf)
        for n in names:
            netns.delete(n)
    assert eventually(lambda: snapshot(elab) == before), (snapshot(elab), before)
