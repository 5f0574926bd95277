"""The turn engine: run one handler (or the alarm hook) of one object, and say what came of it.

This is the one place that runs user code and turns its outcome into what a caller sees. The
worker's activations, ``ndo replay --execute`` and the tools that run objects outside a worker
all go through ``TurnRunner``, so they agree on every rule of a turn:

* a new instance is built (``on_start`` runs) before the first turn, and after a failed one;
* the handler runs under the handler deadline (``DeadlineWatchdog``), and so does the check of
  the object's storage quota that follows it (``check_quota``: a turn that grows the object
  past ``max_object_bytes`` fails with 413 ``object_too_large``);
* the return value is encoded as the reply (JSON, or MessagePack when the request was), and a
  reply over ``max_reply_bytes`` is a 413; a reply that will be stored with the turn's writes
  (its call has an Idempotency-Key) counts toward the turn's write size (``max_turn_bytes``);
* a handler that raised, ran past its deadline or returned something unencodable discards its
  writes and events, and its exception becomes exactly one ``ActorError`` (``turn_error``);
* a turn that succeeded leaves its write-set (``TurnWrites``) and its events in the outcome;
* ``on_stop`` (``TurnRunner.stop``, as an object leaves memory) is a turn of its own under the
  same rules, with the shared message ``STOP_ENVELOPE``; the instance is dropped after it.

What happens next (commit, reply, events, journal, idempotency) is the caller's business: the
activation's commit pipeline, or replay's scratch store. The engine never does I/O of its own
beyond the reads the handler makes through ``self.storage``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ndo.actors import (
    ActorError,
    ActorId,
    AlarmInfo,
    ConflictError,
    DeadlineExceededError,
    Event,
    HandlerError,
    NotFoundError,
    PayloadTooLargeError,
)
from ndo.actors.runtime import (
    ALARM_UNCHANGED,
    ActorClassInfo,
    ActorContext,
    TurnWrites,
    check_quota,
)
from ndo.service._codec import encode_result
from ndo.service._envelope import Envelope
from ndo.storage import ALARM_UNCHANGED as STORED_ALARM_UNCHANGED
from ndo.storage import ObjectWrite

if TYPE_CHECKING:
    from ndo.actors import Actor

__all__ = [
    "STOP_ENVELOPE",
    "DeadlineWatchdog",
    "TurnOutcome",
    "TurnRunner",
    "object_write",
    "turn_error",
]


class _StopMessage(Envelope):
    """The message that runs ``on_stop``: no method, no alarm, nobody waiting for a reply."""

    __slots__ = ()

    @property
    def method(self) -> str:
        """``on_stop`` (for logs, errors and the journal)."""
        return "on_stop"


STOP_ENVELOPE: Final[Envelope] = _StopMessage(None, None, "")
"""The message of every ``on_stop`` turn (``TurnRunner.stop``): one shared instance, which a
host's mailbox may hold to run the hook in order with the object's other messages."""


class TurnOutcome:
    """What one turn produced: a reply body, or the error the caller gets instead."""

    __slots__ = ("body", "cause", "changes", "duration", "error", "events", "fresh", "started")

    body: bytes
    """The encoded reply (empty when the turn failed)."""
    error: ActorError | None
    """Why the turn failed, as the caller sees it; ``None`` when it succeeded."""
    cause: BaseException | None
    """The exception behind ``error`` (for logs)."""
    changes: TurnWrites | None
    """The turn's write-set when it succeeded (possibly empty); ``None`` when it failed."""
    events: list[Event] | None
    """Events the turn emitted (only when it succeeded)."""
    fresh: bool
    """A new instance was built for this turn (``on_start`` ran first)."""
    started: float
    """``time.time()`` when the turn started."""
    duration: float
    """Seconds the turn took (instance start, handler and reply encoding)."""

    def __init__(
        self,
        fresh: bool,
        started: float,
        duration: float,
        body: bytes = b"",
        changes: TurnWrites | None = None,
        events: list[Event] | None = None,
        error: ActorError | None = None,
        cause: BaseException | None = None,
    ) -> None:
        """Describe a finished turn (use ``TurnRunner.run``; positional for speed: one is built
        per turn)."""
        self.body = body
        self.error = error
        self.cause = cause
        self.changes = changes
        self.events = events
        self.fresh = fresh
        self.started = started
        self.duration = duration


def turn_error(exc: BaseException, *, where: str, deadline: float | None = None) -> ActorError:
    """The error a caller gets for a turn that raised ``exc``.

    Args:
        exc: what the handler (or ``on_start``, or encoding its reply) raised.
        where: ``Class.method`` of the turn, for the message.
        deadline: the handler deadline in seconds when ``exc`` is the deadline's own timeout.
    """
    if isinstance(exc, ActorError):
        return exc  # raised on purpose: the caller gets exactly that code
    if deadline is not None and isinstance(exc, TimeoutError):
        return DeadlineExceededError(
            f"{where} ran past its {deadline}s deadline; its writes were discarded"
        )
    detail = str(exc)
    name = type(exc).__name__
    return HandlerError(f"{name}: {detail}" if detail else f"{name} in {where}")


class TurnRunner:
    """Runs the turns of one object, one at a time (its caller serialises them).

    It holds the object's context (identity, storage view with its cache) and its instance. A
    host of objects subclasses it and says how a context is built (``new_context``): the
    worker's ``Activation`` is one (it adds the mailbox and the commit pipeline), replay's
    scratch object another. A subclass rather than a runner object per activation: nothing more
    to allocate per object in memory, and no reference cycle between an activation and its runner
    (so an evicted object is freed at once, not by the cyclic garbage collector).
    """

    __slots__ = (
        "_deadline",
        "_deadlines",
        "_expired",
        "_max_reply_bytes",
        "_task",
        "context",
        "info",
        "instance",
    )

    info: ActorClassInfo
    """The object's class."""
    context: ActorContext
    """The object's context: identity, storage view (and its cache), event outbox."""
    instance: Actor | None
    """The live instance; ``None`` until the next turn builds one."""
    _deadlines: DeadlineWatchdog
    _max_reply_bytes: int
    # Kept by the DeadlineWatchdog while a handler runs
    _deadline: float
    """``time.monotonic()`` by which the running handler must finish; 0.0 when none runs."""
    _task: asyncio.Task[Any] | None
    """The task running the handler (cancelled when the deadline passes)."""
    _expired: bool
    """The watchdog cancelled the handler for its deadline."""

    def __init__(
        self, info: ActorClassInfo, deadlines: DeadlineWatchdog, *, max_reply_bytes: int
    ) -> None:
        """Set up the runner part of one object (``new_context`` is called here already).

        Args:
            info: the object's class.
            deadlines: the watchdog that enforces the handler deadline.
            max_reply_bytes: largest encoded reply; a larger one fails the turn with 413.
        """
        self.info = info
        self._deadlines = deadlines
        self._max_reply_bytes = max_reply_bytes
        self.context = self.new_context()
        self.instance = None
        self._deadline = 0.0
        self._task = None
        self._expired = False

    def new_context(self) -> ActorContext:
        """A fresh context (empty cache) for the object: defined by the subclass; called at
        creation and by ``reload``."""
        raise NotImplementedError

    def drop_instance(self) -> None:
        """Build a new instance before the next turn (the cached state is kept)."""
        self.instance = None

    def reload(self) -> None:
        """Forget the instance and everything cached: the next turn reloads from storage."""
        self.instance = None
        self.context = self.new_context()

    async def run(self, envelope: Envelope, task: asyncio.Task[Any] | None = None) -> TurnOutcome:
        """Run one turn: the method call or alarm delivery in ``envelope``.

        Never raises for anything the handler does (see the module doc); only a cancellation of
        the calling task that is not the deadline's propagates.

        Args:
            envelope: the message.
            task: the task this runs in (the one the deadline cancels), when the caller has it
                at hand; else it is looked up.
        """
        context = self.context  # a reload() while the handler runs must not mix two contexts
        storage = context.storage
        alarm = envelope.alarm
        fresh = self.instance is None
        started, clock = time.time(), time.perf_counter()
        deadlines = self._deadlines
        expired = False
        try:
            instance = self.instance or await self._start_instance(context)
            if alarm is not None:
                storage.alarm_fired(alarm.due)
            context.begin_turn(envelope, envelope.caller)
            context.deadline = deadlines.start(
                self, task or asyncio.current_task(), envelope.deadline
            )
            try:
                spec = envelope.spec
                if spec is not None:
                    assert envelope.args is not None
                    result = await spec.call(instance, envelope.args)
                elif alarm is not None:
                    hook = getattr(instance, "alarm", None)
                    if hook is None:
                        raise NotFoundError(
                            f"{self.info.name} has no alarm() handler", type="no_alarm"
                        )
                    result = await hook(AlarmInfo(alarm.due, alarm.attempt))
                else:  # STOP_ENVELOPE (see stop)
                    await instance.on_stop()
                    result = None
                if storage.quota_due():
                    await check_quota(storage)
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
            context.turn = None
            body = encode_result(result, envelope.msgpack)
            if len(body) > self._max_reply_bytes:
                raise PayloadTooLargeError(
                    f"reply of {len(body)} bytes is over the {self._max_reply_bytes}-byte limit",
                    type="reply_too_large",
                )
            if envelope.idempotency_key is not None and storage.changed():
                storage.count_stored_reply(len(body))
        except Exception as exc:
            storage.abort_turn()
            context.take_events()
            context.turn = None
            self.instance = None
            error = turn_error(
                exc,
                where=f"{self.info.name}.{envelope.method}",
                deadline=deadlines.timeout if expired else None,
            )
            duration = time.perf_counter() - clock
            return TurnOutcome(fresh, started, duration, b"", None, None, error, exc)
        duration = time.perf_counter() - clock
        return TurnOutcome(
            fresh, started, duration, body, storage.end_turn(), context.take_events()
        )

    async def stop(
        self, task: asyncio.Task[Any] | None = None, *, start: bool = False
    ) -> TurnOutcome | None:
        """Run the live instance's ``on_stop`` as a turn, then drop the instance (the object
        leaves memory, or its next message builds a new one with ``on_start``).

        The rules of ``run`` hold: the handler deadline, the quota check, one ``ActorError`` for
        a failure (its writes and events discarded). On success the outcome holds the write-set
        and events, for the host to commit like a turn's; its ``body`` means nothing.

        Args:
            task: as for ``run``.
            start: build an instance first (``on_start``) when none is live (replay re-runs a
                recorded ``on_stop`` on its own).

        Returns:
            The outcome; ``None`` when nothing ran: the class has no ``on_stop``, or no instance
            is live (and ``start`` is False).
        """
        if not self.info.has_on_stop or (self.instance is None and not start):
            return None
        try:
            return await self.run(STOP_ENVELOPE, task)
        finally:
            self.instance = None

    def drop_alarm(self) -> TurnWrites:
        """The write-set that deletes the object's alarm, with no user code run (an alarm the
        runtime gave up on), ordered after every earlier turn of the object."""
        storage = self.context.storage
        storage.alarm_fired(0.0)
        return storage.end_turn()

    async def replace_state(
        self, entries: Mapping[str, bytes], alarm: float | None, *, only_if_empty: bool
    ) -> tuple[TurnWrites, bool]:
        """The write-set that makes the object hold exactly ``entries`` (encoded values) and
        ``alarm``, with no user code run (``ndo inspect`` import; empty ``entries`` and no alarm:
        delete), ordered after every earlier turn. The instance is dropped without ``on_stop``:
        the next turn builds one (``on_start``) on the new state.

        Returns:
            The write-set, and whether the object held a key or an alarm before.

        Raises:
            ConflictError: ``object_exists``: ``only_if_empty`` and the object holds something
                (nothing is changed).
        """
        storage = self.context.storage
        existed = bool(await storage.list(limit=1)) or await storage.get_alarm() is not None
        if existed and only_if_empty:
            raise ConflictError(
                f"{self.info.name}/{self.context.id.object_id} already holds state; nothing was "
                "changed (replace it with --replace)",
                type="object_exists",
            )
        self.instance = None
        return storage.replace_all(entries, alarm), existed

    async def _start_instance(self, context: ActorContext) -> Actor:
        instance = self.info.cls(context)
        try:
            await instance.on_start()
        finally:
            context.storage.abort_turn()  # on_start may read; its writes are not a turn
            context.take_events()
        if context is self.context:
            self.instance = instance
        return instance


def object_write(address: ActorId, partition: int, epoch: int, changes: TurnWrites) -> ObjectWrite:
    """The storage record of a turn's write-set, fenced by ``epoch``."""
    alarm = changes.alarm
    return ObjectWrite(
        class_name=address.class_name,
        object_id=address.object_id,
        partition=partition,
        epoch=epoch,
        writes=changes.writes,
        cleared=changes.cleared,
        alarm=STORED_ALARM_UNCHANGED if alarm == ALARM_UNCHANGED else alarm,
    )


class DeadlineWatchdog:
    """Enforces the handler deadline on every running handler of a process with one timer.

    A handler past its deadline has its task cancelled, which the turn turns into a 504, as
    ``asyncio.timeout`` would. Every handler gets the same timeout, so a timer armed when the
    first handler starts fires no later than any later handler's deadline; when it fires it
    cancels the handlers past their deadline and re-arms for the earliest deadline left. Starting
    and ending a handler cost a set insert and removal instead of a timer each.
    """

    # Configuration
    timeout: float
    """Seconds a handler may run (``WorkerConfig.handler_timeout``)."""
    # State
    _running: set[TurnRunner]
    """Runners whose handler is running (and not yet cancelled)."""
    _timer: asyncio.TimerHandle | None

    def __init__(self, timeout: float) -> None:
        """Create an idle watchdog for handlers that may run ``timeout`` seconds."""
        self.timeout = timeout
        self._running = set()
        self._timer = None

    def start(
        self, runner: TurnRunner, task: asyncio.Task[Any] | None, deadline: float = 0.0
    ) -> float:
        """``runner``'s handler starts now, in ``task`` (cancelled if it runs too long); return
        the ``time.monotonic()`` by which it must end.

        Args:
            runner: the object whose handler starts.
            task: the task to cancel at the deadline.
            deadline: an earlier ``time.monotonic()`` deadline than the timeout gives (the
                caller's, for a call with ``Ndo-Timeout-Ms``); 0.0: none.
        """
        now = time.monotonic()
        end = now + self.timeout
        sooner = 0.0 < deadline < end
        if sooner:
            end = deadline
        runner._deadline = end
        runner._task = task
        self._running.add(runner)
        timer = self._timer
        if timer is None:
            self._timer = asyncio.get_running_loop().call_later(end - now, self._check)
        elif sooner:  # the armed check may come too late for this handler: move it earlier
            loop = asyncio.get_running_loop()
            if end - now < timer.when() - loop.time():
                timer.cancel()
                self._timer = loop.call_later(max(0.0, end - now), self._check)
        return end

    def end(self, runner: TurnRunner) -> bool:
        """``runner``'s handler ended; True if it was cancelled for its deadline.

        That cancellation is taken back (``Task.uncancel``), as ``asyncio.timeout`` does, unless
        someone else also cancelled the task.
        """
        self._running.discard(runner)
        runner._deadline = 0.0
        runner._task = None
        if not runner._expired:
            return False
        runner._expired = False
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
        for runner in list(self._running):
            deadline = runner._deadline
            if deadline > now:
                earliest = deadline if not earliest else min(earliest, deadline)
                continue
            self._running.discard(runner)
            if runner._task is not None:
                runner._expired = True
                runner._task.cancel()
        if earliest:
            self._timer = asyncio.get_running_loop().call_later(earliest - now, self._check)
