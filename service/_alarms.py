"""The alarm scheduler: one timer per worker, driven by an index on due time.

It asks storage for alarms due now (an indexed range query, so objects without a due alarm cost
nothing), hands each to its object's mailbox, and sleeps until the next due time or until a
commit that set an alarm wakes it. A delivery whose handler fails is retried with exponential
backoff up to ``alarm_max_attempts``, then dropped with an error log and a metric. Alarms live
in storage until a successful alarm turn deletes them in its own commit, so they survive
restarts and kill -9 (at-least-once).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Collection
from typing import Final

import structlog

from ndo.actors import ActorId
from ndo.service._config import WorkerConfig
from ndo.service._envelope import AlarmDelivery
from ndo.service._metrics import WorkerMetrics
from ndo.storage import Storage, StorageError, StoredAlarm
from ndo.subjects import partition_of

__all__ = ["AlarmScheduler"]

_log = structlog.get_logger("ndo.alarms")
_BATCH: Final = 256
_MAX_SLEEP: Final = 30.0
"""Longest sleep between checks (bounds the delay for alarms written by another process)."""


class AlarmScheduler:
    """Delivers due alarms of the partitions this worker owns."""

    # Collaborators
    _storage: Storage
    _config: WorkerConfig
    _metrics: WorkerMetrics
    _partitions: Callable[[], Collection[int]]
    _deliver: Callable[[StoredAlarm, AlarmDelivery], bool]
    # State
    _inflight: dict[ActorId, AlarmDelivery]
    _retries: list[tuple[float, int, StoredAlarm, AlarmDelivery]]
    _wakeup: asyncio.Event
    _next_wake: float
    """Epoch seconds of the next planned check."""
    _sequence: int
    queries: int
    """Storage queries run so far (tests check that idle objects cost none)."""

    def __init__(
        self,
        storage: Storage,
        config: WorkerConfig,
        metrics: WorkerMetrics,
        *,
        partitions: Callable[[], Collection[int]],
        deliver: Callable[[StoredAlarm, AlarmDelivery], bool],
    ) -> None:
        """Create a scheduler.

        Args:
            storage: where alarms are stored.
            config: retry settings.
            metrics: where to count outcomes.
            partitions: returns the partitions served now.
            deliver: enqueues one delivery on its object; False if it could not.
        """
        self._storage = storage
        self._config = config
        self._metrics = metrics
        self._partitions = partitions
        self._deliver = deliver
        self._inflight = {}
        self._retries = []
        self._wakeup = asyncio.Event()
        self._next_wake = 0.0
        self._sequence = 0
        self.queries = 0

    @property
    def inflight(self) -> int:
        """Deliveries queued or running."""
        return len(self._inflight)

    def notify(self) -> None:
        """Re-check storage soon (an alarm was set or a delivery finished)."""
        self._wakeup.set()

    def partitions_changed(self) -> None:
        """The served partitions changed: forget deliveries parked for partitions no longer
        served (their new owner delivers them) and look at storage again."""
        keep = set(self._partitions())
        count = self._config.partitions
        for address in list(self._inflight):
            if partition_of(address.class_name, address.object_id, count) not in keep:
                del self._inflight[address]
        self._retries = [
            r for r in self._retries if partition_of(r[2].class_name, r[2].object_id, count) in keep
        ]
        heapq.heapify(self._retries)
        self._next_wake = 0.0
        self._wakeup.set()

    def notify_due(self, due: float) -> None:
        """An alarm due at ``due`` was committed: wake up if that is before the next check."""
        if due < self._next_wake:
            self._wakeup.set()

    def done(self, address: ActorId, delivery: AlarmDelivery, error: BaseException | None) -> bool:
        """Record how a delivery ended. Returns True when the alarm is given up for good (the
        caller then deletes it)."""
        if error is None:
            self._inflight.pop(address, None)
            self._metrics.alarms.labels(address.class_name, "ok").inc()
            self.notify()
            return False
        if delivery.attempt >= self._config.alarm_max_attempts:
            self._inflight.pop(address, None)
            self._metrics.alarms.labels(address.class_name, "dropped").inc()
            _log.error(
                "alarm dropped after failing every attempt",
                class_name=address.class_name,
                object_id=address.object_id,
                attempts=delivery.attempt,
                error=str(error),
            )
            return True
        self._metrics.alarms.labels(address.class_name, "retry").inc()
        delay = self._config.alarm_initial_backoff * 2 ** (delivery.attempt - 1)
        retry = AlarmDelivery(delivery.due, delivery.attempt + 1)
        self._inflight[address] = retry
        self._sequence += 1
        alarm = StoredAlarm(address.class_name, address.object_id, -1, delivery.due)
        heapq.heappush(self._retries, (time.time() + delay, self._sequence, alarm, retry))
        self.notify()
        return False

    async def run(self) -> None:
        """Deliver alarms until cancelled."""
        while True:
            try:
                sleep = await self._tick()
            except StorageError as exc:
                _log.warning("alarm check failed; retrying", error=str(exc))
                sleep = 1.0
            if sleep > 0:
                try:
                    async with asyncio.timeout(sleep):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
            self._wakeup.clear()

    async def _tick(self) -> float:
        """Deliver what is due; return seconds until the next check."""
        self._next_wake = math.inf  # any alarm committed while we look wakes us again
        now = time.time()
        while self._retries and self._retries[0][0] <= now:
            _, _, alarm, delivery = heapq.heappop(self._retries)
            self._deliver(alarm, delivery)  # if it cannot be delivered it stays parked
        partitions = self._partitions()
        if not partitions:
            self._next_wake = now + _MAX_SLEEP
            return _MAX_SLEEP  # nothing served: partitions_changed() wakes us
        self.queries += 1
        due = await self._storage.due_alarms(partitions, now, _BATCH + len(self._inflight))
        fresh = 0
        for alarm in due:
            address = ActorId(alarm.class_name, alarm.object_id)
            if address in self._inflight:
                continue
            delivery = AlarmDelivery(alarm.due, 1)
            self._inflight[address] = delivery
            fresh += 1
            # Undeliverable (class not served here): stays parked in _inflight, not retried
            # on every tick; a restart with the class served picks it up.
            self._deliver(alarm, delivery)
        if fresh >= _BATCH:
            self._next_wake = now
            return 0.0  # more are due: go again at once
        self.queries += 1
        upcoming = await self._storage.next_alarm_time(partitions, after=now)
        wake = now + _MAX_SLEEP
        if upcoming is not None:
            wake = min(wake, upcoming)
        if self._retries:
            wake = min(wake, self._retries[0][0])
        self._next_wake = wake
        return max(0.0, wake - time.time())
