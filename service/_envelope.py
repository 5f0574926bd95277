"""One message for one object: a request (method and decoded arguments) or an alarm delivery.

A leaf module of its own because three others read it and none of them should import another
for it: ingress builds envelopes, the turn engine runs them, the journal records them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Final

import msgspec

from ndo.actors import (
    ActorId,
    BadRequestError,
    Caller,
    DeadlineExceededError,
    PayloadTooLargeError,
    UnavailableError,
)
from ndo.actors.runtime import MethodSpec, incoming_call
from ndo.service._idempotency import call_fingerprint
from ndo.subjects import Header

__all__ = [
    "MAX_KEY_LENGTH",
    "AlarmDelivery",
    "Envelope",
    "InspectEnvelope",
    "caller_gone",
    "parse_request_info",
    "partition_moving",
    "request_envelope",
]

MAX_KEY_LENGTH: Final = 256
"""Longest ``Idempotency-Key`` accepted, in characters."""


class AlarmDelivery(msgspec.Struct):
    """One attempt at delivering an object's alarm."""

    due: float
    """Epoch seconds the alarm was set for."""
    attempt: int
    """1 on the first delivery, 2 on the first retry, ..."""


class _RequestInfo(msgspec.Struct):
    """The fields of the server's ``Nats-Request-Info`` header that ndo passes on."""

    acc: str = ""
    user: str = ""
    name: str = ""


_REQUEST_INFO: msgspec.json.Decoder[_RequestInfo] = msgspec.json.Decoder(_RequestInfo)


def parse_request_info(text: str | None) -> Caller | None:
    """The ``Caller`` in a ``Nats-Request-Info`` header; ``None`` when absent or unreadable."""
    if not text:
        return None
    try:
        info = _REQUEST_INFO.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return Caller(info.acc, info.user, info.name) if info.acc else None


class Envelope:
    """One message waiting in a mailbox: a request, or an alarm delivery."""

    __slots__ = (
        "alarm",
        "args",
        "caller",
        "chain",
        "deadline",
        "fingerprint",
        "idempotency_key",
        "msgpack",
        "received",
        "reply",
        "spec",
    )

    spec: MethodSpec | None
    """The method called (``None`` for an alarm delivery)."""
    args: msgspec.Struct | None
    """The decoded, validated arguments (``None`` for an alarm delivery)."""
    reply: str
    """Where the answer goes (empty: nobody waits for one)."""
    msgpack: bool
    """The request body, and so the reply, is MessagePack instead of JSON."""
    idempotency_key: str | None
    """The request's ``Idempotency-Key`` (or ``Nats-Msg-Id``)."""
    fingerprint: bytes | None
    """The call's ``call_fingerprint``, which the key is bound to; computed when the envelope
    is built (the handler may change its arguments in place), only for a request with a key."""
    alarm: AlarmDelivery | None
    """The delivery, for an alarm envelope."""
    caller: Caller | None
    """Who sent the request, when the deployment shares it (``WorkerConfig.caller_info``)."""
    chain: str
    """Objects waiting on this request (its ``Ndo-Call-Chain``; "" when none)."""
    deadline: float
    """``time.monotonic()`` by which the caller stops waiting (0.0: not said)."""
    received: float
    """``time.perf_counter()`` when the envelope was built (request latency starts here)."""

    def __init__(
        self,
        spec: MethodSpec | None,
        args: msgspec.Struct | None,
        reply: str,
        *,
        msgpack: bool = False,
        idempotency_key: str | None = None,
        alarm: AlarmDelivery | None = None,
        caller: Caller | None = None,
        chain: str = "",
        deadline: float = 0.0,
    ) -> None:
        """Create a request envelope (``spec`` and ``args``) or an alarm one (``alarm``)."""
        self.spec = spec
        self.args = args
        self.reply = reply
        self.msgpack = msgpack
        self.idempotency_key = idempotency_key
        self.fingerprint = (
            call_fingerprint(spec.name, args)
            if idempotency_key is not None and spec is not None and args is not None
            else None
        )
        self.alarm = alarm
        self.caller = caller
        self.chain = chain
        self.deadline = deadline
        self.received = time.perf_counter()

    @property
    def identity(self) -> str | None:
        """A name a re-run of this turn has too (``TurnInfo``): the request's Idempotency-Key,
        or the alarm's due time; ``None`` for a request without a key."""
        if self.alarm is not None:
            return f"alarm@{self.alarm.due!r}"
        return self.idempotency_key

    def expired(self, now: float) -> bool:
        """Whether the caller stopped waiting before ``now`` (``time.monotonic()``)."""
        return 0.0 < self.deadline <= now

    @property
    def method(self) -> str:
        """Method name for logs and metrics (``alarm`` for alarm deliveries)."""
        return "alarm" if self.spec is None else self.spec.name


class InspectEnvelope(Envelope):
    """An operator's ``ndo inspect import`` or ``delete`` of one object, waiting in its mailbox
    so that it is ordered with the object's turns (no user code runs for it)."""

    __slots__ = ("entries", "new_alarm", "operation", "replace")

    operation: str
    """``import`` or ``delete``."""
    entries: dict[str, bytes]
    """The object's keys and encoded values afterwards (empty for ``delete``)."""
    new_alarm: float | None
    """Its alarm afterwards (``None``: none)."""
    replace: bool
    """Overwrite an object that holds something (else: 409 ``object_exists``)."""

    def __init__(
        self,
        operation: str,
        body: bytes,
        reply: str,
        *,
        entries: dict[str, bytes],
        alarm: float | None,
        replace: bool,
        idempotency_key: str | None,
    ) -> None:
        """Describe the operation; ``body`` (the request as sent) binds its Idempotency-Key."""
        super().__init__(None, None, reply, idempotency_key=idempotency_key)
        self.operation = operation
        self.entries = entries
        self.new_alarm = alarm
        self.replace = replace
        if idempotency_key is not None:
            digest = hashlib.blake2b(f"inspect.{operation}".encode(), digest_size=16)
            digest.update(b"\x00" + body)
            self.fingerprint = digest.digest()

    @property
    def method(self) -> str:
        """``inspect.import`` or ``inspect.delete`` (for logs and the journal)."""
        return f"inspect.{self.operation}"


def request_envelope(
    spec: MethodSpec,
    body: bytes,
    headers: Mapping[str, str] | None,
    reply: str,
    *,
    target: ActorId,
    msgpack: bool,
    max_payload: int,
    caller_info: bool = False,
) -> Envelope:
    """The envelope of a request for object ``target``: its body checked and decoded,
    its headers read (Idempotency-Key, call chain and timeout, caller). Ingress and the test kit
    build every request envelope here, so they refuse the same requests.

    Raises:
        ActorError: 413 body too large; 400 bad arguments or headers; 409 a call cycle; 504 the
            caller already stopped waiting.
    """
    if len(body) > max_payload:
        raise PayloadTooLargeError(
            f"request body of {len(body)} bytes is over the {max_payload}-byte limit"
        )
    args = spec.decode_args(body, msgpack)
    key = None
    caller = None
    chain, deadline = "", 0.0
    if headers:
        key = headers.get(Header.IDEMPOTENCY_KEY.value) or headers.get(Header.NATS_MSG_ID.value)
        if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
            raise BadRequestError(
                f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters",
                type="invalid_idempotency_key",
            )
        if caller_info:
            caller = parse_request_info(headers.get(Header.REQUEST_INFO.value))
        chain, deadline = incoming_call(headers, f"{target.class_name}/{target.object_id}")
    return Envelope(
        spec,
        args,
        reply,
        msgpack=msgpack,
        idempotency_key=key,
        caller=caller,
        chain=chain,
        deadline=deadline,
    )


def partition_moving(partition: int, address: ActorId | None = None) -> UnavailableError:
    """The 503 for a message of a partition that is moving between workers (not run; the
    caller retries and reaches the new holder)."""
    of = "" if address is None else f" of {address.class_name}/{address.object_id}"
    return UnavailableError(
        f"partition {partition}{of} is moving between workers; retry shortly", type="moving"
    )


def caller_gone(envelope: Envelope) -> DeadlineExceededError:
    """The 504 for a request whose caller stopped waiting before its turn came (not run)."""
    return DeadlineExceededError(
        f"the caller of {envelope.method} stopped waiting (its Ndo-Timeout-Ms passed) before the "
        "call's turn came; it was not run",
        type="deadline_exceeded",
    )
