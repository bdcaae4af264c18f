"""The agent's side of live traceflow: arm observation points, inject, collect packet-ins.

flowctl drives it on every node: arm (install the observation flows for a
DSCP mark), inject on the source node (a real packet built from the model,
sent with packet-out as if the pod had sent it), collect what each node saw,
disarm. See flows/traceflow.py for the observation points.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

from flowcni.controller import frames
from flowcni.controller.flowsync import FlowSync
from flowcni.controller.pods import PodManager
from flowcni.flows import cookie as ck
from flowcni.flows.node import Gateway
from flowcni.flows.traceflow import TRACEFLOW_OWNER, observation_flows

PROTO = {"tcp": 6, "udp": 17, "icmp": 1}


def probe_packet(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, proto: str,
                 dport: int | None, dscp: int) -> bytes:
    """The first packet of a new connection, marked with `dscp`."""
    if proto == "tcp":
        l4 = frames.tcp(src_ip, dst_ip, 40001, dport or 80, seq=1, ack=0, flags=frames.TCP_SYN,
                        window=64240)
    elif proto == "udp":
        l4 = frames.udp(src_ip, dst_ip, 40001, dport or 53, b"flowcni-traceflow")
    else:
        echo = struct.pack("!HH", 0x7FC, 1) + b"flowcni"  # identifier, sequence, data
        l4 = frames.icmp(frames.ICMP_ECHO_REQUEST, 0, echo)
    return frames.ethernet(dst_mac, src_mac, frames.ETH_IPV4,
                           frames.ipv4(src_ip, dst_ip, PROTO[proto], l4, ttl=64, tos=dscp << 2))


class LiveTrace:
    def __init__(self, flows: FlowSync, pods: PodManager, gw: Gateway,
                 tun_ofport: int | None) -> None:
        self.flows, self.pods, self.gw, self.tun_ofport = flows, pods, gw, tun_ofport
        self._lock = threading.Lock()
        self.seen: dict[int, list[dict[str, Any]]] = {}

    def packet_in(self, msg: Any) -> None:
        """Called on os-ken's event thread: record, never block."""
        ip = frames.parse_ipv4(bytes(msg.data))
        if ip is None:
            return
        dscp = ip.tos >> 2
        with self._lock:
            if dscp not in self.seen:
                return
            fields = dict(msg.match.items())
            self.seen[dscp].append({"t": time.time(), "table_id": msg.table_id,
                                    "cookie": msg.cookie, "reg1": fields.get("reg1", 0),
                                    "in_port": fields.get("in_port", 0)})

    def _port_name(self, ofport: int) -> str:
        if ofport == self.gw.ofport:
            return "gateway"
        if ofport == self.tun_ofport:
            return "tunnel"
        for a in self.pods.attachments.values():
            if a.ofport == ofport:
                return f"pod {a.namespace}/{a.name}"
        return f"port {ofport}"

    def handle(self, verb: str, req: dict[str, Any]) -> dict[str, Any]:
        dscp = int(req["dscp"])
        if verb == "arm":
            with self._lock:
                self.seen[dscp] = []
            # (a self-owned flow is never a trace flow: no name is made for it here)
            base = [f for f in self.flows.desired_flows()
                    if not (isinstance(f.owner, str) and _is_trace(f.owner))]
            groups: dict[str, list[Any]] = {}
            for f in observation_flows(base, dscp, self.flows.pipeline):
                groups.setdefault(f.owner, []).append(f)
            self.flows.set_owners(groups)
            return {"observation_points": sum(len(v) for v in groups.values())}
        if verb == "inject":
            a = next((x for x in self.pods.attachments.values()
                      if f"{x.namespace}/{x.name}" == req["pod"]), None)
            if a is None:
                raise ValueError(f"pod {req['pod']} is not on this node")
            sw = self.flows.switch
            if sw is None:
                raise ValueError("not connected to the switch")
            sw.packet_out(a.ofport, probe_packet(a.mac, req["dst_mac"], a.ip, req["dst_ip"],
                                                 req["proto"], req.get("dport"), dscp))
            return {"injected_at": time.time()}
        if verb == "collect":
            with self._lock:
                seen = list(self.seen.get(dscp, []))
            out = []
            for o in seen:
                table = self.flows.pipeline.name(o["table_id"])
                owner = self._owner(o["cookie"])
                out.append({"t": o["t"], "table": table, "owner": owner,
                            "output": self._port_name(o["reg1"]) if table == "Output" else "",
                            "dropped": table != "Output"})
            return {"observations": out}
        if verb == "disarm":
            with self._lock:
                self.seen.pop(dscp, None)
            self.flows.set_owners({o: [] for o in self.flows.owners(self_owned=False)
                                   if _is_trace(o)})
            return {}
        raise ValueError(f"traceflow: unknown step {verb}")

    def _owner(self, cookie: int) -> str:
        """The owner of the flow the probe's copy came from (same match minus the mark)."""
        if ck.feature_of(cookie) is None:
            return ""
        oid = ck.owner_of(cookie)
        for owner in self.flows.owners(self_owned=False):  # trace owners are named
            if _is_trace(owner) and ck.owner_id(owner) == oid:
                return owner.split("|", 1)[1]
        return ""


def _is_trace(owner: str) -> bool:
    return owner.startswith(TRACEFLOW_OWNER + "|")
