"""Group commit in the running worker: concurrent turns of many objects, and of one hot object,
share storage transactions (one fsync each) instead of paying one each."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, ActorId, RetryPolicy, UnavailableError
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._replay import read_journal
from ndo.service import Worker, WorkerConfig
from ndo.storage import ObjectWrite, SqliteStorage, StorageError
from tests.helpers import eventually
from tests.worker_fixtures import WorkerFactory


class HeldCommits(SqliteStorage):
    """Real SQLite whose commits wait while ``release`` is clear: a slow disk, on demand."""

    def __init__(self, path: Path, *, partitions: int) -> None:
        super().__init__(path, partitions=partitions)
        self.release = asyncio.Event()
        self.release.set()
        self.held = asyncio.Event()
        """Set once a commit is waiting for ``release``."""

    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        if not self.release.is_set():
            self.held.set()
            await self.release.wait()
        return await super().commit(entries)


class FailingCommits(SqliteStorage):
    """Real SQLite whose next ``fail`` commits raise, as a full disk would."""

    def __init__(self, path: Path, *, partitions: int) -> None:
        super().__init__(path, partitions=partitions)
        self.fail = 0

    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        if self.fail:
            self.fail -= 1
            raise StorageError("disk full (simulated)")
        return await super().commit(entries)


def _followers(worker: Worker, object_id: str) -> int:
    """Turns waiting for the output gate behind the pending write of ``Counter/<object_id>``."""
    activation = worker.catalog.get(ActorId("Counter", object_id))
    leader = None if activation is None else activation._followed
    return 0 if leader is None or leader.followers is None else len(leader.followers)


class HeldFailingCommits(HeldCommits):
    """Real SQLite whose commits can be held back (``release``) and whose next ``fail`` commits
    raise once released, as a disk that stalls and then reports an error would."""

    def __init__(self, path: Path, *, partitions: int) -> None:
        super().__init__(path, partitions=partitions)
        self.fail = 0

    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        if not self.release.is_set():
            self.held.set()
            await self.release.wait()
        if self.fail:
            self.fail -= 1
            raise StorageError("disk full (simulated)")
        return await super().commit(entries)


@pytest.fixture(name="held")
def _held(data_dir: Path) -> HeldCommits:
    """SQLite storage whose commits the test can hold back."""
    return HeldCommits(data_dir / "ndo.sqlite3", partitions=8)


class TestGroupCommit:
    """Write-sets that arrive while a commit is in flight ride the next transaction together."""

    async def test_many_objects(self, start_worker: WorkerFactory, client: ActorClient) -> None:
        """200 concurrent increments over 50 objects: every result right, and at most a third
        as many transactions as write-sets."""
        worker = await start_worker(classes=[Counter])
        calls = [client.get(Counter, f"g{i % 50}").call(Counter.increment) for i in range(200)]
        results = await asyncio.gather(*calls)
        by_object: dict[int, list[int]] = {}
        for i, value in enumerate(results):
            by_object.setdefault(i % 50, []).append(value)
        assert all(sorted(values) == [1, 2, 3, 4] for values in by_object.values())
        stats = worker.committer.stats
        assert stats.write_sets == 200
        assert stats.failures == 0
        assert stats.transactions <= stats.write_sets / 3, stats

    async def test_hot_object_pipelines(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """300 concurrent increments of one object: turns keep running while earlier commits
        are in flight, so far fewer transactions than increments."""
        worker = await start_worker(classes=[Counter])
        counter = client.get(Counter, "hot")
        results = await asyncio.gather(*(counter.call(Counter.increment) for _ in range(300)))
        assert sorted(results) == list(range(1, 301))
        stats = worker.committer.stats
        assert stats.write_sets == 300
        assert stats.transactions <= stats.write_sets / 3, stats
        assert await counter.call(Counter.get) == 300


class TestOutputGate:
    """A read's reply never leaves before the object's earlier writes are durable; with no
    write in flight it answers at once, without waiting for the committer."""

    async def test_read_waits_for_an_earlier_write(
        self,
        nats_server: EmbeddedNatsServer,
        data_dir: Path,
        held: HeldCommits,
        client: ActorClient,
    ) -> None:
        """A get behind an uncommitted increment answers only after that commit, with its value."""
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=8)
        async with Worker(config, [Counter], storage=held):
            counter = client.get(Counter, "gate")
            assert await counter.call(Counter.increment) == 1
            held.release.clear()
            try:
                write = asyncio.create_task(counter.call(Counter.increment))
                await asyncio.wait_for(held.held.wait(), 5)
                read = asyncio.create_task(counter.call(Counter.get))
                done, _ = await asyncio.wait({write, read}, timeout=0.5)
                assert not done, "a reply left before its write was durable"
            finally:
                held.release.set()
            assert await write == 2
            assert await read == 2

    async def test_read_with_nothing_in_flight_skips_the_committer(
        self,
        nats_server: EmbeddedNatsServer,
        data_dir: Path,
        held: HeldCommits,
        client: ActorClient,
    ) -> None:
        """With every write of the object durable, a get answers while commits are held back
        (another object's write waits meanwhile)."""
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=8)
        async with Worker(config, [Counter], storage=held):
            counter, other = client.get(Counter, "quiet"), client.get(Counter, "busy")
            assert await counter.call(Counter.increment) == 1
            held.release.clear()
            try:
                blocked = asyncio.create_task(other.call(Counter.increment))
                await asyncio.wait_for(held.held.wait(), 5)
                assert await asyncio.wait_for(counter.call(Counter.get), 2) == 1
                assert not blocked.done()
            finally:
                held.release.set()
            assert await blocked == 1


class TestCommitFailure:
    """A commit that fails answers 503 to every turn in it, resets the object to what is durable,
    and is counted in ``ndo_commit_failures_total``; the next call commits normally."""

    async def test_failed_commit_resets_and_counts(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, nc: NatsClient
    ) -> None:
        """The failed increment is not applied, the caller gets a retryable storage_failure, and
        the metric and stats count the failed transaction."""
        storage = FailingCommits(data_dir / "ndo.sqlite3", partitions=8)
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=8)
        async with Worker(config, [Counter], storage=storage) as worker:
            counter = ActorClient(nc, retry=RetryPolicy(attempts=1)).get(Counter, "disk")
            assert await counter.call(Counter.increment) == 1
            storage.fail = 1
            with pytest.raises(UnavailableError) as failed:
                await counter.call(Counter.increment)
            assert failed.value.type == "storage_failure"
            assert worker.stats().commit_failures == 1
            assert worker.metrics.registry.get_sample_value("ndo_commit_failures_total") == 1
            assert await counter.call(Counter.get) == 1  # reloaded: the failed write is gone
            assert await counter.call(Counter.increment) == 2

    async def test_turn_queued_behind_a_failed_commit_is_abandoned(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, nc: NatsClient
    ) -> None:
        """An increment runs on top of one whose commit is in flight; that commit fails. The
        object is reset before the queued write is taken, so it is abandoned (object_reset)
        instead of committing a value built on the failed one, and the counter stays at 1."""
        storage = HeldFailingCommits(data_dir / "ndo.sqlite3", partitions=8)
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=8)
        async with Worker(config, [Counter], storage=storage) as worker:
            counter = ActorClient(nc, retry=RetryPolicy(attempts=1)).get(Counter, "behind")
            assert await counter.call(Counter.increment) == 1
            storage.fail = 1
            storage.release.clear()
            try:
                failing = asyncio.create_task(counter.call(Counter.increment))
                await asyncio.wait_for(storage.held.wait(), 5)
                behind = asyncio.create_task(counter.call(Counter.increment))
                await eventually(lambda: worker.committer.queued == 1)  # its turn ran
            finally:
                storage.release.set()
            with pytest.raises(UnavailableError) as failed:
                await failing
            assert failed.value.type == "storage_failure"
            with pytest.raises(UnavailableError) as abandoned:
                await behind
            assert abandoned.value.type == "object_reset"
            assert await counter.call(Counter.get) == 1  # reloaded: neither write is there
            assert await counter.call(Counter.increment) == 2
            stats = worker.committer.stats
            assert (stats.failures, stats.write_sets) == (1, 2)

    async def test_read_behind_a_failed_commit_is_journaled_as_aborted(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, nc: NatsClient
    ) -> None:
        """Reads are not journaled by default, but a read that waited behind a write whose
        commit failed is a failed call: it is journaled as ``aborted``; a read behind a write
        that commits is not journaled at all."""
        storage = HeldFailingCommits(data_dir / "ndo.sqlite3", partitions=8)
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=8)
        async with Worker(config, [Counter], storage=storage) as worker:
            counter = ActorClient(nc, retry=RetryPolicy(attempts=1)).get(Counter, "gate")
            assert await counter.call(Counter.increment) == 1
            for fail in (0, 1):  # a read behind a write that commits, then one that fails
                storage.fail = fail
                storage.release.clear()
                storage.held.clear()
                try:
                    write = asyncio.create_task(counter.call(Counter.increment))
                    await asyncio.wait_for(storage.held.wait(), 5)
                    read = asyncio.create_task(counter.call(Counter.get))
                    await eventually(lambda: _followers(worker, "gate") == 1)  # the read ran
                finally:
                    storage.release.set()
                await asyncio.gather(write, read, return_exceptions=True)
        steps = await read_journal(nc, "ndo", "Counter", "gate")
        assert [(r.method, r.status) for _, r in steps] == [
            ("increment", "ok"),
            ("increment", "ok"),  # the read behind it succeeded: not journaled
            ("increment", "aborted"),
            ("get", "aborted"),
        ]
