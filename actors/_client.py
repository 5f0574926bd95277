"""Calling objects from Python: ``ActorClient``, the transport of stubs over a NATS connection.

``client.get(Counter, "a1")`` is an ``ActorStub`` (``actors/_stub.py``) sending through the
client. Each request retries "no responders", timeouts and 503s with exponential backoff, always
with the same ``Idempotency-Key``, so a retried call is applied at most once (the worker
remembers committed keys). A request with a ``deadline`` (calls between objects) tells the
worker the time left on each try (``Ndo-Timeout-Ms``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, overload

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ndo.actors._actor import Actor
from ndo.actors._errors import (
    ActorError,
    CallTimeoutError,
    DeadlineExceededError,
    PermissionDeniedError,
    UnavailableError,
    error_from_wire,
)
from ndo.actors._permissions import PermissionWatch
from ndo.actors._stub import ActorStub
from ndo.subjects import (
    DEFAULT_PREFIX,
    Header,
    id_from_name,
    validate_id,
)

__all__ = ["ActorClient", "RetryPolicy"]

A = TypeVar("A", bound=Actor)


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

    @property
    def nc(self) -> NatsClient:
        """The NATS connection the client sends on (stubs subscribe to events on it)."""
        return self._nc

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
            deadline: ``time.monotonic()`` after which no try starts and no reply is awaited;
                each try tells the worker the time left (``Ndo-Timeout-Ms``), so the handler
                gets no more and a request still queued when it passes is not run.

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
                left = deadline - time.monotonic()
                if left <= 0.0:
                    if attempt == 1:
                        last = DeadlineExceededError(
                            f"no time was left to call {subject}", type="deadline_exceeded"
                        )
                    break
                wait = min(wait, left)
                sent[Header.TIMEOUT_MS.value] = str(max(1, int(left * 1000)))
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
