"""Calling objects from Python: ``ActorClient`` and the per-object ``ActorStub``.

A stub call sends one NATS request to ``<prefix>.rpc.<Class>.<id>.<method>`` and decodes the
reply with the method's return annotation. It retries "no responders", timeouts and 503s with
exponential backoff, always with the same ``Idempotency-Key``, so a retried call is applied at
most once (the worker remembers committed keys). Each try tells the worker how long it will wait
(``Ndo-Timeout-Ms``), so a request its caller gave up on is not run.

A stub sends through a ``Transport``: ``ActorClient`` itself for callers outside, a
``TurnTransport`` for calls one object makes to another inside a handler (``Actor.call``), or a
test kit's in-process one (``ndo.testing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from dataclasses import dataclass
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
)

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ndo.actors._actor import Actor, Event
from ndo.actors._errors import (
    ActorError,
    CallTimeoutError,
    DeadlineExceededError,
    PermissionDeniedError,
    UnavailableError,
    error_from_wire,
)
from ndo.actors._methods import is_method
from ndo.actors._permissions import PermissionWatch
from ndo.subjects import (
    DEFAULT_PREFIX,
    Header,
    event_wildcard,
    id_from_name,
    rpc_subject,
    validate_id,
)

if TYPE_CHECKING:
    from ndo.actors._actor import ActorContext
    from ndo.actors._calls import CallSender

__all__ = ["ActorClient", "ActorStub", "RetryPolicy", "Transport", "TurnTransport"]

A = TypeVar("A", bound=Actor)
P = ParamSpec("P")
R = TypeVar("R")

_JSON_ENCODER: Final = msgspec.json.Encoder()
_ANY_DECODER: Final = msgspec.json.Decoder()


class _WireError(msgspec.Struct):
    code: int = 500
    type: str = "error"
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _WireError


_ERROR_DECODER: Final = msgspec.json.Decoder(_ErrorBody)


class Transport(Protocol):
    """Where a stub's calls go: ``ActorClient``, ``TurnTransport`` or a test kit."""

    @property
    def prefix(self) -> str:
        """The deployment's subject prefix."""
        ...

    async def request(self, subject: str, body: bytes) -> bytes:
        """Send one call and return the reply body (raises ``ActorError`` subclasses)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a stub retries transient failures (no responders, timeouts, 503)."""

    attempts: int = 8
    """Total tries, the first included. With the default backoff the retries span ~5 s, longer
    than the default lease TTL (3 s), so a call survives its worker being killed."""
    initial_backoff: float = 0.05
    """Seconds before the first retry; doubles each time."""
    max_backoff: float = 2.0
    """Longest wait between tries."""


class ActorClient:
    """Entry point for calling objects over an existing nats-py connection."""

    # Configuration
    _nc: NatsClient
    _prefix: str
    _timeout: float
    _retry: RetryPolicy
    _permissions: PermissionWatch
    """Turns the server's permission violations into errors of the requests they concern."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Create a client.

        A request the server's permissions refuse fails at once with ``PermissionDeniedError``
        naming the subject (for that, the client chains a watch in front of ``nc``'s error
        callback; the callback still sees every error).

        Args:
            nc: a connected nats-py client.
            prefix: the deployment's subject prefix.
            timeout: seconds to wait for each try's reply.
            retry: retry policy; defaults to ``RetryPolicy()``.
        """
        self._nc = nc
        self._prefix = prefix
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._permissions = PermissionWatch.of(nc)

    @property
    def prefix(self) -> str:
        """The deployment's subject prefix."""
        return self._prefix

    @overload
    def get(self, actor_class: type[A], object_id: str) -> ActorStub[A]: ...
    @overload
    def get(self, actor_class: str, object_id: str) -> ActorStub[Actor]: ...
    def get(self, actor_class: type[A] | str, object_id: str) -> ActorStub[Any]:
        """Return a stub for object ``object_id`` of ``actor_class`` (a class or its name):
        ``await client.get(Counter, "a1").increment(by=2)``."""
        validate_id(object_id)
        if isinstance(actor_class, str):
            return ActorStub(self, actor_class, object_id)
        return ActorStub(self, actor_class.__name__, object_id, actor_class)

    @staticmethod
    def id_from_name(name: str) -> str:
        """The object id ndo derives from ``name`` (any string: an email, a room title): the
        same name always gives the same valid id, in every language (``ndo.id_from_name``)."""
        return id_from_name(name)

    async def request(
        self,
        subject: str,
        body: bytes,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> bytes:
        """Send a request with retries and return the raw reply body.

        Args:
            subject: the object's RPC subject.
            body: the encoded arguments.
            timeout: seconds to wait for each try's reply (the client's default when omitted).
            idempotency_key: the key every try carries (a new random one when omitted).
            headers: more headers to send (an ``Idempotency-Key`` among them wins).
            deadline: ``time.monotonic()`` after which no try starts and no reply is awaited.

        Raises:
            ActorError: the worker answered with an error (a subclass per code).
            CallTimeoutError: no reply after every retry.
            PermissionDeniedError: the server refused to let this connection publish to
                ``subject`` or receive replies (no retry).
            UnavailableError: no worker answered after every retry.
        """
        sent = {Header.IDEMPOTENCY_KEY.value: idempotency_key or uuid.uuid4().hex}
        if headers:
            sent.update(headers)
        policy = self._retry
        backoff = policy.initial_backoff
        last: ActorError = UnavailableError("no attempt made")
        for attempt in range(1, policy.attempts + 1):
            wait = timeout or self._timeout
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0.0:
                    if attempt == 1:
                        last = DeadlineExceededError(
                            f"no time was left to call {subject}", type="deadline_exceeded"
                        )
                    break
            sent[Header.TIMEOUT_MS.value] = str(max(1, int(wait * 1000)))
            try:
                msg = await self._request_once(subject, body, wait, sent)
                return _check_reply(msg)
            except nats.errors.NoRespondersError:
                last = UnavailableError(
                    f"no worker is serving {subject}; is `ndo serve` running with this class "
                    "and prefix?",
                    type="no_responders",
                )
            except nats.errors.TimeoutError:
                last = CallTimeoutError(f"no reply to {subject} within {wait:.3g}s", type="timeout")
            except ActorError as exc:
                if not exc.retryable:
                    raise
                last = exc
            if attempt < policy.attempts:
                pause = backoff if deadline is None else min(backoff, deadline - time.monotonic())
                await asyncio.sleep(max(0.0, pause))
                backoff = min(backoff * 2, policy.max_backoff)
        raise last

    async def _request_once(
        self, subject: str, body: bytes, timeout: float, headers: dict[str, str]
    ) -> Msg:
        """One try; a permission violation for it raises ``PermissionDeniedError`` at once."""
        watch = self._permissions
        token = watch.expect(subject)
        try:
            return await self._nc.request(subject, body, timeout=timeout, headers=headers)
        except asyncio.CancelledError:
            denial = watch.denial(token)
            task = asyncio.current_task()
            if denial is None or task is None:
                raise
            task.uncancel()
            raise PermissionDeniedError(
                f"the NATS server does not allow this connection to {denial.describe()} "
                f"(calling {subject}); ask for that permission, or see docs/security.md for "
                "what a caller needs",
                type="permission_denied",
            ) from None
        finally:
            watch.forget(token)


def _check_reply(msg: Msg) -> bytes:
    headers = msg.headers
    if headers:
        code = headers.get(Header.ERROR_CODE.value)
        if code is not None:
            description = headers.get(Header.ERROR.value, "")
            try:
                wire = _ERROR_DECODER.decode(msg.data).error
                raise error_from_wire(wire.code, wire.message or description, wire.type)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise error_from_wire(int(code), description) from None
    return msg.data


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
        client = self._transport
        if not isinstance(client, ActorClient):
            raise TypeError("events() needs a stub made by ActorClient.get")
        subject = event_wildcard(client.prefix, self.class_name, self.object_id, topic)
        sub = await client._nc.subscribe(subject)
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
