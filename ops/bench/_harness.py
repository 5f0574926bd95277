"""One run end to end: the run directory, the process tree, the baseline and every scenario.

This is where the parts meet: the harness starts nats-server and the baseline responder, starts
one ``Deployment`` per storage mode (its servers and pre-populated storage), runs the baseline's
scenarios (``read``, ``spread``, ``hot``: the same runs and checks as the worker's), then each
scenario in every mode in turn against fresh workers, then (``baseline_twice``) the baseline's
again; fills in the ratios against the baseline (and, for the replicated modes, against local
storage) and assembles the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._errors import BenchError
from ndo.ops.bench._checks import check_increments, check_reads
from ndo.ops.bench._deployment import Deployment
from ndo.ops.bench._driver import REQUEST_TIMEOUT_MS, LoadDriver, Outcome
from ndo.ops.bench._objects import (
    BASELINE_PREFIX,
    CLASS,
    COLD_IDS,
    GET_BODY,
    HOT_IDS,
    IDLE_IDS,
    IDLE_WARM_OBJECTS,
    INCREMENT_BODY,
    PREFIX,
    READ_IDS,
    SPREAD_IDS,
    VALUE_KEY,
    ping_ids,
    stored_value,
)
from ndo.ops.bench._plan import BenchPlan
from ndo.ops.bench._proc import rss_bytes
from ndo.ops.bench._processes import Child, Worker, start_baseline
from ndo.ops.bench._progress import progress
from ndo.ops.bench._protocol import ERROR_CODE_HEADER
from ndo.ops.bench._report import describe_machine, evaluate_targets
from ndo.ops.bench._rows import (
    PROBLEMS_SHOWN,
    BaselineKey,
    apply_baseline_ratios,
    apply_local_ratios,
    as_baseline_row,
    describe,
    make_row,
    merge_baseline_runs,
    sort_rows,
)
from ndo.ops.bench._servers import NatsServers
from ndo.ops.bench._storage_modes import storage_mode

__all__ = ["Bench", "run_harness"]

Record = Callable[[dict[str, Any]], None]
"""Where a scenario's rows go as they are made (a progress line, the report)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What a measured run drives: the baseline responder or an ndo worker."""

    nc: NatsClient
    """The harness's connection, for its own requests (values before and after a run)."""
    prefix: str
    """Subject prefix: ``<prefix>.rpc.Counter.<id>.<method>``."""
    driver: LoadDriver
    """The load generators reaching it."""
    pid: int
    """The responding process, whose CPU the rows' worker columns count."""
    worker: Worker | None = None
    """The ndo worker (its metrics are scraped around each run); ``None`` for the baseline."""


class Bench:
    """One run of the harness: the process tree, the scenarios, the rows."""

    def __init__(self, plan: BenchPlan, run_dir: Path) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        """The ndo rows while the run goes on; every row (baseline first) once it is done."""
        self.baseline_runs: dict[BaselineKey, list[dict[str, Any]]] = {}
        """The baseline's rows of each workload and level (two with ``baseline_twice``)."""
        self.server = NatsServers.single(run_dir / "nats", jetstream=plan.jetstream)
        self.deployments: list[Deployment] = []
        self.driver: LoadDriver | None = None
        """Drives the baseline responder, on the bench's own server."""
        self.baseline: Child | None = None
        self._nc: NatsClient | None = None
        """The harness's connection to the bench's server (the baseline's seed and values)."""
        self._baseline_seeded = False

    async def run(self) -> list[dict[str, Any]]:
        """Start the process tree, run the baseline and the scenarios, return the rows."""
        plan = self.plan
        await self.server.start()
        try:
            progress(f"nats-server {self.server.url} (pid {self.server.pids[0]}); loading storage")
            for name in plan.storage:
                mode = storage_mode(name)
                deployment = Deployment(
                    mode, plan, self.run_dir, self.server if name == "local" else None
                )
                self.deployments.append(deployment)
                await deployment.start()
            self.driver = LoadDriver(plan, self.server.url, self.run_dir, self.server.pids)
            if self.driver.choice.fallback is not None:
                progress(self.driver.choice.fallback)
            progress(f"load generator: {self.driver.kind}, up to {plan.clients} processes")
            workloads = plan.baseline_workloads()
            if workloads:
                self._nc = await nats.connect(self.server.client_url, connect_timeout=5)
                self.baseline = await start_baseline(self.server.url, self.run_dir, plan.loop)
                progress(f"baseline responder pid {self.baseline.pid}: {', '.join(workloads)}")
                await self._baseline_pass(workloads)
            for scenario in plan.scenarios:
                for deployment in self.deployments:
                    if scenario not in plan.scenarios_for(deployment.mode.name):
                        continue
                    await getattr(self, "_scenario_" + scenario.replace("-", "_"))(deployment)
            if workloads and plan.baseline_twice:
                await self._baseline_pass(workloads)
            self._finish()
        finally:
            if self.baseline is not None:
                await self.baseline.stop()
            if self._nc is not None:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await self._nc.close()
            for deployment in self.deployments:
                await deployment.stop()
            await self.server.stop()
        return self.rows

    def _finish(self) -> None:
        """Average the baseline runs, fill in every row's ratios, put the rows in order."""
        merged = merge_baseline_runs(self.baseline_runs)
        apply_baseline_ratios(self.rows, merged)
        apply_local_ratios(self.rows)
        self.rows = sort_rows([*merged.values(), *self.rows])

    # Baseline

    def _baseline_target(self) -> Target:
        assert self.driver is not None and self.baseline is not None and self._nc is not None
        return Target(self._nc, BASELINE_PREFIX, self.driver, self.baseline.pid)

    async def _baseline_pass(self, workloads: tuple[str, ...]) -> None:
        """Run the baseline responder through ``workloads``, each at every level."""
        target = self._baseline_target()
        for workload in workloads:
            record = functools.partial(self._record_baseline, workload)
            if workload == "read":
                await self._seed_baseline_reads(target)
                await self._reads(target, record)
            else:
                await self._increments(target, workload, record)

    async def _seed_baseline_reads(self, target: Target) -> None:
        """Give the responder's ``read`` objects their stored values (once): it starts with
        none, so one ``increment(by=stored value)`` each."""
        if self._baseline_seeded:
            return
        count = self.plan.objects
        bodies = [f'{{"by":{stored_value(n)}}}' for n in range(count)]
        await self._call_all(target, "increment", READ_IDS, bodies)
        self._baseline_seeded = True

    def _record_baseline(self, workload: str, row: dict[str, Any]) -> None:
        row = as_baseline_row(workload, row)
        self.baseline_runs.setdefault((workload, row["inflight"]), []).append(row)
        assert self.baseline is not None
        progress(describe(row) + f" (baseline pid {self.baseline.pid})")

    # Shared by the baseline and the worker

    async def _call_all(
        self, target: Target, method: str, id_prefix: str, bodies: list[str]
    ) -> list[int]:
        """Call ``method`` once on objects ``0..len(bodies)-1`` (64 at a time), object ``n``
        with ``bodies[n]``; return the numeric replies.

        Raises:
            BenchError: a request failed or a reply was an error.
        """
        values = [0] * len(bodies)
        limit = asyncio.Semaphore(64)

        async def call(number: int) -> None:
            async with limit:
                msg = await target.nc.request(
                    f"{target.prefix}.rpc.{CLASS}.{id_prefix}{number}.{method}",
                    bodies[number].encode(),
                    timeout=REQUEST_TIMEOUT_MS / 1000,
                )
            if msg.headers and msg.headers.get(ERROR_CODE_HEADER):
                raise BenchError(f"{method}() of {id_prefix}{number} failed: {msg.data!r}")
            values[number] = int(msgspec.json.decode(msg.data))

        try:
            async with asyncio.TaskGroup() as group:
                for number in range(len(bodies)):
                    group.create_task(call(number))
        except* (BenchError, nats.errors.Error) as errors:
            first = errors.exceptions[0]
            raise BenchError(f"{first} (and {len(errors.exceptions) - 1} more)") from None
        return values

    async def _values(self, target: Target, id_prefix: str, count: int) -> list[int]:
        """Read ``count`` counters with ``get()`` (64 at a time); also activates them."""
        return await self._call_all(target, "get", id_prefix, [GET_BODY] * count)

    async def _drive(
        self,
        target: Target,
        *,
        method: str,
        id_prefix: str,
        first: int,
        count: int,
        inflight: int,
        mode: Literal["random", "once"],
        duration: float,
    ) -> Outcome:
        return await target.driver.run(
            subject=f"{target.prefix}.rpc.{CLASS}.{{id}}.{method}",
            id_prefix=id_prefix,
            first=first,
            count=count,
            body=INCREMENT_BODY if method == "increment" else GET_BODY,
            inflight=inflight,
            mode=mode,
            duration=duration,
            increasing=method == "increment",
            worker=target.worker,
            worker_pid=target.pid,
        )

    def _durations(self) -> list[float]:
        """Each level's runs: the warm-up (unless 0 s) and the measured one; both are checked."""
        return [d for d in (self.plan.warmup, self.plan.duration) if d]

    async def _reads(self, target: Target, record: Record) -> None:
        """The ``read`` scenario on ``target``: ``get()`` over its pre-populated objects at
        every level; every reply must be the stored value."""
        plan = self.plan
        expected = [stored_value(i) for i in range(plan.objects)]
        values = await self._values(target, READ_IDS, plan.objects)
        problems = check_reads(expected, [1] * plan.objects, values)
        for level in plan.levels:
            outcome: Outcome | None = None
            for duration in self._durations():
                outcome = await self._drive(
                    target,
                    method="get",
                    id_prefix=READ_IDS,
                    first=0,
                    count=plan.objects,
                    inflight=level,
                    mode="random",
                    duration=duration,
                )
                problems += check_reads(expected, outcome.obj_n, outcome.obj_sum)
            assert outcome is not None
            record(make_row("read", level, outcome, problems))
            problems = []

    async def _increments(self, target: Target, scenario: str, record: Record) -> None:
        """The ``spread`` (``increment()`` over ``plan.objects`` objects) or ``hot`` (one
        object) scenario on ``target`` at every level; replies must be exactly the increments
        (sum check), strictly increasing per object on each connection, and the value read
        after each run the one before plus the acknowledged increments."""
        plan = self.plan
        id_prefix, count = (SPREAD_IDS, plan.objects) if scenario == "spread" else (HOT_IDS, 1)
        base = await self._values(target, id_prefix, count)
        for level in plan.levels:
            problems: list[str] = []
            outcome: Outcome | None = None
            for duration in self._durations():
                outcome = await self._drive(
                    target,
                    method="increment",
                    id_prefix=id_prefix,
                    first=0,
                    count=count,
                    inflight=level,
                    mode="random",
                    duration=duration,
                )
                final = await self._values(target, id_prefix, count)
                problems += check_increments(base, outcome.obj_n, outcome.obj_sum, final)
                base = final
            assert outcome is not None
            record(make_row(scenario, level, outcome, problems))

    # ndo scenarios

    @staticmethod
    def _worker_target(dep: Deployment, worker: Worker) -> Target:
        return Target(dep.nc, PREFIX, dep.driver, worker.pid, worker)

    def _record(self, row: dict[str, Any], worker: Worker, dep: Deployment) -> None:
        row["storage"] = dep.mode.name
        self.rows.append(row)
        # The ratios so far, for the progress line (the baseline's first pass has run).
        apply_baseline_ratios([row], merge_baseline_runs(self.baseline_runs))
        apply_local_ratios(self.rows)
        progress(describe(row) + f" (worker pid {worker.pid})")

    async def _scenario_read(self, dep: Deployment) -> None:
        worker = await dep.worker("read")
        try:
            record = functools.partial(self._record, worker=worker, dep=dep)
            await self._reads(self._worker_target(dep, worker), record)
        finally:
            await worker.child.stop()

    async def _worker_increments(self, dep: Deployment, scenario: str) -> None:
        worker = await dep.worker(scenario)
        try:
            record = functools.partial(self._record, worker=worker, dep=dep)
            await self._increments(self._worker_target(dep, worker), scenario, record)
        finally:
            await worker.child.stop()

    async def _scenario_spread(self, dep: Deployment) -> None:
        await self._worker_increments(dep, "spread")

    async def _scenario_hot(self, dep: Deployment) -> None:
        await self._worker_increments(dep, "hot")

    async def _scenario_cold(self, dep: Deployment) -> None:
        plan = self.plan
        worker = await dep.worker("cold", max_active=plan.cold_max_active)
        target = self._worker_target(dep, worker)
        try:
            levels = plan.levels
            warm = min(plan.cold_objects // 10, 1_000)
            # Level 1 gets a smaller share: at one in flight each request costs a round trip.
            weights = [1 if level == 1 else 3 for level in levels]
            rest = plan.cold_objects - warm
            sizes = [rest * w // sum(weights) for w in weights]
            sizes[-1] += rest - sum(sizes)
            first = 0
            slices = [(0, warm, max(levels), True)]
            first = warm
            for level, size in zip(levels, sizes, strict=True):
                slices.append((first, size, level, False))
                first += size
            for start, size, level, is_warmup in slices:
                outcome = await self._drive(
                    target,
                    method="get",
                    id_prefix=COLD_IDS,
                    first=start,
                    count=size,
                    inflight=level,
                    mode="once",
                    duration=600.0,
                )
                expected = [stored_value(n) for n in range(start, start + size)]
                problems = check_reads(expected, outcome.obj_n, outcome.obj_sum)
                untouched = sum(1 for n in outcome.obj_n if n != 1)
                if untouched:
                    problems.insert(0, f"{untouched} objects not read exactly once")
                activations = outcome.metric_delta("ndo_activations_total")
                if activations != outcome.ok:
                    problems.insert(0, f"{activations:.0f} activations for {outcome.ok} cold reads")
                row = make_row("cold", level, outcome, problems)
                if is_warmup:
                    if row["check"] != "ok":
                        row["scenario"] = "cold-warmup"
                        self._record(row, worker, dep)
                    continue
                self._record(row, worker, dep)
        finally:
            await worker.child.stop()

    async def _scenario_idle_memory(self, dep: Deployment) -> None:
        plan = self.plan
        n = plan.idle_objects
        pings = len(ping_ids(plan.partitions))
        worker = await dep.worker("idle-memory", max_active=2 * n + IDLE_WARM_OBJECTS + pings + 100)
        target = self._worker_target(dep, worker)
        try:
            samples: list[int] = []
            problems: list[str] = []
            first = 0
            for size in (IDLE_WARM_OBJECTS, n, n):
                outcome = await self._drive(
                    target,
                    method="get",
                    id_prefix=IDLE_IDS,
                    first=first,
                    count=size,
                    inflight=min(64, max(plan.levels)),
                    mode="once",
                    duration=600.0,
                )
                expected = [stored_value(k) for k in range(first, first + size)]
                problems += check_reads(expected, outcome.obj_n, outcome.obj_sum)
                if outcome.ok != size:
                    problems.append(f"{outcome.ok} of {size} objects activated ({outcome.errors})")
                first += size
                await asyncio.sleep(0.5)  # let replies and garbage settle before sampling
                samples.append(rss_bytes(worker.pid))
            active = (await asyncio.to_thread(worker.metrics)).get("ndo_active_objects", 0.0)
            wanted = 2 * n + IDLE_WARM_OBJECTS + pings
            if active != wanted:
                problems.append(f"{active:.0f} objects active, expected {wanted} (evicted?)")
            per_object = (samples[2] - samples[1]) / n
            sample_id = f"{IDLE_IDS}{n}"
            data = len(sample_id) + len(VALUE_KEY) + len(msgspec.msgpack.encode(stored_value(n)))
            row: dict[str, Any] = {
                "scenario": "idle-memory",
                "inflight": None,
                "rps": None,
                "p50_ms": None,
                "p99_ms": None,
                "ratio": None,
                "cpu_us_per_req": None,
                "server_cpu_us_per_req": None,
                "cpu_ratio": None,
                "objects": n,
                "rss_bytes": samples,
                "bytes_per_object": round(per_object),
                "data_bytes_per_object": data,
                "overhead_bytes_per_object": round(per_object - data),
                "all_objects_bytes_per_object": round((samples[2] - samples[0]) / (2 * n)),
                "check": "ok" if not problems else "; ".join(problems[:PROBLEMS_SHOWN]),
            }
            self._record(row, worker, dep)
        finally:
            await worker.child.stop()


def _make_run_dir(work_dir: Path | None) -> Path:
    """A fresh run directory in ``work_dir`` (default: the system's temporary directory).

    Absolute, because the children run in it and get paths inside it: their working directory
    is the run directory, not the harness's.
    """
    return Path(tempfile.mkdtemp(prefix="ndo-bench-", dir=work_dir)).absolute()


async def run_harness(plan: BenchPlan) -> dict[str, Any]:
    """Run ``plan`` in a fresh run directory and return the report (removes the directory
    unless ``plan.keep``).

    Raises:
        BenchError: the harness could not run (a process did not start, a generator failed).
    """
    run_dir = _make_run_dir(plan.work_dir)
    load_before = os.getloadavg()
    try:
        bench = Bench(plan, run_dir)
        rows = await bench.run()
        assert bench.driver is not None
        return {
            "results": rows,
            "targets": evaluate_targets(rows),
            "machine": {
                **describe_machine(plan, bench.driver.kind),
                "loadavg_before": [round(x, 2) for x in load_before],
            },
            "plan": msgspec.to_builtins(plan, enc_hook=str),
            "ok": all(row["check"] == "ok" for row in rows),
        }
    finally:
        if plan.keep:
            progress(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
