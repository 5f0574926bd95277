"""One storage mode's side of a run: its nats-servers, the harness's connection to them, the load
driver that reaches them, the workers' data directory and its pre-populated objects.

Every mode gets servers of its own (``local`` shares the bench's server with the baseline
responder; ``r1`` gets a second single server, ``r3`` a 3-server cluster), so the modes never
share a lease bucket, a journal or a partition log, and each mode's server CPU is its own.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops.bench._driver import LoadDriver
from ndo.ops.bench._log_loader import LogLoader, chunked
from ndo.ops.bench._objects import PREFIX
from ndo.ops.bench._plan import BenchPlan
from ndo.ops.bench._prepopulate import prepopulate, stored_objects
from ndo.ops.bench._processes import WORKER_START_TIMEOUT, Worker, start_worker
from ndo.ops.bench._progress import progress
from ndo.ops.bench._servers import NatsServers
from ndo.ops.bench._storage_modes import StorageMode

__all__ = ["Deployment"]

_REPLICATED_START_TIMEOUT: Final = 180.0
"""Seconds a replicated worker may take to serve: it first restores every partition from its
log (100,000 cold objects in the full plan), on an R3 cluster sharing two cores."""


class Deployment:
    """Where one storage mode's workers run (``start`` before use, ``stop`` after)."""

    mode: StorageMode
    plan: BenchPlan
    servers: NatsServers
    data_dir: Path
    """The workers' ``--data-dir`` (kept across the mode's scenarios: later workers only catch
    up on what the earlier ones appended)."""
    _run_dir: Path
    _owns_servers: bool
    _nc: NatsClient | None
    _driver: LoadDriver | None

    def __init__(
        self,
        mode: StorageMode,
        plan: BenchPlan,
        run_dir: Path,
        servers: NatsServers | None = None,
    ) -> None:
        """Describe mode ``mode``'s side of the run in ``run_dir``; ``servers`` are already
        running ones to use (the bench's own), else the deployment starts and stops its own."""
        self.mode = mode
        self.plan = plan
        self._run_dir = run_dir
        self._owns_servers = servers is None
        if servers is not None:
            self.servers = servers
        elif mode.servers > 1:
            self.servers = NatsServers.cluster(run_dir / f"nats-{mode.name}", mode.servers)
        else:
            self.servers = NatsServers.single(run_dir / f"nats-{mode.name}", jetstream=True)
        self.data_dir = run_dir / ("data" if mode.name == "local" else f"data-{mode.name}")
        self._nc = None
        self._driver = None

    @property
    def nc(self) -> NatsClient:
        """The harness's connection to the mode's servers (started)."""
        assert self._nc is not None, "Deployment.start() first"
        return self._nc

    @property
    def driver(self) -> LoadDriver:
        """The load driver reaching the mode's servers (started)."""
        assert self._driver is not None, "Deployment.start() first"
        return self._driver

    async def start(self) -> None:
        """Start the servers (unless shared), connect, and pre-populate the mode's storage.

        Raises:
            BenchError: a server did not start, or the storage could not be loaded.
        """
        if self._owns_servers:
            await self.servers.start()
            progress(
                f"{self.mode.name}: nats-server(s) {self.servers.url} "
                f"(pids {', '.join(map(str, self.servers.pids))})"
            )
        self._nc = await nats.connect(self.servers.client_url, connect_timeout=5)
        self._driver = LoadDriver(
            self.plan, self.servers.client_url, self._run_dir, self.servers.pids
        )
        started = time.perf_counter()
        plan = msgspec.structs.replace(self.plan, scenarios=self.plan.scenarios_for(self.mode.name))
        if self.mode.replicated:
            loader = LogLoader(self.nc, PREFIX, replicas=self.mode.replicas)
            await loader.open()
            for partition, records in sorted(chunked(stored_objects(plan)).items()):
                await loader.append(partition, records)
            what = f"{loader.appended} log records in {loader.stream}"
        else:
            await prepopulate(self.data_dir, plan)
            what = "SQLite"
        progress(
            f"{self.mode.name}: storage pre-populated ({what}) in "
            f"{time.perf_counter() - started:.1f}s"
        )

    async def stop(self) -> None:
        """Close the connection and stop the servers this deployment started."""
        if self._nc is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.close()
        if self._owns_servers:
            await self.servers.stop()

    async def worker(self, name: str, **flags: Any) -> Worker:
        """Start an ``ndo serve`` of this mode with ``flags`` and wait until it serves every
        partition (a replicated worker first catches up with the partition logs).

        Raises:
            BenchError: the worker exited or did not get ready in time.
        """
        label = name if self.mode.name == "local" else f"{name}-{self.mode.name}"
        started = time.perf_counter()
        worker = await start_worker(
            label,
            self.servers.url,
            self.data_dir,
            self._run_dir,
            self.plan,
            self.nc,
            start_timeout=(
                _REPLICATED_START_TIMEOUT if self.mode.replicated else WORKER_START_TIMEOUT
            ),
            **self.mode.worker_flags(),
            **flags,
        )
        progress(
            f"{label}: ndo worker pid {worker.pid}, metrics port {worker.metrics_port}, "
            f"serving after {time.perf_counter() - started:.1f}s"
        )
        return worker
