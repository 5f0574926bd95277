"""Prometheus metrics of one worker, on a registry passed in (never the global one).

The two metrics every request updates (``requests``, ``request_seconds``) are lock-free tallies
(``service._tally``). The others are looked up through a small cache of label children:
``labels(...)`` builds and hashes the label values and takes a lock on every call.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ndo.service._tally import CounterTally, HistogramTally

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

_MAX_CACHED_CHILDREN: Final = 4096
"""Label children kept per cache; a full cache is emptied (labels are classes, methods and error
types, so this is only reached with many classes)."""


class WorkerMetrics:
    """Every ``ndo_*`` metric. Labels: class, method, outcome — never object ids."""

    # Caches of label children, by metric and label values
    _counters: dict[tuple[Counter, tuple[str, ...]], Counter]
    _histograms: dict[tuple[Histogram, tuple[str, ...]], Histogram]

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the metrics on ``registry`` (a fresh private one when omitted)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # The two metrics every request updates are lock-free tallies (see service._tally).
        self.requests = CounterTally(
            "ndo_requests_total",
            "Requests handled, by class, method and outcome (ok or an error type).",
            ["class_name", "method", "outcome"],
            registry=r,
        )
        self.request_seconds = HistogramTally(
            "ndo_request_duration_seconds",
            "Time from a request's arrival to its reply (after commit), by class and method.",
            ["class_name", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._counters = {}
        self._histograms = {}
        self.rejected = Counter(
            "ndo_rejected_total",
            "Messages dropped without an answer, by reason (reply_subject: the request named a "
            "reply subject outside the allowed inbox prefixes).",
            ["reason"],
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
        self.on_stop = Counter(
            "ndo_on_stop_total",
            "on_stop hooks run as an object left memory, by class and outcome (ok, an error "
            "type, or fenced: its writes were refused because its partition had moved).",
            ["class_name", "outcome"],
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
        self.partitions_held = Gauge(
            "ndo_partitions_held", "Partitions this worker serves.", registry=r
        )
        self.partition_moves = Counter(
            "ndo_partition_moves_total",
            "Partitions this worker acquired, released after draining, or lost.",
            ["change"],
            registry=r,
        )
        self.journal_failures = Counter(
            "ndo_journal_failures_total",
            "Journal records lost, by reason (dropped, no_stream, rejected, timeout, "
            "publish_error, encode_error, too_large); requests are never affected.",
            ["reason"],
            registry=r,
        )

        self.log_appends = Counter(
            "ndo_log_appends_total",
            "Partition log records appended (--storage replicated), by outcome: ok, fenced "
            "(the log moved on: another tenure), failed (refused or unacknowledged).",
            ["outcome"],
            registry=r,
        )
        self.log_append_seconds = Histogram(
            "ndo_log_append_seconds",
            "Time from a partition log append (one record, or one atomic batch of a group "
            "commit's records) to its acknowledgement, retries included.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.restored_records = Counter(
            "ndo_log_restored_records_total",
            "Partition log records applied while catching a partition up before serving it.",
            registry=r,
        )
        self.snapshots = Counter(
            "ndo_snapshots_total",
            "Partition snapshots stored (the log is purged below each).",
            registry=r,
        )
        self.object_calls = Counter(
            "ndo_object_calls_total",
            "Calls objects made to other objects (Actor.call), by calling class, called class "
            "and outcome (ok or an error type).",
            ["class_name", "target_class", "outcome"],
            registry=r,
        )
        self.background_failures = Counter(
            "ndo_background_failures_total",
            "Passes of a background task that failed, by task (idempotency_purge); the task "
            "goes on at its next interval, and the failure is logged as a warning.",
            ["task"],
            registry=r,
        )

    def count(self, counter: Counter, *labels: str, amount: float = 1.0) -> None:
        """``counter.labels(*labels).inc(amount)``, through the cache of label children."""
        key = (counter, labels)
        child = self._counters.get(key)
        if child is None:
            if len(self._counters) >= _MAX_CACHED_CHILDREN:
                self._counters.clear()
            child = self._counters[key] = counter.labels(*labels)
        child.inc(amount)

    def observe(self, histogram: Histogram, value: float, *labels: str) -> None:
        """``histogram.labels(*labels).observe(value)``, through the cache of label children."""
        key = (histogram, labels)
        child = self._histograms.get(key)
        if child is None:
            if len(self._histograms) >= _MAX_CACHED_CHILDREN:
                self._histograms.clear()
            child = self._histograms[key] = histogram.labels(*labels)
        child.observe(value)
