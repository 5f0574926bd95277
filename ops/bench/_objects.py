"""The objects the scenarios call: their class, ids, subjects, request bodies and stored values.

One place for the naming the harness, the loader and the readiness probe share, so a scenario's
ids and the values the loader writes for them cannot drift apart.
"""

from __future__ import annotations

from typing import Final

from ndo.subjects import partition_of

__all__ = [
    "BASELINE_PREFIX",
    "CLASS",
    "COLD_IDS",
    "GET_BODY",
    "HOT_IDS",
    "IDLE_IDS",
    "IDLE_WARM_OBJECTS",
    "INCREMENT_BODY",
    "PREFIX",
    "READ_IDS",
    "SPREAD_IDS",
    "VALUE_KEY",
    "ping_ids",
    "stored_value",
]

PREFIX: Final = "ndo"
"""Subject prefix of the ndo workers."""
BASELINE_PREFIX: Final = "ndobench"
"""Subject prefix of the baseline responder (``<prefix>.rpc.Counter.<id>.<method>``); its
scenarios use the same object ids as the worker's, in this namespace of their own."""
CLASS: Final = "Counter"
"""The bundled example class every scenario calls."""
VALUE_KEY: Final = "value"
"""The storage key of a ``Counter``'s value."""
_PING_PREFIX: Final = "ping"
INCREMENT_BODY: Final = '{"by":1}'
"""Body of every ``increment`` request."""
GET_BODY: Final = ""
"""Body of every ``get`` request."""

# Object id prefixes, one per scenario (ids are prefix + number).
READ_IDS: Final = "r"
SPREAD_IDS: Final = "s"
HOT_IDS: Final = "h"
COLD_IDS: Final = "c"
IDLE_IDS: Final = "m"

IDLE_WARM_OBJECTS: Final = 200
"""Objects ``idle-memory`` activates before its first RSS sample (warms caches and arenas)."""


def stored_value(number: int) -> int:
    """The counter value the loader stores for object number ``number`` (read and cold; the
    harness gives the baseline responder's ``read`` objects the same values)."""
    return number * 7 + 3


def ping_ids(partitions: int) -> list[str]:
    """Object ids covering every partition once (the worker readiness probe)."""
    ids: list[str] = []
    covered: set[int] = set()
    for number in range(partitions * 1_000):
        object_id = f"{_PING_PREFIX}{number}"
        part = partition_of(CLASS, object_id, partitions)
        if part not in covered:
            covered.add(part)
            ids.append(object_id)
            if len(covered) == partitions:
                break
    return ids
