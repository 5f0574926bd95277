"""The ``Actor`` base class users subclass, and the per-object context the runtime gives it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, overload

import msgspec

from ndo.actors._errors import BadRequestError, ConflictError, UnavailableError
from ndo.actors._storage import ActorStorage
from ndo.subjects import InvalidSubjectError, event_subject, validate_id

if TYPE_CHECKING:
    from ndo.actors._calls import CallSender, TurnInfo
    from ndo.actors._client import ActorStub

__all__ = ["Actor", "ActorContext", "ActorId", "AlarmInfo", "Caller", "Event"]

_JSON = msgspec.json.Encoder()
_A = TypeVar("_A", bound="Actor")


class ActorId(NamedTuple):
    """The identity of one object: its class name and its id."""

    class_name: str
    object_id: str

    def __str__(self) -> str:
        return f"{self.class_name}/{self.object_id}"


@dataclass(frozen=True, slots=True)
class AlarmInfo:
    """What ``alarm(info)`` is told about the delivery."""

    scheduled_time: float
    """Epoch seconds the alarm was set for."""
    attempt: int
    """1 on the first delivery, 2 on the first retry, ..."""

    @property
    def is_retry(self) -> bool:
        """Whether an earlier delivery of this alarm failed."""
        return self.attempt > 1


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent the current request, as the NATS server vouches for it.

    Present only when the deployment shares it: the request reached the workers through a
    service import with ``share: true`` and the workers run with ``--caller-info``
    (``docs/security.md``). ``None`` otherwise, and for alarms.
    """

    account: str
    """The caller's NATS account (name, or public key in operator mode)."""
    user: str = ""
    """The caller's user (name, or NKey public key), when the server knows one."""
    name: str = ""
    """The client connection's name (``nats.connect(name=...)``), when it set one."""


@dataclass(frozen=True, slots=True)
class Event:
    """An event emitted by an object, published on ``<prefix>.evt.<Class>.<id>.<topic>``."""

    subject: str
    data: bytes


class ActorContext:
    """What the runtime gives one object: identity, storage, clock, the turn's event outbox and
    the way its calls to other objects leave."""

    __slots__ = (
        "_events",
        "caller",
        "calls",
        "clock",
        "deadline",
        "id",
        "partition",
        "prefix",
        "sender",
        "storage",
        "turn",
    )

    id: ActorId
    """The object's identity."""
    partition: int
    """The partition the object hashes to."""
    prefix: str
    """Subject prefix of the deployment."""
    storage: ActorStorage
    """The object's storage view."""
    clock: Callable[[], float]
    """Epoch seconds now (``time.time``; a test kit's fake clock)."""
    sender: CallSender | None
    """Sends this object's calls to other objects; ``None`` where none can leave (replay)."""
    # Set by the runtime for each turn
    caller: Caller | None
    """Who sent the message of the current turn."""
    turn: TurnInfo | None
    """The message of the current turn, as its outgoing calls see it."""
    deadline: float
    """``time.monotonic()`` by which the current turn must finish (0.0: none)."""
    calls: int
    """Calls to other objects the current turn has made."""
    _events: list[Event] | None

    def __init__(
        self,
        object_id: ActorId,
        partition: int,
        prefix: str,
        storage: ActorStorage,
        *,
        clock: Callable[[], float] = time.time,
        sender: CallSender | None = None,
    ):
        """Create the context of one activation."""
        self.id = object_id
        self.partition = partition
        self.prefix = prefix
        self.storage = storage
        self.clock = clock
        self.sender = sender
        self.caller = None
        self.turn = None
        self.deadline = 0.0
        self.calls = 0
        self._events = None

    def begin_turn(self, turn: TurnInfo | None, caller: Caller | None) -> None:
        """The runtime starts a turn for ``turn`` (``None``: a hook such as ``on_stop``)."""
        self.turn = turn
        self.caller = caller
        self.calls = 0

    def emit(self, topic: str, data: Any) -> None:
        """Queue an event; it is published only if this turn commits."""
        try:
            subject = event_subject(self.prefix, self.id.class_name, self.id.object_id, topic)
        except InvalidSubjectError as exc:
            raise BadRequestError(str(exc), type="invalid_topic") from None
        payload = data if isinstance(data, bytes) else _JSON.encode(data)
        if self._events is None:
            self._events = []
        self._events.append(Event(subject, payload))

    def stub(self, actor_class: type[_A] | str, object_id: str) -> ActorStub[_A]:
        """A stub whose calls leave as calls of the current turn (see ``Actor.call``).

        Raises:
            BadRequestError: ``object_id`` is not a valid id.
            ConflictError: ``call_cycle``: the object would call itself.
            UnavailableError: ``calls_unavailable``: this host sends no calls (replay).
        """
        from ndo.actors._client import ActorStub, TurnTransport

        try:
            validate_id(object_id)
        except InvalidSubjectError as exc:
            raise BadRequestError(str(exc), type="invalid_id") from None
        name = actor_class if isinstance(actor_class, str) else actor_class.__name__
        if name == self.id.class_name and object_id == self.id.object_id:
            raise ConflictError(
                f"{self.id} called itself; an object runs one call at a time, so the call "
                "would wait for itself. Call the method's code directly instead",
                type="call_cycle",
            )
        if self.sender is None:
            raise UnavailableError(
                f"{self.id} cannot call other objects here (replay re-runs one object alone)",
                type="calls_unavailable",
            )
        cls = None if isinstance(actor_class, str) else actor_class
        return ActorStub(TurnTransport(self.sender, self), name, object_id, cls)

    def take_events(self) -> list[Event] | None:
        """Remove and return the events queued by the current turn (runtime use)."""
        events, self._events = self._events, None
        return events


class Actor:
    """Base class of durable objects.

    Subclass it, declare callable methods with ``@method``, keep state in ``self.storage``.
    Optional hooks: ``async def on_start(self)`` runs before the first message of each activation
    (load caches there), ``async def alarm(self, info: AlarmInfo)`` runs when an alarm is due.
    The runtime creates instances; define no ``__init__`` of your own (use ``on_start``).
    """

    __ndo_context__: ActorContext

    def __init__(self, context: ActorContext) -> None:
        """Bind the instance to its context (called by the runtime)."""
        self.__ndo_context__ = context

    @property
    def id(self) -> ActorId:
        """This object's class name and id."""
        return self.__ndo_context__.id

    @property
    def storage(self) -> ActorStorage:
        """This object's transactional key-value storage."""
        return self.__ndo_context__.storage

    @property
    def caller(self) -> Caller | None:
        """Who sent the request this turn handles (account, user, client name) when the
        deployment shares it; ``None`` otherwise and in ``alarm``. Use it to authorise per
        caller: ``if self.caller is None or self.caller.account != "BILLING": raise
        PermissionDeniedError(...)``."""
        return self.__ndo_context__.caller

    def emit(self, topic: str, data: Any) -> None:
        """Publish ``data`` (JSON-encoded unless bytes) on this object's ``topic`` after the
        current turn commits; never if the turn fails."""
        self.__ndo_context__.emit(topic, data)

    @overload
    def call(self, actor_class: type[_A], object_id: str) -> ActorStub[_A]: ...
    @overload
    def call(self, actor_class: str, object_id: str) -> ActorStub[Actor]: ...
    def call(self, actor_class: type[_A] | str, object_id: str) -> ActorStub[Any]:
        """A stub to call another object from this handler:
        ``await self.call(Room, room_id).join(user="a")``.

        The call is a request like any other, sent after this object's earlier writes are
        durable, with this turn's remaining time as its deadline and an Idempotency-Key derived
        from this turn, so a re-run of this turn (after a crash) does not apply it twice. A call
        to this object itself, or back into an object waiting on this one, fails with 409
        ``call_cycle`` instead of deadlocking (``docs/design.md``, "Calls between objects").
        """
        return self.__ndo_context__.stub(actor_class, object_id)

    def now(self) -> float:
        """Epoch seconds now: ``time.time()`` in a worker, the fake clock in ``ndo.testing``.
        Use it instead of ``time.time()`` for time a test should control."""
        return self.__ndo_context__.clock()

    async def on_start(self) -> None:
        """Hook run before the first message of an activation. Default: nothing."""
