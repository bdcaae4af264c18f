"""Reading a node's flows back from OVS and saying who owns each one.

Shared by `flowctl flows` and `flowctl trace`: table numbers become the
names the agent published on the bridge, and each cookie is decoded into
round, feature and owner (the agent maps owner ids to the objects).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from flowcni.flows import cookie as ck
from flowcni.lab.ovs import OVS

_GOTO_RE = re.compile(r"goto_table:(\d+)")
_CT_TABLE_RE = re.compile(r"ct\(([^)]*)table=(\d+)")
_FIELD_RE = re.compile(r"(cookie|duration|table|n_packets|n_bytes|idle_age|hard_age|"
                       r"priority|reset_counts|send_flow_rem)=([^, ]+),? ?")


def table_names(ovs: OVS) -> dict[int, str]:
    out = ovs.vsctl("--if-exists", "get", "Bridge", "br-int",
                    f"external_ids:{ck.TABLES_KEY}").strip().strip('"')
    names: dict[int, str] = {}
    for part in filter(None, out.split(",")):
        n, _, i = part.partition("=")
        names[int(i)] = n
    return names


@dataclass
class FlowRow:
    """One flow as OVS holds it. The JSON of `flowctl flows --json` is a list of these."""

    table: str
    priority: int
    match: str
    actions: str
    cookie: str
    round: int
    feature: str
    owner_id: str
    owner: str = ""
    object: str = ""
    n_packets: int = 0
    n_bytes: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def text(self, stats: bool = True) -> str:
        s = f"[{self.feature} r{self.round}] table={self.table} priority={self.priority}"
        if self.match:
            s += f" {self.match}"
        s += f" actions={self.actions}"
        if self.object:
            s += f"  # {self.object}"
        if stats:
            s += f"  (packets={self.n_packets} bytes={self.n_bytes})"
        return s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def parse_dump(dump: str, names: dict[int, str]) -> list[FlowRow]:
    """Parse `ovs-ofctl dump-flows` output."""
    def name(i: str | int) -> str:
        return names.get(int(i), str(i))

    rows = []
    for line in dump.splitlines():
        line = line.strip()
        if "actions=" not in line:
            continue
        head, _, actions = line.partition(" actions=")
        fields: dict[str, str] = {}
        rest = head
        while True:
            m = _FIELD_RE.match(rest)
            if not m:
                break
            fields[m[1]] = m[2]
            rest = rest[m.end():]
        match = rest.strip().rstrip(",")
        if "priority" not in fields and match.startswith("priority="):
            pr, _, match = match.partition(",")
            fields["priority"] = pr.split("=")[1]
        cookie = int(fields.get("cookie", "0x0"), 16)
        feat = ck.feature_of(cookie)
        actions = _GOTO_RE.sub(lambda m: f"goto_table:{name(m[1])}", actions)
        actions = _CT_TABLE_RE.sub(lambda m: f"ct({m[1]}table={name(m[2])}", actions)
        rows.append(FlowRow(
            table=name(fields.get("table", 0)), priority=int(fields.get("priority", 32768)),
            match=match, actions=actions, cookie=f"{cookie:#x}", round=ck.round_of(cookie),
            feature=feat.name.lower() if feat else "foreign",
            owner_id=f"{ck.owner_of(cookie):#x}",
            n_packets=int(fields.get("n_packets", 0)), n_bytes=int(fields.get("n_bytes", 0))))
    return rows


def decorate(rows: list[FlowRow], owners: dict[str, dict[str, str]]) -> list[FlowRow]:
    """Fill owner and object from the agent's owner table (owner id -> names)."""
    for r in rows:
        o = owners.get(r.owner_id)
        if o and r.feature != "foreign":
            r.owner, r.object = o["owner"], o["object"]
        elif r.feature == "foreign":
            r.object = "not made by flowcni"
    return rows


def node_flows(ovs: OVS, owners: dict[str, dict[str, str]]) -> list[FlowRow]:
    return decorate(parse_dump(ovs.ofctl("dump-flows", "br-int"), table_names(ovs)), owners)
