"""Ready means ready: a starting worker holds the requests of the partitions it is taking up
instead of refusing them, and a worker restarted after a crash takes its dead predecessor's
partitions over at once instead of waiting out the lease TTL."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter as Tally
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, RetryPolicy, UnavailableError
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import Worker, WorkerConfig
from ndo.service._routing import server_mapping
from ndo.storage import SqliteStorage
from tests.conftest import NatsServerFactory
from tests.helpers import LockHolder, ServeProcess, eventually

PARTITIONS = 8


async def _flood(nc: NatsClient, stop: asyncio.Event, outcomes: Tally[str]) -> None:
    """Send batches of raw requests (as a client in any language would) until ``stop``, and
    tally how each ended: ``ok``, an error type, or ``no_responders`` (nobody subscribed yet)."""

    async def one(i: int) -> None:
        try:
            msg = await nc.request(f"ndo.rpc.Counter.c{i % 97}.get", b"", timeout=8)
        except nats.errors.NoRespondersError:
            outcomes["no_responders"] += 1
            return
        except nats.errors.TimeoutError:
            outcomes["timeout"] += 1
            return
        outcomes[(msg.headers or {}).get("Nats-Service-Error", "ok")] += 1

    pending: set[asyncio.Task[None]] = set()
    sent = 0
    while not stop.is_set() and sent < 20_000:
        for _ in range(20):
            task = asyncio.create_task(one(sent))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(0.005)
    if pending:
        await asyncio.wait(pending, timeout=15)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "forward"])
async def test_requests_during_start_are_answered_not_refused(
    make_nats_server: NatsServerFactory, tmp_path: Path, mapped: bool
) -> None:
    mappings = dict([server_mapping("ndo", PARTITIONS)]) if mapped else None
    server: EmbeddedNatsServer = await make_nats_server(mappings=mappings)
    nc = await nats.connect(server.url)
    outcomes: Tally[str] = Tally()
    stop = asyncio.Event()
    flood = asyncio.create_task(_flood(nc, stop, outcomes))
    await asyncio.sleep(0.1)  # requests are already flowing when the worker starts
    config = WorkerConfig(nats_url=server.url, data_dir=tmp_path / "d", partitions=PARTITIONS)
    try:
        async with Worker(config, [Counter]):
            await asyncio.sleep(0.3)
            stop.set()
            await flood
    finally:
        stop.set()
        await nc.close()
    answered = sum(n for kind, n in outcomes.items() if kind != "no_responders")
    assert outcomes["ok"] > 0, outcomes
    # Every request that reached the worker got its answer: none was refused as "moving"
    # while the worker took its partitions up, and none went unanswered.
    assert outcomes["ok"] == answered, outcomes


def _serve(url: str, data_dir: Path) -> ServeProcess:
    return ServeProcess(
        "--nats-url",
        url,
        "--data-dir",
        str(data_dir),
        "--partitions",
        str(PARTITIONS),
        "--lease-ttl",
        "60",
    )


async def test_restart_after_kill9_takes_over_without_waiting_for_the_lease_ttl(
    nats_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    """systemd restarts a crashed worker: the new one finds its predecessor's member record and
    leases (host, pid and start time say that process is gone) and serves every partition at
    once, although those leases would live another minute."""
    nc = await nats.connect(nats_server.url)
    client = ActorClient(nc, timeout=5.0, retry=RetryPolicy(attempts=1))
    try:
        with _serve(nats_server.url, tmp_path / "d") as first:
            record = await first.async_wait_serving()
            assert record["partitions"] == f"{PARTITIONS} of {PARTITIONS}"
            counter = client.get(Counter, "survivor")
            assert await counter.call(Counter.increment, by=5) == 5
            first.send_signal(signal.SIGKILL)
            await first.async_wait(timeout=10)
        with _serve(nats_server.url, tmp_path / "d") as second:
            # Without the takeover, start waits up to 2 x TTL + 1 s (121 s) for the old leases.
            record = await second.async_wait_serving(timeout=30)
            assert record["partitions"] == f"{PARTITIONS} of {PARTITIONS}", second.output
            assert second.events("a worker of this machine has ended"), second.output
            assert await counter.call(Counter.get) == 5
    finally:
        await nc.close()


class _StuckAfterOpen(SqliteStorage):
    """Real SQLite storage whose write lock another process takes right after it opened: the
    worker starts, but its partition claims (writes) wait for the lock."""

    holder: LockHolder | None = None

    async def open(self) -> None:
        await super().open()
        self.holder = await asyncio.to_thread(LockHolder.write_lock, self.path.parent)


async def test_a_request_held_too_long_gets_moving(nats_url: str, data_dir: Path) -> None:
    """A partition whose claim is stuck (its storage's write lock is held by a frozen process)
    holds its requests only ``_HOLD_FOR`` seconds, then answers 503 "moving"; once storage is
    back, the partition is taken up and served."""
    nc = await nats.connect(nats_url)
    client = ActorClient(nc, timeout=20.0, retry=RetryPolicy(attempts=1))
    config = WorkerConfig(nats_url=nats_url, data_dir=data_dir, partitions=PARTITIONS)
    storage = _StuckAfterOpen(data_dir / "ndo.sqlite3", partitions=PARTITIONS)
    worker = Worker(config, [Counter], storage=storage)
    starting = asyncio.create_task(worker.start())
    try:
        await eventually(lambda: storage.holder is not None and worker.routing_mode is not None)
        for _ in range(100):  # until the worker has subscribed (no responders before that)
            with pytest.raises(UnavailableError) as refused:
                await client.get(Counter, "stuck").call(Counter.increment)
            if refused.value.type != "no_responders":
                break
            await asyncio.sleep(0.05)
        assert refused.value.type == "moving", refused.value
        assert storage.holder is not None
        storage.holder.release()
        await starting
        await eventually(lambda: len(worker.partitions) == PARTITIONS, timeout=30)
        assert await client.get(Counter, "stuck").call(Counter.increment) == 1
    finally:
        if storage.holder is not None:
            storage.holder.release()
        await asyncio.gather(starting, return_exceptions=True)
        await worker.stop()
        await nc.close()
