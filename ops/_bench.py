"""``ndo bench``: measure one ndo worker against the raw-NATS limit of the same machine.

A separate module because it is a tool, not the runtime: it starts a whole process tree and
reports numbers. Everything is relative to a baseline measured in the same run, never a fixed
speed, because this machine is small and noisy.

The process tree (all on 127.0.0.1):

* an embedded ``nats-server`` (random port, its own temporary directory);
* a **baseline** responder: raw nats-py that decodes the JSON body with msgspec and encodes a
  JSON reply, nothing else (``ndo.ops._bench_load``) — the practical limit of one Python worker;
* an **ndo worker** (``python -m ndo.ops.cli serve``, the bundled example objects), one fresh
  process per scenario, on a SQLite file the harness pre-populates directly (fast, big batches);
* **load generators** (Node.js, or nats-py processes as a fallback), the same ones for the
  baseline and for ndo, keeping a fixed total number of requests in flight.

For every run the harness samples the CPU time of the worker (``/proc/<pid>/stat``: its own
and its SQLite threads'), of the nats-server and of the generators, and scrapes the worker's
Prometheus endpoint for commit counts. CPU per request is the stable figure to optimise; requests
per second shows what the machine as a whole achieves while the generators share its two cores.

Scenarios: ``read`` (``get()`` over 1,000 active objects), ``spread`` (``increment()`` over 1,000
objects), ``hot`` (``increment()`` on one object), ``cold`` (each object touched once: activation
from storage, LRU eviction under a small ``--max-active``) and ``idle-memory`` (resident memory per
active idle object). Each ends with a correctness check — counters equal the acknowledged
increments, every increment's reply is distinct and arrives in order, reads return the stored
values — and a failed check makes the whole run exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._bench_load import NODE_GENERATOR_JS, LoadJob, LoadResult, bucket_value_ms
from ndo.ops._errors import BenchError
from ndo.ops._loop import LOOP_CHOICES, resolve_loop
from ndo.ops._nats_server import EmbeddedNatsServer, _pdeathsig_preexec, find_nats_server_binary
from ndo.storage import ObjectWrite, SqliteStorage
from ndo.subjects import DEFAULT_PARTITIONS, partition_of

__all__ = [
    "SCENARIOS",
    "BenchPlan",
    "add_bench_parser",
    "check_increments",
    "check_reads",
    "main",
    "run_bench",
]

SCENARIOS: Final = ("read", "spread", "hot", "cold", "idle-memory")
"""Scenario names, in the order they run."""

_ROOT: Final = Path(__file__).resolve().parents[1]
"""The source tree the worker and generator processes run from (the harness's own code)."""

_DEFAULT_NODE_MODULES: Final = _ROOT / "node_modules"
"""Where ``npm install`` at the repository root puts the ``nats`` npm package."""

_PREFIX: Final = "ndo"
_BASELINE_PREFIX: Final = "ndobench"
_CLASS: Final = "Counter"
_VALUE_KEY: Final = "value"
_PING_PREFIX: Final = "ping"
_ERROR_HEADER: Final = "Nats-Service-Error-Code"
_INCREMENT_BODY: Final = '{"by":1}'
_GET_BODY: Final = ""
_REQUEST_TIMEOUT_MS: Final = 10_000
_WORKER_START_TIMEOUT: Final = 30.0
_PROCESS_STOP_TIMEOUT: Final = 15.0
_PROBLEMS_SHOWN: Final = 5
_LOADER_BATCH: Final = 10_000
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

# Object id prefixes, one per scenario (ids are prefix + number).
_READ_IDS: Final = "r"
_SPREAD_IDS: Final = "s"
_HOT_IDS: Final = "h"
_COLD_IDS: Final = "c"
_IDLE_IDS: Final = "m"
_BASELINE_IDS: Final = "b"

LoadKind = Literal["auto", "node", "python"]


class BenchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``ndo bench`` run measures (built from the flags; ``--quick`` shrinks it)."""

    scenarios: tuple[str, ...] = SCENARIOS
    """Scenarios to run, from ``SCENARIOS``."""
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
    node_modules: Path = _DEFAULT_NODE_MODULES
    """A ``node_modules`` folder holding the ``nats`` npm package."""
    baseline_twice: bool = True
    """Measure the baseline before and after the scenarios and average (noise)."""
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


QUICK_PLAN: Final = BenchPlan(
    levels=(1, 64),
    duration=1.5,
    warmup=0.5,
    cold_objects=4_000,
    cold_max_active=500,
    idle_objects=1_000,
    baseline_twice=False,
)
"""``--quick``: two levels, short runs, small object counts (well under a minute)."""

FULL_PLAN: Final = BenchPlan()
"""The default: every level, 5 s runs, 100,000 cold objects (a few minutes)."""


# Correctness checks (pure functions, so tests can feed them wrong results)


def check_increments(
    base: Sequence[int], counts: Sequence[int], sums: Sequence[int], final: Sequence[int] | None
) -> list[str]:
    """Check one run of ``increment(by=1)`` calls, object by object.

    With every request acknowledged, the replies to an object starting at ``base`` must be
    exactly ``base+1 .. base+n`` in some order (each increment saw the previous one), so their
    sum is ``n*base + n*(n+1)/2``; and the stored value afterwards is ``base + n``.

    Args:
        base: each object's value before the run.
        counts: acknowledged increments per object.
        sums: sum of the replies per object.
        final: each object's value read after the run, or ``None`` to skip that part.

    Returns:
        A description of each object that fails (empty when all pass).
    """
    problems: list[str] = []
    for i, (b, n, s) in enumerate(zip(base, counts, sums, strict=True)):
        expected = n * b + n * (n + 1) // 2
        if s != expected:
            problems.append(
                f"object #{i}: {n} increments from {b} replied values summing to {s}, "
                f"expected {expected} (lost or duplicated updates)"
            )
        if final is not None and final[i] != b + n:
            problems.append(
                f"object #{i}: value is {final[i]} after {n} acknowledged increments from {b}, "
                f"expected {b + n}"
            )
    return problems


def check_reads(expected: Sequence[int], counts: Sequence[int], sums: Sequence[int]) -> list[str]:
    """Check a run of ``get()`` calls: every reply of object ``i`` equals ``expected[i]``.

    Returns:
        A description of each object that fails (empty when all pass).
    """
    return [
        f"object #{i}: {n} reads summed to {s}, expected {n} x {e} = {n * e}"
        for i, (e, n, s) in enumerate(zip(expected, counts, sums, strict=True))
        if s != n * e
    ]


def _stored_value(number: int) -> int:
    """The counter value the loader stores for object number ``number`` (read and cold)."""
    return number * 7 + 3


# /proc readings


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, from ``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    busy = sum(int(v) for i, v in enumerate(fields[1:9]) if i not in (3, 4))
    return busy / _CLK_TCK


def _rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _scrape(port: int) -> dict[str, float]:
    """Fetch the worker's Prometheus text and sum each sample name over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.partition("{")[0]
        with contextlib.suppress(ValueError):
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def _ping_ids(partitions: int) -> list[str]:
    """Object ids covering every partition once (the worker readiness probe)."""
    ids: list[str] = []
    covered: set[int] = set()
    for number in range(partitions * 1_000):
        object_id = f"{_PING_PREFIX}{number}"
        part = partition_of(_CLASS, object_id, partitions)
        if part not in covered:
            covered.add(part)
            ids.append(object_id)
            if len(covered) == partitions:
                break
    return ids


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Processes


class _Child:
    """A child process whose output goes to a log file in the run directory."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(text)

    async def stop(self, grace: float = 0.0) -> None:
        """Wait ``grace`` seconds for a voluntary exit, then SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc.returncode is None and grace > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PROCESS_STOP_TIMEOUT):
                    await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _spawn(
    name: str,
    argv: Sequence[str],
    run_dir: Path,
    *,
    stdout: int | IO[Any] | None = None,
    env: dict[str, str] | None = None,
) -> _Child:
    log_path = run_dir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdout is not None else asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            cwd=_ROOT,
            env={**os.environ, "PYTHONPATH": str(_ROOT), **(env or {})},
            preexec_fn=_pdeathsig_preexec(),
            limit=256 * 1024 * 1024,
        )
    return _Child(name, proc, log_path)


async def _start_baseline(url: str, run_dir: Path, loop: str) -> _Child:
    child = await _spawn(
        "baseline",
        [sys.executable, "-m", "ndo.ops._bench_load", "baseline", url, f"{_BASELINE_PREFIX}.rpc.>"],
        run_dir,
        stdout=asyncio.subprocess.PIPE,
        env={"NDO_LOOP": loop},  # the workers' event loop
    )
    assert child.proc.stdout is not None
    try:
        async with asyncio.timeout(_WORKER_START_TIMEOUT):
            line = await child.proc.stdout.readline()
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await child.stop()
        raise BenchError(f"the baseline responder did not start:\n{child.log_tail()}")
    return child


class _Worker:
    """An ``ndo serve`` process with its metrics port."""

    def __init__(self, child: _Child, metrics_port: int) -> None:
        self.child = child
        self.metrics_port = metrics_port

    @property
    def pid(self) -> int:
        return self.child.pid

    def metrics(self) -> dict[str, float]:
        return _scrape(self.metrics_port)


async def _start_worker(
    name: str,
    url: str,
    data_dir: Path,
    run_dir: Path,
    plan: BenchPlan,
    nc: NatsClient,
    **flags: Any,
) -> _Worker:
    metrics_port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "ndo.ops.cli",
        "serve",
        "--nats-url",
        url,
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        str(metrics_port),
        "--log-format",
        "json",
        "--log-level",
        "warning",
        "--partitions",
        str(plan.partitions),
    ]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    argv += ["--loop", plan.loop, *plan.worker_args]
    child = await _spawn(f"worker-{name}", argv, run_dir)
    deadline = time.monotonic() + _WORKER_START_TIMEOUT
    # Ready means serving every partition (a worker with leases may wait for its predecessor's
    # to expire): one get() per partition must succeed.
    for object_id in _ping_ids(plan.partitions):
        subject = f"{_PREFIX}.rpc.{_CLASS}.{object_id}.get"
        while True:
            if child.proc.returncode is not None:
                raise BenchError(
                    f"the ndo worker exited with code {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                msg = await nc.request(subject, b"", timeout=1)
                if not (msg.headers and msg.headers.get(_ERROR_HEADER)):
                    break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            if time.monotonic() > deadline:
                await child.stop()
                raise BenchError(
                    f"the ndo worker did not serve every partition within "
                    f"{_WORKER_START_TIMEOUT}s:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.1)
    return _Worker(child, metrics_port)


# Load driving


class _Outcome(msgspec.Struct, kw_only=True):
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
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float | None:
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
        return self.metrics_after.get(name, 0.0) - self.metrics_before.get(name, 0.0)


class _LoadDriver:
    """Runs load jobs over several generator processes and measures the processes around them."""

    def __init__(self, plan: BenchPlan, url: str, run_dir: Path, server_pid: int | None) -> None:
        self.plan = plan
        self.url = url
        self.run_dir = run_dir
        self.server_pid = server_pid
        self.kind = _pick_load_kind(plan)
        self._runs = 0
        if self.kind == "node":
            self._script = run_dir / "bench_load.cjs"
            self._script.write_text(NODE_GENERATOR_JS, encoding="utf-8")

    def _argv(self) -> list[str]:
        if self.kind == "node":
            return ["node", str(self._script)]
        return [sys.executable, "-m", "ndo.ops._bench_load", "generate"]

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
        worker: _Worker | None,
        worker_pid: int,
    ) -> _Outcome:
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
                    timeout_ms=_REQUEST_TIMEOUT_MS,
                    increasing=increasing,
                    seed=self._runs * 7919 + 1,
                )
            )
        env = {"NODE_PATH": str(self.plan.node_modules)} if self.kind == "node" else {}
        children: list[_Child] = []
        try:
            for i, job in enumerate(jobs):
                child = await _spawn(
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
                await self._result(child, duration + _REQUEST_TIMEOUT_MS / 1000 + 30)
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

    def _cpu(self, worker_pid: int, children: list[_Child]) -> tuple[float, float, float, float]:
        return (
            _cpu_seconds(worker_pid),
            _cpu_seconds(self.server_pid),
            sum(_cpu_seconds(c.pid) for c in children),
            _busy_cpu_seconds(),
        )

    async def _expect_ready(self, child: _Child) -> None:
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

    async def _result(self, child: _Child, timeout: float) -> LoadResult:
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
) -> _Outcome:
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
    return _Outcome(
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


def _pick_load_kind(plan: BenchPlan) -> Literal["node", "python"]:
    has_node = shutil.which("node") is not None and (plan.node_modules / "nats").is_dir()
    if plan.load == "node" and not has_node:
        raise BenchError(
            f"--load node needs `node` on PATH and the nats npm package in {plan.node_modules} "
            "(npm install at the repository root); or use --load python"
        )
    if plan.load == "python" or not has_node:
        return "python"
    return "node"


# Pre-populated storage


async def _prepopulate(data_dir: Path, plan: BenchPlan) -> None:
    """Write the read, cold and idle-memory objects straight into the worker's SQLite file."""
    groups: list[tuple[str, int]] = []
    if "read" in plan.scenarios:
        groups.append((_READ_IDS, plan.objects))
    if "cold" in plan.scenarios:
        groups.append((_COLD_IDS, plan.cold_objects))
    if "idle-memory" in plan.scenarios:
        groups.append((_IDLE_IDS, 2 * plan.idle_objects + _IDLE_WARM_OBJECTS))
    storage = SqliteStorage(data_dir / "ndo.sqlite3", partitions=plan.partitions)
    await storage.open()
    try:
        epochs = await storage.claim_partitions(range(plan.partitions), "ndo-bench-loader")
        encode = msgspec.msgpack.Encoder().encode
        for prefix, count in groups:
            for start in range(0, count, _LOADER_BATCH):
                batch = []
                for number in range(start, min(count, start + _LOADER_BATCH)):
                    object_id = f"{prefix}{number}"
                    part = partition_of(_CLASS, object_id, plan.partitions)
                    batch.append(
                        ObjectWrite(
                            class_name=_CLASS,
                            object_id=object_id,
                            partition=part,
                            epoch=epochs[part],
                            writes={_VALUE_KEY: encode(_stored_value(number))},
                        )
                    )
                fenced = await storage.commit(batch)
                if fenced:
                    raise BenchError(f"pre-populating storage was fenced on {sorted(fenced)}")
    finally:
        await storage.close()


_IDLE_WARM_OBJECTS: Final = 200
"""Objects ``idle-memory`` activates before its first RSS sample (warms caches and arenas)."""


# Rows


def _row(
    scenario: str,
    inflight: int,
    outcome: _Outcome,
    problems: list[str],
) -> dict[str, Any]:
    ok = max(outcome.ok, 1)
    tx = outcome.metric_delta("ndo_commits_total")
    writes = outcome.metric_delta("ndo_commit_write_sets_sum")
    if outcome.errors:
        problems = [f"{sum(outcome.errors.values())} requests failed: {outcome.errors}", *problems]
    if outcome.violations:
        problems = [f"{outcome.violations} replies arrived out of order", *problems]
    row: dict[str, Any] = {
        "scenario": scenario,
        "inflight": inflight,
        "rps": round(outcome.rps, 1),
        "p50_ms": _round(outcome.percentile_ms(0.50), 3),
        "p99_ms": _round(outcome.percentile_ms(0.99), 3),
        "ratio": None,
        "cpu_us_per_req": round(outcome.worker_cpu / ok * 1e6, 1),
        "cpu_ratio": None,
        "requests": outcome.ok,
        "errors": sum(outcome.errors.values()),
        "seconds": round(outcome.elapsed, 3),
        "transactions_per_s": round(tx / outcome.elapsed, 1) if outcome.elapsed else 0.0,
        "writes_per_s": round(writes / outcome.elapsed, 1) if outcome.elapsed else 0.0,
        "writes_per_tx": round(writes / tx, 2) if tx else None,
        "server_cpu_us_per_req": round(outcome.server_cpu / ok * 1e6, 1),
        "load_cpu_us_per_req": round(outcome.load_cpu / ok * 1e6, 1),
        # Cores busy outside the benchmark's processes: other work on the machine (noise).
        "other_cpu_cores": round(
            max(
                0.0,
                outcome.machine_cpu - outcome.worker_cpu - outcome.server_cpu - outcome.load_cpu,
            )
            / outcome.elapsed,
            2,
        )
        if outcome.elapsed
        else None,
        "clients": outcome.clients,
        "check": "ok" if not problems else "; ".join(problems[:_PROBLEMS_SHOWN]),
    }
    # Journal records stored vs lost (a full buffer drops records rather than slowing requests).
    journaled = outcome.metric_delta("ndo_journal_records_total")
    journal_lost = outcome.metric_delta("ndo_journal_failures_total")
    row["journal_per_s"] = round(journaled / outcome.elapsed, 1) if outcome.elapsed else 0.0
    row["journal_lost"] = int(journal_lost)
    activations = outcome.metric_delta("ndo_activations_total")
    if scenario == "cold":
        row["activations"] = int(activations)
        row["evictions"] = int(outcome.metric_delta("ndo_evictions_total"))
    return row


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _describe(row: dict[str, Any]) -> str:
    if row["scenario"] == "idle-memory":
        return (
            f"idle-memory: {row['objects']} objects, {row['bytes_per_object']} B/object "
            f"({row['overhead_bytes_per_object']} B overhead); check {row['check']}"
        )
    ratio = f", ratio {row['ratio']:.2f}" if row.get("ratio") is not None else ""
    return (
        f"{row['scenario']} inflight={row['inflight']}: {row['rps']:,.0f} req/s, "
        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms{ratio}, "
        f"worker {row['cpu_us_per_req']} us/req; check {row['check']}"
    )


# Scenarios


class _Bench:
    """One run of the harness: the process tree, the scenarios, the rows."""

    def __init__(self, plan: BenchPlan, run_dir: Path) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.data_dir = run_dir / "data"
        self.rows: list[dict[str, Any]] = []
        self.baseline_runs: dict[int, list[dict[str, Any]]] = {}
        self.nc: NatsClient | None = None
        self.server: EmbeddedNatsServer | None = None
        self.driver: _LoadDriver | None = None
        self.baseline: _Child | None = None

    async def run(self) -> list[dict[str, Any]]:
        plan = self.plan
        self.server = EmbeddedNatsServer(
            store_dir=self.run_dir / "nats", port=0, jetstream=plan.jetstream
        )
        await self.server.start()
        try:
            _progress(f"nats-server {self.server.url} (pid {self.server.pid}); loading storage")
            started = time.perf_counter()
            await _prepopulate(self.data_dir, plan)
            _progress(f"storage pre-populated in {time.perf_counter() - started:.1f}s")
            self.nc = await nats.connect(self.server.url, connect_timeout=5)
            self.driver = _LoadDriver(plan, self.server.url, self.run_dir, self.server.pid)
            _progress(f"load generator: {self.driver.kind}, up to {plan.clients} processes")
            self.baseline = await _start_baseline(self.server.url, self.run_dir, plan.loop)
            _progress(f"baseline responder pid {self.baseline.pid}")
            await self._baseline_pass()
            for scenario in plan.scenarios:
                await getattr(self, "_scenario_" + scenario.replace("-", "_"))()
            if plan.baseline_twice:
                await self._baseline_pass()
            self._finish_baseline()
        finally:
            if self.baseline is not None:
                await self.baseline.stop()
            if self.nc is not None:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await self.nc.close()
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
                    subject=f"{_BASELINE_PREFIX}.rpc.{_CLASS}.{{id}}.increment",
                    id_prefix=_BASELINE_IDS,
                    first=0,
                    count=self.plan.objects,
                    body=_INCREMENT_BODY,
                    inflight=level,
                    mode="random",
                    duration=duration,
                    increasing=False,
                    worker=None,
                    worker_pid=self.baseline.pid,
                )
            assert outcome is not None
            problems = [] if sum(outcome.obj_sum) == outcome.ok else ["baseline replies wrong"]
            row = _row("baseline", level, outcome, problems)
            for key in ("transactions_per_s", "writes_per_s", "writes_per_tx"):
                row[key] = None
            self.baseline_runs.setdefault(level, []).append(row)
            _progress(_describe(row) + f" (baseline pid {self.baseline.pid})")

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

    # ndo scenarios

    async def _worker(self, name: str, **flags: Any) -> _Worker:
        assert self.server is not None and self.nc is not None
        worker = await _start_worker(
            name, self.server.url, self.data_dir, self.run_dir, self.plan, self.nc, **flags
        )
        _progress(f"{name}: ndo worker pid {worker.pid}, metrics port {worker.metrics_port}")
        return worker

    async def _values(self, id_prefix: str, count: int) -> list[int]:
        """Read ``count`` counters with ``get()`` (64 at a time); also activates them."""
        assert self.nc is not None
        nc = self.nc
        values = [0] * count
        limit = asyncio.Semaphore(64)

        async def read(number: int) -> None:
            async with limit:
                msg = await nc.request(
                    f"{_PREFIX}.rpc.{_CLASS}.{id_prefix}{number}.get",
                    b"",
                    timeout=_REQUEST_TIMEOUT_MS / 1000,
                )
            if msg.headers and msg.headers.get(_ERROR_HEADER):
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
        worker: _Worker,
        *,
        method: str,
        id_prefix: str,
        first: int,
        count: int,
        inflight: int,
        mode: Literal["random", "once"],
        duration: float,
    ) -> _Outcome:
        assert self.driver is not None
        return await self.driver.run(
            subject=f"{_PREFIX}.rpc.{_CLASS}.{{id}}.{method}",
            id_prefix=id_prefix,
            first=first,
            count=count,
            body=_INCREMENT_BODY if method == "increment" else _GET_BODY,
            inflight=inflight,
            mode=mode,
            duration=duration,
            increasing=method == "increment",
            worker=worker,
            worker_pid=worker.pid,
        )

    def _record(self, row: dict[str, Any], worker: _Worker) -> None:
        self.rows.append(row)
        _progress(_describe(row) + f" (worker pid {worker.pid})")

    async def _scenario_read(self) -> None:
        plan = self.plan
        worker = await self._worker("read")
        try:
            expected = [_stored_value(i) for i in range(plan.objects)]
            values = await self._values(_READ_IDS, plan.objects)
            problems = check_reads(expected, [1] * plan.objects, values)
            for level in plan.levels:
                outcomes = []
                for duration in (plan.warmup, plan.duration):
                    if not duration:
                        continue
                    outcome = await self._drive(
                        worker,
                        method="get",
                        id_prefix=_READ_IDS,
                        first=0,
                        count=plan.objects,
                        inflight=level,
                        mode="random",
                        duration=duration,
                    )
                    problems += check_reads(expected, outcome.obj_n, outcome.obj_sum)
                    outcomes.append(outcome)
                self._record(_row("read", level, outcomes[-1], problems), worker)
                problems = []
        finally:
            await worker.child.stop()

    async def _increments(self, scenario: str, id_prefix: str, count: int) -> None:
        plan = self.plan
        worker = await self._worker(scenario)
        try:
            base = await self._values(id_prefix, count)
            for level in plan.levels:
                problems: list[str] = []
                outcome: _Outcome | None = None
                for duration in (plan.warmup, plan.duration):
                    if not duration:
                        continue
                    outcome = await self._drive(
                        worker,
                        method="increment",
                        id_prefix=id_prefix,
                        first=0,
                        count=count,
                        inflight=level,
                        mode="random",
                        duration=duration,
                    )
                    final = await self._values(id_prefix, count)
                    problems += check_increments(base, outcome.obj_n, outcome.obj_sum, final)
                    base = final
                assert outcome is not None
                self._record(_row(scenario, level, outcome, problems), worker)
        finally:
            await worker.child.stop()

    async def _scenario_spread(self) -> None:
        await self._increments("spread", _SPREAD_IDS, self.plan.objects)

    async def _scenario_hot(self) -> None:
        await self._increments("hot", _HOT_IDS, 1)

    async def _scenario_cold(self) -> None:
        plan = self.plan
        worker = await self._worker("cold", max_active=plan.cold_max_active)
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
                    worker,
                    method="get",
                    id_prefix=_COLD_IDS,
                    first=start,
                    count=size,
                    inflight=level,
                    mode="once",
                    duration=600.0,
                )
                expected = [_stored_value(n) for n in range(start, start + size)]
                problems = check_reads(expected, outcome.obj_n, outcome.obj_sum)
                untouched = sum(1 for n in outcome.obj_n if n != 1)
                if untouched:
                    problems.insert(0, f"{untouched} objects not read exactly once")
                activations = outcome.metric_delta("ndo_activations_total")
                if activations != outcome.ok:
                    problems.insert(0, f"{activations:.0f} activations for {outcome.ok} cold reads")
                row = _row("cold", level, outcome, problems)
                if is_warmup:
                    if row["check"] != "ok":
                        row["scenario"] = "cold-warmup"
                        self._record(row, worker)
                    continue
                self._record(row, worker)
        finally:
            await worker.child.stop()

    async def _scenario_idle_memory(self) -> None:
        plan = self.plan
        n = plan.idle_objects
        pings = len(_ping_ids(plan.partitions))
        worker = await self._worker(
            "idle-memory", max_active=2 * n + _IDLE_WARM_OBJECTS + pings + 100
        )
        try:
            samples: list[int] = []
            problems: list[str] = []
            first = 0
            for size in (_IDLE_WARM_OBJECTS, n, n):
                outcome = await self._drive(
                    worker,
                    method="get",
                    id_prefix=_IDLE_IDS,
                    first=first,
                    count=size,
                    inflight=min(64, max(plan.levels)),
                    mode="once",
                    duration=600.0,
                )
                expected = [_stored_value(k) for k in range(first, first + size)]
                problems += check_reads(expected, outcome.obj_n, outcome.obj_sum)
                if outcome.ok != size:
                    problems.append(f"{outcome.ok} of {size} objects activated ({outcome.errors})")
                first += size
                await asyncio.sleep(0.5)  # let replies and garbage settle before sampling
                samples.append(_rss_bytes(worker.pid))
            active = (await asyncio.to_thread(worker.metrics)).get("ndo_active_objects", 0.0)
            wanted = 2 * n + _IDLE_WARM_OBJECTS + pings
            if active != wanted:
                problems.append(f"{active:.0f} objects active, expected {wanted} (evicted?)")
            per_object = (samples[2] - samples[1]) / n
            sample_id = f"{_IDLE_IDS}{n}"
            data = len(sample_id) + len(_VALUE_KEY) + len(msgspec.msgpack.encode(_stored_value(n)))
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
                "check": "ok" if not problems else "; ".join(problems[:_PROBLEMS_SHOWN]),
            }
            self._record(row, worker)
        finally:
            await worker.child.stop()


# Report


def _machine(plan: BenchPlan, load_kind: str) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "date": dt.date.today().isoformat(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": _version([find_nats_server_binary(), "--version"]),
        "node": _version(["node", "--version"]) if load_kind == "node" else None,
        "load_generator": load_kind,
        "clients": plan.clients,
        "loop": resolve_loop(plan.loop),
    }


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip() or None


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate the targets of issue 5 on the rows that exist."""

    def find(scenario: str, inflight: int | None) -> dict[str, Any] | None:
        for row in rows:
            if row["scenario"] == scenario and (inflight is None or row["inflight"] == inflight):
                return row
        return None

    out: list[dict[str, Any]] = []

    def add(name: str, row: dict[str, Any] | None, key: str, op: str, limit: float) -> None:
        value = None if row is None else row.get(key)
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        if op == "<":
            met = None if value is None else value < limit
        out.append({"target": f"{name}: {key} {op} {limit}", "value": value, "met": met})

    read = find("read", 64)
    add("read@64", read, "ratio", ">=", 0.8)
    add("read@64", read, "cpu_ratio", "<=", 1.25)
    add("read@64", read, "p99_ratio", "<=", 2.0)
    spread = find("spread", 64)
    add("spread@64", spread, "ratio", ">=", 0.5)
    add("spread@64", spread, "writes_per_tx", ">=", 8)
    hot = find("hot", 64)
    add("hot@64", hot, "ratio", ">=", 0.3)
    add("hot@64", hot, "rps", ">=", 5000)
    add("cold@1", find("cold", 1), "p50_ms", "<", 1.0)
    add("idle-memory", find("idle-memory", None), "overhead_bytes_per_object", "<", 2048)
    return out


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def render_table(report: dict[str, Any]) -> str:
    """Format a report as the human-readable table ``ndo bench`` prints."""
    lines = []
    header = (
        f"{'scenario':<11} {'inflight':>8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'ratio':>6} {'cpu us/req':>10} {'cpu ratio':>9} {'tx/s':>7} {'writes/s':>9} "
        f"{'w/tx':>6} {'jrnl/s':>7} {'j.lost':>6} {'other':>5}  check"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for row in report["results"]:
        if row["scenario"] == "idle-memory":
            continue
        lines.append(
            f"{row['scenario']:<11} {_fmt(row['inflight']):>8} {_fmt(row['rps'], ',.0f'):>9} "
            f"{_fmt(row['p50_ms'], '.3f'):>7} {_fmt(row['p99_ms'], '.3f'):>7} "
            f"{_fmt(row['ratio'], '.2f'):>6} {_fmt(row['cpu_us_per_req'], '.1f'):>10} "
            f"{_fmt(row['cpu_ratio'], '.2f'):>9} {_fmt(row.get('transactions_per_s'), ',.0f'):>7} "
            f"{_fmt(row.get('writes_per_s'), ',.0f'):>9} {_fmt(row.get('writes_per_tx'), '.1f'):>6}"
            f" {_fmt(row.get('journal_per_s'), ',.0f'):>7} {_fmt(row.get('journal_lost'), ',d'):>6}"
            f" {_fmt(row.get('other_cpu_cores'), '.2f'):>5}  {row['check']}"
        )
    for row in report["results"]:
        if row["scenario"] == "idle-memory":
            lines.append("")
            lines.append(
                f"idle-memory: {row['objects']:,} idle active objects: "
                f"{row['bytes_per_object']:,} B RSS each, of which ~{row['data_bytes_per_object']} "
                f"B stored data -> {row['overhead_bytes_per_object']:,} B framework overhead; "
                f"check {row['check']}"
            )
    cold = [r for r in report["results"] if r["scenario"] == "cold"]
    if cold:
        lines.append(
            "cold: "
            + ", ".join(
                f"{r['activations']:,} activations / {r['evictions']:,} evictions "
                f"at {r['inflight']} in flight"
                for r in cold
            )
        )
    lines.append(
        "other = CPU cores busy outside the benchmark's processes during the run (noise); "
        "ratio and cpu ratio are against the baseline at the same in-flight level; "
        "jrnl/s and j.lost = journal records stored per second and lost (buffer full, timeouts)"
    )
    lines.append("")
    lines.append("targets (issue 5):")
    for target in report["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"  {mark:<12} {target['target']} (measured {_fmt(target['value'])})")
    machine = report["machine"]
    lines.append("")
    lines.append(
        f"machine: {machine['nproc']} cpus ({machine['cpu_model']}), python {machine['python']}, "
        f"{machine['nats_server']}, load: {machine['load_generator']} x{machine['clients']}, "
        f"event loop: {machine['loop']}"
    )
    return "\n".join(lines)


async def _run(plan: BenchPlan) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="ndo-bench-", dir=plan.work_dir))
    load_before = os.getloadavg()
    try:
        bench = _Bench(plan, run_dir)
        rows = await bench.run()
        assert bench.driver is not None
        return {
            "results": rows,
            "targets": _targets(rows),
            "machine": {
                **_machine(plan, bench.driver.kind),
                "loadavg_before": [round(x, 2) for x in load_before],
            },
            "plan": msgspec.to_builtins(plan, enc_hook=str),
            "ok": all(row["check"] == "ok" for row in rows),
        }
    finally:
        if plan.keep:
            _progress(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


# Command line


def add_bench_parser(commands: Any) -> None:
    """Add the ``bench`` sub-command to the ``ndo`` parser's sub-parsers."""
    parser = commands.add_parser(
        "bench",
        help="measure a worker against a raw NATS responder on this machine",
        description="Start nats-server, a raw nats-py baseline responder and ndo workers, drive "
        "them with the same load generators and report throughput, latency and worker CPU per "
        "request relative to the baseline. Exits 1 when a correctness check fails.",
    )
    _add_bench_options(parser)


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small counts, two levels (<1 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--levels", help="comma-separated in-flight levels, e.g. 1,16,64,256")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each run")
    parser.add_argument("--objects", type=int, help="objects in read and spread (1000)")
    parser.add_argument("--cold-objects", type=int, help="objects touched once in cold")
    parser.add_argument("--cold-max-active", type=int, help="worker --max-active in cold")
    parser.add_argument("--idle-objects", type=int, help="objects per idle-memory batch")
    parser.add_argument("--partitions", type=int, help=f"partitions ({DEFAULT_PARTITIONS})")
    parser.add_argument("--clients", type=int, help="load generator processes (2)")
    parser.add_argument("--load", choices=["auto", "node", "python"], help="load generator")
    parser.add_argument("--node-modules", type=Path, help="node_modules with the nats package")
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        help="event loop of the worker and the baseline responder alike (auto: uvloop when "
        "installed)",
    )
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `ndo serve` argument (repeatable), e.g. --worker-arg=--max-mailbox=2000",
    )
    parser.add_argument(
        "--no-jetstream",
        dest="jetstream",
        action="store_false",
        help="start nats-server without JetStream (workers then run without leases or journal)",
    )
    parser.add_argument("--work-dir", type=Path, help="where the run directory is created")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, db)")


def _plan_from_args(args: argparse.Namespace) -> BenchPlan:
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    changes: dict[str, Any] = {
        "scenarios": tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    }
    if args.levels:
        changes["levels"] = tuple(int(x) for x in args.levels.split(",") if x.strip())
    for name in (
        "duration",
        "warmup",
        "objects",
        "cold_objects",
        "cold_max_active",
        "idle_objects",
        "partitions",
        "clients",
        "load",
        "node_modules",
        "loop",
        "work_dir",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.worker_arg:
        changes["worker_args"] = tuple(args.worker_arg)
    if args.keep:
        changes["keep"] = True
    if not args.jetstream:
        changes["jetstream"] = False
    return msgspec.structs.replace(plan, **changes)


def run_bench(args: argparse.Namespace) -> int:
    """Run ``ndo bench`` with parsed arguments; return the exit code.

    Returns:
        0 when every correctness check passed, 1 when one failed or the harness could not run,
        2 for bad arguments.
    """
    try:
        plan = _plan_from_args(args)
    except ValueError as exc:
        print(f"ndo bench: {exc}", file=sys.stderr)
        return 2
    _progress("command: " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    try:
        report = asyncio.run(_run(plan))
    except BenchError as exc:
        print(f"ndo bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
    if not report["ok"]:
        bad = [r for r in report["results"] if r["check"] != "ok"]
        print(f"ndo bench: correctness check FAILED in {len(bad)} row(s)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ndo.ops._bench``: the same as ``ndo bench`` without the ``ndo`` command."""
    parser = argparse.ArgumentParser(prog="ndo bench", description=__doc__.split("\n")[0])
    _add_bench_options(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
