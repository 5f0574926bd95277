"""``self.storage``: an object's key-value view, with its cache and the current turn's write-set.

Reads look at the turn's own writes first, then the object's cache (committed values and the
values of earlier turns whose commit may still be in flight), then durable storage. Writes only
touch the turn's write-set; ``end_turn`` hands it to the runtime and folds it into the cache,
``abort_turn`` throws it away. Values are kept encoded (MessagePack), so a value a handler got
and mutated without ``put`` never leaks into the cache.

Sizes are checked here too: each call's key and value (``StorageLimits``), a turn's total writes
as it makes them, and the object's stored size once the handler returns (``check_quota``: the
size is read from storage once per activation and then kept up to date turn by turn).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec

from ndo.actors._errors import BadRequestError, PayloadTooLargeError

__all__ = [
    "ALARM_REARM_DELAY",
    "ALARM_UNCHANGED",
    "WRITE_FRAMING",
    "ActorStorage",
    "StateReader",
    "StorageLimits",
    "TurnWrites",
    "check_quota",
    "prefix_range",
]

_T = TypeVar("_T")
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder()
_UNKNOWN: Final = object()
ALARM_UNCHANGED: Final = -1.0
"""``TurnWrites.alarm`` when the turn left the alarm as it was."""
ALARM_REARM_DELAY: Final = 1.0
"""Seconds: inside ``alarm()``, ``set_alarm`` with a time earlier than now + this is moved to
now + this, so a handler that re-arms its alarm in the past runs at most about once a second
instead of spinning the worker."""
WRITE_FRAMING: Final = 10
"""Bytes each key a turn writes or deletes adds to the turn's write size on top of its key and
value: the most its MessagePack headers take in the write-set (so a turn under
``max_turn_bytes`` fits a record of that size)."""
_MAX_ALARM_AHEAD: Final = 100 * 365.25 * 86400.0
"""Seconds: an alarm further in the future is refused (epoch milliseconds passed as seconds)."""


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

    async def object_size(self, class_name: str, object_id: str) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageLimits:
    """Size limits enforced on every storage call (violations raise inside the handler)."""

    max_key_bytes: int = 2048
    """Longest key, in UTF-8 bytes."""
    max_value_bytes: int = 128 * 1024
    """Largest encoded value, in bytes."""
    max_keys_per_call: int = 128
    """Most keys in one ``get_many`` / ``put_many``."""
    max_turn_bytes: int = 32 * 1024 * 1024
    """Most bytes one turn may write: each key it puts or deletes counts its UTF-8 bytes, its
    encoded value and ``WRITE_FRAMING``; 0: no limit."""
    max_object_bytes: int = 1024 * 1024 * 1024
    """Most bytes one object may store (the UTF-8 bytes of its keys plus their encoded values);
    a turn that would grow it past this fails, one that shrinks it never does. 0: no limit."""


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
        "_clock",
        "_complete",
        "_in_alarm",
        "_limits",
        "_next_size",
        "_object_id",
        "_reader",
        "_size",
        "_turn_bytes",
        "_writes",
    )

    # Identity and collaborators
    _reader: StateReader
    _class_name: str
    _object_id: str
    _limits: StorageLimits
    _clock: Callable[[], float]
    """Epoch seconds now (``set_alarm``'s checks)."""
    # Committed-or-pending state
    _cache: dict[str, bytes | None]
    _complete: bool
    _alarm: object
    _size: int
    """Stored size of the object, pending turns included (``check_quota``); -1: not known."""
    # This turn
    _writes: dict[str, bytes | None]
    _cleared: bool
    _alarm_write: float | None
    _turn_bytes: int
    """Write size of ``_writes`` (keys, values and ``WRITE_FRAMING`` each)."""
    _next_size: int
    """The object's size once this turn is applied, as ``check_quota`` found it; -1: not checked."""
    _in_alarm: bool
    """This turn delivers the alarm (``alarm_fired`` was called)."""

    def __init__(
        self,
        reader: StateReader,
        class_name: str,
        object_id: str,
        limits: StorageLimits,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the view of object ``(class_name, object_id)`` reading through ``reader``;
        ``clock`` tells epoch seconds now (a test kit's fake clock)."""
        self._reader = reader
        self._class_name = class_name
        self._object_id = object_id
        self._limits = limits
        self._clock = clock
        self._cache = {}
        self._complete = False
        self._alarm = _UNKNOWN
        self._size = -1
        self._writes = {}
        self._cleared = False
        self._alarm_write = ALARM_UNCHANGED
        self._turn_bytes = 0
        self._next_size = -1
        self._in_alarm = False

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
        size = self._check_key(key)
        raw = self._encode(key, value)
        writes = self._writes
        if key in writes:  # _growth, inlined: put is the hot path
            earlier = writes[key]
            total = self._turn_bytes + len(raw) - (0 if earlier is None else len(earlier))
        else:
            total = self._turn_bytes + size + len(raw) + WRITE_FRAMING
        limit = self._limits.max_turn_bytes
        if total > limit and limit:
            self._grow_turn(total - self._turn_bytes)  # raises
        self._turn_bytes = total
        writes[key] = raw

    def put_many(self, entries: Mapping[str, Any]) -> None:
        """Set several keys at once as part of this turn."""
        self._check_count(entries)
        encoded = {}
        growth = 0
        for key, value in entries.items():
            size = self._check_key(key)
            raw = encoded[key] = self._encode(key, value)
            growth += self._growth(key, size, raw)
        self._grow_turn(growth)
        self._writes.update(encoded)

    def delete(self, key: str) -> None:
        """Delete ``key`` as part of this turn (no error if absent)."""
        size = self._check_key(key)
        self._grow_turn(self._growth(key, size, None))
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
        self._turn_bytes = 0
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
        earlier alarm. Committed with this turn.

        A time in the past fires at once, except inside ``alarm()`` itself: there a time
        earlier than now + ``ALARM_REARM_DELAY`` (1 s) is moved to now + 1 s, so an alarm that
        re-arms itself in the past cannot keep the worker busy.

        Raises:
            BadRequestError: ``invalid_alarm_time``: not a finite number of seconds >= 0 (a
                ``bool`` included), a naive datetime, or more than 100 years ahead (epoch
                milliseconds, such as ``time.time() * 1000``, passed as seconds).
        """
        if isinstance(when, dt.datetime):
            if when.tzinfo is None:
                raise BadRequestError(
                    "set_alarm needs a timezone-aware datetime (e.g. datetime.now(timezone.utc))",
                    type="invalid_alarm_time",
                )
            when = when.timestamp()
        if (
            isinstance(when, bool)
            or not isinstance(when, (int, float))
            or not math.isfinite(when)
            or when < 0
        ):
            raise BadRequestError(
                f"alarm time must be a finite number of epoch seconds >= 0 (or an aware "
                f"datetime), got {when!r}",
                type="invalid_alarm_time",
            )
        now = self._clock()
        if when > now + _MAX_ALARM_AHEAD:
            raise BadRequestError(
                f"alarm time {when!r} is more than 100 years from now: it looks like "
                "milliseconds (time.time() * 1000); pass epoch seconds, e.g. time.time() + 60",
                type="invalid_alarm_time",
            )
        if self._in_alarm and when < now + ALARM_REARM_DELAY:
            when = now + ALARM_REARM_DELAY
        self._alarm_write = float(when)

    async def delete_alarm(self) -> None:
        """Cancel this object's alarm, if any. Committed with this turn."""
        self._alarm_write = None

    # Turn boundary (called by the runtime)

    def changed(self) -> bool:
        """Whether this turn changed anything durable so far (keys or the alarm)."""
        return bool(self._writes) or self._cleared or self._alarm_write != ALARM_UNCHANGED

    def quota_due(self) -> bool:
        """Whether ``check_quota(self)`` has anything to check: a quota is set and this turn changed
        keys (the turn engine asks after every handler, so this stays cheap)."""
        return (self._cleared or bool(self._writes)) and self._limits.max_object_bytes > 0

    def count_stored_reply(self, size: int) -> None:
        """Count ``size`` bytes of reply the runtime stores with this turn's writes (under its
        Idempotency-Key) in the turn's write size.

        Raises:
            PayloadTooLargeError: ``turn_too_large``.
        """
        self._grow_turn(size, " with the reply remembered for its Idempotency-Key")

    def end_turn(self) -> TurnWrites:
        """Take this turn's changes and fold them into the cache (the turn succeeded)."""
        if self._cleared:
            self._cache = {}
            self._complete = True  # every later read is answered from memory
        if self._next_size >= 0:
            self._size = self._next_size
        elif self._size >= 0 and (self._writes or self._cleared):
            self._size = -1  # changed without check_quota: read the size again when needed
        self._cache.update(self._writes)
        if self._alarm_write != ALARM_UNCHANGED:
            self._alarm = self._alarm_write
        changes = TurnWrites(self._writes, self._cleared, self._alarm_write)
        self._writes = {}
        self._cleared = False
        self._alarm_write = ALARM_UNCHANGED
        self._turn_bytes = 0
        self._next_size = -1
        self._in_alarm = False
        return changes

    def replace_all(self, entries: Mapping[str, bytes], alarm: float | None) -> TurnWrites:
        """Runtime (``ndo inspect``'s import and delete, between turns): the object's whole
        state becomes ``entries`` (encoded values) and ``alarm`` (``None``: none), as a turn of
        its own; its changes are returned as ``end_turn`` returns them."""
        self.abort_turn()
        self._writes = dict(entries)
        self._cleared = True
        self._alarm_write = alarm
        return self.end_turn()

    def abort_turn(self) -> None:
        """Discard this turn's changes (the handler failed)."""
        self._writes = {}
        self._cleared = False
        self._alarm_write = ALARM_UNCHANGED
        self._turn_bytes = 0
        self._next_size = -1
        self._in_alarm = False

    def alarm_fired(self, due: float) -> None:
        """Forget the alarm that was due at ``due`` (the runtime deletes it with this turn);
        this turn delivers the alarm (see ``set_alarm`` on re-arming)."""
        self._in_alarm = True
        if self._alarm_write == ALARM_UNCHANGED:
            self._alarm_write = None

    # Size accounting

    def _growth(self, key: str, key_size: int, raw: bytes | None) -> int:
        """How much the turn's write size grows when it writes ``raw`` (``None``: a delete) to
        ``key`` of ``key_size`` bytes, replacing its own earlier write of the key if any."""
        value = 0 if raw is None else len(raw)
        writes = self._writes
        if key in writes:
            earlier = writes[key]
            return value - (0 if earlier is None else len(earlier))
        return key_size + value + WRITE_FRAMING

    def _grow_turn(self, growth: int, what: str = "") -> None:
        total = self._turn_bytes + growth
        limit = self._limits.max_turn_bytes
        if limit and total > limit:
            raise PayloadTooLargeError(
                f"this call writes {total} bytes{what} (keys, values and {WRITE_FRAMING} bytes "
                f"per key), over the {limit}-byte limit per call (--max-turn-bytes; with "
                "--storage replicated also the NATS server's max_payload); write less per call "
                "(spread the work over several calls), or raise the limit",
                type="turn_too_large",
            )
        self._turn_bytes = total

    # Validation

    def _check_key(self, key: str) -> int:
        """Check ``key`` and return its size in UTF-8 bytes."""
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
        return size

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
        except (TypeError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
            # OverflowError: an integer MessagePack cannot hold (over 64 bits); RecursionError:
            # a value nested too deeply to encode.
            raise BadRequestError(
                f"value for key {key!r} cannot be stored: {exc or type(exc).__name__}",
                type="unencodable_value",
            ) from None
        if len(raw) > self._limits.max_value_bytes:
            raise PayloadTooLargeError(
                f"value for key {key!r} is {len(raw)} bytes encoded, over the "
                f"{self._limits.max_value_bytes}-byte limit",
                type="value_too_large",
            )
        return raw


def _entry_size(key: str, raw: bytes | None) -> int:
    """Bytes ``key`` holding ``raw`` adds to an object's size (0 when ``raw`` is ``None``)."""
    if raw is None:
        return 0
    return (len(key) if key.isascii() else len(key.encode("utf-8"))) + len(raw)


async def check_quota(storage: ActorStorage) -> None:
    """Refuse the turn ``storage`` holds if it grows the object past ``max_object_bytes`` (the
    runtime calls it after the handler returns, when ``storage.quota_due()``; a function, not a
    method, so that what handlers await on ``self.storage`` stays reads and alarms).

    The object's size is read from storage at its first writing turn (before it, no write of
    this object can be in flight) and kept up to date from then on; the old values of keys
    this turn writes that are not cached are read in one call.

    Raises:
        PayloadTooLargeError: ``object_too_large``; the turn must be aborted.
    """
    limit = storage._limits.max_object_bytes
    if storage._size < 0:
        storage._size = await storage._reader.object_size(storage._class_name, storage._object_id)
    before = storage._size
    writes = storage._writes
    if storage._cleared:
        after = sum(_entry_size(k, v) for k, v in writes.items())
    else:
        cache = storage._cache
        if not storage._complete:
            missing = [k for k in writes if k not in cache]
            if missing:
                loaded = await storage._reader.read_many(
                    storage._class_name, storage._object_id, missing
                )
                for key in missing:
                    cache[key] = loaded.get(key)
        after = before
        for key, raw in writes.items():
            after += _entry_size(key, raw) - _entry_size(key, cache.get(key))
    if after > limit and after > before:
        raise PayloadTooLargeError(
            f"this call would make {storage._class_name} {storage._object_id!r} store {after} "
            f"bytes (keys and values), over the {limit}-byte limit per object "
            "(--max-object-bytes); nothing was written. Delete keys it no longer needs "
            "(a call that shrinks it always succeeds), or raise --max-object-bytes",
            type="object_too_large",
        )
    storage._next_size = after
