"""The example objects `ndo serve` runs by default: a counter, a rate limiter, a chat room, a
collaborative drawing board, accounts that pay each other and a session that expires. Each is
also a small lesson in writing durable objects.

Objects anyone may call bound their own inputs: the chat room and the drawing board check every
user name, message and stroke (sizes, characters, coordinates) and refuse the rest with a
``BadRequestError`` that says what is allowed, so no caller can make them store more than a
known amount per call. Numbers, colours and coordinates are bounded in the argument types
(checked before the handler runs); names, messages and point counts are checked in code, with
messages that state the rule.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Final

import msgspec

from ndo import Actor, AlarmInfo, BadRequestError, ConflictError, method

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


class Counter(Actor):
    """A durable counter: every acknowledged increment survives a crash."""

    @method
    async def increment(self, by: int = 1) -> int:
        """Add ``by`` and return the new value."""
        value: int = await self.storage.get("value", 0) + by
        self.storage.put("value", value)
        return value

    @method
    async def get(self) -> int:
        """Return the current value."""
        value: int = await self.storage.get("value", 0)
        return value

    @method
    async def reset(self) -> None:
        """Set the value back to zero."""
        self.storage.delete("value")


class RateDecision(msgspec.Struct, frozen=True):
    """Whether an action may happen now, and if not, when to try again."""

    allowed: bool
    retry_after: float
    """Seconds until the next action will be allowed (0 when allowed)."""


class RateLimiter(Actor):
    """The classic per-key limiter (a token bucket): an initial burst of ``BURST`` actions, then
    one more every ``COOLDOWN`` seconds. Use one object per key (user, IP, API token)."""

    BURST: ClassVar[int] = 5
    """Actions allowed back to back from a full bucket."""
    COOLDOWN: ClassVar[float] = 1.0
    """Seconds for one action's allowance to come back."""

    @method
    async def check(self) -> RateDecision:
        """Consume one action if allowed; say when to retry if not."""
        now = self.now()
        tokens: float = await self.storage.get("tokens", float(self.BURST))
        updated: float = await self.storage.get("updated", now)
        tokens = min(float(self.BURST), tokens + (now - updated) / self.COOLDOWN)
        if tokens >= 1.0:
            self.storage.put_many({"tokens": tokens - 1.0, "updated": now})
            return RateDecision(allowed=True, retry_after=0.0)
        self.storage.put_many({"tokens": tokens, "updated": now})
        return RateDecision(allowed=False, retry_after=round((1.0 - tokens) * self.COOLDOWN, 3))


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a chat room."""

    seq: int
    user: str
    text: str
    time: float


_MAX_USER: Final = 32
"""Longest user name, in characters."""
_MAX_TEXT: Final = 4000
"""Longest chat message, in characters."""
_USER_PUNCTUATION: Final = frozenset(" ._-")
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]


def _check_user(user: str, *, required: bool = True) -> str:
    """Return ``user`` if it is a valid user name: 1-32 letters, digits, spaces, ``.``, ``_``
    or ``-``, not starting or ending with a space (empty allowed when not ``required``).

    Raises:
        BadRequestError: ``invalid_user`` (the message says the rule).
    """
    if not user and not required:
        return user
    if (
        not 0 < len(user) <= _MAX_USER
        or user != user.strip()
        or not all(c.isalnum() or c in _USER_PUNCTUATION for c in user)
    ):
        raise BadRequestError(
            f"user name {user[: _MAX_USER + 8]!r} is not allowed: use 1-{_MAX_USER} letters, "
            "digits, spaces, '.', '_' or '-', not starting or ending with a space",
            type="invalid_user",
        )
    return user


class ChatRoom(Actor):
    """A chat room that keeps its latest ``KEEP`` messages and emits each post as a
    ``message`` event on ``ndo.evt.ChatRoom.<id>.message``."""

    KEEP: ClassVar[int] = 100
    """Messages kept; older ones are deleted as new ones arrive."""

    @method
    async def post(self, user: str, text: str) -> ChatMessage:
        """Append a message and return it with its sequence number."""
        _check_user(user)
        if not 0 < len(text) <= _MAX_TEXT or not text.strip():
            raise BadRequestError(
                f"a message must hold 1-{_MAX_TEXT} characters, not only spaces; got "
                f"{len(text)} characters",
                type="invalid_text",
            )
        seq: int = await self.storage.get("seq", 0) + 1
        message = ChatMessage(seq=seq, user=user, text=text, time=self.now())
        self.storage.put_many({"seq": seq, _message_key(seq): message})
        if seq > self.KEEP:
            self.storage.delete(_message_key(seq - self.KEEP))
        self.emit("message", message)
        return message

    @method
    async def history(self, limit: Limit = 50) -> list[ChatMessage]:
        """Return up to ``limit`` latest messages, oldest first."""
        latest = await self.storage.list(prefix="msg:", limit=limit, reverse=True)
        return [msgspec.convert(v, ChatMessage) for v in reversed(latest.values())]


def _message_key(seq: int) -> str:
    return f"msg:{seq:012d}"


_MAX_COORDINATE: Final = 10_000.0
"""Largest coordinate of a stroke's point (either sign): far outside any canvas, finite."""
Coordinate = Annotated[float, msgspec.Meta(ge=-_MAX_COORDINATE, le=_MAX_COORDINATE)]
Point = tuple[Coordinate, Coordinate]
Color = Annotated[str, msgspec.Meta(pattern=r"^#[0-9a-fA-F]{6}$")]
Width = Annotated[float, msgspec.Meta(gt=0, le=100)]


class Stroke(msgspec.Struct, frozen=True):
    """One stroke on a drawing board."""

    seq: int
    points: list[Point]
    color: str
    width: float
    user: str


class DrawingBoard(Actor):
    """A shared canvas: keeps the latest ``KEEP`` strokes, emits ``stroke`` and ``clear`` events
    so every viewer can draw along live."""

    KEEP: ClassVar[int] = 1000
    """Strokes kept; older ones are deleted as new ones arrive."""
    MAX_POINTS: ClassVar[int] = 2000
    """Most points in one stroke."""

    @method
    async def stroke(
        self, points: list[Point], color: Color = "#000000", width: Width = 2.0, user: str = ""
    ) -> int:
        """Add a stroke and return its sequence number.

        Args:
            points: 1-2000 ``[x, y]`` points, each coordinate within +-10000.
            color: ``#rrggbb``.
            width: line width, over 0 and at most 100.
            user: who drew it (a user name, or empty).
        """
        if not points or len(points) > self.MAX_POINTS:
            raise BadRequestError(
                f"a stroke needs 1-{self.MAX_POINTS} points, got {len(points)}",
                type="invalid_arguments",
            )
        _check_user(user, required=False)
        seq: int = await self.storage.get("seq", 0) + 1
        stroke = Stroke(seq=seq, points=points, color=color, width=width, user=user)
        self.storage.put_many({"seq": seq, _stroke_key(seq): stroke})
        if seq > self.KEEP:
            self.storage.delete(_stroke_key(seq - self.KEEP))
        self.emit("stroke", stroke)
        return seq

    @method
    async def strokes(self, since: int = 0, limit: Limit = 1000) -> list[Stroke]:
        """Return up to ``limit`` strokes with a sequence number above ``since``, oldest first."""
        found = await self.storage.list(start=_stroke_key(since + 1), end="s;", limit=limit)
        return [msgspec.convert(v, Stroke) for v in found.values()]

    @method
    async def clear(self) -> None:
        """Erase the board (the sequence keeps counting)."""
        seq: int = await self.storage.get("seq", 0)
        self.storage.delete_all()
        self.storage.put("seq", seq)
        self.emit("clear", {"seq": seq})


def _stroke_key(seq: int) -> str:
    return f"s:{seq:012d}"


Amount = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]
"""A positive amount of money, in cents."""


class Account(Actor):
    """A balance that can pay another account: a call from one object to another.

    ``pay`` deposits into the other account (``self.call(Account, to).deposit(...)``) and then
    lowers this balance, which commits after the handler returns. If the worker dies in between,
    the caller's retry (same Idempotency-Key: ``ActorClient`` retries that way) runs ``pay``
    again, and its deposit carries the same key derived from this turn, so it is answered from
    memory rather than paid twice. Callers that give up before an answer can leave a deposit
    made without its withdrawal: retry until answered.
    """

    @method
    async def deposit(self, amount: Amount) -> int:
        """Add ``amount`` and return the new balance."""
        balance: int = await self.storage.get("balance", 0) + amount
        self.storage.put("balance", balance)
        return balance

    @method
    async def balance(self) -> int:
        """Return the balance."""
        balance: int = await self.storage.get("balance", 0)
        return balance

    @method
    async def pay(self, to: str, amount: Amount) -> int:
        """Move ``amount`` to account ``to``; return this account's new balance.

        Raises:
            BadRequestError: ``to`` is this account.
            ConflictError: ``insufficient_funds``: the balance is lower than ``amount``.
        """
        if to == self.id.object_id:
            raise BadRequestError("an account cannot pay itself", type="invalid_payee")
        balance: int = await self.storage.get("balance", 0)
        if amount > balance:
            raise ConflictError(
                f"balance {balance} is lower than {amount}", type="insufficient_funds"
            )
        await self.call(Account, to).deposit(amount=amount)
        self.storage.put("balance", balance - amount)
        return balance - amount


SessionData = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
        Annotated[str, msgspec.Meta(max_length=1000)],
    ],
    msgspec.Meta(max_length=32),
]
"""At most 32 entries, keys of 1-64 characters, values of at most 1000."""


class Session(Actor):
    """A session that forgets its data after ``IDLE`` seconds without a call (sliding expiry):
    each call moves the object's alarm to ``IDLE`` seconds from now; when it fires, the data is
    deleted and an ``expired`` event emitted. Time comes from ``self.now()``, so a test's fake
    clock (``ndo.testing``) decides when that is."""

    IDLE: ClassVar[float] = 1800.0
    """Seconds without a call after which the session expires."""

    @method
    async def save(self, data: SessionData) -> float:
        """Replace the session's data; return when it expires (epoch seconds)."""
        self.storage.put("data", data)
        return await self._extend()

    @method
    async def load(self) -> dict[str, str]:
        """Return the session's data (empty once expired) and move its expiry back."""
        data: dict[str, str] = await self.storage.get("data", {})
        if data:
            await self._extend()
        return data

    async def alarm(self, info: AlarmInfo) -> None:
        """Idle for ``IDLE`` seconds: forget everything, and say so."""
        self.storage.delete_all()
        self.emit("expired", {"at": info.scheduled_time})

    async def _extend(self) -> float:
        expires = self.now() + self.IDLE
        await self.storage.set_alarm(expires)
        return expires
