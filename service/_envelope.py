"""One message for one object: a request (method and decoded arguments) or an alarm delivery.

A leaf module of its own because three others read it and none of them should import another
for it: ingress builds envelopes, the turn engine runs them, the journal records them.
"""

from __future__ import annotations

import time

import msgspec

from ndo.actors import Caller
from ndo.actors.runtime import MethodSpec
from ndo.service._idempotency import call_fingerprint

__all__ = ["AlarmDelivery", "Envelope", "parse_request_info"]


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
        self.received = time.perf_counter()

    @property
    def method(self) -> str:
        """Method name for logs and metrics (``alarm`` for alarm deliveries)."""
        return "alarm" if self.spec is None else self.spec.name
