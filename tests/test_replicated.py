"""Replicated storage against a real nats-server (and a 3-node cluster): the partition log is
the durable record, the append is the fence, a new holder restores snapshot + tail, and every
JetStream asset is replicated like the cluster.

Process-level faults (kill -9, SIGSTOP, killing a stream leader) are in
``test_replicated_faults.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._status import fetch_status, format_status
from ndo.service import (
    DeploymentMismatchError,
    PartitionLog,
    ReplicatedStorage,
    Worker,
    WorkerConfig,
    lease_bucket,
    log_stream_name,
    snapshot_bucket,
)
from ndo.service._cluster import ReplicasError
from ndo.storage import FencedError, ObjectWrite, StorageError, decode_log_record
from ndo.subjects import log_subject
from tests.nats_cluster import NatsCluster
from tests.worker_fixtures import Replicas, WorkerFactory

PARTITION = 3


def _write(value: int, *, epoch: int, oid: str = "a", partition: int = PARTITION) -> ObjectWrite:
    return ObjectWrite("Counter", oid, partition, epoch, {"n": msgspec.msgpack.encode(value)})


async def _value(storage: ReplicatedStorage, oid: str = "a") -> int | None:
    raw = await storage.read("Counter", oid, "n")
    return None if raw is None else int(msgspec.msgpack.decode(raw))


async def _subject_messages(nc: NatsClient, partition: int) -> int:
    info = await nc.jetstream().stream_info(log_stream_name("ndo"), subjects_filter=">")
    return (info.state.subjects or {}).get(log_subject("ndo", partition), 0)


class TestCommit:
    async def test_a_commit_is_in_the_log_before_it_returns(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """A committed write-set is a record on its partition's log (with the claim before it),
        and the local copy holds it at that log position."""
        storage = await replicas.open("w1")
        epochs = await storage.claim_partitions([PARTITION], "w1", 7)
        assert epochs == {PARTITION: 7}
        assert await storage.commit([_write(41, epoch=7), _write(1, epoch=7, oid="b")]) == set()
        log = PartitionLog(nc, "ndo", replicas=1, append_timeout=1.0)
        last = await log.last(PARTITION)
        records = [r async for batch in log.read(PARTITION, 0, last) for r in batch]
        assert [r.claim for _, r in records] == [True, False]
        commit = records[-1][1]
        assert commit.epoch == 7 and commit.prev == records[0][0]
        assert [(w.object_id, w.writes) for w in commit.writes] == [
            ("a", {"n": msgspec.msgpack.encode(41)}),
            ("b", {"n": msgspec.msgpack.encode(1)}),
        ]
        assert await _value(storage) == 41
        assert storage.position(PARTITION) == last
        assert (await storage.local.log_positions())[PARTITION] == (last, 7)

    async def test_a_commit_over_many_partitions_is_one_atomic_batch(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """The shares of several partitions go out as one atomic batch: consecutive stream
        sequences, each record on its own partition's log, following that partition's claim."""
        storage = await replicas.open("w1")
        partitions = [0, 2, 5, 7]
        await storage.claim_partitions(partitions, "w1", 3)
        claims = {p: storage.position(p) for p in partitions}
        await storage.commit([_write(p * 10, epoch=3, partition=p) for p in partitions])
        seqs = [storage.position(p) for p in partitions]
        assert all(s is not None for s in seqs)
        first = seqs[0]
        assert first is not None and seqs == list(range(first, first + len(partitions)))
        log = PartitionLog(nc, "ndo", replicas=1, append_timeout=1.0)
        for p in partitions:
            found = await log.first_after(p, claims[p] or 0)
            assert found is not None
            seq, record = found
            assert seq == storage.position(p) and record.prev == claims[p]
            assert [w.writes["n"] for w in record.writes] == [msgspec.msgpack.encode(p * 10)]
        assert await _value(storage, "a") == 70  # one object id in four partitions: the last

    async def test_a_write_set_larger_than_a_message_fails_and_appends_nothing(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """A single write-set that cannot fit in one NATS message is refused with a clear
        error; nothing reaches the log or the copy."""
        storage = await replicas.open("w1")
        await storage.claim_partitions([PARTITION], "w1", 1)
        huge = ObjectWrite("Counter", "a", PARTITION, 1, {"blob": b"x" * (nc.max_payload + 1)})
        with pytest.raises(StorageError, match="max_payload"):
            await storage.commit([huge])
        assert await _subject_messages(nc, PARTITION) == 1  # the claim only
        assert await storage.read("Counter", "a", "blob") is None

    async def test_a_batch_larger_than_a_message_is_split_in_order(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """Many write-sets of one partition that together exceed a message go out as several
        chained records, and the last write wins."""
        storage = await replicas.open("w1")
        await storage.claim_partitions([PARTITION], "w1", 1)
        big = b"y" * (300 * 1024)
        batch = [
            ObjectWrite("Counter", "a", PARTITION, 1, {"blob": big, "n": msgspec.msgpack.encode(i)})
            for i in range(8)
        ]
        await storage.commit(batch)
        assert await _subject_messages(nc, PARTITION) > 2
        assert await _value(storage) == 7


class TestFencing:
    async def test_an_earlier_tenure_cannot_append_after_a_claim(self, replicas: Replicas) -> None:
        """Once a newer tenure claimed the partition in the log, the older holder's commit is
        refused (fenced), it is told to drop the partition, and the value is the new holder's."""
        old = await replicas.open("old")
        new = await replicas.open("new")
        await old.claim_partitions([PARTITION], "old", 10)
        await old.commit([_write(1, epoch=10)])
        await new.claim_partitions([PARTITION], "new", 11)
        assert await _value(new) == 1  # caught up from the log
        assert await old.commit([_write(99, epoch=10)]) == {PARTITION}
        assert ("old", PARTITION) in replicas.lost
        assert await new.commit([_write(2, epoch=11)]) == set()
        assert await _value(new) == 2
        assert await old.commit([_write(100, epoch=10)]) == {PARTITION}  # not held any more

    async def test_a_fenced_partition_in_a_batch_spares_the_others(
        self, replicas: Replicas
    ) -> None:
        """A batch over several partitions, one of which a newer tenure claimed: that one is
        fenced, the others are made durable (the refused batch is appended one by one)."""
        old = await replicas.open("old")
        new = await replicas.open("new")
        await old.claim_partitions([1, 2, 3], "old", 10)
        await new.claim_partitions([2], "new", 11)
        fenced = await old.commit(
            [_write(7, epoch=10, oid=f"o{p}", partition=p) for p in (1, 2, 3)]
        )
        assert fenced == {2}
        assert await _value(old, "o1") == 7 and await _value(old, "o3") == 7
        assert await _value(old, "o2") is None
        await new.claim_partitions([2], "new", 12)  # reads the log again: nothing of old's
        assert await _value(new, "o2") is None

    async def test_a_claim_older_than_the_log_is_refused(self, replicas: Replicas) -> None:
        """Claiming with an epoch below the log's latest raises FencedError."""
        first = await replicas.open("first")
        second = await replicas.open("second")
        await first.claim_partitions([PARTITION], "first", 20)
        with pytest.raises(FencedError):
            await second.claim_partitions([PARTITION], "second", 19)

    async def test_an_append_of_the_old_tenure_before_the_claim_is_not_lost(
        self, replicas: Replicas
    ) -> None:
        """If the older holder appends between the new holder's catch-up and its claim, the
        claim reads the log again: the acknowledged write is in the new holder's copy."""
        old = await replicas.open("old")
        new = await replicas.open("new")
        await old.claim_partitions([PARTITION], "old", 1)
        await new.catch_up(PARTITION)
        await old.commit([_write(5, epoch=1)])  # lands after new's catch-up
        await new.claim_partitions([PARTITION], "new", 2)
        assert await _value(new) == 5


class TestRestore:
    async def test_a_new_holder_restores_snapshot_and_tail(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """A holder with an empty copy gets the snapshot plus the records after it; the log was
        purged below the snapshot."""
        first = await replicas.open("first")
        await first.claim_partitions([PARTITION], "first", 1)
        for i in range(40):
            await first.commit([_write(i, epoch=1), _write(-i, epoch=1, oid=f"o{i}")])
        covered = await first.snapshot(PARTITION)
        assert covered is not None
        for i in range(40, 45):
            await first.commit([_write(i, epoch=1)])
        assert await _subject_messages(nc, PARTITION) == 6  # the covered record and 5 more
        second = await replicas.open("second")
        await second.claim_partitions([PARTITION], "second", 2)
        assert await _value(second) == 44
        assert [await _value(second, f"o{i}") for i in (0, 17, 39)] == [0, -17, -39]
        assert second.stats.restored_records == 5

    async def test_a_stale_copy_catches_up_from_the_log(self, replicas: Replicas) -> None:
        """A holder that comes back to a partition others wrote to applies what it missed."""
        a = await replicas.open("a")
        b = await replicas.open("b")
        await a.claim_partitions([PARTITION], "a", 1)
        await a.commit([_write(1, epoch=1)])
        await b.claim_partitions([PARTITION], "b", 2)
        for i in range(2, 12):
            await b.commit([_write(i, epoch=2)])
        await a.claim_partitions([PARTITION], "a", 3)
        assert await _value(a) == 11
        assert a.stats.restored_records == 11  # b's claim and ten commits

    async def test_a_gap_without_a_snapshot_is_refused(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """If the log was purged past a copy and no snapshot covers it, claiming fails with a
        message that says so, instead of serving a partition with holes."""
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 1)
        for i in range(5):
            await a.commit([_write(i, epoch=1)])
        last = await PartitionLog(nc, "ndo", replicas=1, append_timeout=1).last(PARTITION)
        await nc.jetstream().purge_stream(
            log_stream_name("ndo"), subject=log_subject("ndo", PARTITION), seq=last
        )
        b = await replicas.open("b")
        with pytest.raises(StorageError, match="cannot be restored"):
            await b.claim_partitions([PARTITION], "b", 2)

    async def test_a_foreign_message_on_the_log_is_skipped(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """Something other than ndo publishing on a log subject is skipped by the next claim
        (nothing of it is applied); strict readers still refuse it, naming the message.
        (More cases: ``test_foreign_records.py``.)"""
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 1)
        await a.commit([_write(5, epoch=1)])
        await nc.jetstream().publish(log_subject("ndo", PARTITION), b'{"not": "a record"}')
        b = await replicas.open("b")
        await b.claim_partitions([PARTITION], "b", 2)
        assert await _value(b) == 5
        log = PartitionLog(nc, "ndo", replicas=1, append_timeout=1.0)
        with pytest.raises(StorageError, match="not a log record"):
            await log.first_after(PARTITION, (a.position(PARTITION) or 0))
        with pytest.raises(ValueError, match="not an ndo partition log record"):
            decode_log_record(b"\x93\x01\x02\x03")

    async def test_snapshots_keep_the_log_bounded(self, replicas: Replicas, nc: NatsClient) -> None:
        """With a snapshot every 10 records, 200 commits leave at most a few dozen records of
        the partition in the stream."""
        storage = await replicas.open("w1", snapshot_every=10)
        await storage.claim_partitions([PARTITION], "w1", 1)
        for i in range(200):
            await storage.commit([_write(i, epoch=1)])
            if i % 10 == 9:
                await storage.snapshot(PARTITION)
        assert await _subject_messages(nc, PARTITION) <= 11
        assert storage.stats.snapshots >= 19


class TestWorker:
    async def test_objects_survive_a_lost_data_directory(
        self, start_worker: WorkerFactory, nats_server: EmbeddedNatsServer, data_dir: Path
    ) -> None:
        """Values written through a replicated worker come back from the log after the worker
        stopped and its data directory was deleted."""
        worker = await start_worker(storage="replicated", journal=False)
        nc = await nats.connect(nats_server.url)
        try:
            client = ActorClient(nc)
            for i in range(30):
                await client.get(Counter, f"c{i % 6}").call(Counter.increment, by=1)
            await worker.stop()
            shutil.rmtree(data_dir)
            second = await start_worker(storage="replicated", journal=False)
            values = [await client.get(Counter, f"c{i}").call(Counter.get) for i in range(6)]
            assert values == [5] * 6
            registry = second.metrics.registry
            restored = registry.get_sample_value("ndo_log_restored_records_total")
            assert restored is not None and restored >= 30  # every commit, read back
            appended = registry.get_sample_value("ndo_log_appends_total", {"outcome": "ok"})
            assert appended is not None and appended >= 8  # a claim per partition at least
            status = await fetch_status(nc, "ndo")
            assert status.storage == "replicated"
            held = [p for p in status.leases if p.owner is not None]
            assert len(held) == 8 and all(p.log_seq and p.log_seq >= 1 for p in held)
            text = format_status(status)
            assert "storage replicated" in text and "SNAPSHOT" in text and "BEHIND" in text
        finally:
            await nc.close()

    async def test_a_deployment_cannot_mix_storage_modes(self, start_worker: WorkerFactory) -> None:
        """A worker with --storage replicated is refused by a deployment that keeps partitions
        locally (and says what to change)."""
        await start_worker(storage="local", journal=False)
        with pytest.raises(DeploymentMismatchError, match="--storage local"):
            await start_worker(storage="replicated", journal=False, data_dir=Path("/nonexistent"))

    async def test_more_replicas_than_servers_is_refused(self, start_worker: WorkerFactory) -> None:
        """--replicas 3 on a single server fails at start with what to change."""
        with pytest.raises(ReplicasError, match="--replicas 1"):
            await start_worker(storage="replicated", replicas=3, journal=False)

    def test_replicated_storage_needs_leases(self) -> None:
        """--storage replicated with --ownership standalone is a configuration error."""
        with pytest.raises(ValueError, match="ownership"):
            WorkerConfig(storage="replicated", ownership="standalone")


class TestCluster:
    async def test_every_asset_is_replicated_like_the_cluster(
        self, nats_cluster: NatsCluster, tmp_path: Path
    ) -> None:
        """On a 3-node cluster, a worker given the comma-separated server list creates the lease
        bucket, journal, partition log and snapshot store with 3 replicas, and serves."""
        config = WorkerConfig(
            nats_url=nats_cluster.url,
            data_dir=tmp_path / "w",
            partitions=4,
            storage="replicated",
        )
        async with Worker(config, [Counter]) as worker:
            assert worker.replicas == 3
            nc = await nats.connect(servers=nats_cluster.urls)
            try:
                client = ActorClient(nc)
                assert await client.get(Counter, "x").call(Counter.increment, by=3) == 3
                js = nc.jetstream()
                streams = [
                    f"KV_{lease_bucket('ndo')}",
                    "NDO_JOURNAL",
                    log_stream_name("ndo"),
                    f"OBJ_{snapshot_bucket('ndo')}",
                ]
                for stream in streams:
                    info = await js.stream_info(stream)
                    assert info.config.num_replicas == 3, stream
            finally:
                await nc.close()
