"""One run end to end: the run directory, the process tree, the baseline and every scenario.

This is where the parts meet: the harness starts nats-server and the baseline, starts one
``Deployment`` per storage mode (its servers and pre-populated storage), runs each scenario in
every mode in turn against fresh workers, fills in the ratios against the baseline (and, for the
replicated modes, against local storage) and assembles the report.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import msgspec
import nats.errors

from ndo.ops._errors import BenchError
from ndo.ops.bench._checks import check_increments, check_reads
from ndo.ops.bench._deployment import Deployment
from ndo.ops.bench._driver import REQUEST_TIMEOUT_MS, LoadDriver, Outcome
from ndo.ops.bench._objects import (
    BASELINE_IDS,
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
from ndo.ops.bench._rows import PROBLEMS_SHOWN, describe, make_row
from ndo.ops.bench._servers import NatsServers
from ndo.ops.bench._storage_modes import storage_mode

__all__ = ["Bench", "run_harness"]


class Bench:
    """One run of the harness: the process tree, the scenarios, the rows."""

    def __init__(self, plan: BenchPlan, run_dir: Path) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.baseline_runs: dict[int, list[dict[str, Any]]] = {}
        self.server = NatsServers.single(run_dir / "nats", jetstream=plan.jetstream)
        self.deployments: list[Deployment] = []
        self.driver: LoadDriver | None = None
        """Drives the baseline responder, on the bench's own server."""
        self.baseline: Child | None = None

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
            self.baseline = await start_baseline(self.server.url, self.run_dir, plan.loop)
            progress(f"baseline responder pid {self.baseline.pid}")
            await self._baseline_pass()
            for scenario in plan.scenarios:
                for deployment in self.deployments:
                    if scenario not in plan.scenarios_for(deployment.mode.name):
                        continue
                    await getattr(self, "_scenario_" + scenario.replace("-", "_"))(deployment)
            if plan.baseline_twice:
                await self._baseline_pass()
            self._finish_baseline()
            self._finish_storage()
        finally:
            if self.baseline is not None:
                await self.baseline.stop()
            for deployment in self.deployments:
                await deployment.stop()
            await self.server.stop()
        return self.rows

    # Baseline

    async def _baseline_pass(self) -> None:
        assert self.driver is not None and self.baseline is not None
        for level in self.plan.levels:
            outcome = None
            for duration in (self.plan.warmup, self.plan.duration):
                if not duration:
                    continue
                outcome = await self.driver.run(
                    subject=f"{BASELINE_PREFIX}.rpc.{CLASS}.{{id}}.increment",
                    id_prefix=BASELINE_IDS,
                    first=0,
                    count=self.plan.objects,
                    body=INCREMENT_BODY,
                    inflight=level,
                    mode="random",
                    duration=duration,
                    increasing=False,
                    worker=None,
                    worker_pid=self.baseline.pid,
                )
            assert outcome is not None
            problems = [] if sum(outcome.obj_sum) == outcome.ok else ["baseline replies wrong"]
            row = make_row("baseline", level, outcome, problems)
            for key in ("transactions_per_s", "writes_per_s", "writes_per_tx"):
                row[key] = None
            self.baseline_runs.setdefault(level, []).append(row)
            progress(describe(row) + f" (baseline pid {self.baseline.pid})")

    def _finish_baseline(self) -> None:
        """Average the baseline runs of each level and fill in every row's ratios."""
        merged: dict[int, dict[str, Any]] = {}
        for level, runs in self.baseline_runs.items():
            row = dict(runs[0])
            if len(runs) > 1:
                for key in ("rps", "cpu_us_per_req", "p50_ms", "p99_ms"):
                    values = [r[key] for r in runs if r[key] is not None]
                    row[key] = round(sum(values) / len(values), 3) if values else None
                row["rps_runs"] = [r["rps"] for r in runs]
                row["cpu_us_per_req_runs"] = [r["cpu_us_per_req"] for r in runs]
                bad = [r["check"] for r in runs if r["check"] != "ok"]
                row["check"] = "; ".join(bad) if bad else "ok"
            row["ratio"] = 1.0
            row["cpu_ratio"] = 1.0
            merged[level] = row
        for row in self.rows:
            base = merged.get(row["inflight"])
            if base is None or row["scenario"] == "idle-memory":
                continue
            if base["rps"]:
                row["ratio"] = round(row["rps"] / base["rps"], 3)
            if base["cpu_us_per_req"]:
                row["cpu_ratio"] = round(row["cpu_us_per_req"] / base["cpu_us_per_req"], 3)
            if base["p99_ms"] and row["p99_ms"] is not None:
                row["p99_ratio"] = round(row["p99_ms"] / base["p99_ms"], 3)
        self.rows[:0] = [merged[level] for level in sorted(merged)]

    def _finish_storage(self) -> None:
        """Fill in each replicated row's ratios to the local row of its scenario and level."""
        local = {
            (row["scenario"], row["inflight"]): row
            for row in self.rows
            if row.get("storage") == "local"
        }
        for row in self.rows:
            if row.get("storage") in (None, "local") or row["scenario"] == "idle-memory":
                continue
            ref = local.get((row["scenario"], row["inflight"]))
            if ref is None:
                continue
            for key, ratio_key in (
                ("rps", "local_ratio"),
                ("p99_ms", "p99_local_ratio"),
                ("cpu_us_per_req", "cpu_local_ratio"),
            ):
                if ref.get(key) and row.get(key) is not None:
                    row[ratio_key] = round(row[key] / ref[key], 3)

    # ndo scenarios

    async def _values(self, dep: Deployment, id_prefix: str, count: int) -> list[int]:
        """Read ``count`` counters with ``get()`` (64 at a time); also activates them."""
        nc = dep.nc
        values = [0] * count
        limit = asyncio.Semaphore(64)

        async def read(number: int) -> None:
            async with limit:
                msg = await nc.request(
                    f"{PREFIX}.rpc.{CLASS}.{id_prefix}{number}.get",
                    b"",
                    timeout=REQUEST_TIMEOUT_MS / 1000,
                )
            if msg.headers and msg.headers.get(ERROR_CODE_HEADER):
                raise BenchError(f"get() of {id_prefix}{number} failed: {msg.data!r}")
            values[number] = int(msgspec.json.decode(msg.data))

        try:
            async with asyncio.TaskGroup() as group:
                for number in range(count):
                    group.create_task(read(number))
        except* (BenchError, nats.errors.Error) as errors:
            first = errors.exceptions[0]
            raise BenchError(f"{first} (and {len(errors.exceptions) - 1} more)") from None
        return values

    async def _drive(
        self,
        dep: Deployment,
        worker: Worker,
        *,
        method: str,
        id_prefix: str,
        first: int,
        count: int,
        inflight: int,
        mode: Literal["random", "once"],
        duration: float,
    ) -> Outcome:
        return await dep.driver.run(
            subject=f"{PREFIX}.rpc.{CLASS}.{{id}}.{method}",
            id_prefix=id_prefix,
            first=first,
            count=count,
            body=INCREMENT_BODY if method == "increment" else GET_BODY,
            inflight=inflight,
            mode=mode,
            duration=duration,
            increasing=method == "increment",
            worker=worker,
            worker_pid=worker.pid,
        )

    def _record(self, row: dict[str, Any], worker: Worker, dep: Deployment) -> None:
        row["storage"] = dep.mode.name
        self.rows.append(row)
        self._finish_storage()  # the ratio to local in the progress line, when local ran first
        progress(describe(row) + f" (worker pid {worker.pid})")

    async def _scenario_read(self, dep: Deployment) -> None:
        plan = self.plan
        worker = await dep.worker("read")
        try:
            expected = [stored_value(i) for i in range(plan.objects)]
            values = await self._values(dep, READ_IDS, plan.objects)
            problems = check_reads(expected, [1] * plan.objects, values)
            for level in plan.levels:
                outcomes = []
                for duration in (plan.warmup, plan.duration):
                    if not duration:
                        continue
                    outcome = await self._drive(
                        dep,
                        worker,
                        method="get",
                        id_prefix=READ_IDS,
                        first=0,
                        count=plan.objects,
                        inflight=level,
                        mode="random",
                        duration=duration,
                    )
                    problems += check_reads(expected, outcome.obj_n, outcome.obj_sum)
                    outcomes.append(outcome)
                self._record(make_row("read", level, outcomes[-1], problems), worker, dep)
                problems = []
        finally:
            await worker.child.stop()

    async def _increments(self, dep: Deployment, scenario: str, id_prefix: str, count: int) -> None:
        plan = self.plan
        worker = await dep.worker(scenario)
        try:
            base = await self._values(dep, id_prefix, count)
            for level in plan.levels:
                problems: list[str] = []
                outcome: Outcome | None = None
                for duration in (plan.warmup, plan.duration):
                    if not duration:
                        continue
                    outcome = await self._drive(
                        dep,
                        worker,
                        method="increment",
                        id_prefix=id_prefix,
                        first=0,
                        count=count,
                        inflight=level,
                        mode="random",
                        duration=duration,
                    )
                    final = await self._values(dep, id_prefix, count)
                    problems += check_increments(base, outcome.obj_n, outcome.obj_sum, final)
                    base = final
                assert outcome is not None
                self._record(make_row(scenario, level, outcome, problems), worker, dep)
        finally:
            await worker.child.stop()

    async def _scenario_spread(self, dep: Deployment) -> None:
        await self._increments(dep, "spread", SPREAD_IDS, self.plan.objects)

    async def _scenario_hot(self, dep: Deployment) -> None:
        await self._increments(dep, "hot", HOT_IDS, 1)

    async def _scenario_cold(self, dep: Deployment) -> None:
        plan = self.plan
        worker = await dep.worker("cold", max_active=plan.cold_max_active)
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
                    dep,
                    worker,
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
        try:
            samples: list[int] = []
            problems: list[str] = []
            first = 0
            for size in (IDLE_WARM_OBJECTS, n, n):
                outcome = await self._drive(
                    dep,
                    worker,
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
