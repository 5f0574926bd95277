"""Scale-out: several workers share the objects; hand-over, takeover and churn keep the promises.

In-process workers where only the protocol matters, worker processes (``ndo serve``) where
signals do (SIGTERM hand-over, kill -9, churn). Both routing modes: ``forward`` on a stock
server, ``mapped`` on a server with the partition mapping.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from structlog.testing import capture_logs

from ndo.actors import ActorClient, RetryPolicy
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._status import fetch_status
from ndo.ops.cli import main as ndo_main
from ndo.service import (
    DeploymentMismatchError,
    RoutingError,
    RoutingMode,
    Worker,
    WorkerConfig,
    assign_partitions,
    server_mapping,
)
from tests.cluster_fixtures import (
    ClusterFactory,
    _make_cluster,  # noqa: F401  (fixture)
    one_object_per_partition,
    request,
)
from tests.objects import Reminder, Slow
from tests.worker_fixtures import worker_factory

PARTITIONS = 8
NatsServerFactory = Callable[..., Awaitable[EmbeddedNatsServer]]


@pytest.fixture(name="routed_server", params=["forward", "mapped"])
async def _routed_server(
    request: pytest.FixtureRequest, make_nats_server: NatsServerFactory
) -> EmbeddedNatsServer:
    """A nats-server without (``forward``) or with (``mapped``) the partition mapping."""
    if request.param == "mapped":
        return await make_nats_server(mappings=dict([server_mapping("ndo", PARTITIONS)]))
    return await make_nats_server()


@pytest.fixture(name="start_workers")
async def _start_workers(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Factory of in-process workers sharing ``tmp_path/data``; stopped at the end."""

    def base(started: int) -> WorkerConfig:
        return WorkerConfig(
            data_dir=tmp_path / "data",
            partitions=PARTITIONS,
            lease_ttl=2,
            journal=False,
            worker_name=f"in-process-{started}",
        )

    async with worker_factory(base) as start_workers:

        async def start(url: str, **overrides: Any) -> Worker:
            return await start_workers(nats_url=url, **overrides)

        yield start


async def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def _mode(server: EmbeddedNatsServer) -> str:
    """``mapped`` when the server was started with the partition mapping, else ``forward``."""
    return "mapped" if "mappings" in server.config_path.read_text() else "forward"


def _split(workers: list[Worker]) -> bool:
    """Every partition served by exactly one worker, and every worker serving some."""
    held = [p for w in workers for p in w.partitions]
    return sorted(held) == list(range(PARTITIONS)) and all(w.partitions for w in workers)


class TestAssignment:
    """Every worker computes the same balanced assignment; membership changes move little."""

    def test_balanced_and_deterministic(self) -> None:
        """Each member gets floor or ceil of its share, whatever the order members are given."""
        members = ["a-1", "b-2", "c-3"]
        first = assign_partitions(members, 64)
        assert first == assign_partitions(list(reversed(members)), 64)
        assert sorted(first) == list(range(64))
        loads = sorted(list(first.values()).count(m) for m in members)
        assert loads == [21, 21, 22]

    def test_join_moves_about_a_share(self) -> None:
        """A third member takes about a third; the rest stays where it was."""
        before = assign_partitions(["a-1", "b-2"], 64)
        after = assign_partitions(["a-1", "b-2", "c-3"], 64)
        moved = [p for p in range(64) if before[p] != after[p]]
        assert all(after[p] == "c-3" for p in moved) or len(moved) <= 32
        assert 21 <= len(moved) <= 32


class TestPartitionLog:
    """Partition moves are summarised in one log line per change, not one per partition."""

    async def test_one_summary_per_change(
        self, make_nats_server: NatsServerFactory, start_workers: Any
    ) -> None:
        """The first worker logs all partitions once; when a second joins, the first logs
        what it released in one line."""
        server = await make_nats_server()
        with capture_logs() as logs:
            first = await start_workers(server.url)
            await _wait(lambda: any(e["event"] == "serving partitions" for e in logs))
            second = await start_workers(server.url)
            await _wait(lambda: first.partitions and len(first.partitions) < PARTITIONS)
            await _wait(
                lambda: sum(e["event"] == "serving partitions" for e in logs) >= 3, timeout=5
            )
        summaries = [e for e in logs if e["event"] == "serving partitions"]
        first_logs = [e for e in summaries if e["worker"] == first.name]
        assert first_logs[0]["count"] == PARTITIONS
        assert first_logs[0]["partitions"] == f"0-{PARTITIONS - 1}"
        assert any(e["released"] != "-" for e in first_logs[1:])
        assert any(e["worker"] == second.name and e["count"] > 0 for e in summaries)
        acquired = [e for e in logs if e["event"] == "partition acquired"]
        assert acquired and all(e["log_level"] == "debug" for e in acquired)


class TestRoutingDetection:
    """A worker finds out at start which routing the server offers, and refuses a bad mapping."""

    async def test_stock_server_forwards(
        self, make_nats_server: NatsServerFactory, start_workers
    ) -> None:
        """Without the mapping the worker takes RPC subjects in a queue group and forwards."""
        server = await make_nats_server()
        worker = await start_workers(server.url)
        assert worker.routing_mode is RoutingMode.FORWARD

    async def test_mapping_detected(
        self, make_nats_server: NatsServerFactory, start_workers
    ) -> None:
        """With `ndo mapping`'s mapping the worker subscribes to partition subjects only."""
        server = await make_nats_server(mappings=dict([server_mapping("ndo", PARTITIONS)]))
        worker = await start_workers(server.url)
        assert worker.routing_mode is RoutingMode.MAPPED

    async def test_mapping_with_other_partition_count_refused(
        self, make_nats_server: NatsServerFactory, start_workers
    ) -> None:
        """A mapping built for 16 partitions is refused by an 8-partition worker, naming 16."""
        server = await make_nats_server(mappings=dict([server_mapping("ndo", 16)]))
        with pytest.raises(RoutingError, match=r"uses 16 partitions.*has 8"):
            await start_workers(server.url)

    async def test_mapping_added_at_runtime(
        self, make_nats_server: NatsServerFactory, start_workers, tmp_path: Path
    ) -> None:
        """An operator adds the mapping and restarts the server: the worker follows."""
        first = await make_nats_server(store_dir=tmp_path / "nats-switch")
        worker = await start_workers(first.url)
        assert worker.routing_mode is RoutingMode.FORWARD
        await first.stop()
        await make_nats_server(
            store_dir=tmp_path / "nats-switch",
            port=first.port,
            mappings=dict([server_mapping("ndo", PARTITIONS)]),
        )
        await _wait(lambda: worker.routing_mode is RoutingMode.MAPPED, timeout=10)
        nc = await nats.connect(first.url)
        try:
            client = ActorClient(nc, retry=RetryPolicy(attempts=20, max_backoff=0.2))
            ids = one_object_per_partition("Counter", PARTITIONS, "m")
            for object_id in ids:
                assert await client.get(Counter, object_id).call(Counter.increment, by=2) == 2
        finally:
            await nc.close()


class TestSharing:
    """Two and three workers split the partitions and serve every object, in both modes."""

    async def test_two_then_three_workers(self, routed_server: EmbeddedNatsServer, start_workers):
        """Objects on every partition answer through any mix of workers; counts add up."""
        url = routed_server.url
        first = await start_workers(url)
        assert first.partitions == frozenset(range(PARTITIONS))
        second = await start_workers(url)
        await _wait(lambda: _split([first, second]))
        third = await start_workers(url)
        workers = [first, second, third]
        await _wait(lambda: _split(workers))
        nc = await nats.connect(url)
        try:
            client = ActorClient(nc, retry=RetryPolicy(attempts=8, initial_backoff=0.02))
            ids = one_object_per_partition("Counter", PARTITIONS)
            for _ in range(3):
                await asyncio.gather(
                    *(client.get(Counter, i).call(Counter.increment, by=1) for i in ids)
                )
            values = [await client.get(Counter, i).call(Counter.get) for i in ids]
            assert values == [3] * PARTITIONS
            status = await fetch_status(nc, "ndo")
        finally:
            await nc.close()
        assert {m.name for m in status.members} == {w.name for w in workers}
        assert status.holders() == {p: w.member_id for w in workers for p in w.partitions}
        epochs = [lease.epoch for lease in status.leases]
        assert len(set(epochs)) == PARTITIONS  # one acquisition each, each its own epoch
        forwarded = sum(w.stats().forwarded for w in workers)
        if _mode(routed_server) == "mapped":
            assert forwarded == 0
        else:
            assert forwarded > 0

    async def test_other_partition_count_refused(
        self, make_nats_server: NatsServerFactory, start_workers, tmp_path: Path
    ) -> None:
        """A worker started with another --partitions against the deployment is refused."""
        server = await make_nats_server()
        await start_workers(server.url)
        with pytest.raises(DeploymentMismatchError, match="--partitions 8"):
            await start_workers(server.url, partitions=16, data_dir=tmp_path / "other")


class TestStatus:
    """`ndo status` shows members, the partitions each holds and lease epochs."""

    async def test_status_table(
        self, make_nats_server: NatsServerFactory, start_workers, capsys
    ) -> None:
        """Both workers appear with their partition lists; every partition has an epoch."""
        server = await make_nats_server()
        first = await start_workers(server.url)
        second = await start_workers(server.url)
        await _wait(lambda: _split([first, second]))
        code = await asyncio.to_thread(ndo_main, ["status", "--nats-url", server.url])
        out = capsys.readouterr().out
        assert code == 0
        assert "2 worker(s)" in out
        for worker in (first, second):
            assert str(worker.member_id) in out
        assert "unheld partitions: -" in out
        assert out.count("\n") >= PARTITIONS + 6
        code = await asyncio.to_thread(ndo_main, ["status", "--nats-url", server.url, "--json"])
        parsed = json.loads(capsys.readouterr().out)
        assert code == 0 and parsed["partitions"] == PARTITIONS

    def test_mapping_snippet(self, capsys) -> None:
        """`ndo mapping` prints the mappings block for the given partition count."""
        assert ndo_main(["mapping", "--partitions", "32"]) == 0
        out = capsys.readouterr().out
        assert "{{partition(32,1,2)}}" in out and '"ndo.rpc.*.*.*"' in out


class TestMovedAlarms:
    """Alarms of a partition that moved fire on the new owner, once."""

    async def test_alarms_follow_their_partition(
        self, make_nats_server: NatsServerFactory, start_workers
    ) -> None:
        """Alarms set through one worker fire after it handed everything to another."""
        server = await make_nats_server()
        first = await start_workers(server.url)
        nc = await nats.connect(server.url)
        try:
            client = ActorClient(nc, retry=RetryPolicy(attempts=10, initial_backoff=0.02))
            ids = one_object_per_partition("Reminder", PARTITIONS, "r")
            at = time.time() + 1.5
            for object_id in ids:
                await client.get(Reminder, object_id).call(Reminder.schedule, at)
            second = await start_workers(server.url)
            await _wait(lambda: _split([first, second]))
            await first.stop()  # hands its half to `second` before the alarms are due
            await _wait(lambda: second.partitions == frozenset(range(PARTITIONS)))

            async def all_fired() -> bool:
                fired = [await client.get(Reminder, i).call(Reminder.fired) for i in ids]
                return all(fired)

            deadline = time.monotonic() + 10
            while not await all_fired():
                assert time.monotonic() < deadline, "alarms did not fire on the new owner"
                await asyncio.sleep(0.1)
            fired = [await client.get(Reminder, i).call(Reminder.fired) for i in ids]
        finally:
            await nc.close()
        assert fired == [[[at, 1]]] * PARTITIONS


# Worker processes: hand-over under load, kill -9, churn


class Load:
    """Clients incrementing Slow objects (read, await, write) while workers come and go.

    ``idempotent`` callers retry each call with the same Idempotency-Key until it is
    acknowledged; ``single`` callers try once and record the outcome.
    """

    def __init__(
        self, nc: NatsClient, ids: list[str], *, pauses: tuple[float, ...] = (0.002, 0.03)
    ) -> None:
        self.nc = nc
        self.ids = ids
        # Handlers await this long between their read and their write (long ones widen the
        # window in which a second instance would lose an update).
        self.bodies = {
            i: json.dumps({"pause": pauses[n % len(pauses)]}).encode() for n, i in enumerate(ids)
        }
        self.issued = dict.fromkeys(ids, 0)
        self.acked = dict.fromkeys(ids, 0)
        self.unknown = dict.fromkeys(ids, 0)
        self.failed = dict.fromkeys(ids, 0)
        self.retries = 0
        self.gaps: list[float] = []
        self.errors: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, *, idempotent: bool, per_object: int = 1) -> None:
        for object_id in self.ids:
            for _ in range(per_object):
                runner = self._idempotent if idempotent else self._single
                self._tasks.append(asyncio.create_task(runner(object_id)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def _subject(self, object_id: str) -> str:
        return f"ndo.rpc.Slow.{object_id}.bump"

    async def _idempotent(self, object_id: str) -> None:
        body = self.bodies[object_id]
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            self.issued[object_id] += 1
            started = time.monotonic()
            backoff = 0.02
            while True:
                outcome, detail = await request(
                    self.nc, self._subject(object_id), body, timeout=1.5, key=key
                )
                if outcome == "ok":
                    self.acked[object_id] += 1
                    self.gaps.append(time.monotonic() - started)
                    break
                self.retries += 1
                label = outcome if outcome != "error" else f"{detail[0]}:{detail[1]}"
                self.errors[label] = self.errors.get(label, 0) + 1
                assert outcome != "error" or detail[0] == 503, detail
                assert time.monotonic() - started < 40, f"call stuck: {self.errors}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)

    async def _single(self, object_id: str) -> None:
        body = self.bodies[object_id]
        while not self._stop.is_set():
            self.issued[object_id] += 1
            outcome, detail = await request(self.nc, self._subject(object_id), body, timeout=1.5)
            if outcome == "ok":
                self.acked[object_id] += 1
            elif outcome == "timeout":
                self.unknown[object_id] += 1
            else:
                assert outcome == "no_responders" or detail[0] == 503, detail
                self.failed[object_id] += 1
                await asyncio.sleep(0.05)

    async def values(self) -> dict[str, int]:
        client = ActorClient(self.nc, timeout=2, retry=RetryPolicy(attempts=30, max_backoff=0.5))
        return {i: await client.get(Slow, i).call(Slow.read) for i in self.ids}


@pytest.fixture(name="server")
async def _server(make_nats_server: NatsServerFactory) -> EmbeddedNatsServer:
    """A stock nats-server with JetStream (forward routing)."""
    return await make_nats_server()


@pytest.mark.slow
class TestGracefulHandover:
    """SIGTERM: a worker drains and hands its partitions over; callers never see a failure."""

    async def test_sigterm_hands_over_under_load(
        self, routed_server: EmbeddedNatsServer, make_cluster: ClusterFactory
    ) -> None:
        """Its partitions move to the survivor quickly; no acknowledged update is lost."""
        cluster = await make_cluster(routed_server.url, partitions=PARTITIONS)
        leaving = await cluster.start("leaving")
        await cluster.start("staying")
        await cluster.settled({"leaving", "staying"})
        load = Load(cluster.nc, one_object_per_partition("Slow", PARTITIONS, "g"))
        load.start(idempotent=True, per_object=2)
        await asyncio.sleep(1.0)
        acked_before = sum(load.acked.values())
        sent = time.monotonic()
        leaving.signal(signal.SIGTERM)
        await cluster.settled({"staying"}, timeout=15)
        handover = time.monotonic() - sent
        assert await leaving.wait_exit(10) == 0
        await asyncio.sleep(0.5)
        await load.stop()
        values = await load.values()
        assert sum(load.acked.values()) > acked_before
        assert values == load.acked == load.issued
        assert handover < 3.0, handover
        print(
            f"\n[graceful, {_mode(routed_server)}] hand-over {handover * 1000:.0f} ms, "
            f"calls {sum(load.issued.values())}, retries {load.retries} {load.errors}, "
            f"max call latency {max(load.gaps) * 1000:.0f} ms"
        )


@pytest.mark.slow
class TestKillTakeover:
    """kill -9: the dead worker's leases expire and the others take over within the TTL bound."""

    async def test_kill9_takeover_and_alarms(
        self, server: EmbeddedNatsServer, make_cluster: ClusterFactory
    ) -> None:
        """Takeover within lease TTL + 1.5 s; acknowledged updates and pending alarms survive."""
        cluster = await make_cluster(server.url, partitions=PARTITIONS, lease_ttl=2)
        victim = await cluster.start("victim")
        await cluster.start("survivor")
        status = await cluster.settled({"victim", "survivor"})
        victim_partitions = next(m.partitions for m in status.members if m.name == "victim")
        client = ActorClient(cluster.nc, retry=RetryPolicy(attempts=30, max_backoff=0.3))
        reminders = one_object_per_partition("Reminder", PARTITIONS, "k")
        at = time.time() + 2.0
        for object_id in reminders:
            await client.get(Reminder, object_id).call(Reminder.schedule, at)
        load = Load(cluster.nc, one_object_per_partition("Slow", PARTITIONS, "k"))
        load.start(idempotent=True)
        await asyncio.sleep(0.7)
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        await cluster.wait_for(
            lambda s: (
                {m.name for m in s.members} == {"survivor"}
                and all(s.holders().get(p) == s.members[0].id for p in victim_partitions)
            ),
            timeout=10,
            interval=0.02,
        )
        takeover = time.monotonic() - killed
        await asyncio.sleep(0.5)
        await load.stop()
        values = await load.values()
        assert values == load.acked == load.issued
        assert takeover < cluster.lease_ttl + 1.5, takeover
        deadline = time.monotonic() + 10
        while True:
            fired = [await client.get(Reminder, i).call(Reminder.fired) for i in reminders]
            if all(fired) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert all(f and f[0][0] == at for f in fired), fired  # none lost (at-least-once)
        print(
            f"\n[kill -9] takeover {takeover * 1000:.0f} ms (lease TTL {cluster.lease_ttl}s), "
            f"calls {sum(load.issued.values())}, retries {load.retries} {load.errors}, "
            f"max call latency {max(load.gaps) * 1000:.0f} ms"
        )


@pytest.mark.slow
class TestChurn:
    """Workers killed (-9 or SIGTERM) and started about every second never lose an update."""

    async def test_churn(self, server: EmbeddedNatsServer, make_cluster: ClusterFactory) -> None:
        """Idempotent callers: final == issued == acknowledged. Single-try callers: final is
        between acknowledged and acknowledged + unknown outcomes (timeouts)."""
        cluster = await make_cluster(server.url, partitions=PARTITIONS, lease_ttl=2)
        live = [cluster.spawn(f"c{i}") for i in range(3)]
        await cluster.wait_for(lambda s: len(s.members) == 3 and not s.unheld, timeout=20)
        retried = Load(cluster.nc, one_object_per_partition("Slow", PARTITIONS, "ci"))
        single = Load(cluster.nc, one_object_per_partition("Slow", PARTITIONS, "cs")[:4])
        retried.start(idempotent=True, per_object=3)
        single.start(idempotent=False)
        rng = random.Random(4)
        ended = time.monotonic() + 12
        kills = terms = 0
        serial = 3
        while time.monotonic() < ended:
            await asyncio.sleep(rng.uniform(0.7, 1.3))
            victim = rng.choice([w for w in live if w.alive])
            if rng.random() < 0.5:
                victim.signal(signal.SIGKILL)
                kills += 1
            else:
                victim.signal(signal.SIGTERM)
                terms += 1
            live.remove(victim)
            live.append(cluster.spawn(f"c{serial}"))
            serial += 1
        names = {w.name for w in live}
        await cluster.settled(names, timeout=20)
        await asyncio.sleep(0.5)
        await retried.stop()
        await single.stop()
        values = await retried.values()
        assert values == retried.acked == retried.issued
        singles = await single.values()
        for object_id, value in singles.items():
            acked, unknown = single.acked[object_id], single.unknown[object_id]
            assert acked <= value <= acked + unknown, (object_id, value, acked, unknown)
        total = sum(retried.acked.values())
        assert total > 100, total
        # -SIGTERM: a worker signalled while it was still importing (before its handler was
        # installed) ends by the signal's default action, not by a crash.
        ended_by_signal = (0, -signal.SIGKILL, -signal.SIGTERM)
        for worker in cluster.workers:
            if not worker.alive and worker.proc.returncode not in ended_by_signal:
                raise AssertionError(f"{worker.name} crashed:\n{worker.log_text()[-2000:]}")
        print(
            f"\n[churn] {kills} kill -9, {terms} SIGTERM in 12 s; idempotent calls {total} "
            f"(retries {retried.retries} {retried.errors}); single-try acked "
            f"{sum(single.acked.values())}, failed {sum(single.failed.values())}, unknown "
            f"{sum(single.unknown.values())}; max call latency {max(retried.gaps) * 1000:.0f} ms"
        )


@pytest.mark.slow
class TestServerRestart:
    """A nats-server restart under load: workers reconnect, re-establish leases, lose nothing."""

    async def test_restart_under_load(self, server: EmbeddedNatsServer, start_workers) -> None:
        """A quick restart (leases outlive it) and an outage longer than the lease TTL (leases
        expire): afterwards every partition is served again and final == issued == acked."""
        workers = [await start_workers(server.url), await start_workers(server.url)]
        await _wait(lambda: _split(workers))
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            load = Load(nc, one_object_per_partition("Slow", PARTITIONS, "s"))
            load.start(idempotent=True)
            await asyncio.sleep(0.7)
            await server.restart()
            restarted = time.monotonic()
            await asyncio.sleep(0.2)
            await _wait(lambda: _split(workers), timeout=20)
            quick = time.monotonic() - restarted
            await asyncio.sleep(0.7)
            await server.stop()
            await asyncio.sleep(3.0)  # longer than lease_ttl=2: every lease expires
            assert not any(w.partitions for w in workers)  # each stopped serving on its own
            await server.start()
            restarted = time.monotonic()
            await asyncio.sleep(0.2)
            await _wait(lambda: _split(workers), timeout=20)
            slow = time.monotonic() - restarted
            await asyncio.sleep(1.0)
            await load.stop()
            values = await load.values()
            status = await fetch_status(nc, "ndo")
        finally:
            await nc.close()
        assert values == load.acked == load.issued
        assert sum(load.acked.values()) > 0
        assert not status.unheld
        assert {m.id for m in status.members} == {w.member_id for w in workers}
        print(
            f"\n[server restart] partitions served again {quick * 1000:.0f} ms after a quick "
            f"restart, {slow * 1000:.0f} ms after a 3 s outage; calls "
            f"{sum(load.issued.values())}, retries {load.retries} {load.errors}"
        )
