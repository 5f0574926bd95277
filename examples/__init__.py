"""Example durable objects, served by ``ndo serve`` when no module is given."""

from ndo.examples.objects import (
    Account,
    ChatMessage,
    ChatRoom,
    Counter,
    DrawingBoard,
    RateDecision,
    RateLimiter,
    Session,
    Stroke,
)

__all__ = [
    "Account",
    "ChatMessage",
    "ChatRoom",
    "Counter",
    "DrawingBoard",
    "RateDecision",
    "RateLimiter",
    "Session",
    "Stroke",
]
