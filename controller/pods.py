"""Pod attachments: CNI ADD, DEL, CHECK and GC as the agent carries them out.

An ADD is a chain of steps (lease, veth, OVS port, flows); each step that
succeeded is undone if a later one fails, so a failed ADD leaves nothing
behind. The OVS port's external_ids carry the whole attachment, which is how
a restarted agent finds its pods again.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass
from typing import Any

from flowcni.cni import podif, spec
from flowcni.cni.ipam import IPAM, IPAMError
from flowcni.controller.flowsync import FlowSync
from flowcni.controller.keylocks import KeyLocks
from flowcni.controller.ofapp import OFError
from flowcni.controller.podrecords import LABELS_ARG, LabelError, PodRecords, parse_labels
from flowcni.controller.tenants import EGRESS_KEY, Placement, TenantRefused, Tenants
from flowcni.flows.model import Flow
from flowcni.flows.node import Gateway
from flowcni.flows.pod import LocalPod, pod_flows, pod_owner
from flowcni.flows.tables import Pipeline
from flowcni.flows.tenant import TenantNet, tenant_pod_flows
from flowcni.ovsdb.bridge import OVSDB, OVSDBError
from ovsdbapp.exceptions import TimeoutException

LOG = logging.getLogger(__name__)

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

# How long an ADD waits for the switch to be (back) in sync before answering 11.
READY_WAIT_S = 2.0


class CNIFailure(Exception):
    """A CNI request the agent refuses or could not carry out; ``code`` from cni/spec.py."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass(frozen=True)
class Attachment:
    """One pod interface on this node, as recorded in OVSDB."""

    key: str           # containerID/ifname
    container_id: str
    ifname: str
    netns: str
    namespace: str
    name: str
    ip: str
    mac: str
    host_if: str
    ofport: int
    # Added later: ports recorded by an older agent lack them (see from_external_ids).
    network: str = ""  # the CNI network name (conf "name"): GC is per network
    host_mac: str = ""
    default_route: bool = True
    # Tenant networks (controller/tenants.py): "" on the default network.
    tenant: str = ""
    tenant_vni: str = ""
    tenant_cidr: str = ""  # the tenant's slice on this node

    def external_ids(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("ofport")
        return {f"flowcni-{k.replace('_', '-')}": str(v) for k, v in d.items()}

    @classmethod
    def from_external_ids(cls, ids: dict[str, str], ofport: int) -> Attachment:
        kw: dict[str, Any] = {}
        for k, f in cls.__dataclass_fields__.items():
            if k == "ofport":
                continue
            ext = f"flowcni-{k.replace('_', '-')}"
            if f.default is MISSING:
                kw[k] = ids[ext]
            elif f.type in (bool, "bool"):
                kw[k] = ids.get(ext, str(f.default)) == "True"
            else:
                kw[k] = ids.get(ext, f.default)
        return cls(ofport=ofport, **kw)

    def local_pod(self) -> LocalPod:
        return LocalPod(self.key, self.ofport, self.ip, self.mac)

    def flows(self, gw: Gateway, pipeline: Pipeline) -> list[Flow]:
        """The pod's flows: the default network's, or its tenant's (id and VNI recorded
        with the port, so a restarted agent rebuilds them before it hears of tenants)."""
        if self.tenant:
            return tenant_pod_flows(self.local_pod(),
                                    TenantNet(self.tenant, int(self.tenant_vni), ()), pipeline)
        return pod_flows(self.local_pod(), gw, pipeline)


@dataclass(frozen=True)
class Wanted:
    """What the runtime asked of an ADD beyond the defaults (runtimeConfig, conf, CNI_ARGS)."""

    ip: str | None
    mac: str | None
    default_route: bool | None
    labels: dict[str, str] | None


class Laps:
    """Step timings of one request, for the log line that reports it."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.steps: list[tuple[str, float]] = []

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.steps.append((step, (now - self.t) * 1000))
        self.t = now

    def __str__(self) -> str:
        total = sum(ms for _, ms in self.steps)
        return f"{total:.1f} ms: " + ", ".join(f"{s} {ms:.1f}" for s, ms in self.steps)


def short_error(e: BaseException, limit: int = 200) -> str:
    """One line a person can read: ovsdbapp's errors carry the repr of every command."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def attachment_key(container_id: str, ifname: str) -> str:
    return f"{container_id}/{ifname}"


class PodManager:
    def __init__(self, ovsdb: OVSDB, bridge: str, ipam: IPAM, flows: FlowSync,
                 gateway: Gateway, mtu: int, ready: Callable[[float], bool],
                 tx_offload: bool = True, records: PodRecords | None = None,
                 tenants: Tenants | None = None) -> None:
        self.ovsdb, self.bridge, self.ipam, self.flows = ovsdb, bridge, ipam, flows
        self.gw, self.mtu, self._ready = gateway, mtu, ready
        self.tx_offload = tx_offload
        self.records = records  # embedded store only: the agent plays kubelet
        self.tenants = tenants
        self.prefixlen = ipaddress.ip_network(gateway.pod_cidr).prefixlen
        self._lock = threading.Lock()
        self._key_locks = KeyLocks()
        self.attachments: dict[str, Attachment] = {}
        self.on_change: Callable[[], None] = lambda: None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="teardown")
        # Background teardowns not finished yet; each removes itself when done.
        self._pending: set[Future[None]] = set()

    def keys_in_flight(self) -> int:
        """Attachments with a request (or a DEL's background teardown) in progress;
        0 on an idle node, since a key's lock lives only that long."""
        return len(self._key_locks)

    # -- start-up ----------------------------------------------------------------

    def restore(self) -> None:
        """Re-adopt the pods OVSDB knows; drop leases no port backs (ADDs cut short)."""
        found: dict[str, Attachment] = {}
        for p in self.ovsdb.ports(self.bridge):
            try:
                a = Attachment.from_external_ids(p.external_ids, p.ofport)
            except KeyError:
                continue
            if p.ofport <= 0 or not podif.exists(a.host_if):
                LOG.warning("port %s of %s/%s has no interface; removing", p.name,
                            a.namespace, a.name)
                self._teardown(a.key, a.host_if)
                continue
            found[a.key] = a
        rejected = self.ipam.restore({k: a.ip for k, a in found.items() if not a.tenant})
        if self.tenants is not None:
            by_tenant: dict[tuple[str, str], dict[str, str]] = {}
            for k, a in found.items():
                if a.tenant:
                    by_tenant.setdefault((a.tenant, a.tenant_cidr), {})[k] = a.ip
            rejected += self.tenants.restore(by_tenant)
        for k in rejected:
            LOG.error("lease conflict for %s; its port keeps running without a lease", k)
        keep = {k for k, a in found.items() if not a.tenant} | {
            k for k in self.ipam.leases() if k.startswith(EGRESS_KEY)}
        stale = set(self.ipam.leases()) - keep
        for k in stale:
            LOG.warning("releasing lease %s: no port carries it", k)
        self.ipam.gc(keep)
        self.attachments = found
        for a in found.values():
            self.flows.set_owner(pod_owner(a.key), a.flows(self.gw, self.flows.pipeline))

    # -- CNI commands --------------------------------------------------------------

    def result(self, a: Attachment) -> dict[str, Any]:
        """The ADD result: host veth end first (bandwidth and other chained plugins
        look for it), then the pod's interface, which the address belongs to."""
        host: dict[str, Any] = {"name": a.host_if}
        if a.host_mac:
            host["mac"] = a.host_mac
        plen, gw = self.prefixlen, self.gw.ip
        if a.tenant:
            net = ipaddress.ip_network(a.tenant_cidr)
            plen, gw = net.prefixlen, str(net.network_address + 1)
        return {
            "interfaces": [host, {"name": a.ifname, "mac": a.mac, "sandbox": a.netns}],
            "ips": [{"address": f"{a.ip}/{plen}", "gateway": gw, "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": gw}] if a.default_route else [],
            "dns": {},
        }

    def wanted(self, req: dict[str, Any]) -> Wanted:
        """Validate what the runtime asked for, before anything is created."""
        conf = req.get("config") or {}
        rc = conf.get("runtimeConfig") or {}
        ip: str | None = None
        ips = rc.get("ips") or []
        if len(ips) > 1:
            raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG,
                             f"runtimeConfig.ips: flowcni gives a pod one IPv4 address, "
                             f"{len(ips)} were asked for ({', '.join(map(str, ips))})")
        if ips:
            addr, _, plen = str(ips[0]).partition("/")
            if plen and plen != str(self.prefixlen):
                raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG,
                                 f"runtimeConfig.ips: {ips[0]} has prefix /{plen}; this "
                                 f"node's pod network is {self.gw.pod_cidr}")
            ip = addr
        mac = rc.get("mac")
        if mac is not None:
            mac = str(mac).lower()
            if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
                raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG,
                                 f"runtimeConfig.mac: {rc.get('mac')!r} is not a unicast "
                                 "Ethernet address (xx:xx:xx:xx:xx:xx)")
        route = conf.get("defaultRoute")
        labels = None
        args = req.get("args") or {}
        if LABELS_ARG in args:
            try:
                labels = parse_labels(str(args[LABELS_ARG]))
            except LabelError as e:
                raise CNIFailure(spec.ERR_INVALID_ENV, str(e)) from e
        return Wanted(ip, mac, route if isinstance(route, bool) else None, labels)

    def add(self, req: dict[str, Any]) -> dict[str, Any]:
        cid, ifname, netns = req["containerID"], req["ifname"], req["netns"]
        args = req.get("args") or {}
        conf = req.get("config") or {}
        key = attachment_key(cid, ifname)
        network = str(conf.get("name") or "")
        want = self.wanted(req)
        try:
            podif.check_netns(netns)
        except podif.PodIfError as e:
            raise CNIFailure(e.code, str(e)) from e
        # Fail fast while the switch is away: the runtime retries, and a request
        # parked here would only hold the runtime's sandbox set-up.
        if not self._ready(READY_WAIT_S):
            raise CNIFailure(spec.ERR_TRY_AGAIN_LATER, "Open vSwitch is not connected to the "
                             "agent (ovs-vswitchd down or restarting); try again later")
        mtu = int(conf.get("mtu") or self.mtu)
        with self._key_locks.held(key):
            if key in self.attachments:
                return self.result(self._repeat(self.attachments[key], netns, want))
            host = podif.host_ifname(cid, ifname)
            ns = args.get("K8S_POD_NAMESPACE") or "default"
            name = args.get("K8S_POD_NAME") or cid[:12]
            named = bool(args.get("K8S_POD_NAMESPACE") and args.get("K8S_POD_NAME"))
            default_route = (want.default_route if want.default_route is not None
                             else not podif.has_default_route(netns))
            undo: list[Callable[[], Any]] = []
            lap = Laps()
            place = self._placement(ns)
            ipam = place.ipam if place else self.ipam
            plen = (ipaddress.ip_network(place.cidr).prefixlen if place else self.prefixlen)
            try:
                meta = {"namespace": ns, "name": name, "network": network}
                if place:
                    meta["tenant"] = place.net.name
                try:
                    ip = str(ipam.allocate_exact(key, want.ip, meta) if want.ip
                             else ipam.allocate(key, meta))
                except IPAMError as e:
                    raise CNIFailure(e.code, e.msg) from e
                undo.append(lambda: ipam.release(key))
                lap("ipam")
                try:
                    pif = podif.create(cid, netns, ifname, ip, plen,
                                       place.gateway if place else self.gw.ip, mtu,
                                       self.tx_offload, default_route, want.mac)
                except podif.PodIfError as e:
                    raise CNIFailure(e.code, str(e)) from e
                except Exception as e:
                    raise CNIFailure(spec.ERR_IO_FAILURE,
                                     f"creating the interface {ifname} in {netns}: {e}") from e
                undo.append(lambda: podif.delete(host))
                lap("veth")
                a = Attachment(key, cid, ifname, netns, ns, name, ip, pif.mac, host, 0,
                               network, pif.host_mac, default_route,
                               *((place.net.name, str(place.net.vni), place.cidr) if place
                                 else ()))
                try:
                    ofport = self.ovsdb.add_port(self.bridge, host, a.external_ids())
                except Exception as e:
                    if isinstance(e, TimeoutException) or not self.flows.synced.is_set():
                        # ovs-vswitchd did not apply the port (gone, frozen, restarting)
                        raise CNIFailure(spec.ERR_TRY_AGAIN_LATER,
                                         f"adding OVS port {host}: Open vSwitch "
                                         "is not connected; try again later") from e
                    raise CNIFailure(spec.ERR_IO_FAILURE,
                                     f"adding OVS port {host}: {short_error(e)}") from e
                finally:
                    undo.append(lambda: self.ovsdb.del_port(host))
                a = Attachment(**{**asdict(a), "ofport": ofport})
                lap("ovsdb")
                try:
                    self.flows.set_owner(pod_owner(key), a.flows(self.gw, self.flows.pipeline))
                except (OFError, ValueError) as e:
                    raise CNIFailure(spec.ERR_IO_FAILURE,
                                     f"installing flows for {ns}/{name}: {e}") from e
                undo.append(lambda: self.flows.remove_owner(pod_owner(key)))
                lap("flows")
                if self.records is not None and named:
                    try:
                        self.records.attached(ns, name, ip, cid, want.labels)
                    except Exception as e:
                        raise CNIFailure(spec.ERR_TRY_AGAIN_LATER,
                                         f"recording pod {ns}/{name} in the datastore: {e}"
                                         ) from e
                    lap("datastore")
            except Exception:
                for step in reversed(undo):
                    try:
                        step()
                    except Exception:
                        LOG.exception("undo of a failed ADD for %s failed", key)
                raise
            self.attachments[key] = a
        LOG.info("ADD %s/%s %s -> %s port %d (%s)", ns, name, key, ip, ofport, lap)
        self.on_change()
        return self.result(a)

    def _placement(self, namespace: str) -> Placement | None:
        """The tenant network a new pod of `namespace` joins (None: the default one)."""
        if self.tenants is None:
            return None
        try:
            return self.tenants.placement(namespace)
        except TenantRefused as e:
            raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG, str(e)) from e

    def _repeat(self, a: Attachment, netns: str, want: Wanted) -> Attachment:
        """A repeated ADD: the same attachment again, or an error if it asks for another."""
        if not podif.same_netns(a.netns, netns):
            raise CNIFailure(spec.ERR_INVALID_ENV,
                             f"container {a.container_id} interface {a.ifname} is already "
                             f"attached in netns {a.netns}; CNI_NETNS {netns} is another one")
        if want.ip and want.ip != a.ip:
            raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG,
                             f"runtimeConfig.ips: {a.key} already has {a.ip}, not {want.ip}")
        if want.mac and want.mac != a.mac.lower():
            raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG,
                             f"runtimeConfig.mac: {a.key} already has {a.mac}, not {want.mac}")
        return a

    def _teardown(self, key: str, host: str,
                  release: Callable[[], None] | None = None) -> Laps:
        """Flows and OVS port now; the veth and the lease in the background.

        Deleting a veth is the kernel's slowest step (20-30 ms here) and
        nothing the runtime does next depends on it, so DEL answers once the
        pod is cut off from the pipeline. The key's lock, if given, is held
        until the background part is done, so an ADD for the same container
        waits for it instead of finding a half-deleted interface (`release`
        gives it back).
        """
        lap = Laps()
        try:
            self.flows.remove_owner(pod_owner(key))
        except OFError:
            LOG.warning("flows of %s not removed now; the next sync removes them", key)
        lap("flows")
        try:
            self.ovsdb.del_port(host, wait=False)
        except OVSDBError:
            LOG.exception("removing port %s", host)
        lap("ovsdb")

        def finish() -> None:
            try:
                podif.delete(host)
                self.ipam.release(key)
                if self.tenants is not None:
                    self.tenants.release(key)
            except Exception:
                LOG.exception("finishing teardown of %s", key)
            finally:
                if release is not None:
                    release()

        fut = self._pool.submit(finish)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._finished)
        return lap

    def _finished(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def drain(self) -> None:
        """Wait for background teardowns (tests and shutdown)."""
        while True:
            with self._lock:
                fut = next(iter(self._pending), None)
            if fut is None:
                return
            fut.result()
            self._finished(fut)

    def delete(self, req: dict[str, Any]) -> None:
        """Idempotent: an unknown container or a missing netns is a success."""
        cid, ifname = req["containerID"], req["ifname"]
        key = attachment_key(cid, ifname)
        args = req.get("args") or {}
        self._key_locks.acquire(key)
        try:
            a = self.attachments.get(key)
            ns, name = ((a.namespace, a.name) if a else
                        (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")))
            if self.records is not None and ns and name:
                # First: a record left behind would give its IP's next owner this
                # pod's labels. Failing here leaves everything for the retry.
                try:
                    self.records.detached(ns, name, cid)
                except Exception as e:
                    raise CNIFailure(spec.ERR_TRY_AGAIN_LATER,
                                     f"removing pod {ns}/{name} from the datastore: {e}") from e
            self.attachments.pop(key, None)
            host = a.host_if if a else podif.host_ifname(cid, ifname)
            # The key stays locked until the background part is done.
            lap = self._teardown(key, host, lambda: self._key_locks.release(key))
        except BaseException:
            self._key_locks.release(key)
            raise
        LOG.info("DEL %s (%s)", key, lap)
        self.on_change()

    def check(self, req: dict[str, Any]) -> None:
        key = attachment_key(req["containerID"], req["ifname"])
        try:
            podif.check_netns(req["netns"])
        except podif.PodIfError as e:
            raise CNIFailure(e.code, str(e)) from e
        a = self.attachments.get(key)
        if a is None:
            raise CNIFailure(spec.ERR_UNKNOWN_CONTAINER,
                             f"container {req['containerID']} ({req['ifname']}) unknown "
                             "to this node's agent")
        problem = podif.check(req["netns"], a.ifname, a.ip)
        if problem:
            raise CNIFailure(spec.ERR_IO_FAILURE, problem)

    def gc(self, req: dict[str, Any]) -> list[str]:
        """Remove this network's attachments (and leases) not in cni.dev/valid-attachments.

        libcni calls GC once per network with that network's valid list, so an
        attachment of another network (another conflist using flowcni on this
        node) is not this call's to judge. Attachments recorded before the
        network name was (network "") are judged by every GC, as they were.
        """
        conf = req.get("config", {})
        valid_list = conf.get(spec.VALID_ATTACHMENTS_KEY)
        if not isinstance(valid_list, list):
            raise CNIFailure(spec.ERR_INVALID_NETWORK_CONFIG,
                             f"GC needs {spec.VALID_ATTACHMENTS_KEY} (a list)")
        network = str(conf.get("name") or "")
        valid = {attachment_key(v.get("containerID", ""), v.get("ifname", ""))
                 for v in valid_list if isinstance(v, dict)}
        removed = []
        for key in list(self.attachments):
            a = self.attachments[key]
            if key not in valid and a.network in (network, ""):
                self.delete({"containerID": a.container_id, "ifname": a.ifname})
                removed.append(key)
        self.drain()
        removed += self.ipam.gc(valid | set(self.attachments),
                                lambda meta: meta.get("network", "") in (network, ""))
        if self.tenants is not None:
            removed += self.tenants.gc(valid | set(self.attachments),
                                       lambda meta: meta.get("network", "") in (network, ""))
        return removed
