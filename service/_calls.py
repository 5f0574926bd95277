"""``WorkerCalls``: how the objects of a worker call other objects, over NATS.

A call from a handler is an ordinary request on the target's subject, so it reaches the target
wherever it lives (this worker or another) exactly as a client's call would. What this adds is
the calling turn's part (``ndo.actors.runtime.outgoing_headers``: the call chain, the remaining
deadline, an Idempotency-Key derived from the turn) and the output gate: the request leaves only
once the calling object's earlier writes are durable.
"""

from __future__ import annotations

from typing import Final

from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, DeadlineExceededError, RetryPolicy
from ndo.actors.runtime import ActorContext, outgoing_headers
from ndo.service._catalog import Catalog
from ndo.service._metrics import WorkerMetrics
from ndo.subjects import parse_rpc_subject

__all__ = ["WorkerCalls"]

_RETRY: Final = RetryPolicy(attempts=1_000, initial_backoff=0.02, max_backoff=0.5)
"""Retries of a call between objects: as many as its deadline leaves room for."""


class WorkerCalls:
    """Sends the calls a worker's objects make (implements ``CallSender``)."""

    # Collaborators
    _client: ActorClient
    _catalog: Catalog
    _metrics: WorkerMetrics

    def __init__(
        self, nc: NatsClient, prefix: str, catalog: Catalog, metrics: WorkerMetrics
    ) -> None:
        """Send over the worker's connection ``nc``; find callers' activations in ``catalog``
        (their output gate)."""
        self._client = ActorClient(nc, prefix=prefix, retry=_RETRY)
        self._catalog = catalog
        self._metrics = metrics

    async def send(self, context: ActorContext, subject: str, body: bytes) -> bytes:
        """Send one call of the turn running in ``context``; retried (with the same key) on
        "no responders", timeouts and 503s until the turn's deadline.

        Raises:
            ActorError: the target failed the call, or the calling object was reset.
            DeadlineExceededError: no answer before the calling turn's deadline.
        """
        address = parse_rpc_subject(context.prefix, subject)
        outcome = "ok"
        try:
            headers = outgoing_headers(context, f"{address.class_name}/{address.object_id}")
            activation = self._catalog.get(context.id)
            if activation is not None:
                await activation.writes_durable()
            return await self._client.request(
                subject,
                body,
                headers=headers,
                deadline=context.deadline or None,
            )
        except DeadlineExceededError:
            outcome = "deadline_exceeded"
            raise
        except Exception as exc:
            outcome = getattr(exc, "type", type(exc).__name__)
            raise
        finally:
            metrics = self._metrics
            metrics.count(metrics.object_calls, context.id.class_name, address.class_name, outcome)
