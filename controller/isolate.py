"""Applying a batch of datastore changes so that one bad change cannot stall the rest.

Both datastores' watch loops hand the agent ordered batches and give it the
same batch again, for ever, whenever applying it raises: right for a fault
outside the changes (the store locked for a moment), wrong for a change the
agent cannot apply (an engine bug, FlowSync refusing two owners of one flow
identity, a body shape no parser expected), which then blocked every later
change on the node until a restart.

The split lives here, called from the agent's one change callback
(Agent._on_changes), and not in the datastores' loops, because:
- only the agent knows that its appliers take a change again without harm
  (the contract the loops' retry already relies on) and which faults are not
  a change's (StoreUnavailable: the loops keep retrying those for ever);
- the failures are the agent's to report (its log, metrics and status), and
  the two loops stay one shared contract: "callback raises -> same batch again";
- the loops also retry their own read faults, which must never skip a change.

Order is kept: a batch is split into contiguous halves, the first applied
before the second, so a later change of an object never lands before an
earlier one of it, nor a delete before the put it follows. A change that
fails alone is skipped; a later change of the same object (in this batch or
a later one) is applied as usual, which is its retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flowcni.datastore.store import StoreUnavailable

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# Faults of the moment, not of a change: re-raised, so the watch loop retries the
# whole batch as before (bisecting on them would blame good changes).
TRANSIENT: tuple[type[BaseException], ...] = (StoreUnavailable,)


@dataclass(frozen=True)
class Failure:
    """One change that could not be applied even alone."""
    change: Any  # store.Change
    error: BaseException

    @property
    def key(self) -> tuple[str, str, str]:
        return key_of(self.change)

    def describe(self) -> str:
        c = self.change
        obj = f"{c.namespace}/{c.name}" if c.namespace else c.name
        return f"{c.kind} {obj} ({c.op} at revision {c.rev}): {error_text(self.error)}"


def key_of(c: Any) -> tuple[str, str, str]:
    return (c.kind, c.namespace, c.name)


def error_text(e: BaseException) -> str:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def apply_isolating(batch: Sequence[T], apply: Callable[[list[T]], None],
                    pause: Callable[[], bool]) -> list[tuple[T, BaseException]]:
    """Apply `batch`; return the changes that failed even alone, with their errors.

    Whole first; on a failure, `pause()` (False: stopping; give up quietly) and
    the whole batch once more (a fault of the moment passes); then halves,
    recursively, so every change that applies lands, at log2(len) extra passes
    per bad change. TRANSIENT errors are re-raised at once.
    """
    failed: list[tuple[T, BaseException]] = []
    for attempt in range(2):  # the whole batch, and once more after a pause
        try:
            apply(list(batch))
            return []
        except TRANSIENT:
            raise
        except Exception as e:
            if attempt == 0:
                LOG.warning("applying %d changes failed (%s); once more, then split",
                            len(batch), error_text(e))
                if not pause():
                    return []
            elif len(batch) == 1:
                return [(batch[0], e)]
    _bisect(list(batch), apply, failed)
    return failed


def _bisect(batch: list[T], apply: Callable[[list[T]], None],
            failed: list[tuple[T, BaseException]]) -> None:
    """Both halves of a batch known to fail, in order; a lone failing change recorded."""
    mid = len(batch) // 2
    for half in (batch[:mid], batch[mid:]):
        try:
            apply(half)
        except TRANSIENT:
            raise
        except Exception as e:
            if len(half) == 1:
                failed.append((half[0], e))
            else:
                _bisect(half, apply, failed)
