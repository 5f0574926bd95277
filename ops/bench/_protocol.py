"""How the harness talks to a load generator: the job, the result, the latency histogram.

Kept apart because both sides import it: the harness, and the generators that run in *other*
processes (the Python one imports this module; the Node.js one mirrors it). The harness spawns
them, talks to them over stdin/stdout and measures their CPU from ``/proc``.

Load generator protocol (the same for the Node.js and the Python generator, so the baseline and
ndo are always driven by the same code):

1. the harness writes one JSON line, a :class:`LoadJob`;
2. the generator connects, builds its subjects and prints ``ready``;
3. the harness writes ``go`` (after sampling CPU counters), the generator runs the job and prints
   one JSON line, a :class:`LoadResult`;
4. the harness samples CPU again and closes stdin; the generator exits.

A job either runs ``duration`` seconds picking objects at random (``mode="random"``), or touches
each of its ``count`` objects once, in order (``mode="once"``), bounded by ``duration`` too. Every
reply must be a JSON number (Counter ``get``/``increment`` and the baseline both answer one); the
generator keeps, per object, the number of numeric replies and their sum, and counts replies that
did not increase per object when ``increasing`` is set (an object's replies leave in commit
order, so one connection must see them strictly increasing). The harness turns those into the
correctness check. Latencies go into a log histogram with 1% wide buckets.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import msgspec

__all__ = [
    "ERROR_CODE_HEADER",
    "HISTOGRAM_BASE",
    "LoadJob",
    "LoadResult",
    "bucket_value_ms",
    "latency_bucket",
]

HISTOGRAM_BASE: Final = 1.01
"""Latency bucket ``k`` holds latencies in ``[BASE**k, BASE**(k+1))`` microseconds."""

ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
"""Reply header carrying a ``ServiceError``'s code (an error reply, not a number)."""


class LoadJob(msgspec.Struct, frozen=True, kw_only=True):
    """What one load generator process does (written to its stdin as one JSON line)."""

    url: str
    """NATS server URL."""
    subject: str
    """Request subject with ``{id}`` where the object id goes, e.g. ``ndo.rpc.Counter.{id}.get``."""
    id_prefix: str
    """Object ids are ``f"{id_prefix}{first + k}"`` for ``k`` in ``range(count)``."""
    first: int
    """Number of the generator's first object."""
    count: int
    """How many objects (the per-object arrays of the result have this length)."""
    body: str
    """Request body (JSON text)."""
    inflight: int
    """Requests kept in flight by this process."""
    mode: Literal["random", "once"]
    """``random``: pick objects at random for ``duration`` s; ``once``: each object once."""
    duration: float
    """Seconds to run (``random``), or the most seconds to take (``once``)."""
    timeout_ms: int
    """Per-request timeout in milliseconds."""
    increasing: bool
    """Count per-object replies that are not larger than the previous one."""
    seed: int
    """Seed of the object picker (``random`` mode)."""


class LoadResult(msgspec.Struct, kw_only=True):
    """What a generator reports after its run (one JSON line on stdout)."""

    ok: int = 0
    """Successful replies."""
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    """Failed requests by kind: an error code (``503``), ``timeout``, ``no_responders``..."""
    elapsed: float = 0.0
    """Seconds from ``go`` to the last reply."""
    hist: dict[int, int] = msgspec.field(default_factory=dict)
    """Latency histogram: bucket (see ``HISTOGRAM_BASE``) -> count."""
    obj_n: list[int] = msgspec.field(default_factory=list)
    """Numeric replies per object."""
    obj_sum: list[int] = msgspec.field(default_factory=list)
    """Sum of the numeric replies per object."""
    violations: int = 0
    """Replies that did not increase for their object (``increasing`` jobs)."""
    fatal: str | None = None
    """Set when the generator itself failed (could not connect, ...)."""


def bucket_value_ms(bucket: int) -> float:
    """Representative latency of a histogram bucket (its geometric middle), in milliseconds."""
    return float(HISTOGRAM_BASE ** (bucket + 0.5) / 1000.0)


def latency_bucket(latency_us: float) -> int:
    """The histogram bucket of a latency in microseconds (the Node.js generator's formula)."""
    return int(math.log(max(latency_us, 1.0)) / _LOG_BASE)


_LOG_BASE: Final = math.log(HISTOGRAM_BASE)
