"""The runtime of one ndo worker: NATS ingress, activations, turns, group commit, ownership.

``Worker`` is what ``ndo serve`` runs. The turn engine (``TurnRunner``) is public for the tools
that run objects outside a worker (``ndo replay --execute``); the lease bucket's records and view
(``read_bucket``) for the tools that read a deployment (``ndo status``). The journal's record
format is the module ``ndo.service.journal``.
"""

from ndo.service._assignment import assign_partitions, partitions_text
from ndo.service._config import (
    HIDDEN_WORKER_FIELDS,
    WORKER_OPTIONS,
    WorkerConfig,
    WorkerOption,
    split_servers,
)
from ndo.service._connection import NatsAuth, is_refusal, redact_url, refusal_hint
from ndo.service._discovery import MIGRATIONS_METADATA, SERVICE_NAME
from ndo.service._envelope import AlarmDelivery, Envelope
from ndo.service._errors import (
    DeploymentMismatchError,
    OrphanClassesError,
    OwnershipError,
    RoutingError,
    ServiceError,
)
from ndo.service._lease_bucket import (
    CONFIG_KEY,
    BucketView,
    DeploymentRecord,
    LeaseRecord,
    LeaseView,
    MemberRecord,
    lease_bucket,
    lease_key,
    member_key,
    read_bucket,
)
from ndo.service._metrics import WorkerMetrics
from ndo.service._migrations import check_migrations
from ndo.service._partition_log import PartitionLog, log_stream_name
from ndo.service._replicated import ReplicatedStorage
from ndo.service._routing import QUEUE_GROUP, RoutingMode, mapping_snippet, server_mapping
from ndo.service._snapshots import SnapshotStore, snapshot_bucket
from ndo.service._turn import DeadlineWatchdog, TurnOutcome, TurnRunner, object_write, turn_error
from ndo.service._units import parse_duration, parse_size
from ndo.service._worker import Worker, WorkerState, WorkerStats

__all__ = [
    "CONFIG_KEY",
    "HIDDEN_WORKER_FIELDS",
    "MIGRATIONS_METADATA",
    "QUEUE_GROUP",
    "SERVICE_NAME",
    "WORKER_OPTIONS",
    "AlarmDelivery",
    "BucketView",
    "DeadlineWatchdog",
    "DeploymentMismatchError",
    "DeploymentRecord",
    "Envelope",
    "LeaseRecord",
    "LeaseView",
    "MemberRecord",
    "NatsAuth",
    "OrphanClassesError",
    "OwnershipError",
    "PartitionLog",
    "ReplicatedStorage",
    "RoutingError",
    "RoutingMode",
    "ServiceError",
    "SnapshotStore",
    "TurnOutcome",
    "TurnRunner",
    "Worker",
    "WorkerConfig",
    "WorkerMetrics",
    "WorkerOption",
    "WorkerState",
    "WorkerStats",
    "assign_partitions",
    "check_migrations",
    "is_refusal",
    "lease_bucket",
    "lease_key",
    "log_stream_name",
    "mapping_snippet",
    "member_key",
    "object_write",
    "parse_duration",
    "parse_size",
    "partitions_text",
    "read_bucket",
    "redact_url",
    "refusal_hint",
    "server_mapping",
    "snapshot_bucket",
    "split_servers",
    "turn_error",
]
