"""What a test reads from the harness (``ndo.testing``): its ``FakeClock`` and the records of
what the objects did (``EmittedEvent``, ``AlarmRun``).

Apart from the harness (``ops/_kit.py``) because they are plain values a test asserts on,
with no runtime behind them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from ndo.actors import ActorError, ActorId

__all__ = ["AlarmRun", "EmittedEvent", "FakeClock", "check_time"]


class FakeClock:
    """Epoch seconds that move only when a test moves them: ``clock()`` reads the time.

    A harness gives it to its objects (``Actor.now()``, ``set_alarm``'s checks). Moving it by
    itself fires nothing: ``ObjectHarness.advance`` moves it and delivers the alarms due.
    """

    __slots__ = ("_now",)

    _now: float

    def __init__(self, start: float | None = None) -> None:
        """Start at ``start`` epoch seconds (default: the real time now)."""
        self._now = time.time() if start is None else check_time(start, "start")

    def __call__(self) -> float:
        """Epoch seconds now, on this clock."""
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` (>= 0) forward and return the new time."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"advance by a finite number of seconds >= 0, got {seconds!r}")
        self._now += seconds
        return self._now

    def set(self, when: float) -> None:
        """Set the time to ``when`` epoch seconds (backwards too)."""
        self._now = check_time(when, "when")


def check_time(value: float, name: str) -> float:
    """``value`` as epoch seconds, checked: finite and >= 0 (``name`` for the message)."""
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite epoch seconds >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class EmittedEvent:
    """An event a committed turn emitted (a worker would have published it)."""

    address: ActorId
    """The object that emitted it."""
    topic: str
    """Its topic (the subject's last token)."""
    data: Any
    """The payload decoded as JSON (what ``emit`` was given, as plain data: a Struct becomes a
    dict); the raw bytes when they are not JSON."""
    payload: bytes
    """The payload as published."""
    subject: str
    """``<prefix>.evt.<Class>.<id>.<topic>``."""


@dataclass(frozen=True, slots=True)
class AlarmRun:
    """One alarm delivery the harness made (``fire_alarm``, ``advance``)."""

    address: ActorId
    """The object whose ``alarm()`` ran."""
    due: float
    """Epoch seconds the alarm was set for."""
    attempt: int
    """1 on the first delivery, 2 on the first retry, ..."""
    at: float
    """The fake clock's time when it ran."""
    error: ActorError | None = None
    """Why it failed (its writes and events were discarded); ``None`` when it succeeded."""
    dropped: bool = False
    """It failed for the ``alarm_max_attempts``-th time, so the alarm was deleted."""

    @property
    def ok(self) -> bool:
        """The delivery succeeded (its turn committed)."""
        return self.error is None
