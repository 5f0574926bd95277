"""One message for one object: a request (method and decoded arguments) or an alarm delivery.

A leaf module of its own because three others read it and none of them should import another
for it: ingress builds envelopes, the turn engine runs them, the journal records them.
"""

from __future__ import annotations

import time

import msgspec

from ndo.actors.runtime import MethodSpec

__all__ = ["AlarmDelivery", "Envelope"]


class AlarmDelivery(msgspec.Struct):
    """One attempt at delivering an object's alarm."""

    due: float
    """Epoch seconds the alarm was set for."""
    attempt: int
    """1 on the first delivery, 2 on the first retry, ..."""


class Envelope:
    """One message waiting in a mailbox: a request, or an alarm delivery."""

    __slots__ = ("alarm", "args", "idempotency_key", "msgpack", "received", "reply", "spec")

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
    alarm: AlarmDelivery | None
    """The delivery, for an alarm envelope."""
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
    ) -> None:
        """Create a request envelope (``spec`` and ``args``) or an alarm one (``alarm``)."""
        self.spec = spec
        self.args = args
        self.reply = reply
        self.msgpack = msgpack
        self.idempotency_key = idempotency_key
        self.alarm = alarm
        self.received = time.perf_counter()

    @property
    def method(self) -> str:
        """Method name for logs and metrics (``alarm`` for alarm deliveries)."""
        return "alarm" if self.spec is None else self.spec.name
