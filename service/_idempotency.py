"""Which idempotency keys one object has already applied, without a storage read per request.

Every committed reply is stored with its key in the same transaction as the write-set (storage
does that). This module keeps the object's recent keys in memory so that a fresh key — the
common case — is answered "not seen" without touching SQLite. Storage is read only for keys that
could have been committed before this activation began (or dropped from memory by the size cap),
and only until those have expired: the *horizon*.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

__all__ = ["IdempotencyCache"]

_P = TypeVar("_P")
MAX_REMEMBERED: Final = 50_000
"""Keys kept in memory per object; older ones are looked up in storage until they expire."""


class IdempotencyCache(Generic[_P]):
    """Seen keys of one object: stored reply bytes, or a pending turn ``_P`` not yet durable."""

    __slots__ = ("_horizon", "_loaded", "_seen", "_window")

    def __init__(self, window: float) -> None:
        """Create an empty cache for keys that live ``window`` seconds."""
        self._window = window
        self._seen: dict[str, tuple[float, bytes | _P]] = {}
        self._loaded = False
        self._horizon = 0.0
        """Until this time (epoch s), keys unknown here may still exist in storage."""

    async def lookup(
        self,
        key: str,
        horizon_reader: Callable[[], Awaitable[float | None]],
        stored_reader: Callable[[str], Awaitable[bytes | None]],
    ) -> bytes | _P | None:
        """Return the stored reply (or pending turn) for ``key``, or ``None`` if unseen."""
        now = time.time()
        if not self._loaded:
            self._horizon = (await horizon_reader()) or 0.0
            self._loaded = True
        entry = self._seen.get(key)
        if entry is not None:
            if entry[0] > now:
                return entry[1]
            del self._seen[key]
            return None
        if now < self._horizon:
            return await stored_reader(key)
        return None

    def remember(self, key: str, value: bytes | _P) -> None:
        """Record ``key`` as applied (or pending) with a fresh expiry."""
        now = time.time()
        self._seen.pop(key, None)
        self._seen[key] = (now + self._window, value)
        self._prune(now)

    def update(self, key: str, value: bytes, expected: _P) -> None:
        """Replace a pending entry by its durable reply, if it is still ``expected``."""
        entry = self._seen.get(key)
        if entry is not None and entry[1] is expected:
            self._seen[key] = (entry[0], value)

    def forget(self, key: str) -> None:
        """Drop ``key`` (its commit failed: it was not applied)."""
        self._seen.pop(key, None)

    def _prune(self, now: float) -> None:
        seen = self._seen
        while seen:
            oldest_key = next(iter(seen))
            expires, _ = seen[oldest_key]
            if expires > now and len(seen) <= MAX_REMEMBERED:
                return
            del seen[oldest_key]
            if expires > now:  # dropped while still valid: storage must be asked until then
                self._horizon = max(self._horizon, expires)
