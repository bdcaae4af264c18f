"""flowcni-agent: the per-node agent.

Start-up order matters for restarts without loss: the desired flows are
rebuilt from OVSDB (pods) and the IPAM checkpoint before the OpenFlow
listener starts, so the first sync after a restart installs the full set in
one bundle and only then removes the previous round's flows.
"""

from __future__ import annotations

import argparse
import errno
import gc
import ipaddress
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from flowcni.api.schema import DEFAULT_SOCKET as API_SOCKET
from flowcni.cni import spec
from flowcni.cni.ipam import IPAM
from flowcni.cni.podif import set_tx_checksum
from flowcni.cni.rtnl import NetlinkError, Rtnl
from flowcni.controller import hostnet, metrics, ofapp
from flowcni.controller.apiserver import AgentAPI, APIServer
from flowcni.controller.cniserver import CNIServer, timed
from flowcni.controller.dpcache import (
    CheckResult,
    DatapathGuard,
    Unixctl,
    UnixctlError,
    flow_addresses,
    vswitchd_target,
)
from flowcni.controller.flowsync import FlowSync
from flowcni.controller.healthcheck import HealthChecks
from flowcni.controller.heap import HeapTrimmer, cap_arenas
from flowcni.controller.hostnet import HostNetError
from flowcni.controller.isolate import Failure, apply_isolating, error_text, key_of
from flowcni.controller.livetrace import LiveTrace
from flowcni.controller.peers import Peers, refresh_neighbors
from flowcni.controller.podrecords import PodRecords
from flowcni.controller.pods import CNIFailure, PodManager
from flowcni.controller.reject import Rejecter
from flowcni.controller.svcconntrack import flush_stale
from flowcni.controller.tenants import Tenants
from flowcni.datastore.base import Datastore, open_datastore
from flowcni.datastore.store import ENCAPS, Change, ClusterConfig, Store, StoreError
from flowcni.flows import cookie as ck
from flowcni.flows.clusterpolicy import KINDS as CLUSTER_POLICY_KINDS
from flowcni.flows.clusterpolicy import ClusterPolicyEngine
from flowcni.flows.model import Flow, gc_paused
from flowcni.flows.node import Gateway, node_flows
from flowcni.flows.nodeport import (
    GATEWAY_SNAT_OWNER,
    NODE_PORT_RANGE,
    NODEPORT_VIP,
    SNAT_MIN_PORTS,
    gateway_snat_flows,
    snat_port_range,
)
from flowcni.flows.policy import PolicyEngine
from flowcni.flows.services import (
    GATEWAY_CT_OWNER,
    PROXY_MODES,
    ServiceProxy,
    gateway_reply_flows,
    service_owner,
)
from flowcni.flows.tables import DEFAULT as PIPELINE
from flowcni.flows.tunnel import TUNNEL_OWNER, TUNNEL_PORT, pod_mtu, tunnel_flows
from flowcni.ovsdb.bridge import OVSDB, TABLES_KEY, OVSDBError, default_datapath_type

LOG = logging.getLogger("flowcni.agent")
# Namespaced kinds whose objects in a tenant's namespace belong to that tenant, not to
# the default network's policy engine and Service proxy.
TENANT_SCOPED = ("Pod", "NetworkPolicy", "Service", "EndpointSlice")
_TRIM_AFTER = 200  # changes in one batch after which freed heap goes back to the OS
GATEWAY_IF = "flowcni-gw0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowcni-agent", description=__doc__)
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--pod-cidr", help="this node's pod CIDR (default: allocated by the "
                   "datastore; required without one)")
    p.add_argument("--datastore", default="none",
                   help="sqlite:PATH (the embedded store shared by a lab's agents), "
                   "kubernetes (the API server), or none")
    p.add_argument("--kubeconfig", help="with --datastore kubernetes: kubeconfig file "
                   "(default: in-cluster config)")
    p.add_argument("--node-ip", help="this node's IP: tunnel endpoint / next hop for peers")
    p.add_argument("--encap", choices=ENCAPS, help="override the cluster's encapsulation")
    p.add_argument("--bridge", default="br-int")
    p.add_argument("--ovsdb", default="unix:/var/run/openvswitch/db.sock",
                   help="OVSDB remote (unix:PATH or tcp:127.0.0.1:PORT)")
    p.add_argument("--datapath-type", default="auto", choices=["auto", "system", "netdev"])
    p.add_argument("--of-socket", default=None,
                   help="unix socket the agent listens on for the bridge's OpenFlow "
                   "session; ovs-vswitchd connects only to sockets under its own run "
                   "directory, and the agent makes the socket's directory root-only "
                   "(default: OVS_RUNDIR/flowcni/BRIDGE.sock, OVS_RUNDIR being the "
                   "directory of the --ovsdb unix socket, else /var/run/openvswitch); "
                   "there is no TCP endpoint")
    p.add_argument("--cni-socket", default="/run/flowcni/cni.sock",
                   help="the CNI plugin's socket, CNI verbs only (default: %(default)s)")
    p.add_argument("--api-socket", default=API_SOCKET,
                   help="the agent API socket flowctl uses (default: %(default)s)")
    p.add_argument("--api-group", default="",
                   help="group allowed on the agent API socket (mode 0660); "
                   "default: none, root only (0600)")
    p.add_argument("--state-dir", default="/var/lib/flowcni")
    p.add_argument("--mtu", type=int, default=0,
                   help="pod interface MTU (default: uplink MTU minus encapsulation overhead)")
    p.add_argument("--metrics-address", default="127.0.0.1:9153",
                   help="Prometheus endpoint (host:port; empty to disable)")
    p.add_argument("--resync-period", type=float, default=30.0,
                   help="seconds between checks that OVS holds exactly the desired flows")
    p.add_argument("--datapath-guard", choices=["on", "off"],
                   default=os.environ.get("FLOWCNI_DATAPATH_GUARD", "on"),
                   help="after each policy change and every resync period, re-translate "
                   "the cached datapath flows it can affect and delete those the tables no "
                   "longer give (see controller/dpcache.py)")
    p.add_argument("--vswitchd-ctl", default="",
                   help="ovs-vswitchd's unixctl socket (default: next to the OVSDB socket)")
    p.add_argument("--proxy", choices=PROXY_MODES, default="flowcni",
                   help="who implements Services: flowcni (ClusterIPs load-balanced in "
                   "OVS) or kube-proxy (the node's own DNAT; flowcni only makes sure "
                   "replies return through the node)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if a.datastore not in ("none", "kubernetes") and not a.datastore.startswith("sqlite:"):
        p.error(f"--datastore {a.datastore!r}: use sqlite:PATH, kubernetes or none")
    if a.datastore == "none" and not a.pod_cidr:
        p.error("--pod-cidr is required without a datastore")
    if a.datastore != "none" and not a.node_ip:
        p.error("--node-ip is required with a datastore (peers reach this node through it)")
    if a.pod_cidr:
        try:
            net = ipaddress.ip_network(a.pod_cidr)
        except ValueError as e:
            p.error(f"--pod-cidr: {e}")
        if net.version != 4 or net.num_addresses < 4:
            p.error(f"--pod-cidr {a.pod_cidr}: need an IPv4 range with room for gateway "
                    "and pods")
    ovs_rundir = (os.path.dirname(a.ovsdb[5:]) if a.ovsdb.startswith("unix:")
                  else "/var/run/openvswitch")
    a.of_socket = a.of_socket or os.path.join(ovs_rundir, "flowcni", f"{a.bridge}.sock")
    if not os.path.isabs(a.of_socket) or len(a.of_socket.encode()) > 107:
        p.error(f"--of-socket {a.of_socket}: need an absolute path of at most 107 bytes")
    if a.mtu and not 576 <= a.mtu <= 65535:
        p.error(f"--mtu {a.mtu}: out of range 576..65535")
    return a


def pod_tx_offload(encap: str, datapath_type: str) -> bool:
    """Whether pods and the gateway port keep tx checksum offload (and with it TSO/GSO).

    The userspace datapath of OVS 3.1 drops offloaded packets it has to
    encapsulate ("Tunneling packets with HW offload flags is not supported"),
    so pods of an encapsulating cluster on it send finished packets; same-node
    traffic pays that too, since a pod has one setting for all its peers. The
    kernel datapath segments offloaded packets into tunnels itself.
    """
    return encap == "none" or datapath_type == "system"


def default_node_ports(proxy: ServiceProxy) -> dict[tuple[str, int], tuple[str, int]]:
    """The default network's node ports: (PROTOCOL, port) -> (Service key, port index)
    (what controller.tenants checks tenant Services' node ports against)."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    for key, svc in proxy.services.items():
        for i, (sp, np) in enumerate(zip(svc.ports, svc.exposure.node_ports, strict=True)):
            if np is not None:
                out.setdefault((sp.protocol, np), (key, i))
    return out


def held_node_port(f: Flow, ports: Mapping[tuple[str, int], str]) -> bool:
    """Whether flow f is a node-port flow (NODEPORT_VIP) of one of `ports`."""
    m = dict(f.match)
    if m.get("ipv4_dst") != NODEPORT_VIP:
        return False
    for proto in ("TCP", "UDP", "SCTP"):
        v = m.get(f"{proto.lower()}_dst")
        if v is not None and (proto, v) in ports:
            return True
    return False


def configure_gateway(name: str, cidr: str, mtu: int, tx_offload: bool = True,
                      timeout: float = 5.0) -> tuple[str, str]:
    """Address the gateway netdev with the first IP of the pod CIDR; return (ip, mac).

    `tx_offload` as for pods (see pod_tx_offload): the node's own TCP to
    remote pods leaves through the gateway into the tunnel, and OVS 3.1's
    userspace tunnels drop it while it carries checksum offload flags.
    """
    net = ipaddress.ip_network(cidr)
    ip = str(next(net.hosts()))
    deadline = time.monotonic() + timeout
    with Rtnl() as nl:
        while True:
            link = nl.link(name)
            if link is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if link is None:
            raise RuntimeError(f"gateway interface {name} did not appear")
        nl.set_link(link.index, up=True, mtu=mtu)
        try:
            nl.add_address(link.index, ip, net.prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        mac = link.mac
    set_tx_checksum("/proc/self/ns/net", name, tx_offload)
    return ip, mac


class Agent:
    def __init__(self, a: argparse.Namespace) -> None:
        self.args = a
        self.started = time.time()
        self.stop_event = threading.Event()
        self.store = open_datastore(a.datastore, a.kubeconfig)
        cfg = self.store.cluster() if self.store else ClusterConfig(
            cluster_cidr=a.pod_cidr, encap="none")
        if a.encap:
            cfg = replace(cfg, encap=a.encap)
        self.cluster = cfg.validate()
        pod_cidr = (self.store.register_node(a.node, a.node_ip, a.pod_cidr) if self.store
                    else a.pod_cidr)
        self.pod_cidr = pod_cidr
        self.mtu = a.mtu or cfg.mtu or pod_mtu(
            hostnet.uplink_of(a.node_ip)[1] if a.node_ip else 1500, cfg.encap)
        dptype = default_datapath_type() if a.datapath_type == "auto" else a.datapath_type
        self.datapath_type = dptype
        self.ovsdb = OVSDB(a.ovsdb)
        self.ovsdb.ensure_bridge(a.bridge, dptype, ofapp.controller_target(a.of_socket))
        self.dpid = self.ovsdb.pin_datapath_id(a.bridge)
        hostnet.set_forwarding()
        hostnet.nft((hostnet.isolation_rules() if dptype == "netdev" else "")
                    + hostnet.masquerade_rules(cfg.cluster_cidr, cfg.ip_masq))
        gw_port = self.ovsdb.ensure_internal_port(a.bridge, GATEWAY_IF)
        gw_ip, gw_mac = configure_gateway(GATEWAY_IF, pod_cidr, self.mtu,
                                          tx_offload=pod_tx_offload(cfg.encap, dptype))
        self.gateway = Gateway(gw_ip, gw_mac, gw_port, pod_cidr, a.node_ip or "")
        self.tun_ofport = (self.ovsdb.ensure_tunnel_port(a.bridge, TUNNEL_PORT, cfg.encap)
                           if cfg.encap != "none" else None)
        self.ovsdb.set_bridge_ids(a.bridge, {
            TABLES_KEY: ",".join(f"{n}={i}" for n, i in PIPELINE.ids.items()),
            "flowcni-node": a.node, "flowcni-pod-cidr": pod_cidr,
            "flowcni-encap": cfg.encap})
        self.flows = FlowSync(PIPELINE, lambda: self.ovsdb.bump_round(a.bridge))
        by_owner: dict[str, list[Flow]] = {}
        for f in node_flows(self.gateway, PIPELINE):
            by_owner.setdefault(f.owner, []).append(f)
        by_owner[GATEWAY_CT_OWNER] = gateway_reply_flows(self.gateway, PIPELINE)
        # The node-port SNAT's source ports: clear of the node's own (read now, in the
        # node's namespace) and of node ports (flows/nodeport.py SNAT_SPAN says why).
        if a.proxy == "flowcni":  # Cluster-policy node ports: SNAT after the DNAT, in OVS
            ephemeral = hostnet.read_ephemeral_range()
            self.snat_ports = snat_port_range(ephemeral, cfg.node_ports)
            if self.snat_ports is None:
                LOG.error("net.ipv4.ip_local_port_range %d-%d and node ports %d-%d leave "
                          "fewer than %d ports for the node-port SNAT: it takes any port, "
                          "and a reply to the node's own connection to a Service endpoint "
                          "can be taken for a node-port connection's", *ephemeral,
                          *cfg.node_ports, SNAT_MIN_PORTS)
            else:
                LOG.info("node-port SNAT source ports %d-%d", *self.snat_ports)
            by_owner[GATEWAY_SNAT_OWNER] = gateway_snat_flows(self.gateway.ip, PIPELINE,
                                                              self.snat_ports)
        self.flows.set_owners(by_owner)
        if self.tun_ofport is not None:
            self.flows.set_owner(TUNNEL_OWNER, tunnel_flows(self.tun_ofport, self.gateway,
                                                             PIPELINE))
        os.makedirs(a.state_dir, exist_ok=True)
        self.ipam = IPAM(pod_cidr, os.path.join(a.state_dir, "ipam.json"))
        self.tenants = Tenants(a.node, cfg.cluster_cidr, cfg.encap, a.state_dir, self.flows,
                               self.tun_ofport, self.gateway, self.ipam,
                               lister=self.store.objects if self.store else None)
        self.pods = PodManager(self.ovsdb, a.bridge, self.ipam, self.flows, self.gateway,
                               self.mtu, self.flows.synced.wait,
                               tx_offload=pod_tx_offload(cfg.encap, dptype),
                               records=(PodRecords(self.store, a.node)
                                        if isinstance(self.store, Store) else None),
                               tenants=self.tenants)
        self.tenants.pods = lambda: list(self.pods.attachments.values())
        if isinstance(self.store, Store):  # allocated VNIs recorded (datastore/tenantconv.py)
            self.tenants.vni_record = self.store
        self.pods.on_change = self.tenants.pods_changed
        self.pods.restore()
        self.peers = Peers(a.node, cfg, self.gateway, self.tun_ofport, self.flows)
        self.policy = PolicyEngine(a.node, PIPELINE)
        self.cluster_policy = ClusterPolicyEngine(a.node, PIPELINE)
        # vswitchd's unixctl: the datapath guard, and the stale UDP conntrack flushes of
        # removed Service endpoints
        self._vswitchd = Unixctl(a.vswitchd_ctl or vswitchd_target(a.ovsdb))
        self.dpguard = DatapathGuard(self._vswitchd) if a.datapath_guard == "on" else None
        self.services = self._service_proxy() if a.proxy == "flowcni" else None
        self._host_view: Any = None
        # node ports the default network's Services asked for that tenant Services hold
        # (Tenants.default_refused), as last applied to the default proxy's flows
        self._np_held: dict[tuple[str, int], str] = {}
        # healthCheckNodePort listeners (LoadBalancer + externalTrafficPolicy Local)
        self.health = HealthChecks() if self.services is not None else None
        if self.services is None:
            self._clear_host_proxy()
        self.applied_revision = 0
        # changes that failed even alone, by object (kind, namespace, name): cleared when
        # a later change of the object applies (Agent._on_changes)
        self.change_failures: dict[tuple[str, str, str], Failure] = {}
        # The store as last seen by the monitor thread: status() never reads the
        # store itself, so a locked or unreachable store cannot stall the agent
        # API (nor fail a liveness probe and get a healthy agent restarted).
        self._ds_revision: int | None = None
        self._ds_error: str | None = None
        self._ds_probe_since: float | None = None
        self._ds_last_read_s = 0.0
        self.heap = HeapTrimmer()  # before the initial list, which trims after itself
        if self.store:
            self._list_and_watch(self.store)
        else:
            hostnet.sync_routes(self.peers.routes() if cfg.encap != "none" else {})
        self.traceflow = LiveTrace(self.flows, self.pods, self.gateway, self.tun_ofport)
        self.rejecter = Rejecter(lambda: self.flows.switch)
        self._service_lb = PIPELINE.id("ServiceLB")
        self._syncq: queue.Queue[Any] = queue.Queue()
        self.cni = CNIServer(a.cni_socket, timed(self.dispatch, self._observe_request))
        self.api = APIServer(a.api_socket, AgentAPI(self), a.api_group)

    def _observe_request(self, command: str, seconds: float, ok: bool) -> None:
        if not command.startswith("_"):
            metrics.CNI_REQUESTS.labels(command, "ok" if ok else "error").observe(seconds)
        if command in ("ADD", "DEL", "GC"):
            self.heap.churned()

    # -- datastore -----------------------------------------------------------------

    def _list_and_watch(self, store: Datastore) -> None:
        """Initial lists, then a watch from the revision taken before them.

        Everything listed is in the desired flow set before the first sync, so
        a restarted agent never prunes flows of objects it has not seen yet.
        """
        # Every kind listed first: with a revision from before the API server's lists
        # completed, the first watch batch handed every pod listed after it to the
        # engines again (10,000 at the bench's size), right after the load.
        store.wait_synced()
        rev = store.revision()
        metrics.DATASTORE_RESYNCS.inc()
        with gc_paused():
            self._load(store, rev)
        if isinstance(store, Store):
            # this thread's connection and its page cache (up to 2 MB) would stay
            # for good; the next read from this thread, if any, opens a new one
            store.close()
        self.heap.trim_now()  # the initial list's intermediate objects (see heap.py)
        # What the initial load built lives as long as the agent: one collection
        # (the load's own cyclic garbage), then out of the cyclic collector's sight
        # for good. At 100k flows each full collection walked it all (100-350 ms,
        # collected=0): several during start-up, and then one now and then in the
        # middle of a change, the change path's tail. Objects made later are
        # collected as usual, and a frozen object is still freed when its last
        # reference goes (only a cycle among them would stay).
        gc.collect()
        gc.freeze()
        self.applied_revision = rev
        threading.Thread(target=store.watch, args=(rev, self._on_changes, self.stop_event),
                         name="store-watch", daemon=True).start()
        threading.Thread(target=refresh_neighbors, args=(self.peers, self.stop_event),
                         name="neigh-refresh", daemon=True).start()
        self._ds_revision = rev
        threading.Thread(target=self._datastore_monitor, args=(store,), name="store-health",
                         daemon=True).start()

    def _load(self, store: Datastore, rev: int) -> None:
        """Every engine's initial list, and their flows in the desired set.

        An object the engines cannot take (an engine bug, a body no parser
        expected) made the whole load raise, and the agent crash-looped on it.
        Now the lists are loaded again, into new engines, without the objects
        that fail (found as the watch finds a bad change, controller/isolate.py:
        each attempt a whole load of what passed so far plus a part); those are
        reported as failed changes at `rev` and applied when they change.
        """
        # each kind read once: one snapshot for every engine, and one decode of each row
        kinds = ["Node", "Namespace", "Pod", "NetworkPolicy", "Service", "EndpointSlice",
                 "TenantNetwork", *CLUSTER_POLICY_KINDS]
        objs = [Change(rev, "put", k, b.get("namespace") or "", b.get("name") or "", b)
                for k in kinds for b in store.objects(k)]
        base = self.flows.owner_keys()  # what was desired before any engine's load
        good: list[Change] = []
        tries = [0]

        def attempt(part: list[Change]) -> None:
            tries[0] += 1
            if tries[0] > 1:  # after a failed attempt: from scratch
                self._reset_engines(base)
            self._load_objects([*good, *part])
            good.extend(part)

        failed = apply_isolating(objs, attempt, lambda: True)
        if failed:
            if failed[-1][0] is objs[-1]:  # the last attempt failed half-way
                self._reset_engines(base)
                self._load_objects(good)
            self._record_failures(objs, failed)

    def _reset_engines(self, base: tuple[set[Any], set[str]]) -> None:
        """New policy, cluster policy and Service engines, and the flows and groups a
        failed load attempt set dropped (the rest of the agent is replaced by load)."""
        keys, gowners = self.flows.owner_keys()
        self.flows.set_owners({k: [] for k in keys - base[0]},
                              {o: [] for o in gowners - base[1]})
        self.policy = PolicyEngine(self.args.node, PIPELINE)
        self.cluster_policy = ClusterPolicyEngine(self.args.node, PIPELINE)
        if self.services is not None:
            self.services = self._service_proxy()
        self._np_held = {}

    def _service_proxy(self) -> ServiceProxy:
        # The node-port range is checked here only for the embedded store, whose
        # API side is flowctl; a Kubernetes API server has checked its own range.
        k8s = self.args.datastore == "kubernetes"
        return ServiceProxy(PIPELINE, slices=k8s, local_cidr=self.pod_cidr,
                            node_port_range=NODE_PORT_RANGE if k8s else self.cluster.node_ports)

    def _load_objects(self, objs: list[Change]) -> None:
        """The engines' initial load of these objects (puts, by kind)."""
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for c in objs:
            assert c.body is not None
            by_kind.setdefault(c.kind, []).append(c.body)
        nodes, namespaces = by_kind.get("Node", []), by_kind.get("Namespace", [])
        pods, policies = by_kind.get("Pod", []), by_kind.get("NetworkPolicy", [])
        services, slices = by_kind.get("Service", []), by_kind.get("EndpointSlice", [])
        cpolicies = {k: by_kind.get(k, []) for k in CLUSTER_POLICY_KINDS}
        self.peers.set_nodes(nodes)
        self.tenants.load(by_kind.get("TenantNetwork", []), namespaces, nodes, pods, policies,
                          services, slices, cpolicies)
        # pods, policies and Services of tenant namespaces are their tenant's
        # (controller/tenants.py): the default network's engines never see them
        def mine(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [o for o in objs if not self.tenants.in_tenant(o["namespace"])]

        default_pods = mine(pods)
        owners, problems = self.policy.load(namespaces, default_pods, mine(policies))
        for p in problems:
            LOG.error("skipping %s", p)
        self.flows.set_owners(owners)
        cowners, problems = self.cluster_policy.load(
            namespaces, default_pods, nodes, cpolicies)
        for p in problems:
            LOG.error("skipping %s", p)
        self.flows.set_owners(cowners)
        if self.services is not None:
            sflows, sgroups, problems = self.services.load(mine(services), default_pods,
                                                           mine(slices))
            for p in problems:
                LOG.error("skipping %s", p)
            self.flows.set_owners(sflows, sgroups)
            self._sync_host_proxy()
            # Services inside tenants: a proxy per tenant, built now, so that its group
            # ids keep clear of the default proxy's (controller/tenants.py)
            default_proxy = self.services
            self.tenants.enable_services(
                self.args.datastore == "kubernetes", lambda: default_proxy.gids,
                lambda: default_node_ports(default_proxy))
            held_f, held_g = self._node_ports_held({}, {})
            if held_f:
                self.flows.set_owners(held_f, held_g)
            self._sync_host_proxy()  # with the tenants' node ports
            self._sync_health()

    def _datastore_monitor(self, store: Datastore, period: float = 1.0) -> None:
        """Read the store's revision once a period, off every request path."""
        while not self.stop_event.is_set():
            t0 = self._ds_probe_since = time.monotonic()
            try:
                self._ds_revision = store.revision()
                self._ds_error = None
            except Exception as e:
                self._ds_error = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            self._ds_last_read_s = time.monotonic() - t0
            self._ds_probe_since = None
            self.stop_event.wait(period)

    def _node_ports_held(self, sflows: dict[str, list[Flow]], groups: dict[str, Any]
                         ) -> tuple[dict[str, list[Flow]], dict[str, Any]]:
        """The default proxy's flows by owner without those of node ports a tenant
        Service held first (Tenants.default_refused: refused and logged there), plus
        the owners of default Services whose refusal came or went since the last call
        (rebuilt from what the proxy built, so a port a tenant let go is served)."""
        assert self.services is not None
        refused = dict(self.tenants.default_refused)
        changed = {k for k in refused.keys() | self._np_held.keys()
                   if refused.get(k) != self._np_held.get(k)}
        self._np_held = refused
        if changed:
            sflows, groups = dict(sflows), dict(groups)
            for k, (key, _) in default_node_ports(self.services).items():
                o = service_owner(key)
                if k in changed and o not in sflows:
                    sflows[o], groups[o] = self.services.built.get(key, ([], []))
        if not refused:
            return sflows, groups
        return {o: [f for f in fl if not held_node_port(f, refused)]
                for o, fl in sflows.items()}, groups

    def _sync_host_proxy(self) -> None:
        """The node's side of node ports, external IPs and host-to-Service traffic
        (flows.nodeport): its nftables table and its routes to the gateway. A
        failure is logged; the OVS side stays programmed."""
        if self.services is None:
            return
        entries, ips = self.services.host_view()
        held = self.tenants.default_refused  # tenant Services' node ports, theirs first
        entries = [*(e for e in entries if e.ip or (e.protocol.upper(), e.port) not in held),
                   *self.tenants.host_entries()]
        view = (entries, [NODEPORT_VIP, *ips])
        if view == self._host_view:
            return
        try:
            hostnet.nft(hostnet.proxy_rules(entries, NODEPORT_VIP))
            hostnet.sync_proxy_routes(view[1], GATEWAY_IF)
            self._host_view = view
        except (HostNetError, NetlinkError, OSError) as e:
            LOG.error("service proxy: node rules or routes not applied: %s", e)

    def _sync_health(self) -> None:
        """Health-check listeners and their local endpoint counts (controller/healthcheck)."""
        if self.services is None or self.health is None:
            return
        for p in self.health.sync(self.services.health_checks()):
            LOG.error("service proxy: %s", p)

    def _clear_host_proxy(self) -> None:
        """kube-proxy mode: remove what an earlier run in flowcni mode left in the node
        (its node-port DNAT would shadow kube-proxy's rules)."""
        try:
            hostnet.nft(hostnet.proxy_rules([], NODEPORT_VIP))
            hostnet.nft("delete table ip flowcni-proxy\n")
            hostnet.sync_proxy_routes([], GATEWAY_IF)
        except (HostNetError, NetlinkError, OSError) as e:
            LOG.warning("service proxy: leftovers of flowcni mode not removed: %s", e)

    def datastore_health(self, stall: float = 1.0) -> dict[str, Any]:
        """Reachable unless the last read failed or took, or the current one takes,
        more than `stall` seconds (a healthy read takes milliseconds)."""
        if not self.store:
            return {"datastore_reachable": None, "datastore_error": None}
        since = self._ds_probe_since
        error = self._ds_error
        if error is None and since is not None and time.monotonic() - since > stall:
            error = f"no answer for {time.monotonic() - since:.1f}s"
        elif error is None and self._ds_last_read_s > stall:
            error = f"last read took {self._ds_last_read_s:.1f}s"
        return {"datastore_reachable": error is None, "datastore_error": error}

    def _on_changes(self, batch: list[Change]) -> None:
        """The watch's callback: every change that can be applied is, in order; one
        that fails even alone is logged, counted and shown in status (until a later
        change of the same object applies), never retried for ever in front of the
        rest (controller/isolate.py says why the split lives here)."""
        for c in batch:
            metrics.DATASTORE_EVENTS.labels(c.kind, c.op).inc()
        failed = apply_isolating(batch, self._apply_changes,
                                 lambda: not self.stop_event.wait(1.0))
        if self.stop_event.is_set():
            return  # what was not applied comes again from the next agent's list
        self._record_failures(batch, failed)
        self.applied_revision = batch[-1].rev

    def _record_failures(self, batch: list[Change],
                         failed: list[tuple[Change, BaseException]]) -> None:
        """Each object's last change in `batch` decides: failed, it is recorded (and
        logged once, with its traceback); applied, an earlier failure of it is cleared."""
        bad = {id(c): e for c, e in failed}
        for c in batch:
            k = key_of(c)
            e = bad.get(id(c))
            if e is None:
                if self.change_failures.pop(k, None) is not None:
                    LOG.info("%s %s/%s applied after an earlier failure", *k)
                continue
            f = Failure(c, e)
            metrics.DATASTORE_CHANGE_FAILURES.labels(c.kind).inc()
            LOG.error("datastore change not applied (skipped until the object changes "
                      "again): %s", f.describe(), exc_info=e)
            self.change_failures[k] = f  # last: whoever sees it sees it logged and counted

    def _apply_changes(self, batch: list[Change]) -> None:
        """Apply a batch to every engine and OVS; raises if any part fails (the caller
        may give the same changes again: each applier takes a change twice unharmed)."""
        t = time.perf_counter()
        self.peers.apply(batch)
        tenant_policy = self.tenants.apply(batch)
        default = [c for c in batch if c.kind not in TENANT_SCOPED
                   or not self.tenants.in_tenant(c.namespace)]
        owners, problems = self.policy.apply(default)
        cowners, cproblems = self.cluster_policy.apply(default)
        owners.update(cowners)
        problems += cproblems
        groups: dict[str, Any] = {}
        if self.services is not None:
            sflows, groups, sproblems = self.services.apply(default)
            if any(c.kind == "Service" for c in default):
                self.tenants.sync_node_ports()  # a node port a tenant Service holds?
            sflows, groups = self._node_ports_held(sflows, groups)
            owners.update(sflows)
            problems += sproblems
            if sflows or groups:
                self._sync_host_proxy()
                self._sync_health()
            elif any(c.kind in ("Service", "TenantNetwork", "Namespace") for c in batch):
                self._sync_host_proxy()  # a tenant Service's node ports (no-op if same)
        for p in problems:
            LOG.error("skipping %s", p)
        before = self.flows.flows_of(owners) if owners else []
        if owners or groups:
            self.flows.set_owners(owners, groups)
        if not self.flows.wait_installed(self.stop_event):
            return  # stopping: this batch never reached OVS
        if self.services is not None and self.services.stale:
            flush_stale(self._vswitchd, self.services.take_stale())
        for zone, entry in self.tenants.take_stale():
            flush_stale(self._vswitchd, [entry], zone, snat_zone=False)
        if owners or tenant_policy:
            # policy decides only new connections: only their cached flows can be wrong
            self.guard_datapath("policy", [*before, *(f for fl in owners.values() for f in fl),
                                           *tenant_policy], new_only=True)
            metrics.POLICY_REALIZATION.observe(time.perf_counter() - t)
        if len(batch) >= _TRIM_AFTER:
            self.heap.trim_now()

    def guard_datapath(self, trigger: str, changed: list[Flow] | None,
                       new_only: bool = False) -> CheckResult | None:
        """Make the datapath cache agree with the tables a change just installed.

        The hook for every feature whose flows decide verdicts (policy now;
        Services and tenant networks later): pass the flows replaced and
        installed, or None for every cached flow behind conntrack; new_only
        for a feature that decides only new connections. Runs before
        the change is reported realized, so "realized" covers the datapath
        too. A failing check is logged and never blocks the change.
        """
        if self.dpguard is None or not self.flows.synced.is_set():
            return None
        ips = None if changed is None else flow_addresses(changed)
        try:
            res = self.dpguard.check(ips, new_only=new_only)
        except UnixctlError as e:
            LOG.warning("datapath check (%s) failed: %s", trigger, e)
            return None
        except Exception:  # never let the check break the watch or the resync thread
            LOG.exception("datapath check (%s) failed", trigger)
            return None
        metrics.DATAPATH_CHECK.labels(trigger).observe(res.seconds)
        if res.stale:
            metrics.STALE_DATAPATH_FLOWS.labels(trigger).inc(len(res.stale))
            for st in res.stale:
                LOG.warning("stale datapath flow deleted (%s): %s", trigger, st.describe())
        return res

    def realized_revision(self) -> int:
        """The datastore revision OVS holds: 0 while changes wait for a full sync."""
        return 0 if self.flows.pending else self.applied_revision

    def _resync_loop(self) -> None:
        """Repair drift (flows added or deleted behind the agent's back) periodically."""
        while not self.stop_event.wait(self.args.resync_period):
            if not self.flows.synced.is_set():
                continue
            try:
                added, removed = self.flows.repair()
            except Exception:
                LOG.exception("drift check failed")
                continue
            if added or removed:
                LOG.warning("repaired drift: %d flows re-added, %d removed", added, removed)
                metrics.FLOW_REPAIRS.labels("missing").inc(added)
                metrics.FLOW_REPAIRS.labels("unexpected").inc(removed)
            self.guard_datapath("periodic", None)

    # -- OpenFlow connection -----------------------------------------------------

    def _sync_loop(self) -> None:
        """The one thread that performs full syncs; retries until one succeeds."""
        while True:
            sw = self._syncq.get()
            metrics.OF_RECONNECTS.inc()
            while sw.alive:
                try:
                    self.flows.full_sync(sw)
                    # Encoding and sending the whole table (100k FlowMods) left ~6 MB
                    # of freed heap resident in this thread's malloc arena.
                    self.heap.trim_now()
                    break
                except Exception:
                    LOG.exception("full sync failed; retrying")
                    time.sleep(1)

    def start(self) -> None:
        threading.Thread(target=self._sync_loop, name="sync", daemon=True).start()
        threading.Thread(target=self._resync_loop, name="resync", daemon=True).start()
        threading.Thread(target=self.heap.run, args=(self.stop_event,), name="heap-trim",
                         daemon=True).start()
        if self.args.metrics_address:
            metrics.serve(self.args.metrics_address, metrics.StateCollector(
                lambda: metrics.flows_per_table(self.flows.desired_flows()),
                lambda: self.flows.switch is not None,
                lambda: self.flows.stats["bundle_errors"],
                self.realized_revision, self._service_counts),
                metrics.TenantCollector(self.tenants.metric_rows),
                metrics.ClusterPolicyCollector(self.cluster_policy.per_tier))
        app = ofapp.start(self.args.of_socket, self.dpid)
        app.on_connect = self._syncq.put
        app.on_disconnect = self.flows.disconnected
        app.on_packet_in = self._packet_in
        if app.switch is not None:  # connected before the hooks were set
            self._syncq.put(app.switch)
        self.cni.start()
        self.api.start()
        LOG.info("agent for node %s up: bridge %s (%s), pod CIDR %s, gateway %s, encap %s, "
                 "pod MTU %d", self.args.node, self.args.bridge, self.datapath_type,
                 self.pod_cidr, self.gateway.ip, self.cluster.encap, self.mtu)

    def _service_counts(self) -> tuple[int, int, int]:
        groups = self.flows.desired_groups()
        n_svc = len(self.services.services) if self.services else 0
        return n_svc, sum(len(g.buckets) for g in groups), len(groups)

    def _packet_in(self, msg: Any) -> None:
        """Packet-ins: ServiceLB's (a Service without endpoints) get an answer; the
        rest are live traceflow's observation points."""
        if (msg.table_id == self._service_lb
                and ck.feature_of(msg.cookie) == ck.Feature.SERVICE):
            self.rejecter.packet_in(msg)
        else:
            self.traceflow.packet_in(msg)

    def stop(self) -> None:
        self.stop_event.set()
        if self.health is not None:
            self.health.stop()
        self.cni.stop()
        self.api.stop()
        if self.store:
            # The API server sees the watches end now, not when the process is gone.
            self.store.close(timeout=2.0)

    # -- requests ------------------------------------------------------------------

    def owner_names(self) -> dict[str, dict[str, str]]:
        """Owner id (as in cookies) -> owner key and the object it stands for."""
        pods = {f"pod:{a.key}": f"pod {a.namespace}/{a.name}"
                for a in self.pods.attachments.values()}
        crules = self.cluster_policy.rule_descriptions()
        out = {}
        for owner in self.flows.owners():
            obj = pods.get(owner)
            if obj is None:
                kind, _, rest = owner.partition(":")
                obj = {"node": "node", "gateway": "gateway", "tunnel": "tunnel port",
                       "conntrack": "conntrack",
                       GATEWAY_CT_OWNER: "connections from the gateway",
                       "tenants": "tenant networks (shared)"}.get(owner) or {
                    "node": f"remote node {rest}", "rule": f"policy rule {rest}",
                    "isolation": f"pod {rest} (isolated)",
                    "policy-match": "policy match (shared)",
                    "service": f"service {rest}",
                    "tenant": f"tenant network {rest}",
                    "cluster-rule": crules.get(owner, f"cluster policy {rest}"),
                    }.get(kind, owner)
            out[f"{ck.owner_id(owner):#x}"] = {"owner": owner, "object": obj}
        return out

    def status(self) -> dict[str, Any]:
        return {
            "node": self.args.node, "bridge": self.args.bridge,
            "datapath_type": self.datapath_type, "pod_cidr": self.pod_cidr,
            "node_ip": self.args.node_ip, "encap": self.cluster.encap, "mtu": self.mtu,
            "tunnel_ofport": self.tun_ofport,
            "remote_nodes": sorted(self.peers.nodes),
            "datastore": self.args.datastore,
            "datastore_revision": self._ds_revision,
            **self.datastore_health(),
            "applied_revision": self.realized_revision(),
            "gateway": {"ip": self.gateway.ip, "mac": self.gateway.mac,
                        "ofport": self.gateway.ofport},
            "connected": self.flows.switch is not None, "synced": self.flows.synced.is_set(),
            "round": self.flows.round, "pods": len(self.pods.attachments),
            "pod_keys_in_flight": self.pods.keys_in_flight(),
            "heap_trims": self.heap.trims,
            "flows": self.flows.flow_count(),
            "groups": len(self.flows.desired_groups()), "proxy": self.args.proxy,
            "tenants": len(self.tenants.nets),
            "uptime_s": time.time() - self.started,
            "flow_stats": dict(self.flows.stats),
            "change_failures": [
                {"kind": f.change.kind, "namespace": f.change.namespace,
                 "name": f.change.name, "op": f.change.op, "revision": f.change.rev,
                 "error": error_text(f.error)}
                for f in list(self.change_failures.values())],
        }

    def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("command")
        try:
            if cmd in ("ADD", "DEL", "CHECK"):
                for f in ("containerID", "ifname"):
                    if not isinstance(req.get(f), str) or not req[f]:
                        raise CNIFailure(spec.ERR_INVALID_ENV, f"request lacks {f}")
            if cmd == "ADD":
                result = self.pods.add(req)
                return {"ok": True, "result": result}
            if cmd == "DEL":
                self.pods.delete(req)
            elif cmd == "CHECK":
                self.pods.check(req)
            elif cmd == "GC":
                return {"ok": True, "removed": self.pods.gc(req)}
            elif cmd == "STATUS":
                if not self.flows.synced.is_set():
                    raise CNIFailure(spec.ERR_PLUGIN_NOT_AVAILABLE,
                                     "agent not connected to Open vSwitch yet")
            else:
                raise CNIFailure(spec.ERR_INVALID_ENV, f"unknown command {cmd!r}")
            return {"ok": True}
        except CNIFailure as e:
            LOG.warning("%s %s failed: %s", cmd, req.get("containerID", ""), e.msg)
            return {"ok": False, "code": e.code, "msg": spec.one_line(e.msg),
                    "details": spec.one_line(e.details)}
        except Exception as e:
            # The traceback goes to the agent's log; the runtime gets one line.
            LOG.exception("%s failed", cmd)
            return {"ok": False, "code": spec.ERR_IO_FAILURE,
                    "msg": spec.one_line(f"{cmd} failed: {type(e).__name__}: {e}"),
                    "details": "see the flowcni agent's log for the traceback"}


def main(argv: list[str] | None = None) -> int:
    cap_arenas()  # before any thread (controller/heap.py)
    a = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = threading.Event()
    agent: Agent | None = None

    def _stop(signum: int, frame: Any) -> None:
        if agent is None:
            # Still starting (waiting for OVS, the API server or this Node):
            # nothing to hand over, so leave now. The handler must exist from
            # the start: as a container's PID 1 (the DaemonSet execs the
            # agent) a signal without a handler is dropped, and the agent
            # would go on starting until the runtime's SIGKILL.
            LOG.info("signal %d while starting; exiting", signum)
            os._exit(0)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent = Agent(a)
    except (StoreError, HostNetError, OVSDBError, ValueError) as e:
        LOG.error("cannot start: %s", e)
        return 2
    agent.start()
    done.wait()
    agent.stop()
    LOG.info("agent stopped; flows stay in OVS")
    os._exit(0)  # os-ken's threads are not daemons and have no stop


if __name__ == "__main__":
    sys.exit(main())
