"""What users import to write and call durable objects.

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
    await client.get(Counter, "a1").call(Counter.increment, by=2)
"""

from ndo.actors._actor import Actor, ActorContext, ActorId, AlarmInfo, Event
from ndo.actors._client import ActorClient, ActorStub, RetryPolicy
from ndo.actors._errors import (
    ActorError,
    BadRequestError,
    CallTimeoutError,
    ConflictError,
    DeadlineExceededError,
    HandlerError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    error_from_wire,
)
from ndo.actors._methods import ActorClassInfo, MethodSpec, describe_class, is_method, method
from ndo.actors._storage import ActorStorage, StateReader, StorageLimits, TurnWrites, prefix_range

__all__ = [
    "Actor",
    "ActorClassInfo",
    "ActorClient",
    "ActorContext",
    "ActorError",
    "ActorId",
    "ActorStorage",
    "ActorStub",
    "AlarmInfo",
    "BadRequestError",
    "CallTimeoutError",
    "ConflictError",
    "DeadlineExceededError",
    "Event",
    "HandlerError",
    "MethodSpec",
    "NotFoundError",
    "PayloadTooLargeError",
    "RetryPolicy",
    "StateReader",
    "StorageLimits",
    "TurnWrites",
    "UnavailableError",
    "describe_class",
    "error_from_wire",
    "is_method",
    "method",
    "prefix_range",
]
