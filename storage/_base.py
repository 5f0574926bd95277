"""The abstract ``Storage`` interface every backend implements.

The runtime reads through it when an object's cache misses, and writes to it only through
``commit`` (one call per group-commit batch). It knows objects by ``(class_name, object_id)``
and values as opaque bytes; it knows nothing of NATS or of user types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence

from ndo.storage._records import (
    AppliedMigration,
    ClassMigration,
    ObjectWrite,
    StoredAlarm,
    StoredObject,
)

__all__ = ["Storage"]


class Storage(ABC):
    """Durable key-value state of many objects, with alarms, idempotency records and fences."""

    @abstractmethod
    async def open(self) -> None:
        """Open (and create, if needed) the store. Safe to call once."""

    @abstractmethod
    async def close(self) -> None:
        """Close the store. Idempotent; every later call raises ``StorageClosedError``."""

    @abstractmethod
    async def read(self, class_name: str, object_id: str, key: str) -> bytes | None:
        """Return the committed value of ``key``, or ``None`` when it is absent."""

    @abstractmethod
    async def read_many(
        self, class_name: str, object_id: str, keys: Sequence[str]
    ) -> dict[str, bytes]:
        """Return the committed values of those ``keys`` that exist."""

    @abstractmethod
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
        """Return committed ``(key, value)`` pairs with ``start <= key < end``, in key order.

        ``None`` bounds are open; ``reverse`` returns them from the highest key down; ``limit``
        caps the count (applied after ordering).
        """

    @abstractmethod
    async def read_alarm(self, class_name: str, object_id: str) -> float | None:
        """Return the object's committed alarm time (epoch seconds), or ``None``."""

    @abstractmethod
    async def object_size(self, class_name: str, object_id: str) -> int:
        """Return the object's stored size: the UTF-8 bytes of its keys plus their values."""

    @abstractmethod
    async def list_objects(
        self,
        partition: int,
        *,
        class_name: str | None = None,
        id_prefix: str = "",
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[StoredObject]:
        """Return up to ``limit`` objects of ``partition`` that hold a key or an alarm, in
        ``(class, id)`` order: only ``class_name``'s (when given), only ids starting with
        ``id_prefix``, only those after ``after`` (a ``(class, id)`` page cursor).

        A read of committed state for the operator tools (``ndo inspect``); it never waits for
        a commit.
        """

    @abstractmethod
    async def count_objects(
        self, partition: int, *, class_name: str | None = None, id_prefix: str = ""
    ) -> dict[str, int]:
        """Return how many objects of ``partition`` each class has (filtered as
        ``list_objects``; classes with none are left out)."""

    @abstractmethod
    async def read_idempotent(
        self, class_name: str, object_id: str, key: str, now: float
    ) -> bytes | None:
        """Return the reply remembered under idempotency ``key`` if it has not expired."""

    @abstractmethod
    async def idempotency_horizon(
        self, class_name: str, object_id: str, now: float
    ) -> float | None:
        """Return the latest expiry among the object's unexpired idempotency records, or None."""

    @abstractmethod
    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        """Make every entry durable in one atomic transaction, in order.

        Entries whose partition fence no longer matches their epoch are skipped (not written).

        Returns:
            The partitions whose entries were skipped because they are fenced.

        Raises:
            StorageError: the transaction failed; nothing of the batch was written.
        """

    @abstractmethod
    async def claim_partitions(
        self, partitions: Iterable[int], owner: str, epoch: int | None = None
    ) -> dict[int, int]:
        """Fence ``partitions`` for ``owner``: later commits must carry the returned epoch.

        Args:
            partitions: the partitions to claim.
            owner: a name for the claimant (shown by status tools).
            epoch: the lease epoch to record; ``None`` picks one higher than any stored.

        Returns:
            The epoch now recorded for each partition.

        Raises:
            FencedError: a partition already carries a newer epoch than ``epoch``.
        """

    @abstractmethod
    async def due_alarms(
        self, partitions: Collection[int] | None, now: float, limit: int
    ) -> list[StoredAlarm]:
        """Return up to ``limit`` alarms due at or before ``now``, earliest first.

        ``partitions=None`` means all partitions.
        """

    @abstractmethod
    async def next_alarm_time(
        self, partitions: Collection[int] | None, after: float | None = None
    ) -> float | None:
        """Return the earliest alarm time among ``partitions`` (``None``: all) that is later
        than ``after`` (when given), or ``None``."""

    @abstractmethod
    async def purge_idempotency(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` expired idempotency records; return how many were deleted."""

    # Class migrations

    @abstractmethod
    async def stored_classes(self) -> list[str]:
        """Return the names of the classes that have any stored key or alarm, sorted."""

    @abstractmethod
    async def applied_migrations(self) -> list[AppliedMigration]:
        """Return the class migrations this store applied, in the order it applied them."""

    @abstractmethod
    async def apply_migrations(
        self,
        migrations: Sequence[ClassMigration],
        *,
        partition_of: Callable[[str, str], int],
        worker: str,
    ) -> list[AppliedMigration]:
        """Apply, in order and in one transaction, the ``migrations`` not applied before, and
        record each (a tag already recorded is skipped).

        A rename moves every key, alarm and idempotency record of the old class to the new
        one, at the partition ``partition_of(new_class, object_id)``; a deletion deletes them.

        Args:
            migrations: the declared migrations, in the order to apply them.
            partition_of: the partition of ``(class_name, object_id)``.
            worker: the applying worker's name (recorded).

        Returns:
            The migrations applied by this call (empty when all were applied before).

        Raises:
            MigrationError: nothing was applied: a recorded tag whose declaration changed, a
                rename onto a class with stored objects, or other workers use the store.
        """
