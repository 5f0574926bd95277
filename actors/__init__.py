"""What object authors and callers use: the ``Actor`` base class, ``@method``, errors, the client.

Write an object::

    from ndo.actors import Actor, method

    class Counter(Actor):
        @method
        async def increment(self, by: int = 1) -> int:
            value = await self.storage.get("value", 0) + by
            self.storage.put("value", value)
            return value

Call it::

    client = ActorClient(nc)
    await client.get(Counter, "a1").increment(by=2)

The same names are re-exported by ``ndo`` itself. What the runtime needs to host objects
(class descriptions, the per-object context, write-sets) is in ``ndo.actors.runtime``.
"""

from ndo.actors._actor import Actor
from ndo.actors._client import ActorClient, RetryPolicy
from ndo.actors._context import ActorId, AlarmInfo, Caller, Event
from ndo.actors._errors import (
    ActorError,
    BadRequestError,
    CallTimeoutError,
    ConflictError,
    DeadlineExceededError,
    HandlerError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnavailableError,
)
from ndo.actors._marks import method
from ndo.actors._storage import ActorStorage
from ndo.actors._stub import ActorStub

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
    "method",
]
