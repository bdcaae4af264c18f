"""One lock per key (a pod attachment), kept only while someone holds or waits for it.

CNI requests for the same container and interface must not overlap, but
containers come and go for ever: a lock left behind per container id is a
leak of about 200 bytes per pod (runtimes here never send the GC that used
to prune them). Each entry counts its holders and waiters and goes when the
count drops to zero.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyLocks:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    def acquire(self, key: str) -> None:
        with self._mu:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = (threading.Lock(), [0])
            entry[1][0] += 1
        entry[0].acquire()

    def release(self, key: str) -> None:
        """Release `key` (from any thread: a DEL finishes its teardown in the background)."""
        with self._mu:
            lock, users = self._locks[key]
            lock.release()
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def __len__(self) -> int:
        with self._mu:
            return len(self._locks)
