"""In-memory storage: the same contract as SQLite, without durability.

For replay scratch space and users' fast unit tests of their objects. ndo's own persistence
tests use real SQLite files.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Collection, Iterable, Sequence

from ndo.storage._base import Storage
from ndo.storage._errors import FencedError, StorageClosedError
from ndo.storage._migrations import pending_migrations, rename_target_error
from ndo.storage._records import (
    ALARM_UNCHANGED,
    AppliedMigration,
    ClassMigration,
    ObjectWrite,
    StoredAlarm,
    StoredObject,
)

__all__ = ["InMemoryStorage"]

_ObjectKey = tuple[str, str]


class InMemoryStorage(Storage):
    """Storage kept in dictionaries; lost when the process ends."""

    # State
    _objects: dict[_ObjectKey, dict[str, bytes]]
    _alarms: dict[_ObjectKey, StoredAlarm]
    _idempotency: dict[tuple[str, str, str], tuple[bytes, float]]
    _fences: dict[int, int]
    _partition_of: dict[_ObjectKey, int]
    """The partition each object was last written in (``list_objects``)."""
    _migrations: list[AppliedMigration]
    _closed: bool
    commits: int
    """Transactions committed (for tests that count them)."""

    def __init__(self) -> None:
        """Create an empty store."""
        self._objects = {}
        self._alarms = {}
        self._idempotency = {}
        self._fences = {}
        self._partition_of = {}
        self._migrations = []
        self._closed = False
        self.commits = 0

    def _check(self) -> None:
        if self._closed:
            raise StorageClosedError()

    async def open(self) -> None:
        self._check()

    async def close(self) -> None:
        self._closed = True

    def object_items(self, class_name: str, object_id: str) -> dict[str, bytes]:
        """Return a copy of every committed key of one object (for inspection)."""
        return dict(self._objects.get((class_name, object_id), {}))

    async def read(self, class_name: str, object_id: str, key: str) -> bytes | None:
        self._check()
        return self._objects.get((class_name, object_id), {}).get(key)

    async def read_many(
        self, class_name: str, object_id: str, keys: Sequence[str]
    ) -> dict[str, bytes]:
        self._check()
        stored = self._objects.get((class_name, object_id), {})
        return {k: stored[k] for k in keys if k in stored}

    async def read_range(
        self,
        class_name: str,
        object_id: str,
        *,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]:
        self._check()
        stored = self._objects.get((class_name, object_id), {})
        keys = sorted(stored)
        lo = 0 if start is None else bisect.bisect_left(keys, start)
        hi = len(keys) if end is None else bisect.bisect_left(keys, end)
        selected = keys[lo:hi]
        if reverse:
            selected.reverse()
        if limit is not None:
            selected = selected[:limit]
        return [(k, stored[k]) for k in selected]

    async def read_alarm(self, class_name: str, object_id: str) -> float | None:
        self._check()
        alarm = self._alarms.get((class_name, object_id))
        return None if alarm is None else alarm.due

    async def object_size(self, class_name: str, object_id: str) -> int:
        self._check()
        stored = self._objects.get((class_name, object_id), {})
        return sum(len(k.encode("utf-8")) + len(v) for k, v in stored.items())

    async def list_objects(
        self,
        partition: int,
        *,
        class_name: str | None = None,
        id_prefix: str = "",
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[StoredObject]:
        self._check()
        found = []
        for obj in sorted(self._selected(partition, class_name, id_prefix)):
            if after is not None and obj <= after:
                continue
            stored = self._objects.get(obj, {})
            alarm = self._alarms.get(obj)
            size = sum(len(k.encode("utf-8")) + len(v) for k, v in stored.items())
            found.append(
                StoredObject(*obj, len(stored), size, None if alarm is None else alarm.due)
            )
            if len(found) >= limit:
                break
        return found

    async def count_objects(
        self, partition: int, *, class_name: str | None = None, id_prefix: str = ""
    ) -> dict[str, int]:
        self._check()
        counts: dict[str, int] = {}
        for cls, _ in self._selected(partition, class_name, id_prefix):
            counts[cls] = counts.get(cls, 0) + 1
        return dict(sorted(counts.items()))

    def _selected(self, partition: int, class_name: str | None, id_prefix: str) -> set[_ObjectKey]:
        """Objects of ``partition`` holding a key or an alarm, filtered as ``list_objects``."""
        held = {obj for obj, stored in self._objects.items() if stored} | set(self._alarms)
        return {
            obj
            for obj in held
            if self._partition_of.get(obj) == partition
            and (class_name is None or obj[0] == class_name)
            and obj[1].startswith(id_prefix)
        }

    async def read_idempotent(
        self, class_name: str, object_id: str, key: str, now: float
    ) -> bytes | None:
        self._check()
        record = self._idempotency.get((class_name, object_id, key))
        return record[0] if record is not None and record[1] > now else None

    async def idempotency_horizon(
        self, class_name: str, object_id: str, now: float
    ) -> float | None:
        self._check()
        expiries = [
            exp
            for (c, o, _), (_, exp) in self._idempotency.items()
            if c == class_name and o == object_id and exp > now
        ]
        return max(expiries, default=None)

    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        self._check()
        fenced = frozenset(
            e.partition for e in entries if self._fences.get(e.partition, e.epoch) != e.epoch
        )
        for entry in entries:
            if entry.partition in fenced:
                continue
            obj = (entry.class_name, entry.object_id)
            self._partition_of[obj] = entry.partition
            if entry.cleared:
                self._objects.pop(obj, None)
            if entry.writes:
                stored = self._objects.setdefault(obj, {})
                for key, value in entry.writes.items():
                    if value is None:
                        stored.pop(key, None)
                    else:
                        stored[key] = value
            if entry.alarm is None:
                self._alarms.pop(obj, None)
            elif entry.alarm != ALARM_UNCHANGED:
                self._alarms[obj] = StoredAlarm(*obj, entry.partition, entry.alarm)
            if entry.idempotent_reply is not None:
                r = entry.idempotent_reply
                self._idempotency[(*obj, r.key)] = (r.reply, r.expires_at)
        self.commits += 1
        return fenced

    async def claim_partitions(
        self, partitions: Iterable[int], owner: str, epoch: int | None = None
    ) -> dict[int, int]:
        self._check()
        wanted = list(partitions)
        if epoch is None:
            epoch = max((self._fences.get(p, 0) for p in wanted), default=0) + 1
        newer = {p for p in wanted if self._fences.get(p, 0) > epoch}
        if newer:
            raise FencedError(newer)
        for p in wanted:
            self._fences[p] = epoch
        return dict.fromkeys(wanted, epoch)

    async def due_alarms(
        self, partitions: Collection[int] | None, now: float, limit: int
    ) -> list[StoredAlarm]:
        self._check()
        due = [
            a
            for a in self._alarms.values()
            if a.due <= now and (partitions is None or a.partition in partitions)
        ]
        return sorted(due, key=lambda a: a.due)[:limit]

    async def next_alarm_time(
        self, partitions: Collection[int] | None, after: float | None = None
    ) -> float | None:
        self._check()
        times = [
            a.due
            for a in self._alarms.values()
            if (partitions is None or a.partition in partitions)
            and (after is None or a.due > after)
        ]
        return min(times, default=None)

    async def purge_idempotency(self, now: float, limit: int) -> int:
        self._check()
        expired = [k for k, (_, exp) in self._idempotency.items() if exp <= now][:limit]
        for k in expired:
            del self._idempotency[k]
        return len(expired)

    # Class migrations

    async def stored_classes(self) -> list[str]:
        self._check()
        return sorted(
            {c for (c, _), keys in self._objects.items() if keys} | {c for c, _ in self._alarms}
        )

    async def applied_migrations(self) -> list[AppliedMigration]:
        self._check()
        return list(self._migrations)

    async def apply_migrations(
        self,
        migrations: Sequence[ClassMigration],
        *,
        partition_of: Callable[[str, str], int],
        worker: str,
    ) -> list[AppliedMigration]:
        self._check()
        # Work on copies and keep them only if every migration applies: all or nothing.
        objects = {obj: dict(keys) for obj, keys in self._objects.items() if keys}
        alarms = dict(self._alarms)
        replies = dict(self._idempotency)
        placed = dict(self._partition_of)
        done: list[AppliedMigration] = []
        for migration in pending_migrations(migrations, self._migrations):
            renamed = deleted = 0
            for old, new in migration.renamed:
                if any(c == new for c, _ in (*objects, *alarms)):
                    raise rename_target_error(migration, old, new)
                ids = {o for c, o in (*objects, *alarms) if c == old}
                renamed += len(ids)
                for oid in ids:
                    part = partition_of(new, oid)
                    if (old, oid) in objects:
                        objects[(new, oid)] = objects.pop((old, oid))
                    if (old, oid) in alarms:
                        alarms[(new, oid)] = StoredAlarm(new, oid, part, alarms.pop((old, oid)).due)
                    placed.pop((old, oid), None)
                    placed[(new, oid)] = part
                for c, o, k in [key for key in replies if key[0] == old]:
                    replies[(new, o, k)] = replies.pop((c, o, k))
            for cls in migration.deleted:
                ids = {o for c, o in (*objects, *alarms) if c == cls}
                deleted += len(ids)
                for oid in ids:
                    objects.pop((cls, oid), None)
                    alarms.pop((cls, oid), None)
                    placed.pop((cls, oid), None)
                for key in [key for key in replies if key[0] == cls]:
                    del replies[key]
            done.append(
                AppliedMigration(
                    tag=migration.tag,
                    applied_at=time.time(),
                    worker=worker,
                    renamed=migration.renamed,
                    deleted=migration.deleted,
                    objects_renamed=renamed,
                    objects_deleted=deleted,
                )
            )
        if done:
            self._objects, self._alarms, self._idempotency = objects, alarms, replies
            self._partition_of = placed
            self._migrations.extend(done)
        return done
