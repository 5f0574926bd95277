"""The records that cross the storage boundary: one object's write-set and a commit batch entry.

Values are already encoded (MessagePack bytes) when they reach storage; storage never decodes
user data. A ``None`` value in ``writes`` deletes the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "ALARM_UNCHANGED",
    "AppliedMigration",
    "AppliedRecord",
    "ClassMigration",
    "IdempotentReply",
    "ObjectWrite",
    "StoredAlarm",
    "StoredObject",
]

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
class StoredObject:
    """One object as storage lists it (``Storage.list_objects``): its size and its alarm."""

    class_name: str
    object_id: str
    keys: int
    """Stored keys."""
    size: int
    """The UTF-8 bytes of its keys plus their values (as ``Storage.object_size``)."""
    alarm: float | None
    """Its alarm time (epoch seconds), or ``None``."""


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


# Class migrations


@dataclass(slots=True, frozen=True)
class ClassMigration:
    """One tagged class migration: classes renamed (their objects keep their data under the new
    name) and classes deleted (with their data, alarms and idempotency records).

    Checked for consistency here; class names are checked by the worker (``validate_name``).

    Raises:
        ValueError: an empty tag, nothing to do, or names that conflict within the tag.
    """

    tag: str
    """Names the migration; a store applies each tag once and records it."""
    renamed: tuple[tuple[str, str], ...] = ()
    """``(old name, new name)`` pairs."""
    deleted: tuple[str, ...] = ()
    """Classes whose objects are deleted."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "renamed", tuple((str(a), str(b)) for a, b in self.renamed))
        object.__setattr__(self, "deleted", tuple(self.deleted))
        where = f"migration {self.tag!r}"
        if not self.tag.strip() or len(self.tag) > 128 or not self.tag.isprintable():
            raise ValueError(
                f'migration tag {self.tag!r}: use a short printable name, e.g. tag = "v2"'
            )
        if not self.renamed and not self.deleted:
            raise ValueError(
                f"{where} renames and deletes nothing: add renamed_classes or "
                "deleted_classes, or remove it"
            )
        sources = [a for a, _ in self.renamed]
        targets = [b for _, b in self.renamed]
        for kind, names in (
            ("renamed from", sources),
            ("renamed to", targets),
            ("deleted", list(self.deleted)),
        ):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{where}: {', '.join(twice)} {kind} more than once")
        for old, new in self.renamed:
            if old == new:
                raise ValueError(f"{where}: {old} is renamed to itself")
        chained = sorted(set(sources) & set(targets))
        if chained:
            raise ValueError(
                f"{where}: {', '.join(chained)} both renamed to and renamed from in one tag; "
                "put each step in a tag of its own, in order"
            )
        both = sorted(set(self.deleted) & (set(sources) | set(targets)))
        if both:
            raise ValueError(
                f"{where}: {', '.join(both)} both deleted and renamed in one tag; keep one"
            )

    def same_as(self, other: ClassMigration | AppliedMigration) -> bool:
        """Whether ``other`` declares the same renames and deletions (in any order)."""
        return (sorted(self.renamed), sorted(self.deleted)) == (
            sorted(other.renamed),
            sorted(other.deleted),
        )


@dataclass(slots=True, frozen=True)
class AppliedMigration:
    """A class migration as a store recorded it when it applied it."""

    tag: str
    applied_at: float
    """Epoch seconds of the transaction that applied it."""
    worker: str
    """Name of the worker that applied it."""
    renamed: tuple[tuple[str, str], ...]
    """``(old name, new name)`` pairs."""
    deleted: tuple[str, ...]
    """Classes whose objects were deleted."""
    objects_renamed: int
    """Objects (with keys or an alarm) that moved to their new class name."""
    objects_deleted: int
    """Objects (with keys or an alarm) that were deleted."""
