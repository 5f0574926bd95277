"""Which idempotency keys one object has already applied, without a storage read per request,
and which call each key was first used for.

Every committed reply is stored with its key in the same transaction as the write-set (storage
does that). This module keeps the object's recent keys in memory so that a fresh key — the
common case — is answered "not seen" without touching SQLite. Storage is read only for keys that
could have been committed before this activation began (or dropped from memory by the size
caps), and only until those have expired: the *horizon*.

A key is bound to its call: the reply is remembered with the call's fingerprint
(``call_fingerprint``), and the same key with another method or other arguments is refused
instead of answered with the first call's reply.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

import msgspec

from ndo.actors import ConflictError

__all__ = [
    "MAX_REMEMBERED",
    "MAX_REMEMBERED_BYTES",
    "IdempotencyCache",
    "call_fingerprint",
    "key_reused",
]

_P = TypeVar("_P")
MAX_REMEMBERED: Final = 50_000
"""Keys kept in memory per object; older ones are looked up in storage until they expire."""
MAX_REMEMBERED_BYTES: Final = 4 * 1024 * 1024
"""Bytes of remembered replies kept in memory per object; older ones are looked up in storage
until they expire (a reply still waiting for its commit is never dropped for its size)."""

_ENCODINGS: Final = (
    (b"m", msgspec.msgpack.Encoder(order="deterministic")),
    (b"p", msgspec.msgpack.Encoder()),
    (b"j", msgspec.json.Encoder(order="deterministic")),
)
"""How a call's arguments are hashed, first that works: MessagePack with maps in key order (the
same whatever the request's encoding or key order); as sent when a map has keys that are not
strings (only MessagePack requests have those); JSON for integers over 64 bits (only JSON
requests have those)."""


def call_fingerprint(method: str, args: msgspec.Struct) -> bytes:
    """A 16-byte hash of a call: its method and decoded arguments.

    The same call sent as JSON or as MessagePack, with its maps' keys in any order, or with an
    optional argument left out instead of given its default, has the same fingerprint.
    Arguments no encoding can hold (none a request can carry) hash as the method alone.
    """
    digest = hashlib.blake2b(method.encode(), digest_size=16)
    digest.update(b"\x00")
    for tag, encoder in _ENCODINGS:
        try:
            encoded = encoder.encode(args)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            continue
        digest.update(tag)
        digest.update(encoded)
        break
    return digest.digest()


class IdempotencyCache(Generic[_P]):
    """Seen keys of one object: stored reply bytes, or a pending turn ``_P`` not yet durable."""

    __slots__ = ("_bytes", "_horizon", "_loaded", "_seen", "_window")

    def __init__(self, window: float) -> None:
        """Create an empty cache for keys that live ``window`` seconds."""
        self._window = window
        self._seen: dict[str, tuple[float, bytes | _P]] = {}
        self._bytes = 0
        """Total length of the stored replies in ``_seen`` (pending turns count 0)."""
        self._loaded = False
        self._horizon = 0.0
        """Until this time (epoch s), keys unknown here may still exist in storage."""

    @property
    def remembered_bytes(self) -> int:
        """Bytes of stored replies held in memory."""
        return self._bytes

    def __len__(self) -> int:
        """Keys held in memory."""
        return len(self._seen)

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
            self._drop(key)
            return None
        if now < self._horizon:
            return await stored_reader(key)
        return None

    def remember(self, key: str, value: bytes | _P) -> None:
        """Record ``key`` as applied (or pending) with a fresh expiry."""
        now = time.time()
        self._drop(key)
        self._seen[key] = (now + self._window, value)
        if isinstance(value, bytes):
            self._bytes += len(value)
        self._prune(now)

    def update(self, key: str, value: bytes, expected: _P) -> None:
        """Replace a pending entry by its durable reply, if it is still ``expected``."""
        entry = self._seen.get(key)
        if entry is not None and entry[1] is expected:
            self._seen[key] = (entry[0], value)
            self._bytes += len(value)
            self._prune(time.time())

    def forget(self, key: str) -> None:
        """Drop ``key`` (its commit failed: it was not applied)."""
        self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._seen.pop(key, None)
        if entry is not None and isinstance(entry[1], bytes):
            self._bytes -= len(entry[1])

    def _prune(self, now: float) -> None:
        """Drop expired keys, then the oldest while over ``MAX_REMEMBERED`` keys or over
        ``MAX_REMEMBERED_BYTES`` (keys are in the order they were remembered)."""
        seen = self._seen
        while seen:
            oldest_key = next(iter(seen))
            expires, value = seen[oldest_key]
            within_caps = len(seen) <= MAX_REMEMBERED and (
                self._bytes <= MAX_REMEMBERED_BYTES or not isinstance(value, bytes)
            )
            if expires > now and within_caps:
                return
            self._drop(oldest_key)
            if expires > now:  # dropped while still valid: storage must be asked until then
                self._horizon = max(self._horizon, expires)


def key_reused(key: str, window: float) -> ConflictError:
    """The 409 for an Idempotency-Key first used, within ``window`` seconds, for another call."""
    return ConflictError(
        f"Idempotency-Key {key!r} was first used for another call of this object (another "
        f"method or other arguments) in the last {window:g} s; use a fresh key for each "
        "logical call, and the same key only to retry that exact call",
        type="idempotency_key_reused",
    )
