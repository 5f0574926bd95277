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
    MigrationError,
    PartialCommitError,
    PartitionCountError,
    StorageBusyError,
    StorageClosedError,
    StorageError,
    WriteRejectedError,
)
from ndo.storage._log_record import LogRecord, decode_log_record, encode_log_record
from ndo.storage._memory import InMemoryStorage
from ndo.storage._migrations import describe_migration, pending_migrations
from ndo.storage._records import (
    ALARM_UNCHANGED,
    AppliedMigration,
    AppliedRecord,
    ClassMigration,
    IdempotentReply,
    ObjectWrite,
    StoredAlarm,
    StoredObject,
)
from ndo.storage._snapshot import PartitionSnapshot, decode_snapshot, encode_snapshot
from ndo.storage._sqlite import SqliteStorage, Synchronous

__all__ = [
    "ALARM_UNCHANGED",
    "AppliedMigration",
    "AppliedRecord",
    "ClassMigration",
    "CommitAbandonedError",
    "CommitStats",
    "CommitWaiter",
    "CorruptStorageError",
    "FencedError",
    "GroupCommitter",
    "IdempotentReply",
    "InMemoryStorage",
    "LogRecord",
    "MigrationError",
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
    "StoredObject",
    "Synchronous",
    "WriteRejectedError",
    "decode_log_record",
    "decode_snapshot",
    "describe_migration",
    "encode_log_record",
    "encode_snapshot",
    "pending_migrations",
]
