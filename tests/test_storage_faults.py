"""Faults in the storage layer: a refused write-set, a frozen peer holding the write lock, a
damaged database file, a full committer queue, an idempotency table written faster than one
purge pass, and an alarm whose delivery is refused. Each is answered, bounded and recovered
from; all run on real SQLite files (and, through a worker, a real nats-server)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from structlog.testing import capture_logs

from ndo import Actor, AlarmInfo, method
from ndo.actors import ActorClient, ActorId, HandlerError, RetryPolicy, UnavailableError
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import Worker, WorkerConfig, WorkerState
from ndo.storage import (
    CorruptStorageError,
    GroupCommitter,
    IdempotentReply,
    ObjectWrite,
    PendingCommit,
    SqliteStorage,
    StorageBusyError,
    WriteRejectedError,
)
from tests.helpers import (
    HOLD_SQLITE_WRITE,
    HOLD_WRITE_LOCK,
    eventually,
    free_port,
    held_lock,
    run_ndo,
)
from tests.worker_fixtures import WorkerFactory

PARTITIONS = 8
EPOCH = 3


def _lock_file(db: Path) -> Path:
    return db.with_name(db.name + ".writelock")


def _write(object_id: str, value: object = b"v", *, partition: int = 0) -> ObjectWrite:
    return ObjectWrite("Box", object_id, partition, EPOCH, {"k": value})  # type: ignore[dict-item]


@pytest.fixture(name="db")
def _db(tmp_path: Path) -> Path:
    """Where the test's SQLite file lives."""
    return tmp_path / "data" / "ndo.sqlite3"


@pytest.fixture(name="sqlite")
async def _sqlite(db: Path) -> AsyncIterator[SqliteStorage]:
    """An open SqliteStorage (1 s lock wait) with every partition claimed at ``EPOCH``."""
    storage = SqliteStorage(db, partitions=PARTITIONS, write_lock_timeout=1.0)
    await storage.open()
    try:
        await storage.claim_partitions(range(PARTITIONS), "test", EPOCH)
        yield storage
    finally:
        await storage.close()


class _Waiter:
    """Records the outcome of one write-set in a shared list."""

    def __init__(self, name: str, outcomes: list[tuple[str, BaseException | None]]) -> None:
        self.name = name
        self.outcomes = outcomes

    def commit_wanted(self) -> bool:
        return True

    async def commit_done(self, error: BaseException | None) -> None:
        self.outcomes.append((self.name, error))


def _refuse_object(db: Path, object_id: str) -> None:
    """Add a trigger that makes SQLite refuse every row written for ``object_id``."""
    conn = sqlite3.connect(db)
    conn.execute(
        f"CREATE TRIGGER refuse_{object_id} BEFORE INSERT ON kv WHEN NEW.oid = '{object_id}' "
        "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
    )
    conn.commit()
    conn.close()


class TestRefusedWriteSet:
    """A write-set that storage refuses for what it holds fails only its own object: the
    batch's other objects are committed without it, in order."""

    async def test_constraint_fails_only_its_object(self, sqlite: SqliteStorage, db: Path) -> None:
        """Eight objects in one batch, one refused by a trigger (two write-sets of it, one
        after another object's): only that object's waiters get WriteRejectedError, in
        submission order; every other write is durable."""
        _refuse_object(db, "bad")
        outcomes: list[tuple[str, BaseException | None]] = []
        committer = GroupCommitter(sqlite)
        names = ["o0", "o1", "bad", "o2", "bad", "o3", "o4", "o5", "o6"]
        for i, name in enumerate(names):  # queued before start: one batch
            write = _write(name, b"%d" % i, partition=i % PARTITIONS)
            committer.submit(PendingCommit(write, _Waiter(name, outcomes)))
        committer.start()
        await committer.stop()
        assert [name for name, _ in outcomes] == names
        for name, error in outcomes:
            if name == "bad":
                assert isinstance(error, WriteRejectedError), error
                assert "refused by a test trigger" in str(error)
            else:
                assert error is None, (name, error)
        for i, name in enumerate(names):
            stored = await sqlite.read("Box", name, "k")
            assert stored == (None if name == "bad" else b"%d" % i)
        assert committer.stats.write_sets == 7
        assert committer.stats.failures >= 2  # the batch, then the bad object alone

    async def test_unstorable_value_fails_only_its_object(self, sqlite: SqliteStorage) -> None:
        """A value of a type SQLite cannot bind is refused; the other objects commit."""
        outcomes: list[tuple[str, BaseException | None]] = []
        committer = GroupCommitter(sqlite)
        committer.submit(PendingCommit(_write("good", b"1"), _Waiter("good", outcomes)))
        committer.submit(PendingCommit(_write("odd", {"a": 1}), _Waiter("odd", outcomes)))
        committer.start()
        await committer.stop()
        assert outcomes[0] == ("good", None)
        assert outcomes[1][0] == "odd" and isinstance(outcomes[1][1], WriteRejectedError)
        assert await sqlite.read("Box", "good", "k") == b"1"

    async def test_through_a_worker(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, nc: NatsClient
    ) -> None:
        """Concurrent increments of many counters, one of them refused by storage: its callers
        get 500 write_rejected (no retry can help; or 503 object_reset for an increment that
        ran on top of a refused one), every other increment is applied."""
        db = data_dir / "ndo.sqlite3"
        seed = SqliteStorage(db, partitions=PARTITIONS)
        await seed.open()
        await seed.close()
        _refuse_object(db, "bad")
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=PARTITIONS)
        client = ActorClient(nc, timeout=10.0, retry=RetryPolicy(attempts=1))
        async with Worker(config, [Counter]) as worker:
            ids = [f"c{i}" for i in range(20)] + ["bad"]
            results = await asyncio.gather(
                *(client.get(Counter, i).call(Counter.increment) for i in ids * 3),
                return_exceptions=True,
            )
            refused = []
            for object_id, result in zip(ids * 3, results, strict=True):
                if object_id != "bad":
                    assert isinstance(result, int), result
                elif isinstance(result, HandlerError):
                    assert result.type == "write_rejected"
                    refused.append(result)
                else:  # ran on top of a refused write of its object, in a later batch
                    assert isinstance(result, UnavailableError), result
                    assert result.type == "object_reset"
            assert refused
            values = [await client.get(Counter, i).call(Counter.get) for i in ids]
            assert values == [3] * 20 + [0]
            assert worker.stats().commit_failures >= 1


class TestBoundedQueue:
    """The committer counts as full at ``max_queued`` write-sets; ``wait_for_room`` returns at
    once below that, else when a batch is taken; ``submit`` still accepts."""

    async def test_full_then_room(self, sqlite: SqliteStorage) -> None:
        """Three queued of three: full, and a waiter waits until the loop takes the batch."""
        outcomes: list[tuple[str, BaseException | None]] = []
        committer = GroupCommitter(sqlite, max_queued=3)
        assert committer.max_queued == 3
        await committer.wait_for_room()  # not full: at once
        for i in range(4):
            committer.submit(PendingCommit(_write(f"q{i}"), _Waiter(f"q{i}", outcomes)))
        assert committer.full
        waiting = asyncio.create_task(committer.wait_for_room())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # nothing takes batches before start()
        committer.start()
        await asyncio.wait_for(waiting, 10)
        assert not committer.full
        await committer.stop()
        assert [error for _, error in outcomes] == [None] * 4

    async def test_stop_wakes_waiters(self, sqlite: SqliteStorage) -> None:
        """A waiter for room is released by stop() (its submit then refuses)."""
        committer = GroupCommitter(sqlite, max_queued=1)
        committer.submit(PendingCommit(_write("s"), _Waiter("s", [])))
        waiting = asyncio.create_task(committer.wait_for_room())
        await asyncio.sleep(0)
        await committer.stop()
        await asyncio.wait_for(waiting, 10)

    def test_bound_must_be_positive(self, sqlite: SqliteStorage) -> None:
        """A zero bound is refused with a message naming it."""
        with pytest.raises(ValueError, match="max_queued"):
            GroupCommitter(sqlite, max_queued=0)


class TestWriteLock:
    """A write waits a bounded time for another process's write lock, then fails with
    StorageBusyError (503 storage_busy to callers); the worker keeps reading, stops cleanly
    while the lock is held, and writes again once it is free."""

    async def test_frozen_peer_holding_the_lock(self, sqlite: SqliteStorage, db: Path) -> None:
        """A commit behind a held ndo write lock raises StorageBusyError naming the file; the
        next commit after the holder exits succeeds."""
        async with held_lock(HOLD_WRITE_LOCK, _lock_file(db)):
            with pytest.raises(StorageBusyError) as busy:
                await sqlite.commit([_write("a")])
            assert str(db) in str(busy.value)
            assert await sqlite.read("Box", "a", "k") is None  # reads go on
        await sqlite.commit([_write("a")])
        assert await sqlite.read("Box", "a", "k") == b"v"

    async def test_sqlite_busy_is_storage_busy(self, sqlite: SqliteStorage, db: Path) -> None:
        """Another connection holding an SQLite write transaction (SQLite's own busy
        handler runs out) is StorageBusyError too."""
        async with held_lock(HOLD_SQLITE_WRITE, db):
            with pytest.raises(StorageBusyError) as busy:
                await sqlite.commit([_write("b")])
            assert "database is locked" in str(busy.value)
        await sqlite.commit([_write("b")])

    def test_timeout_must_be_positive(self, db: Path) -> None:
        """A wait of zero is refused with a message naming the setting."""
        with pytest.raises(ValueError, match="write_lock_timeout"):
            SqliteStorage(db, partitions=PARTITIONS, write_lock_timeout=0)

    async def test_worker_answers_storage_busy(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, nc: NatsClient
    ) -> None:
        """Through a real worker: 503 storage_busy while the lock is held, reads keep
        working, and writes succeed once the holder exits."""
        db = data_dir / "ndo.sqlite3"
        storage = SqliteStorage(db, partitions=PARTITIONS, write_lock_timeout=1.0)
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=PARTITIONS)
        client = ActorClient(nc, timeout=15.0, retry=RetryPolicy(attempts=1))
        async with Worker(config, [Counter], storage=storage) as worker:
            counter = client.get(Counter, "locked")
            assert await counter.call(Counter.increment) == 1
            async with held_lock(HOLD_WRITE_LOCK, _lock_file(db)):
                with pytest.raises(UnavailableError) as busy:
                    await counter.call(Counter.increment)
                assert busy.value.type == "storage_busy"
                assert await counter.call(Counter.get) == 1
            assert await counter.call(Counter.increment) == 2
            assert worker.stats().commit_failures == 1

    async def test_worker_stops_while_the_lock_is_held(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, nc: NatsClient
    ) -> None:
        """A worker stopped with a write waiting behind a frozen peer's lock still stops: the
        waiting caller gets 503 storage_busy and storage closes; nothing of it is applied."""
        db = data_dir / "ndo.sqlite3"
        storage = SqliteStorage(db, partitions=PARTITIONS, write_lock_timeout=1.0)
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=PARTITIONS)
        client = ActorClient(nc, timeout=15.0, retry=RetryPolicy(attempts=1))
        worker = Worker(config, [Counter], storage=storage)
        await worker.start()
        try:
            counter = client.get(Counter, "stopping")
            assert await counter.call(Counter.increment) == 1
            async with held_lock(HOLD_WRITE_LOCK, _lock_file(db)):
                waiting = asyncio.create_task(counter.call(Counter.increment))
                await eventually(lambda: worker.catalog.busy == 1)  # its turn ran
                async with asyncio.timeout(60):  # a hang guard, not a timing assert
                    await worker.stop()
                assert worker.state is WorkerState.STOPPED
                with pytest.raises(UnavailableError) as busy:
                    await waiting
                assert busy.value.type == "storage_busy"
        finally:
            await worker.stop()
        after = SqliteStorage(db, partitions=PARTITIONS)
        await after.open()
        try:
            stored = await after.read("Counter", "stopping", "value")
            assert stored is not None and msgspec.msgpack.decode(stored) == 1
        finally:
            await after.close()


async def _make_database(db: Path, objects: int = 300) -> None:
    """A real database with ``objects`` objects of 1 KB each, checkpointed into the file."""
    storage = SqliteStorage(db, partitions=PARTITIONS)
    await storage.open()
    await storage.claim_partitions(range(PARTITIONS), "test", EPOCH)
    await storage.commit([_write(f"o{i}", b"x" * 1000) for i in range(objects)])
    await storage.close()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _truncate_to_half(db: Path) -> None:
    with db.open("r+b") as file:
        file.truncate(db.stat().st_size // 2)


def _overwrite_middle_page(db: Path) -> None:
    """Overwrite one 4 KiB page in the middle of ``db`` with 0xff bytes."""
    with db.open("r+b") as file:
        file.seek(db.stat().st_size // 4096 // 2 * 4096)
        file.write(b"\xff" * 4096)


class TestCorruptDatabase:
    """A damaged database file is refused at open with CorruptStorageError, which names the
    file and what to do; a worker does not start on it, and ``ndo serve`` says so in one
    line."""

    async def test_garbage(self, db: Path) -> None:
        """A file that is not an SQLite database."""
        _write_file(db, b"this is not a database\n" * 500)
        storage = SqliteStorage(db, partitions=PARTITIONS)
        with pytest.raises(CorruptStorageError) as corrupt:
            await storage.open()
        message = str(corrupt.value)
        assert str(db) in message
        assert "not an SQLite database" in message
        assert f'sqlite3 {db} "PRAGMA integrity_check"' in message
        assert "backup" in message

    async def test_truncated(self, db: Path) -> None:
        """A real database cut to half its size."""
        await _make_database(db)
        _truncate_to_half(db)
        with pytest.raises(CorruptStorageError) as corrupt:
            await SqliteStorage(db, partitions=PARTITIONS).open()
        assert str(db) in str(corrupt.value)

    async def test_damaged_page(self, db: Path) -> None:
        """A real database with one page in the middle overwritten (quick_check finds it)."""
        await _make_database(db)
        _overwrite_middle_page(db)
        with pytest.raises(CorruptStorageError) as corrupt:
            await SqliteStorage(db, partitions=PARTITIONS).open()
        assert "quick_check" in str(corrupt.value) or "malformed" in str(corrupt.value)

    async def test_healthy_database_opens(self, db: Path) -> None:
        """The checks pass a sound file, with its data."""
        await _make_database(db)
        storage = SqliteStorage(db, partitions=PARTITIONS)
        await storage.open()
        try:
            assert await storage.read("Box", "o7", "k") == b"x" * 1000
        finally:
            await storage.close()

    async def test_worker_does_not_start(
        self, nats_server: EmbeddedNatsServer, data_dir: Path
    ) -> None:
        """Worker.start raises the error and leaves a stopped worker, nothing half-started."""
        _write_file(data_dir / "ndo.sqlite3", b"\x00garbage" * 1000)
        config = WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=PARTITIONS)
        worker = Worker(config, [Counter])
        with pytest.raises(CorruptStorageError):
            await worker.start()
        assert worker.state is WorkerState.STOPPED

    @pytest.mark.slow
    def test_ndo_serve_says_so_in_one_line(self, tmp_path: Path) -> None:
        """``ndo serve`` on a damaged file exits 1 with one line naming the file and the
        check to run, and no traceback."""
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        db = data_dir / "ndo.sqlite3"
        db.write_bytes(b"garbage" * 1000)
        result = run_ndo("serve", "--port", str(free_port()), "--data-dir", str(data_dir))
        assert result.returncode == 1, result.stderr
        output = result.stdout + result.stderr
        assert "Traceback" not in output
        lines = [line for line in result.stderr.splitlines() if line.startswith("ndo serve:")]
        assert len(lines) == 1, result.stderr
        assert str(db) in lines[0]
        assert "PRAGMA integrity_check" in lines[0]


def _idempotency_rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        count: int = conn.execute("SELECT count(*) FROM idempotency").fetchone()[0]
        return count
    finally:
        conn.close()


async def _seed_expired_replies(db: Path, count: int) -> None:
    """Store ``count`` idempotency records that have already expired (as if written by
    ``count`` keyed calls a window ago)."""
    storage = SqliteStorage(db, partitions=PARTITIONS)
    await storage.open()
    try:
        await storage.claim_partitions(range(PARTITIONS), "seed", 1)
        expired = time.time() - 1
        for start in range(0, count, 2_000):
            await storage.commit(
                [
                    ObjectWrite(
                        "Counter",
                        f"seed{i % 500}",
                        0,
                        1,
                        idempotent_reply=IdempotentReply(f"key{i}", b"1", expired),
                    )
                    for i in range(start, min(count, start + 2_000))
                ]
            )
    finally:
        await storage.close()


class TestIdempotencyPurge:
    """Expired idempotency records are purged in full each pass, however many there are, and
    a failing purge is counted and logged, not swallowed."""

    async def test_purge_keeps_pace(
        self, start_worker: WorkerFactory, client: ActorClient, data_dir: Path
    ) -> None:
        """12,000 expired records (more than two purge batches) and fresh keyed calls with a
        1 s window: once the window has passed the table is empty."""
        db = data_dir / "ndo.sqlite3"
        await _seed_expired_replies(db, 12_000)
        assert _idempotency_rows(db) == 12_000
        await start_worker(classes=[Counter], idempotency_window=1.0)
        await asyncio.gather(
            *(client.get(Counter, f"k{i}").call(Counter.increment) for i in range(50))
        )
        await eventually(lambda: _idempotency_rows(db) == 0, timeout=30, interval=0.2)

    async def test_failures_are_counted_and_logged(
        self, start_worker: WorkerFactory, data_dir: Path
    ) -> None:
        """A purge that storage refuses rises ndo_background_failures_total and logs a
        warning (once, however often it fails within a minute)."""
        db = data_dir / "ndo.sqlite3"
        await _seed_expired_replies(db, 10)
        conn = sqlite3.connect(db)
        conn.execute(
            "CREATE TRIGGER no_purge BEFORE DELETE ON idempotency "
            "BEGIN SELECT RAISE(ABORT, 'purge refused by a test trigger'); END"
        )
        conn.commit()
        conn.close()
        with capture_logs() as logs:
            worker = await start_worker(classes=[Counter], idempotency_window=1.0)

            def failures() -> float:
                value = worker.metrics.registry.get_sample_value(
                    "ndo_background_failures_total", {"task": "idempotency_purge"}
                )
                return value or 0.0

            await eventually(lambda: failures() >= 2, timeout=30, interval=0.1)
        warnings = [log for log in logs if "purging expired idempotency" in log["event"]]
        assert len(warnings) == 1, warnings
        assert warnings[0]["log_level"] == "warning"
        assert "purge refused by a test trigger" in warnings[0]["error"]


class Gated(Actor):
    """An object whose ``wait`` calls block until the test opens ``gate``, with an alarm that
    counts its deliveries."""

    gate: ClassVar[asyncio.Event | None] = None

    @method
    async def schedule(self, at: float) -> None:
        await self.storage.set_alarm(at)

    @method
    async def wait(self) -> None:
        gate = type(self).gate
        assert gate is not None
        await gate.wait()

    @method
    async def fired(self) -> int:
        count: int = await self.storage.get("fired", 0)
        return count

    async def alarm(self, info: AlarmInfo) -> None:
        self.storage.put("fired", await self.storage.get("fired", 0) + 1)


class TestRefusedAlarmDelivery:
    """An alarm due while its object's mailbox is full is offered again after a short
    backoff (counted as deferred) and fires once the mailbox drains: not stuck until a
    restart."""

    async def test_full_mailbox_defers_the_alarm(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """The mailbox is full when the alarm is due; once the blocked calls finish, it fires."""
        Gated.gate = asyncio.Event()
        worker = await start_worker(classes=[Gated], max_mailbox=2)
        stub = client.get(Gated, "g1")
        try:
            await stub.call(Gated.schedule, at=time.time() + 1.0)
            blocked = [asyncio.create_task(stub.call(Gated.wait)) for _ in range(3)]
            activation = None

            def mailbox_full() -> bool:
                nonlocal activation
                activation = worker.catalog.get(ActorId("Gated", "g1"))
                return activation is not None and activation.queued == 2

            await eventually(mailbox_full)

            def deferred() -> float:
                value = worker.metrics.registry.get_sample_value(
                    "ndo_alarms_total", {"class_name": "Gated", "outcome": "deferred"}
                )
                return value or 0.0

            await eventually(lambda: deferred() >= 1, timeout=15)
        finally:
            Gated.gate.set()
        await asyncio.gather(*blocked)
        async with asyncio.timeout(15):
            while await stub.call(Gated.fired) != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert worker.alarms.inflight == 0
        Gated.gate = None
