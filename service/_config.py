"""``WorkerConfig``: every knob of one worker, validated in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import msgspec

from ndo.subjects import DEFAULT_PARTITIONS, DEFAULT_PREFIX, InvalidSubjectError, validate_prefix

__all__ = ["WorkerConfig"]


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Configuration of one ndo worker (``ndo serve`` builds it from flags and ``NDO_*``)."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server to connect to."""
    prefix: str = DEFAULT_PREFIX
    """Subject prefix: requests arrive on ``<prefix>.rpc.<Class>.<id>.<method>``."""
    data_dir: Path = Path("ndo-data")
    """Directory of the SQLite database."""
    partitions: int = DEFAULT_PARTITIONS
    """Partition count of the deployment (fixed once data exists)."""
    worker_name: str = ""
    """Name shown in logs, metrics and status; defaults to host-pid."""
    max_active: int = 10_000
    """Most objects kept in memory; beyond it the least recently used idle ones are evicted."""
    idle_timeout: float = 300.0
    """Seconds without messages after which an object is evicted."""
    scan_interval: float = 1.0
    """Seconds between idle-eviction scans."""
    max_mailbox: int = 1_000
    """Messages that may wait for one object; beyond it callers get 503 overloaded."""
    handler_timeout: float = 30.0
    """Seconds a handler may run before it is cancelled with 504 and its writes discarded."""
    max_payload: int = 1024 * 1024
    """Largest request body accepted, in bytes (also capped by the server's max_payload)."""
    max_key_bytes: int = 2048
    """Longest storage key, in UTF-8 bytes."""
    max_value_bytes: int = 128 * 1024
    """Largest encoded storage value, in bytes."""
    max_keys_per_call: int = 128
    """Most keys in one ``get_many`` / ``put_many`` / ``delete_many``."""
    drain_timeout: float = 30.0
    """Seconds shutdown waits for queued messages to finish."""
    idempotency_window: float = 300.0
    """Seconds a committed idempotency key keeps its stored reply."""
    alarm_max_attempts: int = 6
    """Deliveries of a failing alarm before it is dropped."""
    alarm_initial_backoff: float = 1.0
    """Seconds before the first alarm retry; doubles each time."""
    ownership: Literal["auto", "leases", "standalone"] = "auto"
    """How partitions are owned: ``leases`` (JetStream KV leases shared with other workers),
    ``standalone`` (this worker owns every partition; run one worker only) or ``auto`` (leases
    when the server has JetStream, else standalone with a warning)."""
    lease_ttl: int = 3
    """Whole seconds a partition lease lives without renewal (renewed every third of it): the
    bound on taking over from a worker that died. Clients should retry for longer than this."""
    lease_replicas: int = 1
    """Replicas of the lease bucket when this worker creates it (3 in a JetStream cluster)."""
    journal: bool = True
    """Record every turn to the JetStream journal stream (skipped, with a warning, when the
    server has no JetStream)."""
    journal_max_age: float = 7 * 24 * 3600.0
    """Seconds the journal keeps a record (stream ``max_age``)."""
    journal_max_bytes: int = 1024 * 1024 * 1024
    """Bytes the journal stream may hold before the oldest records go (stream ``max_bytes``)."""
    journal_max_pending: int = 10_000
    """Journal records buffered or awaiting acknowledgement before new ones are dropped."""

    def __post_init__(self) -> None:
        """Validate values and say how to fix a bad one."""
        try:
            validate_prefix(self.prefix)
        except InvalidSubjectError as exc:
            raise ValueError(str(exc)) from None
        positive = {
            "partitions": self.partitions,
            "max_active": self.max_active,
            "idle_timeout": self.idle_timeout,
            "scan_interval": self.scan_interval,
            "max_mailbox": self.max_mailbox,
            "handler_timeout": self.handler_timeout,
            "max_payload": self.max_payload,
            "max_key_bytes": self.max_key_bytes,
            "max_value_bytes": self.max_value_bytes,
            "max_keys_per_call": self.max_keys_per_call,
            "drain_timeout": self.drain_timeout,
            "idempotency_window": self.idempotency_window,
            "alarm_max_attempts": self.alarm_max_attempts,
            "alarm_initial_backoff": self.alarm_initial_backoff,
            "lease_ttl": self.lease_ttl,
            "lease_replicas": self.lease_replicas,
            "journal_max_age": self.journal_max_age,
            "journal_max_bytes": self.journal_max_bytes,
            "journal_max_pending": self.journal_max_pending,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.partitions > 4096:
            raise ValueError(f"partitions must be <= 4096, got {self.partitions}")
        if self.ownership not in ("auto", "leases", "standalone"):
            raise ValueError(
                f"ownership must be 'auto', 'leases' or 'standalone', got {self.ownership!r}"
            )
