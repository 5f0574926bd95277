"""The lock-free per-request metrics export the same Prometheus samples a Counter and a
Histogram would: same names, labels, cumulative buckets, ``_count`` and ``_sum``."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ndo.service._tally import CounterTally, HistogramTally

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
VALUES = [0.0005, 0.001, 0.002, 0.01, 0.5, 1.0, 3.0, 20.0, 0.05]


def _samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample except ``_created`` (the tallies do not keep creation times)."""
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_samples_as_prometheus_client() -> None:
    """Fed the same observations, tally and prometheus_client export identical samples."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = CounterTally("x_requests_total", "doc", ["c", "m"], registry=ours)
    histogram = HistogramTally("x_seconds", "doc", ["c"], buckets=BUCKETS, registry=ours)
    reference_counter = Counter("x_requests_total", "doc", ["c", "m"], registry=theirs)
    reference_histogram = Histogram("x_seconds", "doc", ["c"], buckets=BUCKETS, registry=theirs)
    for i, value in enumerate(VALUES):
        labels = ("A", "get") if i % 3 else ("B", "put")
        counter.inc(labels)
        reference_counter.labels(*labels).inc()
        counter.inc(("A", "get"), 2.5)
        reference_counter.labels("A", "get").inc(2.5)
        histogram.observe((labels[0],), value)
        reference_histogram.labels(labels[0]).observe(value)
    assert _samples(ours) == _samples(theirs)
    text = generate_latest(ours).decode()
    assert "# TYPE x_requests_total counter" in text
    assert 'x_seconds_bucket{c="A",le="+Inf"}' in text


def test_bucket_bounds_are_inclusive() -> None:
    """A value equal to a bound counts in that bound's bucket (``le``)."""
    registry = CollectorRegistry()
    histogram = HistogramTally("y_seconds", "doc", [], buckets=(1.0, 2.0), registry=registry)
    histogram.observe((), 1.0)
    histogram.observe((), 2.5)
    assert registry.get_sample_value("y_seconds_bucket", {"le": "1.0"}) == 1
    assert registry.get_sample_value("y_seconds_bucket", {"le": "2.0"}) == 1
    assert registry.get_sample_value("y_seconds_bucket", {"le": "+Inf"}) == 2
    assert registry.get_sample_value("y_seconds_count") == 2
    assert registry.get_sample_value("y_seconds_sum") == 3.5


def test_bad_buckets() -> None:
    """Buckets must be ascending."""
    with pytest.raises(ValueError, match="ascending"):
        HistogramTally("z", "doc", [], buckets=(2.0, 1.0), registry=CollectorRegistry())
