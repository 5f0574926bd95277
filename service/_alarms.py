"""The alarm scheduler: one timer per worker, driven by an index on due time.

It asks storage for alarms due now (an indexed range query, so objects without a due alarm cost
nothing), hands each to its object's mailbox, and sleeps until the next due time or until a
commit that set an alarm wakes it. A delivery whose handler fails is retried with exponential
backoff up to ``alarm_max_attempts``, then dropped with an error log and a metric. Alarms live
in storage until a successful alarm turn deletes them in its own commit, so they survive
restarts and kill -9 (at-least-once).

A delivery the worker refuses (the object's mailbox is full, the partition is not accepted right
now, for example while a late lease renewal settles) is not a failed attempt: it is offered
again after a short backoff (from 50 ms, doubling, at most 30 s), counted as
``ndo_alarms_total{outcome="deferred"}``, until it is taken or the partition moves away. An
alarm of a class this worker cannot run (``runs_class``) is parked instead, until a restart.
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
_REFUSED_BACKOFF: Final = 0.05
"""Seconds before a refused delivery is offered again (doubling per refusal, capped at
``_MAX_SLEEP``)."""


class AlarmScheduler:
    """Delivers due alarms of the partitions this worker owns."""

    # Collaborators
    _storage: Storage
    _config: WorkerConfig
    _metrics: WorkerMetrics
    _partitions: Callable[[], Collection[int]]
    _deliver: Callable[[StoredAlarm, AlarmDelivery], bool]
    _runs_class: Callable[[str], bool]
    # State
    _inflight: dict[ActorId, AlarmDelivery]
    _retries: list[tuple[float, int, StoredAlarm, AlarmDelivery]]
    _refusals: dict[ActorId, int]
    """Deliveries refused in a row, by object (for the backoff)."""
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
        runs_class: Callable[[str], bool],
    ) -> None:
        """Create a scheduler.

        Args:
            storage: where alarms are stored.
            config: retry settings.
            metrics: where to count outcomes.
            partitions: returns the partitions served now.
            deliver: enqueues one delivery on its object; False if it could not.
            runs_class: whether this worker runs alarms of a class (served, with ``alarm()``);
                a refused delivery of another class is parked, not offered again.
        """
        self._storage = storage
        self._config = config
        self._metrics = metrics
        self._partitions = partitions
        self._deliver = deliver
        self._runs_class = runs_class
        self._inflight = {}
        self._retries = []
        self._refusals = {}
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
                self._refusals.pop(address, None)
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
        self._refusals.pop(address, None)
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
        alarm = StoredAlarm(address.class_name, address.object_id, -1, delivery.due)
        self._park(alarm, retry, delay)
        self.notify()
        return False

    def _park(self, alarm: StoredAlarm, delivery: AlarmDelivery, delay: float) -> None:
        """Offer ``delivery`` again in ``delay`` seconds."""
        self._sequence += 1
        heapq.heappush(self._retries, (time.time() + delay, self._sequence, alarm, delivery))

    def _offer(self, alarm: StoredAlarm, delivery: AlarmDelivery) -> None:
        """Hand a delivery to its object; a refused one is offered again after a backoff (it
        stays in ``_inflight`` meanwhile, so storage queries skip it)."""
        address = ActorId(alarm.class_name, alarm.object_id)
        if self._deliver(alarm, delivery):
            self._refusals.pop(address, None)
            return
        if not self._runs_class(alarm.class_name):
            return  # parked in _inflight: a restart with the class served picks it up
        refusals = self._refusals[address] = self._refusals.get(address, 0) + 1
        self._metrics.alarms.labels(alarm.class_name, "deferred").inc()
        self._park(alarm, delivery, min(_MAX_SLEEP, _REFUSED_BACKOFF * 2 ** (refusals - 1)))

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
            self._offer(alarm, delivery)
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
            self._offer(alarm, delivery)
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
