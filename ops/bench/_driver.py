"""Driving load: one run of load jobs over several generator processes, measured around it.

The driver splits the in-flight total over the generators, starts them, samples CPU and the
worker's metrics just before ``go`` and just after the last reply, and merges the results.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import msgspec

from ndo.ops._errors import BenchError
from ndo.ops.bench._load_kind import choose_load
from ndo.ops.bench._node_generator import NODE_GENERATOR_JS
from ndo.ops.bench._plan import BenchPlan
from ndo.ops.bench._proc import busy_cpu_seconds, cpu_seconds
from ndo.ops.bench._processes import Child, Worker, spawn
from ndo.ops.bench._protocol import LoadJob, LoadResult, bucket_value_ms

__all__ = ["REQUEST_TIMEOUT_MS", "LoadDriver", "Outcome"]

REQUEST_TIMEOUT_MS: Final = 10_000
"""Per-request timeout of the generators and of the harness's own requests."""


class Outcome(msgspec.Struct, kw_only=True):
    """One run's merged generator results and the CPU used around it."""

    ok: int
    errors: dict[str, int]
    elapsed: float
    hist: dict[int, int]
    obj_n: list[int]
    obj_sum: list[int]
    violations: int
    worker_cpu: float
    server_cpu: float
    load_cpu: float
    machine_cpu: float
    """Busy CPU seconds of the whole machine during the run."""
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    clients: int

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float | None:
        """Latency at ``fraction`` (0.5: the median) in milliseconds; None without replies."""
        total = sum(self.hist.values())
        if not total:
            return None
        rank = max(1, math.ceil(fraction * total))
        seen = 0
        for bucket in sorted(self.hist):
            seen += self.hist[bucket]
            if seen >= rank:
                return bucket_value_ms(bucket)
        return None  # pragma: no cover - rank <= total

    def metric_delta(self, name: str) -> float:
        """How much the worker's metric ``name`` (summed over its labels) grew during the run."""
        return self.metrics_after.get(name, 0.0) - self.metrics_before.get(name, 0.0)


class LoadDriver:
    """Runs load jobs over several generator processes and measures the processes around them."""

    def __init__(
        self, plan: BenchPlan, url: str, run_dir: Path, server_pids: Sequence[int]
    ) -> None:
        """Drive load at the server ``url``; ``server_pids`` are the nats-servers whose CPU a run
        counts (every server of a cluster)."""
        self.plan = plan
        self.url = url
        self.run_dir = run_dir
        self.server_pids = tuple(server_pids)
        self.choice = choose_load(plan)
        self.kind = self.choice.kind
        self._runs = 0
        if self.kind == "node":
            self._script = run_dir / "bench_load.cjs"
            self._script.write_text(NODE_GENERATOR_JS, encoding="utf-8")

    def _argv(self) -> list[str]:
        if self.kind == "node":
            return ["node", str(self._script)]
        return [sys.executable, "-m", "ndo.ops.bench._python_generator"]

    async def run(
        self,
        *,
        subject: str,
        id_prefix: str,
        first: int,
        count: int,
        body: str,
        inflight: int,
        mode: Literal["random", "once"],
        duration: float,
        increasing: bool,
        worker: Worker | None,
        worker_pid: int,
    ) -> Outcome:
        procs = min(self.plan.clients, inflight, count if mode == "once" else inflight)
        shares = [inflight // procs + (1 if i < inflight % procs else 0) for i in range(procs)]
        jobs: list[LoadJob] = []
        start = first
        for i, share in enumerate(shares):
            if mode == "once":
                size = count * share // inflight if i < procs - 1 else first + count - start
                job_first, job_count = start, size
                start += size
            else:
                job_first, job_count = first, count
            self._runs += 1
            jobs.append(
                LoadJob(
                    url=self.url,
                    subject=subject,
                    id_prefix=id_prefix,
                    first=job_first,
                    count=job_count,
                    body=body,
                    inflight=share,
                    mode=mode,
                    duration=duration,
                    timeout_ms=REQUEST_TIMEOUT_MS,
                    increasing=increasing,
                    seed=self._runs * 7919 + 1,
                )
            )
        env = {"NODE_PATH": str(self.choice.node_modules)} if self.kind == "node" else {}
        children: list[Child] = []
        try:
            for i, job in enumerate(jobs):
                child = await spawn(
                    f"load-{i}", self._argv(), self.run_dir, stdout=asyncio.subprocess.PIPE, env=env
                )
                children.append(child)
                assert child.proc.stdin is not None
                child.proc.stdin.write(msgspec.json.encode(job) + b"\n")
            for child in children:
                await self._expect_ready(child)
            metrics_before = await asyncio.to_thread(worker.metrics) if worker else {}
            cpu_before = self._cpu(worker_pid, children)
            for child in children:
                assert child.proc.stdin is not None
                child.proc.stdin.write(b"go\n")
            results = [
                await self._result(child, duration + REQUEST_TIMEOUT_MS / 1000 + 30)
                for child in children
            ]
            cpu_after = self._cpu(worker_pid, children)
            metrics_after = await asyncio.to_thread(worker.metrics) if worker else {}
        finally:
            for child in children:
                if child.proc.stdin is not None:
                    child.proc.stdin.close()
            for child in children:
                await child.stop(grace=5.0)
        return _merge(results, mode, cpu_before, cpu_after, metrics_before, metrics_after)

    def _cpu(self, worker_pid: int, children: list[Child]) -> tuple[float, float, float, float]:
        return (
            cpu_seconds(worker_pid),
            sum(cpu_seconds(pid) for pid in self.server_pids),
            sum(cpu_seconds(c.pid) for c in children),
            busy_cpu_seconds(),
        )

    async def _expect_ready(self, child: Child) -> None:
        assert child.proc.stdout is not None
        try:
            async with asyncio.timeout(30):
                line = await child.proc.stdout.readline()
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            detail = line.decode(errors="replace").strip()
            raise BenchError(
                f"load generator ({self.kind}) did not start: {detail}\n{child.log_tail()}"
            )

    async def _result(self, child: Child, timeout: float) -> LoadResult:
        assert child.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await child.proc.stdout.readline()
        except TimeoutError:
            raise BenchError(f"load generator gave no result within {timeout:.0f}s") from None
        try:
            result = msgspec.json.decode(line, type=LoadResult)
        except msgspec.DecodeError as exc:
            raise BenchError(
                f"load generator sent a bad result ({exc}):\n{child.log_tail()}"
            ) from None
        if result.fatal is not None:
            raise BenchError(f"load generator failed: {result.fatal}")
        return result


def _merge(
    results: list[LoadResult],
    mode: str,
    cpu_before: tuple[float, float, float, float],
    cpu_after: tuple[float, float, float, float],
    metrics_before: dict[str, float],
    metrics_after: dict[str, float],
) -> Outcome:
    errors: dict[str, int] = {}
    hist: dict[int, int] = {}
    for result in results:
        for kind, n in result.errors.items():
            errors[kind] = errors.get(kind, 0) + n
        for bucket, n in result.hist.items():
            hist[bucket] = hist.get(bucket, 0) + n
    if mode == "once":
        obj_n = [n for r in results for n in r.obj_n]
        obj_sum = [s for r in results for s in r.obj_sum]
    else:
        obj_n = [sum(col) for col in zip(*(r.obj_n for r in results), strict=True)]
        obj_sum = [sum(col) for col in zip(*(r.obj_sum for r in results), strict=True)]
    return Outcome(
        ok=sum(r.ok for r in results),
        errors=errors,
        elapsed=max(r.elapsed for r in results),
        hist=hist,
        obj_n=obj_n,
        obj_sum=obj_sum,
        violations=sum(r.violations for r in results),
        worker_cpu=cpu_after[0] - cpu_before[0],
        server_cpu=cpu_after[1] - cpu_before[1],
        load_cpu=cpu_after[2] - cpu_before[2],
        machine_cpu=cpu_after[3] - cpu_before[3],
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        clients=len(results),
    )
