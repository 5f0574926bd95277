"""The abstract ``Storage`` interface every backend implements.

The runtime reads through it when an object's cache misses, and writes to it only through
``commit`` (one call per group-commit batch). It knows objects by ``(class_name, object_id)``
and values as opaque bytes; it knows nothing of NATS or of user types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence

from ndo.storage._records import ObjectWrite, StoredAlarm

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
