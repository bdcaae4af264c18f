"""OVSDB access with ovsdbapp: the integration bridge, its controller, ports and the round.

Everything the agent keeps in OVSDB lives here, so OVSDB is a second copy of
the node's state that survives agent restarts: pod ports carry the pod's
identity and address in external_ids, and the bridge carries the agent round
and the table numbering.

The Controller row is created once and never deleted or replaced: OVS
flushes a bridge's flows when its controller set changes.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from flowcni.flows import cookie as ck


def _import_ovs_poller_without_eventlet() -> None:
    """Import the OVS library's poller with eventlet out of its reach.

    ovs.poller imports eventlet, if installed (os-ken depends on it), only to
    ask whether eventlet monkey-patched `select`; the agent never patches
    anything (os-ken runs on its native hub), so the answer is always no. That
    import alone cost the agent 13 MB of RSS and 350 modules (eventlet, and
    dnspython twice: once patched). A None entry in sys.modules makes the
    import fail, which ovs.poller takes as "no eventlet"; the entry is removed
    at once, so anything that wants eventlet later still gets it.
    """
    if "ovs.poller" in sys.modules or "eventlet" in sys.modules:
        return
    sys.modules["eventlet"] = None  # type: ignore[assignment]
    try:
        import ovs.poller  # noqa: F401
    finally:
        del sys.modules["eventlet"]


_import_ovs_poller_without_eventlet()

from ovsdbapp.backend.ovs_idl import connection, idlutils, transaction  # noqa: E402
from ovsdbapp.schema.open_vswitch import impl_idl  # noqa: E402

LOG = logging.getLogger(__name__)

ROUND_KEY = ck.ROUND_KEY
TABLES_KEY = ck.TABLES_KEY
OWNER_KEY = "flowcni-owner"
PROTOCOLS = ["OpenFlow10", "OpenFlow13", "OpenFlow15"]


def _loopback_tcp(target: str) -> bool:
    """A TCP controller target on loopback: what flowcni agents used before unix sockets."""
    kind, _, rest = target.partition(":")
    return kind == "tcp" and (rest.startswith("127.") or rest.startswith("[::1]"))


def _is_dpid(s: str) -> bool:
    return len(s) == 16 and all(c in "0123456789abcdefABCDEF" for c in s) and int(s, 16) != 0


class OVSDBError(RuntimeError):
    """An OVSDB operation did not do what was asked."""


@dataclass(frozen=True)
class PortInfo:
    name: str
    ofport: int
    external_ids: dict[str, str]


def default_datapath_type() -> str:
    """`system` where the kernel module is loaded, else the userspace datapath."""
    return "system" if os.path.isdir("/sys/module/openvswitch") else "netdev"


class OVSDB:
    """A connection to one ovsdb-server (ovsdbapp's IDL thread does the I/O)."""

    def __init__(self, remote: str, timeout: float = 10.0) -> None:
        self.remote = remote
        helper = idlutils.get_schema_helper(remote, "Open_vSwitch")
        for table in ("Open_vSwitch", "Bridge", "Port", "Interface", "Controller"):
            helper.register_table(table)
        idl = connection.OvsdbIdl(remote, helper)
        self.conn = connection.Connection(idl=idl, timeout=timeout)
        self.api = impl_idl.OvsdbIdl(self.conn, start=True)

    def close(self) -> None:
        self.conn.stop(timeout=2)

    # -- bridge --------------------------------------------------------------

    def ensure_bridge(self, name: str, datapath_type: str, controller: str) -> None:
        """Create or adopt `name`: secure fail mode, OpenFlow 1.3+, one controller target.

        An existing bridge keeps its flows: nothing here deletes or recreates
        a row the bridge already has.
        """
        api = self.api
        with api.transaction(check_error=True) as txn:
            txn.add(api.add_br(name, may_exist=True, datapath_type=datapath_type))
            txn.add(api.db_set("Bridge", name, ("fail_mode", "secure"),
                               ("protocols", PROTOCOLS)))
        br = self._bridge(name)
        if br.datapath_type != datapath_type:
            raise OVSDBError(f"bridge {name} has datapath_type {br.datapath_type!r}, "
                             f"want {datapath_type!r}: delete it or pass --datapath-type")
        self._ensure_controller(name, controller)

    def _ensure_controller(self, name: str, target: str) -> None:
        """Make `target` the bridge's controller without ever emptying its controller set.

        OVS flushes a bridge's flows when it goes from some controllers to
        none (or back), so a row is never deleted and recreated: an agent of
        an older version left a loopback TCP row (reachable by any local
        user), and that row is turned into ours in place, in the same
        transaction that drops other loopback TCP rows.
        """
        api = self.api
        br = self._bridge(name)
        rows = list(br.controller)
        if [c.target for c in rows] == [target]:
            self._tune_controller(rows[0])
            return
        stale = [c for c in rows if c.target == target or _loopback_tcp(c.target)]
        keep = [c for c in rows if c not in stale]
        if keep:
            LOG.warning("bridge %s has other controllers %s: left in place",
                        name, [c.target for c in keep])
        with api.transaction(check_error=True) as txn:
            if stale:
                mine = next((c for c in stale if c.target == target), stale[0])
                LOG.info("bridge %s: controller %s becomes %s (same row: no flush)",
                         name, mine.target, target)
                txn.add(api.db_set("Controller", mine.uuid, ("target", target),
                                   ("connection_mode", "out-of-band")))
                for c in stale:
                    if c is not mine:
                        txn.add(api.db_remove("Bridge", name, "controller", c.uuid))
            else:
                LOG.info("adding controller %s to %s", target, name)
                ctl = txn.add(api.db_create("Controller", target=target,
                                            connection_mode="out-of-band"))
                txn.add(api.db_add("Bridge", name, "controller", ctl))
        for c in self._bridge(name).controller:
            if c.target == target:
                self._tune_controller(c)

    def _tune_controller(self, row: Any) -> None:
        """Reconnect within a second when the agent's session dies (OVS default: up to 8 s)."""
        if row.max_backoff != [1000]:
            self.api.db_set("Controller", row.uuid, ("max_backoff", 1000)).execute(
                check_error=True)

    def pin_datapath_id(self, name: str) -> int:
        """The bridge's datapath id, pinned in other_config so it never changes.

        The agent accepts OpenFlow sessions only from this datapath id. Left
        to itself OVS may derive it from a MAC that changes across restarts,
        so it is written down once (the id OVS uses now, or a random
        locally administered one if OVS has not chosen yet).
        """
        br = self._bridge(name)
        pinned = dict(br.other_config).get("datapath-id", "")
        if _is_dpid(pinned):
            return int(pinned, 16)
        cur = br.datapath_id[0] if isinstance(br.datapath_id, list) and br.datapath_id \
            else br.datapath_id
        dpid = cur if isinstance(cur, str) and _is_dpid(cur) else \
            f"{(int.from_bytes(os.urandom(6), 'big') | (1 << 41)) & ~(1 << 40):016x}"
        self.api.db_set("Bridge", name, ("other_config", {"datapath-id": dpid})).execute(
            check_error=True)
        return int(dpid, 16)

    def _bridge(self, name: str) -> Any:
        return idlutils.row_by_value(self.api.idl, "Bridge", "name", name)

    def bridge_ids(self, name: str) -> dict[str, str]:
        return dict(self._bridge(name).external_ids)

    def set_bridge_ids(self, name: str, ids: dict[str, str]) -> None:
        self.api.db_set("Bridge", name, ("external_ids", ids)).execute(check_error=True)

    def bump_round(self, name: str) -> int:
        """Next agent round, stored on the bridge before any flow uses it."""
        try:
            cur = int(self.bridge_ids(name).get(ROUND_KEY, "0"))
        except ValueError:
            cur = 0
        nxt = ck.next_round(cur)
        self.set_bridge_ids(name, {ROUND_KEY: str(nxt)})
        return nxt

    # -- ports ---------------------------------------------------------------

    def ensure_internal_port(self, bridge: str, name: str) -> int:
        """The gateway: an internal port, adopted if it exists."""
        self.api.add_port(bridge, name, may_exist=True, type="internal").execute(
            check_error=True)
        return self._ofport(name)

    def ensure_tunnel_port(self, bridge: str, name: str, encap: str) -> int:
        """One flow-based tunnel port: remote_ip and key come from each flow."""
        opts = {"remote_ip": "flow", "key": "flow"}
        with self.api.transaction(check_error=True) as txn:
            txn.add(self.api.add_port(bridge, name, may_exist=True, type=encap, options=opts))
            txn.add(self.api.db_set("Interface", name, ("type", encap), ("options", opts)))
        return self._ofport(name)

    def add_port(self, bridge: str, name: str, external_ids: dict[str, str]) -> int:
        """Attach an existing netdev (a pod veth) and return its ofport."""
        ids = {OWNER_KEY: "flowcni", **external_ids}
        with self.api.transaction(check_error=True) as txn:
            txn.add(self.api.add_port(bridge, name, may_exist=True, external_ids=ids))
            txn.add(self.api.db_set("Port", name, ("external_ids", ids)))
        return self._ofport(name)

    def _ofport(self, name: str) -> int:
        row = idlutils.row_by_value(self.api.idl, "Interface", "name", name, None)
        if row is None:
            raise OVSDBError(f"interface {name} not in OVSDB")
        ofport = row.ofport[0] if isinstance(row.ofport, list) and row.ofport else row.ofport
        if not ofport or int(ofport) <= 0:
            err = row.error[0] if row.error else "no ofport assigned"
            raise OVSDBError(f"interface {name}: {err}")
        return int(ofport)

    def del_port(self, name: str, wait: bool = True) -> None:
        """Remove a port. wait=False commits without waiting for ovs-vswitchd to apply it
        (nothing depends on that for a removal, and the wait is most of its cost)."""
        if wait:
            self.api.del_port(name, if_exists=True).execute(check_error=True)
            return
        txn = transaction.Transaction(self.api, self.conn, self.conn.timeout, check_error=True)
        txn.add(self.api.del_port(name, if_exists=True))
        txn.commit()

    def ports(self, bridge: str) -> list[PortInfo]:
        """Ports of the bridge made by flowcni, with their external_ids."""
        br = self._bridge(bridge)
        out = []
        for port in br.ports:
            ids = dict(port.external_ids)
            if ids.get(OWNER_KEY) != "flowcni":
                continue
            iface = port.interfaces[0] if port.interfaces else None
            of = iface.ofport[0] if iface is not None and iface.ofport else -1
            out.append(PortInfo(port.name, int(of), ids))
        return out

    def set_other_config(self, key: str, value: str) -> None:
        self.api.db_set("Open_vSwitch", ".", ("other_config", {key: value})).execute(
            check_error=True)
