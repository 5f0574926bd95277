"""Scale-out test helpers: ndo workers as real processes (``ndo serve``), and status polling.

Workers run as separate processes where signals matter (SIGTERM hand-over, kill -9, SIGSTOP):
each is ``python -m ndo.ops.cli serve tests.objects ndo.examples.objects --nats-url ...``,
exactly as an operator starts one, logging JSON to a file in ``tmp_path``. A worker dies with
the test process (Linux ``PR_SET_PDEATHSIG``), and the ``make_cluster`` fixture kills whatever
is left. Workers share one data directory (local storage), or each has its own
(``separate_data_dirs``: replicated storage, as if on separate machines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from ndo.ops._status import DeploymentStatus, StatusError, fetch_status
from ndo.subjects import partition_of

REPO_ROOT = Path(__file__).resolve().parent.parent

StatusPredicate = Callable[[DeploymentStatus], bool]


def _die_with_parent() -> None:
    """``preexec_fn``: the worker gets SIGKILL when the test process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class WorkerProcess:
    """One ``ndo serve`` process."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path, data_dir: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.data_dir = data_dir
        """The worker's ``--data-dir``."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() >= deadline:
                raise AssertionError(f"worker {self.name} did not exit within {timeout}s")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """Worker processes on one NATS server (or cluster: ``url`` may list several, comma-
    separated), sharing one data directory or each with its own (``separate_data_dirs``)."""

    def __init__(
        self,
        nc: NatsClient,
        url: str,
        tmp_path: Path,
        *,
        partitions: int,
        lease_ttl: int,
        extra: list[str],
        separate_data_dirs: bool = False,
    ) -> None:
        self.nc = nc
        self.url = url
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "shared-data"
        self.partitions = partitions
        self.lease_ttl = lease_ttl
        self.extra = extra
        self.separate_data_dirs = separate_data_dirs
        self.workers: list[WorkerProcess] = []

    def data_dir_of(self, name: str) -> Path:
        """The data directory of worker ``name`` (the same for every start of that name)."""
        return self.tmp_path / f"data-{name}" if self.separate_data_dirs else self.data_dir

    def spawn(self, name: str | None = None, *extra: str) -> WorkerProcess:
        """Start a worker process (does not wait for it to join)."""
        name = name or f"w{len(self.workers)}"
        data_dir = self.data_dir_of(name)
        log = self.tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
        args = [
            sys.executable,
            "-m",
            "ndo.ops.cli",
            "serve",
            "tests.objects",
            "ndo.examples.objects",
            "--nats-url",
            self.url,
            "--data-dir",
            str(data_dir),
            "--partitions",
            str(self.partitions),
            "--lease-ttl",
            str(self.lease_ttl),
            "--worker-name",
            name,
            "--log-format",
            "json",
            "--no-journal",
            "--drain-timeout",
            "5",
            *self.extra,
            *extra,
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        worker = WorkerProcess(name, proc, log, data_dir)
        self.workers.append(worker)
        return worker

    async def start(self, name: str | None = None, *extra: str) -> WorkerProcess:
        """Start a worker and wait until it is a member that serves its share (this process:
        a restarted worker's predecessor of the same name may still be listed)."""
        worker = self.spawn(name, *extra)
        await self.wait_for(
            lambda s: any(
                m.name == worker.name and m.pid == worker.pid and m.partitions for m in s.members
            ),
            timeout=20,
            worker=worker,
        )
        return worker

    async def status(self) -> DeploymentStatus:
        return await fetch_status(self.nc, "ndo", replication=False)

    async def wait_for(
        self,
        predicate: StatusPredicate,
        *,
        timeout: float,
        worker: WorkerProcess | None = None,
        interval: float = 0.02,
    ) -> DeploymentStatus:
        """Poll the status until ``predicate`` holds; fail with the last status otherwise."""
        deadline = time.monotonic() + timeout
        last: DeploymentStatus | None = None
        while time.monotonic() < deadline:
            if worker is not None and not worker.alive:
                raise AssertionError(f"worker {worker.name} exited:\n{worker.log_text()[-3000:]}")
            try:
                last = await self.status()
            except (StatusError, nats.errors.Error):
                last = None
            if last is not None and predicate(last):
                return last
            await asyncio.sleep(interval)
        raise AssertionError(f"status condition not met in {timeout}s; last status: {last}")

    async def settled(self, names: set[str], timeout: float = 20) -> DeploymentStatus:
        """Wait until exactly the workers ``names`` are members and hold every partition."""

        def ok(s: DeploymentStatus) -> bool:
            if {m.name for m in s.members} != names:
                return False
            held = [p for m in s.members for p in m.partitions]
            return sorted(held) == list(range(s.partitions)) and all(
                m.partitions for m in s.members
            )

        return await self.wait_for(ok, timeout=timeout)

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker.alive:
                worker.signal(signal.SIGCONT)
                worker.signal(signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=5)


ClusterFactory = Callable[..., Awaitable[Cluster]]

_LOG_LINES_SHOWN = 300
"""Most log lines of one worker printed after a failed test."""


def _print_worker_logs(cluster: Cluster) -> None:
    """Print each worker's log lines above debug level (plus its partition moves) after a failed
    test, so a rare failure in CI can be explained from its output alone."""
    for worker in cluster.workers:
        lines = [
            line
            for line in worker.log_text().splitlines()
            if '"level": "debug"' not in line or '"partition' in line
        ]
        print(f"===== worker {worker.name} (pid {worker.pid}): {len(lines)} log lines")
        for line in lines[-_LOG_LINES_SHOWN:]:
            print(line[:500])


@pytest.fixture(name="make_cluster")
async def _make_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ClusterFactory]:
    """Factory: ``await make_cluster(url, partitions=8, lease_ttl=2)``; kills workers after.

    ``url`` may list several servers of one cluster, comma-separated; ``separate_data_dirs``
    gives each worker its own data directory, ``tmp_path/"data-<name>"``.
    """
    clusters: list[Cluster] = []
    connections: list[NatsClient] = []

    async def make(
        url: str,
        *,
        partitions: int = 8,
        lease_ttl: int = 2,
        extra: list[str] | None = None,
        separate_data_dirs: bool = False,
    ) -> Cluster:
        nc = await nats.connect(
            servers=url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        connections.append(nc)
        cluster = Cluster(
            nc,
            url,
            tmp_path,
            partitions=partitions,
            lease_ttl=lease_ttl,
            extra=extra or [],
            separate_data_dirs=separate_data_dirs,
        )
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.kill_all()
        if getattr(request.node, "failed_call", False):
            for cluster in clusters:
                _print_worker_logs(cluster)
        for nc in connections:
            with contextlib.suppress(Exception):
                await nc.close()


def object_in_partition(class_name: str, partitions: int, wanted: set[int], tag: str = "o") -> str:
    """An object id of ``class_name`` whose partition is in ``wanted``."""
    for i in range(100_000):
        object_id = f"{tag}{i}"
        if partition_of(class_name, object_id, partitions) in wanted:
            return object_id
    raise AssertionError(f"no id found for partitions {wanted}")


def one_object_per_partition(class_name: str, partitions: int, tag: str = "o") -> list[str]:
    """One object id per partition, partition 0 first."""
    return [object_in_partition(class_name, partitions, {p}, tag) for p in range(partitions)]


async def request(
    nc: NatsClient, subject: str, body: bytes = b"", *, timeout: float, key: str | None = None
) -> tuple[str, Any]:
    """One raw request: ``("ok", data)``, ``("error", (code, type, message))`` or
    ``("timeout", None)``
    (also no responders: ``("no_responders", None)``)."""
    import json

    headers = {"Idempotency-Key": key} if key else None
    try:
        msg = await nc.request(subject, body, timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        return "no_responders", None
    except nats.errors.TimeoutError:
        return "timeout", None
    if msg.headers and "Nats-Service-Error-Code" in msg.headers:
        error = json.loads(msg.data)["error"]
        return "error", (error["code"], error["type"], error["message"])
    return "ok", json.loads(msg.data)
