"""The ``Actor`` base class users subclass."""

from __future__ import annotations

from typing import Any, TypeVar, overload

from ndo.actors._context import ActorContext, ActorId, Caller
from ndo.actors._errors import BadRequestError, ConflictError, UnavailableError
from ndo.actors._storage import ActorStorage
from ndo.actors._stub import ActorStub, TurnTransport
from ndo.subjects import InvalidSubjectError, validate_id

__all__ = ["Actor"]

_A = TypeVar("_A", bound="Actor")


class Actor:
    """Base class of durable objects.

    Subclass it, declare callable methods with ``@method``, keep state in ``self.storage``.
    Optional hooks: ``async def on_start(self)`` runs before the first message of each activation
    (load caches there), ``async def on_stop(self)`` as the activation leaves memory (best effort:
    flush what ``on_start`` or the handlers kept in memory), ``async def alarm(self, info:
    AlarmInfo)`` when an alarm is due.
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
        context = self.__ndo_context__
        try:
            validate_id(object_id)
        except InvalidSubjectError as exc:
            raise BadRequestError(str(exc), type="invalid_id") from None
        name = actor_class if isinstance(actor_class, str) else actor_class.__name__
        if name == context.id.class_name and object_id == context.id.object_id:
            raise ConflictError(
                f"{context.id} called itself; an object runs one call at a time, so the call "
                "would wait for itself. Call the method's code directly instead",
                type="call_cycle",
            )
        if context.sender is None:
            raise UnavailableError(
                f"{context.id} cannot call other objects here (replay re-runs one object alone)",
                type="calls_unavailable",
            )
        cls = None if isinstance(actor_class, str) else actor_class
        return ActorStub(TurnTransport(context.sender, context), name, object_id, cls)

    def now(self) -> float:
        """Epoch seconds now: ``time.time()`` in a worker, the fake clock in ``ndo.testing``.
        Use it instead of ``time.time()`` for time a test should control."""
        return self.__ndo_context__.clock()

    async def on_start(self) -> None:
        """Hook run before the first message of an activation. Default: nothing."""

    async def on_stop(self) -> None:
        """Hook run, best effort, as the activation leaves memory in an orderly way. Default:
        nothing.

        It runs like a turn, after the messages already queued: when the object was idle too
        long (``idle_timeout``), was evicted for ``--max-active``, its partition is handed to
        another worker, or the worker shuts down (within ``drain_timeout``). It never runs after
        a crash, nor after a failed turn (whose instance is dropped without it): keep nothing
        in memory that must not be lost. Its writes and events commit like a turn's while the
        object belongs to this worker; at a hand-over they may be refused (fenced) if the new
        owner took over first, and are then lost (logged). If it raises, its writes are
        discarded, the failure is logged and counted (``ndo_on_stop_total``), and the object
        leaves anyway. A message that arrives meanwhile is served by a new instance
        (``on_start`` again), which stays.
        """
