"""What the runtime gives one object: its identity, its context (storage, clock, events, the
way its calls leave), and the small records a handler sees (``Caller``, ``AlarmInfo``, ``Event``).

Apart from ``Actor`` (``actors/_actor.py``) so that the stub and the call rules, which need the
context, never import the class users subclass."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec

from ndo.actors._errors import BadRequestError
from ndo.actors._storage import ActorStorage
from ndo.subjects import InvalidSubjectError, event_subject

__all__ = ["ActorContext", "ActorId", "AlarmInfo", "CallSender", "Caller", "Event", "TurnInfo"]

_JSON = msgspec.json.Encoder()


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


class TurnInfo(Protocol):
    """What a handler's outgoing calls need to know about the turn making them."""

    @property
    def chain(self) -> str:
        """The ``Ndo-Call-Chain`` this turn's request came with ("" when none)."""
        ...

    @property
    def identity(self) -> str | None:
        """A name of this turn that a re-run of it has too (its Idempotency-Key, its alarm's
        due time), or ``None`` when a re-run cannot be told from a new request."""
        ...


class CallSender(Protocol):
    """How a host sends an object's calls to other objects (the worker: over NATS)."""

    async def send(self, context: ActorContext, subject: str, body: bytes) -> bytes:
        """Send one call made by the turn running in ``context`` and return the reply body.

        Raises:
            ActorError: the target (or the way to it) failed the call.
        """
        ...


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

    def take_events(self) -> list[Event] | None:
        """Remove and return the events queued by the current turn (runtime use)."""
        events, self._events = self._events, None
        return events
