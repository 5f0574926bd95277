"""Fencing: a worker that lost its lease without knowing it cannot commit anything.

Safety never depends on timing: the new holder records a higher epoch in storage before it
serves, and every commit checks the epoch inside its transaction. These tests take a lease away
behind a worker's back (a rogue holder, or SIGSTOP past the lease TTL) while one of its turns is
between its read and its write, and check the caller gets an error, never a stale success.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import msgspec
import nats
import pytest

from ndo.actors import ActorClient, RetryPolicy
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._status import fetch_status
from ndo.service import (
    Worker,
    WorkerConfig,
)
from ndo.storage import ObjectWrite, SqliteStorage
from ndo.subjects import partition_of
from tests.cluster_fixtures import (
    ClusterFactory,
    _make_cluster,  # noqa: F401  (fixture)
    object_in_partition,
    request,
)
from tests.helpers import steal_lease
from tests.objects import Slow
from tests.worker_fixtures import ALL_CLASSES

PARTITIONS = 8


class TestRogueHolder:
    """A lease taken over behind the worker's back: the in-flight write is refused."""

    async def test_in_flight_write_is_fenced(
        self, nats_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        """The turn that read before the takeover fails with 503 fenced and writes nothing;
        the worker drops the partition, and takes it back at a newer epoch when the other
        holder's lease expires."""
        config = WorkerConfig(
            nats_url=nats_server.url,
            data_dir=tmp_path / "data",
            partitions=PARTITIONS,
            lease_ttl=2,
            journal=False,
        )
        object_id = "fenced"
        partition = partition_of("Slow", object_id, PARTITIONS)
        nc = await nats.connect(nats_server.url)
        worker = Worker(config, ALL_CLASSES)
        await worker.start()
        rogue = SqliteStorage(tmp_path / "data" / "ndo.sqlite3", partitions=PARTITIONS)
        await rogue.open()
        try:
            subject = f"ndo.rpc.Slow.{object_id}.bump"
            assert (await request(nc, subject, b"{}", timeout=5)) == ("ok", 1)
            in_flight = asyncio.create_task(
                request(nc, subject, json.dumps({"pause": 1.0}).encode(), timeout=10)
            )
            await asyncio.sleep(0.3)  # the handler has read n=1 and is awaiting
            # Take the lease the way a new holder would after an expiry: a KV write, then its
            # epoch (bucket epoch base + the write's revision) fenced into storage.
            rogue_epoch = await steal_lease(nc, partition, rogue)
            outcome = await in_flight
            assert outcome[0] == "error" and outcome[1][:2] == (503, "fenced"), outcome
            assert await rogue.read("Slow", object_id, "n") == msgspec.msgpack.encode(1)
            # The worker notices at its next renewal and stops serving the partition.
            deadline = time.monotonic() + 3
            while partition in worker.partitions:
                assert time.monotonic() < deadline, "the worker kept the partition"
                await asyncio.sleep(0.02)
            assert (await request(nc, subject, b"{}", timeout=5))[0] in ("error", "timeout")
            # The rogue never renews: its lease expires and the worker takes the partition
            # back with a newer epoch, reloading the object from storage.
            client = ActorClient(nc, retry=RetryPolicy(attempts=40, max_backoff=0.25))
            assert await client.get(Slow, object_id).call(Slow.bump) == 2
            assert worker.epoch_of(partition) > rogue_epoch
            # A write with the old epoch is refused by storage, whatever the caller believes.
            stale = ObjectWrite("Slow", object_id, partition, rogue_epoch, {"n": b"\x63"})
            assert await rogue.commit([stale]) == frozenset({partition})
            assert await client.get(Slow, object_id).call(Slow.read) == 2
        finally:
            await rogue.close()
            await worker.stop()
            await nc.close()


@pytest.mark.slow
class TestPausedWorker:
    """SIGSTOP past the lease TTL, another worker takes over, SIGCONT: no stale success."""

    async def test_sigstop_then_resume(
        self, nats_server: EmbeddedNatsServer, make_cluster: ClusterFactory
    ) -> None:
        """The paused worker's in-flight write fails on the fence; the new owner's updates
        stand; the resumed worker drops the partition and serves again later."""
        cluster = await make_cluster(nats_server.url, partitions=PARTITIONS, lease_ttl=2)
        paused = await cluster.start("paused")
        await cluster.start("other")
        status = await cluster.settled({"paused", "other"})
        mine = set(next(m.partitions for m in status.members if m.name == "paused"))
        object_id = object_in_partition("Slow", PARTITIONS, mine, "p")
        subject = f"ndo.rpc.Slow.{object_id}.bump"
        nc = cluster.nc
        assert (await request(nc, subject, b"{}", timeout=5)) == ("ok", 1)
        in_flight = asyncio.create_task(
            request(nc, subject, json.dumps({"pause": 1.0}).encode(), timeout=20)
        )
        await asyncio.sleep(0.3)  # read n=1, now awaiting inside the handler
        paused.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            status = await cluster.wait_for(
                lambda s: (
                    {m.name for m in s.members} == {"other"}
                    and all(s.holders().get(p) == s.members[0].id for p in mine)
                ),
                timeout=10,
            )
            takeover = time.monotonic() - stopped
            # The new owner serves the object from storage: 1 -> 2 -> 3 -> 4.
            client = ActorClient(nc, timeout=1.0, retry=RetryPolicy(attempts=30, max_backoff=0.2))
            for expected in (2, 3, 4):
                assert await client.get(Slow, object_id).call(Slow.bump) == expected
        finally:
            paused.signal(signal.SIGCONT)
        outcome = await in_flight
        # Not ("ok", 2): that write was computed from a stale read.
        assert outcome[0] == "error" and outcome[1][:2] == (503, "fenced"), outcome
        client = ActorClient(nc, timeout=2.0, retry=RetryPolicy(attempts=30, max_backoff=0.2))
        assert await client.get(Slow, object_id).call(Slow.read) == 4
        # The resumed worker dropped what it lost, rejoins, and the two share the work again.
        await cluster.settled({"paused", "other"}, timeout=15)
        assert await client.get(Slow, object_id).call(Slow.bump) == 5
        log = paused.log_text()
        assert "partition lost" in log
        final = await fetch_status(nc, "ndo")
        assert not final.unheld
        print(f"\n[SIGSTOP] takeover from the paused worker after {takeover * 1000:.0f} ms")
