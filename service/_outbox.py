"""``Outbox``: everything a worker publishes on behalf of callers and objects — replies and
their events — and the one check on where a reply may go.

One small object between the activations (and ingress) and the NATS connection, so that what
leaves the worker, and with which checks, is decided in one place. A reply subject is the
caller's choice and publishing to it is a write with the worker's rights, so replies go only to
inbox subjects (``subjects.is_reply_subject``); a request naming anything else is dropped, counted
in ``ndo_rejected_total{reason="reply_subject"}`` and logged (at most once per reason every
``_WARN_EVERY`` seconds, so a flood cannot flood the log too).
"""

from __future__ import annotations

import time
from typing import Final

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient

from ndo.actors import Event
from ndo.service._metrics import WorkerMetrics
from ndo.subjects import DEFAULT_REPLY_PREFIXES, is_reply_subject

__all__ = ["Outbox"]

_log = structlog.get_logger("ndo.worker")

_WARN_EVERY: Final = 10.0
"""Seconds between two warnings about rejected messages of one reason."""

_SHOWN_SUBJECT: Final = 200
"""Characters of a hostile subject quoted in a warning."""


class Outbox:
    """Publishes replies and committed events; a lost connection is logged, never raised."""

    # Configuration
    _reply_prefixes: tuple[str, ...]
    # Collaborators
    _metrics: WorkerMetrics
    _nc: NatsClient | None
    """The worker's connection; None before it connects and after it closes."""
    # State
    _warned: dict[str, tuple[float, int]]
    """By rejection reason: when it was last logged, and rejections since then."""

    def __init__(
        self, metrics: WorkerMetrics, *, reply_prefixes: tuple[str, ...] = DEFAULT_REPLY_PREFIXES
    ) -> None:
        """An outbox with no connection yet (``attach`` gives it one) that answers only reply
        subjects under ``reply_prefixes``."""
        self._metrics = metrics
        self._reply_prefixes = reply_prefixes
        self._nc = None
        self._warned = {}

    def attach(self, nc: NatsClient | None) -> None:
        """Publish through ``nc`` from now on (``None``: drop everything)."""
        self._nc = nc

    def may_answer(self, reply: str, *, request: str = "") -> bool:
        """Whether an answer may go to ``reply`` (the reply subject of a message on
        ``request``); if not, the refusal is counted and logged (rate-limited)."""
        if is_reply_subject(reply, self._reply_prefixes):
            return True
        self.reject(
            "reply_subject",
            subject=request,
            reply=reply,
            allowed_reply_prefixes=",".join(self._reply_prefixes),
        )
        return False

    def reject(self, reason: str, **fields: str) -> None:
        """Count a message dropped for ``reason`` and warn about it, at most once per reason
        every ``_WARN_EVERY`` seconds (the warning says how many were dropped since)."""
        self._metrics.count(self._metrics.rejected, reason)
        now = time.monotonic()
        last, since = self._warned.get(reason, (-_WARN_EVERY, 0))
        if now - last < _WARN_EVERY:
            self._warned[reason] = (last, since + 1)
            return
        self._warned[reason] = (now, 0)
        shown = {name: value[:_SHOWN_SUBJECT] for name, value in fields.items()}
        _log.warning(
            "message dropped",
            reason=reason,
            dropped_since_last_warning=since,
            **shown,
        )

    async def reply(self, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        """Send a reply (or an error reply) to the requester's ``subject``, which the entry
        point that took the request (ingress, discovery) checked with ``may_answer``."""
        nc = self._nc
        if nc is None:
            return
        try:
            await nc.publish(subject, body, headers=headers)
        except nats.errors.Error as exc:
            _log.warning("reply not sent", error=str(exc))

    async def events(self, class_name: str, events: list[Event]) -> None:
        """Publish a committed turn's events, in the order the handler emitted them."""
        nc = self._nc
        if nc is None:
            return
        for event in events:
            try:
                await nc.publish(event.subject, event.data)
            except nats.errors.Error as exc:
                _log.warning("event not published", subject=event.subject, error=str(exc))
        self._metrics.count(self._metrics.events, class_name, amount=len(events))
