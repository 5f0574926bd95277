"""``Worker``: one ndo worker process's runtime — NATS ingress, objects, commits, shutdown.

Ingress never runs user code: the NATS callback parses the subject, validates and decodes the
arguments, finds (or creates) the object's activation and enqueues. Bad input is answered right
there and never reaches an object.

Shutdown order (``stop``): unsubscribe (no new requests) → wait for mailboxes and commits to
empty, up to ``drain_timeout`` → stop the committer (flushes what is queued) → cancel owned
tasks → close NATS → close storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Collection, Coroutine, Iterable
from enum import Enum
from pathlib import Path
from typing import Any, Self

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import CollectorRegistry

from actors import (
    Actor,
    ActorClassInfo,
    ActorError,
    ActorId,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    StorageLimits,
    UnavailableError,
    describe_class,
)
from actors._actor import Event
from service._activation import AlarmDelivery, Envelope
from service._alarms import AlarmScheduler
from service._catalog import Catalog
from service._codec import encode_error
from service._config import WorkerConfig
from service._metrics import WorkerMetrics
from storage import (
    ALARM_UNCHANGED,
    GroupCommitter,
    ObjectWrite,
    SqliteStorage,
    Storage,
    StoredAlarm,
)
from subjects import (
    MSGPACK_CONTENT_TYPE,
    Header,
    InvalidSubjectError,
    parse_rpc_subject,
    rpc_wildcard,
)

__all__ = ["Worker", "WorkerState", "WorkerStats"]

_log = structlog.get_logger("ndo.worker")

QUEUE_GROUP = "ndo-workers"
"""Queue group of every worker's RPC subscription (each request reaches one worker)."""


class WorkerState(Enum):
    """Lifecycle of a worker."""

    CREATED = "created"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class WorkerStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a worker's counters."""

    active_objects: int
    busy_objects: int
    transactions: int
    write_sets: int
    commit_failures: int


class Worker:
    """Serves actor classes over NATS with SQLite persistence. Use ``async with Worker(...)``."""

    # Configuration
    config: WorkerConfig
    limits: StorageLimits
    metrics: WorkerMetrics
    # Collaborators
    storage: Storage
    committer: GroupCommitter
    catalog: Catalog
    alarms: AlarmScheduler
    _classes: dict[str, ActorClassInfo]
    _nc: NatsClient | None
    _sub: Subscription | None
    # State
    state: WorkerState
    _epochs: dict[int, int]
    _tasks: set[asyncio.Task[None]]
    _max_payload: int

    def __init__(
        self,
        config: WorkerConfig,
        classes: Iterable[type[Actor]],
        *,
        registry: CollectorRegistry | None = None,
        storage: Storage | None = None,
    ) -> None:
        """Create a worker.

        Args:
            config: the worker's settings.
            classes: the ``Actor`` subclasses to serve.
            registry: Prometheus registry for the metrics (a private one when omitted).
            storage: storage backend; defaults to SQLite in ``config.data_dir``.
        """
        self.config = config
        self.limits = StorageLimits(
            max_key_bytes=config.max_key_bytes,
            max_value_bytes=config.max_value_bytes,
            max_keys_per_call=config.max_keys_per_call,
        )
        self.metrics = WorkerMetrics(registry)
        self._classes = {}
        for cls in classes:
            info = describe_class(cls)
            if info.name in self._classes and self._classes[info.name].cls is not cls:
                raise ValueError(f"two actor classes are named {info.name!r}; names must be unique")
            self._classes[info.name] = info
        if not self._classes:
            raise ValueError("no actor classes to serve")
        self.storage = storage or SqliteStorage(
            Path(config.data_dir) / "ndo.sqlite3", partitions=config.partitions
        )
        self.committer = GroupCommitter(self.storage, observer=self._observe_commit)
        self.catalog = Catalog(self)
        self.alarms = AlarmScheduler(
            self.storage,
            config,
            self.metrics,
            partitions=self._owned_partitions,
            deliver=self._deliver_alarm,
        )
        self._nc = None
        self._sub = None
        self.state = WorkerState.CREATED
        self._epochs = {}
        self._tasks = set()
        self._max_payload = config.max_payload
        self.name = config.worker_name or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def classes(self) -> dict[str, ActorClassInfo]:
        """Served classes by name."""
        return dict(self._classes)

    @property
    def nc(self) -> NatsClient:
        """The worker's NATS connection (after ``start``)."""
        if self._nc is None:
            raise RuntimeError("worker is not started")
        return self._nc

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open storage, claim the partitions, connect to NATS and start serving."""
        if self.state is not WorkerState.CREATED:
            raise RuntimeError(f"worker cannot start from state {self.state.value}")
        self.state = WorkerState.RUNNING
        try:
            await self.storage.open()
            self._epochs = await self.storage.claim_partitions(
                range(self.config.partitions), self.name
            )
            self.committer.start()
            self._nc = await nats.connect(
                self.config.nats_url,
                name=f"ndo-worker {self.name}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=self._on_nats_error,
                disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect,
                allow_reconnect=True,
                connect_timeout=5,
            )
            self._max_payload = min(self.config.max_payload, self._nc.max_payload)
            self._sub = await self._nc.subscribe(
                rpc_wildcard(self.config.prefix),
                queue=QUEUE_GROUP,
                cb=self._handle_request,
                pending_msgs_limit=1_000_000,
                pending_bytes_limit=512 * 1024 * 1024,
            )
            await self._nc.flush()
            self.spawn(self._collect_idle(), "ndo-idle-collector")
            self.spawn(self.alarms.run(), "ndo-alarms")
            self.spawn(self._purge_idempotency(), "ndo-idempotency-purge")
        except BaseException:
            await self.stop()
            raise
        _log.info(
            "worker started",
            worker=self.name,
            nats_url=self.config.nats_url,
            prefix=self.config.prefix,
            classes=sorted(self._classes),
            data_dir=str(self.config.data_dir),
        )

    async def stop(self) -> None:
        """Stop taking requests, finish queued work, flush commits, disconnect (idempotent)."""
        if self.state in (WorkerState.STOPPING, WorkerState.STOPPED):
            return
        was_running = self.state is WorkerState.RUNNING
        self.state = WorkerState.STOPPING
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        if was_running:
            await self._drain()
        await self.committer.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.catalog.evict_all_idle()
        if self._nc is not None:
            await _close_quietly(self._nc)
            self._nc = None
        await self.storage.close()
        self.state = WorkerState.STOPPED
        _log.info("worker stopped", worker=self.name)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self.catalog.busy and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self.catalog.busy:
            _log.warning(
                "drain timeout: some objects still had queued messages", busy=self.catalog.busy
            )

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a task owned by the worker (cancelled at shutdown)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("worker task failed", task=task.get_name(), error=repr(task.exception()))

    def stats(self) -> WorkerStats:
        """Return a snapshot of the worker's counters."""
        commit = self.committer.stats
        return WorkerStats(
            active_objects=len(self.catalog),
            busy_objects=self.catalog.busy,
            transactions=commit.transactions,
            write_sets=commit.write_sets,
            commit_failures=commit.failures,
        )

    # Host interface used by activations

    def epoch_of(self, partition: int) -> int:
        """The fencing epoch held for ``partition``."""
        return self._epochs.get(partition, -1)

    async def send(self, reply: str, body: bytes, headers: dict[str, str] | None) -> None:
        """Publish a reply; a closed connection is logged, not raised."""
        nc = self._nc
        if nc is None:
            return
        try:
            await nc.publish(reply, body, headers=headers)
        except nats.errors.Error as exc:
            _log.warning("reply not sent", error=str(exc))

    async def publish_events(self, class_name: str, events: list[Event]) -> None:
        """Publish a committed turn's events."""
        nc = self._nc
        if nc is None:
            return
        for event in events:
            try:
                await nc.publish(event.subject, event.data)
            except nats.errors.Error as exc:
                _log.warning("event not published", subject=event.subject, error=str(exc))
        self.metrics.events.labels(class_name).inc(len(events))

    def alarm_done(
        self, address: ActorId, delivery: AlarmDelivery, error: BaseException | None
    ) -> bool:
        """Forward an alarm delivery's outcome to the scheduler."""
        return self.alarms.done(address, delivery, error)

    # Ingress

    async def _handle_request(self, msg: Msg) -> None:
        headers = msg.headers
        msgpack = bool(headers) and headers.get(Header.CONTENT_TYPE.value) == MSGPACK_CONTENT_TYPE  # type: ignore[union-attr]
        try:
            info, object_id, envelope = self._parse(msg, msgpack)
            activation = self.catalog.activate(info, object_id)
            if not activation.enqueue(envelope):
                raise UnavailableError(
                    f"{info.name}/{object_id} has {activation.queued} messages "
                    "waiting; retry with backoff",
                    type="overloaded",
                )
        except ActorError as error:
            self.metrics.requests.labels("-", "-", error.type).inc()
            if msg.reply:
                body, reply_headers = encode_error(error, msgpack)
                await self.send(msg.reply, body, reply_headers)

    def _parse(self, msg: Msg, msgpack: bool) -> tuple[ActorClassInfo, str, Envelope]:
        """Validate a request and decode its arguments (raises ``ActorError`` subclasses)."""
        if self.state is not WorkerState.RUNNING:
            raise UnavailableError("worker is shutting down; retry", type="shutting_down")
        try:
            address = parse_rpc_subject(self.config.prefix, msg.subject)
        except InvalidSubjectError as exc:
            raise BadRequestError(str(exc), type="invalid_subject") from None
        info = self._classes.get(address.class_name)
        if info is None:
            raise NotFoundError(
                f"unknown class {address.class_name!r}; this worker serves "
                f"{', '.join(sorted(self._classes))}",
                type="unknown_class",
            )
        spec = info.methods.get(address.method)
        if spec is None:
            raise NotFoundError(
                f"{address.class_name} has no method {address.method!r}; callable methods: "
                f"{', '.join(sorted(info.methods)) or '(none)'}",
                type="unknown_method",
            )
        if len(msg.data) > self._max_payload:
            raise PayloadTooLargeError(
                f"request body of {len(msg.data)} bytes is over the {self._max_payload}-byte limit"
            )
        args = spec.decode_args(msg.data, msgpack)
        headers = msg.headers
        key = None
        if headers:
            key = headers.get(Header.IDEMPOTENCY_KEY.value) or headers.get(Header.NATS_MSG_ID.value)
            if key is not None and not 0 < len(key) <= 256:
                raise BadRequestError(
                    "Idempotency-Key must be 1-256 characters", type="invalid_idempotency_key"
                )
        envelope = Envelope(spec, args, msg.reply, msgpack=msgpack, idempotency_key=key)
        return info, address.object_id, envelope

    # Alarms

    def _owned_partitions(self) -> Collection[int] | None:
        return None  # a single worker owns every partition

    def _deliver_alarm(self, alarm: StoredAlarm, delivery: AlarmDelivery) -> bool:
        info = self._classes.get(alarm.class_name)
        if info is None or not info.has_alarm:
            _log.warning(
                "alarm for a class this worker does not serve (or without alarm()); parked",
                class_name=alarm.class_name,
                object_id=alarm.object_id,
            )
            return False
        if self.state is not WorkerState.RUNNING:
            return False
        activation = self.catalog.activate(info, alarm.object_id)
        return activation.enqueue(Envelope(None, None, "", alarm=delivery))

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

    async def _collect_idle(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval)
            self.catalog.evict_idle(time.monotonic())

    async def _purge_idempotency(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.config.idempotency_window / 4)))
            with contextlib.suppress(Exception):
                await self.storage.purge_idempotency(time.time(), 5_000)

    async def _on_nats_error(self, error: Exception) -> None:
        _log.warning("nats error", error=str(error))

    async def _on_disconnect(self) -> None:
        _log.warning("disconnected from nats; reconnecting")

    async def _on_reconnect(self) -> None:
        _log.info("reconnected to nats")


async def _close_quietly(nc: NatsClient) -> None:
    """Flush and close a NATS connection that may already be broken (server gone)."""
    with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
        await nc.flush(timeout=2)
    try:
        async with asyncio.timeout(5):
            await nc.close()
    except (nats.errors.Error, OSError, TimeoutError):
        pass
    except asyncio.CancelledError:
        # nats-py can raise CancelledError from a transport that died under it; only a
        # cancellation aimed at us may propagate.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
