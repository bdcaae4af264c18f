"""Pod attachments: CNI ADD, DEL, CHECK and GC as the agent carries them out.

An ADD is a chain of steps (lease, veth, OVS port, flows); each step that
succeeded is undone if a later one fails, so a failed ADD leaves nothing
behind. The OVS port's external_ids carry the whole attachment, which is how
a restarted agent finds its pods again.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from flowcni.cni import podif
from flowcni.cni.ipam import IPAM, IPAMError
from flowcni.controller.flowsync import FlowSync
from flowcni.controller.keylocks import KeyLocks
from flowcni.controller.ofapp import OFError
from flowcni.flows.node import Gateway
from flowcni.flows.pod import LocalPod, pod_flows, pod_owner
from flowcni.ovsdb.bridge import OVSDB, OVSDBError
from ovsdbapp.exceptions import TimeoutException

LOG = logging.getLogger(__name__)

# CNI error codes used here (the plugin's spec module has the full list).
E_ENV = 4
E_IO = 5
E_CONFIG = 7
E_TRY_AGAIN = 11

# How long an ADD waits for the switch to be (back) in sync before answering 11.
READY_WAIT_S = 2.0


class CNIFailure(Exception):
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

    def external_ids(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("ofport")
        return {f"flowcni-{k.replace('_', '-')}": str(v) for k, v in d.items()}

    @classmethod
    def from_external_ids(cls, ids: dict[str, str], ofport: int) -> Attachment:
        kw = {k: ids[f"flowcni-{k.replace('_', '-')}"] for k in cls.__dataclass_fields__
              if k != "ofport"}
        return cls(ofport=ofport, **kw)

    def local_pod(self) -> LocalPod:
        return LocalPod(self.key, self.ofport, self.ip, self.mac)


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
                 tx_offload: bool = True) -> None:
        self.ovsdb, self.bridge, self.ipam, self.flows = ovsdb, bridge, ipam, flows
        self.gw, self.mtu, self._ready = gateway, mtu, ready
        self.tx_offload = tx_offload
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
        rejected = self.ipam.restore({k: a.ip for k, a in found.items()})
        for k in rejected:
            LOG.error("lease conflict for %s; its port keeps running without a lease", k)
        stale = set(self.ipam.leases()) - set(found)
        for k in stale:
            LOG.warning("releasing lease %s: no port carries it", k)
        self.ipam.gc(set(found))
        self.attachments = found
        for a in found.values():
            self.flows.set_owner(pod_owner(a.key), pod_flows(a.local_pod(), self.gw,
                                                             self.flows.pipeline))

    # -- CNI commands --------------------------------------------------------------

    def result(self, a: Attachment) -> dict[str, Any]:
        return {
            "interfaces": [{"name": a.ifname, "mac": a.mac, "sandbox": a.netns}],
            "ips": [{"address": f"{a.ip}/{self.prefixlen}", "gateway": self.gw.ip,
                     "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": self.gw.ip}],
            "dns": {},
        }

    def add(self, req: dict[str, Any]) -> dict[str, Any]:
        cid, ifname, netns = req["containerID"], req["ifname"], req["netns"]
        args = req.get("args") or {}
        key = attachment_key(cid, ifname)
        # Fail fast while the switch is away: the runtime retries, and a request
        # parked here would only hold the runtime's sandbox set-up.
        if not self._ready(READY_WAIT_S):
            raise CNIFailure(E_TRY_AGAIN, "Open vSwitch is not connected to the agent "
                             "(ovs-vswitchd down or restarting); try again later")
        mtu = int(req.get("config", {}).get("mtu") or self.mtu)
        with self._key_locks.held(key):
            if key in self.attachments:
                return self.result(self.attachments[key])
            host = podif.host_ifname(cid, ifname)
            ns = args.get("K8S_POD_NAMESPACE") or "default"
            name = args.get("K8S_POD_NAME") or cid[:12]
            undo: list[Callable[[], Any]] = []
            lap = Laps()
            try:
                try:
                    ip = str(self.ipam.allocate(key, {"namespace": ns, "name": name}))
                except IPAMError as e:
                    raise CNIFailure(e.code, e.msg) from e
                undo.append(lambda: self.ipam.release(key))
                lap("ipam")
                try:
                    pif = podif.create(cid, netns, ifname, ip, self.prefixlen, self.gw.ip, mtu,
                                       self.tx_offload)
                except podif.PodIfError as e:
                    raise CNIFailure(e.code, str(e)) from e
                undo.append(lambda: podif.delete(host))
                lap("veth")
                a = Attachment(key, cid, ifname, netns, ns, name, ip, pif.mac, host, 0)
                try:
                    ofport = self.ovsdb.add_port(self.bridge, host, a.external_ids())
                except Exception as e:
                    if isinstance(e, TimeoutException) or not self.flows.synced.is_set():
                        # ovs-vswitchd did not apply the port (gone, frozen, restarting)
                        raise CNIFailure(E_TRY_AGAIN, f"adding OVS port {host}: Open vSwitch "
                                         "is not connected; try again later") from e
                    raise CNIFailure(E_IO, f"adding OVS port {host}: {short_error(e)}") from e
                finally:
                    undo.append(lambda: self.ovsdb.del_port(host))
                a = Attachment(**{**asdict(a), "ofport": ofport})
                lap("ovsdb")
                try:
                    self.flows.set_owner(pod_owner(key), pod_flows(
                        a.local_pod(), self.gw, self.flows.pipeline))
                except (OFError, ValueError) as e:
                    raise CNIFailure(E_IO, f"installing flows for {ns}/{name}: {e}") from e
                undo.append(lambda: self.flows.remove_owner(pod_owner(key)))
                lap("flows")
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
        self._key_locks.acquire(key)
        try:
            a = self.attachments.pop(key, None)
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
        a = self.attachments.get(key)
        if a is None:
            raise CNIFailure(3, f"container {req['containerID']} ({req['ifname']}) unknown "
                                "to this node's agent")
        problem = podif.check(req["netns"], a.ifname, a.ip)
        if problem:
            raise CNIFailure(E_IO, problem)

    def gc(self, req: dict[str, Any]) -> list[str]:
        """Remove every attachment (and lease) not in cni.dev/valid-attachments."""
        valid_list = req.get("config", {}).get("cni.dev/valid-attachments")
        if not isinstance(valid_list, list):
            raise CNIFailure(E_CONFIG, "GC needs cni.dev/valid-attachments (a list)")
        valid = {attachment_key(v.get("containerID", ""), v.get("ifname", ""))
                 for v in valid_list if isinstance(v, dict)}
        removed = []
        for key in list(self.attachments):
            if key not in valid:
                a = self.attachments[key]
                self.delete({"containerID": a.container_id, "ifname": a.ifname})
                removed.append(key)
        self.drain()
        removed += self.ipam.gc(valid | set(self.attachments))
        return removed
