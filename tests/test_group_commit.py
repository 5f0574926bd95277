"""Group commit in the running worker: concurrent turns of many objects, and of one hot object,
share storage transactions (one fsync each) instead of paying one each."""

from __future__ import annotations

import asyncio

from actors import ActorClient
from examples import Counter
from tests.worker_fixtures import WorkerFactory


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
