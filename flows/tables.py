"""The pipeline's tables, declared once.

Each table names the match fields its flows may use and the tables its flows
may go to; the flow model checks every flow against this contract when it is
built, so a builder bug fails in a unit test instead of in OVS. Table numbers
are not written anywhere: they follow the declaration order and are assigned
when the pipeline is built (the agent publishes the mapping in OVSDB so tools
can print names).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    """One OpenFlow table of the pipeline.

    `miss` is what a packet that matches no flow of the table does: "drop",
    the name of the table it continues in, or "" when a builder supplies the
    table's last flow itself (Output). The miss flow is emitted by the base
    builder from this declaration, so it exists in one place.
    """

    name: str
    doc: str
    fields: frozenset[str]
    next: tuple[str, ...] = ()
    miss: str = "drop"


# Fields a table gets for free: prerequisites that the model adds itself.
# ip_dscp: live traceflow marks its probe packet with a DSCP value and copies
# each table's drop and output flows with that mark added; any table may hold those.
PREREQ_FIELDS = frozenset({"eth_type", "ip_proto", "ip_dscp"})


def _t(name: str, doc: str, fields: Iterable[str], next_: Iterable[str] = (),
       miss: str = "drop") -> Table:
    nxt = tuple(next_) + ((miss,) if miss not in ("drop", "", *next_) else ())
    return Table(name, doc, frozenset(fields) | PREREQ_FIELDS, nxt, miss)


PORTS = ["tcp_dst", "udp_dst", "sctp_dst"]

# Where policy evaluation starts for a new connection, per direction: the
# Admin tier of cluster policies (flows/clusterpolicy.py), which passes to
# NetworkPolicy (EgressRule / IngressRule), which falls to the Baseline tier.
EGRESS_POLICY = "AdminEgress"
INGRESS_POLICY = "AdminIngress"

PIPELINE: tuple[Table, ...] = (
    _t("Classifier", "in_port -> source mark (pod, gateway, tunnel)",
       ["in_port"], ["SpoofGuard", "ConntrackZone"]),
    _t("SpoofGuard", "pod ports: source MAC and IP (and ARP sender) must be the pod's",
       ["in_port", "eth_src", "ipv4_src", "arp_spa", "arp_sha", "reg0"],
       ["ARPResponder", "ConntrackZone"]),
    _t("ARPResponder", "answers every ARP request: gateway IP with the gateway MAC, "
       "anything else with the virtual router MAC",
       ["arp_op", "arp_tpa", "reg0"], []),
    _t("ConntrackZone", "all IP into conntrack (replies of allowed connections skip the rules); "
       "a reply to the hairpin or gateway address has its SNAT undone first, then comes back "
       "here", ["ipv4_dst", "reg0"], ["ConntrackZone", "ConntrackState", "L3Forwarding"],
       miss="L3Forwarding"),
    _t("ConntrackState", "invalid: drop; established, related and replies skip the rules "
       "(a node-port connection to SNAT to the gateway is flagged on the way)",
       ["ct_state", "ct_mark"], ["L3Forwarding"], miss="ServiceLB"),
    _t("ServiceLB", "new connections to a Service IP and port: its select group, whose "
       "buckets DNAT to one endpoint (committed) and continue in AdminEgress",
       ["ipv4_dst", *PORTS], ["SessionAffinity", "AffinityDNAT", EGRESS_POLICY],
       miss=EGRESS_POLICY),
    _t("SessionAffinity", "sessionAffinity ClientIP: flows learned per client, Service "
       "address and port, loading the endpoint it was given (resubmitted to from ServiceLB)",
       [], []),
    _t("AffinityDNAT", "sessionAffinity ClientIP: a client's learned endpoint, DNATed to; a "
       "new client goes to the select group, whose bucket learns its choice",
       ["ipv4_dst", "reg6", "reg7", *PORTS], [EGRESS_POLICY]),
    _t("AdminEgress", "cluster policies of the Admin tier, egress of local pods, by priority "
       "(Accept: past every tier; Deny: drop; Pass: on to NetworkPolicy)",
       ["ipv4_src", "ipv4_dst", "conj_id", *PORTS], ["EgressRule", "L3Forwarding"],
       miss="EgressRule"),
    _t("EgressRule", "NetworkPolicy egress rules of local pods (conjunctive matches)",
       ["ipv4_src", "ipv4_dst", "conj_id", *PORTS], ["EgressDefault", "L3Forwarding"],
       miss="EgressDefault"),
    _t("EgressDefault", "egress-isolated pods: what no rule allowed is dropped",
       ["ipv4_src"], ["L3Forwarding"], miss="BaselineEgress"),
    _t("BaselineEgress", "cluster policies of the Baseline tier, egress of local pods no "
       "NetworkPolicy isolates", ["ipv4_src", "ipv4_dst", "conj_id", *PORTS],
       ["L3Forwarding"], miss="L3Forwarding"),
    _t("L3Forwarding", "replies of connections that entered from the gateway: back to the "
       "gateway; local pod IP: rewrite MACs; remote pod CIDR: tunnel to its node; "
       "everything else: switch on dst MAC",
       ["ipv4_dst", "eth_dst", "reg0", "ct_state", "ct_mark"], ["L3DecTTL", "L2ForwardingCalc"],
       miss="L2ForwardingCalc"),
    _t("L3DecTTL", "decrement TTL of routed packets, except those the gateway sent",
       ["reg0"], ["L2ForwardingCalc"], miss="L2ForwardingCalc"),
    _t("L2ForwardingCalc", "dst MAC -> output port register (virtual router MAC: "
       "already chosen by L3Forwarding)",
       ["eth_dst"], [INGRESS_POLICY]),
    _t("AdminIngress", "cluster policies of the Admin tier, ingress of local pods, by priority "
       "(established connections skip it)",
       ["ipv4_src", "ipv4_dst", "conj_id", "ct_state", *PORTS], ["IngressRule", "ConntrackCommit"],
       miss="IngressRule"),
    _t("IngressRule", "NetworkPolicy ingress rules of local pods (conjunctive matches)",
       ["ipv4_src", "ipv4_dst", "conj_id", "ct_state", "reg0", *PORTS],
       ["IngressDefault", "ConntrackCommit"], miss="IngressDefault"),
    _t("IngressDefault", "ingress-isolated pods: what no rule allowed is dropped",
       ["ipv4_dst"], ["ConntrackCommit"], miss="BaselineIngress"),
    _t("BaselineIngress", "cluster policies of the Baseline tier, ingress of local pods no "
       "NetworkPolicy isolates", ["ipv4_src", "ipv4_dst", "conj_id", *PORTS],
       ["ConntrackCommit"], miss="ConntrackCommit"),
    _t("ConntrackCommit", "commit new connections that got this far (marking those that "
       "entered from the gateway)",
       ["ct_state", "reg0"], ["Output"], miss="Output"),
    _t("Output", "output to the port in the output register; hairpin (a pod reaching "
       "itself through a Service): SNAT to the hairpin address and back out of its port; "
       "node ports (externalTrafficPolicy Cluster): SNAT to the gateway address",
       ["ipv4_src", "ipv4_dst", "reg0"], [], miss=""),
)


# Tenant networks (flows/tenant.py) add matches on the tenant register (reg4) to
# these tables, and on the tunnel key to Classifier; kept apart from the table
# list so the default network's declarations read as they are.
TENANT_MATCHES: dict[str, tuple[str, ...]] = {
    "Classifier": ("reg4", "tunnel_id"), "ARPResponder": ("reg4",),
    "ConntrackZone": ("reg4", "reg0", "ipv4_dst"),
    "ConntrackState": ("reg4",), "ServiceLB": ("reg4",), "AdminEgress": ("reg4",),
    "EgressRule": ("reg4",), "AdminIngress": ("reg4",),
    "EgressDefault": ("reg4",), "L3Forwarding": ("reg4",), "IngressRule": ("reg4",),
    "IngressDefault": ("reg4",), "ConntrackCommit": ("reg4",),
    # Services inside tenants (flows/tenantservices.py): sessionAffinity and hairpin
    "AffinityDNAT": ("reg4",), "Output": ("reg4",),
}
# Cluster DNS from inside tenants (flows/tenantservices.py dns_flows): a tenant's DNS
# query is SNATed in its zone and handed to the default network, which recirculates it
# into the same table (ServiceLB: the default Service flow; ConntrackState: the default
# zone's DNAT of its later packets, told apart by the tenant's DNS address as source).
# Node ports into a tenant (nodeport_flows) use the same two: ServiceLB recirculates
# into itself after the SNAT, ConntrackState matches the answer by both addresses.
TENANT_DNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ServiceLB": ((), ("ServiceLB",)),
    "ConntrackState": (("ipv4_src", "ipv4_dst"), ("ConntrackState",)),
}
PIPELINE = tuple(Table(t.name, t.doc, t.fields | frozenset(TENANT_MATCHES.get(t.name, ()))
                       | frozenset(TENANT_DNS.get(t.name, ((), ()))[0]),
                       t.next + tuple(n for n in TENANT_DNS.get(t.name, ((), ()))[1]
                                      if n not in t.next), t.miss) for t in PIPELINE)

# Tables holding flows OVS learns (learn()): not desired flows, so the drift check skips them.
LEARNED = frozenset({"SessionAffinity"})


@dataclass(frozen=True)
class Pipeline:
    """The declared tables with their numbers."""

    tables: tuple[Table, ...]
    ids: dict[str, int] = field(default_factory=dict)
    # name -> Table: every flow built looks its table up (500,000 at cluster
    # policy scale), and a scan of the list was a measurable share of that.
    by_name: dict[str, Table] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tables})

    @classmethod
    def build(cls, tables: tuple[Table, ...] = PIPELINE, first: int = 0) -> Pipeline:
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in pipeline: {names}")
        ids = {t.name: first + i for i, t in enumerate(tables)}
        for t in tables:
            for n in (*t.next, *([t.miss] if t.miss not in ("drop", "") else [])):
                if n not in ids:
                    raise ValueError(f"table {t.name} goes to undeclared table {n}")
                # A table may name itself: a ct() recirculation back into it after
                # a NAT that no flow of its would match again (hairpin un-SNAT).
                if ids[n] < ids[t.name]:
                    raise ValueError(f"table {t.name} goes backwards to {n}")
        return cls(tables, ids)

    def table(self, name: str) -> Table:
        t = self.by_name.get(name)
        if t is None:
            raise KeyError(f"unknown table {name!r}")
        return t

    def id(self, name: str) -> int:
        return self.ids[name]

    def name(self, table_id: int) -> str:
        for n, i in self.ids.items():
            if i == table_id:
                return n
        return str(table_id)

    def names_by_id(self) -> dict[int, str]:
        return {i: n for n, i in self.ids.items()}


DEFAULT = Pipeline.build()
