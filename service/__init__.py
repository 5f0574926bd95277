"""The runtime of one ndo worker: NATS ingress, activations, turns, group commit, shutdown."""

from ndo.service._config import WorkerConfig
from ndo.service._errors import DeploymentMismatchError, OwnershipError, RoutingError, ServiceError
from ndo.service._journal import (
    JOURNAL_VERSION,
    JournalAlarm,
    JournalError,
    JournalRecord,
    JournalWrites,
    decode_journal_record,
    journal_stream_name,
)
from ndo.service._metrics import WorkerMetrics
from ndo.service._ownership import assign_partitions, lease_bucket
from ndo.service._routing import RoutingMode, mapping_snippet, server_mapping
from ndo.service._worker import QUEUE_GROUP, Worker, WorkerState, WorkerStats

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
