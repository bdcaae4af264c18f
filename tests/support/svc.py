"""Service traffic in the lab: endpoint servers, clients that check who answered, and
node-level DNAT rules of the kind kube-proxy installs.

A client's reply must come from the address it connected to (the ClusterIP
or the node port): TCP resets a SYN-ACK from anywhere else, and a connected
UDP socket never receives a datagram from another source, so a reply that
skipped the node's un-DNAT shows up as a failure, not as a success.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from flowcni.lab import netns
from flowcni.lab.lab import Lab


def endpoint_slice(namespace: str, service: str, ips: list[str],
                   ports: list[tuple[str, int, str]]) -> tuple[str, str, str, dict[str, Any]]:
    """A Service's one EndpointSlice ("SERVICE-1") as the embedded store holds it, every
    address ready; ports as (name, port, protocol). Returned as manifests.load yields
    objects, (kind, namespace, name, body): `store.put(*endpoint_slice(...))`."""
    name = f"{service}-1"
    return ("EndpointSlice", namespace, name, {
        "namespace": namespace, "name": name, "addressType": "IPv4",
        "labels": {"kubernetes.io/service-name": service},
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]})


# Answers each TCP connection and each UDP datagram with "<name> <what it got>", or with
# "<name> <source address it saw>" when argv[3] is "source".
SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
source = sys.argv[3:] == ["source"]
def answer(d, a):
    return name.encode() + b" " + (a[0].encode() if source else d)
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a), daemon=True).start()
def serve(c, a):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(answer(d, a))
    except OSError:
        pass
    c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(2000); s.sendto(answer(d, a), a)
for p in sys.argv[2].split(","):
    f = udp if p.endswith("u") else tcp
    threading.Thread(target=f, args=(int(p.rstrip("u")),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# One request per target; prints {target: reply text or "ERR ..."} as JSON.
CLIENT = r"""
import json, socket, sys
out = {}
for t in json.loads(sys.argv[1]):
    ip, port = t.rsplit(":", 1)
    udp = port.endswith("u")
    try:
        if udp:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
            s.connect((ip, int(port[:-1]))); s.send(b"ping")
            out[t] = s.recv(2000).decode()
        else:
            s = socket.create_connection((ip, int(port)), timeout=3); s.settimeout(3)
            s.sendall(b"ping"); out[t] = s.recv(2000).decode()
        s.close()
    except OSError as e:
        out[t] = f"ERR {type(e).__name__} {e}"
print(json.dumps(out))
"""


# SCTP without the kernel's SCTP stack (it is not built here): raw sockets that
# speak just enough of it for conntrack, OVS and the node's DNAT to treat the
# exchange as an association starting: INIT, answered by INIT-ACK. The
# responder puts its name in the state cookie; the client accepts only an
# INIT-ACK carrying its own tag, from the address and port it sent to.
SCTP_COMMON = r"""
import socket, struct, os
def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t
T = _table()
def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = T[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF
def packet(sport, dport, vtag, ctype, tag, params=b""):
    chunk = struct.pack("!BBHIIHHI", ctype, 0, 20 + len(params), tag, 65535, 1, 1, 1) + params
    hdr = struct.pack("!HHII", sport, dport, vtag, 0)
    return hdr[:8] + struct.pack("<I", crc32c(hdr + chunk)) + chunk
def parse(data):
    ihl = (data[0] & 0x0F) * 4
    src = socket.inet_ntoa(data[12:16]); b = data[ihl:]
    sport, dport, vtag = struct.unpack("!HHI", b[:8])
    ctype, _, clen, tag = struct.unpack("!BBHI", b[12:20])
    return src, sport, dport, vtag, ctype, tag, b[32:12 + clen]
"""

SCTP_SERVER = SCTP_COMMON + r"""
import sys
name = sys.argv[1].encode(); port = int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
print("ready", flush=True)
while True:
    data, _ = s.recvfrom(4000)
    src, sport, dport, vtag, ctype, tag, _ = parse(data)
    if ctype == 1 and dport == port:
        cookie = struct.pack("!HH", 7, 4 + len(name)) + name
        cookie += b"\0" * (-len(cookie) % 4)
        s.sendto(packet(dport, sport, tag, 2, 0x5EEDF00D, cookie), (src, 0))
"""

SCTP_CLIENT = SCTP_COMMON + r"""
import sys, time
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132); s.settimeout(0.5)
if len(sys.argv) > 3:
    s.bind((sys.argv[3], 0))  # the source address (a raw socket sends from its bound one)
sport = 20000 + os.getpid() % 20000; tag = int.from_bytes(os.urandom(4), "big") | 1
s.sendto(packet(sport, port, 0, 1, tag), (ip, 0))
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        data, _ = s.recvfrom(4000)
    except socket.timeout:
        continue
    src, sp, dp, vtag, ctype, _, params = parse(data)
    if ctype == 2 and vtag == tag and dp == sport and sp == port:
        if src != ip:
            print(f"ERR INIT-ACK from {src}"); break
        print(params[4:].rstrip(b"\0").decode() + " init"); break
else:
    print("ERR timed out")
"""


def start_sctp_responder(argv_prefix: list[str], name: str, port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen([*argv_prefix, sys.executable, "-c", SCTP_SERVER, name, str(port)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError(f"SCTP responder {name} did not start")
    return p


def sctp_init(argv_prefix: list[str], ip: str, port: int, source: str = "") -> str:
    """Start an SCTP association to ip:port (from `source`, or the address routing
    picks); "<responder name> init", or "ERR ..."."""
    p = subprocess.run([*argv_prefix, sys.executable, "-c", SCTP_CLIENT, ip, str(port),
                        *([source] if source else [])],
                       capture_output=True, text=True, timeout=30)
    return p.stdout.strip() or f"ERR {p.stderr.strip()}"


def start_server(argv_prefix: list[str], name: str, ports: str, reply: str = "data"
                 ) -> subprocess.Popen[str]:
    """SERVER on `ports` ("80,53u": u for UDP); reply "source": answer with the client's
    address as the server saw it instead of the data."""
    p = subprocess.Popen([*argv_prefix, sys.executable, "-c", SERVER, name, ports, reply],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError(f"server {name} did not start")
    return p


def request(argv_prefix: list[str], targets: list[str]) -> dict[str, str]:
    """Send "ping" to each "IP:PORT" (suffix u: UDP) and return each reply."""
    p = subprocess.run([*argv_prefix, sys.executable, "-c", CLIENT, json.dumps(targets)],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"client failed: {p.stderr}")
    return dict(json.loads(p.stdout))


def replies(lab: Lab, src: str, targets: list[str]) -> dict[str, str]:
    """`request` from inside the pod `src` (NS/NAME) of the lab."""
    return request(lab.exec_argv(src, []), targets)


@dataclass(frozen=True)
class DNat:
    """One kube-proxy style rule: traffic to vip:port (proto tcp/udp/sctp) -> endpoint."""

    vip: str
    port: int
    proto: str
    endpoint: str
    target_port: int
    masquerade: bool = False  # kube-proxy masquerades NodePort (Cluster) traffic
    node_port: bool = False   # vip is a node address (a NodePort rule, not a ClusterIP)


def kube_proxy_rules(table: str, rules: list[DNat], cluster_cidr: str | None = None) -> str:
    """An nft script like kube-proxy's nftables mode writes: DNAT in prerouting and output,
    hairpin (an endpoint reaching itself) and marked traffic masqueraded in postrouting.

    cluster_cidr: as kube-proxy does when it knows the cluster CIDR, traffic to a
    ClusterIP (not a `node_port` rule) from outside that CIDR, such as the
    node's own connections, is masqueraded too (so a remote endpoint replies to
    this node's gateway address, not to the node's underlay address)."""
    chains, jumps = [], []
    for i, r in enumerate(rules):
        mark = "meta mark set meta mark | 0x4000; " if r.masquerade else ""
        if cluster_cidr and not r.masquerade and not r.node_port:
            mark = f"ip saddr != {cluster_cidr} meta mark set meta mark | 0x4000; "
        chains.append(f"  chain ep{i} {{ ip saddr {r.endpoint} meta mark set meta mark | 0x4000; "
                      f"{mark}meta l4proto {r.proto} dnat to {r.endpoint}:{r.target_port}; }}")
        jumps.append(f"ip daddr {r.vip} {r.proto} dport {r.port} goto ep{i};")
    body = "\n".join(chains)
    return (f"table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n{body}\n"
            f"  chain pre {{ type nat hook prerouting priority dstnat; {' '.join(jumps)} }}\n"
            f"  chain out {{ type nat hook output priority -100; {' '.join(jumps)} }}\n"
            "  chain post { type nat hook postrouting priority srcnat; "
            "meta mark & 0x4000 == 0x4000 masquerade; }\n}\n")


def install_kube_proxy_rules(lab: Lab, node: str, table: str, rules: list[DNat],
                             cluster_cidr: str | None = None) -> None:
    subprocess.run(netns.exec_argv(lab.node(node).netns, ["nft", "-f", "-"]),
                   input=kube_proxy_rules(table, rules, cluster_cidr), text=True, check=True,
                   capture_output=True)


# A long TCP stream for churn and restart tests: the server names itself, then
# counts what arrives; the client sends 1 KiB every 10 ms for `seconds` and
# prints {"name", "sent", "got"} (got: the server's count, -1 if it broke).
STREAM_SERVER = r"""
import socket, sys, threading
name = sys.argv[1]
def serve(c):
    n = 0
    try:
        c.sendall((name + "\n").encode())
        while True:
            d = c.recv(65536)
            if not d: break
            n += len(d)
        c.sendall(str(n).encode())
    except OSError:
        pass
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

STREAM_CLIENT = r"""
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10); c.settimeout(10)
f = c.makefile("rb"); name = f.readline().decode().strip()
print(name, flush=True)
sent = 0; end = time.monotonic() + float(sys.argv[3])
try:
    while time.monotonic() < end:
        c.sendall(b"x" * 1024); sent += 1024; time.sleep(0.01)
    c.shutdown(socket.SHUT_WR); got = int(f.read().decode() or -1)
except OSError as e:
    got = -1; name += f" ({type(e).__name__} {e})"
print(json.dumps({"name": name, "sent": sent, "got": got}), flush=True)
"""


def start_stream_server(argv_prefix: list[str], name: str, port: int) -> subprocess.Popen[str]:
    p = subprocess.Popen([*argv_prefix, sys.executable, "-c", STREAM_SERVER, name, str(port)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError(f"stream server {name} did not start")
    return p


class Stream:
    """A running STREAM_CLIENT: `serving` is the endpoint that answered; `result()` waits."""

    def __init__(self, argv_prefix: list[str], ip: str, port: int, seconds: float) -> None:
        self.p = subprocess.Popen([*argv_prefix, sys.executable, "-c", STREAM_CLIENT, ip,
                                   str(port), str(seconds)], stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        self.serving = self.p.stdout.readline().strip()

    def result(self, timeout: float = 60) -> dict[str, object]:
        out, _ = self.p.communicate(timeout=timeout)
        return dict(json.loads(out.strip().splitlines()[-1]))
