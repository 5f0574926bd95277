"""The storage error hierarchy.

::

    StorageError                 any failure of the storage layer (transient unless below)
    ├── StorageClosedError       used after close (a bug in the caller; not retryable)
    ├── StorageBusyError         another process held the write lock too long (transient)
    ├── WriteRejectedError       a write refused for what it holds (deterministic)
    ├── CorruptStorageError      the database file is damaged (found at open; not retryable)
    ├── FencedError              a newer owner holds the partition; this worker must drop it
    ├── PartialCommitError       some partitions of a batch were made durable, others not
    ├── PartitionCountError      the data directory was created with another partition count
    └── MigrationError           class migrations cannot be applied as declared (nothing was)
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CorruptStorageError",
    "FencedError",
    "MigrationError",
    "PartialCommitError",
    "PartitionCountError",
    "StorageBusyError",
    "StorageClosedError",
    "StorageError",
    "WriteRejectedError",
]


class StorageError(Exception):
    """A storage operation failed. Transient unless a subclass says otherwise."""


class StorageClosedError(StorageError):
    """The storage was used after ``close()``. Deterministic: retrying cannot help."""

    def __init__(self) -> None:
        super().__init__("storage is closed")


class StorageBusyError(StorageError):
    """Another process held the database's write lock longer than the wait allowed (a frozen
    or stuck peer worker, or a tool holding a write transaction). Transient: a retry can
    succeed once the holder lets go; the runtime answers ``503 storage_busy``."""

    path: Path
    """The database file."""
    waited: float
    """Seconds waited for the lock."""

    def __init__(self, path: Path, waited: float, detail: str = "") -> None:
        self.path = path
        self.waited = waited
        super().__init__(
            f"another process held the write lock of {path} for more than {waited:g} s"
            + (f" ({detail})" if detail else "")
            + "; retry later, and check for a stopped or hung process using that file "
            "(for example with `fuser` or `lsof`)"
        )


class WriteRejectedError(StorageError):
    """Storage refused a write for what it holds, not for the state of the disk: a constraint,
    a value it cannot store, a damaged page the write touches. Deterministic: the same write
    fails again. The group committer commits the other objects of a batch without it."""


class CorruptStorageError(StorageError):
    """The database file is damaged or is not a database. Not retryable: restore the file
    from a backup or repair it; a worker cannot start on it."""

    path: Path
    """The database file."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        super().__init__(
            f"the database {path} is damaged ({detail}); stop every worker using it, then "
            f"restore it from a backup, or check it with: sqlite3 {path} "
            '"PRAGMA integrity_check"'
        )


class FencedError(StorageError):
    """A commit was refused because another owner claimed the partition with a newer epoch.

    The caller lost ownership and must stop serving the partition; a retry on another worker
    (the new owner) can succeed.
    """

    partitions: frozenset[int]
    """The partitions whose fence rejected the write."""

    def __init__(self, partitions: frozenset[int] | set[int]) -> None:
        self.partitions = frozenset(partitions)
        super().__init__(
            f"partition(s) {sorted(self.partitions)} now belong to a newer owner; "
            "this worker's writes to them were refused"
        )


class PartitionCountError(StorageError):
    """The data directory belongs to a deployment with a different partition count."""

    def __init__(self, stored: int, configured: int) -> None:
        self.stored = stored
        self.configured = configured
        super().__init__(
            f"this data directory was created with {stored} partitions but {configured} were "
            f"configured; the partition count is fixed per deployment: start with "
            f"--partitions {stored} or use a new data directory"
        )


class PartialCommitError(StorageError):
    """A batch spanning several partitions was made durable for some of them only.

    Replicated storage appends each partition's share of a batch to that partition's log on its
    own; the partitions in ``failed`` were not written (or their outcome is unknown), and those
    in ``fenced`` belong to a newer owner. Every other partition of the batch is durable.
    Retrying the failed turns can help.
    """

    failed: dict[int, StorageError]
    """Partition -> why its entries were not made durable."""
    fenced: frozenset[int]
    """Partitions whose appends were refused because a newer owner holds them."""

    def __init__(self, failed: dict[int, StorageError], fenced: frozenset[int]) -> None:
        self.failed = dict(failed)
        self.fenced = frozenset(fenced)
        first = next(iter(self.failed.values()), None)
        super().__init__(
            f"partition(s) {sorted(self.failed)} were not made durable"
            + (f" ({first})" if first is not None else "")
        )


class MigrationError(StorageError):
    """Class migrations cannot be applied as declared: a tag recorded with other content, a
    rename onto a class that already has objects, other workers still using the data, or a
    backend that cannot migrate. Deterministic (but for live workers): fix the declaration or
    the deployment; nothing of the declared migrations was applied."""
