"""Foreign records: bytes that some other client wrote into ndo's own JetStream assets.

On a shared bus, anyone allowed to publish there can write anything into the lease bucket, the
journal or a partition log. Each test writes such bytes with a plain nats-py client (a KV put,
a publish), then checks the reader: a worker takes a partition back and serves it again within
a few lease TTLs, ``ndo status`` prints its table, replay and tail skip the line with a note,
a partition log's holder skips the message and keeps its data. Never a crash loop, a stuck
partition or a traceback; where skipping could lose data, a clear refusal instead.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue
from structlog.testing import capture_logs

from ndo.actors import ActorClient, RetryPolicy, UnavailableError
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._replay import EXIT_OK, ReplayOptions, run_replay
from ndo.ops._status import StatusError, fetch_status, format_status
from ndo.ops._tail import TailOptions, run_tail
from ndo.service import (
    CONFIG_KEY,
    BucketView,
    OwnershipError,
    PartitionLog,
    ReplicatedStorage,
    SnapshotStore,
    Worker,
    WorkerConfig,
    lease_bucket,
    lease_key,
    member_key,
)
from ndo.service.journal import decode_journal_message, object_marker
from ndo.storage import LogRecord, ObjectWrite, StorageError, encode_log_record
from ndo.subjects import journal_shard, journal_subject, log_subject
from tests.cluster_fixtures import object_in_partition
from tests.helpers import run_ndo
from tests.worker_fixtures import ALL_CLASSES, Replicas, WorkerFactory

PARTITIONS = 8
"""The worker fixture's partition count."""
PARTITION = 3
"""The partition each attack aims at."""
LEASE_TTL = 2
"""Lease TTL of the workers here (seconds): takeovers come within a few of them."""
RECOVERY = 15.0
"""Seconds a worker may take to serve an attacked partition again."""


def _client(nc: NatsClient) -> ActorClient:
    """A client that retries 503s for about ``RECOVERY`` seconds."""
    return ActorClient(
        nc, timeout=2.0, retry=RetryPolicy(attempts=70, initial_backoff=0.05, max_backoff=0.25)
    )


async def _bucket(nc: NatsClient) -> KeyValue:
    return await nc.jetstream().key_value(lease_bucket("ndo"))


async def _until(predicate: Callable[[], bool], timeout: float = RECOVERY) -> None:
    """Wait (bounded) until ``predicate()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def _bucket_with_stopped_worker(start_worker: WorkerFactory) -> None:
    """Create the lease bucket (and its deployment record), then leave no worker running."""
    worker = await start_worker(lease_ttl=LEASE_TTL, journal=False)
    await worker.stop()


class TestLeaseBucket:
    """Foreign values in the lease bucket: leases are taken back, members ignored, the
    deployment record refused with a fix, status printed."""

    def test_the_view_reads_unreadable_leases_as_free(self) -> None:
        """In the view every worker keeps, an unreadable lease is free at its revision (the
        next acquisition's compare-and-set), an unreadable or misfiled member is no member, and
        a key that only looks like a lease key is not a lease; each is listed as unreadable."""
        view = BucketView(epoch_base=1_000)
        lease = msgspec.json.encode({"owner": "w1"})
        member = msgspec.json.encode({"id": "w1", "name": "w1"})
        assert view.apply(lease_key(PARTITION), 7, lease)
        assert view.apply(member_key("w1"), 8, member)
        assert view.leases[PARTITION].epoch == 1_007
        assert view.apply(lease_key(PARTITION), 9, b"garbage")
        assert view.apply(member_key("w1"), 10, msgspec.json.encode({"id": "w2", "name": "w2"}))
        assert not view.apply("leases.03", 11, lease)
        assert PARTITION not in view.leases and view.tombstones[PARTITION] == 9
        assert not view.members
        assert sorted(view.unreadable) == ["leases.03", lease_key(PARTITION), member_key("w1")]
        assert view.apply(lease_key(PARTITION), 12, lease)
        assert lease_key(PARTITION) not in view.unreadable

    async def test_an_unreadable_lease_is_taken_back(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """Garbage written over a held lease: the holder re-acquires it through the fenced path
        at a higher epoch, logs the key once, and the partition's objects answer again."""
        worker = await start_worker(lease_ttl=LEASE_TTL, journal=False)
        stub = _client(nc).get(Counter, object_in_partition("Counter", PARTITIONS, {PARTITION}))
        assert await stub.call(Counter.increment, by=1) == 1
        before = worker.epoch_of(PARTITION)
        kv = await _bucket(nc)
        with capture_logs() as logs:
            await kv.put(lease_key(PARTITION), b"garbage")
            await _until(lambda: worker.epoch_of(PARTITION) > before)
            assert await stub.call(Counter.increment, by=1) == 2
        warnings = _events(logs, "unreadable value in the lease bucket (not written by ndo?)")
        assert [w["key"] for w in warnings] == [lease_key(PARTITION)]
        entry = await kv.get(lease_key(PARTITION))
        assert json.loads(entry.value or b"")["owner"] == worker.member_id

    async def test_foreign_leases_and_members_of_a_stopped_deployment(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """A worker starting on a bucket holding an unreadable lease and an unreadable member
        serves every partition: the lease counts as free, the member as absent."""
        await _bucket_with_stopped_worker(start_worker)
        kv = await _bucket(nc)
        await kv.put(lease_key(PARTITION), b"\x00\xff not json")
        await kv.put(member_key("ghost"), b"garbage")
        impostor = {"id": "someone-else", "name": "x"}  # a member record under another key
        await kv.put(member_key("impostor"), msgspec.json.encode(impostor))
        worker = await start_worker(lease_ttl=LEASE_TTL, journal=False)
        await _until(lambda: len(worker.partitions) == PARTITIONS)
        stub = _client(nc).get(Counter, object_in_partition("Counter", PARTITIONS, {PARTITION}))
        assert await stub.call(Counter.increment, by=1) == 1
        status = await fetch_status(nc, "ndo")
        assert [m.id for m in status.members] == [worker.member_id]

    async def test_a_lease_nobody_renews_is_taken_over(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """A readable lease written without a TTL by a stranger (it never expires) is taken
        over once it has stayed unrenewed for twice the lease TTL."""
        await _bucket_with_stopped_worker(start_worker)
        kv = await _bucket(nc)
        await kv.put(lease_key(PARTITION), msgspec.json.encode({"owner": "ghost"}))
        with capture_logs() as logs:
            worker = await start_worker(lease_ttl=LEASE_TTL, journal=False)
            await _until(lambda: PARTITION in worker.partitions, timeout=3 * LEASE_TTL + 5)
        taken = _events(logs, "taking over a lease nobody renews (written without a TTL?)")
        assert [(t["partition"], t["owner"]) for t in taken] == [(PARTITION, "ghost")]

    async def test_status_shows_unreadable_entries(
        self, start_worker: WorkerFactory, nc: NatsClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """``ndo status`` prints the table: the partition whose lease is unreadable says so,
        and a note names each unreadable key."""
        await _bucket_with_stopped_worker(start_worker)
        kv = await _bucket(nc)
        await kv.put(lease_key(PARTITION), b"garbage")
        await kv.put(member_key("ghost"), b"garbage")
        await kv.put("leases.not-a-number", b"{}")
        status = await fetch_status(nc, "ndo")
        assert status.leases[PARTITION].unreadable is not None
        assert [p.split(":")[0] for p in status.problems] == [
            lease_key(PARTITION),
            "leases.not-a-number",
            member_key("ghost"),
        ]
        rows = [line.split() for line in format_status(status).splitlines()]
        assert [str(PARTITION), "(unreadable)", "-", "-"] in rows
        result = await asyncio.to_thread(run_ndo, "status", "--nats-url", nats_server.url)
        assert result.returncode == 0, result.stderr
        assert "(unreadable)" in result.stdout and "Traceback" not in result.stderr

    async def test_an_unreadable_deployment_record_is_refused_in_one_line(
        self,
        start_worker: WorkerFactory,
        nc: NatsClient,
        nats_server: EmbeddedNatsServer,
        tmp_path: Path,
    ) -> None:
        """A foreign ``config`` value: a starting worker fails with one line saying what is
        wrong and what to do (no traceback, from the API or ``ndo serve``)."""
        await _bucket_with_stopped_worker(start_worker)
        await (await _bucket(nc)).put(CONFIG_KEY, b"garbage")
        config = WorkerConfig(
            nats_url=nats_server.url, data_dir=tmp_path / "other", partitions=PARTITIONS
        )
        worker = Worker(config, ALL_CLASSES)
        try:
            with pytest.raises(OwnershipError) as refused:
                await worker.start()
        finally:
            await worker.stop()
        message = str(refused.value)
        assert "\n" not in message
        assert "unreadable" in message and "nats kv del ndo-leases config" in message
        with pytest.raises(StatusError, match="unreadable"):
            await fetch_status(nc, "ndo")
        serve = await asyncio.to_thread(
            run_ndo,
            "serve",
            "--nats-url",
            nats_server.url,
            "--data-dir",
            str(tmp_path / "cli"),
            "--partitions",
            str(PARTITIONS),
            timeout=30,
        )
        assert serve.returncode == 1
        assert "Traceback" not in serve.stderr
        assert serve.stderr.splitlines()[-1].startswith("ndo serve: the deployment record")


class TestJournal:
    """Foreign messages on the journal's subjects: replay and tail skip them with a note and
    show every valid record."""

    async def _journal_with_foreign_lines(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """Three increments of Counter/c1 and, on its journal shard, a message no ndo wrote
        (unseen by replay: it does not name the object), one foreign line naming the object,
        and a message of two such lines."""
        worker = await start_worker()
        stub = _client(nc).get(Counter, "c1")
        subject = journal_subject("ndo", journal_shard("Counter", "c1"))
        js = nc.jetstream()
        await stub.call(Counter.increment, by=1)
        await js.publish(subject, b"garbage")
        await js.publish(subject, object_marker("Counter", "c1") + b"junk")
        await stub.call(Counter.increment, by=1)
        foreign = b"[" + object_marker("Counter", "c1") + b"]"
        await js.publish(subject, foreign + b"\n" + foreign)
        await stub.call(Counter.increment, by=1)
        await worker.stop()  # publishes what the journal buffered

    async def test_replay_skips_foreign_lines(
        self, start_worker: WorkerFactory, nc: NatsClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """``ndo replay`` shows the three steps and notes each skipped line."""
        await self._journal_with_foreign_lines(start_worker, nc)
        out, err = io.StringIO(), io.StringIO()
        options = ReplayOptions(
            class_name="Counter", object_id="c1", nats_url=nats_server.url, as_json=True
        )
        assert await run_replay(options, out=out, err=err) == EXIT_OK
        steps = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [step["state"]["value"] for step in steps] == [1, 2, 3]
        notes = [line for line in err.getvalue().splitlines() if "skipped a line" in line]
        assert len(notes) == 3, err.getvalue()

    async def test_tail_skips_foreign_lines(
        self, start_worker: WorkerFactory, nc: NatsClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """``ndo tail`` from the start prints the three records and notes every foreign line
        (it decodes every line of the shard)."""
        await self._journal_with_foreign_lines(start_worker, nc)
        out, err = io.StringIO(), io.StringIO()
        options = TailOptions(
            class_name="Counter",
            object_id="c1",
            nats_url=nats_server.url,
            since=("seq", 1),
            count=3,
            as_json=True,
        )
        assert await asyncio.wait_for(run_tail(options, out=out, err=err), 10) == EXIT_OK
        assert [json.loads(line)["method"] for line in out.getvalue().splitlines()] == [
            "increment"
        ] * 3
        assert err.getvalue().count("skipped a line") == 4, err.getvalue()

    def test_decoding_a_message_with_foreign_lines(self) -> None:
        """Foreign lines go to ``on_unreadable`` (or raise without it); a record of a newer
        ndo always raises, with the advice to upgrade."""
        skipped: list[tuple[int, str]] = []

        def note(number: int, reason: str) -> None:
            skipped.append((number, reason))

        assert decode_journal_message(b"junk\n{}", on_unreadable=note) == []
        assert [number for number, _ in skipped] == [0, 1]
        with pytest.raises(ValueError, match="not an ndo journal record"):
            decode_journal_message(b"junk")
        with pytest.raises(ValueError, match="upgrade ndo"):
            decode_journal_message(b'{"record":"turn","version":99}', on_unreadable=note)


def _write(value: int, *, epoch: int) -> ObjectWrite:
    return ObjectWrite("Counter", "a", PARTITION, epoch, {"n": msgspec.msgpack.encode(value)})


async def _value(storage: ReplicatedStorage) -> int | None:
    raw = await storage.read("Counter", "a", "n")
    return None if raw is None else int(msgspec.msgpack.decode(raw))


async def _publish_log(nc: NatsClient, data: bytes, **headers: str) -> int:
    ack = await nc.jetstream().publish(log_subject("ndo", PARTITION), data, headers=headers or None)
    return int(ack.seq)


class TestPartitionLog:
    """Foreign messages on a partition log (``--storage replicated``): skipped where the chain
    proves nothing hides behind them, refused loudly where it does not."""

    async def test_a_holder_skips_a_foreign_message_and_keeps_its_tenure(
        self, start_worker: WorkerFactory, nc: NatsClient, data_dir: Path
    ) -> None:
        """Garbage appended to a held partition's log: the holder's next append is refused,
        it finds only the foreign message after its last record, skips it and appends again;
        the call succeeds and the partition never moves. A worker restoring from the log
        alone (data directory gone) skips it too and has every value."""
        worker = await start_worker(storage="replicated", journal=False, lease_ttl=LEASE_TTL)
        stub = _client(nc).get(Counter, object_in_partition("Counter", PARTITIONS, {PARTITION}))
        assert await stub.call(Counter.increment, by=1) == 1
        epoch = worker.epoch_of(PARTITION)
        with capture_logs() as logs:
            await _publish_log(nc, b"garbage")
            assert await stub.call(Counter.increment, by=1) == 2
            assert await stub.call(Counter.increment, by=1) == 3
        assert worker.epoch_of(PARTITION) == epoch
        assert not _events(logs, "partition lost")
        skips = _events(logs, "skipping a message on a partition log that ndo did not append")
        assert [s["partition"] for s in skips] == [PARTITION]
        await worker.stop()
        shutil.rmtree(data_dir)
        await start_worker(storage="replicated", journal=False, lease_ttl=LEASE_TTL)
        assert await stub.call(Counter.get) == 3

    async def test_an_unreadable_ndo_record_fails_the_partition_loudly(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """An undecodable message that carries ndo's append id for its place cannot be told
        from a record of another ndo version: the partition's calls fail with 503 (nothing is
        guessed), an error is logged, and the worker retries the claim with a pause instead of
        spinning."""
        worker = await start_worker(storage="replicated", journal=False, lease_ttl=LEASE_TTL)
        oid = object_in_partition("Counter", PARTITIONS, {PARTITION})
        assert await _client(nc).get(Counter, oid).call(Counter.increment, by=1) == 1
        last = await PartitionLog(nc, "ndo", replicas=1, append_timeout=1.0).last(PARTITION)
        epoch = worker.epoch_of(PARTITION)
        await _publish_log(nc, b"\xc1 newer", **{"Nats-Msg-Id": f"{epoch}.{PARTITION}.{last}"})
        brief = ActorClient(nc, timeout=2.0, retry=RetryPolicy(attempts=3, max_backoff=0.1))
        with capture_logs() as logs:
            with pytest.raises(UnavailableError):
                await brief.get(Counter, oid).call(Counter.increment, by=1)
            await asyncio.sleep(3.0)  # a window in which to count claim attempts
        assert PARTITION not in worker.partitions
        assert _events(logs, "a partition log record cannot be read; not serving the partition")
        assert 1 <= len(_events(logs, "claiming a partition failed")) <= 8

    async def test_a_foreign_message_on_a_fresh_log(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """Garbage on a partition's log before any worker claimed it: the first claim skips it
        (no snapshot was ever stored, so nothing was purged before it)."""
        await PartitionLog(nc, "ndo", replicas=1, append_timeout=1.0).open()
        await _publish_log(nc, b"\x93\x01\x02\x03")
        worker = await start_worker(storage="replicated", journal=False, lease_ttl=LEASE_TTL)
        await _until(lambda: PARTITION in worker.partitions)
        stub = _client(nc).get(Counter, object_in_partition("Counter", PARTITIONS, {PARTITION}))
        assert await stub.call(Counter.increment, by=1) == 1

    async def test_a_foreign_message_after_a_snapshot(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """A new copy restores the snapshot, then skips the foreign message right after it
        (the snapshot's record is still in the stream) and applies what follows."""
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 1)
        for i in range(3):
            await a.commit([_write(i, epoch=1)])
        assert await a.snapshot(PARTITION) is not None
        await _publish_log(nc, b"garbage")
        forged = LogRecord(prev=10**12, epoch=10**15, writer="forger")  # cannot be an append
        await _publish_log(nc, encode_log_record(forged))
        assert await a.commit([_write(7, epoch=1)]) == frozenset()
        assert not replicas.lost
        b = await replicas.open("b")
        assert await b.claim_partitions([PARTITION], "b", 2) == {PARTITION: 2}
        assert await _value(b) == 7

    async def test_a_foreign_message_hiding_a_gap_is_refused(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """A copy whose next records were purged by hand, with a foreign message now first:
        skipping it would hide the gap, so the claim fails, saying so."""
        b = await replicas.open("b")
        await b.claim_partitions([PARTITION], "b", 1)
        await b.commit([_write(1, epoch=1)])
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 2)
        await a.commit([_write(2, epoch=2)])
        foreign = await _publish_log(nc, b"garbage")
        await nc.jetstream().purge_stream(
            PartitionLog(nc, "ndo", replicas=1, append_timeout=1.0).stream,
            subject=log_subject("ndo", PARTITION),
            seq=foreign,
        )
        with pytest.raises(StorageError, match="cannot be restored"):
            await b.claim_partitions([PARTITION], "b", 3)

    async def test_an_unreadable_record_with_ndo_s_append_id_is_refused(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """A message that does not decode but carries the id of an ndo append at that place
        (another ndo version wrote it?) is never skipped: the claim fails, loudly."""
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 1)
        last = a.position(PARTITION)
        await _publish_log(nc, b"\xc1 newer format", **{"Nats-Msg-Id": f"1.{PARTITION}.{last}"})
        b = await replicas.open("b")
        with capture_logs() as logs, pytest.raises(StorageError, match="append id"):
            await b.claim_partitions([PARTITION], "b", 2)
        assert _events(logs, "a partition log record cannot be read; not serving the partition")


class TestSnapshots:
    """Foreign objects in the snapshot store: the holder replaces them; a restore that would
    need one fails, saying so, instead of serving a partition with holes."""

    async def test_an_unreadable_snapshot_is_replaced_by_the_holder(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """Garbage metadata where a partition's snapshot is: the holder's next snapshot
        replaces it, and a fresh copy restores from that snapshot."""
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 1)
        for i in range(3):
            await a.commit([_write(i, epoch=1)])
        store = SnapshotStore(nc, "ndo", replicas=1)
        name = base64.urlsafe_b64encode(f"partition-{PARTITION}".encode()).decode()
        await nc.jetstream().publish(f"$O.{store.bucket}.M.{name}", b"garbage")
        await store.open(create=False)
        info = await store.info(PARTITION)
        assert info is not None and not info.readable
        assert await store.get(PARTITION) is None
        covered = await a.snapshot(PARTITION)
        assert covered is not None and covered == a.position(PARTITION)
        b = await replicas.open("b")  # the log below the snapshot is purged: restore from it
        await b.claim_partitions([PARTITION], "b", 2)
        assert await _value(b) == 2

    async def test_a_restore_needing_an_unreadable_snapshot_is_refused(
        self, replicas: Replicas, nc: NatsClient
    ) -> None:
        """The snapshot a fresh copy needs (the log was purged below it) was overwritten with
        garbage: claiming fails with a message that says there is no readable snapshot."""
        a = await replicas.open("a")
        await a.claim_partitions([PARTITION], "a", 1)
        for i in range(3):
            await a.commit([_write(i, epoch=1)])
        assert await a.snapshot(PARTITION) is not None
        obs = await nc.jetstream().object_store(SnapshotStore(nc, "ndo", replicas=1).bucket)
        await obs.put(f"partition-{PARTITION}", b"garbage")
        b = await replicas.open("b")
        with pytest.raises(StorageError, match="no readable snapshot"):
            await b.claim_partitions([PARTITION], "b", 2)
