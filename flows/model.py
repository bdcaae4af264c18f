"""The flow model: one immutable Flow renders to os-ken messages and to ovs-ofctl text.

Builders create flows only through `Flow.make`, which checks them against the
table contract in `flows.tables` (fields the table may match, tables it may go
to) and adds protocol prerequisites (eth_type, ip_proto) so that no builder
has to remember them. A flow's identity in OpenFlow is (table, priority,
match); `Flow.key` is exactly that, and the diff works on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from flowcni.flows import cookie as ck
from flowcni.flows.fields import RegField
from flowcni.flows.tables import DEFAULT, Pipeline, Table

ETH_IP = 0x0800
ETH_ARP = 0x0806
IP_PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132}

# Field -> eth_type it needs (and ip_proto where fixed by the field).
_PREREQ: dict[str, tuple[int, int | None]] = {
    "ipv4_src": (ETH_IP, None), "ipv4_dst": (ETH_IP, None), "ip_proto": (ETH_IP, None),
    "arp_op": (ETH_ARP, None), "arp_spa": (ETH_ARP, None), "arp_tpa": (ETH_ARP, None),
    "arp_sha": (ETH_ARP, None), "arp_tha": (ETH_ARP, None),
    "tcp_src": (ETH_IP, 6), "tcp_dst": (ETH_IP, 6),
    "udp_src": (ETH_IP, 17), "udp_dst": (ETH_IP, 17),
    "sctp_src": (ETH_IP, 132), "sctp_dst": (ETH_IP, 132),
    "icmpv4_type": (ETH_IP, 1), "icmpv4_code": (ETH_IP, 1),
    "ip_dscp": (ETH_IP, None),
}

# os-ken (OXM) field name -> ovs-ofctl match name, in the order ofctl prints them.
_OFCTL_MATCH = {
    "reg0": "reg0", "reg1": "reg1", "reg2": "reg2", "reg3": "reg3", "reg4": "reg4",
    "reg6": "reg6", "reg7": "reg7",
    "in_port": "in_port", "eth_src": "dl_src", "eth_dst": "dl_dst",
    "ipv4_src": "nw_src", "ipv4_dst": "nw_dst",
    "arp_op": "arp_op", "arp_spa": "arp_spa", "arp_tpa": "arp_tpa",
    "arp_sha": "arp_sha", "arp_tha": "arp_tha",
    "tcp_src": "tp_src", "tcp_dst": "tp_dst", "udp_src": "tp_src", "udp_dst": "tp_dst",
    "sctp_src": "tp_src", "sctp_dst": "tp_dst",
    "icmpv4_type": "icmp_type", "icmpv4_code": "icmp_code",
    "ct_state": "ct_state", "ct_mark": "ct_mark", "conj_id": "conj_id", "ip_dscp": "ip_dscp",
    "tunnel_id": "tun_id",
}
_FIELD_ORDER = {f: i for i, f in enumerate(_OFCTL_MATCH)}

# os-ken field name -> NXM name used by move/load in ovs-ofctl syntax.
_NXM = {
    "eth_src": "NXM_OF_ETH_SRC", "eth_dst": "NXM_OF_ETH_DST",
    "ipv4_src": "NXM_OF_IP_SRC", "ipv4_dst": "NXM_OF_IP_DST",
    "arp_op": "NXM_OF_ARP_OP", "arp_spa": "NXM_OF_ARP_SPA", "arp_tpa": "NXM_OF_ARP_TPA",
    "arp_sha": "NXM_NX_ARP_SHA", "arp_tha": "NXM_NX_ARP_THA",
    "in_port": "NXM_OF_IN_PORT",
}
# set_field targets that are not match fields of any table.
_SET_ONLY = {"tun_ipv4_dst": "tun_dst", "tunnel_id": "tun_id"}
_FIELD_BITS = {"eth_src": 48, "eth_dst": 48, "ipv4_src": 32, "ipv4_dst": 32,
               "arp_spa": 32, "arp_tpa": 32, "arp_sha": 48, "arp_tha": 48, "arp_op": 16}

MatchValue = int | str | tuple[int, int]

CT_FLAGS = {"new": 0x01, "est": 0x02, "rel": 0x04, "rpl": 0x08, "inv": 0x10, "trk": 0x20,
            "snat": 0x40, "dnat": 0x80}
CT_ZONE = 0xFFF0  # the one conntrack zone pod traffic is tracked in
NX_NAT_F_SRC = 1 << 0  # nat(src=...)
NX_NAT_F_DST = 1 << 1  # nat(dst=...): OVS's flag, which os-ken does not name


def ct_state_bits(spec: str) -> tuple[int, int]:
    """'+trk-new' -> (value, mask) for the ct_state field."""
    value = mask = 0
    for sign, flag in ((spec[i], spec[i + 1:]) for i in range(len(spec))
                       if spec[i] in "+-"):
        flag = flag.split("+")[0].split("-")[0]
        if flag not in CT_FLAGS:
            raise ValueError(f"ct_state {spec!r}: unknown flag {flag!r}")
        mask |= CT_FLAGS[flag]
        if sign == "+":
            value |= CT_FLAGS[flag]
    if not mask:
        raise ValueError(f"ct_state {spec!r}: no flags")
    return value, mask


def _fmt_int(v: int) -> str:
    return hex(v)


def _match_text(name: str, value: MatchValue) -> str:
    ofname = _OFCTL_MATCH[name]
    if isinstance(value, tuple):
        return f"{ofname}={_fmt_int(value[0])}/{_fmt_int(value[1])}"
    if name.startswith("reg"):
        return f"{ofname}={_fmt_int(int(value))}"
    if name == "ct_state":
        return f"ct_state={value}"
    if name == "ct_mark":
        return f"ct_mark={_fmt_int(int(value))}"
    return f"{ofname}={value}"


def _osken_value(name: str, value: MatchValue) -> Any:
    if name == "ct_state" and isinstance(value, str):
        return ct_state_bits(value)
    if isinstance(value, str) and "/" in value and name.startswith(("ipv4", "arp_spa", "arp_tpa")):
        net = ipaddress.ip_network(value, strict=False)
        if net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
        return (str(net.network_address), str(net.netmask))
    return value


@contextlib.contextmanager
def gc_paused(promote: bool = False) -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a build runs.

    A build makes hundreds of thousands of small acyclic objects (200,000
    bucket actions at 10,000 Services, 500,000 clause flows at 100 cluster
    policies over 10,000 pods), and each allocation burst set off collections
    that rescanned everything already built: a third to a half of the build's
    CPU time. Nothing made here forms a cycle, so nothing is lost by waiting.
    Nested use is fine: only the outermost one turns the collector back on.

    Waiting alone leaves the whole build in the youngest generation, and the
    first collection after it scans all of it (0.15 s at 500,000 flows).
    `promote` (for an initial load, whose objects live as long as the agent)
    hands everything to the oldest generation without a scan (gc.freeze then
    gc.unfreeze, documented to do exactly that); a full collection sees it
    later, as it sees every long-lived object. Not done for small changes, nor
    if something else froze objects (unfreezing would undo that).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if promote and gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def _snat_parts(s: str) -> tuple[str, int, int] | None:
    """CT.snat "IP" or "IP:FIRST-LAST" -> (IP, FIRST, LAST), (IP, 0, 0) without ports;
    None if malformed (ports 1-65535, FIRST <= LAST)."""
    ip, _, ports = s.partition(":")
    if not plain_ipv4(ip):
        return None
    if not ports:
        return (ip, 0, 0) if not s.endswith(":") else None
    first, _, last = ports.partition("-")
    if not (first.isdigit() and last.isdigit() and 0 < int(first) <= int(last) < 65536):
        return None
    return ip, int(first), int(last)


def plain_ipv4(s: str) -> bool:
    """Whether `s` is an IPv4 address in canonical dotted-quad form ("10.0.0.1").

    A C round trip instead of ipaddress's parser: policies at scale carry
    100,000 distinct addresses, and ipaddress took a fifth of their build time.
    """
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, s)) == s
    except OSError:
        return False


@functools.lru_cache(maxsize=1 << 15)
def _canon_address(value: str) -> tuple[str, bool]:
    """(canonical text, host bits clear) of an IPv4 address or network.

    Cached: policy flows repeat the same addresses across many rules. Keyed
    by the address only, so the cache holds at most the addresses in use
    (pod IPs are reused); MACs and ports, new with every pod, stay out of it
    (caching them grew the agent by ~1 KB per pod churned, up to 65k entries).
    """
    net = ipaddress.ip_network(value, strict=False)
    canon = str(net.network_address) if net.prefixlen == 32 else str(net)
    return canon, str(net.network_address) == value.split("/")[0]


def _canon_value(name: str, value: MatchValue) -> MatchValue:
    """Normalise values so equal matches compare equal (10.0.0.1/32 == 10.0.0.1)."""
    if isinstance(value, str) and name.startswith(("ipv4", "arp_spa", "arp_tpa")):
        addr, slash, plen = value.partition("/")
        if (not slash or plen == "32") and plain_ipv4(addr):
            return addr  # what the general path below gives, without ipaddress
        canon, clean = _canon_address(value)
        if not clean:
            raise ValueError(f"{name}={value}: host bits set")
        return canon
    if isinstance(value, str) and name in ("eth_src", "eth_dst", "arp_sha", "arp_tha"):
        return value.lower()
    if name == "ct_state" and isinstance(value, str):
        ct_state_bits(value)  # validates
    return value


class Action:
    """An OpenFlow action; subclasses render both ways.

    Slotted (subclasses pass slots=True): a Service proxy holds one ct() per
    endpoint per port, 200,000 at 10,000 Services, and a per-instance
    __dict__ was most of each one's size.
    """

    __slots__ = ()

    def ofctl(self, pipeline: Pipeline) -> str:
        raise NotImplementedError

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Output(Action):
    port: int | str  # an ofport, or "IN_PORT"

    def ofctl(self, pipeline: Pipeline) -> str:
        return "IN_PORT" if self.port == "IN_PORT" else f"output:{self.port}"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        port = ofp.OFPP_IN_PORT if self.port == "IN_PORT" else int(self.port)
        return parser.OFPActionOutput(port, 0)


@dataclass(frozen=True, slots=True)
class Controller(Action):
    """Send a copy to the agent (packet-in); live traceflow's observation points."""

    def ofctl(self, pipeline: Pipeline) -> str:
        return "CONTROLLER:65535"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        return parser.OFPActionOutput(ofp.OFPP_CONTROLLER, 0xFFFF)


@dataclass(frozen=True, slots=True)
class OutputReg(Action):
    field: RegField

    def ofctl(self, pipeline: Pipeline) -> str:
        return f"output:{self.field.ofctl()}"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        from os_ken.ofproto import nicira_ext
        return parser.NXActionOutputReg(
            ofs_nbits=nicira_ext.ofs_nbits(self.field.start, self.field.end),
            src=self.field.reg, max_len=0)


@dataclass(frozen=True, slots=True)
class SetField(Action):
    field: str
    value: str | int

    def __post_init__(self) -> None:
        if self.field not in _OFCTL_MATCH and self.field not in _SET_ONLY:
            raise ValueError(f"set_field: unknown field {self.field}")
        object.__setattr__(self, "value", _canon_value(self.field, self.value))

    def ofctl(self, pipeline: Pipeline) -> str:
        # OVS prints set_field targets by their OXM names (eth_src, arp_sha, ...).
        return f"set_field:{self.value}->{_SET_ONLY.get(self.field, self.field)}"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        return parser.OFPActionSetField(**{self.field: self.value})


@dataclass(frozen=True, slots=True)
class Load(Action):
    field: RegField
    value: int

    def __post_init__(self) -> None:
        self.field.value(self.value)  # validates the width

    def ofctl(self, pipeline: Pipeline) -> str:
        return f"load:{_fmt_int(self.value)}->{self.field.ofctl()}"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        from os_ken.ofproto import nicira_ext
        return parser.NXActionRegLoad(
            ofs_nbits=nicira_ext.ofs_nbits(self.field.start, self.field.end),
            dst=self.field.reg, value=self.value)


def _move_end(f: str | RegField) -> tuple[str, int, int, str]:
    if isinstance(f, RegField):
        return f.reg, f.start, f.n_bits, f.ofctl()
    return f, 0, _FIELD_BITS[f], f"{_NXM[f]}[]"


@dataclass(frozen=True, slots=True)
class Move(Action):
    src: str | RegField
    dst: str | RegField

    def __post_init__(self) -> None:
        if _move_end(self.src)[2] != _move_end(self.dst)[2]:
            raise ValueError(f"move {self.src} -> {self.dst}: widths differ")

    def ofctl(self, pipeline: Pipeline) -> str:
        return f"move:{_move_end(self.src)[3]}->{_move_end(self.dst)[3]}"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        s, s_ofs, n, _ = _move_end(self.src)
        d, d_ofs, _, _ = _move_end(self.dst)
        return parser.NXActionRegMove(src_field=s, dst_field=d, n_bits=n,
                                      src_ofs=s_ofs, dst_ofs=d_ofs)


@dataclass(frozen=True, slots=True)
class Conjunction(Action):
    """Clause `clause` (1-based, as ovs-ofctl writes it) of `n_clauses` of conjunction `id`."""

    id: int
    clause: int
    n_clauses: int

    def __post_init__(self) -> None:
        if not (2 <= self.n_clauses <= 64 and 1 <= self.clause <= self.n_clauses):
            raise ValueError(f"conjunction({self.id},{self.clause}/{self.n_clauses}) invalid")
        if not 0 < self.id < (1 << 32):
            raise ValueError(f"conjunction id {self.id} out of range")

    def ofctl(self, pipeline: Pipeline) -> str:
        return f"conjunction({self.id},{self.clause}/{self.n_clauses})"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        return parser.NXActionConjunction(clause=self.clause - 1, n_clauses=self.n_clauses,
                                          id_=self.id)


def _valid_nat_dst(nat: str) -> bool:
    """'IPv4:PORT'? Through plain_ipv4's C round trip, not ipaddress or a
    per-octet check in Python: a Service proxy builds one per endpoint per
    port (200,000 at 10,000 Services), and those checks were most of that build."""
    ip, _, port = nat.rpartition(":")
    return port.isdigit() and 0 < int(port) < 65536 and plain_ipv4(ip)


@dataclass(frozen=True, slots=True)
class CT(Action):
    """ct(): track in CT_ZONE, and either recirculate to `table` or commit.

    `mark` (with commit) stores a conntrack mark on the connection, so later
    packets of it, replies included, can be told apart by where it started.
    `nat`: None for no NAT; "" to apply the NAT a committed connection
    already has (replies un-DNATed, later packets DNATed); "IP:PORT" (with
    commit) to DNAT a new connection there. NAT goes last inside ct(): OVS
    requires it after the other nested actions.
    """

    commit: bool = False
    table: str | None = None
    zone: int = CT_ZONE
    mark: int | None = None
    nat: str | None = None
    # with commit: SNAT a new connection to this IPv4 address, "IP" (OVS picks any source
    # port) or "IP:FIRST-LAST" (source ports in that range)
    snat: str | None = None

    def __post_init__(self) -> None:
        if self.snat is not None and not (self.commit and self.nat is None
                                          and _snat_parts(self.snat)):
            raise ValueError(f"ct nat(src={self.snat}): needs commit, an IPv4 address "
                             "(with an optional :FIRST-LAST port range) and no other nat")
        if self.mark is not None and not (self.commit and 0 < self.mark < (1 << 32)):
            raise ValueError(f"ct mark {self.mark}: needs commit and a 32-bit non-zero value")
        if self.nat and not (self.commit and _valid_nat_dst(self.nat)):
            raise ValueError(f"ct nat(dst={self.nat}): needs commit and IP:PORT")

    @classmethod
    def dnat(cls, ip: str, port: int, table: str) -> CT:
        """ct(commit, table=table, nat(dst=ip:port)), checking only ip and port
        (see dnats)."""
        return cls.dnats(((ip, port),), table)[0]

    @classmethod
    def dnats(cls, endpoints: Iterable[tuple[str, int]], table: str, *,
              checked: bool = False) -> list[CT]:
        """CT.dnat of each (ip, port): ct(commit, table=table, nat(dst=ip:port)).

        A Service proxy makes one per endpoint per port (200,000 at 10,000
        Services): the generic path re-parses the "IP:PORT" text it was just
        given, and a call per action with its checks in helpers cost a quarter
        of that build. Here the checks (a port number; an address in canonical
        form, plain_ipv4's C round trip) are inlined in one loop, and each
        action is filled as a _CTFill, then made a CT (see there).
        `table` is checked where the action is used (Flow/Group.make).
        checked=True: the caller has already made these checks on every
        endpoint, where it took them in (the Service proxy checks a pod's
        address and ports once when it parses the pod, not once per Service
        port the pod serves: the address check was half of this loop).
        """
        out: list[Any] = []
        new, pton, ntop, af = object.__new__, socket.inet_pton, socket.inet_ntop, socket.AF_INET
        fill = _CTFill
        tails: dict[int, str] = {}  # port -> ":port" (endpoints of a port mostly share one)
        for ip, port in endpoints:
            if not checked:
                try:
                    ok = (type(port) is int and 0 < port < 65536
                          and ntop(af, pton(af, ip)) == ip)
                except (OSError, TypeError):
                    ok = False
                if not ok:
                    raise ValueError(f"ct nat(dst={ip}:{port}): needs an IPv4 address and a port")
            tail = tails.get(port)
            if tail is None:
                tail = tails[port] = f":{port}"
            obj = new(fill)
            obj.commit = True
            obj.table = table
            obj.zone = CT_ZONE
            obj.mark = None
            obj.nat = ip + tail
            obj.snat = None
            obj.__class__ = cls  # type: ignore[assignment]
            out.append(obj)
        return out

    def ofctl(self, pipeline: Pipeline) -> str:
        parts = (["commit"] if self.commit else []) + (
            [f"table={pipeline.id(self.table)}"] if self.table else []) + [f"zone={self.zone}"]
        if self.mark is not None:
            parts.append(f"exec(set_field:{_fmt_int(self.mark)}->ct_mark)")
        if self.nat is not None:
            parts.append(f"nat(dst={self.nat})" if self.nat else "nat")
        if self.snat is not None:
            parts.append(f"nat(src={self.snat})")
        return f"ct({','.join(parts)})"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        from os_ken.ofproto import nicira_ext
        inner: list[Any] = [] if self.mark is None else [
            parser.OFPActionSetField(ct_mark=self.mark)]
        if self.nat == "":
            inner.append(parser.NXActionNAT(flags=0))
        elif self.nat:
            ip, _, port = self.nat.rpartition(":")
            inner.append(_padded(parser.NXActionNAT(
                flags=NX_NAT_F_DST, range_ipv4_min=ip, range_ipv4_max=ip,
                range_proto_min=int(port), range_proto_max=int(port))))
        if self.snat:
            ip, first, last = _snat_parts(self.snat) or (self.snat, 0, 0)
            ports = {"range_proto_min": first, "range_proto_max": last} if first else {}
            inner.append(_padded(parser.NXActionNAT(
                flags=NX_NAT_F_SRC, range_ipv4_min=ip, range_ipv4_max=ip, **ports)))
        return parser.NXActionCT(
            flags=nicira_ext.NX_CT_F_COMMIT if self.commit else 0, zone_src="",
            zone_ofs_nbits=self.zone,
            # 255 tells OVS "no recirculation"
            recirc_table=255 if self.table is None else pipeline.id(self.table),
            alg=0, actions=inner)


class _CTFill(Action):
    """A CT under construction (CT.dnats): the same slots, not frozen.

    A frozen CT can only be filled through its slots' setters, a call each;
    this one takes plain attribute stores (the interpreter's fastest), and
    assigning its __class__ then makes it a CT, which CPython allows between
    classes whose instances have the same layout (same base, same slots in
    the same order). Half the cost of each of the 200,000 DNAT actions at
    10,000 Services.
    """

    __slots__ = tuple(f.name for f in dataclasses.fields(CT))
    commit: bool
    table: str | None
    zone: int
    mark: int | None
    nat: str | None
    snat: str | None


if _CTFill.__slots__ != ("commit", "table", "zone", "mark", "nat", "snat"):
    raise ImportError("CT's fields changed: update CT.dnats, which fills each of them")


def _padded(action: Any) -> Any:
    """An os-ken NX action whose body is zero-padded to a multiple of 8 bytes.

    os-ken writes nat() with an address and port range as 28 bytes but
    counts 32 in the enclosing ct(): OVS then refuses a group mod holding it
    ("incorrect length", OFPBFC_BAD_LEN inside a bundle); flow mods happened
    to pass. The NX action header before the body is 10 bytes.
    """
    body = action.serialize_body

    def serialize_body() -> bytes:
        data = bytes(body())
        return data + bytes(-(10 + len(data)) % 8)

    action.serialize_body = serialize_body
    return action


@dataclass(frozen=True)
class Resubmit(Action):
    """resubmit(,table): run `table`'s matching flow's actions, then carry on here.

    For a table whose flows are learned (they can only load registers, never
    go on), the caller continues the pipeline itself afterwards."""

    table: str

    def ofctl(self, pipeline: Pipeline) -> str:
        return f"resubmit(,{pipeline.id(self.table)})"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        return parser.NXActionResubmitTable(table_id=pipeline.id(self.table))


# learn() field names: ours -> (os-ken's NXM name for learn specs, ovs-ofctl name, bits)
_LEARN_FIELDS = {
    "ipv4_src": ("ipv4_src_nxm", "NXM_OF_IP_SRC", 32),
    "ipv4_dst": ("ipv4_dst_nxm", "NXM_OF_IP_DST", 32),
    "tcp_dst": ("tcp_dst_nxm", "NXM_OF_TCP_DST", 16),
    "udp_dst": ("udp_dst_nxm", "NXM_OF_UDP_DST", 16),
    "sctp_dst": ("sctp_dst", "OXM_OF_SCTP_DST", 16),
    # the tenant id (flows/tenantservices.py: a tenant's learned affinity is its own)
    "reg4": ("reg4", "NXM_NX_REG4", 32),
}


@dataclass(frozen=True)
class Learn(Action):
    """learn(): add to `table` a flow matching this packet's `copy` fields (IPv4,
    protocol `ip_proto`) whose actions load constants into registers.

    Learned flows carry cookie 0 and idle_timeout: they are not desired flows
    (the drift check skips their table, see tables.LEARNED), and a new round
    (agent restart) keeps them (controller.flowsync.other_rounds_deletes), so
    a client keeps its endpoint across a restart.
    """

    table: str
    idle_timeout: int
    ip_proto: int
    copy: tuple[str, ...]
    loads: tuple[tuple[RegField, int], ...]
    priority: int = 100

    def __post_init__(self) -> None:
        for f in self.copy:
            if f not in _LEARN_FIELDS:
                raise ValueError(f"learn: cannot copy {f}")
        for reg, v in self.loads:
            reg.value(v)
        if not 0 < self.idle_timeout <= 0xFFFF:
            raise ValueError(f"learn: idle_timeout {self.idle_timeout} out of range")

    def ofctl(self, pipeline: Pipeline) -> str:
        parts = [f"table={pipeline.id(self.table)}", f"idle_timeout={self.idle_timeout}",
                 f"priority={self.priority}", "eth_type=0x800", f"nw_proto={self.ip_proto}"]
        parts += [f"{_LEARN_FIELDS[f][1]}[]" for f in self.copy]
        parts += [f"load:{_fmt_int(v)}->{r.ofctl()}" for r, v in self.loads]
        return f"learn({','.join(parts)})"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        specs = [parser.NXFlowSpecMatch(src=ETH_IP, dst=("eth_type_nxm", 0), n_bits=16),
                 parser.NXFlowSpecMatch(src=self.ip_proto, dst=("ip_proto_nxm", 0), n_bits=8)]
        for f in self.copy:
            name, _, bits = _LEARN_FIELDS[f]
            specs.append(parser.NXFlowSpecMatch(src=(name, 0), dst=(name, 0), n_bits=bits))
        for r, v in self.loads:
            specs.append(parser.NXFlowSpecLoad(src=v, dst=(r.reg, r.start), n_bits=r.n_bits))
        return parser.NXActionLearn(table_id=pipeline.id(self.table), specs=specs,
                                    idle_timeout=self.idle_timeout, priority=self.priority)


@dataclass(frozen=True, slots=True)
class GroupAction(Action):
    """Hand the packet to an OpenFlow group (a Service port's select group)."""

    group_id: int

    def ofctl(self, pipeline: Pipeline) -> str:
        return f"group:{self.group_id}"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        return parser.OFPActionGroup(self.group_id)


@dataclass(frozen=True, slots=True)
class DecTTL(Action):
    def ofctl(self, pipeline: Pipeline) -> str:
        return "dec_ttl"

    def osken(self, parser: Any, ofp: Any, pipeline: Pipeline) -> Any:
        return parser.OFPActionDecNwTtl()


Match = tuple[tuple[str, MatchValue], ...]

# (field, value) pairs with an integer value (eth_type, ip_proto, ports, registers)
# repeat across most flows: one shared tuple each instead of 56 bytes per flow
# (100,000 policy match flows each carry eth_type). Addresses, unique per flow,
# are not kept. Bounded: past the limit, new pairs are simply not shared.
_PAIRS: dict[tuple[str, MatchValue], tuple[str, MatchValue]] = {}
_PAIRS_MAX = 1 << 16


def _shared_pair(kv: tuple[str, MatchValue]) -> tuple[str, MatchValue]:
    if not isinstance(kv[1], int):
        return kv
    shared = _PAIRS.get(kv)
    if shared is None:
        if len(_PAIRS) >= _PAIRS_MAX:
            return kv
        shared = _PAIRS[kv] = kv
    return shared


FlowKey = tuple[str, int, Match]


@dataclass(frozen=True, slots=True)
class MatchOwner:
    """The owner of flows that each own themselves, named after what they match.

    A policy engine's clause flows (one per address or port a conjunction
    uses: 95,000 of the 99,000 flows at cluster scale) each have an owner of
    their own. A name string per flow, spelling out the match the flow
    already holds, was 9 MB, and FlowSync's owner -> flow map for them 4 MB
    more. Such a flow instead carries one of these, shared by every flow of
    one table, priority and matched field: the owner's key (what FlowSync and
    a change's owner map are keyed by) is the flow's own identity,
    `Flow.key`; the owner's name (what cookies hash, what flowctl shows) is
    made from the match when asked: `prefix` + `describe(match)`.
    """

    prefix: str
    describe: Callable[[Match], str]

    def name(self, match: Match) -> str:
        return self.prefix + self.describe(match)


# Who owns a flow: a name, or a MatchOwner (the flow owns itself).
Owner = str | MatchOwner
# An owner as FlowSync and change maps key it: a name, or a self-owned flow's Flow.key.
OwnerKey = str | FlowKey


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow as the agent wants it. Build with `Flow.make`.

    Slotted: an agent holds one per flow (100,000 at cluster scale), and a
    per-instance __dict__ was a fifth of each one's size.
    """

    table: str
    priority: int
    match: Match
    actions: tuple[Action, ...]
    goto: str | None
    feature: ck.Feature
    owner: Owner

    @property
    def key(self) -> FlowKey:
        """OpenFlow identity of the flow: what OFPFC_ADD overwrites."""
        return (self.table, self.priority, self.match)

    @property
    def owner_key(self) -> OwnerKey:
        """The key of this flow's owner: its name, or for a self-owned flow its `key`."""
        o = self.owner
        return o if isinstance(o, str) else (self.table, self.priority, self.match)

    @property
    def owner_name(self) -> str:
        """The name of this flow's owner (what its cookie hashes; see MatchOwner)."""
        o = self.owner
        return o if isinstance(o, str) else o.name(self.match)

    @classmethod
    def make(cls, table: str, priority: int, match: dict[str, MatchValue] | None = None,
             actions: tuple[Action, ...] | list[Action] = (), goto: str | None = None, *,
             feature: ck.Feature, owner: Owner, pipeline: Pipeline = DEFAULT) -> Flow:
        """Validate against the table contract and normalise the match."""
        t: Table = pipeline.table(table)
        if not 0 <= priority <= 0xFFFF:
            raise ValueError(f"{table}: priority {priority} out of range")
        m = dict(match or {})
        for name in list(m):
            if name not in t.fields:
                raise ValueError(f"{table} may not match on {name}")
            if name not in _OFCTL_MATCH and name not in ("eth_type", "ip_proto"):
                raise ValueError(f"{table}: unknown match field {name}")
            if name in _PREREQ:
                eth, proto = _PREREQ[name]
                if m.setdefault("eth_type", eth) != eth:
                    raise ValueError(f"{table}: {name} needs eth_type {eth:#x}")
                if proto is not None and m.setdefault("ip_proto", proto) != proto:
                    raise ValueError(f"{table}: {name} needs ip_proto {proto}")
            m[name] = _canon_value(name, m[name])
        if goto is not None and (goto not in t.next or goto == table):
            raise ValueError(f"{table} may not go to {goto} (allowed: {t.next}; a table "
                             "names itself only for ct() recirculation)")
        n_conj = 0
        for a in actions:
            if isinstance(a, CT) and a.table is not None and a.table not in t.next:
                raise ValueError(f"{table} may not recirculate to {a.table}")
            if isinstance(a, Resubmit) and (a.table not in t.next or a.table == table):
                raise ValueError(f"{table} may not resubmit to {a.table}")
            n_conj += isinstance(a, Conjunction)
        if n_conj and n_conj != len(actions):
            raise ValueError(f"{table}: conjunction actions cannot mix with others")
        if goto is not None and n_conj:
            raise ValueError(f"{table}: a conjunctive clause flow cannot go anywhere")
        order = sorted(m.items(), key=lambda kv: (_FIELD_ORDER.get(kv[0], -1), kv[0]))
        return cls(table, priority, tuple(_shared_pair(kv) for kv in order), tuple(actions),
                   goto, feature, owner)

    @classmethod
    def with_match(cls, template: Flow, actions: tuple[Action, ...] | list[Action] = (),
                   goto: str | None = None, *, priority: int | None = None,
                   owner: Owner | None = None, pipeline: Pipeline = DEFAULT) -> Flow:
        """A flow on an already validated match (`template`, from `make`).

        Policy engines build thousands of flows over a few thousand distinct
        matches; the match is checked once, when the template is made, and
        only what changes (actions, goto) is checked here.
        """
        t = pipeline.table(template.table)
        if goto is not None and goto not in t.next:
            raise ValueError(f"{t.name} may not go to {goto} (allowed: {t.next})")
        n_conj = sum(isinstance(a, Conjunction) for a in actions)
        if n_conj and (n_conj != len(actions) or goto is not None):
            raise ValueError(f"{t.name}: conjunction actions must stand alone")
        return cls(template.table, template.priority if priority is None else priority,
                   template.match, tuple(actions), goto, template.feature,
                   template.owner if owner is None else owner)

    @classmethod
    def with_each(cls, template: Flow, name: str, values: Iterable[str]) -> list[Flow]:
        """`template` (from `make`) once per value of its address match field `name`.

        A cluster policy engine makes a template per pod address and table (50,000
        at 10,000 pods); the field, its prerequisites and the order were checked
        once in `make`, so only each address is checked here (as `make` would).
        """
        at = [i for i, (k, _) in enumerate(template.match) if k == name]
        if len(at) != 1 or not isinstance(template.match[at[0]][1], str):
            raise ValueError(f"{template.table}: template has no address field {name}")
        head, tail = template.match[:at[0]], template.match[at[0] + 1:]
        return [_new_flow(template.table, template.priority, (*head, (name, _canon_value(
            name, v)), *tail), template.actions, template.goto, template.feature,
            template.owner) for v in values]

    @classmethod
    def with_values(cls, template: Flow, values: dict[str, MatchValue],
                    actions: tuple[Action, ...] | list[Action] = (), goto: str | None = None,
                    *, owner: Owner, pipeline: Pipeline = DEFAULT) -> Flow:
        """`template` (from `make`) with the values of some of its match fields replaced.

        A Service proxy makes 20,000 flows of a handful of shapes (ClusterIP
        and port per protocol); the field names, prerequisites and order were
        checked once in `make`, so only the new values are checked here.
        """
        left = dict(values)
        match = []
        for name, old in template.match:
            if name in left:
                v = left.pop(name)
                if isinstance(old, int) and (isinstance(v, bool) or not isinstance(v, int)
                                             or not 0 <= v <= 0xFFFF):
                    raise ValueError(f"{template.table}: {name}={v!r} is not a 16-bit number")
                match.append((name, _canon_value(name, v)))
            else:
                match.append((name, old))
        if left:
            raise ValueError(f"{template.table}: template does not match on {sorted(left)}")
        f = cls.with_match(template, actions, goto, owner=owner, pipeline=pipeline)
        return _new_flow(f.table, f.priority, tuple(match), f.actions, f.goto, f.feature,
                         f.owner)

    @classmethod
    def clauses(cls, items: Iterable[tuple[Flow, Sequence[Action]]], *, priority: int,
                owner: Owner) -> list[Flow]:
        """Conjunctive clause flows on already validated matches (templates from `make`),
        all at one priority and owner.

        The check `with_match` makes for such a flow (conjunction actions only, going
        nowhere) is made once per distinct action tuple, not per item: a cluster
        policy rule has thousands of clause flows sharing one `(conjunction(id,k/n),)`.
        Each flow is made by `_new_flow`.
        """
        if not 0 <= priority <= 0xFFFF:
            raise ValueError(f"priority {priority} out of range")
        checked: set[int] = set()  # ids of action tuples held by flows in `out`: stable
        out = []
        new = object.__new__
        for t, acts in items:
            a = acts if type(acts) is tuple else tuple(acts)
            if id(a) not in checked:
                if not a or not all(isinstance(x, Conjunction) for x in a):
                    raise ValueError(f"{t.table}: a clause flow carries conjunction actions only")
                checked.add(id(a))
            f = new(cls)  # _new_flow, inlined: this loop makes 500,000 flows
            _SET_TABLE(f, t.table)
            _SET_PRIORITY(f, priority)
            _SET_MATCH(f, t.match)
            _SET_ACTIONS(f, a)
            _SET_GOTO(f, None)
            _SET_FEATURE(f, t.feature)
            _SET_OWNER(f, owner)
            out.append(f)
        return out

    # -- rendering ---------------------------------------------------------

    def match_text(self) -> str:
        m = dict(self.match)
        parts: list[str] = []
        eth, proto = m.pop("eth_type", None), m.pop("ip_proto", None)
        if eth == ETH_ARP:
            parts.append("arp")
        elif eth == ETH_IP:
            names = {v: k for k, v in IP_PROTOS.items()}
            if proto is None:
                parts.append("ip")
            elif isinstance(proto, int) and proto in names:
                parts.append(names[proto])
            else:
                parts += ["ip", f"nw_proto={proto}"]
        elif isinstance(eth, int):
            parts.append(f"dl_type={_fmt_int(eth)}")
        parts += [_match_text(k, v) for k, v in m.items()]
        return ",".join(parts)

    def actions_text(self, pipeline: Pipeline = DEFAULT, names: bool = False) -> str:
        acts = [a.ofctl(pipeline) for a in self.actions]
        if self.goto:
            acts.append(f"goto_table:{self.goto if names else pipeline.id(self.goto)}")
        return ",".join(acts) or "drop"

    def ofctl(self, pipeline: Pipeline = DEFAULT, names: bool = False,
              cookie: int | None = None) -> str:
        """ovs-ofctl add-flow syntax (table numbers), or display syntax (names=True)."""
        table = self.table if names else str(pipeline.id(self.table))
        head = f"cookie={_fmt_int(cookie)}," if cookie is not None else ""
        m = self.match_text()
        return (f"{head}table={table},priority={self.priority}"
                f"{',' + m if m else ''},actions={self.actions_text(pipeline, names)}")

    def osken_match(self, parser: Any) -> Any:
        return parser.OFPMatch(**{k: _osken_value(k, v) for k, v in self.match})

    def osken_instructions(self, parser: Any, ofp: Any, pipeline: Pipeline) -> list[Any]:
        inst: list[Any] = []
        if self.actions:
            inst.append(parser.OFPInstructionActions(
                ofp.OFPIT_APPLY_ACTIONS, [a.osken(parser, ofp, pipeline) for a in self.actions]))
        if self.goto:
            inst.append(parser.OFPInstructionGotoTable(pipeline.id(self.goto)))
        return inst

    def cookie(self, round_: int) -> int:
        return ck.make(round_, self.feature, self.owner_name)


_SET_TABLE, _SET_PRIORITY, _SET_MATCH, _SET_ACTIONS, _SET_GOTO, _SET_FEATURE, _SET_OWNER = (
    getattr(Flow, f.name).__set__ for f in dataclasses.fields(Flow))
if [f.name for f in dataclasses.fields(Flow)] != [
        "table", "priority", "match", "actions", "goto", "feature", "owner"]:
    raise ImportError("Flow's fields changed: update _new_flow")


def _new_flow(table: str, priority: int, match: Match, actions: tuple[Action, ...],
              goto: str | None, feature: ck.Feature, owner: Owner) -> Flow:
    """Flow(...) on already checked values, filled through its slots.

    The frozen dataclass __init__ sets each field through object.__setattr__;
    at 500,000 clause flows (100 cluster policies over 10,000 pods) filling the
    slots directly halved their cost. Nothing else happens in __init__.
    """
    f = object.__new__(Flow)
    _SET_TABLE(f, table)
    _SET_PRIORITY(f, priority)
    _SET_MATCH(f, match)
    _SET_ACTIONS(f, actions)
    _SET_GOTO(f, goto)
    _SET_FEATURE(f, feature)
    _SET_OWNER(f, owner)
    return f

MAX_GROUP_ID = 0xFFFFFF00  # OFPG_MAX


@dataclass(frozen=True)
class Group:
    """One select group as the agent wants it: an id and its buckets' actions.

    Groups carry no cookie, so OVS cannot say which agent round made one;
    the agent owns every group on its bridge and reconciles them by id
    (desired ids are derived from their owners' keys, see flows.services).
    `table` is the table the group is used from: bucket actions are checked
    against its contract (a ct() in a bucket may recirculate only to a table
    that one may go to).
    """

    group_id: int
    buckets: tuple[tuple[Action, ...], ...]
    owner: str
    table: str
    feature: ck.Feature = ck.Feature.SERVICE
    # One weight per bucket (None: all 1). A chained Service group's top
    # buckets weigh as many endpoints as the sub-group each leads to.
    weights: tuple[int, ...] | None = None

    @classmethod
    def make(cls, group_id: int, buckets: list[list[Action]] | list[tuple[Action, ...]], *,
             owner: str, table: str, pipeline: Pipeline = DEFAULT,
             weights: list[int] | None = None) -> Group:
        if not 0 < group_id <= MAX_GROUP_ID:
            raise ValueError(f"group id {group_id} out of range")
        t = pipeline.table(table)
        seen: set[int] = set()  # bucket actions repeat (shared ct() objects): check each once
        for b in buckets:
            for a in b:
                if id(a) in seen:
                    continue
                seen.add(id(a))
                if isinstance(a, CT) and a.table is not None and a.table not in t.next:
                    raise ValueError(f"group {group_id}: bucket may not recirculate to "
                                     f"{a.table} from {table}")
                if isinstance(a, GroupAction) and a.group_id == group_id:
                    raise ValueError(f"group {group_id}: a bucket leads back to itself")
                if isinstance(a, Resubmit) and a.table not in (*t.next, table):
                    raise ValueError(f"group {group_id}: bucket may not resubmit to "
                                     f"{a.table} from {table}")
        if weights is not None and (len(weights) != len(buckets)
                                    or not all(0 < w <= 0xFFFF for w in weights)):
            raise ValueError(f"group {group_id}: needs one weight (1-65535) per bucket")
        return cls(group_id, tuple(b if type(b) is tuple else tuple(b) for b in buckets),
                   owner, table, weights=None if weights is None else tuple(weights))

    @classmethod
    def dnat_select(cls, group_id: int, endpoints: list[tuple[str, int]], *, ct_table: str,
                    owner: str, table: str, pipeline: Pipeline = DEFAULT,
                    checked: bool = False) -> Group:
        """A select group with one bucket per endpoint, ct(commit, table=ct_table,
        nat(dst=endpoint)) each: the bucket shape is checked once, not per bucket
        (200,000 buckets at 10,000 Services), and each endpoint by CT.dnats (unless
        `checked`: see there)."""
        if not 0 < group_id <= MAX_GROUP_ID:
            raise ValueError(f"group id {group_id} out of range")
        if ct_table not in pipeline.table(table).next:
            raise ValueError(f"group {group_id}: bucket may not recirculate to {ct_table} "
                             f"from {table}")
        # zip of one list: its 1-tuples (the buckets) made in C
        return cls(group_id, tuple(zip(CT.dnats(endpoints, ct_table, checked=checked))),
                   owner, table)

    def weight(self, i: int) -> int:
        return 1 if self.weights is None else self.weights[i]

    def ofctl(self, pipeline: Pipeline = DEFAULT) -> str:
        bks = "".join(f",bucket={'' if self.weights is None else f'weight:{self.weights[i]},'}"
                      f"actions={','.join(a.ofctl(pipeline) for a in b)}"
                      for i, b in enumerate(self.buckets))
        return f"group_id={self.group_id},type=select{bks}"

    def osken_buckets(self, parser: Any, ofp: Any, pipeline: Pipeline) -> list[Any]:
        return [parser.OFPBucket(weight=self.weight(i), watch_port=ofp.OFPP_ANY,
                                 watch_group=ofp.OFPG_ANY,
                                 actions=[a.osken(parser, ofp, pipeline) for a in b])
                for i, b in enumerate(self.buckets)]
