"""Host-local style IPAM for one node's pod CIDR, run inside the node agent.

The agent owns the node's pod CIDR, so address management lives in the agent
process rather than in a per-invocation CNI binary: one lock is enough to make
concurrent CNI ADDs safe, with no file locking between short-lived processes.

Layout of a pod CIDR (``10.244.1.0/24`` as the example)::

    10.244.1.0      network address      never handed out
    10.244.1.1      gateway (first host) never handed out, owned by the node
    10.244.1.2 ..   pod pool             handed out round-robin
    10.244.1.255    broadcast address    never handed out

Addresses are handed out round-robin (the next free address after the last one
allocated, wrapping around) so that a just-freed address is not reused at once:
a new pod on an old address would otherwise inherit stale ARP entries in peers
and stale conntrack state for flows of the deleted pod.

State is kept in memory and, when a checkpoint path is given, written to a JSON
checkpoint after every change::

    {"version": 1, "cidr": "10.244.1.0/24", "last": "10.244.1.7",
     "leases": {"<containerID>/<ifname>": {"ip": "10.244.1.7", "meta": {...}}}}
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flowcni.cni import spec

__all__ = [
    "CHECKPOINT_VERSION",
    "EXHAUSTED_CODE",
    "IO_FAILURE_CODE",
    "IPAM",
    "IPAMError",
    "Lease",
    "first_host",
]

#: CNI error code for "pod CIDR exhausted" (flowcni's own, see cni/spec.py);
#: code 11 ("try again later") would be wrong because retrying does not help
#: until a pod on this node is deleted.
EXHAUSTED_CODE = spec.ERR_IP_EXHAUSTED

#: CNI well-known error code 5, "I/O failure": the checkpoint could not be written.
IO_FAILURE_CODE = spec.ERR_IO_FAILURE

CHECKPOINT_VERSION = 1

#: A lease as returned by :meth:`IPAM.leases`: the address and the caller's metadata.
Lease = tuple[IPv4Address, dict[str, Any]]


class IPAMError(Exception):
    """An allocation failure to be reported to the runtime as a CNI error.

    ``code`` is the CNI error code the plugin puts in its error result, so the
    agent can pass it through without mapping exception types itself.
    """

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _parse_pod_cidr(cidr: str) -> IPv4Network:
    """Parse and validate a pod CIDR.

    Strict parsing (host bits must be zero) catches a node IP pasted where the
    CIDR belongs. /31 and /32 are refused: a pod CIDR needs room for the network
    address, the gateway, at least one pod and the broadcast address.
    """
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid pod CIDR {cidr!r}: {exc}") from exc
    if not isinstance(net, IPv4Network):
        raise ValueError(f"pod CIDR {cidr} is not IPv4; only IPv4 is supported")
    if net.prefixlen > 30:
        raise ValueError(
            f"pod CIDR {cidr} is too small: it needs at least a gateway plus one pod address "
            "(use /30 or larger)"
        )
    return net


def first_host(cidr: str) -> IPv4Address:
    """Return the first host address of ``cidr``, which flowcni uses as the pod gateway.

    Deriving the gateway from the CIDR (instead of configuring it) keeps the agent,
    the flow tables and the CNI result in agreement without another setting.
    """
    return _parse_pod_cidr(cidr).network_address + 1


def _pool_bounds(net: IPv4Network) -> tuple[int, int]:
    """Return the first and last assignable pod address of ``net`` as integers.

    The pool excludes the network address, the gateway and the broadcast address.
    """
    return int(net.network_address) + 2, int(net.broadcast_address) - 1


def _next_free(used: Container[int], first: int, last: int, after: int) -> int | None:
    """Return the first address in ``[first, last]`` not in ``used``, scanning from ``after + 1``.

    The scan wraps around to ``first`` and ends at ``after`` itself, so a freed
    address comes back only once every other free address has been tried.
    ``after`` may lie outside the pool (the gateway, before any allocation); the
    scan then starts at ``first``. Returns ``None`` when the pool is full.
    """
    size = last - first + 1
    start = after + 1 if first <= after < last else first
    for i in range(size):
        candidate = first + (start - first + i) % size
        if candidate not in used:
            return candidate
    return None


def _corrupt(path: str, reason: str) -> ValueError:
    return ValueError(f"corrupt IPAM checkpoint {path}: {reason}")


def _parse_checkpoint(data: object, net: IPv4Network, path: str) -> tuple[dict[str, Lease], int]:
    """Validate a decoded checkpoint and return its leases and ``last`` address.

    Everything is checked before anything is used: a lease outside the pool or
    two leases on one address would otherwise lead to handing out a duplicate IP.
    Raises ValueError naming ``path`` (and both CIDRs when they differ).
    """
    if not isinstance(data, dict):
        raise _corrupt(path, "top level is not a JSON object")
    if data.get("version") != CHECKPOINT_VERSION:
        raise _corrupt(path, f"unsupported version {data.get('version')!r}")
    try:
        their_net = ipaddress.ip_network(str(data.get("cidr")), strict=True)
    except ValueError as exc:
        raise _corrupt(path, f"invalid cidr {data.get('cidr')!r}") from exc
    if their_net != net:
        raise ValueError(
            f"IPAM checkpoint {path} is for CIDR {their_net}, but the pod CIDR is {net}; "
            "remove the checkpoint if the node's pod CIDR really changed"
        )
    try:
        last = IPv4Address(str(data.get("last")))
    except ValueError as exc:
        raise _corrupt(path, f"invalid last address {data.get('last')!r}") from exc
    if last not in net:
        raise _corrupt(path, f"last address {last} is outside {net}")

    raw_leases = data.get("leases")
    if not isinstance(raw_leases, dict):
        raise _corrupt(path, "leases is not a JSON object")
    first, pool_last = _pool_bounds(net)
    leases: dict[str, Lease] = {}
    owners: dict[int, str] = {}
    for key, entry in raw_leases.items():
        if not key or not isinstance(entry, dict):
            raise _corrupt(path, f"malformed lease {key!r}")
        meta = entry.get("meta", {})
        if not isinstance(meta, dict):
            raise _corrupt(path, f"lease {key!r} has non-object meta")
        try:
            addr = IPv4Address(str(entry.get("ip")))
        except ValueError as exc:
            raise _corrupt(path, f"lease {key!r} has invalid ip {entry.get('ip')!r}") from exc
        if not first <= int(addr) <= pool_last:
            raise _corrupt(path, f"lease {key!r} address {addr} is not assignable in {net}")
        if int(addr) in owners:
            raise _corrupt(path, f"address {addr} leased to both {owners[int(addr)]!r} and {key!r}")
        owners[int(addr)] = key
        leases[key] = (addr, meta)
    return leases, int(last)


class IPAM:
    """Round-robin address allocator for one pod CIDR with an optional JSON checkpoint.

    Every public method takes the same lock, so the agent may serve CNI requests
    from several threads. A change that cannot be written to the checkpoint is
    rolled back in memory, so memory and disk never disagree about a lease the
    runtime was told about.
    """

    def __init__(self, cidr: str, checkpoint: str | None) -> None:
        """Create the allocator, loading ``checkpoint`` if the file exists.

        ``checkpoint=None`` keeps state in memory only (tests, dry runs). A
        checkpoint that cannot be parsed, or that belongs to another CIDR, raises
        ValueError rather than being silently discarded: dropping it would hand out
        addresses that running pods still use. The agent may then rebuild from the
        IPs it records in OVSDB via :meth:`restore`.
        """
        self._net = _parse_pod_cidr(cidr)
        self._gateway = self._net.network_address + 1
        self._first, self._last_pool = _pool_bounds(self._net)
        self._path = checkpoint
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._by_ip: dict[int, str] = {}
        self._last = int(self._gateway)
        if checkpoint is not None and os.path.exists(checkpoint):
            self._load(checkpoint)

    # -- read-only properties ------------------------------------------------

    @property
    def cidr(self) -> IPv4Network:
        """The pod CIDR this allocator manages."""
        return self._net

    @property
    def gateway(self) -> IPv4Address:
        """The gateway address (first host of the CIDR); never handed to a pod."""
        return self._gateway

    @property
    def capacity(self) -> int:
        """How many pod addresses the CIDR offers (hosts minus the gateway)."""
        return self._last_pool - self._first + 1

    # -- public API ----------------------------------------------------------

    def allocate(self, key: str, meta: Mapping[str, Any] | None = None) -> IPv4Address:
        """Lease an address to ``key`` ("containerID/ifname") and return it.

        Idempotent: if ``key`` already holds a lease its address is returned and
        ``meta`` is ignored, because the runtime may repeat an ADD after a timeout
        and the pod must keep the address it may already be using. ``meta`` must
        be JSON-serialisable; it is stored with the lease for debugging and GC.

        Raises IPAMError(EXHAUSTED_CODE) when the pool is full and
        IPAMError(IO_FAILURE_CODE) when the checkpoint cannot be written; in both
        cases no lease is created.
        """
        if not key:
            raise ValueError("IPAM key must be a non-empty 'containerID/ifname' string")
        with self._lock:
            existing = self._leases.get(key)
            if existing is not None:
                return existing[0]
            found = _next_free(self._by_ip, self._first, self._last_pool, self._last)
            if found is None:
                raise IPAMError(
                    EXHAUSTED_CODE,
                    f"IP range {self._net} exhausted ({len(self._by_ip)} addresses in use)",
                )
            addr = IPv4Address(found)
            with self._change():
                self._add(key, addr, dict(meta or {}))
                self._last = found
            return addr

    def allocate_exact(self, key: str, ip: str, meta: Mapping[str, Any] | None = None
                       ) -> IPv4Address:
        """Lease the address a runtime asked for (runtimeConfig ``ips``) to ``key``.

        The pod gets exactly that address or an error (code 7) saying why not:
        outside the node's pool (the network, gateway and broadcast addresses
        included), or held by another key. Asking again for the address the key
        already holds returns it; asking for a different one is an error, since
        the pod may already use the first.
        """
        try:
            addr = IPv4Address(ip)
        except ValueError:
            raise IPAMError(spec.ERR_INVALID_NETWORK_CONFIG,
                            f"runtimeConfig.ips: {ip!r} is not an IPv4 address") from None
        if not self._first <= int(addr) <= self._last_pool:
            raise IPAMError(spec.ERR_INVALID_NETWORK_CONFIG,
                            f"runtimeConfig.ips: {addr} is not assignable on this node "
                            f"(pod range {IPv4Address(self._first)}-"
                            f"{IPv4Address(self._last_pool)} of {self._net})")
        with self._lock:
            existing = self._leases.get(key)
            if existing is not None:
                if existing[0] != addr:
                    raise IPAMError(spec.ERR_INVALID_NETWORK_CONFIG,
                                    f"runtimeConfig.ips: {key} already holds {existing[0]}, "
                                    f"not {addr}")
                return addr
            owner = self._by_ip.get(int(addr))
            if owner is not None:
                raise IPAMError(spec.ERR_INVALID_NETWORK_CONFIG,
                                f"runtimeConfig.ips: {addr} is already in use on this node")
            with self._change():
                self._add(key, addr, dict(meta or {}))
            return addr

    def release(self, key: str) -> IPv4Address | None:
        """Free the lease held by ``key`` and return its address.

        An unknown key returns None without error: CNI DEL must be idempotent and
        may arrive for a pod whose ADD failed or was already cleaned up.
        """
        with self._lock:
            if key not in self._leases:
                return None
            with self._change():
                addr = self._drop(key)
            return addr

    def lease(self, key: str) -> IPv4Address | None:
        """Return the address leased to ``key``, or None if it holds none."""
        with self._lock:
            entry = self._leases.get(key)
            return entry[0] if entry is not None else None

    def leases(self) -> dict[str, Lease]:
        """Return a snapshot of all leases: ``{key: (address, meta)}``.

        The metadata dicts are copies, so callers cannot change state behind the lock.
        """
        with self._lock:
            return {k: (addr, dict(meta)) for k, (addr, meta) in self._leases.items()}

    def restore(self, extra: Mapping[str, str]) -> list[str]:
        """Merge leases discovered elsewhere (``{key: "a.b.c.d"}``) into the current ones.

        The agent records each pod's IP in OVSDB port external_ids, so after a lost
        or stale checkpoint it can re-learn the leases of running pods. Existing
        (checkpoint) leases win: an extra entry is rejected if its key already holds
        a different address, its address is held by another key, or its address is
        unparsable or not assignable in this CIDR. Extra entries are taken in key
        order, so conflicts among them resolve deterministically.

        Returns the rejected keys, sorted, for the caller to log. ``last`` is left
        alone: restored addresses are skipped by the round-robin scan anyway.
        """
        with self._lock:
            rejected: list[str] = []
            accepted: list[tuple[str, IPv4Address]] = []
            taken = dict(self._by_ip)
            for key in sorted(extra):
                addr = self._assignable(extra[key])
                if not key or addr is None:
                    rejected.append(key)
                    continue
                owner = taken.get(int(addr))
                current = self._leases.get(key)
                if owner == key:
                    continue  # already known, same address
                if owner is not None or current is not None:
                    rejected.append(key)
                    continue
                taken[int(addr)] = key
                accepted.append((key, addr))
            if accepted:
                with self._change():
                    for key, addr in accepted:
                        self._add(key, addr, {})
            return rejected

    def gc(self, valid_keys: set[str],
           owned: Callable[[dict[str, Any]], bool] | None = None) -> list[str]:
        """Release every lease whose key is not in ``valid_keys``; return those keys, sorted.

        Used after agent restart to free addresses of pods whose CNI DEL never
        reached the agent. ``owned``, given a lease's metadata, limits the
        sweep to the leases it accepts (a CNI GC covers one network only).
        All releases are written in one checkpoint update.
        """
        with self._lock:
            stale = sorted(k for k, (_, meta) in self._leases.items()
                           if k not in valid_keys and (owned is None or owned(meta)))
            if stale:
                with self._change():
                    for key in stale:
                        self._drop(key)
            return stale

    # -- internals -----------------------------------------------------------

    def _assignable(self, ip: str) -> IPv4Address | None:
        """Parse ``ip`` and return it only if it lies in the pod pool."""
        try:
            addr = IPv4Address(ip)
        except ValueError:
            return None
        return addr if self._first <= int(addr) <= self._last_pool else None

    def _add(self, key: str, addr: IPv4Address, meta: dict[str, Any]) -> None:
        self._leases[key] = (addr, meta)
        self._by_ip[int(addr)] = key

    def _drop(self, key: str) -> IPv4Address:
        addr, _ = self._leases.pop(key)
        del self._by_ip[int(addr)]
        return addr

    @contextmanager
    def _change(self) -> Iterator[None]:
        """Apply the enclosed mutation, persist it, and undo it if persisting fails.

        Callers hold the lock. Copying the maps costs about as much as serialising
        them, which every change does anyway.
        """
        snapshot = (dict(self._leases), dict(self._by_ip), self._last)
        try:
            yield
            self._save()
        except BaseException:
            self._leases, self._by_ip, self._last = snapshot
            raise

    def _to_json(self) -> str:
        return json.dumps(
            {
                "version": CHECKPOINT_VERSION,
                "cidr": str(self._net),
                "last": str(IPv4Address(self._last)),
                "leases": {
                    k: {"ip": str(addr), "meta": meta} for k, (addr, meta) in self._leases.items()
                },
            },
            sort_keys=True,
        )

    def _save(self) -> None:
        """Write the checkpoint atomically: a temp file in the same directory, then os.replace.

        Readers therefore see either the old or the new checkpoint, never a torn
        one. There is deliberately no fsync: it would add milliseconds to every pod
        start, and it only guards against a kernel crash or power loss. The agent
        survives its own crashes because os.replace is atomic with respect to other
        processes, and OVSDB keeps a second copy of every pod's IP for
        :meth:`restore` should a power loss leave the checkpoint stale or empty.
        """
        if self._path is None:
            return
        text = self._to_json()  # serialise first: a TypeError leaves no temp file behind
        directory = os.path.dirname(self._path) or "."
        tmp = os.path.join(directory, f".{os.path.basename(self._path)}.{os.getpid()}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, self._path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise IPAMError(
                IO_FAILURE_CODE, f"cannot write IPAM checkpoint {self._path}: {exc}"
            ) from exc

    def _load(self, path: str) -> None:
        """Load leases and the round-robin position from ``path``; ValueError if unusable."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _corrupt(path, f"not valid JSON ({exc})") from exc
        leases, last = _parse_checkpoint(data, self._net, path)
        for key, (addr, meta) in leases.items():
            self._add(key, addr, meta)
        self._last = last
