"""Desired vs installed: which flows to add (or overwrite) and which to delete."""

from __future__ import annotations

from collections.abc import Iterable

from flowcni.flows.model import Flow

Key = tuple


def index(flows: Iterable[Flow]) -> dict[Key, Flow]:
    """Flows by OpenFlow identity; two different flows with one identity is a builder bug."""
    out: dict[Key, Flow] = {}
    for f in flows:
        old = out.get(f.key)
        if old is not None and old != f:
            raise ValueError(f"two flows claim {f.table} priority {f.priority} {f.match}: "
                             f"{old.owner_name} and {f.owner_name}")
        out[f.key] = f
    return out


def diff(installed: dict[Key, Flow], desired: dict[Key, Flow]) -> tuple[list[Flow], list[Flow]]:
    """(to_add, to_delete). A changed flow is only added: OFPFC_ADD overwrites it in place."""
    adds = [f for k, f in desired.items() if installed.get(k) != f]
    dels = [f for k, f in installed.items() if k not in desired]
    return adds, dels
