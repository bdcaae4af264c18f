"""Hand freed heap back to the kernel after pod churn (glibc's malloc_trim).

Why: with nothing left per pod (the soak's leak counters, the tracemalloc
diff and Python's block count stay flat), the agent's RSS still crept
~0.5 KB per CNI ADD/DEL pair. That creep is free memory inside glibc's
malloc arenas that was touched once and stays resident: over 1,000 pairs
malloc's in-use bytes (mallinfo2 uordblks) grew 82 KB while RSS grew 476 KB,
and a single malloc_trim(0) afterwards took RSS 2.3 MB *below* its level
before those pairs. Each request runs on a fresh thread, so its allocations
land in whichever arena that thread gets, and glibc only returns the top of
an arena by itself. Trimming once a minute, and only after pods changed,
keeps RSS flat for a cost of a few milliseconds (arena locks are held that
long; a CNI request allocating meanwhile waits for them).

Where malloc_trim does not exist (not glibc), this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

LOG = logging.getLogger(__name__)

#: Seconds between trims at most (a trim is only due after pod churn).
TRIM_INTERVAL = 60.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


#: glibc malloc arenas at most (mallopt M_ARENA_MAX); see cap_arenas.
ARENA_MAX = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def cap_arenas(n: int = ARENA_MAX) -> bool:
    """Let all threads share `n` malloc arenas (glibc's default: 8 per core).

    Why: with the Kubernetes datastore each informer reads and splits its list
    pages on a thread of its own, so each got an arena of its own (27 threads,
    about ten arenas with 0.5-5 MB resident each after the initial list), and
    the long-lived cache bodies it made stay scattered among freed pages there.
    malloc_trim gives back only whole free pages. Two arenas: the kube agent at
    99k flows 173.6-176.6 -> 171.5-171.7 MB (bench/agent_scale.py), sqlite
    unchanged. Few threads here allocate at once, so the arena locks cost
    nothing noticeable (change p99 unchanged). Call before any thread starts;
    whether it was applied (False off glibc).
    """
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(fn(_M_ARENA_MAX, n))


class HeapTrimmer:
    """`churned()` after a pod came or went; `run(stop)` trims at most every `interval`."""

    def __init__(self, interval: float = TRIM_INTERVAL) -> None:
        self.interval = interval
        self._trim = _malloc_trim()
        self._due = threading.Event()
        self.trims = 0  # how many trims ran (status, tests)

    @property
    def available(self) -> bool:
        return self._trim is not None

    def churned(self) -> None:
        self._due.set()

    def trim_if_due(self) -> bool:
        """Trim now if pods changed since the last trim; whether it trimmed."""
        if self._trim is None or not self._due.is_set():
            return False
        self._due.clear()
        self._trim(0)
        self.trims += 1
        return True

    def trim_now(self) -> None:
        """Trim at once: after a big allocation wave (the initial list, a large watch
        batch), whose freed intermediate objects would otherwise stay resident."""
        if self._trim is not None:
            self._trim(0)
            self.trims += 1

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.trim_if_due()
            except Exception:  # never let housekeeping take the agent down
                LOG.exception("malloc_trim failed")
