"""``self.storage``: an object's key-value view, with its cache and the current turn's write-set.

Reads look at the turn's own writes first, then the object's cache (committed values and the
values of earlier turns whose commit may still be in flight), then durable storage. Writes only
touch the turn's write-set; ``end_turn`` hands it to the runtime and folds it into the cache,
``abort_turn`` throws it away. Values are kept encoded (MessagePack), so a value a handler got
and mutated without ``put`` never leaks into the cache.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec

from ndo.actors._errors import BadRequestError, PayloadTooLargeError

__all__ = [
    "ALARM_UNCHANGED",
    "ActorStorage",
    "StateReader",
    "StorageLimits",
    "TurnWrites",
    "prefix_range",
]

_T = TypeVar("_T")
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder()
_UNKNOWN: Final = object()
ALARM_UNCHANGED: Final = -1.0
"""``TurnWrites.alarm`` when the turn left the alarm as it was."""


class StateReader(Protocol):
    """The reads ``ActorStorage`` needs from durable storage (``storage.Storage`` provides them)."""

    async def read(self, class_name: str, object_id: str, key: str) -> bytes | None: ...

    async def read_many(
        self, class_name: str, object_id: str, keys: Sequence[str]
    ) -> dict[str, bytes]: ...

    async def read_range(
        self,
        class_name: str,
        object_id: str,
        *,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]: ...

    async def read_alarm(self, class_name: str, object_id: str) -> float | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageLimits:
    """Size limits enforced on every storage call (violations raise inside the handler)."""

    max_key_bytes: int = 2048
    """Longest key, in UTF-8 bytes."""
    max_value_bytes: int = 128 * 1024
    """Largest encoded value, in bytes."""
    max_keys_per_call: int = 128
    """Most keys in one ``get_many`` / ``put_many``."""


@dataclass(slots=True)
class TurnWrites:
    """What one turn changed, ready for the commit."""

    writes: dict[str, bytes | None]
    cleared: bool
    alarm: float | None
    """New alarm time, ``None`` to delete, or ``ALARM_UNCHANGED``."""

    def is_empty(self) -> bool:
        """Tell whether the turn changed nothing durable."""
        return not self.writes and not self.cleared and self.alarm == ALARM_UNCHANGED


def prefix_range(prefix: str) -> tuple[str, str | None]:
    """Return ``(start, end)`` such that ``start <= key < end`` exactly when key starts with
    ``prefix`` (``end`` is ``None`` when no finite bound exists)."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            # The next code point after U+D7FF that UTF-8 (and so SQLite) accepts is U+E000.
            following = 0xE000 if 0xD7FF <= last < 0xE000 else last + 1
            return prefix, "".join(chars[:-1]) + chr(following)
        chars.pop()
    return prefix, None


class ActorStorage:
    """Transactional key-value storage of one object, as seen by its handlers (``self.storage``).

    Every change a handler makes is part of its turn: committed atomically after the handler
    returns, discarded if it raises. Reads always see the turn's own writes.

    Which calls are awaited: those that only change the turn's write-set are plain calls
    (``put``, ``put_many``, ``delete``, ``delete_many``, ``delete_all``); those that may read
    storage (``get``, ``get_many``, ``list``, ``get_alarm``) and every alarm call
    (``set_alarm``, ``delete_alarm``) are coroutines.
    """

    __slots__ = (
        "_alarm",
        "_alarm_write",
        "_cache",
        "_class_name",
        "_cleared",
        "_complete",
        "_limits",
        "_object_id",
        "_reader",
        "_writes",
    )

    # Identity and collaborators
    _reader: StateReader
    _class_name: str
    _object_id: str
    _limits: StorageLimits
    # Committed-or-pending state
    _cache: dict[str, bytes | None]
    _complete: bool
    _alarm: object
    # This turn
    _writes: dict[str, bytes | None]
    _cleared: bool
    _alarm_write: float | None

    def __init__(
        self, reader: StateReader, class_name: str, object_id: str, limits: StorageLimits
    ) -> None:
        """Create the view of object ``(class_name, object_id)`` reading through ``reader``."""
        self._reader = reader
        self._class_name = class_name
        self._object_id = object_id
        self._limits = limits
        self._cache = {}
        self._complete = False
        self._alarm = _UNKNOWN
        self._writes = {}
        self._cleared = False
        self._alarm_write = ALARM_UNCHANGED

    # Reads

    def _known(self, key: str) -> tuple[bool, bytes | None]:
        if key in self._writes:
            return True, self._writes[key]
        if self._cleared:
            return True, None
        if key in self._cache:
            return True, self._cache[key]
        if self._complete:
            return True, None
        return False, None

    async def get(self, key: str, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` when it is absent."""
        self._check_key(key)
        known, raw = self._known(key)
        if not known:
            raw = await self._reader.read(self._class_name, self._object_id, key)
            self._cache[key] = raw
        return default if raw is None else _DECODER.decode(raw)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return ``{key: value}`` for those of ``keys`` that exist."""
        wanted = list(keys)
        self._check_count(wanted)
        found: dict[str, Any] = {}
        missing: list[str] = []
        for key in wanted:
            self._check_key(key)
            known, raw = self._known(key)
            if not known:
                missing.append(key)
            elif raw is not None:
                found[key] = raw
        if missing:
            loaded = await self._reader.read_many(self._class_name, self._object_id, missing)
            for key in missing:
                raw = loaded.get(key)
                self._cache[key] = raw
                if raw is not None:
                    found[key] = raw
        return {k: _DECODER.decode(found[k]) for k in wanted if k in found}

    async def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """Return keys and values in key order (``start`` inclusive, ``end`` exclusive).

        Args:
            prefix: only keys starting with this string.
            start: smallest key to include.
            end: first key past the range (excluded).
            limit: at most this many entries.
            reverse: from the highest key down.
        """
        if limit is not None and limit < 0:
            raise BadRequestError(f"list limit must be >= 0, got {limit}")
        lo, hi = start, end
        if prefix is not None:
            p_lo, p_hi = prefix_range(prefix)
            lo = p_lo if lo is None else max(lo, p_lo)
            if p_hi is not None:
                hi = p_hi if hi is None else min(hi, p_hi)
        if (lo is not None and hi is not None and lo >= hi) or limit == 0:
            return {}

        def in_range(key: str) -> bool:
            return (lo is None or key >= lo) and (hi is None or key < hi)

        # Overlay = everything we know newer than (or equal to) the durable state.
        overlay: dict[str, bytes | None] = {}
        if not self._cleared:
            overlay.update((k, v) for k, v in self._cache.items() if in_range(k))
        overlay.update((k, v) for k, v in self._writes.items() if in_range(k))
        merged: dict[str, bytes] = {}
        if not (self._complete or self._cleared):
            absent = sum(1 for v in overlay.values() if v is None)
            rows = await self._reader.read_range(
                self._class_name,
                self._object_id,
                start=lo,
                end=hi,
                limit=None if limit is None else limit + absent,
                reverse=reverse,
            )
            for key, raw in rows:
                self._cache.setdefault(key, raw)
                merged[key] = raw
        for key, newer in overlay.items():
            if newer is None:
                merged.pop(key, None)
            else:
                merged[key] = newer
        ordered = sorted(merged, reverse=reverse)
        if limit is not None:
            ordered = ordered[:limit]
        return {k: _DECODER.decode(merged[k]) for k in ordered}

    # Writes (buffered until the turn ends)

    def put(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (anything msgspec can encode) as part of this turn."""
        self._check_key(key)
        self._writes[key] = self._encode(key, value)

    def put_many(self, entries: Mapping[str, Any]) -> None:
        """Set several keys at once as part of this turn."""
        self._check_count(entries)
        encoded = {}
        for key, value in entries.items():
            self._check_key(key)
            encoded[key] = self._encode(key, value)
        self._writes.update(encoded)

    def delete(self, key: str) -> None:
        """Delete ``key`` as part of this turn (no error if absent)."""
        self._check_key(key)
        self._writes[key] = None

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several keys as part of this turn."""
        wanted = list(keys)
        self._check_count(wanted)
        for key in wanted:
            self.delete(key)

    def delete_all(self) -> None:
        """Delete every key of this object as part of this turn (the alarm is kept)."""
        self._writes.clear()
        self._cleared = True

    # Alarm

    async def get_alarm(self) -> float | None:
        """Return the alarm time (epoch seconds) this object has set, or ``None``."""
        if self._alarm_write != ALARM_UNCHANGED:
            return self._alarm_write
        if self._alarm is _UNKNOWN:
            self._alarm = await self._reader.read_alarm(self._class_name, self._object_id)
        return self._alarm  # type: ignore[return-value]

    async def set_alarm(self, when: dt.datetime | float) -> None:
        """Schedule ``alarm()`` at ``when`` (an aware datetime or epoch seconds), replacing any
        earlier alarm. Committed with this turn."""
        if isinstance(when, dt.datetime):
            if when.tzinfo is None:
                raise BadRequestError(
                    "set_alarm needs a timezone-aware datetime (e.g. datetime.now(timezone.utc))"
                )
            when = when.timestamp()
        if not isinstance(when, (int, float)) or when != when or when < 0:
            raise BadRequestError(f"alarm time must be epoch seconds >= 0, got {when!r}")
        self._alarm_write = float(when)

    async def delete_alarm(self) -> None:
        """Cancel this object's alarm, if any. Committed with this turn."""
        self._alarm_write = None

    # Turn boundary (called by the runtime)

    def end_turn(self) -> TurnWrites:
        """Take this turn's changes and fold them into the cache (the turn succeeded)."""
        if self._cleared:
            self._cache = {}
            self._complete = True  # every later read is answered from memory
        self._cache.update(self._writes)
        if self._alarm_write != ALARM_UNCHANGED:
            self._alarm = self._alarm_write
        changes = TurnWrites(self._writes, self._cleared, self._alarm_write)
        self._writes = {}
        self._cleared = False
        self._alarm_write = ALARM_UNCHANGED
        return changes

    def abort_turn(self) -> None:
        """Discard this turn's changes (the handler failed)."""
        self._writes = {}
        self._cleared = False
        self._alarm_write = ALARM_UNCHANGED

    def alarm_fired(self, due: float) -> None:
        """Forget the alarm that was due at ``due`` (the runtime deletes it with this turn)."""
        if self._alarm_write == ALARM_UNCHANGED:
            self._alarm_write = None

    # Validation

    def _check_key(self, key: str) -> None:
        if not isinstance(key, str):
            raise BadRequestError(f"storage keys must be str, got {type(key).__name__}")
        if key.isascii():
            size = len(key)
        else:
            try:
                size = len(key.encode("utf-8"))
            except UnicodeEncodeError:
                raise BadRequestError(
                    f"storage key {key!r} is not valid Unicode text (it holds a lone surrogate)",
                    type="invalid_key",
                ) from None
        if size > self._limits.max_key_bytes:
            raise PayloadTooLargeError(
                f"storage key of {size} bytes is over the {self._limits.max_key_bytes}-byte limit",
                type="key_too_large",
            )

    def _check_count(self, keys: Sized) -> None:
        if len(keys) > self._limits.max_keys_per_call:
            raise BadRequestError(
                f"{len(keys)} keys in one call is over the limit of "
                f"{self._limits.max_keys_per_call}; split the call",
                type="too_many_keys",
            )

    def _encode(self, key: str, value: Any) -> bytes:
        try:
            raw = _ENCODER.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise BadRequestError(
                f"value for key {key!r} cannot be stored: {exc}", type="unencodable_value"
            ) from None
        if len(raw) > self._limits.max_value_bytes:
            raise PayloadTooLargeError(
                f"value for key {key!r} is {len(raw)} bytes encoded, over the "
                f"{self._limits.max_value_bytes}-byte limit",
                type="value_too_large",
            )
        return raw
