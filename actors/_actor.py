"""The ``Actor`` base class users subclass, and the per-object context the runtime gives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from ndo.actors._errors import BadRequestError
from ndo.actors._storage import ActorStorage
from ndo.subjects import InvalidSubjectError, event_subject

__all__ = ["Actor", "ActorContext", "ActorId", "AlarmInfo", "Caller", "Event"]

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


class ActorContext:
    """What the runtime gives one object: identity, storage, and the turn's event outbox."""

    __slots__ = ("_events", "caller", "id", "partition", "prefix", "storage")

    id: ActorId
    """The object's identity."""
    partition: int
    """The partition the object hashes to."""
    prefix: str
    """Subject prefix of the deployment."""
    storage: ActorStorage
    """The object's storage view."""
    caller: Caller | None
    """Who sent the message of the current turn (set by the runtime for each turn)."""
    _events: list[Event] | None

    def __init__(self, object_id: ActorId, partition: int, prefix: str, storage: ActorStorage):
        """Create the context of one activation."""
        self.id = object_id
        self.partition = partition
        self.prefix = prefix
        self.storage = storage
        self.caller = None
        self._events = None

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

    async def on_start(self) -> None:
        """Hook run before the first message of an activation. Default: nothing."""
