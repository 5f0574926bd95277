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
from ndo.storage._errors import (
    CorruptStorageError,
    FencedError,
    PartialCommitError,
    PartitionCountError,
    StorageBusyError,
    StorageClosedError,
    StorageError,
    WriteRejectedError,
)
from ndo.storage._log_record import LogRecord, decode_log_record, encode_log_record
from ndo.storage._memory import InMemoryStorage
from ndo.storage._records import (
    ALARM_UNCHANGED,
    AppliedRecord,
    IdempotentReply,
    ObjectWrite,
    StoredAlarm,
)
from ndo.storage._snapshot import PartitionSnapshot, decode_snapshot, encode_snapshot
from ndo.storage._sqlite import SqliteStorage, Synchronous

__all__ = [
    "ALARM_UNCHANGED",
    "AppliedRecord",
    "CommitAbandonedError",
    "CommitStats",
    "CommitWaiter",
    "CorruptStorageError",
    "FencedError",
    "GroupCommitter",
    "IdempotentReply",
    "InMemoryStorage",
    "LogRecord",
    "ObjectWrite",
    "PartialCommitError",
    "PartitionCountError",
    "PartitionSnapshot",
    "PendingCommit",
    "SqliteStorage",
    "Storage",
    "StorageBusyError",
    "StorageClosedError",
    "StorageError",
    "StoredAlarm",
    "Synchronous",
    "WriteRejectedError",
    "decode_log_record",
    "decode_snapshot",
    "encode_log_record",
    "encode_snapshot",
]
