"""ndo — NATS Durable Objects: stateful actors over NATS, persisted in SQLite.

What object authors and callers import::

    from ndo import Actor, ActorClient, method

    class Counter(Actor):
        @method
        async def increment(self, by: int = 1) -> int:
            value = await self.storage.get("value", 0) + by
            self.storage.put("value", value)
            return value

    client = ActorClient(nc)
    await client.get(Counter, "a1").call(Counter.increment, by=2)

Everything else lives in the subpackages: ``ndo.actors`` (the programming model and the client),
``ndo.subjects`` (the wire protocol's subjects and ids), ``ndo.storage`` (SQLite and in-memory
storage), ``ndo.service`` (the worker runtime) and ``ndo.ops`` (the ``ndo`` command, the embedded
nats-server). ``docs/architecture.md`` maps them.
"""

from ndo.actors import (
    Actor,
    ActorClient,
    ActorError,
    ActorId,
    ActorStorage,
    ActorStub,
    AlarmInfo,
    BadRequestError,
    Caller,
    CallTimeoutError,
    ConflictError,
    DeadlineExceededError,
    Event,
    HandlerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RetryPolicy,
    UnavailableError,
    method,
)
from ndo.subjects import id_from_name, new_unique_id

__all__ = [
    "Actor",
    "ActorClient",
    "ActorError",
    "ActorId",
    "ActorStorage",
    "ActorStub",
    "AlarmInfo",
    "BadRequestError",
    "CallTimeoutError",
    "Caller",
    "ConflictError",
    "DeadlineExceededError",
    "Event",
    "HandlerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RetryPolicy",
    "UnavailableError",
    "id_from_name",
    "method",
    "new_unique_id",
]
