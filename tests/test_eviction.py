"""Eviction: the catalog stays within max_active, idle objects leave memory, busy ones never do,
and an evicted object comes back from SQLite with its state (and a fresh ``on_start``)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ndo.actors import Actor, ActorClient, ActorId, UnavailableError, method
from ndo.service import Worker
from tests.helpers import eventually
from tests.worker_fixtures import WorkerFactory


class Loaded(Actor):
    """Knows which activation it is (a token made in on_start) and what on_start loaded."""

    activation: str
    loaded: int

    async def on_start(self) -> None:
        self.activation = uuid.uuid4().hex
        self.loaded = await self.storage.get("n", 0)

    @method
    async def add(self, by: int = 1) -> int:
        value: int = await self.storage.get("n", 0) + by
        self.storage.put("n", value)
        return value

    @method
    async def info(self) -> dict[str, object]:
        return {
            "activation": self.activation,
            "loaded": self.loaded,
            "n": await self.storage.get("n", 0),
        }


class Sleeper(Actor):
    """A turn that stays in flight for as long as asked, then writes."""

    @method
    async def nap(self, seconds: float) -> int:
        naps: int = await self.storage.get("naps", 0) + 1
        await asyncio.sleep(seconds)
        self.storage.put("naps", naps)
        return naps

    @method
    async def naps(self) -> int:
        naps: int = await self.storage.get("naps", 0)
        return naps


def _evictions(worker: Worker, reason: str) -> float:
    value = worker.metrics.registry.get_sample_value("ndo_evictions_total", {"reason": reason})
    return value or 0.0


class TestLruEviction:
    """Beyond max_active, the least recently used idle objects are evicted."""

    async def test_catalog_stays_bounded_and_state_survives(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """50 objects through a 10-object catalog: never more than 10, every value intact."""
        worker = await start_worker(classes=[Loaded], max_active=10)
        first: dict[str, object] = {}
        for i in range(50):
            stub = client.get(Loaded, f"o{i}")
            assert await stub.call(Loaded.add, i + 1) == i + 1
            first[f"o{i}"] = (await stub.call(Loaded.info))["activation"]
            assert len(worker.catalog) <= 10
        assert _evictions(worker, "lru") >= 40
        for i in range(50):
            info = await client.get(Loaded, f"o{i}").call(Loaded.info)
            assert info["n"] == i + 1
            assert len(worker.catalog) <= 10
            if i < 40:  # evicted meanwhile: reloaded from SQLite by a new on_start
                assert info["loaded"] == i + 1
                assert info["activation"] != first[f"o{i}"]

    async def test_a_burst_never_exceeds_the_limit(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """``max_active`` is a hard bound: a burst over more objects than fit is partly refused
        (503 overloaded) while the objects in memory are busy; the catalog never grows past
        the limit, and every increment that was acknowledged is kept."""
        worker = await start_worker(classes=[Loaded], max_active=10)
        largest = 0

        async def add(i: int) -> str:
            nonlocal largest
            try:
                await client.get(Loaded, f"b{i % 50}").call(Loaded.add)
            except UnavailableError as exc:
                return exc.type
            finally:
                largest = max(largest, len(worker.catalog))
            return f"b{i % 50}"

        results = await asyncio.gather(*(add(i) for i in range(100)))
        assert largest <= 10
        assert set(results) - {f"b{i}" for i in range(50)} <= {"overloaded"}
        values = [await client.get(Loaded, f"b{i}").call(Loaded.info) for i in range(50)]
        assert [v["n"] for v in values] == [results.count(f"b{i}") for i in range(50)]


class TestIdleEviction:
    """Objects without messages for idle_timeout leave memory; on_start runs again on return."""

    async def test_idle_objects_evicted_and_reloaded(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """Five idle objects are evicted; the next call reloads each from storage."""
        worker = await start_worker(classes=[Loaded], idle_timeout=0.2, scan_interval=0.05)
        before = {}
        for i in range(5):
            stub = client.get(Loaded, f"i{i}")
            await stub.call(Loaded.add, 10 + i)
            before[i] = (await stub.call(Loaded.info))["activation"]
        await eventually(lambda: len(worker.catalog) == 0, timeout=5)
        assert _evictions(worker, "idle") == 5
        for i in range(5):
            info = await client.get(Loaded, f"i{i}").call(Loaded.info)
            assert info == {"activation": info["activation"], "loaded": 10 + i, "n": 10 + i}
            assert info["activation"] != before[i]

    async def test_object_in_use_stays(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """An object called more often than idle_timeout keeps its activation."""
        await start_worker(classes=[Loaded], idle_timeout=0.3, scan_interval=0.05)
        stub = client.get(Loaded, "regular")
        activation = (await stub.call(Loaded.info))["activation"]
        for _ in range(10):
            await asyncio.sleep(0.1)
            assert (await stub.call(Loaded.info))["activation"] == activation


class TestBusyObjectsStay:
    """An object with a running or queued turn is never evicted, whatever the pressure."""

    async def test_in_flight_turn_survives_lru_and_idle_scans(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """A 1 s turn outlives idle_timeout and a catalog flooded past max_active: its
        activation (with a second turn queued behind it) stays, and both turns apply."""
        worker = await start_worker(
            classes=[Sleeper, Loaded], max_active=2, idle_timeout=0.1, scan_interval=0.02
        )
        sleeper = client.get(Sleeper, "busy")
        naps = [
            asyncio.create_task(sleeper.call(Sleeper.nap, 1.0)),
            asyncio.create_task(sleeper.call(Sleeper.nap, 0.0)),
        ]
        address = ActorId("Sleeper", "busy")
        await eventually(lambda: worker.catalog.get(address) is not None)
        activation = worker.catalog.get(address)
        for i in range(20):
            await client.get(Loaded, f"pressure{i}").call(Loaded.add)
            assert worker.catalog.get(address) is activation
        while not naps[0].done():  # the long turn runs, the short one waits behind it
            assert worker.catalog.get(address) is activation
            await asyncio.sleep(0.02)
        assert await asyncio.gather(*naps) == [1, 2]
        assert await sleeper.call(Sleeper.naps) == 2

    async def test_new_object_is_refused_while_the_rest_are_busy(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """With the catalog full of busy objects, a new object is refused (503 overloaded)
        rather than added past the limit or made its own LRU victim (which would leave its
        message on an orphan activation); once the others are idle it gets one activation."""
        worker = await start_worker(classes=[Sleeper, Loaded], max_active=2)
        naps = [
            asyncio.create_task(client.get(Sleeper, f"s{i}").call(Sleeper.nap, 0.5))
            for i in range(2)
        ]
        await eventually(lambda: worker.catalog.busy == 2)
        with pytest.raises(UnavailableError) as refused:
            await client.get(Loaded, "newcomer").call(Loaded.add)
        assert refused.value.type == "overloaded"
        assert len(worker.catalog) == 2
        await asyncio.gather(*naps)
        results = await asyncio.gather(
            *(client.get(Loaded, "newcomer").call(Loaded.add) for _ in range(20))
        )
        assert sorted(results) == list(range(1, 21))  # one activation: no lost update
        assert (await client.get(Loaded, "newcomer").call(Loaded.info))["n"] == 20
