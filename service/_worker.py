"""``Worker``: one ndo worker process's runtime, assembled from its parts and run start to stop.

The worker itself holds no request logic; it builds the parts, wires them, and runs their
lifecycle:

* ``Ingress`` (``service._ingress``): requests and due alarms into objects' mailboxes;
* ``Catalog`` and ``Activation`` (``service._catalog``, ``service._activation``): the objects in
  memory, their mailboxes and commit pipeline, running turns through the turn engine
  (``service._turn``);
* ``GroupCommitter`` (``ndo.storage``): many objects' write-sets in one transaction;
* an ``Ownership`` (``service._ownership``): which partitions this worker serves — all of them
  alone, or a share through JetStream leases — acting through ``LocalPartitions``;
* the alarm scheduler, the journal publisher, service discovery.

Start order: open storage → apply class migrations and refuse orphaned classes
(``service._migrations``) → start the committer → connect → start the journal → detect the
routing → choose the ownership → take requests → join (serve partitions) → register for
discovery → background tasks.

Shutdown order (``stop``): stop taking new requests → hand every partition over (drain its
mailboxes and commits, run its objects' ``on_stop``, deactivate them, release its lease) → queue
``on_stop`` for the objects still in memory and wait for what is left (queued turns, ``on_stop``
turns, their commits), up to ``drain_timeout`` → stop the committer (flushes what is queued) →
flush the journal → cancel owned tasks → close NATS → close storage. Each step runs even if an
earlier one failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Coroutine, Iterable
from enum import Enum
from pathlib import Path
from typing import Any, Self

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from ndo.actors import Actor
from ndo.actors.runtime import ActorClassInfo, describe_classes
from ndo.service._activation import ActivationServices
from ndo.service._alarms import AlarmScheduler
from ndo.service._calls import WorkerCalls
from ndo.service._catalog import Catalog
from ndo.service._cluster import resolve_replicas
from ndo.service._config import WorkerConfig
from ndo.service._connection import is_refusal, redact_url, refusal_hint
from ndo.service._discovery import Discovery, start_discovery
from ndo.service._errors import ServiceError
from ndo.service._ingress import Ingress
from ndo.service._inspector import Inspector
from ndo.service._journal import JOURNAL_OFF, JournalPublisher
from ndo.service._leases import open_ownership
from ndo.service._metrics import WorkerMetrics
from ndo.service._migrations import check_migrations, migrate_at_start
from ndo.service._nats_client import TolerantNatsClient
from ndo.service._outbox import Outbox
from ndo.service._ownership import NOT_SERVING, Ownership
from ndo.service._partition_host import LocalPartitions
from ndo.service._replicated import ReplicatedStorage
from ndo.service._routing import RoutingMode, detect_routing
from ndo.service._tasks import TaskSet
from ndo.service._turn import DeadlineWatchdog
from ndo.storage import (
    ALARM_UNCHANGED,
    AppliedMigration,
    ClassMigration,
    GroupCommitter,
    InMemoryStorage,
    ObjectWrite,
    SqliteStorage,
    Storage,
)

__all__ = ["Worker", "WorkerState", "WorkerStats"]

_log = structlog.get_logger("ndo.worker")


class WorkerState(Enum):
    """Lifecycle of a worker."""

    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkerStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a worker's counters."""

    active_objects: int
    """Objects in memory."""
    busy_objects: int
    """Objects with queued, running or uncommitted turns."""
    transactions: int
    """Storage transactions committed."""
    write_sets: int
    """Write-sets made durable."""
    commit_failures: int
    """Storage transactions that failed."""
    forwarded: int = 0
    """Requests handed to another worker (``forward`` routing)."""


class Worker:
    """Serves actor classes over NATS with SQLite persistence. Use ``async with Worker(...)``."""

    # Configuration
    config: WorkerConfig
    """The worker's settings."""
    name: str
    """The worker's name in logs, status and discovery."""
    metrics: WorkerMetrics
    """Every ``ndo_*`` metric of this worker."""
    # Parts built with the worker
    storage: Storage
    """Where the objects' state is durable."""
    committer: GroupCommitter
    """Batches write-sets into storage transactions."""
    catalog: Catalog
    """The objects in memory."""
    alarms: AlarmScheduler
    """Delivers due alarms."""
    replicas: int
    """Replicas of the JetStream assets this worker creates (known after ``start``)."""
    applied_migrations: list[AppliedMigration]
    """Every class migration storage has applied, in order (known after ``start``)."""
    _migrations: tuple[ClassMigration, ...]
    _classes: dict[str, ActorClassInfo]
    _services: ActivationServices
    _deadlines: DeadlineWatchdog
    _outbox: Outbox
    _tasks: TaskSet
    # Parts built at start (they need the connection)
    _nc: NatsClient | None
    _journal: JournalPublisher | None
    """Records turns to the journal stream; None when off or without JetStream."""
    _ingress: Ingress | None
    _inspector: Inspector | None
    _partitions: LocalPartitions | None
    _ownership: Ownership
    _discovery: Discovery | None
    # State
    state: WorkerState
    """Where the worker is in its lifecycle."""

    def __init__(
        self,
        config: WorkerConfig,
        classes: Iterable[type[Actor]],
        *,
        registry: CollectorRegistry | None = None,
        storage: Storage | None = None,
        migrations: Iterable[ClassMigration] = (),
    ) -> None:
        """Create a worker.

        Args:
            config: the worker's settings.
            classes: the ``Actor`` subclasses to serve.
            registry: Prometheus registry for the metrics (a private one when omitted).
            storage: storage backend; defaults to SQLite in ``config.data_dir``.
            migrations: class migrations to apply at start, in order, each once
                (docs/migrations.md).

        Raises:
            TypeError: a class cannot be served (its message says why).
            ValueError: two classes share a name, or there are none; a migration names an
                invalid class, or two share a tag.
        """
        self.config = config
        self.name = config.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = WorkerMetrics(registry)
        self._classes = describe_classes(classes)
        self._migrations = check_migrations(migrations)
        self.applied_migrations = []
        self.storage = storage or _default_storage(config, self.name, self.metrics)
        self.committer = GroupCommitter(
            self.storage, observer=self._observe_commit, on_failure=self._commit_failed
        )
        self._deadlines = DeadlineWatchdog(config.handler_timeout)
        self._outbox = Outbox(self.metrics, reply_prefixes=config.reply_prefixes)
        self._tasks = TaskSet()
        self._ownership = NOT_SERVING
        self.alarms = AlarmScheduler(
            self.storage,
            config,
            self.metrics,
            partitions=lambda: self._ownership.serving,
            deliver=lambda alarm, delivery: (
                self._ingress is not None and self._ingress.deliver_alarm(alarm, delivery)
            ),
            runs_class=lambda name: name in self._classes and self._classes[name].has_alarm,
        )
        self._services = ActivationServices(
            prefix=config.prefix,
            max_mailbox=config.max_mailbox,
            max_reply_bytes=config.max_payload,
            idempotency_window=config.idempotency_window,
            limits=config.storage_limits(),
            metrics=self.metrics,
            storage=self.storage,
            committer=self.committer,
            deadlines=self._deadlines,
            outbox=self._outbox,
            alarms=self.alarms,
            tasks=self._tasks,
            worker=self.name,
        )
        self.catalog = Catalog(
            self._services,
            partitions=config.partitions,
            max_active=config.max_active,
            idle_timeout=config.idle_timeout,
        )
        self.replicas = 1
        self._nc = None
        self._journal = None
        self._ingress = None
        self._inspector = None
        self._partitions = None
        self._discovery = None
        self.state = WorkerState.CREATED

    @property
    def classes(self) -> dict[str, ActorClassInfo]:
        """Served classes by name."""
        return dict(self._classes)

    @property
    def partitions(self) -> frozenset[int]:
        """Partitions this worker serves right now."""
        return self._ownership.serving

    @property
    def routing_mode(self) -> RoutingMode | None:
        """How requests reach this worker (after ``start``)."""
        return None if self._ingress is None else self._ingress.mode

    @property
    def member_id(self) -> str | None:
        """This worker's id in the lease bucket, or None when it serves everything alone."""
        return self._ownership.member_id

    @property
    def journal_stream(self) -> str | None:
        """Name of the journal stream this worker records to, or None when it records nothing."""
        return None if self._journal is None else self._journal.stream

    @property
    def nc(self) -> NatsClient:
        """The worker's NATS connection (after ``start``)."""
        if self._nc is None:
            raise RuntimeError("worker is not started")
        return self._nc

    def epoch_of(self, partition: int) -> int:
        """The fencing epoch held for ``partition`` (-1, always fenced, when not held)."""
        return self._ownership.epoch_of(partition)

    def stats(self) -> WorkerStats:
        """Return a snapshot of the worker's counters."""
        commit = self.committer.stats
        return WorkerStats(
            active_objects=len(self.catalog),
            busy_objects=self.catalog.busy,
            transactions=commit.transactions,
            write_sets=commit.write_sets,
            commit_failures=commit.failures,
            forwarded=0 if self._ingress is None else self._ingress.forwarded,
        )

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open storage, connect to NATS, claim partitions and start serving."""
        if self.state is not WorkerState.CREATED:
            raise RuntimeError(f"worker cannot start from state {self.state.value}")
        self.state = WorkerState.RUNNING
        config = self.config
        try:
            await self.storage.open()
            self.applied_migrations = await migrate_at_start(
                self.storage,
                self._migrations,
                self._classes,
                partitions=config.partitions,
                worker=self.name,
            )
            self.committer.start()
            nc = self._nc = await self._connect()
            self._outbox.attach(nc)
            self._services.calls = WorkerCalls(nc, config.prefix, self.catalog, self.metrics)
            self.replicas = resolve_replicas(config.replicas, nc)
            if isinstance(self.storage, ReplicatedStorage):
                self.storage.on_lost = self._partition_lost
                await self.storage.connect(nc, prefix=config.prefix, replicas=self.replicas)
                self._services.limits = self.storage.turn_limits(self._services.limits)
            if config.journal:
                await self._start_journal(nc)
            mode = await detect_routing(nc, config.prefix, config.partitions)
            ingress = self._ingress = Ingress(
                nc,
                mode,
                prefix=config.prefix,
                partitions=config.partitions,
                max_payload=min(config.max_payload, nc.max_payload),
                caller_info=config.caller_info,
                classes=self._classes,
                catalog=self.catalog,
                outbox=self._outbox,
                metrics=self.metrics,
            )
            inspector = self._inspector = Inspector(
                nc,
                self._services,
                self.catalog,
                classes=self._classes,
                partitions=config.partitions,
                storage_kind=_storage_kind(self.storage),
            )
            await inspector.start()
            self._partitions = LocalPartitions(
                self.name,
                ingress=ingress,
                inspector=inspector,
                catalog=self.catalog,
                storage=self.storage,
                alarms=self.alarms,
                handler_timeout=config.handler_timeout,
            )
            ownership = await open_ownership(
                config,
                nc,
                self._partitions,
                routing=mode.value,
                metrics=self.metrics,
                replicas=self.replicas,
            )
            self._ownership = self._services.ownership = ownership
            await ingress.open(ownership)
            await ownership.start()
            _log.info("routing", mode=mode.value, leases=ownership.member_id is not None)
            self._discovery = await start_discovery(
                nc,
                self._outbox,
                worker=self.name,
                prefix=config.prefix,
                classes=self._classes,
                migrations=self.applied_migrations,
            )
            await nc.flush()
            self._tasks.spawn(ingress.follow_routing(), "ndo-routing-check")
            self._tasks.spawn(self._collect_idle(), "ndo-idle-collector")
            self._tasks.spawn(self.alarms.run(), "ndo-alarms")
            self._tasks.spawn(self._purge_idempotency(), "ndo-idempotency-purge")
            if isinstance(self.storage, ReplicatedStorage):
                self._tasks.spawn(self.storage.run_snapshots(), "ndo-snapshots")
        except BaseException:
            await self.stop()
            raise
        _log.info(
            "worker started",
            worker=self.name,
            nats_url=redact_url(config.nats_url),
            prefix=config.prefix,
            storage=config.storage,
            replicas=self.replicas,
            classes=sorted(self._classes),
            data_dir=str(config.data_dir),
        )

    async def _start_journal(self, nc: NatsClient) -> None:
        """Set up the journal stream and start recording (a warning, and no journal, when the
        server has no JetStream)."""
        journal = JournalPublisher(
            nc,
            prefix=self.config.prefix,
            worker=self.name,
            metrics=self.metrics,
            max_age=self.config.journal_max_age,
            max_bytes=self.config.journal_max_bytes,
            max_pending=self.config.journal_max_pending,
            reads=self.config.journal_reads,
            partitions=self.config.partitions,
            replicas=self.replicas,
        )
        if await journal.start():
            self._journal = self._services.journal = journal

    async def stop(self) -> None:
        """Stop taking requests, finish queued work, flush commits, disconnect (idempotent)."""
        if self.state in (WorkerState.STOPPING, WorkerState.STOPPED):
            return
        was_running = self.state is WorkerState.RUNNING
        self.state = WorkerState.STOPPING
        if self._partitions is not None:
            self._partitions.close()
        # Each step runs even if an earlier one failed (a NATS server that is gone makes the
        # NATS-facing ones fail): commits must flush and storage must close, or the process
        # hangs on its SQLite threads.
        await _step("leave service discovery", self._stop_discovery())
        await _step("stop taking requests", self._stop_taking_requests(was_running))
        await _step("flush commits", self.committer.stop())
        if self._journal is not None:
            # After the committer: its last releases are recorded.
            await _step("flush the journal", self._journal.stop())
            self._journal = None
            self._services.journal = JOURNAL_OFF
        await self._tasks.cancel_all()
        self._deadlines.close()
        self.catalog.evict_all_idle()
        self._outbox.attach(None)
        if self._nc is not None:
            await _close_quietly(self._nc)
            self._nc = None
        await _step("close storage", self.storage.close())
        self.state = WorkerState.STOPPED
        _log.info("worker stopped", worker=self.name)

    async def _stop_discovery(self) -> None:
        if self._discovery is not None:
            discovery, self._discovery = self._discovery, None
            await discovery.stop()

    async def _stop_taking_requests(self, was_running: bool) -> None:
        """Unsubscribe, hand partitions over, and let queued turns finish."""
        ingress = self._ingress
        if ingress is not None:
            await ingress.stop()
        if self._inspector is not None:
            await self._inspector.close()
        if was_running:
            await self._ownership.leave()
        await self._ownership.close()
        if ingress is not None:
            await ingress.close()
        if was_running:
            self.catalog.stop_all()  # behind what is queued: one drain waits for both
            await self._drain()

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self._busy() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._busy():
            _log.warning("drain timeout: some objects still had queued messages", busy=self._busy())

    def _busy(self) -> int:
        """Objects with queued, running or uncommitted turns (moved-away leftovers included)."""
        leftovers = 0 if self._partitions is None else self._partitions.busy_leftovers
        return self.catalog.busy + leftovers

    # Background work

    def _observe_commit(self, entries: list[ObjectWrite], seconds: float) -> None:
        self.metrics.commits.inc()
        self.metrics.commit_write_sets.observe(len(entries))
        self.metrics.commit_seconds.observe(seconds)
        earliest = min(
            (e.alarm for e in entries if e.alarm is not None and e.alarm != ALARM_UNCHANGED),
            default=None,
        )
        if earliest is not None:
            self.alarms.notify_due(earliest)

    def _commit_failed(self, error: BaseException) -> None:
        self.metrics.commit_failures.inc()

    def _partition_lost(self, partition: int, reason: str) -> None:
        """Replicated storage cannot serve ``partition`` from here any more."""
        self._ownership.lost(partition, reason)

    async def _collect_idle(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval)
            self.catalog.evict_idle(time.monotonic())

    async def _purge_idempotency(self) -> None:
        """Delete expired idempotency records every quarter window (1 s to 60 s).

        Each pass deletes batches of 5,000 until fewer are left, so the purge keeps pace with
        any write rate, and yields between batches so turns run meanwhile. A failed pass is
        counted (``ndo_background_failures_total{task="idempotency_purge"}``) and logged as a
        warning at most once a minute; the next pass tries again.
        """
        batch, warn_every = 5_000, 60.0
        last_warning: float | None = None
        unlogged = 0
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.config.idempotency_window / 4)))
            try:
                now = time.time()
                while await self.storage.purge_idempotency(now, batch) >= batch:  # noqa: ASYNC110
                    await asyncio.sleep(0)  # let turns and commits run between batches
            except Exception as exc:  # counted and logged; the next pass tries again
                self.metrics.count(self.metrics.background_failures, "idempotency_purge")
                unlogged += 1
                if last_warning is None or time.monotonic() - last_warning >= warn_every:
                    last_warning = time.monotonic()
                    _log.warning(
                        "purging expired idempotency records failed; retrying next interval",
                        error=str(exc),
                        failures=unlogged,
                    )
                    unlogged = 0

    async def _connect(self) -> NatsClient:
        """Connect to NATS, retrying for as long as it takes while no server answers (a worker
        may start before its server), but failing at once when a server refuses the worker's
        credentials or TLS: retrying cannot fix those.

        Raises:
            ServiceError: the connection settings are wrong or a server refused them.
        """
        config = self.config
        try:
            auth_options = config.auth.connect_options()
        except ValueError as exc:
            raise ServiceError(f"cannot connect to NATS: {exc}") from None
        nc = TolerantNatsClient()
        starting = asyncio.current_task()
        refusals: list[Exception] = []

        async def on_error(error: Exception) -> None:
            if not nc.is_connected and starting is not None and is_refusal(error):
                if not refusals:
                    starting.cancel()
                refusals.append(error)
            await self._on_nats_error(error)

        try:
            await nc.connect(
                servers=config.nats_servers(),
                name=f"ndo-worker {self.name}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py sleeps a float
                error_cb=on_error,
                disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect,
                allow_reconnect=True,
                connect_timeout=5,
                **auth_options,
            )
        except asyncio.CancelledError:
            if not refusals or starting is None:
                raise
            starting.uncancel()
            with contextlib.suppress(Exception):
                await nc.close()
            raise ServiceError(
                f"NATS at {redact_url(config.nats_url)} refused the worker: {refusals[0]}; "
                + refusal_hint(refusals[0])
            ) from None
        starting = None  # from now on a refusal (a reconnect) is only logged
        return nc

    async def _on_nats_error(self, error: Exception) -> None:
        if isinstance(error, nats.errors.SlowConsumerError):
            if self._ingress is not None:
                await self._ingress.answer_dropped(error.subject, error.reply)
            return
        text = str(error)
        if "permissions violation" in text.lower():
            _log.error(
                "the worker's NATS user lacks a permission; grant what docs/security.md lists "
                "(`ndo permissions worker` prints it)",
                error=text,
            )
        else:
            _log.warning("nats error", error=text)

    async def _on_disconnect(self) -> None:
        if self.state is WorkerState.RUNNING:  # at shutdown, closing the connection is the point
            _log.warning("disconnected from nats; reconnecting")

    async def _on_reconnect(self) -> None:
        _log.info("reconnected to nats")
        self._ownership.on_reconnect()
        if self._ingress is not None:
            self._ingress.on_reconnect()


def _storage_kind(storage: Storage) -> str:
    """How ``ndo inspect`` names the worker's storage: replicated, memory or local."""
    if isinstance(storage, ReplicatedStorage):
        return "replicated"
    return "memory" if isinstance(storage, InMemoryStorage) else "local"


def _default_storage(config: WorkerConfig, name: str, metrics: WorkerMetrics) -> Storage:
    """The storage ``config.storage`` asks for, in ``config.data_dir``."""
    data_dir = Path(config.data_dir)
    if config.storage == "replicated":
        return ReplicatedStorage(
            data_dir / "replica.sqlite3",
            partitions=config.partitions,
            writer=name,
            snapshot_every=config.snapshot_every,
            append_timeout=config.append_timeout,
            metrics=metrics,
        )
    return SqliteStorage(data_dir / "ndo.sqlite3", partitions=config.partitions)


async def _step(what: str, step: Coroutine[Any, Any, None]) -> None:
    """Run one shutdown step; a failure is logged and shutdown goes on."""
    try:
        await step
    except Exception as exc:
        _log.warning("shutdown step failed; going on", step=what, error=repr(exc))


async def _close_quietly(nc: NatsClient) -> None:
    """Flush and close a NATS connection that may already be broken (server gone)."""
    with contextlib.suppress(nats.errors.Error, OSError, TimeoutError, RuntimeError):
        await nc.flush(timeout=2)
    try:
        async with asyncio.timeout(5):
            await nc.close()
    except (nats.errors.Error, OSError, TimeoutError, RuntimeError):
        # RuntimeError: uvloop refuses writes on a transport that is already closed.
        pass
    except asyncio.CancelledError:
        # nats-py can raise CancelledError from a transport that died under it; only a
        # cancellation aimed at us may propagate.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
