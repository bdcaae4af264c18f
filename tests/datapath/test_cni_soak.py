"""The reliability soak of bench/cni_soak.py in a short form: nothing leaks, nothing doubles.

Sequential ADD/DEL pairs and concurrent ADDs then DELs through the real
plugin on a one-node lab; afterwards the node holds exactly the leases, OVS
ports, veths and flows it held before, no two live pods shared an address,
every plugin run succeeded, no Pod record of a deleted pod stays in the
store, and the agent keeps no per-pod lock behind.
No timing is asserted: the full run with its figures is the bench's job.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from flowcni.ctl.client import AgentClient

from tests.datapath.conftest import running_lab

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "cni_soak.py")


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cni_soak", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_soak_leaks_nothing() -> None:
    soak = load_bench()
    with running_lab("soak") as lab:
        out = soak.soak(lab, pairs=50, concurrent=20, warmup=0)
        assert out["failures"] == 0, out["first_failures"]
        assert out["duplicate_ips"] == 0, out
        for k in ("leases", "ports", "veths", "flows", "pod_records"):
            assert out[f"leaked_{k}"] == 0, out
        st = AgentClient(lab.node("node1").api_socket).status()
        assert st["pods"] == 0 and st["pod_keys_in_flight"] == 0, st
