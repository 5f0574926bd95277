"""The process tree's members: a child with its log, the baseline responder, an ndo worker.

Starting and stopping processes (and knowing when each is ready) is one job, apart from driving
load through them and from measuring them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final

import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._errors import BenchError
from ndo.ops._nats_server import _pdeathsig_preexec
from ndo.ops.bench._objects import BASELINE_PREFIX, CLASS, PREFIX, ping_ids
from ndo.ops.bench._plan import BenchPlan
from ndo.ops.bench._protocol import ERROR_CODE_HEADER

__all__ = [
    "BASELINE_SUBJECT",
    "WORKER_START_TIMEOUT",
    "Child",
    "Worker",
    "spawn",
    "start_baseline",
    "start_worker",
]

WORKER_START_TIMEOUT: Final = 30.0
"""Seconds a worker (and the baseline responder) may take to serve, by default."""
_PROCESS_STOP_TIMEOUT: Final = 15.0

BASELINE_SUBJECT: Final = f"{BASELINE_PREFIX}.rpc.{CLASS}.*.*"
"""What the baseline responder subscribes to: every ``Counter`` object and method (one
subscription; the object id and the method are the subject's last two tokens)."""


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Child:
    """A child process whose output goes to a log file in the run directory."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the child's log (empty when it cannot be read)."""
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


async def spawn(
    name: str,
    argv: Sequence[str],
    run_dir: Path,
    *,
    stdout: int | IO[Any] | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """Start ``argv`` in ``run_dir``, its stderr (and stdout, unless piped) in ``<name>.log``.

    Children are ``python -m ndo...`` modules of the installed package (or ``node`` with the
    script the driver wrote), so they run from the run directory: nothing depends on where the
    harness was started or on a source tree. With ``stdout`` set (a pipe), stdin is a pipe too:
    the harness talks to the child.
    """
    log_path = run_dir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdout is not None else asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            cwd=run_dir,
            env={**os.environ, **(env or {})},
            preexec_fn=_pdeathsig_preexec(),
            limit=256 * 1024 * 1024,
        )
    return Child(name, proc, log_path)


async def start_baseline(url: str, run_dir: Path, loop: str) -> Child:
    """Start the baseline responder (in-memory counters on ``BASELINE_SUBJECT``) on event loop
    ``loop`` and wait for its ``ready``.

    Raises:
        BenchError: it did not start.
    """
    child = await spawn(
        "baseline",
        [sys.executable, "-m", "ndo.ops.bench._baseline", url, BASELINE_SUBJECT],
        run_dir,
        stdout=asyncio.subprocess.PIPE,
        env={"NDO_LOOP": loop},  # the workers' event loop
    )
    assert child.proc.stdout is not None
    try:
        async with asyncio.timeout(WORKER_START_TIMEOUT):
            line = await child.proc.stdout.readline()
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await child.stop()
        raise BenchError(f"the baseline responder did not start:\n{child.log_tail()}")
    return child


class Worker:
    """An ``ndo serve`` process with its metrics port."""

    def __init__(self, child: Child, metrics_port: int) -> None:
        self.child = child
        self.metrics_port = metrics_port

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.child.pid

    def metrics(self) -> dict[str, float]:
        """Scrape the worker's metrics, each sample name summed over its labels (blocking)."""
        return _scrape(self.metrics_port)


async def start_worker(
    name: str,
    url: str,
    data_dir: Path,
    run_dir: Path,
    plan: BenchPlan,
    nc: NatsClient,
    *,
    start_timeout: float = WORKER_START_TIMEOUT,
    prefix: str = PREFIX,
    **flags: Any,
) -> Worker:
    """Start ``ndo serve`` with ``flags`` and wait (up to ``start_timeout`` seconds) until it
    serves every partition of deployment ``prefix``.

    Raises:
        BenchError: the worker exited or did not get ready in time.
    """
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
        "--prefix",
        prefix,
    ]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    argv += ["--loop", plan.loop, *plan.worker_args]
    child = await spawn(f"worker-{name}", argv, run_dir)
    deadline = time.monotonic() + start_timeout
    # Ready means serving every partition (a worker with leases may wait for its predecessor's
    # to expire): one get() per partition must succeed.
    for object_id in ping_ids(plan.partitions):
        subject = f"{prefix}.rpc.{CLASS}.{object_id}.get"
        while True:
            if child.proc.returncode is not None:
                raise BenchError(
                    f"the ndo worker exited with code {child.proc.returncode}:\n{child.log_tail()}"
                )
            try:
                msg = await nc.request(subject, b"", timeout=1)
                if not (msg.headers and msg.headers.get(ERROR_CODE_HEADER)):
                    break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            if time.monotonic() > deadline:
                await child.stop()
                raise BenchError(
                    f"the ndo worker did not serve every partition within "
                    f"{start_timeout:g}s:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.1)
    return Worker(child, metrics_port)
