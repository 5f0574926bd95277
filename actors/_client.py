"""Calling objects from Python: ``ActorClient`` and the per-object ``ActorStub``.

A stub call sends one NATS request to ``<prefix>.rpc.<Class>.<id>.<method>`` and decodes the
reply with the method's return annotation. It retries "no responders", timeouts and 503s with
exponential backoff, always with the same ``Idempotency-Key``, so a retried call is applied at
most once (the worker remembers committed keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import (
    Any,
    Concatenate,
    Final,
    Generic,
    ParamSpec,
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
    PermissionDeniedError,
    UnavailableError,
    error_from_wire,
)
from ndo.actors._permissions import PermissionWatch
from ndo.subjects import DEFAULT_PREFIX, Header, event_wildcard, rpc_subject, validate_id

__all__ = ["ActorClient", "ActorStub", "RetryPolicy"]

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
    # Reused decoders, by return type
    _decoders: dict[Any, msgspec.json.Decoder[Any]]

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
        self._decoders = {}

    @overload
    def get(self, actor_class: type[A], object_id: str) -> ActorStub[A]: ...
    @overload
    def get(self, actor_class: str, object_id: str) -> ActorStub[Actor]: ...
    def get(self, actor_class: type[A] | str, object_id: str) -> ActorStub[Any]:
        """Return a stub for object ``object_id`` of ``actor_class`` (a class or its name)."""
        validate_id(object_id)
        name = actor_class if isinstance(actor_class, str) else actor_class.__name__
        return ActorStub(self, name, object_id)

    def _decoder(self, return_type: Any) -> msgspec.json.Decoder[Any]:
        decoder = self._decoders.get(return_type)
        if decoder is None:
            decoder = self._decoders[return_type] = msgspec.json.Decoder(return_type)
        return decoder

    async def request(
        self,
        subject: str,
        body: bytes,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        """Send a request with retries and return the raw reply body.

        Raises:
            ActorError: the worker answered with an error (a subclass per code).
            CallTimeoutError: no reply after every retry.
            PermissionDeniedError: the server refused to let this connection publish to
                ``subject`` or receive replies (no retry).
            UnavailableError: no worker answered after every retry.
        """
        headers = {Header.IDEMPOTENCY_KEY.value: idempotency_key or uuid.uuid4().hex}
        policy = self._retry
        backoff = policy.initial_backoff
        last: ActorError = UnavailableError("no attempt made")
        for attempt in range(1, policy.attempts + 1):
            try:
                msg = await self._request_once(subject, body, timeout or self._timeout, headers)
                return _check_reply(msg)
            except nats.errors.NoRespondersError:
                last = UnavailableError(
                    f"no worker is serving {subject}; is `ndo serve` running with this class "
                    "and prefix?",
                    type="no_responders",
                )
            except nats.errors.TimeoutError:
                last = CallTimeoutError(
                    f"no reply to {subject} within {timeout or self._timeout}s", type="timeout"
                )
            except ActorError as exc:
                if not exc.retryable:
                    raise
                last = exc
            if attempt < policy.attempts:
                await asyncio.sleep(backoff)
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


class ActorStub(Generic[A]):
    """A handle on one object. ``await stub.call(Counter.increment, by=2)`` is type-checked:
    arguments against the method's signature, the result as its return type."""

    __slots__ = ("_client", "class_name", "object_id")

    class_name: str
    """The object's class name."""
    object_id: str
    """The object's id."""

    def __init__(self, client: ActorClient, class_name: str, object_id: str) -> None:
        """Create a stub (use ``ActorClient.get``)."""
        self._client = client
        self.class_name = class_name
        self.object_id = object_id

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
            signature = inspect.signature(method)
            bound = signature.bind(None, *args, **kwargs)
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))  # self
            return_type = _return_type(method)
        subject = rpc_subject(self._client._prefix, self.class_name, self.object_id, name)
        body = _JSON_ENCODER.encode(arguments) if arguments else b""
        reply = await self._client.request(subject, body)
        return self._client._decoder(return_type).decode(reply)

    async def events(self, topic: str = "*") -> AsyncGenerator[Event, None]:
        """Yield this object's events as they are published (``topic`` may be ``*``).

        ``aclose()`` the generator (or leave its ``async for``) to unsubscribe.
        """
        subject = event_wildcard(self._client._prefix, self.class_name, self.object_id, topic)
        sub = await self._client._nc.subscribe(subject)
        try:
            async for msg in sub.messages:
                yield Event(msg.subject, msg.data)
        finally:
            await sub.unsubscribe()


def _return_type(fn: Callable[..., Any]) -> Any:
    """The annotated return type of ``fn``, resolved once and remembered on the function."""
    cached = getattr(fn, "__ndo_return_type__", None)
    if cached is None:
        cached = get_type_hints(fn).get("return", Any)
        with contextlib.suppress(AttributeError):
            fn.__ndo_return_type__ = cached  # type: ignore[attr-defined]
    return cached
