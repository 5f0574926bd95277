"""The test kit's engine (``ndo.testing``): a user's objects run in-process, on the worker's rules.

``ObjectHarness`` hosts the objects of a few classes without NATS or a worker, yet every turn
goes through the worker's own turn engine (``ndo.service.TurnRunner``) and every request
through the checks ingress makes (routing, ``request_envelope``), so a test sees exactly the
replies and errors a client of a worker would:

* a request is routed (400 ``invalid_subject``, 404 ``unknown_class`` / ``unknown_method``),
  its body and headers checked and decoded (``request_envelope``), answered from storage when
  its Idempotency-Key was already committed for the object (409 ``idempotency_key_reused`` when
  the key was used for another call), then run as one turn;
* a turn that succeeded is committed (its write-set, and the reply under its Idempotency-Key)
  before its reply is returned or its events recorded (output gate); a failed one returns its
  ``ActorError`` rebuilt from the wire form (``error_from_wire``), chained to the handler's
  exception, with nothing written and no event;
* one turn at a time per object (a lock per object), each in a task of its own as a worker's
  pump runs it, so the handler deadline cancels only that turn;
* calls between objects (``self.call(...)``) stay in the harness through its ``CallSender``, with
  the worker's headers (call chain: 409 ``call_cycle``; the caller's deadline; derived keys);
* time is a ``FakeClock`` (``Actor.now()``, ``set_alarm``'s checks, alarm due times and
  Idempotency-Key expiry), and alarms fire only when the test says so: ``fire_alarm`` (one
  object, now) or ``advance`` (every alarm falling due, in due order, with the worker's retry
  backoff on the fake clock, given up after ``alarm_max_attempts``).

Storage is in memory or a SQLite file (the same ``Storage`` classes a worker uses). The harness
claims every partition of it when it opens (a fencing epoch, as a worker does), so never point
it at the data of a running worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeAlias, TypeVar, overload

import msgspec

from ndo.actors import (
    Actor,
    ActorError,
    ActorId,
    ActorStorage,
    ActorStub,
    BadRequestError,
    Caller,
    Event,
    HandlerError,
    NotFoundError,
    UnavailableError,
)
from ndo.actors.runtime import (
    ActorClassInfo,
    ActorContext,
    MethodSpec,
    StorageLimits,
    TurnWrites,
    describe_classes,
    error_from_wire,
    outgoing_headers,
)
from ndo.ops._kit_types import AlarmRun, EmittedEvent, FakeClock, check_time
from ndo.service import (
    AlarmDelivery,
    DeadlineWatchdog,
    Envelope,
    TurnRunner,
    WorkerConfig,
    object_write,
)
from ndo.service._codec import replay_reply, stored_fingerprint, stored_reply
from ndo.service._envelope import caller_gone, request_envelope
from ndo.service._idempotency import key_reused
from ndo.storage import (
    ALARM_UNCHANGED,
    IdempotentReply,
    InMemoryStorage,
    ObjectWrite,
    SqliteStorage,
    Storage,
    StorageError,
    WriteRejectedError,
)
from ndo.subjects import (
    MSGPACK_CONTENT_TYPE,
    Header,
    InvalidSubjectError,
    parse_rpc_subject,
    partition_of,
    validate_id,
)

__all__ = ["MAX_ALARM_RUNS", "ObjectHarness", "StorageSpec"]

A = TypeVar("A", bound=Actor)
T = TypeVar("T")

StorageSpec: TypeAlias = str | os.PathLike[str] | Storage
"""Where a harness keeps state: ``"memory"`` (the default), a SQLite file's path, or a
``Storage`` (opened and closed by the harness)."""

MAX_ALARM_RUNS: Final = 10_000
"""Most alarm deliveries one ``advance`` makes (an alarm that keeps re-arming stops there)."""
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder()
_JSON_ENCODER: Final = msgspec.json.Encoder()
_JSON_DECODER: Final = msgspec.json.Decoder()
_OWNER: Final = "ndo.testing"
"""Who claims the partitions of a harness's storage (the fences table's ``owner``)."""


@dataclass(frozen=True, slots=True)
class _Retry:
    """A failed alarm delivery waiting for its next try."""

    due: float
    failed: int
    """Deliveries of this alarm that failed so far."""
    next_try: float
    """Fake-clock time of the next try."""


class _Status(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class _HarnessObject(TurnRunner):
    """One object in the harness: the worker's turn engine with a context built by the harness
    and a lock that keeps its turns one at a time."""

    __slots__ = ("_harness", "address", "lock", "partition")

    address: ActorId
    partition: int
    lock: asyncio.Lock
    _harness: ObjectHarness

    def __init__(self, harness: ObjectHarness, info: ActorClassInfo, object_id: str) -> None:
        self._harness = harness
        self.address = ActorId(info.name, object_id)
        self.partition = partition_of(info.name, object_id, harness.config.partitions)
        self.lock = asyncio.Lock()
        super().__init__(info, harness._deadlines, max_reply_bytes=harness.config.max_payload)

    def new_context(self) -> ActorContext:
        """A fresh context on the harness's storage, clock and call sender."""
        harness = self._harness
        view = ActorStorage(
            harness.storage,
            self.address.class_name,
            self.address.object_id,
            harness._limits,
            clock=harness.clock,
        )
        return ActorContext(
            self.address,
            self.partition,
            harness.config.prefix,
            view,
            clock=harness.clock,
            sender=harness._calls,
        )


class _HarnessCalls:
    """The harness's ``CallSender``: a handler's call to another object stays in the harness,
    with the headers a worker would send (``outgoing_headers``)."""

    __slots__ = ("_harness",)

    def __init__(self, harness: ObjectHarness) -> None:
        self._harness = harness

    async def send(self, context: ActorContext, subject: str, body: bytes) -> bytes:
        """Send one call of the turn running in ``context`` to its target in the harness
        (also while the harness closes: an ``on_stop`` may call other objects)."""
        address = parse_rpc_subject(context.prefix, subject)
        headers = outgoing_headers(context, f"{address.class_name}/{address.object_id}")
        return await self._harness._call(subject, body, headers)


class _HarnessTransport:
    """What a harness stub sends through (``ndo.actors.runtime.Transport``)."""

    __slots__ = ("_harness", "_headers")

    def __init__(self, harness: ObjectHarness, headers: dict[str, str] | None) -> None:
        self._harness = harness
        self._headers = headers

    @property
    def prefix(self) -> str:
        """The harness's subject prefix."""
        return self._harness.config.prefix

    async def request(self, subject: str, body: bytes) -> bytes:
        """Send one call, with a fresh Idempotency-Key as ``ActorClient`` does."""
        return await self._harness.request(subject, body, headers=self._headers)


class ObjectHarness:
    """Objects of ``classes`` run in-process on the worker's turn engine, for unit tests.

    ::

        async with ObjectHarness([Counter]) as harness:
            counter = harness.get(Counter, "c1")
            assert await counter.increment(by=2) == 2
            assert await harness.state(Counter, "c1") == {"value": 2}

    Stubs from ``get`` are real ``ActorStub``s: their calls give the replies and raise the
    ``ActorError``s a worker's client would. ``state``/``seed``/``alarm`` read and write storage
    directly, ``events`` lists what committed turns emitted, ``fire_alarm``/``advance`` deliver
    alarms on the ``FakeClock``, ``evict`` drops an object from memory.
    """

    # Configuration
    config: WorkerConfig
    """The worker settings the harness applies (limits, handler deadline, alarm retries, ...)."""
    clock: FakeClock
    """The objects' time (``Actor.now()``); move it with ``advance`` to fire alarms."""
    storage: Storage
    """Where the objects' state lives."""
    _classes: dict[str, ActorClassInfo]
    _limits: StorageLimits
    # Collaborators
    _deadlines: DeadlineWatchdog
    _calls: _HarnessCalls
    # State
    _status: _Status
    _objects: dict[ActorId, _HarnessObject]
    _epochs: dict[int, int]
    """Fencing epoch of each partition, claimed at ``open``."""
    _events: list[EmittedEvent]
    _retries: dict[ActorId, _Retry]
    _tasks: set[asyncio.Task[Any]]
    """Turns running (each in its own task)."""

    def __init__(
        self,
        classes: Iterable[type[Actor]],
        *,
        storage: StorageSpec = "memory",
        clock: FakeClock | None = None,
        config: WorkerConfig | None = None,
        **settings: Any,
    ) -> None:
        """Describe a harness; ``open`` it (or ``async with``) before use.

        Args:
            classes: the ``Actor`` subclasses whose objects the harness hosts.
            storage: ``"memory"``, the path of a SQLite file (created if missing; reopen it in
                another harness to see what persisted), or a ``Storage``.
            clock: the objects' clock (a new ``FakeClock`` at the real time when omitted).
            config: worker settings (``WorkerConfig()`` when omitted); what NATS, workers and
                the journal use is ignored.
            **settings: ``WorkerConfig`` fields overriding ``config``'s, e.g.
                ``handler_timeout=1.0``, ``max_object_bytes=4096``, ``alarm_max_attempts=2``.

        Raises:
            TypeError: a class cannot be served (the message says why), or an unknown setting.
            ValueError: two classes share a name, there are none, or a setting is invalid.
        """
        self._classes = describe_classes(classes)
        base = config or WorkerConfig()
        self.config = msgspec.structs.replace(base, **settings) if settings else base
        self.clock = clock or FakeClock()
        self.storage = _make_storage(storage, self.config.partitions)
        self._limits = self.config.storage_limits()
        self._deadlines = DeadlineWatchdog(self.config.handler_timeout)
        self._calls = _HarnessCalls(self)
        self._status = _Status.NEW
        self._objects = {}
        self._epochs = {}
        self._events = []
        self._retries = {}
        self._tasks = set()

    # Lifecycle

    async def open(self) -> None:
        """Open the storage and claim its partitions.

        Raises:
            RuntimeError: the harness was opened before.
            StorageError: the storage cannot be opened.
        """
        if self._status is not _Status.NEW:
            raise RuntimeError("an ObjectHarness opens once; make a new one")
        self._status = _Status.OPEN
        await self.storage.open()
        self._epochs = await self.storage.claim_partitions(range(self.config.partitions), _OWNER)

    async def close(self) -> None:
        """Run ``on_stop`` of the objects in memory (as a worker's orderly shutdown does),
        then close the storage; turns still running are cancelled first (idempotent).

        Raises:
            ActorError: an ``on_stop`` failed (the first failure; the harness is closed).
        """
        if self._status is _Status.CLOSED:
            return
        opened = self._status is _Status.OPEN
        self._status = _Status.CLOSED
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        failures: list[ActorError] = []
        try:
            for address, target in list(self._objects.items()):
                failure = await self._in_task(self._leave(address, target))
                if failure is not None:
                    failures.append(failure)
        finally:
            self._deadlines.close()
            self._objects.clear()
            if opened:
                await self.storage.close()
        if failures:
            raise failures[0]

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Calls

    @overload
    def get(
        self, actor_class: type[A], object_id: str, *, caller: Caller | None = None
    ) -> ActorStub[A]: ...
    @overload
    def get(
        self, actor_class: str, object_id: str, *, caller: Caller | None = None
    ) -> ActorStub[Actor]: ...
    def get(
        self, actor_class: type[A] | str, object_id: str, *, caller: Caller | None = None
    ) -> ActorStub[Any]:
        """A stub for object ``object_id`` of ``actor_class`` (a class or its name), as
        ``ActorClient.get`` gives: ``await harness.get(Counter, "c1").increment(by=2)``.

        Args:
            actor_class: the object's class, or its name.
            object_id: the object's id.
            caller: who the calls come from (``Actor.caller``), as a worker run with
                ``--caller-info`` would tell the handler; ``None``: nobody said.

        Raises:
            InvalidSubjectError: ``object_id`` is not a valid id.
        """
        validate_id(object_id)
        headers = None
        if caller is not None:
            info = {"acc": caller.account, "user": caller.user, "name": caller.name}
            headers = {Header.REQUEST_INFO.value: _JSON_ENCODER.encode(info).decode()}
        transport = _HarnessTransport(self, headers)
        if isinstance(actor_class, str):
            return ActorStub(transport, actor_class, object_id)
        return ActorStub(transport, actor_class.__name__, object_id, actor_class)

    async def request(
        self,
        subject: str,
        body: bytes,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Send one request as ``ActorClient.request`` would and return the raw reply body
        (JSON, or MessagePack when the headers say ``Content-Type: application/msgpack``).

        Args:
            subject: ``<prefix>.rpc.<Class>.<id>.<method>``.
            body: the encoded arguments.
            idempotency_key: the request's key (a new random one when omitted, as the client
                does); the same key again gets the first call's reply without a turn.
            headers: more headers (an ``Idempotency-Key`` among them wins).

        Raises:
            ActorError: the error a client would get (a subclass per code).
        """
        self._check_open()
        sent = {Header.IDEMPOTENCY_KEY.value: idempotency_key or uuid.uuid4().hex}
        if headers:
            sent.update(headers)
        return await self._call(subject, body, sent)

    async def _call(self, subject: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """Route, check and run one request (ingress, then the activation, in one)."""
        msgpack = headers.get(Header.CONTENT_TYPE.value) == MSGPACK_CONTENT_TYPE
        try:
            info, object_id, spec = self._route(subject)
            envelope = request_envelope(
                spec,
                body,
                headers,
                "",
                target=ActorId(info.name, object_id),
                msgpack=msgpack,
                max_payload=self.config.max_payload,
                caller_info=True,
            )
        except ActorError as error:
            raise _received(error) from None
        target = self._object(info, object_id)
        return await self._in_task(self._serve(target, envelope))

    def _route(self, subject: str) -> tuple[ActorClassInfo, str, MethodSpec]:
        """The class, id and method of ``subject``, checked as ingress checks them."""
        try:
            address = parse_rpc_subject(self.config.prefix, subject)
        except InvalidSubjectError as exc:
            raise BadRequestError(str(exc), type="invalid_subject") from None
        info = self._info(address.class_name)
        return info, address.object_id, info.method_spec(address.method)

    async def _serve(self, target: _HarnessObject, envelope: Envelope) -> bytes:
        """Answer one request of ``target`` as its activation would (in the turn's task)."""
        async with target.lock:
            if envelope.expired(time.monotonic()):
                raise _received(caller_gone(envelope))
            key = envelope.idempotency_key
            if key is not None:
                replayed = await self._stored_reply(target, envelope, key)
                if replayed is not None:
                    return replayed
            outcome = await self._run(target, functools.partial(target.run, envelope))
            if outcome.error is not None:
                raise _received(outcome.error) from _cause(outcome.error, outcome.cause)
            changes = outcome.changes
            assert changes is not None
            events = outcome.events
            remember = key is not None and (not changes.is_empty() or bool(events))
            if remember or not changes.is_empty():
                write = self._write(target, changes)
                if remember:
                    assert key is not None
                    write.idempotent_reply = IdempotentReply(
                        key,
                        stored_reply(outcome.body, envelope.msgpack, envelope.fingerprint),
                        self.clock() + self.config.idempotency_window,
                    )
                await self._commit(target, write)
            self._record(target.address, events)
            return outcome.body

    async def _stored_reply(
        self, target: _HarnessObject, envelope: Envelope, key: str
    ) -> bytes | None:
        """The reply committed under ``key`` for ``target``, re-encoded for this request;
        ``None`` when the key is new."""
        address = target.address
        try:
            stored = await self.storage.read_idempotent(
                address.class_name, address.object_id, key, self.clock()
            )
        except StorageError as exc:
            raise _received(
                UnavailableError(
                    f"could not check the Idempotency-Key ({exc}); nothing was applied, retry "
                    "the call",
                    type="storage_failure",
                )
            ) from exc
        if stored is None:
            return None
        first = stored_fingerprint(stored)
        if first is not None and first != envelope.fingerprint:
            raise _received(key_reused(key, self.config.idempotency_window))
        try:
            body, _ = replay_reply(stored, envelope.msgpack)
        except ActorError as error:
            raise _received(error) from None
        return body

    # Storage

    async def state(self, actor_class: type[Actor] | str, object_id: str) -> dict[str, Any]:
        """Every committed key of the object, its value decoded (a Struct as a dict)."""
        self._check_open()
        address = self._address(actor_class, object_id)
        rows = await self.storage.read_range(
            address.class_name, address.object_id, start=None, end=None, limit=None, reverse=False
        )
        return {key: _DECODER.decode(raw) for key, raw in rows}

    async def seed(
        self,
        actor_class: type[Actor] | str,
        object_id: str,
        values: Mapping[str, Any] | None = None,
        *,
        alarm: float | None = None,
        replace: bool = False,
    ) -> None:
        """Write state straight to storage, as if earlier turns had: the object's next turn
        starts a new instance (``on_start`` runs) and reads it.

        Args:
            actor_class: the object's class, or its name.
            object_id: the object's id.
            values: keys to write (encoded as ``self.storage.put`` would).
            alarm: set the object's alarm to this time (epoch seconds); ``None``: leave it.
            replace: delete every other key of the object first.
        """
        self._check_open()
        target = self._object(self._info_of(actor_class), object_id)
        writes: dict[str, bytes | None] = {k: _ENCODER.encode(v) for k, v in (values or {}).items()}
        write = ObjectWrite(
            class_name=target.address.class_name,
            object_id=object_id,
            partition=target.partition,
            epoch=self._epochs[target.partition],
            writes=writes,
            cleared=replace,
            alarm=ALARM_UNCHANGED if alarm is None else check_time(alarm, "alarm"),
        )
        async with target.lock:
            await self._commit(target, write)
            target.reload()

    async def alarm(self, actor_class: type[Actor] | str, object_id: str) -> float | None:
        """The object's committed alarm time (epoch seconds), or ``None``."""
        self._check_open()
        address = self._address(actor_class, object_id)
        return await self.storage.read_alarm(address.class_name, address.object_id)

    async def evict(self, actor_class: type[Actor] | str, object_id: str) -> None:
        """Take the object out of memory (after its running turn, if any) as an idle worker
        does: its ``on_stop`` runs as a turn and commits, and its next call starts a new
        instance (``on_start``) that reads storage.

        Raises:
            ActorError: ``on_stop`` failed (its writes and events were discarded; the object
                is out of memory all the same).
        """
        self._check_open()
        address = self._address(actor_class, object_id)
        target = self._objects.get(address)
        if target is None:
            return
        failure = await self._in_task(self._leave(address, target))
        if failure is not None:
            raise failure

    async def _leave(self, address: ActorId, target: _HarnessObject) -> ActorError | None:
        """Run ``target``'s ``on_stop`` (when its class has one and an instance is live) and
        commit it, then drop its instance and cache; return the hook's error, if any. (The
        runner itself, with its lock, stays: calls queued behind the eviction run on it, one
        at a time, with a new instance.)"""
        async with target.lock:
            try:
                outcome = await self._run(target, target.stop)
                if outcome is None:
                    return None
                if outcome.error is not None:
                    error = _received(outcome.error)
                    error.__cause__ = _cause(outcome.error, outcome.cause)
                    return error
                assert outcome.changes is not None
                if not outcome.changes.is_empty():
                    await self._commit(target, self._write(target, outcome.changes))
                self._record(address, outcome.events)
                return None
            finally:
                target.reload()

    async def _run(self, target: _HarnessObject, turn: Callable[[], Awaitable[T]]) -> T:
        """Run one turn of ``target`` (``target.run``, ``target.stop``); a turn cut short by
        the harness closing leaves nothing behind (its half-made writes are dropped)."""
        try:
            return await turn()
        except asyncio.CancelledError:
            target.reload()
            raise

    # Events

    def events(
        self,
        actor_class: type[Actor] | str | None = None,
        object_id: str | None = None,
        topic: str = "*",
    ) -> list[EmittedEvent]:
        """Events committed turns emitted, oldest first: of every object, of one class, or of
        one object; ``topic="*"`` for every topic."""
        name = None if actor_class is None else _class_name(actor_class)
        return [
            event
            for event in self._events
            if (name is None or event.address.class_name == name)
            and (object_id is None or event.address.object_id == object_id)
            and (topic == "*" or event.topic == topic)
        ]

    def clear_events(self) -> None:
        """Forget the events recorded so far."""
        self._events.clear()

    def _record(self, address: ActorId, events: list[Event] | None) -> None:
        for event in events or ():
            topic = event.subject.rsplit(".", 1)[-1]
            try:
                data: Any = _JSON_DECODER.decode(event.data)
            except msgspec.DecodeError:
                data = event.data
            self._events.append(EmittedEvent(address, topic, data, event.data, event.subject))

    # Alarms

    async def fire_alarm(self, actor_class: type[Actor] | str, object_id: str) -> AlarmRun:
        """Deliver the object's alarm now, whatever time it is set for (the clock stays).

        A failed delivery counts as an attempt (the next one is a retry: ``info.attempt`` 2,
        and the alarm is deleted after ``alarm_max_attempts``), as in a worker.

        Raises:
            NotFoundError: ``alarm_not_set``: the object has no alarm; ``no_alarm``: its class
                has no ``alarm()``.
            ActorError: the delivery failed (what ``alarm()`` raised, as ``ActorError``).
        """
        self._check_open()
        run = await self._in_task(self._deliver(self._address(actor_class, object_id)))
        assert run is not None  # no due time asked for: whatever alarm is set runs
        if run.error is not None:
            raise run.error
        return run

    async def advance(self, seconds: float) -> list[AlarmRun]:
        """Move the clock ``seconds`` forward, delivering every alarm that falls due on the
        way, in due order, at its due time (alarms already due go first).

        An alarm set again inside the window (by ``alarm()`` or by a turn it calls) fires again
        if due. A failed delivery is retried after the worker's backoff
        (``alarm_initial_backoff`` doubling) if that falls inside the window, and the alarm is
        deleted after ``alarm_max_attempts`` failures. Failures do not raise: each is an
        ``AlarmRun`` with ``error`` set in the list returned.

        Returns:
            The deliveries made, in order.

        Raises:
            RuntimeError: more than ``MAX_ALARM_RUNS`` deliveries (an alarm keeps re-arming):
                advance in smaller steps.
        """
        self._check_open()
        end = self.clock() + check_time(seconds, "seconds")
        runs: list[AlarmRun] = []
        for _ in range(MAX_ALARM_RUNS):
            step = await self._next_alarm(end)
            if step is None:
                self.clock.set(max(end, self.clock()))
                return runs
            when, address, due, attempt = step
            if when > self.clock():
                self.clock.set(when)
            run = await self._in_task(self._deliver(address, due, attempt))
            if run is not None:
                runs.append(run)
        raise RuntimeError(
            f"advance({seconds!r}) made {MAX_ALARM_RUNS} alarm deliveries and alarms are still "
            "due: an alarm keeps re-arming itself; advance in smaller steps"
        )

    async def _next_alarm(self, end: float) -> tuple[float, ActorId, float, int] | None:
        """The next delivery due by ``end``: ``(when, object, due, attempt)``."""
        best: tuple[float, ActorId, float, int] | None = None
        for alarm in await self.storage.due_alarms(None, end, MAX_ALARM_RUNS):
            info = self._classes.get(alarm.class_name)
            if info is None or not info.has_alarm:
                continue  # not run here (a worker parks it the same way)
            address = ActorId(alarm.class_name, alarm.object_id)
            retry = self._retries.get(address)
            if retry is not None and retry.due == alarm.due:
                when, attempt = retry.next_try, retry.failed + 1
            else:
                when, attempt = alarm.due, 1
            if when <= end and (best is None or when < best[0]):
                best = (when, address, alarm.due, attempt)
        return best

    async def _deliver(
        self, address: ActorId, due: float | None = None, attempt: int = 0
    ) -> AlarmRun | None:
        """Run one alarm delivery (in the turn's task): of the alarm due at ``due``, and
        ``None`` when the object's alarm changed meanwhile (stale: a worker skips it too); with
        ``due`` omitted, of whatever alarm the object has (``fire_alarm``).

        Raises:
            NotFoundError: ``alarm_not_set``: ``due`` omitted and the object has no alarm.
        """
        target = self._object(self._info(address.class_name), address.object_id)
        async with target.lock:
            current = await self.storage.read_alarm(address.class_name, address.object_id)
            if due is None:
                if current is None:
                    raise NotFoundError(
                        f"{address} has no alarm set; set one in a handler "
                        "(storage.set_alarm) or with harness.seed(..., alarm=time)",
                        type="alarm_not_set",
                    )
                due = current
                retry = self._retries.get(address)
                attempt = retry.failed + 1 if retry is not None and retry.due == due else 1
            elif current is None or abs(current - due) > 1e-6:
                return None
            envelope = Envelope(None, None, "", alarm=AlarmDelivery(due, attempt))
            outcome = await self._run(target, functools.partial(target.run, envelope))
            now = self.clock()
            if outcome.error is not None:
                error = _received(outcome.error)
                error.__cause__ = _cause(outcome.error, outcome.cause)
                dropped = attempt >= self.config.alarm_max_attempts
                if dropped:
                    self._retries.pop(address, None)
                    await self._commit(target, self._write(target, target.drop_alarm()))
                else:
                    delay = self.config.alarm_initial_backoff * 2 ** (attempt - 1)
                    self._retries[address] = _Retry(due, attempt, now + delay)
                return AlarmRun(address, due, attempt, now, error, dropped)
            self._retries.pop(address, None)
            assert outcome.changes is not None
            await self._commit(target, self._write(target, outcome.changes))
            self._record(address, outcome.events)
            return AlarmRun(address, due, attempt, now)

    # Plumbing

    def _check_open(self) -> None:
        if self._status is not _Status.OPEN:
            raise RuntimeError(
                "the ObjectHarness is not open: use `async with ObjectHarness(...) as harness`"
                if self._status is _Status.NEW
                else "the ObjectHarness is closed"
            )

    def _info(self, class_name: str) -> ActorClassInfo:
        info = self._classes.get(class_name)
        if info is None:
            raise NotFoundError(
                f"unknown class {class_name!r}; this harness hosts "
                f"{', '.join(sorted(self._classes))}",
                type="unknown_class",
            )
        return info

    def _info_of(self, actor_class: type[Actor] | str) -> ActorClassInfo:
        return self._info(_class_name(actor_class))

    def _address(self, actor_class: type[Actor] | str, object_id: str) -> ActorId:
        validate_id(object_id)
        return ActorId(self._info_of(actor_class).name, object_id)

    def _object(self, info: ActorClassInfo, object_id: str) -> _HarnessObject:
        address = ActorId(info.name, object_id)
        target = self._objects.get(address)
        if target is None:
            target = self._objects[address] = _HarnessObject(self, info, object_id)
        return target

    def _write(self, target: _HarnessObject, changes: TurnWrites) -> ObjectWrite:
        return object_write(
            target.address, target.partition, self._epochs[target.partition], changes
        )

    async def _commit(self, target: _HarnessObject, write: ObjectWrite) -> None:
        """Make ``write`` durable; on failure the object reloads and the caller gets the error a
        worker would send."""
        try:
            fenced = await self.storage.commit([write])
        except (WriteRejectedError, ValueError) as exc:
            target.reload()
            raise _received(
                HandlerError(
                    f"storage refused this object's write ({exc}); nothing was applied",
                    type="write_rejected",
                )
            ) from exc
        except StorageError as exc:
            target.reload()
            raise _received(
                UnavailableError(
                    f"the write was not made durable ({exc}); nothing was applied, retry the call",
                    type="storage_failure",
                )
            ) from exc
        if fenced:
            target.reload()
            raise _received(
                UnavailableError(
                    f"partition {target.partition} of this storage was claimed by another ndo "
                    "process (a worker, or another harness on the same file); nothing was "
                    "applied. Give each harness a storage of its own",
                    type="fenced",
                )
            )

    async def _in_task(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` (one turn) in a task of its own, as a worker's pump runs a turn: its
        deadline cancels only that task, and a caller that stops waiting leaves it running."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._turn_done)
        return await asyncio.shield(task)

    def _turn_done(self, task: asyncio.Task[Any]) -> None:
        """Forget a finished turn; its error was the caller's (or nobody's, when the caller
        stopped waiting: retrieved here so asyncio does not log it)."""
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()


def _make_storage(spec: StorageSpec, partitions: int) -> Storage:
    if isinstance(spec, Storage):
        return spec
    if isinstance(spec, str) and spec == "memory":
        return InMemoryStorage()
    return SqliteStorage(Path(spec), partitions=partitions)


def _class_name(actor_class: type[Actor] | str) -> str:
    return actor_class if isinstance(actor_class, str) else actor_class.__name__


def _received(error: ActorError) -> ActorError:
    """``error`` as a client receives it: rebuilt from its wire form (code, type, message), so
    a test sees the class a caller over NATS sees (``ConflictError``, not a handler's own
    subclass of it)."""
    return error_from_wire(error.code, error.message, error.type)


def _cause(error: ActorError, cause: BaseException | None) -> BaseException | None:
    """What to chain a rebuilt turn error to: the handler's exception (its traceback shows
    where the handler failed)."""
    return cause if cause is not None else error
