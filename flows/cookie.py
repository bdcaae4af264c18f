"""Cookie layout: round | feature | owner.

  bits 63..48  agent round: bumped on each connection to OVS, kept in OVSDB
  bits 47..40  feature (which builder made the flow)
  bits 39..0   owner id: a hash of the owning object's key

A restart installs every flow with the new round, then deletes the flows of
the old rounds by cookie mask, so nothing is flushed and no packet is lost.
Tools decode the feature and owner of any flow from its cookie alone.
"""

from __future__ import annotations

import enum
import hashlib

# Bridge external_ids where the agent publishes its round and table numbering.
ROUND_KEY = "flowcni-round"
TABLES_KEY = "flowcni-tables"

ROUND_BITS = 16
FEATURE_BITS = 8
OWNER_BITS = 40
ROUND_SHIFT = FEATURE_BITS + OWNER_BITS
ROUND_MASK = ((1 << ROUND_BITS) - 1) << ROUND_SHIFT
FEATURE_MASK = ((1 << FEATURE_BITS) - 1) << OWNER_BITS
OWNER_MASK = (1 << OWNER_BITS) - 1


class Feature(enum.IntEnum):
    """Which builder owns a flow."""

    BASE = 1      # table misses and node-wide flows
    GATEWAY = 2   # the node's gateway port
    POD = 3       # one local pod
    TUNNEL = 4    # one remote node
    POLICY = 5    # one policy rule
    SERVICE = 6   # one service
    TENANT = 12   # tenant networks (flows/tenant.py)


def owner_id(owner: str) -> int:
    """Stable 40-bit id of an owner key such as 'pod:default/web-1'."""
    return int.from_bytes(hashlib.blake2b(owner.encode(), digest_size=5).digest(), "big")


def make(round_: int, feature: Feature, owner: str) -> int:
    if not 0 < round_ < (1 << ROUND_BITS):
        raise ValueError(f"round {round_} out of range 1..{(1 << ROUND_BITS) - 1}")
    return (round_ << ROUND_SHIFT) | (int(feature) << OWNER_BITS) | owner_id(owner)


def next_round(current: int) -> int:
    """The round after `current`, skipping 0 (0 marks flows not made by the agent)."""
    nxt = (current + 1) % (1 << ROUND_BITS)
    return nxt or 1


def round_of(cookie: int) -> int:
    return (cookie & ROUND_MASK) >> ROUND_SHIFT


def feature_of(cookie: int) -> Feature | None:
    try:
        return Feature((cookie & FEATURE_MASK) >> OWNER_BITS)
    except ValueError:
        return None


def owner_of(cookie: int) -> int:
    return cookie & OWNER_MASK


def round_match(round_: int) -> tuple[int, int]:
    """(cookie, cookie_mask) selecting every flow of one round."""
    return (round_ << ROUND_SHIFT, ROUND_MASK)
