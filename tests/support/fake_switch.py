"""A fake OpenFlow 1.3 switch: tries to become the agent's switch (stdlib only).

Run as a script (often as an unprivileged user, uid 65534) inside a node's
netns. It tries every endpoint given (tcp:HOST:PORT, unix:PATH), and on the
first that accepts it plays a switch well enough for a controller to adopt
it: HELLO, FEATURES_REPLY with the datapath id asked for, empty port and
flow-stats replies, barrier and ONF bundle replies, echo replies. It holds
the session for --hold seconds and prints one JSON line: which endpoints
refused and why, whether the controller adopted it (sent it flows), and
whether the controller closed the session on it.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from typing import Any

OFP13 = 4
HELLO, ERROR, ECHO_REQ, ECHO_REP, EXPERIMENTER = 0, 1, 2, 3, 4
FEATURES_REQ, FEATURES_REP, FLOW_MOD = 5, 6, 14
MP_REQ, MP_REP, BARRIER_REQ, BARRIER_REP = 18, 19, 20, 21
ONF, BUNDLE_CTRL, BUNDLE_ADD = 0x4F4E4600, 2300, 2301


def connect(endpoint: str, timeout: float) -> socket.socket:
    kind, _, rest = endpoint.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.create_connection((host, int(port)), timeout=timeout)
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(rest)
        return s
    raise ValueError(f"endpoint {endpoint!r}: use tcp:HOST:PORT or unix:PATH")


def msg(type_: int, xid: int, body: bytes = b"") -> bytes:
    return struct.pack("!BBHI", OFP13, type_, 8 + len(body), xid) + body


def play_switch(s: socket.socket, dpid: int, hold: float) -> dict[str, Any]:
    """Answer the controller until `hold` seconds passed or it closed the session."""
    seen = {"features_request": False, "flow_mods": 0, "bundle_adds": 0,
            "closed_by_peer": False}
    s.sendall(msg(HELLO, 1))
    buf = b""
    deadline = time.monotonic() + hold
    s.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            seen["closed_by_peer"] = True
            break
        if not data:
            seen["closed_by_peer"] = True
            break
        buf += data
        while len(buf) >= 8:
            _, type_, length, xid = struct.unpack("!BBHI", buf[:8])
            if len(buf) < length:
                break
            body, buf = buf[8:length], buf[length:]
            out = b""
            if type_ == ECHO_REQ:
                out = msg(ECHO_REP, xid, body)
            elif type_ == FEATURES_REQ:
                seen["features_request"] = True
                out = msg(FEATURES_REP, xid, struct.pack("!QIBB2xII", dpid, 0, 254, 0, 0x4F, 0))
            elif type_ == MP_REQ:
                mp_type = struct.unpack("!H", body[:2])[0]
                out = msg(MP_REP, xid, struct.pack("!HH4x", mp_type, 0))
            elif type_ == BARRIER_REQ:
                out = msg(BARRIER_REP, xid)
            elif type_ == FLOW_MOD:
                seen["flow_mods"] += 1
            elif type_ == EXPERIMENTER and len(body) >= 16:
                exp, exp_type, bid, btype, flags = struct.unpack("!IIIHH", body[:16])
                if exp == ONF and exp_type == BUNDLE_CTRL:
                    out = msg(EXPERIMENTER, xid,
                              struct.pack("!IIIHH", ONF, BUNDLE_CTRL, bid, btype + 1, flags))
                elif exp == ONF and exp_type == BUNDLE_ADD:
                    seen["bundle_adds"] += 1
            if out:
                s.sendall(out)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("endpoints", nargs="+", help="tcp:HOST:PORT or unix:PATH, tried in order")
    p.add_argument("--dpid", default="1", help="datapath id to claim (hex)")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold a session")
    a = p.parse_args(argv)
    report: dict[str, Any] = {"refused": {}, "connected_to": None}
    for ep in a.endpoints:
        try:
            s = connect(ep, timeout=2.0)
        except OSError as e:
            report["refused"][ep] = f"{type(e).__name__}: {e.strerror or e}"
            continue
        report["connected_to"] = ep
        with s:
            report.update(play_switch(s, int(a.dpid, 16), a.hold))
        break
    report["adopted"] = bool(report.get("flow_mods") or report.get("bundle_adds"))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
