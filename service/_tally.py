"""Per-request metrics kept in plain dicts and turned into Prometheus samples at scrape time.

``prometheus_client``'s Counter and Histogram take a lock on every increment: a counter
increment plus a histogram observation cost 2.8 µs per request even with cached label children,
against 0.8 µs for these tallies (in-process loop of 300,000 of each on this machine), a few per
cent of the worker's CPU per request. The worker updates its metrics
from the event loop thread only, so a dict of floats needs no lock; the scrape (the metrics
HTTP server's thread) copies the dict (atomic under the GIL) and builds the samples. A scrape
racing an update can see a histogram's ``_sum`` one observation ahead of its buckets; counts are
taken from the buckets so ``_count`` and the ``+Inf`` bucket always agree.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import pairwise

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["CounterTally", "HistogramTally"]


class CounterTally:
    """A labelled counter (``<name>_total``); ``inc`` from the event loop thread only."""

    # Configuration
    _name: str
    _documentation: str
    _labelnames: list[str]
    # State
    _values: dict[tuple[str, ...], float]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        """Create the counter and register it on ``registry``."""
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._values = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` to the series of ``labels`` (one value per label name, in order)."""
        values = self._values
        values[labels] = values.get(labels, 0.0) + amount

    def describe(self) -> list[Metric]:
        """The metric family without samples (for the registry's duplicate-name check)."""
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        """The metric family with one sample per label set seen so far."""
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(list(labels), value)
        yield family


class HistogramTally:
    """A labelled histogram with fixed bucket bounds; ``observe`` from the event loop only."""

    # Configuration
    _name: str
    _documentation: str
    _labelnames: list[str]
    _bounds: list[float]
    """Upper bounds of the buckets, ascending (``+Inf`` is implied)."""
    _bound_texts: list[str]
    # State
    _series: dict[tuple[str, ...], list[float]]
    """Per label set: observations per bucket (not cumulative; the last is above every
    bound), then the sum of the observed values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        """Create the histogram and register it on ``registry``.

        Raises:
            ValueError: ``buckets`` is empty or not strictly ascending.
        """
        bounds = [float(b) for b in buckets if b != float("inf")]
        if not bounds or any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"buckets must be ascending upper bounds, got {list(buckets)}")
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = bounds
        self._bound_texts = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self._series = {}
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Count ``value`` in the series of ``labels``."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
        series[bisect_left(self._bounds, value)] += 1  # first bucket whose bound is >= value
        series[-1] += value

    def describe(self) -> list[Metric]:
        """The metric family without samples (for the registry's duplicate-name check)."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        """The metric family: cumulative buckets, ``_count`` and ``_sum`` per label set."""
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, series in list(self._series.items()):
            counts = list(series)  # a copy: the loop thread may go on observing
            cumulative, buckets = 0.0, []
            for text, count in zip(self._bound_texts, counts, strict=False):
                cumulative += count
                buckets.append((text, cumulative))
            buckets.append(("+Inf", cumulative + counts[len(self._bounds)]))
            family.add_metric(list(labels), buckets, sum_value=counts[-1])
        yield family
