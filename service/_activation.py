"""One active object: its mailbox, its turn pump and its place in the commit pipeline.

Messages for one object queue in its mailbox; a pump task (alive only while the mailbox has
work) runs them one at a time through the turn engine (``service._turn``). A turn that wrote
something hands its write-set and its reply to the group committer and the pump moves straight
on to the next message: later turns read the earlier writes from the object's cache. The reply
(and events) leave when the commit is durable. A turn that wrote nothing answers at once, or, if
earlier writes of the object are still in flight, right after them (output gate).

Per-turn costs are kept off the hot path: the pump binds the object's log context once (it runs
in its own copy of the context), one ``DeadlineWatchdog`` per worker enforces the handler
deadline instead of a timer per turn, and a read-only turn with nothing in flight replies straight
from the pump without building a commit waiter.

Bounded: an object holds at most ``max_mailbox`` queued messages (more are refused at ingress with
503 "overloaded") and at most ``max_mailbox`` turns waiting for their commit; past that, or while
the group committer's queue is full, the pump waits for commits before it runs another turn, so
its mailbox fills and callers are told to back off instead of memory growing without bound.

Failure handling: a handler that raises discards its own write-set and the instance is rebuilt
before the next turn (the engine does both). A commit that fails resets the object (new
generation): the turns queued behind it in the committer are abandoned with an error, and the
next message reloads the object from durable storage.

``on_stop``: when an object with the hook leaves memory in an orderly way, the catalog (or the
worker) queues ``STOP_ENVELOPE`` in its mailbox (``queue_stop``), so the hook runs after what is
already queued, through the same pump and commit pipeline as a turn (output gate, fencing epoch,
commit failures). An evicted object stays in the catalog until that turn is over (durable or
failed), then leaves unless messages arrived meanwhile; those are served by a new instance.

Activations talk to ``ActivationServices`` — the few collaborators every object of a worker
shares — never to the worker itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec
import structlog
from structlog.contextvars import bind_contextvars

from ndo.actors import (
    ActorError,
    ActorId,
    ActorStorage,
    DeadlineExceededError,
    Event,
    HandlerError,
    UnavailableError,
)
from ndo.actors.runtime import ActorClassInfo, ActorContext, CallSender, StorageLimits
from ndo.service._alarms import AlarmScheduler
from ndo.service._codec import (
    MSGPACK_HEADERS,
    encode_error,
    replay_reply,
    stored_fingerprint,
    stored_reply,
)
from ndo.service._envelope import (
    AlarmDelivery,
    Envelope,
    InspectEnvelope,
    caller_gone,
    partition_moving,
)
from ndo.service._idempotency import IdempotencyCache, key_reused
from ndo.service._journal import JOURNAL_OFF, Journal, JournalEntry
from ndo.service._metrics import WorkerMetrics
from ndo.service._outbox import Outbox
from ndo.service._ownership import NOT_SERVING, Ownership
from ndo.service._tasks import TaskSet
from ndo.service._turn import (
    STOP_ENVELOPE,
    DeadlineWatchdog,
    TurnOutcome,
    TurnRunner,
    object_write,
)
from ndo.service.inspection import WriteReply
from ndo.service.journal import TurnKind, TurnStatus
from ndo.storage import (
    CommitAbandonedError,
    FencedError,
    GroupCommitter,
    IdempotentReply,
    ObjectWrite,
    PendingCommit,
    Storage,
    StorageBusyError,
    StorageError,
    WriteRejectedError,
)

__all__ = ["Activation", "ActivationServices", "ActivationState"]

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


@dataclass(slots=True, kw_only=True)
class ActivationServices:
    """What every activation of a worker shares: settings and collaborators, not the worker.

    ``journal`` and ``ownership`` start as the "off" stand-ins and are set when the worker
    starts its journal and begins serving.
    """

    # Settings
    prefix: str
    """Subject prefix (objects build their event subjects with it)."""
    max_mailbox: int
    """Messages that may wait for one object."""
    max_reply_bytes: int
    """Largest encoded reply."""
    idempotency_window: float
    """Seconds a committed idempotency key is remembered."""
    limits: StorageLimits
    """Size limits of every storage call."""
    # Collaborators
    metrics: WorkerMetrics
    storage: Storage
    """Durable reads (cache misses, idempotency records)."""
    committer: GroupCommitter
    deadlines: DeadlineWatchdog
    outbox: Outbox
    """Replies and events."""
    alarms: AlarmScheduler
    """Told how each alarm delivery ended."""
    tasks: TaskSet
    """Owner of the pump tasks."""
    worker: str = ""
    """The worker's name (in the replies of ``ndo inspect``'s writes)."""
    calls: CallSender | None = None
    """Sends the calls objects make to other objects (``None``: they cannot)."""
    stopped: Callable[[Activation], None] | None = None
    """Told when the ``on_stop`` of an object queued to leave (``Activation.leaving``) is over:
    the catalog then removes it, unless messages arrived meanwhile."""
    journal: Journal = JOURNAL_OFF
    ownership: Ownership = NOT_SERVING
    """Fencing epochs of the partitions."""


class ActivationState(Enum):
    """Lifecycle of an activation."""

    VALID = "valid"
    """Accepting messages."""
    DEACTIVATED = "deactivated"
    """Evicted or reset for good; the catalog makes a new activation for new messages."""


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


class _StopTurn(_Turn):
    """An ``on_stop`` turn waiting for its commit; when it is over, the object may leave."""

    __slots__ = ()

    async def commit_done(self, error: BaseException | None) -> None:
        activation = self.activation
        await activation._turn_durable(self, error)
        activation._stop_ended(None if error is None else _commit_failure(error))


class Activation(TurnRunner):
    """The in-memory life of one object on this worker: a ``TurnRunner`` (its context, instance
    and the turn engine) with a mailbox, a pump and a place in the commit pipeline."""

    __slots__ = (
        "_durable",
        "_followed",
        "_idempotency",
        "_journal_token",
        "_journal_writes",
        "_mailbox",
        "_pending",
        "_pump",
        "_room",
        "_services",
        "_stop_queued",
        "address",
        "generation",
        "last_used",
        "leaving",
        "partition",
        "state",
    )

    address: ActorId
    partition: int
    generation: int
    """Bumped when the object is reset; turns of an older generation are never committed."""
    state: ActivationState
    last_used: float
    """``time.monotonic()`` of the last message, for idle eviction."""
    leaving: str
    """Why the object was evicted while its ``on_stop`` runs before it leaves ("" otherwise)."""
    _services: ActivationServices
    _mailbox: deque[Envelope] | None
    _pump: asyncio.Task[None] | None
    """The pump task while the mailbox has work, else None (also while an eager pump task runs
    inside ``enqueue`` before it first waits)."""
    _pending: int
    """Turns handed to the committer and not yet durable."""
    _room: asyncio.Future[None] | None
    """Set while the pump waits for ``_pending`` to drop below the bound."""
    _durable: asyncio.Future[None] | None
    """Set while a turn waits for every earlier write of the object to be durable."""
    _followed: _Turn | None
    """The newest turn still waiting for its commit; read-only turns answer after it."""
    _idempotency: IdempotencyCache[_Turn] | None
    _journal_token: str
    """This activation's token in journal records ("" until the first record)."""
    _journal_writes: int
    """State-changing journal records released so far (their ``write_count``)."""
    _stop_queued: bool
    """``STOP_ENVELOPE`` waits in the mailbox."""

    def __init__(
        self, services: ActivationServices, info: ActorClassInfo, object_id: str, partition: int
    ) -> None:
        """Create an activation; the instance is built by the pump before the first turn."""
        self._services = services
        self.address = ActorId(info.name, object_id)
        self.partition = partition
        super().__init__(info, services.deadlines, max_reply_bytes=services.max_reply_bytes)
        self.generation = 0
        self.state = ActivationState.VALID
        self.last_used = time.monotonic()
        self.leaving = ""
        self._mailbox = None
        self._pump = None
        self._pending = 0
        self._room = None
        self._durable = None
        self._followed = None
        self._idempotency = None
        self._journal_token = ""
        self._journal_writes = 0
        self._stop_queued = False

    def new_context(self) -> ActorContext:
        """A fresh context reading through the worker's storage (its cache starts empty)."""
        services = self._services
        storage = ActorStorage(
            services.storage, self.address.class_name, self.address.object_id, services.limits
        )
        return ActorContext(
            self.address, self.partition, services.prefix, storage, sender=services.calls
        )

    # Mailbox

    @property
    def idle(self) -> bool:
        """True when nothing is queued, running or waiting for a commit (safe to evict)."""
        return self._pump is None and self._pending == 0 and not self._mailbox

    @property
    def spent(self) -> bool:
        """No instance, nothing queued and no write in flight: dropping the activation loses
        nothing (a pump still running has nothing left to do)."""
        return self.instance is None and not self._mailbox and self._pending == 0

    @property
    def queued(self) -> int:
        """Messages waiting in the mailbox."""
        return len(self._mailbox) if self._mailbox else 0

    def enqueue(self, envelope: Envelope) -> bool:
        """Queue a message; False when the mailbox is full (the caller answers 503)."""
        mailbox = self._mailbox
        if mailbox is None:
            mailbox = self._mailbox = deque()
        elif len(mailbox) >= self._services.max_mailbox:
            return False
        mailbox.append(envelope)
        self.last_used = time.monotonic()
        if self._pump is None:
            # On Python 3.12+ the pump's task starts eagerly: it runs the turn right here until
            # it first waits (a cached read never does: it answers without a trip through the
            # event loop), and None comes back when it already finished. Until then _pump is
            # None, and the turn's deadline is armed against asyncio.current_task(), which an
            # eager task already is.
            self._pump = self._services.tasks.start_eagerly(self._run_pump(), "ndo-pump")
        return True

    def queue_stop(self, leaving: str = "") -> bool:
        """Queue ``on_stop`` behind the messages already queued (once); it runs through the
        pump and the commit pipeline like a turn.

        Args:
            leaving: the eviction reason when the object is to leave the catalog once its
                ``on_stop`` is over (``ActivationServices.stopped``); "" when it stays.

        Returns:
            False, and nothing queued, when the class has no ``on_stop`` or the object has no
            instance and nothing queued or running that would build one.
        """
        if not self.info.has_on_stop or (
            self.instance is None and not self._mailbox and self._pump is None
        ):
            return False
        if leaving:
            self.leaving = leaving
        if self._stop_queued:
            return True
        self._stop_queued = True
        mailbox = self._mailbox
        if mailbox is None:
            mailbox = self._mailbox = deque()
        mailbox.append(STOP_ENVELOPE)  # past max_mailbox if need be: at most one is queued
        if self._pump is None:
            self._pump = self._services.tasks.start_eagerly(self._run_pump(), "ndo-pump")
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
        services = self._services
        try:
            while mailbox:
                if self._pending >= services.max_mailbox or services.committer.full:
                    await self._wait_for_room()
                envelope = mailbox.popleft()
                spec = envelope.spec
                if spec is not None:
                    name = spec.name
                elif envelope is STOP_ENVELOPE:
                    method = "on_stop"
                    _METHOD_VAR.set(method)
                    try:
                        await self._run_stop()
                    except Exception:  # a runtime bug: log it; the object may still leave
                        _log.exception("on_stop crashed in the runtime")
                        self.drop_instance()
                        self._stop_ended(HandlerError("internal error in the ndo runtime"))
                    continue
                elif isinstance(envelope, InspectEnvelope):
                    method = envelope.method
                    _METHOD_VAR.set(method)
                    try:
                        await self._run_inspect(envelope)
                    except Exception:  # a runtime bug: answer, log, keep the object serving
                        _log.exception("inspect operation crashed in the runtime")
                        self.reload()
                        await self._send_error(
                            envelope,
                            HandlerError("internal error in the ndo runtime; see its logs"),
                        )
                    continue
                else:
                    name = "alarm"
                if name != method:
                    method = name
                    _METHOD_VAR.set(name)
                try:
                    await self._run_turn(envelope)
                except Exception:  # a runtime bug: answer, log, keep the object serving
                    _log.exception("turn crashed in the runtime", method=envelope.method)
                    self.drop_instance()
                    await self._send_error(
                        envelope, HandlerError("internal error in the ndo runtime; see its logs")
                    )
        finally:
            self._pump = None
            if not mailbox:
                self._mailbox = None  # idle objects carry no deque
            self.last_used = time.monotonic()

    async def _wait_for_room(self) -> None:
        """Wait until this object has fewer than ``max_mailbox`` turns waiting for their commit
        and the group committer has room (turns keep pipelining up to that bound)."""
        services = self._services
        while self._pending >= services.max_mailbox:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        await services.committer.wait_for_room()

    async def writes_durable(self) -> None:
        """Wait until every write of this object's earlier turns is durable (the output gate of
        a call the running turn makes to another object).

        Raises:
            UnavailableError: ``object_reset``: one of them failed, so the running turn will be
                aborted too; the call must not leave.
        """
        generation = self.generation
        while self._pending:
            if self._durable is None:
                self._durable = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._durable)
        if generation != self.generation:
            raise _reset_error()

    # Turns

    async def _run_turn(self, envelope: Envelope) -> None:
        services = self._services
        if envelope.deadline and envelope.expired(time.monotonic()):
            await self._send_error(envelope, caller_gone(envelope))
            return
        key = envelope.idempotency_key
        if key is not None and await self._answer_duplicate(envelope, key):
            return
        if envelope.alarm is not None and await self._alarm_is_stale(envelope.alarm):
            services.alarms.done(self.address, envelope.alarm, None)
            return
        generation = self.generation
        outcome = await self.run(envelope, self._pump)
        if outcome.fresh:
            services.metrics.count(services.metrics.activations, self.address.class_name)
        if outcome.error is not None:
            self._turn_failed(envelope, outcome, outcome.error)
            await self._send_error(envelope, outcome.error)
            return
        changes = outcome.changes
        assert changes is not None
        events = outcome.events
        if generation != self.generation:  # reset while the handler ran
            self._journal(self._failure_entry(envelope, outcome, "aborted", _reset_error()))
            await self._send_error(envelope, _reset_error())
            return
        body = outcome.body
        headers = MSGPACK_HEADERS if envelope.msgpack else None
        unchanged = changes.is_empty()
        journal = None
        recorded = services.journal.enabled and (
            not unchanged or events or envelope.alarm is not None or services.journal.reads
        )
        if recorded or (services.journal.enabled and self._followed is not None):
            # A read behind a pending write gets an entry too, kept only if that write fails
            # and the read is aborted with it (every failed call is journaled).
            journal = JournalEntry(
                self.address,
                self.partition,
                envelope,
                status="ok",
                body=body,
                changes=None if unchanged else changes,
                started=outcome.started,
                duration=outcome.duration,
                fresh=outcome.fresh,
                only_if_aborted=not recorded,
            )
        if self._followed is None and not events and envelope.alarm is None and unchanged:
            # Fast path: a read-only turn with no earlier write of this object in flight (output
            # gate open) answers right here, as _release would, without a commit waiter (its
            # idempotency key, if any, was never remembered: nothing to update).
            await self._send_reply(envelope, body, headers)
            if journal is not None:
                self._record(journal)
            return
        turn = _Turn(self, envelope, body, headers, events)
        turn.journal = journal
        remember = key is not None and (not unchanged or events)
        if unchanged and not remember:
            if self._followed is None:
                await self._release(turn)
            else:
                _follow(self._followed, turn)
            return
        write = object_write(
            self.address, self.partition, services.ownership.epoch_of(self.partition), changes
        )
        if remember:
            assert key is not None and self._idempotency is not None
            write.idempotent_reply = IdempotentReply(
                key,
                stored_reply(body, envelope.msgpack, envelope.fingerprint),
                time.time() + services.idempotency_window,
            )
            self._idempotency.remember(key, turn)
        self._submit(write, turn)

    async def _run_stop(self) -> None:
        """Run ``STOP_ENVELOPE``: the instance's ``on_stop``, whose write-set and events go
        through the commit pipeline like a turn's (nobody waits for a reply)."""
        self._stop_queued = False
        services = self._services
        generation = self.generation
        outcome = await self.stop(self._pump)
        if outcome is None:  # no instance (a failed turn dropped it): nothing to run
            self._stop_ended(None, ran=False)
            return
        error = outcome.error
        if error is None and generation != self.generation:  # reset while on_stop ran
            error = _reset_error()
        if error is not None:
            status: TurnStatus = "error" if outcome.error is not None else "aborted"
            self._journal(self._failure_entry(STOP_ENVELOPE, outcome, status, error, "stop"))
            self._stop_ended(error, outcome.cause)
            return
        changes = outcome.changes
        assert changes is not None
        events = outcome.events
        unchanged = changes.is_empty()
        journal = services.journal
        entry = None
        recorded = journal.enabled and (not unchanged or events or journal.reads)
        if recorded or (journal.enabled and self._followed is not None):
            entry = JournalEntry(
                self.address,
                self.partition,
                STOP_ENVELOPE,
                status="ok",
                kind="stop",
                changes=None if unchanged else changes,
                started=outcome.started,
                duration=outcome.duration,
                fresh=outcome.fresh,
                only_if_aborted=not recorded,
            )
        if unchanged and not events and self._followed is None:
            if entry is not None:
                self._record(entry)
            self._stop_ended(None)
            return
        epoch = services.ownership.epoch_of(self.partition)
        if epoch < 0 and not unchanged:  # the partition is not held here: storage would refuse
            self.reload()  # the cache holds the refused writes
            fenced = _commit_failure(FencedError({self.partition}))
            if entry is not None:
                self._journal(entry.aborted(fenced))
            self._stop_ended(fenced)
            return
        turn = _StopTurn(self, STOP_ENVELOPE, b"", None, events)
        turn.journal = entry
        write = None if unchanged else object_write(self.address, self.partition, epoch, changes)
        self._submit(write, turn)

    async def _run_inspect(self, envelope: InspectEnvelope) -> None:
        """Run an operator's import or delete (``ndo inspect``): the object's state replaced by
        one write-set, committed and answered in order with its turns, idempotent under the
        request's key, journaled (kind ``inspect``); no user code runs, and the next turn
        builds a new instance on the new state."""
        services = self._services
        key = envelope.idempotency_key
        if key is not None and await self._answer_duplicate(envelope, key):
            return
        epoch = services.ownership.epoch_of(self.partition)
        if epoch < 0:
            await self._send_error(envelope, partition_moving(self.partition, self.address))
            return
        try:
            changes, existed = await self.replace_state(
                envelope.entries, envelope.new_alarm, only_if_empty=not envelope.replace
            )
        except ActorError as error:
            await self._send_error(envelope, error)
            return
        except StorageError as exc:
            await self._send_error(
                envelope,
                UnavailableError(
                    f"could not read the object ({exc}); nothing was changed, retry",
                    type="storage_failure",
                ),
            )
            return
        body = msgspec.json.encode(
            WriteReply(
                partition=self.partition,
                worker=services.worker,
                existed=existed,
                keys=len(envelope.entries),
            )
        )
        turn = _Turn(self, envelope, body, None, None)
        if services.journal.enabled:
            turn.journal = JournalEntry(
                self.address,
                self.partition,
                envelope,
                status="ok",
                kind="inspect",
                body=body,
                changes=changes,
            )
        write = object_write(self.address, self.partition, epoch, changes)
        if key is not None:
            assert self._idempotency is not None  # made by _answer_duplicate
            write.idempotent_reply = IdempotentReply(
                key,
                stored_reply(body, False, envelope.fingerprint),
                time.time() + services.idempotency_window,
            )
            self._idempotency.remember(key, turn)
        self._submit(write, turn)

    def _stop_ended(
        self, error: ActorError | None, cause: BaseException | None = None, *, ran: bool = True
    ) -> None:
        """An ``on_stop`` turn is over (``ran``: it ran, and ``error`` says how it ended): count
        and log it, and let the catalog remove an evicted object."""
        services = self._services
        if ran:
            outcome = "ok" if error is None else error.type
            services.metrics.count(services.metrics.on_stop, self.address.class_name, outcome)
        if error is not None:
            _log.warning(
                "on_stop failed; its writes and events were discarded",
                class_name=self.address.class_name,
                object_id=self.address.object_id,
                error_type=error.type,
                error=error.message,
                exc_type=None if cause is None else type(cause).__name__,
            )
        if self.leaving:
            if services.stopped is not None:
                services.stopped(self)
            self.leaving = ""

    def _failure_entry(
        self,
        envelope: Envelope,
        outcome: TurnOutcome,
        status: TurnStatus,
        error: ActorError,
        kind: TurnKind | None = None,
    ) -> JournalEntry:
        """The journal entry of a turn that ended in ``error`` (no reply, no write-set)."""
        return JournalEntry(
            self.address,
            self.partition,
            envelope,
            status=status,
            kind=kind,
            error=error,
            started=outcome.started,
            duration=outcome.duration,
            fresh=outcome.fresh,
        )

    def _submit(self, write: ObjectWrite | None, turn: _Turn) -> None:
        """Hand a write-set to the committer; ``turn`` answers when it is durable (``None``:
        nothing to write, only the object's earlier writes to wait for)."""
        self._pending += 1
        self._followed = turn
        self._services.committer.submit(PendingCommit(write, turn))

    def _turn_failed(self, envelope: Envelope, outcome: TurnOutcome, error: ActorError) -> None:
        """Record and log a failed turn (the engine already discarded its writes and events
        and dropped the instance); give up on an alarm that failed too often."""
        self._journal(self._failure_entry(envelope, outcome, "error", error))
        log = (
            _log.warning if isinstance(error, (HandlerError, DeadlineExceededError)) else _log.info
        )
        log(
            "turn failed",
            error_type=error.type,
            error=error.message,
            exc_type=type(outcome.cause).__name__,
        )
        if envelope.alarm is not None and self._services.alarms.done(
            self.address, envelope.alarm, outcome.cause
        ):
            self._delete_alarm(envelope)

    async def _alarm_is_stale(self, delivery: AlarmDelivery) -> bool:
        """True when the object no longer has the alarm being delivered (deleted or moved)."""
        current = await self.context.storage.get_alarm()
        return current is None or abs(current - delivery.due) > 1e-6

    def _delete_alarm(self, envelope: Envelope) -> None:
        """Delete an alarm that was given up on, in order with the object's other writes."""
        changes = self.drop_alarm()
        epoch = self._services.ownership.epoch_of(self.partition)
        turn = _Turn(self, Envelope(None, None, ""), b"", None, None)
        turn.journal = JournalEntry(
            self.address,
            self.partition,
            envelope,
            status="ok",
            kind="alarm_dropped",
            changes=changes,
        )
        self._submit(object_write(self.address, self.partition, epoch, changes), turn)

    async def _answer_duplicate(self, envelope: Envelope, key: str) -> bool:
        """Answer a request whose idempotency key was already applied (with the first call's
        reply, or 409 when the key was first used for another call); True if answered."""
        services = self._services
        if self._idempotency is None:
            self._idempotency = IdempotencyCache(services.idempotency_window)
        cls, oid, storage = self.address.class_name, self.address.object_id, services.storage
        try:
            seen = await self._idempotency.lookup(
                key,
                lambda: storage.idempotency_horizon(cls, oid, time.time()),
                lambda k: storage.read_idempotent(cls, oid, k, time.time()),
            )
        except StorageError as exc:
            await self._send_error(
                envelope,
                UnavailableError(
                    f"could not check the Idempotency-Key ({exc}); nothing was applied, retry "
                    "the call",
                    type="storage_failure",
                ),
            )
            return True
        if seen is None:
            return False
        first = seen.envelope.fingerprint if isinstance(seen, _Turn) else stored_fingerprint(seen)
        if first is not None and first != envelope.fingerprint:
            await self._send_error(envelope, key_reused(key, services.idempotency_window))
            return True
        metrics = services.metrics
        metrics.count(metrics.idempotent_replays, cls)
        if isinstance(seen, _Turn):  # the first call is still waiting for its commit
            body, headers = seen.body, seen.headers
            if seen.envelope.msgpack != envelope.msgpack:
                try:
                    body, headers = replay_reply(
                        stored_reply(seen.body, seen.envelope.msgpack), envelope.msgpack
                    )
                except ActorError as error:
                    await self._send_error(envelope, error)
                    return True
            _follow(seen, _Turn(self, envelope, body, headers, None))
            self._journal(
                JournalEntry(self.address, self.partition, envelope, status="duplicate", body=body)
            )
            return True
        try:
            body, headers = replay_reply(seen, envelope.msgpack)
        except ActorError as error:
            await self._send_error(envelope, error)
            return True
        await self._send_reply(envelope, body, headers)
        self._journal(
            JournalEntry(self.address, self.partition, envelope, status="duplicate", body=body)
        )
        return True

    async def _turn_durable(self, turn: _Turn, error: BaseException | None) -> None:
        """Commit outcome of ``turn`` (called by the committer, in order)."""
        self._pending -= 1
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)
        durable = self._durable
        if durable is not None and not self._pending:
            self._durable = None
            if not durable.done():
                durable.set_result(None)
        if self._followed is turn:
            self._followed = None
        if error is None:
            await self._release(turn)
            return
        if turn.generation == self.generation:
            self._reset(error, log=turn.envelope is not STOP_ENVELOPE)  # on_stop logs its own
        failure = _commit_failure(error)
        key = turn.envelope.idempotency_key
        if key is not None and self._idempotency is not None:
            self._idempotency.forget(key)
        alarms = self._services.alarms
        pending: list[_Turn] = [turn]
        while pending:
            current = pending.pop(0)
            await self._send_error(current.envelope, failure)
            if current.journal is not None:
                self._record(current.journal.aborted(failure))
            if current.envelope.alarm is not None:
                alarms.done(self.address, current.envelope.alarm, error)  # retried
            pending.extend(current.followers or ())

    def _reset(self, error: BaseException, *, log: bool = True) -> None:
        """Forget the in-memory object after a failed commit; it reloads from storage."""
        if log:
            _log.error(
                "commit failed; object reset",
                class_name=self.address.class_name,
                object_id=self.address.object_id,
                error=str(error),
            )
        self.generation += 1
        self.reload()
        self._followed = None
        self._idempotency = None

    async def _release(self, turn: _Turn) -> None:
        """Send a durable turn's reply and events, then those of the turns that followed it."""
        services = self._services
        pending: list[_Turn] = [turn]
        while pending:
            current = pending.pop(0)
            envelope = current.envelope
            key = envelope.idempotency_key
            if key is not None and self._idempotency is not None:
                stored = stored_reply(current.body, envelope.msgpack, envelope.fingerprint)
                self._idempotency.update(key, stored, current)
            await self._send_reply(envelope, current.body, current.headers)
            if current.journal is not None and not current.journal.only_if_aborted:
                self._record(current.journal)
            if current.events:
                await services.outbox.events(self.address.class_name, current.events)
            if envelope.alarm is not None:
                services.alarms.done(self.address, envelope.alarm, None)
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
        self._services.journal.record(entry)

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
        services = self._services
        spec = envelope.spec
        if spec is not None:
            metrics, class_name = services.metrics, self.address.class_name
            metrics.requests.inc((class_name, spec.name, "ok"))
            metrics.request_seconds.observe(
                (class_name, spec.name), time.perf_counter() - envelope.received
            )
        if envelope.reply:
            await services.outbox.reply(envelope.reply, body, headers)

    async def _send_error(self, envelope: Envelope, error: ActorError) -> None:
        services = self._services
        if envelope.spec is not None:
            services.metrics.requests.inc((self.address.class_name, envelope.method, error.type))
        if envelope.reply:
            body, headers = encode_error(error, envelope.msgpack)
            await services.outbox.reply(envelope.reply, body, headers)


def _follow(leader: _Turn, follower: _Turn) -> None:
    if leader.followers is None:
        leader.followers = [follower]
    else:
        leader.followers.append(follower)


def _commit_failure(error: BaseException) -> ActorError:
    """What the caller of a turn whose write-set was not made durable is told."""
    if isinstance(error, CommitAbandonedError):
        return _reset_error()
    if isinstance(error, (WriteRejectedError, ValueError)):
        return HandlerError(
            f"storage refused this object's write ({error}); nothing was applied and the object "
            "was reloaded. The same call fails the same way: check what it writes, and the "
            "worker's logs (a damaged database: PRAGMA integrity_check)",
            type="write_rejected",
        )
    if isinstance(error, StorageBusyError):
        return UnavailableError(
            f"the write was not made durable ({error}); nothing was applied, retry the call",
            type="storage_busy",
        )
    return UnavailableError(
        f"the write was not made durable ({error}); nothing was applied, retry the call",
        type="fenced" if isinstance(error, FencedError) else "storage_failure",
    )


def _reset_error() -> UnavailableError:
    return UnavailableError(
        "an earlier write of this object failed and the object was reset; this call was not "
        "applied, retry it",
        type="object_reset",
    )
