"""The records that cross the storage boundary: one object's write-set and a commit batch entry.

Values are already encoded (MessagePack bytes) when they reach storage; storage never decodes
user data. A ``None`` value in ``writes`` deletes the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = ["ALARM_UNCHANGED", "AppliedRecord", "IdempotentReply", "ObjectWrite", "StoredAlarm"]

ALARM_UNCHANGED: Final = -1.0
"""Marker for ``ObjectWrite.alarm``: the write-set does not touch the object's alarm."""


@dataclass(slots=True, frozen=True)
class IdempotentReply:
    """A reply remembered under an idempotency key until ``expires_at`` (epoch seconds)."""

    key: str
    reply: bytes
    expires_at: float


@dataclass(slots=True)
class ObjectWrite:
    """Everything one successful turn of one object asks storage to make durable, atomically."""

    class_name: str
    object_id: str
    partition: int
    epoch: int
    """Fencing epoch of the partition as the writer knows it; checked inside the transaction."""
    writes: dict[str, bytes | None] = field(default_factory=dict)
    """Key -> encoded value, or ``None`` to delete the key."""
    cleared: bool = False
    """Delete every key of the object before applying ``writes``."""
    alarm: float | None = ALARM_UNCHANGED
    """New alarm time (epoch seconds), ``None`` to delete it, ``ALARM_UNCHANGED`` to leave it."""
    idempotent_reply: IdempotentReply | None = None
    """Reply to remember under the request's idempotency key, in the same transaction."""

    def is_empty(self) -> bool:
        """Tell whether the write-set changes nothing (so it needs no transaction)."""
        return (
            not self.writes
            and not self.cleared
            and self.alarm == ALARM_UNCHANGED
            and self.idempotent_reply is None
        )


@dataclass(slots=True, frozen=True)
class StoredAlarm:
    """An object's pending alarm as stored."""

    class_name: str
    object_id: str
    partition: int
    due: float
    """Epoch seconds at which the alarm is due."""


@dataclass(slots=True, frozen=True)
class AppliedRecord:
    """A partition log record to apply to a local copy, at its place in the log."""

    partition: int
    prev: int
    """Log position the record follows (the copy must be exactly there)."""
    seq: int
    """The record's own log position (the copy's position once applied)."""
    epoch: int
    """Epoch of the tenure that appended it."""
    writes: list[ObjectWrite]
    """Its write-sets, in turn order (empty for a claim record)."""
