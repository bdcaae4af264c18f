"""NetworkPolicy inside a tenant network: the default network's engine, lifted into the tenant.

Each tenant gets a PolicyEngine of its own that sees only the tenant's
namespaces, pods and policies, so selectors (namespaceSelector included) can
only ever pick the tenant's pods, and ipBlock peers are addresses of the
tenant's space. Its flows are then lifted into the tenant: every match gains
the tenant id (reg4), priorities move up by LIFT (above every default-network
flow of the policy tables), and conjunction ids move into the tenant's own id
range (VNI << 16), so two tenants' rules never share a conjunction. The
flows that send a tenant packet on when no rule of its tenant matched sit at
PRIO_FALLTHROUGH, between the two: a tenant packet never meets a default rule,
and a default packet never meets a tenant rule (it has no tenant id).
"""

from __future__ import annotations

from typing import Any

from flowcni.flows.cookie import Feature
from flowcni.flows.model import Action, Conjunction, Flow
from flowcni.flows.policy import CONNTRACK_OWNER, PolicyEngine
from flowcni.flows.tables import DEFAULT, Pipeline
from flowcni.flows.tenant import TenantNet, _id

LIFT = 1000
CONJ_BITS = 16


def policy_owner(name: str) -> str:
    return f"tenant-policy:{name}"


def _conj(t: TenantNet, cid: int) -> int:
    if not 0 < cid < (1 << CONJ_BITS):
        raise ValueError(f"tenant {t.name}: more than {(1 << CONJ_BITS) - 1} policy "
                         "conjunctions")
    return (t.vni << CONJ_BITS) | cid


def lift(f: Flow, t: TenantNet, pipeline: Pipeline = DEFAULT) -> Flow:
    """A default-network policy flow as the same flow of tenant t."""
    m: dict[str, Any] = dict(f.match)
    if "reg4" in m:
        raise ValueError(f"{f.table}: policy flow already matches reg4")
    m.update(_id(t))
    if "conj_id" in m:
        m["conj_id"] = _conj(t, int(m["conj_id"]))
    acts: list[Action] = [Conjunction(_conj(t, a.id), a.clause, a.n_clauses)
                          if isinstance(a, Conjunction) else a for a in f.actions]
    return Flow.make(f.table, f.priority + LIFT, m, acts, f.goto, feature=Feature.TENANT,
                     owner=policy_owner(t.name), pipeline=pipeline)


def tenant_policy_flows(t: TenantNet, node: str, namespaces: list[dict[str, Any]],
                        pods: list[dict[str, Any]], policies: list[dict[str, Any]],
                        pipeline: Pipeline = DEFAULT) -> tuple[list[Flow], list[str]]:
    """The tenant's NetworkPolicy flows on `node`, from its own objects only; pure."""
    engine = PolicyEngine(node, pipeline)
    out, problems = engine.load(namespaces, pods, policies)
    out.pop(CONNTRACK_OWNER, None)  # the tenant's zone flows do this (flows/tenant.py)
    return [lift(f, t, pipeline) for fl in out.values() for f in fl], problems
