"""Acknowledged writes survive the worker process dying: ``kill -9`` mid-stream, and SIGTERM with
calls in flight.

The worker runs as a real ``ndo serve`` child process against the test's nats-server, so only
the worker dies; the test's client and the server live on. Every call is tried once (no
retries), so each call's outcome is exact: a reply means applied, "no responders" or a 503 means
not applied, and only a timeout leaves it unknown. The data after a restart must account for
every acknowledged call and for nothing beyond the unknown ones.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, ActorError, CallTimeoutError, RetryPolicy
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from tests.helpers import ServeProcess
from tests.objects import Reminder

pytestmark = pytest.mark.slow

COUNTERS = [f"durable-{i}" for i in range(6)]
"""Counters incremented concurrently."""
CALLERS_PER_COUNTER = 4
"""Concurrent callers per counter, so several turns of one object are in flight at once."""
CALL_TIMEOUT = 1.0
"""Seconds a call waits for its reply before its outcome counts as unknown."""


@dataclass
class Outcomes:
    """What the callers learned about their increments, per counter."""

    acknowledged: dict[str, list[int]] = field(default_factory=lambda: {c: [] for c in COUNTERS})
    """The values replied to successful increments."""
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    """Increments that timed out (applied or not)."""
    refused: int = 0
    """Increments that definitely did not apply (no responders, 503)."""

    @property
    def total_acknowledged(self) -> int:
        """Successful increments over all counters."""
        return sum(len(v) for v in self.acknowledged.values())


async def _fire(client: ActorClient, outcomes: Outcomes, stop: asyncio.Event) -> None:
    """Increment every counter from several callers until ``stop`` is set."""

    async def caller(counter_id: str) -> None:
        stub = client.get(Counter, counter_id)
        while not stop.is_set():
            try:
                value = await stub.call(Counter.increment)
            except CallTimeoutError:
                outcomes.unknown[counter_id] += 1
            except ActorError:
                outcomes.refused += 1
                await asyncio.sleep(0.01)
            else:
                outcomes.acknowledged[counter_id].append(value)

    await asyncio.gather(*(caller(c) for c in COUNTERS for _ in range(CALLERS_PER_COUNTER)))


async def _final_values(nc: NatsClient) -> dict[str, int]:
    """Read every counter, retrying while the restarted worker takes over its partitions."""
    patient = ActorClient(
        nc, timeout=5.0, retry=RetryPolicy(attempts=20, initial_backoff=0.1, max_backoff=1.0)
    )
    return {c: await patient.get(Counter, c).call(Counter.get) for c in COUNTERS}


def _check(outcomes: Outcomes, final: dict[str, int]) -> None:
    """Every acknowledged increment is in the data; nothing beyond the unknown ones is."""
    for counter_id in COUNTERS:
        acked = outcomes.acknowledged[counter_id]
        assert len(set(acked)) == len(acked), f"{counter_id}: a value was acknowledged twice"
        assert final[counter_id] >= max(acked, default=0), (counter_id, final, max(acked))
        assert all(value <= final[counter_id] for value in acked)
        assert len(acked) <= final[counter_id] <= len(acked) + outcomes.unknown[counter_id], (
            counter_id,
            final[counter_id],
            len(acked),
            outcomes.unknown[counter_id],
        )


@pytest.fixture(name="worker_processes")
def _worker_processes() -> Iterator[list[ServeProcess]]:
    """Worker processes started by the test; any still running are killed afterwards."""
    processes: list[ServeProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            process.close()


ServeFactory = Callable[..., Awaitable[ServeProcess]]


@pytest.fixture(name="start_serve")
def _start_serve(
    nats_server: EmbeddedNatsServer, tmp_path: Path, worker_processes: list[ServeProcess]
) -> ServeFactory:
    """Factory: start ``ndo serve`` on the test's nats-server and data directory."""

    async def start(*modules: str) -> ServeProcess:
        process = ServeProcess(
            *modules, "--nats-url", nats_server.url, "--data-dir", str(tmp_path / "data")
        ).start()
        worker_processes.append(process)
        await process.async_wait_serving()
        return process

    return start


class TestKill9:
    """kill -9 of the worker mid-stream loses no acknowledged increment."""

    async def test_no_acknowledged_increment_lost(
        self, nc: NatsClient, start_serve: ServeFactory
    ) -> None:
        """Increments fire for ~1.2 s; the worker is killed mid-stream and restarted."""
        worker = await start_serve()
        client = ActorClient(nc, timeout=CALL_TIMEOUT, retry=RetryPolicy(attempts=1))
        outcomes, stop = Outcomes(), asyncio.Event()
        firing = asyncio.create_task(_fire(client, outcomes, stop))
        await asyncio.sleep(1.2)
        worker.send_signal(signal.SIGKILL)
        await worker.async_wait(10)
        acknowledged_at_kill = outcomes.total_acknowledged
        await asyncio.sleep(0.2)
        stop.set()
        async with asyncio.timeout(CALL_TIMEOUT + 5):
            await firing
        assert acknowledged_at_kill >= 50, "too few increments before the kill to prove anything"
        # Usually some calls time out (in flight at the kill), but under a loaded machine every
        # caller can happen to hold a reply or a refusal at that instant; _check covers both.
        await start_serve()
        _check(outcomes, await _final_values(nc))


class TestAlarmAfterKill9:
    """An acknowledged alarm survives kill -9; if it fell due meanwhile it fires after restart."""

    async def test_overdue_alarm_fires_once_after_restart(
        self, nc: NatsClient, start_serve: ServeFactory
    ) -> None:
        """Set an alarm 1 s ahead, kill -9 the worker at once, restart after it is due."""
        worker = await start_serve("tests.objects")
        client = ActorClient(nc, timeout=5.0, retry=RetryPolicy(attempts=20, max_backoff=0.5))
        reminder = client.get(Reminder, "after-kill")
        at = time.time() + 1.0
        await reminder.call(Reminder.schedule, at)
        worker.send_signal(signal.SIGKILL)
        await worker.async_wait(10)
        await asyncio.sleep(max(0.0, at - time.time()) + 0.3)
        await start_serve("tests.objects")
        fired: list[list[float]] = []
        async with asyncio.timeout(10):
            while not fired:
                await asyncio.sleep(0.05)
                fired = await reminder.call(Reminder.fired)
        assert fired == [[at, 1]]
        assert await reminder.call(Reminder.alarm_time) is None


class TestCleanShutdown:
    """SIGTERM with calls in flight: the worker drains, and what it acknowledged is durable."""

    async def test_sigterm_under_load(self, nc: NatsClient, start_serve: ServeFactory) -> None:
        """Every increment acknowledged before or during the shutdown is there after restart."""
        worker = await start_serve()
        client = ActorClient(nc, timeout=CALL_TIMEOUT, retry=RetryPolicy(attempts=1))
        outcomes, stop = Outcomes(), asyncio.Event()
        firing = asyncio.create_task(_fire(client, outcomes, stop))
        await asyncio.sleep(1.0)
        worker.send_signal(signal.SIGTERM)
        assert await worker.async_wait(15) == 0, worker.output
        stop.set()
        async with asyncio.timeout(CALL_TIMEOUT + 5):
            await firing
        assert outcomes.total_acknowledged >= 50
        await start_serve()
        _check(outcomes, await _final_values(nc))
