"""``Outbox``: everything a worker publishes on behalf of objects — replies and their events.

One small object between the activations (and ingress) and the NATS connection, so that what
leaves the worker, and with which checks, is decided in one place.
"""

from __future__ import annotations

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient

from ndo.actors import Event
from ndo.service._metrics import WorkerMetrics

__all__ = ["Outbox"]

_log = structlog.get_logger("ndo.worker")


class Outbox:
    """Publishes replies and committed events; a lost connection is logged, never raised."""

    # Collaborators
    _metrics: WorkerMetrics
    _nc: NatsClient | None
    """The worker's connection; None before it connects and after it closes."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        """An outbox with no connection yet (``attach`` gives it one)."""
        self._metrics = metrics
        self._nc = None

    def attach(self, nc: NatsClient | None) -> None:
        """Publish through ``nc`` from now on (``None``: drop everything)."""
        self._nc = nc

    async def reply(self, subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        """Send a reply (or an error reply) to the requester's ``subject``."""
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
