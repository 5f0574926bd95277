"""Durability for ndo: SQLite (and in-memory) storage, write-sets, group commit and fencing.

Knows nothing of NATS; the runtime in ``service`` drives it.
"""

from ndo.storage._base import Storage
from ndo.storage._committer import (
    CommitAbandonedError,
    CommitStats,
    CommitWaiter,
    GroupCommitter,
    PendingCommit,
)
from ndo.storage._errors import FencedError, PartitionCountError, StorageClosedError, StorageError
from ndo.storage._memory import InMemoryStorage
from ndo.storage._records import ALARM_UNCHANGED, IdempotentReply, ObjectWrite, StoredAlarm
from ndo.storage._sqlite import SqliteStorage

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
