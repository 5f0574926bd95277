"""Alarms: durable, delivered through the mailbox, retried with backoff, indexed by due time."""

from __future__ import annotations

import asyncio
import time

from ndo.actors import ActorClient
from ndo.service import Worker
from tests.objects import Reminder
from tests.worker_fixtures import WorkerFactory


async def _wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


class TestAlarms:
    """An alarm set in a turn fires once, after its commit, at its time."""

    async def test_fires_once_on_time(self, worker: Worker, client: ActorClient) -> None:
        """The alarm runs once, not before its time, and is then gone."""
        reminder = client.get(Reminder, "r1")
        at = time.time() + 0.3
        await reminder.call(Reminder.schedule, at)
        assert await reminder.call(Reminder.alarm_time) == at
        fired = await _wait_for(lambda: reminder.call(Reminder.fired))
        assert fired == [[at, 1]]
        assert time.time() >= at
        await asyncio.sleep(0.3)
        assert await reminder.call(Reminder.fired) == [[at, 1]]
        assert await reminder.call(Reminder.alarm_time) is None

    async def test_reschedule_and_delete(self, worker: Worker, client: ActorClient) -> None:
        """A rescheduled alarm fires at the new time only; a deleted one never fires."""
        moved = client.get(Reminder, "moved")
        first = time.time() + 0.2
        await moved.call(Reminder.schedule, first)
        second = time.time() + 0.5
        await moved.call(Reminder.schedule, second)
        cancelled = client.get(Reminder, "cancelled")
        await cancelled.call(Reminder.schedule, time.time() + 0.2)
        await cancelled.call(Reminder.cancel)
        fired = await _wait_for(lambda: moved.call(Reminder.fired))
        assert fired == [[second, 1]]
        await asyncio.sleep(0.3)
        assert await cancelled.call(Reminder.fired) == []

    async def test_retries_then_succeeds(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """A failing alarm is retried with backoff and tells the handler it is a retry."""
        await start_worker(alarm_initial_backoff=0.05)
        reminder = client.get(Reminder, "flaky")
        at = time.time()
        await reminder.call(Reminder.schedule, at, fail_times=2)
        fired = await _wait_for(lambda: reminder.call(Reminder.fired))
        assert fired == [[at, 3]]

    async def test_gives_up_after_max_attempts(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """After alarm_max_attempts failures the alarm is dropped and deleted."""
        worker = await start_worker(alarm_initial_backoff=0.02, alarm_max_attempts=3)
        reminder = client.get(Reminder, "doomed")
        await reminder.call(Reminder.schedule, time.time(), fail_times=10)

        async def dropped() -> bool:
            sample = worker.metrics.alarms.labels("Reminder", "dropped")._value.get()
            return sample >= 1

        await _wait_for(dropped)
        assert await _wait_for(lambda: _is_none(reminder.call(Reminder.alarm_time)))
        assert await reminder.call(Reminder.fired) == []

    async def test_survives_restart_and_fires_when_overdue(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """An alarm due while no worker ran fires right after the next start."""
        first = await start_worker()
        reminder = client.get(Reminder, "persistent")
        at = time.time() + 0.3
        await reminder.call(Reminder.schedule, at)
        await first.stop()
        await asyncio.sleep(0.5)  # due while down
        await start_worker()
        fired = await _wait_for(lambda: reminder.call(Reminder.fired))
        assert fired == [[at, 1]]

    async def test_many_alarms_no_per_object_scan(
        self, worker: Worker, client: ActorClient
    ) -> None:
        """Scheduling work is a few indexed queries per wake-up, not one per object."""
        far = time.time() + 3600
        await asyncio.gather(
            *(client.get(Reminder, f"idle{i}").call(Reminder.schedule, far) for i in range(200))
        )
        soon = time.time() + 0.3
        await asyncio.gather(
            *(client.get(Reminder, f"due{i}").call(Reminder.schedule, soon) for i in range(5))
        )
        queries_before = worker.alarms.queries
        for i in range(5):
            await _wait_for(lambda i=i: client.get(Reminder, f"due{i}").call(Reminder.fired))
        # 205 objects with alarms, a handful of wake-ups: queries stay far below the object count.
        assert worker.alarms.queries - queries_before < 60


async def _is_none(awaitable) -> bool:
    return (await awaitable) is None
