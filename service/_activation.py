"""One active object: its mailbox, its turn pump and its place in the commit pipeline.

Messages for one object queue in its mailbox; a pump task (alive only while the mailbox has
work) runs them one at a time. A turn that wrote something hands its write-set and its reply to
the group committer and the pump moves straight on to the next message: later turns read the
earlier writes from the object's cache. The reply (and events) leave when the commit is durable.
A turn that wrote nothing answers at once, or, if earlier writes of the object are still in
flight, right after them (output gate).

Per-turn costs are kept off the hot path: the pump binds the object's log context once (it runs
in its own copy of the context), one ``DeadlineWatchdog`` per worker enforces
``handler_timeout`` instead of an ``asyncio.timeout`` (a timer) per turn, and a read-only turn
with nothing in flight replies straight from the pump without building a commit waiter.

Failure handling: a handler that raises discards its own write-set and the instance is rebuilt
before the next turn. A commit that fails resets the object (new generation): the turns queued
behind it in the committer are abandoned with an error, and the next message reloads the object
from durable storage.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections import deque
from collections.abc import Coroutine
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
from structlog.contextvars import bind_contextvars

from ndo.actors import (
    ActorClassInfo,
    ActorContext,
    ActorError,
    ActorId,
    ActorStorage,
    AlarmInfo,
    DeadlineExceededError,
    HandlerError,
    MethodSpec,
    PayloadTooLargeError,
    StorageLimits,
    UnavailableError,
)
from ndo.actors._actor import Event
from ndo.service._codec import MSGPACK_HEADERS, encode_error, encode_result
from ndo.service._idempotency import IdempotencyCache
from ndo.service._journal import JournalEntry
from ndo.storage import (
    ALARM_UNCHANGED,
    CommitAbandonedError,
    FencedError,
    GroupCommitter,
    IdempotentReply,
    ObjectWrite,
    PendingCommit,
    Storage,
)

if TYPE_CHECKING:
    from ndo.actors import Actor
    from ndo.service._config import WorkerConfig
    from ndo.service._metrics import WorkerMetrics

__all__ = [
    "Activation",
    "ActivationState",
    "AlarmDelivery",
    "DeadlineWatchdog",
    "Envelope",
    "Host",
]

_log = structlog.get_logger("ndo.runtime")


def _log_context_vars() -> tuple[contextvars.ContextVar[Any], ...]:
    """structlog's context variables for ``class_name``, ``object_id``, ``partition`` and
    ``method`` (learnt from the tokens ``bind_contextvars`` returns, bound in a scratch context).

    A pump sets them directly: ``bind_contextvars`` costs ~1.5 µs a call, ``ContextVar.set`` 0.05.
    """
    tokens = contextvars.Context().run(
        bind_contextvars, class_name=None, object_id=None, partition=None, method=None
    )
    return tuple(token.var for token in tokens.values())


_CLASS_VAR, _OBJECT_VAR, _PARTITION_VAR, _METHOD_VAR = _log_context_vars()


class Host(Protocol):
    """What an activation needs from its worker."""

    config: WorkerConfig
    metrics: WorkerMetrics
    committer: GroupCommitter
    deadlines: DeadlineWatchdog
    storage: Storage
    limits: StorageLimits

    def epoch_of(self, partition: int) -> int:
        """The fencing epoch this worker holds for ``partition``."""
        ...

    async def send(self, reply: str, body: bytes, headers: dict[str, str] | None) -> None:
        """Publish a reply (never raises)."""
        ...

    async def publish_events(self, class_name: str, events: list[Event]) -> None:
        """Publish committed events (never raises)."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a task the worker owns (cancelled at shutdown)."""
        ...

    def alarm_done(
        self, address: ActorId, delivery: AlarmDelivery, error: BaseException | None
    ) -> bool:
        """Tell the alarm scheduler how a delivery ended; True means "give up: delete it"."""
        ...

    def journal(self, entry: JournalEntry) -> None:
        """Record a finished turn in the journal (never raises, never waits)."""
        ...

    @property
    def journaling(self) -> bool:
        """Whether ``journal`` records anything (entries need not be built otherwise)."""
        ...


class ActivationState(Enum):
    """Lifecycle of an activation."""

    VALID = "valid"
    """Accepting messages."""
    DEACTIVATED = "deactivated"
    """Evicted or reset for good; the catalog makes a new activation for new messages."""


class AlarmDelivery(msgspec.Struct):
    """An alarm being delivered to an object (one attempt)."""

    due: float
    attempt: int


class Envelope:
    """One message waiting in a mailbox: a request, or an alarm delivery."""

    __slots__ = ("alarm", "args", "idempotency_key", "msgpack", "received", "reply", "spec")

    def __init__(
        self,
        spec: MethodSpec | None,
        args: msgspec.Struct | None,
        reply: str,
        *,
        msgpack: bool = False,
        idempotency_key: str | None = None,
        alarm: AlarmDelivery | None = None,
    ) -> None:
        """Create a request envelope (``spec`` and ``args``) or an alarm one (``alarm``)."""
        self.spec = spec
        self.args = args
        self.reply = reply
        self.msgpack = msgpack
        self.idempotency_key = idempotency_key
        self.alarm = alarm
        self.received = time.perf_counter()

    @property
    def method(self) -> str:
        """Method name for logs and metrics (``alarm`` for alarm deliveries)."""
        return "alarm" if self.spec is None else self.spec.name


class _Turn:
    """A finished turn waiting for durability: the commit waiter that sends its reply."""

    __slots__ = (
        "activation",
        "body",
        "envelope",
        "events",
        "followers",
        "generation",
        "headers",
        "journal",
    )

    def __init__(
        self,
        activation: Activation,
        envelope: Envelope,
        body: bytes,
        headers: dict[str, str] | None,
        events: list[Event] | None,
    ) -> None:
        self.activation = activation
        self.envelope = envelope
        self.body = body
        self.headers = headers
        self.events = events
        self.generation = activation.generation
        self.followers: list[_Turn] | None = None
        self.journal: JournalEntry | None = None

    def commit_wanted(self) -> bool:
        return self.generation == self.activation.generation

    async def commit_done(self, error: BaseException | None) -> None:
        await self.activation._turn_durable(self, error)


class Activation:
    """The in-memory life of one object on this worker."""

    __slots__ = (
        "_deadline",
        "_expired",
        "_followed",
        "_host",
        "_idempotency",
        "_journal_token",
        "_journal_writes",
        "_mailbox",
        "_pending",
        "_pump",
        "address",
        "context",
        "generation",
        "info",
        "instance",
        "last_used",
        "partition",
        "state",
    )

    address: ActorId
    info: ActorClassInfo
    partition: int
    context: ActorContext
    instance: Actor | None
    generation: int
    """Bumped when the object is reset; turns of an older generation are never committed."""
    state: ActivationState
    last_used: float
    """``time.monotonic()`` of the last message, for idle eviction."""
    _host: Host
    _mailbox: deque[Envelope] | None
    _pump: asyncio.Task[None] | None
    _pending: int
    """Turns handed to the committer and not yet durable."""
    _followed: _Turn | None
    """The newest turn still waiting for its commit; read-only turns answer after it."""
    _idempotency: IdempotencyCache[_Turn] | None
    _journal_token: str
    """This activation's token in journal records ("" until the first record)."""
    _journal_writes: int
    """State-changing journal records released so far (their ``write_count``)."""
    # Handler deadline (kept by the host's DeadlineWatchdog)
    _deadline: float
    """``time.monotonic()`` by which the running handler must finish; 0.0 when none runs."""
    _expired: bool
    """The watchdog cancelled the pump because its handler ran past the deadline."""

    def __init__(self, host: Host, info: ActorClassInfo, object_id: str, partition: int) -> None:
        """Create an activation; the instance is built by the pump before the first turn."""
        self._host = host
        self.info = info
        self.address = ActorId(info.name, object_id)
        self.partition = partition
        self.context = self._new_context()
        self.instance = None
        self.generation = 0
        self.state = ActivationState.VALID
        self.last_used = time.monotonic()
        self._mailbox = None
        self._pump = None
        self._pending = 0
        self._followed = None
        self._idempotency = None
        self._journal_token = ""
        self._journal_writes = 0
        self._deadline = 0.0
        self._expired = False

    def _new_context(self) -> ActorContext:
        storage = ActorStorage(
            self._host.storage, self.address.class_name, self.address.object_id, self._host.limits
        )
        return ActorContext(self.address, self.partition, self._host.config.prefix, storage)

    # Mailbox

    @property
    def idle(self) -> bool:
        """True when nothing is queued, running or waiting for a commit (safe to evict)."""
        return self._pump is None and self._pending == 0 and not self._mailbox

    @property
    def queued(self) -> int:
        """Messages waiting in the mailbox."""
        return len(self._mailbox) if self._mailbox else 0

    def enqueue(self, envelope: Envelope) -> bool:
        """Queue a message; False when the mailbox is full (the caller answers 503)."""
        mailbox = self._mailbox
        if mailbox is None:
            mailbox = self._mailbox = deque()
        elif len(mailbox) >= self._host.config.max_mailbox:
            return False
        mailbox.append(envelope)
        self.last_used = time.monotonic()
        if self._pump is None:
            self._pump = self._host.spawn(self._run_pump(), "ndo-pump")
        return True

    def deactivate(self) -> None:
        """Mark the activation dead (the catalog already removed it)."""
        self.state = ActivationState.DEACTIVATED

    async def _run_pump(self) -> None:
        mailbox = self._mailbox
        assert mailbox is not None
        # The pump task runs in its own copy of the context: what is bound here labels every log
        # line of its turns and is gone with the task (no unbinding per turn).
        _CLASS_VAR.set(self.address.class_name)
        _OBJECT_VAR.set(self.address.object_id)
        _PARTITION_VAR.set(self.partition)
        method = ""
        try:
            while mailbox:
                envelope = mailbox.popleft()
                spec = envelope.spec
                name = "alarm" if spec is None else spec.name
                if name != method:
                    method = name
                    _METHOD_VAR.set(name)
                try:
                    await self._run_turn(envelope)
                except Exception:  # a runtime bug: answer, log, keep the object serving
                    _log.exception("turn crashed in the runtime", method=envelope.method)
                    self.instance = None
                    await self._send_error(
                        envelope, HandlerError("internal error in the ndo runtime; see its logs")
                    )
        finally:
            self._pump = None
            if not mailbox:
                self._mailbox = None  # idle objects carry no deque
            self.last_used = time.monotonic()

    # Turns

    async def _start_instance(self) -> Actor:
        instance = self.info.cls(self.context)
        storage = self.context.storage
        try:
            await instance.on_start()
        finally:
            storage.abort_turn()  # on_start may read; its writes are not a turn
            self.context.take_events()
        self.instance = instance
        metrics = self._host.metrics
        metrics.count(metrics.activations, self.info.name)
        return instance

    async def _run_turn(self, envelope: Envelope) -> None:
        host = self._host
        key = envelope.idempotency_key
        if key is not None and await self._answer_duplicate(envelope, key):
            return
        generation = self.generation
        storage = self.context.storage
        if envelope.alarm is not None and await self._alarm_is_stale(envelope.alarm):
            host.alarm_done(self.address, envelope.alarm, None)
            return
        fresh, started, clock = self.instance is None, time.time(), time.perf_counter()
        expired = False
        try:
            instance = self.instance or await self._start_instance()
            if envelope.alarm is not None:
                storage.alarm_fired(envelope.alarm.due)
            deadlines = host.deadlines
            deadlines.start(self)
            try:
                if envelope.alarm is not None:
                    alarm_hook = instance.alarm  # type: ignore[attr-defined]
                    result = await alarm_hook(AlarmInfo(envelope.alarm.due, envelope.alarm.attempt))
                else:
                    assert envelope.spec is not None and envelope.args is not None
                    result = await envelope.spec.call(instance, envelope.args)
            except asyncio.CancelledError:
                expired = deadlines.end(self)
                if not expired:
                    raise
                raise TimeoutError from None
            except BaseException:
                expired = deadlines.end(self)  # a TimeoutError after the deadline is a 504 too
                raise
            else:
                deadlines.end(self)  # a handler that swallowed the cancellation keeps its result
            body = encode_result(result, envelope.msgpack)
            if len(body) > host.config.max_payload:
                raise PayloadTooLargeError(
                    f"reply of {len(body)} bytes is over the {host.config.max_payload}-byte limit",
                    type="reply_too_large",
                )
        except ActorError as exc:
            self._turn_failed(envelope, exc, exc, (started, clock, fresh))
            await self._send_error(envelope, exc)
            return
        except TimeoutError as exc:
            if expired:
                error: ActorError = DeadlineExceededError(
                    f"{self.address.class_name}.{envelope.method} ran past its "
                    f"{host.config.handler_timeout}s deadline; its writes were discarded"
                )
            else:
                error = HandlerError(f"{type(exc).__name__}: {exc}")
            self._turn_failed(envelope, error, exc, (started, clock, fresh))
            await self._send_error(envelope, error)
            return
        except (TypeError, msgspec.EncodeError) as exc:
            error = HandlerError(f"{type(exc).__name__}: {exc}")
            self._turn_failed(envelope, error, exc, (started, clock, fresh))
            await self._send_error(envelope, error)
            return
        except Exception as exc:
            error = HandlerError(
                f"{type(exc).__name__}: {exc}"
                if str(exc)
                else f"{type(exc).__name__} in {self.address.class_name}.{envelope.method}"
            )
            self._turn_failed(envelope, error, exc, (started, clock, fresh))
            await self._send_error(envelope, error)
            return
        changes = storage.end_turn()
        events = self.context.take_events()
        duration = time.perf_counter() - clock
        if generation != self.generation:  # reset while the handler ran
            self._journal(
                JournalEntry(
                    self.address,
                    self.partition,
                    envelope,
                    status="aborted",
                    error=_reset_error(),
                    started=started,
                    duration=duration,
                    fresh=fresh,
                )
            )
            await self._send_error(envelope, _reset_error())
            return
        headers = MSGPACK_HEADERS if envelope.msgpack else None
        if self._followed is None and not events and envelope.alarm is None and changes.is_empty():
            # Fast path: a read-only turn with no earlier write of this object in flight (output
            # gate open) answers right here, as _release would, without a commit waiter (its
            # idempotency key, if any, was never remembered: nothing to update).
            await self._send_reply(envelope, body, headers)
            if host.journaling:
                self._record(
                    JournalEntry(
                        self.address,
                        self.partition,
                        envelope,
                        status="ok",
                        body=body,
                        started=started,
                        duration=duration,
                        fresh=fresh,
                    )
                )
            return
        turn = _Turn(self, envelope, body, headers, events)
        turn.journal = JournalEntry(
            self.address,
            self.partition,
            envelope,
            status="ok",
            body=body,
            changes=None if changes.is_empty() else changes,
            started=started,
            duration=duration,
            fresh=fresh,
        )
        remember = key is not None and (not changes.is_empty() or events)
        if changes.is_empty() and not remember:
            if self._followed is None:
                await self._release(turn)
            else:
                _follow(self._followed, turn)
            return
        write = ObjectWrite(
            class_name=self.address.class_name,
            object_id=self.address.object_id,
            partition=self.partition,
            epoch=host.epoch_of(self.partition),
            writes=changes.writes,
            cleared=changes.cleared,
            alarm=ALARM_UNCHANGED if changes.alarm == ALARM_UNCHANGED else changes.alarm,
        )
        if remember:
            assert key is not None and self._idempotency is not None
            write.idempotent_reply = IdempotentReply(
                key,
                _stored_reply(body, envelope.msgpack),
                time.time() + host.config.idempotency_window,
            )
            self._idempotency.remember(key, turn)
        self._pending += 1
        self._followed = turn
        host.committer.submit(PendingCommit(write, turn))

    def _turn_failed(
        self,
        envelope: Envelope,
        error: ActorError,
        cause: BaseException,
        timing: tuple[float, float, bool],
    ) -> None:
        """Discard the turn's writes and events; rebuild the instance before the next turn.

        ``timing`` is ``(time.time(), time.perf_counter(), fresh)`` taken when the turn started.
        """
        self.context.storage.abort_turn()
        self.context.take_events()
        self.instance = None
        started, clock, fresh = timing
        self._journal(
            JournalEntry(
                self.address,
                self.partition,
                envelope,
                status="error",
                error=error,
                started=started,
                duration=time.perf_counter() - clock,
                fresh=fresh,
            )
        )
        log = (
            _log.warning if isinstance(error, (HandlerError, DeadlineExceededError)) else _log.info
        )
        log(
            "turn failed", error_type=error.type, error=error.message, exc_type=type(cause).__name__
        )
        if envelope.alarm is not None and self._host.alarm_done(
            self.address, envelope.alarm, cause
        ):
            self._delete_alarm(envelope)

    async def _alarm_is_stale(self, delivery: AlarmDelivery) -> bool:
        """True when the object no longer has the alarm being delivered (deleted or moved)."""
        current = await self.context.storage.get_alarm()
        return current is None or abs(current - delivery.due) > 1e-6

    def _delete_alarm(self, envelope: Envelope) -> None:
        """Delete an alarm that was given up on, in order with the object's other writes."""
        self.context.storage.alarm_fired(0.0)
        changes = self.context.storage.end_turn()
        write = ObjectWrite(
            class_name=self.address.class_name,
            object_id=self.address.object_id,
            partition=self.partition,
            epoch=self._host.epoch_of(self.partition),
            alarm=changes.alarm,
        )
        gave_up = Envelope(None, None, "", alarm=None)
        turn = _Turn(self, gave_up, b"", None, None)
        turn.journal = JournalEntry(
            self.address,
            self.partition,
            envelope,
            status="ok",
            kind="alarm_dropped",
            changes=changes,
        )
        self._pending += 1
        self._followed = turn
        self._host.committer.submit(PendingCommit(write, turn))

    async def _answer_duplicate(self, envelope: Envelope, key: str) -> bool:
        """Answer a request whose idempotency key was already applied; True if answered."""
        if self._idempotency is None:
            self._idempotency = IdempotencyCache(self._host.config.idempotency_window)
        cls, oid, storage = self.address.class_name, self.address.object_id, self._host.storage
        seen = await self._idempotency.lookup(
            key,
            lambda: storage.idempotency_horizon(cls, oid, time.time()),
            lambda k: storage.read_idempotent(cls, oid, k, time.time()),
        )
        if seen is None:
            return False
        metrics = self._host.metrics
        metrics.count(metrics.idempotent_replays, cls)
        if isinstance(seen, _Turn):  # the first call is still waiting for its commit
            _follow(seen, _Turn(self, envelope, seen.body, seen.headers, None))
            same_encoding = seen.envelope.msgpack == envelope.msgpack
            self._journal(
                JournalEntry(
                    self.address,
                    self.partition,
                    envelope,
                    status="duplicate",
                    body=seen.body if same_encoding else None,
                )
            )
            return True
        body, headers = _replay_reply(seen, envelope.msgpack)
        await self._send_reply(envelope, body, headers)
        self._journal(
            JournalEntry(self.address, self.partition, envelope, status="duplicate", body=body)
        )
        return True

    async def _turn_durable(self, turn: _Turn, error: BaseException | None) -> None:
        """Commit outcome of ``turn`` (called by the committer, in order)."""
        self._pending -= 1
        if self._followed is turn:
            self._followed = None
        if error is None:
            await self._release(turn)
            return
        if turn.generation == self.generation:
            self._reset(error)
        failure = (
            _reset_error()
            if isinstance(error, CommitAbandonedError)
            else UnavailableError(
                f"the write was not made durable ({error}); nothing was applied, retry the call",
                type="fenced" if isinstance(error, FencedError) else "storage_failure",
            )
        )
        key = turn.envelope.idempotency_key
        if key is not None and self._idempotency is not None:
            self._idempotency.forget(key)
        pending: list[_Turn] = [turn]
        while pending:
            current = pending.pop(0)
            await self._send_error(current.envelope, failure)
            if current.journal is not None:
                self._record(current.journal.aborted(failure))
            if current.envelope.alarm is not None:
                self._host.alarm_done(self.address, current.envelope.alarm, error)  # retried
            pending.extend(current.followers or ())

    def _reset(self, error: BaseException) -> None:
        """Forget the in-memory object after a failed commit; it reloads from storage."""
        _log.error(
            "commit failed; object reset",
            class_name=self.address.class_name,
            object_id=self.address.object_id,
            error=str(error),
        )
        self.generation += 1
        self.instance = None
        self.context = self._new_context()
        self._followed = None
        self._idempotency = None

    async def _release(self, turn: _Turn) -> None:
        """Send a durable turn's reply and events, then those of the turns that followed it."""
        host = self._host
        pending: list[_Turn] = [turn]
        while pending:
            current = pending.pop(0)
            envelope = current.envelope
            key = envelope.idempotency_key
            if key is not None and self._idempotency is not None:
                self._idempotency.update(
                    key, _stored_reply(current.body, envelope.msgpack), current
                )
            await self._send_reply(envelope, current.body, current.headers)
            if current.journal is not None:
                self._record(current.journal)
            if current.events:
                await host.publish_events(self.address.class_name, current.events)
            if envelope.alarm is not None:
                host.alarm_done(self.address, envelope.alarm, None)
            pending.extend(current.followers or ())

    def _record(self, entry: JournalEntry) -> None:
        """Stamp a finished turn's record with this activation's token and write count (in
        release order, so replay can find records the journal lost) and hand it over."""
        if not self._journal_token:
            self._journal_token = os.urandom(4).hex()
        if entry.advances_state:
            self._journal_writes += 1
        entry.activation = self._journal_token
        entry.write_count = self._journal_writes
        self._host.journal(entry)

    def _journal(self, entry: JournalEntry) -> None:
        """Record a turn that commits nothing, in order behind the object's pending writes."""
        if self._followed is None:
            self._record(entry)
            return
        follower = _Turn(self, Envelope(None, None, ""), b"", None, None)  # journal only
        follower.journal = entry
        _follow(self._followed, follower)

    async def _send_reply(
        self, envelope: Envelope, body: bytes, headers: dict[str, str] | None
    ) -> None:
        host = self._host
        spec = envelope.spec
        if spec is not None:
            metrics, class_name = host.metrics, self.address.class_name
            metrics.requests.inc((class_name, spec.name, "ok"))
            metrics.request_seconds.observe(
                (class_name, spec.name), time.perf_counter() - envelope.received
            )
        if envelope.reply:
            await host.send(envelope.reply, body, headers)

    async def _send_error(self, envelope: Envelope, error: ActorError) -> None:
        host = self._host
        if envelope.spec is not None:
            metrics = host.metrics
            metrics.requests.inc((self.address.class_name, envelope.method, error.type))
        if envelope.reply:
            body, headers = encode_error(error, envelope.msgpack)
            await host.send(envelope.reply, body, headers)


class DeadlineWatchdog:
    """Enforces ``handler_timeout`` on every running handler of a worker with one timer.

    A handler past its deadline has its pump cancelled, which the turn turns into a 504, as
    ``asyncio.timeout`` would. Every handler gets the same timeout, so a timer armed when the
    first handler starts fires no later than any later handler's deadline; when it fires it
    cancels the handlers past their deadline and re-arms for the earliest deadline left. Starting
    and ending a handler cost a set insert and removal instead of a timer each.
    """

    # Configuration
    timeout: float
    """Seconds a handler may run (``WorkerConfig.handler_timeout``)."""
    # State
    _running: set[Activation]
    """Activations whose handler is running (and not yet cancelled)."""
    _timer: asyncio.TimerHandle | None

    def __init__(self, timeout: float) -> None:
        """Create an idle watchdog for handlers that may run ``timeout`` seconds."""
        self.timeout = timeout
        self._running = set()
        self._timer = None

    def start(self, activation: Activation) -> None:
        """``activation``'s handler starts now (call from its pump)."""
        activation._deadline = time.monotonic() + self.timeout
        self._running.add(activation)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def end(self, activation: Activation) -> bool:
        """``activation``'s handler ended; True if it was cancelled for its deadline.

        That cancellation is taken back (``Task.uncancel``), as ``asyncio.timeout`` does, unless
        someone else also cancelled the pump.
        """
        self._running.discard(activation)
        activation._deadline = 0.0
        if not activation._expired:
            return False
        activation._expired = False
        task = asyncio.current_task()
        return task is not None and task.uncancel() <= 0

    def close(self) -> None:
        """Stop the timer (at shutdown); handlers still running are no longer watched."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._running.clear()

    def _check(self) -> None:
        self._timer = None
        now = time.monotonic()
        earliest = 0.0
        for activation in list(self._running):
            deadline = activation._deadline
            if deadline > now:
                earliest = deadline if not earliest else min(earliest, deadline)
                continue
            self._running.discard(activation)
            if activation._pump is not None:
                activation._expired = True
                activation._pump.cancel()
        if earliest:
            self._timer = asyncio.get_running_loop().call_later(earliest - now, self._check)


def _follow(leader: _Turn, follower: _Turn) -> None:
    if leader.followers is None:
        leader.followers = [follower]
    else:
        leader.followers.append(follower)


def _reset_error() -> UnavailableError:
    return UnavailableError(
        "an earlier write of this object failed and the object was reset; this call was not "
        "applied, retry it",
        type="object_reset",
    )


# A stored reply remembers whether its body is MessagePack (first byte 1) or JSON (0).
def _stored_reply(body: bytes, msgpack: bool) -> bytes:
    return (b"\x01" if msgpack else b"\x00") + body


_JSON_DECODER = msgspec.json.Decoder()
_MSGPACK_DECODER = msgspec.msgpack.Decoder()


def _replay_reply(stored: bytes, msgpack: bool) -> tuple[bytes, dict[str, str] | None]:
    """Re-encode a stored reply in the encoding the retried request asked for."""
    stored_msgpack, body = stored[:1] == b"\x01", stored[1:]
    if stored_msgpack != msgpack:
        value = _MSGPACK_DECODER.decode(body) if stored_msgpack else _JSON_DECODER.decode(body)
        body = encode_result(value, msgpack)
    return body, (MSGPACK_HEADERS if msgpack else None)
