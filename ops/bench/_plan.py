"""What one ``ndo bench`` run measures: the scenarios, the storage modes, the levels, the counts,
the generator.

A module of its own because the plan is a value object every other part of the harness reads,
and the command line builds it (``--quick`` starts from ``QUICK_PLAN`` instead of ``FULL_PLAN``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

import msgspec

from ndo.ops._loop import resolve_loop
from ndo.ops.bench._storage_modes import STORAGE_MODES, storage_mode
from ndo.subjects import DEFAULT_PARTITIONS

__all__ = [
    "BASELINE_OF",
    "FULL_PLAN",
    "LOCAL_ONLY_SCENARIOS",
    "QUICK_PLAN",
    "SCENARIOS",
    "BenchPlan",
    "LoadKind",
]

SCENARIOS: Final = ("read", "spread", "hot", "cold", "idle-memory")
"""Scenario names, in the order they run."""

LOCAL_ONLY_SCENARIOS: Final = ("idle-memory",)
"""Scenarios measured with local storage only: what they measure (memory per idle object) does
not depend on where partitions are durable."""

BASELINE_OF: Final = {"read": "read", "spread": "spread", "hot": "hot", "cold": "read"}
"""The baseline workload each scenario's ratios are against: the same scenario on the in-memory
counter responder, except ``cold``, which has no in-memory counterpart (nothing is ever loaded
from storage there) and compares with the baseline's ``read`` (a ``get()`` of a known counter)
at the same level. ``idle-memory`` has no ratio."""

LoadKind = Literal["auto", "node", "python"]
"""``--load``: which load generator drives the requests."""


class BenchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``ndo bench`` run measures (built from the flags; ``--quick`` shrinks it)."""

    scenarios: tuple[str, ...] = SCENARIOS
    """Scenarios to run, from ``SCENARIOS``."""
    storage: tuple[str, ...] = ("local",)
    """Storage modes every scenario runs in, from ``STORAGE_MODES`` (``local``, ``r1``: replicated
    on one server, ``r3``: replicated on a 3-server loopback cluster); each scenario runs in
    every mode before the next scenario starts, so the modes' rows are close in time."""
    levels: tuple[int, ...] = (1, 16, 64, 256)
    """Total requests in flight, one run per level."""
    duration: float = 5.0
    """Seconds of each measured run."""
    warmup: float = 1.0
    """Seconds of the unmeasured run before each measured one (checked all the same)."""
    objects: int = 1_000
    """Objects of the ``read`` and ``spread`` scenarios."""
    cold_objects: int = 100_000
    """Objects the ``cold`` scenario touches once each (split across the levels)."""
    cold_max_active: int = 2_000
    """The worker's ``--max-active`` in the ``cold`` scenario (forces eviction)."""
    idle_objects: int = 10_000
    """Objects per batch in ``idle-memory`` (two batches; the second one is measured)."""
    partitions: int = DEFAULT_PARTITIONS
    """Partition count of the worker (and of the pre-populated database)."""
    clients: int = 2
    """Load generator processes (at most one per request in flight)."""
    load: LoadKind = "auto"
    """Generator: ``node`` (needs node and the nats npm package), ``python``, or ``auto``."""
    node_modules: Path | None = None
    """A ``node_modules`` folder holding the ``nats`` npm package, tried first; then
    ``$NDO_NODE_MODULES``, then ``./node_modules`` of the working directory."""
    baseline_twice: bool = True
    """Run the baseline's scenarios (``baseline_workloads``) before and after the ndo
    scenarios and average the two runs of each scenario and level (noise)."""
    jetstream: bool = True
    """Run nats-server with JetStream, as deployed (workers may then use leases and a journal)."""
    loop: str = "auto"
    """Event loop of the workers and of the baseline responder, the same for both (``--loop``
    of ``ndo serve``: auto, asyncio or uvloop)."""
    worker_args: tuple[str, ...] = ()
    """Extra ``ndo serve`` arguments for every worker."""
    work_dir: Path | None = None
    """Parent of the run's temporary directory (default: the system's)."""
    keep: bool = False
    """Keep the run directory (logs, SQLite) instead of deleting it."""

    def __post_init__(self) -> None:
        """Validate values and say how to fix a bad one."""
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
        if not self.storage or len(set(self.storage)) != len(self.storage):
            raise ValueError(
                f"storage modes must be distinct and at least one, got {list(self.storage)}; "
                f"choose from {', '.join(STORAGE_MODES)}"
            )
        modes = [storage_mode(name) for name in self.storage]  # unknown names raise
        if not self.jetstream and any(mode.replicated for mode in modes):
            raise ValueError("replicated storage (r1, r3) needs JetStream: drop --no-jetstream")
        if not self.levels or any(level < 1 for level in self.levels):
            raise ValueError(f"in-flight levels must be >= 1, got {self.levels}")
        for name in ("duration", "objects", "cold_objects", "cold_max_active", "idle_objects"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 seconds, got {self.warmup}")
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if self.cold_objects < 2 * len(self.levels):
            raise ValueError(f"cold_objects must be >= {2 * len(self.levels)} (two per level)")
        resolve_loop(self.loop)  # unknown, or uvloop without uvloop installed

    def scenarios_for(self, mode: str) -> tuple[str, ...]:
        """The plan's scenarios that run in storage mode ``mode``."""
        if mode == "local":
            return self.scenarios
        return tuple(s for s in self.scenarios if s not in LOCAL_ONLY_SCENARIOS)

    def baseline_workloads(self) -> tuple[str, ...]:
        """The scenarios the baseline responder runs (in ``SCENARIOS`` order): those of the
        plan's scenarios that have a baseline (``BASELINE_OF``), ``read`` for ``cold``."""
        wanted = {BASELINE_OF[s] for s in self.scenarios if s in BASELINE_OF}
        return tuple(s for s in SCENARIOS if s in wanted)


QUICK_PLAN: Final = BenchPlan(
    levels=(1, 64),
    duration=1.5,
    warmup=0.5,
    cold_objects=4_000,
    cold_max_active=500,
    idle_objects=1_000,
    baseline_twice=False,
)
"""``--quick``: two levels, short runs, small object counts, the baseline once (about 40 s on
two cores)."""

FULL_PLAN: Final = BenchPlan()
"""The default: every level, 5 s runs, 100,000 cold objects (a few minutes)."""
