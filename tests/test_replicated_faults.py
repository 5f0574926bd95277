"""Replicated storage under faults: worker processes on a 3-node NATS cluster.

Every worker runs ``ndo serve --storage replicated`` with its own data directory (its own local
copy), as on separate machines. The faults are the ones replicated storage exists for: a worker
killed with its disk gone, the NATS server leading the partition log stream killed, a holder
paused past its lease, and a worker restarted on a stale copy. The promise checked each time is
the same and exact: every acknowledged update is there, once; no caller ever sees a wrong value;
and the partition logs are well-formed (each record follows the previous one, no record of an
older tenure after a newer tenure's claim).

Callers retry each call with the same ``Idempotency-Key`` until it is acknowledged, and there is
one caller per object, so the k-th acknowledged ``Slow.bump`` of an object must return k and the
final value must equal the acknowledgements.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import time
import uuid
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, RetryPolicy
from ndo.ops._status import DeploymentStatus, StatusError
from ndo.service import PartitionLog, log_stream_name
from ndo.storage import LogRecord
from tests.cluster_fixtures import (
    Cluster,
    ClusterFactory,
    StatusPredicate,
    WorkerProcess,
    _make_cluster,  # noqa: F401  (fixture)
    object_in_partition,
    one_object_per_partition,
    request,
)
from tests.nats_cluster import NatsCluster, _nats_cluster  # noqa: F401  (fixture)
from tests.objects import Slow

pytestmark = pytest.mark.slow

PARTITIONS = 8
LEASE_TTL = 2
REPLICATED = ["--storage", "replicated"]
SNAPSHOT_EVERY = 20
"""Small, so snapshots are taken and the logs purged below them during the tests: a copy
restored after a fault then needs the snapshot plus the log tail."""
TAIL = 3
"""Bumps per object after the last snapshot (fewer than ``SNAPSHOT_EVERY``)."""
CALL_LIMIT = 40.0
"""Longest a caller keeps retrying one call before the test fails."""


async def call(
    nc: NatsClient, subject: str, body: bytes, *, timeout: float, key: str | None = None
) -> tuple[str, Any]:
    """``request``, also when the connection is down between two servers (its server was
    killed): ``("disconnected", why)``."""
    try:
        return await request(nc, subject, body, timeout=timeout, key=key)
    except nats.errors.Error as exc:  # reconnecting after its server was killed
        return "disconnected", repr(exc)


class Load:
    """One caller per ``Slow`` object bumping it in a loop; each call is retried under the same
    Idempotency-Key until acknowledged (503s, timeouts and reconnects are retried; any other
    error fails the test)."""

    def __init__(self, nc: NatsClient, ids: list[str], *, pause: float = 0.005) -> None:
        self.nc = nc
        self.ids = ids
        self.body = json.dumps({"pause": pause}).encode()
        self.issued = dict.fromkeys(ids, 0)
        self.acked = dict.fromkeys(ids, 0)
        self.wrong: list[tuple[str, int, Any]] = []
        """(object, expected, returned) of acknowledged calls that returned a wrong value."""
        self.unexpected: list[tuple[str, Any]] = []
        """Errors that are not "retry later" (anything but a 503)."""
        self.errors: dict[str, int] = {}
        self.ack_times: list[float] = []
        self.longest_call = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def total(self) -> int:
        return sum(self.acked.values())

    def start(self) -> None:
        for object_id in self.ids:
            self._tasks.append(asyncio.create_task(self._caller(object_id)))

    async def stop(self) -> None:
        """Stop after the calls in progress are acknowledged."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert not self.unexpected, self.unexpected
        assert not self.wrong, self.wrong

    def acks_since(self, moment: float) -> int:
        return sum(1 for t in self.ack_times if t > moment)

    def longest_gap(self, after: float) -> float:
        """Longest time without any acknowledgement, from ``after`` on."""
        times = [after, *sorted(t for t in self.ack_times if t > after)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def _caller(self, object_id: str) -> None:
        subject = f"ndo.rpc.Slow.{object_id}.bump"
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            self.issued[object_id] += 1
            started = time.monotonic()
            backoff = 0.02
            while True:
                outcome, detail = await call(self.nc, subject, self.body, timeout=2.0, key=key)
                if outcome == "ok":
                    self.acked[object_id] += 1
                    if detail != self.acked[object_id]:
                        self.wrong.append((object_id, self.acked[object_id], detail))
                    now = time.monotonic()
                    self.ack_times.append(now)
                    self.longest_call = max(self.longest_call, now - started)
                    break
                label = f"{detail[0]}:{detail[1]}" if outcome == "error" else outcome
                self.errors[label] = self.errors.get(label, 0) + 1
                if outcome == "error" and detail[0] != 503:
                    self.unexpected.append((object_id, detail))
                    return
                if time.monotonic() - started > CALL_LIMIT:
                    self.unexpected.append((object_id, f"no ack in {CALL_LIMIT}s: {self.errors}"))
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)

    async def values(self) -> dict[str, int]:
        client = ActorClient(self.nc, timeout=2, retry=RetryPolicy(attempts=40, max_backoff=0.5))
        return {i: await client.get(Slow, i).call(Slow.read) for i in self.ids}

    def summary(self) -> str:
        return (
            f"acks {self.total}, retried errors {self.errors}, "
            f"longest call {self.longest_call * 1000:.0f} ms"
        )


async def replicated_cluster(
    make_cluster: ClusterFactory, nats_cluster: NatsCluster, *extra: str
) -> Cluster:
    """Workers with ``--storage replicated``, each with its own data directory."""
    return await make_cluster(
        nats_cluster.url,
        partitions=PARTITIONS,
        lease_ttl=LEASE_TTL,
        extra=[*REPLICATED, *extra],
        separate_data_dirs=True,
    )


async def start_all(cluster: Cluster, first: str, *others: str) -> DeploymentStatus:
    """Start worker ``first`` (it creates the replicated assets), then ``others`` together, and
    wait until they share every partition. (Workers started all at once on a fresh cluster:
    ``TestConcurrentStart``.)"""
    await cluster.start(first)
    workers = [cluster.spawn(name) for name in others]
    try:
        return await cluster.settled({first, *others}, timeout=30)
    except AssertionError:
        for worker in workers:
            print(f"--- {worker.name} ---\n{worker.log_text()[-3000:]}")
        raise


def partitions_of(status: DeploymentStatus, name: str) -> set[int]:
    return {p for m in status.members if m.name == name for p in m.partitions}


def held_only_by(names: set[str]) -> StatusPredicate:
    """Status predicate: exactly ``names`` are members and they hold every partition."""

    def ok(s: DeploymentStatus) -> bool:
        holders = {m.id for m in s.members if m.name in names}
        return (
            {m.name for m in s.members} == names
            and not s.unheld
            and all(owner in holders for owner in s.holders().values())
        )

    return ok


def log_events(worker: WorkerProcess, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines whose event is ``event``."""
    found = []
    for line in worker.log_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            found.append(entry)
    return found


async def read_log(log: PartitionLog, partition: int, last: int) -> list[tuple[int, LogRecord]]:
    """``partition``'s records up to ``last``."""
    return [r async for batch in log.read(partition, 0, last) for r in batch]


async def check_logs(nc: NatsClient) -> dict[int, int]:
    """Every partition log is one chain (each record's ``prev`` is the record before it, from
    the first one kept), each claim has a higher epoch than the one before, and every other
    record has the epoch of the latest claim (no append of an older tenure after a newer
    claim). Returns the records kept per partition."""
    log = PartitionLog(nc, "ndo", replicas=1, append_timeout=5.0)
    kept: dict[int, int] = {}
    for partition in range(PARTITIONS):
        last = await log.last(partition)
        records = await read_log(log, partition, last) if last else []
        previous: int | None = None
        tenure: int | None = None
        for seq, record in records:
            if previous is not None:
                assert record.prev == previous, (partition, seq, record.prev, previous)
            where = f"partition {partition}, record {seq} by {record.writer}"
            if record.claim:
                assert tenure is None or record.epoch > tenure, (where, record.epoch, tenure)
                tenure = record.epoch
            else:
                if tenure is None:  # its tenure's claim is below the snapshot (purged)
                    tenure = record.epoch
                assert record.epoch == tenure, (where, record.epoch, tenure)
            previous = seq
        assert (previous or 0) == last, (partition, previous, last)
        kept[partition] = len(records)
    return kept


class TestConcurrentStart:
    """Workers started at the same moment on a fresh cluster, as an orchestrator starts them."""

    async def test_workers_started_together_all_join(
        self, nats_cluster: NatsCluster, make_cluster: ClusterFactory
    ) -> None:
        """Three workers started at once, before any JetStream asset exists, all join and share
        the partitions: a worker that finds an asset another one is still creating (its
        replicas electing a leader) waits for it instead of exiting."""
        cluster = await replicated_cluster(make_cluster, nats_cluster)
        workers = [cluster.spawn(name) for name in ("x", "y", "z")]
        deadline = time.monotonic() + 30
        while True:
            exited = [w for w in workers if not w.alive]
            assert not exited, "\n".join(
                f"--- {w.name} exited with {w.proc.returncode}:\n{w.log_text()[-1500:]}"
                for w in exited
            )
            try:
                status: DeploymentStatus | None = await cluster.status()
            except (StatusError, nats.errors.Error):
                status = None
            if (
                status is not None
                and held_only_by({"x", "y", "z"})(status)
                and all(m.partitions for m in status.members)
            ):
                break
            assert time.monotonic() < deadline, f"not settled in 30 s: {status}"
            await asyncio.sleep(0.05)
        client = ActorClient(cluster.nc, timeout=2, retry=RetryPolicy(attempts=20, max_backoff=0.2))
        for object_id in one_object_per_partition("Slow", PARTITIONS, "c"):
            assert await client.get(Slow, object_id).call(Slow.bump) == 1


class TestWorkerLostWithItsDisk:
    """kill -9 of a worker whose data directory is then deleted: the logs are the record."""

    async def test_kill9_and_wipe_under_load(
        self, nats_cluster: NatsCluster, make_cluster: ClusterFactory
    ) -> None:
        """Under idempotent read-modify-write load, a worker is killed and its data directory
        deleted: the survivors take its partitions (every partition held again) and every
        acknowledged bump is there exactly once. A fresh worker started on the empty directory
        rebuilds its copy from snapshots and log tails and serves exact values."""
        cluster = await replicated_cluster(
            make_cluster, nats_cluster, "--snapshot-every", str(SNAPSHOT_EVERY)
        )
        status = await start_all(cluster, "victim", "s1", "s2")
        victim = next(w for w in cluster.workers if w.name == "victim")
        lost = partitions_of(status, "victim")
        assert lost
        load = Load(cluster.nc, one_object_per_partition("Slow", PARTITIONS, "k"))
        load.start()
        await asyncio.sleep(1.0)
        before = load.total
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        await victim.wait_exit(5)
        shutil.rmtree(victim.data_dir)
        await cluster.wait_for(held_only_by({"s1", "s2"}), timeout=15)
        takeover = time.monotonic() - killed
        await asyncio.sleep(0.5)
        assert load.acks_since(killed + takeover) > 0, load.summary()
        # A new machine in its place: same name, empty data directory.
        fresh = cluster.spawn("victim")
        assert fresh.data_dir == victim.data_dir and not fresh.data_dir.exists()
        final = await cluster.wait_for(
            lambda s: (
                held_only_by({"victim", "s1", "s2"})(s)
                and any(m.pid == fresh.pid and m.partitions for m in s.members)
            ),
            timeout=30,
            worker=fresh,
        )
        await asyncio.sleep(0.5)
        await load.stop()
        values = await load.values()
        assert load.total > before
        assert values == load.acked == load.issued, load.summary()
        # The fresh worker serves its share from a copy it rebuilt (values read through it
        # above are among the exact ones).
        served = partitions_of(final, "victim")
        assert served
        caught_up = {e["partition"] for e in log_events(fresh, "partition caught up from its log")}
        restored = {
            e["partition"] for e in log_events(fresh, "partition restored from its snapshot")
        }
        assert served <= caught_up | restored, (served, caught_up, restored)
        kept = await check_logs(cluster.nc)
        print(
            f"\n[kill -9 + wipe] takeover {takeover * 1000:.0f} ms; fresh worker restored "
            f"{sorted(restored)} from snapshots; records kept {kept}; {load.summary()}"
        )


class TestLogLeaderKilled:
    """kill -9 of the nats-server leading the partition log stream, under load."""

    async def test_kill_stream_leader_under_load(
        self, nats_cluster: NatsCluster, make_cluster: ClusterFactory
    ) -> None:
        """Commits stall while the stream elects a new leader, then resume; callers see only
        retryable errors or timeouts, never a wrong value, and every acknowledged bump is
        there exactly once."""
        cluster = await replicated_cluster(make_cluster, nats_cluster)
        await start_all(cluster, "a", "b")
        load = Load(cluster.nc, one_object_per_partition("Slow", PARTITIONS, "l"))
        load.start()
        await asyncio.sleep(1.0)
        leader = await nats_cluster.stream_leader(log_stream_name("ndo"))
        before = load.total
        killed = time.monotonic()
        await leader.kill()
        deadline = killed + 25
        while load.acks_since(killed) < 5 * PARTITIONS:
            assert time.monotonic() < deadline, f"commits did not resume: {load.summary()}"
            await asyncio.sleep(0.1)
        resumed = time.monotonic() - killed
        new_leader = await nats_cluster.stream_leader(log_stream_name("ndo"))
        assert new_leader is not leader
        await cluster.wait_for(held_only_by({"a", "b"}), timeout=15)
        await asyncio.sleep(0.5)
        await load.stop()
        values = await load.values()
        assert load.total > before
        assert values == load.acked == load.issued, load.summary()
        await check_logs(cluster.nc)
        print(
            f"\n[log leader killed] {load.acks_since(killed)} acks after the kill, longest "
            f"pause {load.longest_gap(killed) * 1000:.0f} ms, {resumed * 1000:.0f} ms to 40 "
            f"acks; {load.summary()}"
        )


class TestPausedHolder:
    """SIGSTOP past the lease TTL, another worker takes over and writes, SIGCONT."""

    async def test_sigstop_then_resume(
        self, nats_cluster: NatsCluster, make_cluster: ClusterFactory
    ) -> None:
        """The paused worker's in-flight write is refused by the log (its caller gets 503
        fenced, never a success that would be lost); the new holder's updates stand; the
        resumed worker drops what it lost and the two share the work again."""
        cluster = await replicated_cluster(make_cluster, nats_cluster)
        status = await start_all(cluster, "paused", "other")
        paused = next(w for w in cluster.workers if w.name == "paused")
        mine = partitions_of(status, "paused")
        object_id = object_in_partition("Slow", PARTITIONS, mine, "p")
        subject = f"ndo.rpc.Slow.{object_id}.bump"
        nc = cluster.nc
        assert (await call(nc, subject, b"{}", timeout=5)) == ("ok", 1)
        in_flight = asyncio.create_task(
            call(nc, subject, json.dumps({"pause": 1.0}).encode(), timeout=20)
        )
        await asyncio.sleep(0.3)  # read n=1, now awaiting inside the handler
        paused.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await cluster.wait_for(
                lambda s: (
                    {m.name for m in s.members} == {"other"}
                    and all(s.holders().get(p) == s.members[0].id for p in mine)
                ),
                timeout=10,
            )
            takeover = time.monotonic() - stopped
            # The new holder serves the object from its copy caught up from the log.
            client = ActorClient(nc, timeout=1.0, retry=RetryPolicy(attempts=30, max_backoff=0.2))
            for expected in (2, 3, 4):
                assert await client.get(Slow, object_id).call(Slow.bump) == expected
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))
        finally:
            paused.signal(signal.SIGCONT)
        outcome = await in_flight
        # Not ("ok", 2): that write was computed from a stale read, and the log refuses it.
        assert outcome[0] == "error" and outcome[1][:2] == (503, "fenced"), outcome
        client = ActorClient(nc, timeout=2.0, retry=RetryPolicy(attempts=30, max_backoff=0.2))
        assert await client.get(Slow, object_id).call(Slow.read) == 4
        await cluster.settled({"paused", "other"}, timeout=20)
        assert await client.get(Slow, object_id).call(Slow.bump) == 5
        assert await client.get(Slow, object_id).call(Slow.read) == 5
        assert log_events(paused, "partition lost"), paused.log_text()[-3000:]
        refused = [
            e
            for e in log_events(paused, "giving a partition up")
            if "another tenure" in str(e.get("reason"))
        ]
        # Refused by the log itself: on SIGCONT the turn's append goes out before the worker
        # can learn (two round trips to the lease bucket) that its lease was taken.
        assert refused, paused.log_text()[-3000:]
        await check_logs(nc)
        print(f"\n[SIGSTOP] takeover after {takeover * 1000:.0f} ms")


class TestStaleRestart:
    """A worker restarted on its own, now stale, data directory."""

    async def test_restart_on_stale_copy_catches_up(
        self, nats_cluster: NatsCluster, make_cluster: ClusterFactory
    ) -> None:
        """After kill -9, the survivor writes to every partition; the victim restarts on its
        stale copy and catches up from the snapshot and log before serving: values read
        right after it serves are exact, and still are once it holds every partition."""
        cluster = await replicated_cluster(
            make_cluster, nats_cluster, "--snapshot-every", str(SNAPSHOT_EVERY)
        )
        await start_all(cluster, "stale", "survivor")
        stale = next(w for w in cluster.workers if w.name == "stale")
        survivor = next(w for w in cluster.workers if w.name == "survivor")
        ids = one_object_per_partition("Slow", PARTITIONS, "r")  # ids[p] is in partition p
        load = Load(cluster.nc, ids)
        load.start()
        await asyncio.sleep(1.0)
        stale.signal(signal.SIGKILL)
        await stale.wait_exit(5)
        at_kill = dict(load.acked)
        assert (stale.data_dir / "replica.sqlite3").exists()
        await cluster.wait_for(held_only_by({"survivor"}), timeout=15)
        # Every partition moves on without the stale copy, past a snapshot (taken within a
        # second of SNAPSHOT_EVERY records), so part of what it missed is only in the snapshot
        # store and the log was purged below it.
        deadline = time.monotonic() + 20
        while any(load.acked[i] - at_kill[i] < SNAPSHOT_EVERY + 5 for i in ids):
            assert time.monotonic() < deadline, load.summary()
            await asyncio.sleep(0.1)
        await load.stop()
        acked = dict(load.acked)
        await asyncio.sleep(1.5)  # the last snapshots are taken
        # A tail after the snapshot: the copy needs the snapshot and then the log.
        client = ActorClient(cluster.nc, timeout=2, retry=RetryPolicy(attempts=40, max_backoff=0.2))
        for object_id in ids:
            for _ in range(TAIL):
                acked[object_id] += 1
                assert await client.get(Slow, object_id).call(Slow.bump) == acked[object_id]
        log = PartitionLog(cluster.nc, "ndo", replicas=1, append_timeout=5.0)
        ends = {p: await log.last(p) for p in range(PARTITIONS)}
        back = cluster.spawn("stale")
        assert back.data_dir == stale.data_dir
        status = await cluster.wait_for(
            lambda s: any(m.pid == back.pid and m.partitions for m in s.members),
            timeout=20,
            worker=back,
        )
        served = partitions_of(status, "stale")
        first = {ids[p]: await client.get(Slow, ids[p]).call(Slow.read) for p in sorted(served)}
        assert first == {ids[p]: acked[ids[p]] for p in sorted(served)}
        # Hand everything to the restarted worker: it serves every partition it had held,
        # each caught up from where its copy stopped.
        survivor.signal(signal.SIGTERM)
        await cluster.settled({"stale"}, timeout=20)
        assert await survivor.wait_exit(10) == 0
        assert await load.values() == acked
        # Every partition's copy went from its stale position to the end of the log, through
        # the snapshot (the log no longer held what the copy missed) and, for the partitions
        # whose latest snapshot is older than the tail bumps, the records after it.
        caught_up = log_events(back, "partition caught up from its log")
        restored = log_events(back, "partition restored from its snapshot")
        assert {e["partition"]: e["position"] for e in caught_up} == ends, caught_up
        assert {e["partition"] for e in restored} == set(range(PARTITIONS)), restored
        assert sum(e["records"] for e in caught_up) > 0, caught_up
        await check_logs(cluster.nc)
        print(
            f"\n[stale restart] first served {sorted(served)}; restored from snapshots "
            f"{sorted(e['partition'] for e in restored)}; "
            f"records replayed {sum(e['records'] for e in caught_up)}; {load.summary()}"
        )
