"""``on_stop``: the hook runs as an object leaves memory in an orderly way (idle, LRU for
``max_active``, hand-over, shutdown), commits like a turn, and never breaks one instance per id.

The test object ``Flusher`` counts in memory and writes the count only in ``on_stop``, so what
storage holds afterwards says whether (and how often) the hook ran and committed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from structlog.testing import capture_logs

from ndo.actors import Actor, ActorClient, ActorId, RetryPolicy, method
from ndo.actors.runtime import describe_class
from ndo.examples import Counter
from ndo.service import (
    Worker,
    WorkerConfig,
)
from ndo.storage import SqliteStorage
from ndo.subjects import event_subject, partition_of
from tests.cluster_fixtures import one_object_per_partition
from tests.conftest import NatsServerFactory
from tests.helpers import eventually, steal_lease
from tests.objects import Flusher
from tests.worker_fixtures import WorkerFactory, worker_factory

_FAILED_EVENT = "on_stop failed; its writes and events were discarded"


def _on_stop(worker: Worker, outcome: str, class_name: str = "Flusher") -> float:
    value = worker.metrics.registry.get_sample_value(
        "ndo_on_stop_total", {"class_name": class_name, "outcome": outcome}
    )
    return value or 0.0


def _evictions(worker: Worker, reason: str) -> float:
    value = worker.metrics.registry.get_sample_value("ndo_evictions_total", {"reason": reason})
    return value or 0.0


async def _flushed(client: ActorClient, object_id: str) -> dict[str, Any]:
    result: dict[str, Any] = await client.get(Flusher, object_id).call(Flusher.flushed)
    return result


class TestIdleEviction:
    """An idle object runs on_stop before it leaves; its writes and events commit."""

    async def test_write_is_durable_and_event_published(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient
    ) -> None:
        """The count kept in memory is written by on_stop, read back by a new worker on the
        same data directory; the event on_stop emitted is published once."""
        worker = await start_worker(classes=[Flusher], idle_timeout=0.2, scan_interval=0.05)
        events = await nc.subscribe(event_subject("ndo", "Flusher", "idle", "stopped"))
        flusher = client.get(Flusher, "idle")
        assert await flusher.call(Flusher.add, by=2) == 2
        assert await flusher.call(Flusher.add, by=3) == 5
        await eventually(lambda: len(worker.catalog) == 0, timeout=10)
        assert _on_stop(worker, "ok") == 1
        assert _evictions(worker, "idle") == 1
        message = await events.next_msg(timeout=5)
        assert json.loads(message.data) == {"flushed": 5}
        await worker.stop()
        await start_worker(classes=[Flusher])
        assert await _flushed(client, "idle") == {"total": 5, "stops": 1}

    async def test_message_during_on_stop_is_served_by_a_new_instance(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """A message that arrives while on_stop runs waits behind it, then a new instance
        (on_start again) serves it in the same activation, which stays; nothing is lost."""
        worker = await start_worker(classes=[Flusher], idle_timeout=0.3, scan_interval=0.05)
        flusher = client.get(Flusher, "busy")
        assert await flusher.call(Flusher.add, by=5) == 5
        await flusher.call(Flusher.stop_slowly, pause=1.0)
        address = ActorId("Flusher", "busy")
        activation = worker.catalog.get(address)
        assert activation is not None
        await eventually(lambda: activation.leaving == "idle", timeout=10)
        assert await flusher.call(Flusher.add, by=7) == 7  # counted from 0: a new instance
        assert worker.catalog.get(address) is activation  # one activation all along
        await eventually(lambda: _on_stop(worker, "ok") == 2, timeout=10)  # the new one's, too
        assert await _flushed(client, "busy") == {"total": 12, "stops": 2}

    async def test_failing_on_stop_is_logged_counted_and_the_object_leaves(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient
    ) -> None:
        """An on_stop that raises after writing: its writes and events are discarded, one
        warning names the object, the failure is counted, and the object is evicted anyway."""
        worker = await start_worker(classes=[Flusher], idle_timeout=0.2, scan_interval=0.05)
        events = await nc.subscribe(event_subject("ndo", "Flusher", "bad", "stopped"))
        flusher = client.get(Flusher, "bad")
        await flusher.call(Flusher.add, by=3)
        with capture_logs() as logs:
            await flusher.call(Flusher.stop_badly)
            await eventually(lambda: len(worker.catalog) == 0, timeout=10)
        failures = [entry for entry in logs if entry["event"] == _FAILED_EVENT]
        assert len(failures) == 1
        assert failures[0]["log_level"] == "warning"
        assert failures[0]["class_name"] == "Flusher" and failures[0]["object_id"] == "bad"
        assert failures[0]["error_type"] == "handler_error"
        assert _on_stop(worker, "handler_error") == 1 and _on_stop(worker, "ok") == 0
        assert _evictions(worker, "idle") == 1
        with pytest.raises(nats.errors.TimeoutError):
            await events.next_msg(timeout=0.3)
        assert await _flushed(client, "bad") == {"total": 0, "stops": 0}


class TestLruEviction:
    """Beyond max_active, an evicted object with on_stop runs it, then leaves."""

    async def test_lru_victims_flush_and_the_bound_holds(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """Six objects through a two-object catalog: never more than two in memory (a newcomer
        may be refused while a victim's on_stop runs; the client retries), and every evicted
        object's count was written by its on_stop."""
        worker = await start_worker(classes=[Flusher], max_active=2)
        client = ActorClient(nc, timeout=5.0, retry=RetryPolicy(attempts=20, initial_backoff=0.02))
        for i in range(6):
            assert await client.get(Flusher, f"lru{i}").call(Flusher.add, by=i + 1) == i + 1
            assert len(worker.catalog) <= 2
        await eventually(lambda: _on_stop(worker, "ok") >= 4, timeout=10)
        assert _evictions(worker, "lru") >= 4
        for i in range(4):
            flushed = await _flushed(client, f"lru{i}")
            assert flushed["total"] == i + 1 and flushed["stops"] >= 1
            assert len(worker.catalog) <= 2


class TestShutdown:
    """A worker that stops runs every live instance's on_stop before storage closes."""

    @pytest.mark.parametrize("ownership", ["leases", "standalone"])
    async def test_on_stop_runs_and_commits_at_shutdown(
        self, start_worker: WorkerFactory, client: ActorClient, ownership: str
    ) -> None:
        """Three objects in memory at shutdown: each one's count is durable afterwards."""
        worker = await start_worker(classes=[Flusher], ownership=ownership)
        for i in range(3):
            await client.get(Flusher, f"s{i}").call(Flusher.add, by=10 + i)
        await worker.stop()
        assert _on_stop(worker, "ok") == 3
        await start_worker(classes=[Flusher], ownership=ownership)
        for i in range(3):
            assert await _flushed(client, f"s{i}") == {"total": 10 + i, "stops": 1}


class TestWithoutTheHook:
    """Classes that do not override on_stop are evicted at once, as before."""

    async def test_plain_class_evicted_without_on_stop(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """An idle Counter leaves at the first scan; no on_stop is counted for it."""
        worker = await start_worker(
            classes=[Counter, Flusher], idle_timeout=0.2, scan_interval=0.05
        )
        assert not worker.classes["Counter"].has_on_stop
        assert worker.classes["Flusher"].has_on_stop
        await client.get(Counter, "plain").call(Counter.increment, by=1)
        await eventually(lambda: len(worker.catalog) == 0, timeout=10)
        assert _evictions(worker, "idle") == 1
        samples = [
            sample
            for metric in worker.metrics.registry.collect()
            if metric.name == "ndo_on_stop"
            for sample in metric.samples
        ]
        assert samples == []
        await worker.stop()
        assert _on_stop(worker, "ok", "Counter") == 0

    def test_a_sync_on_stop_is_refused_at_registration(self) -> None:
        """on_stop must be an ``async def``: a plain one fails when the class is described."""

        class Careless(Actor):
            def on_stop(self) -> None:  # type: ignore[override]
                pass

            @method
            async def ping(self) -> None:
                pass

        with pytest.raises(TypeError, match=r"Careless.on_stop must be an 'async def'"):
            describe_class(Careless)


class TestHandover:
    """A partition handed to another worker runs its objects' on_stop on the old owner."""

    async def test_moved_objects_flush_on_the_old_owner(
        self, make_nats_server: NatsServerFactory, tmp_path: Path
    ) -> None:
        """A second worker joins: the objects whose partition moves ran on_stop on the first
        while it drained them, so the new owner reads what they wrote; the others still run."""
        server = await make_nats_server()

        def base(started: int) -> WorkerConfig:
            return WorkerConfig(
                nats_url=server.url,
                data_dir=tmp_path / "data",
                partitions=8,
                lease_ttl=2,
                journal=False,
                worker_name=f"on-stop-{started}",
            )

        nc = await nats.connect(server.url)
        try:
            client = ActorClient(nc, retry=RetryPolicy(attempts=20, initial_backoff=0.05))
            async with worker_factory(base, [Flusher]) as start:
                first = await start()
                ids = one_object_per_partition("Flusher", 8)
                for i, object_id in enumerate(ids):
                    assert await client.get(Flusher, object_id).call(Flusher.add, by=i + 1) == i + 1
                second = await start()
                await eventually(
                    lambda: (
                        bool(second.partitions)
                        and sorted([*first.partitions, *second.partitions]) == list(range(8))
                    ),
                    timeout=20,
                )
                moved = [
                    i
                    for i, object_id in enumerate(ids)
                    if partition_of("Flusher", object_id, 8) in second.partitions
                ]
                assert moved
                assert _on_stop(first, "ok") == len(moved)
                for i, object_id in enumerate(ids):
                    stayed = {"total": 0, "stops": 0}
                    expected = {"total": i + 1, "stops": 1} if i in moved else stayed
                    assert await _flushed(client, object_id) == expected
        finally:
            await nc.close()

    async def test_partition_taken_without_a_drain_fences_on_stop(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient, data_dir: Path
    ) -> None:
        """A lease taken over behind the worker's back (a rogue holder fences the partition in
        storage): the worker drops the partition at its next renewal, the object's on_stop
        runs as a leftover, and its writes are refused: counted ``fenced``, logged, never
        stored."""
        worker = await start_worker(classes=[Flusher], lease_ttl=2, journal=False)
        object_id = "taken"
        partition = partition_of("Flusher", object_id, 8)
        assert await client.get(Flusher, object_id).call(Flusher.add, by=9) == 9
        rogue = SqliteStorage(data_dir / "ndo.sqlite3", partitions=8)
        await rogue.open()
        try:
            with capture_logs() as logs:
                await steal_lease(nc, partition, rogue)
                await eventually(lambda: _on_stop(worker, "fenced") == 1, timeout=10)
            failures = [entry for entry in logs if entry["event"] == _FAILED_EVENT]
            assert [(f["object_id"], f["error_type"]) for f in failures] == [(object_id, "fenced")]
            assert _on_stop(worker, "ok") == 0
            assert await rogue.read("Flusher", object_id, "total") is None
        finally:
            await rogue.close()
