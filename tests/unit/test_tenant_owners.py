"""Which owners are a tenant's (controller/tenants.py Tenants.owners): the one answer
`flowctl flows --tenant` and the per-tenant metrics use; pure (no switch).

Checked against the flows themselves: every desired flow that matches a tenant's id
must be under one of its owners, and none of another tenant's owners is its.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flowcni.flows.pod import LocalPod

from tests.unit.test_tenant_services import NODES, _tenants, ns, pod, svc, tn


def _attached(namespace: str, tenant: str, ip: str, ofport: int) -> SimpleNamespace:
    """A local pod attachment as the agent's pod records give it (key c<ns>/eth0)."""
    key = f"c{namespace}/eth0"
    return SimpleNamespace(namespace=namespace, name="w", ip=ip, tenant=tenant, key=key,
                           local_pod=lambda: LocalPod(key, ofport, ip,
                                                      f"02:00:00:00:00:{ofport:02x}"))


def _matching(fs: Any, vni: int) -> set[str]:
    """Owners of desired flows that match tenant id `vni` (reg4: IN_TENANT | VNI)."""
    return {o for o in fs.owners() for f in fs.flows_of([o])
            if dict(f.match).get("reg4") == (0x10000 | vni, 0x1FFFF)}


def test_owners_cover_every_flow_of_the_tenant(tmp_path: Any) -> None:
    t, fs = _tenants(tmp_path)
    blue, green = tn("blue", 101), tn("green", 303)
    blue["spec"]["connectTo"], green["spec"]["connectTo"] = ["green"], ["blue"]
    green["spec"]["subnets"] = ["10.60.0.0/16"]
    policy = {"namespace": "b1", "name": "only", "spec": {
        "podSelector": {}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": "10.50.1.2/32"}}]}]}}
    t.pods = lambda: [_attached("b1", "blue", "10.50.1.5", 5),
                      _attached("r1", "red", "10.50.1.5", 6),
                      _attached("g1", "green", "10.60.1.5", 7)]
    t.load([blue, tn("red", 202), green],
           [ns("b1", tenant="blue"), ns("r1", tenant="red"), ns("g1", tenant="green")],
           NODES, [pod("b1", "w", "10.50.1.5"), pod("r1", "w", "10.50.1.5")], [policy],
           [svc("b1"), svc("r1"), svc("g1", name="g", ip="10.96.5.6")], [])
    owners = t.owners("blue")
    blue_flows = _matching(fs, 101)
    assert blue_flows and blue_flows <= owners, blue_flows - owners
    assert {"tenant:blue", "tenant-policy:blue", "tenant-connect:blue",
            "tenant-service:b1/web", "tenant-service:b1/web@green",
            "tenant-service:g1/g@blue", "pod:cb1/eth0"} <= owners
    assert not owners & ({"tenant:red", "tenant-service:r1/web", "pod:cr1/eth0"}
                         | _matching(fs, 202))
    row = next(r for r in t.describe() if r["name"] == "blue")
    assert row["owners"] == sorted(owners) and "tenants" in row["shared_owners"]


def test_flowctl_names_an_agent_too_old_to_name_tenant_owners() -> None:
    """An agent whose `tenants` reply has no owners (older than this flowctl): a clear
    error naming the node, not a KeyError; an unknown tenant is still "none"."""

    import pytest
    from flowcni.ctl import flowctl
    from flowcni.ctl.providers import NodeAgent

    class Old:
        def call(self, verb: str, **args: Any) -> dict[str, Any]:
            return {"tenants": [{"name": "blue", "vni": 7}]}
    n = NodeAgent("node1", Old())
    assert flowctl._tenant_owners(n, "red") == set()
    with pytest.raises(flowctl.CLIError, match="node node1: its agent does not name"):
        flowctl._tenant_owners(n, "blue")
