"""``Worker``: one ndo worker process's runtime — NATS ingress, objects, commits, shutdown.

Ingress never runs user code: the NATS callback parses the subject, validates and decodes the
arguments, finds (or creates) the object's activation and enqueues. Bad input is answered right
there and never reaches an object. Parsed subjects are remembered (``_routes``, bounded), so a
subject seen before skips the parse and the name checks.

Partitions: with JetStream, the worker holds partition leases (``service._ownership``) and
serves only its partitions; requests reach it through the routing the server offers
(``service._routing``: mapped partition subjects, or forwarding between workers). Without
JetStream it serves every partition alone, as a single worker.

Shutdown order (``stop``): stop taking new requests → hand every partition over (drain its
mailboxes and commits, deactivate its objects, release its lease) → wait for what is left, up to
``drain_timeout`` → stop the committer (flushes what is queued) → cancel owned tasks → close
NATS → close storage.
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
from typing import Any, NamedTuple, Self

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.micro.service import Service
from prometheus_client import CollectorRegistry

from ndo.actors import (
    Actor,
    ActorClassInfo,
    ActorError,
    ActorId,
    BadRequestError,
    MethodSpec,
    NotFoundError,
    PayloadTooLargeError,
    StorageLimits,
    UnavailableError,
    describe_class,
)
from ndo.actors._actor import Event
from ndo.service._activation import Activation, AlarmDelivery, DeadlineWatchdog, Envelope
from ndo.service._alarms import AlarmScheduler
from ndo.service._catalog import Catalog
from ndo.service._codec import encode_error
from ndo.service._config import WorkerConfig
from ndo.service._discovery import start_discovery
from ndo.service._journal import JournalEntry, JournalPublisher
from ndo.service._metrics import WorkerMetrics
from ndo.service._ownership import OwnershipError, OwnershipManager, partitions_text
from ndo.service._routing import Router, RoutingError, RoutingMode, detect_routing, drain_all
from ndo.storage import (
    ALARM_UNCHANGED,
    GroupCommitter,
    ObjectWrite,
    SqliteStorage,
    Storage,
    StorageError,
    StoredAlarm,
)
from ndo.subjects import (
    MSGPACK_CONTENT_TYPE,
    Header,
    InvalidSubjectError,
    RpcAddress,
    parse_rpc_subject,
    partition_of,
)

__all__ = ["QUEUE_GROUP", "Worker", "WorkerState", "WorkerStats"]

_log = structlog.get_logger("ndo.worker")

QUEUE_GROUP = "ndo-workers"
"""Queue group of every worker's RPC subscription (each request reaches one worker)."""

_ROUTING_CHECK = 15.0
"""Seconds between checks of the server's routing (a mapping added or removed at runtime)."""

_PARTITIONS_LOG_DELAY = 0.5
"""Seconds partition moves settle before the worker logs what it serves now."""

_MAX_ROUTES = 8192
"""Parsed request subjects remembered; the cache is emptied when it is full."""


class _Route(NamedTuple):
    """What a request subject resolves to (everything in it is fixed for the worker's life)."""

    info: ActorClassInfo
    object_id: str
    spec: MethodSpec
    partition: int
    rpc_subject: str
    """The ``<prefix>.rpc.<Class>.<id>.<method>`` subject (for forwarding)."""


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
    forwarded: int = 0
    """Requests handed to another worker (``forward`` routing)."""


class Worker:
    """Serves actor classes over NATS with SQLite persistence. Use ``async with Worker(...)``."""

    # Configuration
    config: WorkerConfig
    limits: StorageLimits
    metrics: WorkerMetrics
    # Collaborators
    storage: Storage
    committer: GroupCommitter
    deadlines: DeadlineWatchdog
    catalog: Catalog
    alarms: AlarmScheduler
    _classes: dict[str, ActorClassInfo]
    _nc: NatsClient | None
    _router: Router | None
    """Subscriptions and forwarding; None until connected."""
    _ownership: OwnershipManager | None
    """Partition leases; None when this worker serves every partition alone."""
    _journal: JournalPublisher | None = None
    _discovery: Service | None = None
    """Records turns to the journal stream; None when off or without JetStream."""
    # State
    state: WorkerState
    _epochs: dict[int, int]
    """Fencing epochs when serving every partition alone (leases keep their own)."""
    _serve_all: bool
    _zombies: dict[int, list[Activation]]
    _unsubscribing: set[asyncio.Task[None]]
    """Objects of a partition that was taken away while they were busy; the partition is not
    served again until they are idle."""
    _tasks: set[asyncio.Task[None]]
    _max_payload: int
    _partitions_log: asyncio.TimerHandle | None
    """Pending "serving partitions" summary."""
    _partitions_logged: frozenset[int]
    """Partitions the last summary reported."""
    _routes: dict[str, _Route]
    """Parsed request subjects (the subject as received: RPC, mapped or forwarded)."""

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
        self.deadlines = DeadlineWatchdog(config.handler_timeout)
        self.catalog = Catalog(self)
        self.alarms = AlarmScheduler(
            self.storage,
            config,
            self.metrics,
            partitions=self._owned_partitions,
            deliver=self._deliver_alarm,
        )
        self._nc = None
        self._router = None
        self._ownership = None
        self.state = WorkerState.CREATED
        self._epochs = {}
        self._serve_all = False
        self._zombies = {}
        self._unsubscribing = set()
        self._rpc_head = f"{config.prefix}.rpc."
        self._routing_recheck = asyncio.Event()
        self._tasks = set()
        self._max_payload = config.max_payload
        self._routes = {}
        self._partitions_log = None
        self._partitions_logged = frozenset()
        self.name = config.worker_name or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def classes(self) -> dict[str, ActorClassInfo]:
        """Served classes by name."""
        return dict(self._classes)

    @property
    def partitions(self) -> frozenset[int]:
        """Partitions this worker serves right now."""
        if self._serve_all:
            return frozenset(range(self.config.partitions))
        return frozenset() if self._ownership is None else self._ownership.serving

    @property
    def routing_mode(self) -> RoutingMode | None:
        """How requests reach this worker (after ``start``)."""
        return None if self._router is None else self._router.mode

    @property
    def member_id(self) -> str | None:
        """This worker's id in the lease bucket, or None when it serves everything alone."""
        return None if self._ownership is None else self._ownership.member_id

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
            if self.config.journal:
                await self._start_journal()
            await self._start_serving()
            self._discovery = await start_discovery(
                self._nc,
                worker=self.name,
                prefix=self.config.prefix,
                classes=self._classes,
            )
            await self._nc.flush()
            self.spawn(self._check_routing(), "ndo-routing-check")
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
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.deadlines.close()
        if self._partitions_log is not None:
            self._partitions_log.cancel()
            self._partitions_log = None
        self.catalog.evict_all_idle()
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
        """Unsubscribe, hand partitions over (leases), and let queued turns finish."""
        if self._router is not None:
            await self._router.stop_rpc()
        if self._ownership is not None:
            if was_running:
                await self._ownership.leave()
            await self._ownership.close()
        if self._router is not None:
            await self._router.close()
        if self._unsubscribing:
            await asyncio.wait(set(self._unsubscribing), timeout=10)
        if was_running:
            await self._drain()

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self._busy() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._busy():
            _log.warning("drain timeout: some objects still had queued messages", busy=self._busy())

    def _busy(self) -> int:
        """Objects with queued, running or uncommitted turns (moved-away leftovers included)."""
        leftovers = sum(1 for zs in self._zombies.values() for z in zs if not z.idle)
        return self.catalog.busy + leftovers

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
            forwarded=0 if self._router is None else self._router.forwarded,
        )

    async def _start_journal(self) -> None:
        """Set up the journal stream and start recording (a warning, and no journal, when the
        server has no JetStream)."""
        journal = JournalPublisher(
            self.nc,
            prefix=self.config.prefix,
            worker=self.name,
            metrics=self.metrics,
            max_age=self.config.journal_max_age,
            max_bytes=self.config.journal_max_bytes,
            max_pending=self.config.journal_max_pending,
        )
        if await journal.start():
            self._journal = journal

    @property
    def journal_stream(self) -> str | None:
        """Name of the journal stream this worker records to, or None when it records nothing."""
        return None if self._journal is None else self._journal.stream

    # Host interface used by activations

    def journal(self, entry: JournalEntry) -> None:
        """Record a finished turn in the journal, when it runs (never raises, never waits)."""
        if self._journal is not None:
            self._journal.record(entry)

    @property
    def journaling(self) -> bool:
        """Whether turns are recorded to a journal."""
        return self._journal is not None

    def epoch_of(self, partition: int) -> int:
        """The fencing epoch held for ``partition`` (-1, always fenced, when not held)."""
        if self._ownership is not None:
            return self._ownership.epoch_of(partition)
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
        self.metrics.count(self.metrics.events, class_name, amount=len(events))

    def alarm_done(
        self, address: ActorId, delivery: AlarmDelivery, error: BaseException | None
    ) -> bool:
        """Forward an alarm delivery's outcome to the scheduler."""
        return self.alarms.done(address, delivery, error)

    # Ingress

    async def _handle_request(self, msg: Msg) -> None:
        """A request on an RPC subject (``forward`` routing, or serving every partition)."""
        await self._ingress(msg, routed=False)

    async def _handle_routed(self, msg: Msg) -> None:
        """A request on a partition subject: mapped there by the server, or forwarded."""
        if self._router is None:
            return
        await self._ingress(msg, routed=True)

    async def _ingress(self, msg: Msg, *, routed: bool) -> None:
        headers = msg.headers
        msgpack = bool(headers) and headers.get(Header.CONTENT_TYPE.value) == MSGPACK_CONTENT_TYPE  # type: ignore[union-attr]
        try:
            if self.state is not WorkerState.RUNNING:
                raise UnavailableError("worker is shutting down; retry", type="shutting_down")
            route = self._routes.get(msg.subject)
            if route is None:
                route = self._route(msg.subject, routed)
            info, object_id, spec, partition, _ = route
            ownership = self._ownership
            if not self._serve_all and (ownership is None or not ownership.accepts(partition)):
                if not routed and await self._forward(msg, partition, route.rpc_subject):
                    return
                raise UnavailableError(
                    f"partition {partition} of {info.name}/{object_id} is "
                    "moving between workers; retry shortly",
                    type="moving",
                )
            envelope = self._envelope(msg, spec, msgpack)
            activation = self.catalog.activate(info, object_id, partition)
            if not activation.enqueue(envelope):
                raise UnavailableError(
                    f"{info.name}/{object_id} has {activation.queued} messages "
                    "waiting; retry with backoff",
                    type="overloaded",
                )
        except ActorError as error:
            self.metrics.requests.inc(("-", "-", error.type))
            if msg.reply:
                body, reply_headers = encode_error(error, msgpack)
                await self.send(msg.reply, body, reply_headers)

    async def _forward(self, msg: Msg, partition: int, subject: str) -> bool:
        """Forward a request to the holder of ``partition``; False when there is none now."""
        router, ownership = self._router, self._ownership
        if router is None or ownership is None or router.mode is not RoutingMode.FORWARD:
            return False
        holder = ownership.holder(partition)
        if holder is None or holder == ownership.member_id:
            return False
        await router.forward(msg, partition, subject[len(self._rpc_head) :])
        return True

    def _route(self, received: str, routed: bool) -> _Route:
        """Parse and check a subject not seen before, and remember it (raises ``ActorError``
        subclasses, which are not remembered)."""
        subject = received
        if routed:
            assert self._router is not None
            with contextlib.suppress(ValueError):  # not a partition subject: reported as invalid
                subject, _ = self._router.rpc_subject_of(received)
        info, address, spec = self._address(subject)
        partition = partition_of(address.class_name, address.object_id, self.config.partitions)
        route = _Route(info, address.object_id, spec, partition, subject)
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        self._routes[received] = route
        return route

    def _address(self, subject: str) -> tuple[ActorClassInfo, RpcAddress, MethodSpec]:
        """Validate a request's subject, class and method (raises ``ActorError`` subclasses)."""
        try:
            address = parse_rpc_subject(self.config.prefix, subject)
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
        return info, address, spec

    def _envelope(self, msg: Msg, spec: MethodSpec, msgpack: bool) -> Envelope:
        """Check the body and headers of a request and decode its arguments."""
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
        return Envelope(spec, args, msg.reply, msgpack=msgpack, idempotency_key=key)

    # Partitions: routing, leases, hand-over (the OwnershipHost interface)

    async def _start_serving(self) -> None:
        """Detect the routing mode, then join the deployment's leases or serve everything."""
        nc, config = self.nc, self.config
        mode = await detect_routing(nc, config.prefix, config.partitions)
        self._router = Router(
            nc, config.prefix, mode, on_rpc=self._handle_request, on_routed=self._handle_routed
        )
        if await self._use_leases():
            await self._router.start_rpc(QUEUE_GROUP)
            self._ownership = OwnershipManager(
                self,
                nc,
                prefix=config.prefix,
                partitions=config.partitions,
                lease_ttl=config.lease_ttl,
                replicas=config.lease_replicas,
                drain_timeout=config.drain_timeout,
                routing=mode.value,
                registry=self.metrics.registry,
            )
            await self._ownership.start(settle_timeout=2.0 * config.lease_ttl + 1.0)
        else:
            self._epochs = await self.storage.claim_partitions(range(config.partitions), self.name)
            self._serve_all = True
            await self._router.start_all(QUEUE_GROUP)
        _log.info("routing", mode=mode.value, leases=self._ownership is not None)

    async def _check_routing(self) -> None:
        """Probe the routing again every ``_ROUTING_CHECK`` seconds and after a reconnect, and
        follow the server when an operator adds (or removes) the partition mapping."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ROUTING_CHECK):
                    await self._routing_recheck.wait()
            self._routing_recheck.clear()
            router = self._router
            if router is None or self.state is not WorkerState.RUNNING:
                continue
            try:
                mode = await detect_routing(self.nc, self.config.prefix, self.config.partitions)
            except RoutingError as exc:
                _log.error(
                    "the server's subject mapping is wrong; keeping the old routing", error=str(exc)
                )
                continue
            except (nats.errors.Error, OSError, TimeoutError):
                continue
            if mode is not router.mode:
                _log.warning("the server's routing changed", old=router.mode.value, new=mode.value)
                await router.switch(mode, QUEUE_GROUP, serve_all=self._serve_all)
                if self._ownership is not None:
                    self._ownership.set_routing(mode.value)

    async def _use_leases(self) -> bool:
        """Whether to share partitions through JetStream leases (see ``WorkerConfig.ownership``)."""
        if self.config.ownership == "standalone":
            return False
        try:
            await self.nc.jetstream().account_info()
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
            if self.config.ownership == "leases":
                raise OwnershipError(
                    f"ownership='leases' needs JetStream, which {self.config.nats_url} does not "
                    "offer; enable JetStream on the server (or run one worker, standalone)"
                ) from exc
            _log.warning(
                "the NATS server has no JetStream: this worker serves every partition alone; "
                "do not start a second worker on this deployment (enable JetStream to scale out)"
            )
            return False
        return True

    async def subscribe_partition(self, partition: int) -> None:
        """Receive ``partition``'s requests (answered "moving" until it is served)."""
        if self._router is not None:
            await self._router.add(partition)

    def unsubscribe_partitions(self, partitions: Collection[int]) -> None:
        """Stop receiving the requests of ``partitions`` (drained in the background)."""
        if self._router is not None:
            subs = self._router.detach(partitions)
            if subs:
                # Not a spawn(): stop() awaits these instead of cancelling them, because
                # nats-py's read loop dies if a PONG arrives for a flush that was cancelled.
                task = asyncio.create_task(drain_all(subs), name="ndo-unsubscribe")
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)

    async def claim_partition(self, partition: int, epoch: int) -> None:
        """Wait for leftovers of an earlier tenure, then fence ``partition`` at ``epoch``."""
        zombies = self._zombies.get(partition, [])
        deadline = time.monotonic() + 2 * self.config.handler_timeout + 5.0
        while any(not z.idle for z in zombies):
            if time.monotonic() >= deadline:
                raise StorageError(
                    f"objects of partition {partition} from its previous tenure are still busy"
                )
            await asyncio.sleep(0.01)
        self._zombies.pop(partition, None)
        await self.storage.claim_partitions([partition], self.name, epoch)

    def busy_partitions(self) -> set[int]:
        """Partitions with queued, running or uncommitted turns."""
        return self.catalog.busy_partitions()

    def drop_partition(self, partition: int) -> None:
        """Deactivate ``partition``'s objects; busy ones are remembered until idle."""
        busy = self.catalog.deactivate_partition(partition)
        if busy:
            self._zombies.setdefault(partition, []).extend(busy)
        for p, zombies in list(self._zombies.items()):  # forget the ones that finished
            self._zombies[p] = [z for z in zombies if not z.idle]
            if not self._zombies[p]:
                del self._zombies[p]

    def partitions_changed(self) -> None:
        """The served partitions changed: let the alarm scheduler look again, and log a summary
        once the moves of the moment have settled (one line, not one per partition)."""
        self.alarms.partitions_changed()
        if self._partitions_log is None and self.state is WorkerState.RUNNING:
            self._partitions_log = asyncio.get_running_loop().call_later(
                _PARTITIONS_LOG_DELAY, self._log_partitions
            )

    def _log_partitions(self) -> None:
        self._partitions_log = None
        serving = self.partitions
        gained = sorted(serving - self._partitions_logged)
        lost = sorted(self._partitions_logged - serving)
        self._partitions_logged = serving
        if gained or lost:
            _log.info(
                "serving partitions",
                worker=self.name,
                count=len(serving),
                partitions=partitions_text(serving),
                acquired=partitions_text(gained),
                released=partitions_text(lost),
            )

    # Alarms

    def _owned_partitions(self) -> Collection[int] | None:
        if self._serve_all or self._ownership is None:
            return None  # serving every partition (or not started: nothing is delivered)
        return self._ownership.serving

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
        partition = partition_of(alarm.class_name, alarm.object_id, self.config.partitions)
        if not self._serve_all and (
            self._ownership is None or not self._ownership.accepts(partition)
        ):
            return False  # moved away: partitions_changed() forgets it, its new owner delivers
        activation = self.catalog.activate(info, alarm.object_id, partition)
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
        if self.state is WorkerState.RUNNING:  # at shutdown, closing the connection is the point
            _log.warning("disconnected from nats; reconnecting")

    async def _on_reconnect(self) -> None:
        _log.info("reconnected to nats")
        if self._ownership is not None:
            self._ownership.on_reconnect()
        self._routing_recheck.set()


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
