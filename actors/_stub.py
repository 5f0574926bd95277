"""``ActorStub``: a handle on one object whose methods are the object's ``@method``s, and the
``Transport`` it sends through.

A stub call encodes the arguments as JSON, sends one request on
``<prefix>.rpc.<Class>.<id>.<method>`` through its transport and decodes the reply with the
method's return annotation. Transports: ``ActorClient`` for callers outside (retries, timeouts,
idempotency keys), ``TurnTransport`` for the calls a handler makes to other objects
(``Actor.call``), or a test kit's in-process one (``ndo.testing``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Final,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    get_type_hints,
    overload,
    runtime_checkable,
)

import msgspec

from ndo.actors._context import ActorContext, CallSender, Event
from ndo.actors._marks import is_method
from ndo.subjects import event_wildcard, rpc_subject

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

__all__ = ["ActorStub", "EventSource", "Transport", "TurnTransport"]

A = TypeVar("A")
"""The object's class (an ``Actor`` subclass)."""
P = ParamSpec("P")
R = TypeVar("R")

_JSON_ENCODER: Final = msgspec.json.Encoder()


class Transport(Protocol):
    """Where a stub's calls go: ``ActorClient``, ``TurnTransport`` or a test kit."""

    @property
    def prefix(self) -> str:
        """The deployment's subject prefix."""
        ...

    async def request(self, subject: str, body: bytes) -> bytes:
        """Send one call and return the reply body (raises ``ActorError`` subclasses)."""
        ...


@runtime_checkable
class EventSource(Protocol):
    """A transport that can also subscribe to events (``ActorClient``)."""

    @property
    def prefix(self) -> str:
        """The deployment's subject prefix."""
        ...

    @property
    def nc(self) -> NatsClient:
        """The NATS connection events are subscribed on."""
        ...


class TurnTransport:
    """Sends the calls a handler makes to other objects, as calls of its turn (the host's
    ``CallSender`` adds the call chain, the deadline and the derived Idempotency-Key)."""

    __slots__ = ("_context", "_sender")

    def __init__(self, sender: CallSender, context: ActorContext) -> None:
        """Bind ``sender`` to the object whose turn makes the calls."""
        self._sender = sender
        self._context = context

    @property
    def prefix(self) -> str:
        """The deployment's subject prefix."""
        return self._context.prefix

    async def request(self, subject: str, body: bytes) -> bytes:
        """Send one call of the current turn."""
        return await self._sender.send(self._context, subject, body)


class ActorStub(Generic[A]):
    """A handle on one object. Its methods are the object's ``@method``s:
    ``await client.get(Counter, "a1").increment(by=2)`` (type-checked with the mypy plugin
    ``ndo.actors.mypy_plugin``). ``await stub.call(Counter.increment, by=2)`` is the same call,
    type-checked by mypy without a plugin; ``stub.call("increment", by=2)`` calls by name."""

    __slots__ = ("_cls", "_transport", "class_name", "object_id")

    class_name: str
    """The object's class name."""
    object_id: str
    """The object's id."""
    _cls: type[A] | None
    """The object's class when the stub was made from it (typed results, methods by name)."""

    def __init__(
        self,
        transport: Transport,
        class_name: str,
        object_id: str,
        cls: type[A] | None = None,
    ) -> None:
        """Create a stub (use ``ActorClient.get`` or ``Actor.call``)."""
        self._transport = transport
        self.class_name = class_name
        self.object_id = object_id
        self._cls = cls

    def __repr__(self) -> str:
        return f"<ActorStub {self.class_name}/{self.object_id}>"

    def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        """``stub.increment`` is ``functools.partial(stub.call, Counter.increment)`` (or, for a
        stub made from a class name, a call by name taking keyword arguments)."""
        if name.startswith("_"):
            raise AttributeError(name)
        cls = self._cls
        if cls is None:
            return functools.partial(self.call, name)
        function = getattr(cls, name, None)
        if function is None or not is_method(function):
            raise AttributeError(
                f"{cls.__name__} has no @method {name!r}; its stub's methods are the class's "
                "@method functions"
            )
        return functools.partial(self.call, function)

    @overload
    async def call(
        self,
        method: Callable[Concatenate[A, P], Coroutine[Any, Any, R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R: ...
    @overload
    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any: ...
    async def call(self, method: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` (a function of the actor class, or a method name) and return its
        decoded result.

        Raises:
            ActorError: a subclass per wire error code; ``.retryable`` tells transient ones.
        """
        if isinstance(method, str):
            if args:
                raise TypeError("calls by method name take keyword arguments only")
            name, return_type, arguments = method, Any, kwargs
        else:
            name = method.__name__
            signature = _signature(method)
            bound = signature.bind(None, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))  # self
            return_type = _return_type(method)
        transport = self._transport
        subject = rpc_subject(transport.prefix, self.class_name, self.object_id, name)
        body = _JSON_ENCODER.encode(arguments) if arguments else b""
        reply = await transport.request(subject, body)
        return _decoder(return_type).decode(reply)

    async def events(self, topic: str = "*") -> AsyncGenerator[Event, None]:
        """Yield this object's events as they are published (``topic`` may be ``*``).

        ``aclose()`` the generator (or leave its ``async for``) to unsubscribe. Only for stubs
        of an ``ActorClient`` (a test kit collects events itself).
        """
        source = self._transport
        if not isinstance(source, EventSource):
            raise TypeError("events() needs a stub made by ActorClient.get")
        subject = event_wildcard(source.prefix, self.class_name, self.object_id, topic)
        sub = await source.nc.subscribe(subject)
        try:
            async for msg in sub.messages:
                yield Event(msg.subject, msg.data)
        finally:
            await sub.unsubscribe()


@functools.lru_cache(maxsize=1024)
def _decoder(return_type: Any) -> msgspec.json.Decoder[Any]:
    """The reply decoder of one return type (built once)."""
    return msgspec.json.Decoder(return_type)


@functools.lru_cache(maxsize=4096)
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def _return_type(fn: Callable[..., Any]) -> Any:
    """The annotated return type of ``fn``, resolved once and remembered on the function."""
    cached = getattr(fn, "__ndo_return_type__", None)
    if cached is None:
        cached = get_type_hints(fn).get("return", Any)
        with contextlib.suppress(AttributeError):
            fn.__ndo_return_type__ = cached  # type: ignore[attr-defined]
    return cached
