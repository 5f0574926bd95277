"""The runtime of one ndo worker: NATS ingress, activations, turns, group commit, shutdown."""

from service._config import WorkerConfig
from service._errors import DeploymentMismatchError, OwnershipError, RoutingError, ServiceError
from service._journal import (
    JOURNAL_VERSION,
    JournalAlarm,
    JournalError,
    JournalRecord,
    JournalWrites,
    decode_journal_record,
    journal_stream_name,
)
from service._metrics import WorkerMetrics
from service._ownership import assign_partitions, lease_bucket
from service._routing import RoutingMode, mapping_snippet, server_mapping
from service._worker import QUEUE_GROUP, Worker, WorkerState, WorkerStats

__all__ = [
    "JOURNAL_VERSION",
    "QUEUE_GROUP",
    "DeploymentMismatchError",
    "JournalAlarm",
    "JournalError",
    "JournalRecord",
    "JournalWrites",
    "OwnershipError",
    "RoutingError",
    "RoutingMode",
    "ServiceError",
    "Worker",
    "WorkerConfig",
    "WorkerMetrics",
    "WorkerState",
    "WorkerStats",
    "assign_partitions",
    "decode_journal_record",
    "journal_stream_name",
    "lease_bucket",
    "mapping_snippet",
    "server_mapping",
]
