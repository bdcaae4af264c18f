"""Control-plane faults a node lives through: a locked embedded store, a shared netns prefix.

- The SQLite store locked for a while (another process holding an exclusive
  lock on the file): traffic goes on, `flowctl status` reports the store as
  unreachable, the liveness probe keeps passing, `flowctl apply` fails with a
  clear message (or succeeds once the lock is gone), never a traceback.
- `lab down` removes only the namespaces its state records: a decoy netns
  sharing the lab's prefix (made and removed by this test) survives it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from flowcni.lab import netns
from flowcni.lab.lab import Lab

from tests.datapath.conftest import make_lab, running_lab
from tests.support.probe import eventually, ping

POLICY = textwrap.dedent("""\
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: during-lock, namespace: default}
    spec:
      podSelector: {matchLabels: {app: nothing}}
      policyTypes: [Ingress]
    """)

# Exclusive locks on the WAL index's writer and reader slots (bytes 120-127 of the
# -shm file): every read and write of every other process then fails or stalls,
# which is what a stuck or hostile lock holder does to the store.
LOCKER = textwrap.dedent("""\
    import fcntl, sys, time
    f = open(sys.argv[1] + "-shm", "r+b")
    for off in range(120, 128):
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, off)
                break
            except OSError:
                time.sleep(0.001)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    """)


@pytest.fixture(scope="module")
def flab() -> Iterator[Lab]:
    with running_lab("flt", pods=[("a", "node1", {}), ("b", "node1", {})]) as lab:
        yield lab


def flowctl(lab: Lab, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOWCNI_LAB_DIR": lab.base, "FLOWCNI_LAB_PREFIX": lab.prefix}
    return subprocess.run([sys.executable, "-m", "flowcni.ctl.flowctl", *args], input=stdin,
                          env=env, capture_output=True, text=True, timeout=120)


def test_locked_store_leaves_status_probe_and_traffic_working(flab: Lab) -> None:
    node = flab.node("node1")
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, flab.store_path, "20"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        # The agent notices by itself (its monitor's read hangs or fails).
        def unreachable() -> bool:
            st = flowctl(flab, "status", "--node", "node1", "--json")
            return st.returncode == 0 and \
                json.loads(st.stdout)[0].get("datastore_reachable") is False
        assert eventually(unreachable, timeout=15, interval=0.5)
        probe = flowctl(flab, "probe", "--socket", node.socket, "--ready")
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert ping(flab, "a", flab.pod("b").ip, count=2)
        applied = flowctl(flab, "apply", "-f", "-", stdin=POLICY)
        assert "Traceback" not in applied.stderr, applied.stderr[-2000:]
        if applied.returncode != 0:
            assert "unreachable" in applied.stderr and flab.store_path in applied.stderr, \
                applied.stderr
    finally:
        locker.kill()
        locker.wait()
    # Back to normal without a restart.
    assert eventually(lambda: json.loads(flowctl(flab, "status", "--node", "node1", "--json")
                                         .stdout)[0].get("datastore_reachable") is True,
                      timeout=30, interval=0.5)
    assert flowctl(flab, "apply", "-f", "-", stdin=POLICY).returncode == 0
    assert flowctl(flab, "delete", "-f", "-", stdin=POLICY).returncode == 0


def test_lab_down_removes_only_what_it_recorded() -> None:
    lab = make_lab("dn")
    decoys = [f"{lab.prefix}zz", f"{lab.prefix}node1-other"]
    lab.down()
    for d in decoys:
        netns.delete(d)
    try:
        for d in decoys:
            netns.add(d)
        lab.up(nodes=1)
        lab.pod_add("p", "node1")
        made = [lab.node("node1").netns, lab.pod("p").netns, lab.underlay_ns, lab.external_ns]
        assert all(netns.exists(n) for n in made)
        removed = lab.down()
        assert sorted(removed) == sorted(made)
        assert not any(netns.exists(n) for n in made)
        assert all(netns.exists(d) for d in decoys), "lab down removed a netns it did not make"
    finally:
        lab.down()
        for d in decoys:
            netns.delete(d)
