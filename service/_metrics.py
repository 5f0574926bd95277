"""Prometheus metrics of one worker, on a registry passed in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["WorkerMetrics"]

_LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class WorkerMetrics:
    """Every ``ndo_*`` metric. Labels: class, method, outcome — never object ids."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the metrics on ``registry`` (a fresh private one when omitted)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ndo_requests_total",
            "Requests handled, by class, method and outcome (ok or an error type).",
            ["class_name", "method", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "ndo_request_duration_seconds",
            "Time from a request's arrival to its reply (after commit), by class and method.",
            ["class_name", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_objects = Gauge(
            "ndo_active_objects", "Objects currently in memory.", registry=r
        )
        self.activations = Counter(
            "ndo_activations_total",
            "Objects activated (loaded into memory).",
            ["class_name"],
            registry=r,
        )
        self.evictions = Counter(
            "ndo_evictions_total",
            "Objects evicted from memory, by reason.",
            ["reason"],
            registry=r,
        )
        self.commits = Counter(
            "ndo_commits_total", "Storage transactions committed (one fsync each).", registry=r
        )
        self.commit_failures = Counter(
            "ndo_commit_failures_total", "Storage transactions that failed.", registry=r
        )
        self.commit_write_sets = Histogram(
            "ndo_commit_write_sets",
            "Write-sets per storage transaction (the group-commit factor).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "ndo_commit_duration_seconds",
            "Duration of one storage transaction.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.events = Counter(
            "ndo_events_published_total",
            "Events published after commit.",
            ["class_name"],
            registry=r,
        )
        self.idempotent_replays = Counter(
            "ndo_idempotent_replays_total",
            "Requests answered from a stored reply because their idempotency key was seen.",
            ["class_name"],
            registry=r,
        )
        self.alarms = Counter(
            "ndo_alarms_total",
            "Alarm deliveries, by class and outcome.",
            ["class_name", "outcome"],
            registry=r,
        )
        self.journal_records = Counter(
            "ndo_journal_records_total",
            "Journal records stored (acknowledged by the JetStream journal stream).",
            registry=r,
        )
        self.journal_failures = Counter(
            "ndo_journal_failures_total",
            "Journal records lost, by reason (dropped, no_stream, rejected, timeout, "
            "publish_error, encode_error, too_large); requests are never affected.",
            ["reason"],
            registry=r,
        )
