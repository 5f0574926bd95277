"""Durability for ndo: SQLite (and in-memory) storage, write-sets, group commit and fencing.

Knows nothing of NATS; the runtime in ``service`` drives it.
"""

from storage._base import Storage
from storage._committer import (
    CommitAbandonedError,
    CommitStats,
    CommitWaiter,
    GroupCommitter,
    PendingCommit,
)
from storage._errors import FencedError, PartitionCountError, StorageClosedError, StorageError
from storage._memory import InMemoryStorage
from storage._records import ALARM_UNCHANGED, IdempotentReply, ObjectWrite, StoredAlarm
from storage._sqlite import SqliteStorage

__all__ = [
    "ALARM_UNCHANGED",
    "CommitAbandonedError",
    "CommitStats",
    "CommitWaiter",
    "FencedError",
    "GroupCommitter",
    "IdempotentReply",
    "InMemoryStorage",
    "ObjectWrite",
    "PartitionCountError",
    "PendingCommit",
    "SqliteStorage",
    "Storage",
    "StorageClosedError",
    "StorageError",
    "StoredAlarm",
]
