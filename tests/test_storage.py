"""Storage on real SQLite files: reads, batched commits, alarms, idempotency, fencing, group commit,
and the per-object ``ActorStorage`` view over both backends (checked against a dict model)."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from ndo.actors import ActorStorage, BadRequestError, PayloadTooLargeError
from ndo.actors.runtime import StorageLimits, TurnWrites, prefix_range
from ndo.storage import (
    ALARM_UNCHANGED,
    CommitAbandonedError,
    FencedError,
    GroupCommitter,
    IdempotentReply,
    InMemoryStorage,
    ObjectWrite,
    PartialCommitError,
    PartitionCountError,
    PendingCommit,
    SqliteStorage,
    Storage,
    StorageClosedError,
    StorageError,
    StoredAlarm,
)
from tests.helpers import eventually

PARTITIONS = 4
EPOCH = 7
"""Epoch every fixture claims all partitions with."""
CLS = "Box"
OID = "b1"

UNICODE_KEYS = ["", "a", "a\x00", "a\x00b", "aa", "ab", "abc", "b", "é", "éa", "日本", "\U0001f600"]
"""Keys that are easy to mis-order: empty, NUL, multi-byte and astral characters."""


def _encode(value: object) -> bytes:
    return msgspec.msgpack.encode(value)


def _write(
    object_id: str = OID,
    *,
    partition: int = 0,
    epoch: int = EPOCH,
    class_name: str = CLS,
    **kwargs: object,
) -> ObjectWrite:
    return ObjectWrite(class_name, object_id, partition, epoch, **kwargs)  # type: ignore[arg-type]


async def _open_sqlite(path: Path, partitions: int = PARTITIONS) -> SqliteStorage:
    storage = SqliteStorage(path, partitions=partitions)
    await storage.open()
    return storage


@pytest.fixture(name="db_path")
def _db_path(tmp_path: Path) -> Path:
    """Where the test's SQLite file lives."""
    return tmp_path / "data" / "ndo.sqlite3"


@pytest.fixture(name="sqlite")
async def _sqlite(db_path: Path) -> AsyncIterator[SqliteStorage]:
    """An open SqliteStorage whose partitions are all claimed with ``EPOCH``."""
    storage = await _open_sqlite(db_path)
    try:
        await storage.claim_partitions(range(PARTITIONS), "test", EPOCH)
        yield storage
    finally:
        await storage.close()


@pytest.fixture(name="backend", params=["sqlite", "memory"])
async def _backend(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Storage]:
    """Each storage backend, open, with every partition claimed with ``EPOCH``."""
    storage: Storage = (
        SqliteStorage(db_path, partitions=PARTITIONS)
        if request.param == "sqlite"
        else InMemoryStorage()
    )
    await storage.open()
    try:
        await storage.claim_partitions(range(PARTITIONS), "test", EPOCH)
        yield storage
    finally:
        await storage.close()


def _expected_range(
    stored: dict[str, bytes],
    start: str | None,
    end: str | None,
    limit: int | None,
    reverse: bool,
) -> list[tuple[str, bytes]]:
    keys = sorted(k for k in stored if (start is None or k >= start) and (end is None or k < end))
    if reverse:
        keys.reverse()
    if limit is not None:
        keys = keys[:limit]
    return [(k, stored[k]) for k in keys]


class TestReads:
    """Committed values read back exactly, per object, in code-point order."""

    async def test_read_and_read_many(self, backend: Storage) -> None:
        """read returns a value or None; read_many returns only keys that exist."""
        await backend.commit(
            [_write(writes={"a": b"1", "b": b"2"}), _write("other", writes={"a": b"x"})]
        )
        assert await backend.read(CLS, OID, "a") == b"1"
        assert await backend.read(CLS, OID, "missing") is None
        assert await backend.read(CLS, "nobody", "a") is None
        assert await backend.read("Other", OID, "a") is None
        assert await backend.read(CLS, "other", "a") == b"x"
        assert await backend.read_many(CLS, OID, ["a", "missing", "b", "a"]) == {
            "a": b"1",
            "b": b"2",
        }
        assert await backend.read_many(CLS, OID, []) == {}

    async def test_read_many_over_a_thousand_keys(self, backend: Storage) -> None:
        """A read_many bigger than SQLite's parameter chunks still finds every key."""
        await backend.commit([_write(writes={f"k{i:04d}": b"%d" % i for i in range(0, 1200, 2)})])
        found = await backend.read_many(CLS, OID, [f"k{i:04d}" for i in range(1200)])
        assert found == {f"k{i:04d}": b"%d" % i for i in range(0, 1200, 2)}

    async def test_read_range_every_combination(self, backend: Storage) -> None:
        """start/end/limit/reverse in every combination match a sorted-dict model."""
        stored = {k: k.encode("utf-8") + b"!" for k in UNICODE_KEYS}
        await backend.commit([_write(writes=dict(stored)), _write("other", writes={"ab": b"no"})])
        bounds = [None, "", "a", "a\x00", "ab", "b", "c", "é", "\U0001f600", "\U0010ffff"]
        for start in bounds:
            for end in bounds:
                for limit in (None, 0, 1, 3, 100):
                    for reverse in (False, True):
                        got = await backend.read_range(
                            CLS, OID, start=start, end=end, limit=limit, reverse=reverse
                        )
                        want = _expected_range(stored, start, end, limit, reverse)
                        assert got == want, (start, end, limit, reverse)

    async def test_values_survive_reopen(self, db_path: Path) -> None:
        """What one SqliteStorage committed, a new one on the same file reads."""
        first = await _open_sqlite(db_path)
        try:
            epochs = await first.claim_partitions(range(PARTITIONS), "w1")
            await first.commit([_write(epoch=epochs[0], writes={"日本": b"\x00\xff"})])
        finally:
            await first.close()
        second = await _open_sqlite(db_path)
        try:
            assert await second.read(CLS, OID, "日本") == b"\x00\xff"
        finally:
            await second.close()


class TestCommitBatches:
    """One commit is one transaction, applied entry by entry in order."""

    async def test_empty_commit(self, backend: Storage) -> None:
        """Committing nothing changes nothing and fences nothing."""
        assert await backend.commit([]) == frozenset()

    async def test_cleared_and_writes_in_one_entry(self, backend: Storage) -> None:
        """cleared deletes every earlier key, then the same entry's writes apply."""
        await backend.commit([_write(writes={"a": b"1", "b": b"2", "c": b"3"})])
        await backend.commit([_write("other", writes={"a": b"keep"})])
        await backend.commit([_write(cleared=True, writes={"a": b"new", "d": b"4", "x": None})])
        rows = await backend.read_range(CLS, OID, start=None, end=None, limit=None, reverse=False)
        assert rows == [("a", b"new"), ("d", b"4")]
        assert await backend.read(CLS, "other", "a") == b"keep"

    async def test_clear_in_a_later_entry_of_the_batch(self, backend: Storage) -> None:
        """A clear drops the object's writes from earlier entries, not from later ones."""
        await backend.commit([_write(writes={"old": b"0"})])
        await backend.commit(
            [
                _write(writes={"a": b"1"}),
                _write("other", writes={"a": b"o"}),
                _write(cleared=True),
                _write(writes={"b": b"2"}),
            ]
        )
        rows = await backend.read_range(CLS, OID, start=None, end=None, limit=None, reverse=False)
        assert rows == [("b", b"2")]
        assert await backend.read(CLS, "other", "a") == b"o"

    @pytest.mark.parametrize(
        ("sequence", "final"),
        [
            ([b"1", None], None),
            ([None, b"2"], b"2"),
            ([b"1", None, b"3"], b"3"),
            ([b"1", b"2", None, None], None),
            ([None, b"1", b"2"], b"2"),
        ],
    )
    async def test_put_and_delete_of_one_key_across_entries(
        self, backend: Storage, sequence: list[bytes | None], final: bytes | None
    ) -> None:
        """Puts and deletes of the same key in one batch end in the last one's state."""
        await backend.commit([_write(writes={"k": b"before"})])
        await backend.commit([_write(writes={"k": value}) for value in sequence])
        assert await backend.read(CLS, OID, "k") == final

    async def test_batch_of_many_objects(self, backend: Storage) -> None:
        """A batch spanning objects and partitions writes each object's own keys."""
        await backend.commit(
            [_write(f"o{i}", partition=i % PARTITIONS, writes={"n": b"%d" % i}) for i in range(50)]
        )
        for i in range(50):
            assert await backend.read(CLS, f"o{i}", "n") == b"%d" % i


class TestAlarms:
    """Alarms are stored per object and found by due time."""

    async def test_due_alarms_and_next_alarm_time(self, backend: Storage) -> None:
        """due_alarms is earliest first, capped by limit, filtered by partition; <= now is due."""
        await backend.commit(
            [
                _write("o1", partition=0, alarm=30.0),
                _write("o2", partition=1, alarm=10.0),
                _write("o3", partition=2, alarm=20.0),
                _write("o4", partition=3, alarm=40.0, class_name="Other"),
            ]
        )
        assert await backend.due_alarms(None, 25.0, 10) == [
            StoredAlarm(CLS, "o2", 1, 10.0),
            StoredAlarm(CLS, "o3", 2, 20.0),
        ]
        assert await backend.due_alarms(None, 30.0, 1) == [StoredAlarm(CLS, "o2", 1, 10.0)]
        assert [a.object_id for a in await backend.due_alarms(None, 30.0, 10)] == [
            "o2",
            "o3",
            "o1",
        ]
        assert [a.object_id for a in await backend.due_alarms({2, 3}, 100.0, 10)] == ["o3", "o4"]
        assert await backend.due_alarms(None, 9.99, 10) == []
        assert await backend.next_alarm_time(None) == 10.0
        assert await backend.next_alarm_time(None, after=10.0) == 20.0
        assert await backend.next_alarm_time(None, after=39.0) == 40.0
        assert await backend.next_alarm_time(None, after=40.0) is None
        assert await backend.next_alarm_time({0, 3}) == 30.0
        assert await backend.next_alarm_time({0, 3}, after=30.0) == 40.0
        assert await backend.read_alarm(CLS, "o1") == 30.0
        assert await backend.read_alarm(CLS, "nobody") is None

    async def test_change_keep_and_delete(self, backend: Storage) -> None:
        """ALARM_UNCHANGED keeps the alarm, None deletes it, a clear leaves it alone."""
        await backend.commit([_write(alarm=50.0)])
        await backend.commit([_write(writes={"k": b"v"}, alarm=ALARM_UNCHANGED)])
        await backend.commit([_write(cleared=True)])
        assert await backend.read_alarm(CLS, OID) == 50.0
        await backend.commit([_write(alarm=60.0)])
        assert await backend.read_alarm(CLS, OID) == 60.0
        await backend.commit([_write(alarm=None)])
        assert await backend.read_alarm(CLS, OID) is None
        assert await backend.next_alarm_time(None) is None

    async def test_last_alarm_change_in_a_batch_wins(self, backend: Storage) -> None:
        """Set then delete in one batch leaves no alarm; delete then set leaves the set."""
        await backend.commit([_write("a", alarm=5.0), _write("a", alarm=None)])
        await backend.commit([_write("b", alarm=None), _write("b", alarm=6.0)])
        assert await backend.read_alarm(CLS, "a") is None
        assert await backend.read_alarm(CLS, "b") == 6.0
        assert await backend.due_alarms(None, 100.0, 10) == [StoredAlarm(CLS, "b", 0, 6.0)]


class TestIdempotencyRecords:
    """Replies stored with their write-set are readable until they expire, then purged."""

    async def test_read_expire_and_purge(self, backend: Storage) -> None:
        """Records are read before expiry only; purge deletes expired ones up to its limit."""
        await backend.commit(
            [
                _write(idempotent_reply=IdempotentReply("k1", b"r1", 100.0)),
                _write(idempotent_reply=IdempotentReply("k2", b"r2", 200.0)),
                _write("other", idempotent_reply=IdempotentReply("k1", b"o1", 300.0)),
            ]
        )
        assert await backend.read_idempotent(CLS, OID, "k1", 50.0) == b"r1"
        assert await backend.read_idempotent(CLS, OID, "k1", 100.0) is None
        assert await backend.read_idempotent(CLS, OID, "k2", 150.0) == b"r2"
        assert await backend.read_idempotent(CLS, OID, "k3", 0.0) is None
        assert await backend.read_idempotent(CLS, "other", "k1", 250.0) == b"o1"
        assert await backend.idempotency_horizon(CLS, OID, 50.0) == 200.0
        assert await backend.idempotency_horizon(CLS, OID, 200.0) is None
        assert await backend.idempotency_horizon(CLS, "nobody", 0.0) is None
        assert await backend.purge_idempotency(250.0, 1) == 1
        assert await backend.purge_idempotency(250.0, 10) == 1
        assert await backend.purge_idempotency(250.0, 10) == 0
        assert await backend.read_idempotent(CLS, "other", "k1", 250.0) == b"o1"

    async def test_same_key_replaced(self, backend: Storage) -> None:
        """Committing a key again replaces its reply and expiry."""
        await backend.commit([_write(idempotent_reply=IdempotentReply("k", b"a", 10.0))])
        await backend.commit([_write(idempotent_reply=IdempotentReply("k", b"b", 20.0))])
        assert await backend.read_idempotent(CLS, OID, "k", 15.0) == b"b"


class TestFencing:
    """Partitions are claimed with epochs; a write carrying an old epoch is skipped."""

    async def test_claim_epochs(self, backend: Storage) -> None:
        """Claims without an epoch go one higher; an explicit older epoch is refused."""
        assert await backend.claim_partitions([0, 1], "w2") == {0: EPOCH + 1, 1: EPOCH + 1}
        assert await backend.claim_partitions([1, 2], "w3") == {1: EPOCH + 2, 2: EPOCH + 2}
        with pytest.raises(FencedError) as fenced:
            await backend.claim_partitions([0, 1, 3], "late", EPOCH + 1)
        assert fenced.value.partitions == frozenset({1})
        assert isinstance(fenced.value, StorageError)
        assert await backend.claim_partitions([3], "same", EPOCH) == {3: EPOCH}
        assert await backend.claim_partitions([], "none") == {}

    async def test_stale_entry_skipped_rest_of_batch_commits(self, backend: Storage) -> None:
        """An entry with an old epoch is skipped with its reply and alarm; the others commit."""
        new_epoch = (await backend.claim_partitions([1], "newer"))[1]
        fenced = await backend.commit(
            [
                _write("p0", partition=0, writes={"k": b"0"}),
                _write(
                    "p1",
                    partition=1,
                    writes={"k": b"1"},
                    alarm=5.0,
                    idempotent_reply=IdempotentReply("key", b"r", 1e12),
                ),
                _write("p2", partition=2, writes={"k": b"2"}),
                _write("p1-new", partition=1, epoch=new_epoch, writes={"k": b"n"}),
            ]
        )
        assert fenced == frozenset({1})
        assert await backend.read(CLS, "p0", "k") == b"0"
        assert await backend.read(CLS, "p2", "k") == b"2"
        assert await backend.read(CLS, "p1", "k") is None
        assert await backend.read_alarm(CLS, "p1") is None
        assert await backend.read_idempotent(CLS, "p1", "key", 0.0) is None
        # The same partition's entries with the current epoch are skipped too: the whole
        # partition is reported fenced, and its new owner retries them.
        assert await backend.read(CLS, "p1-new", "k") is None

    async def test_never_claimed_partition_is_fenced(self, tmp_path: Path) -> None:
        """SQLite refuses writes to a partition nobody claimed: only a claimant may write."""
        storage = await _open_sqlite(tmp_path / "f.db", partitions=2)
        try:
            await storage.claim_partitions([0], "w", 1)
            fenced = await storage.commit(
                [
                    _write(partition=0, epoch=1, writes={"a": b"1"}),
                    _write("x", partition=1, epoch=1, writes={"a": b"1"}),
                ]
            )
            assert fenced == frozenset({1})
            assert await storage.read(CLS, OID, "a") == b"1"
            assert await storage.read(CLS, "x", "a") is None
        finally:
            await storage.close()

    async def test_two_stores_on_one_file(self, db_path: Path) -> None:
        """Two stores on one file see each other's commits, and a claim by one fences the other."""
        first = await _open_sqlite(db_path)
        second = await _open_sqlite(db_path)
        try:
            old = await first.claim_partitions(range(PARTITIONS), "first")
            await first.commit([_write(epoch=old[0], writes={"k": b"1"})])
            assert await second.read(CLS, OID, "k") == b"1"
            await second.claim_partitions([0], "second")
            assert await first.commit([_write(epoch=old[0], writes={"k": b"2"})]) == {0}
            assert await second.read(CLS, OID, "k") == b"1"
        finally:
            await first.close()
            await second.close()


async def _partition_rows(
    storage: SqliteStorage,
) -> tuple[list[tuple[int, str, str, str, bytes]], list[tuple[int, str, str, str, bytes, float]]]:
    """Every kv and idempotency row, each with the partition it is stored under, sorted."""
    kv: list[tuple[int, str, str, str, bytes]] = []
    replies: list[tuple[int, str, str, str, bytes, float]] = []
    for p in range(PARTITIONS):
        snapshot = await storage.export_partition(p)
        kv.extend((p, *row) for row in snapshot.kv)
        replies.extend((p, *row) for row in snapshot.idempotency)
    return sorted(kv), sorted(replies)


class TestMultiRowStatements:
    """SQLite writes a commit's kv and idempotency rows many to a statement (at most 960
    parameters: 192 kv rows or 160 idempotency rows each) and reads the batch's fences as one
    row; whatever the sizes, the stored rows are exactly the batch's."""

    async def test_five_hundred_write_sets_and_four_hundred_replies(
        self, sqlite: SqliteStorage
    ) -> None:
        """One commit of 500 objects' write-sets (1000 kv rows) with 400 idempotency replies:
        every value and reply reads back, each row under its partition, nothing else."""
        entries = [
            _write(
                f"o{i:03d}",
                partition=i % PARTITIONS,
                writes={"a": b"a%d" % i, "b\x00\U0001f600": _encode([i, "é"])},
                idempotent_reply=(
                    IdempotentReply(f"req-{i}", b"reply %d" % i, 1e12 + i) if i < 400 else None
                ),
            )
            for i in range(500)
        ]
        assert await sqlite.commit(entries) == frozenset()
        for i in range(500):
            oid = f"o{i:03d}"
            rows = await sqlite.read_range(
                CLS, oid, start=None, end=None, limit=None, reverse=False
            )
            assert rows == [("a", b"a%d" % i), ("b\x00\U0001f600", _encode([i, "é"]))], i
            reply = await sqlite.read_idempotent(CLS, oid, f"req-{i}", 0.0)
            assert reply == (b"reply %d" % i if i < 400 else None), i
            horizon = await sqlite.idempotency_horizon(CLS, oid, 0.0)
            assert horizon == (1e12 + i if i < 400 else None), i
        kv, replies = await _partition_rows(sqlite)
        assert kv == sorted(
            row
            for i in range(500)
            for row in (
                (i % PARTITIONS, CLS, f"o{i:03d}", "a", b"a%d" % i),
                (i % PARTITIONS, CLS, f"o{i:03d}", "b\x00\U0001f600", _encode([i, "é"])),
            )
        )
        assert replies == sorted(
            (i % PARTITIONS, CLS, f"o{i:03d}", f"req-{i}", b"reply %d" % i, 1e12 + i)
            for i in range(400)
        )

    @pytest.mark.parametrize("count", [1, 159, 160, 161, 191, 192, 193, 320, 321, 384, 385])
    async def test_row_counts_around_the_statement_size(
        self, sqlite: SqliteStorage, count: int
    ) -> None:
        """Batches of exactly, one under and one over a statement's rows (and two statements'):
        every kv and idempotency row is stored once."""
        await sqlite.commit(
            [
                _write(
                    f"o{i}",
                    partition=i % PARTITIONS,
                    writes={"k": b"%d" % i},
                    idempotent_reply=IdempotentReply("r", b"%d" % i, 1e12),
                )
                for i in range(count)
            ]
        )
        kv, replies = await _partition_rows(sqlite)
        assert kv == sorted((i % PARTITIONS, CLS, f"o{i}", "k", b"%d" % i) for i in range(count))
        assert replies == sorted(
            (i % PARTITIONS, CLS, f"o{i}", "r", b"%d" % i, 1e12) for i in range(count)
        )

    async def test_upserts_replace_across_statements(self, sqlite: SqliteStorage) -> None:
        """A 400-row batch over rows already stored replaces every value and reply in place."""
        old = [
            _write(
                f"o{i}",
                partition=i % PARTITIONS,
                writes={"k": b"old"},
                idempotent_reply=IdempotentReply("r", b"old", 10.0),
            )
            for i in range(400)
        ]
        await sqlite.commit(old)
        new = [
            _write(
                f"o{i}",
                partition=i % PARTITIONS,
                writes={"k": b"new %d" % i},
                idempotent_reply=IdempotentReply("r", b"new %d" % i, 20.0 + i),
            )
            for i in range(400)
        ]
        await sqlite.commit(new)
        kv, replies = await _partition_rows(sqlite)
        assert kv == sorted((i % PARTITIONS, CLS, f"o{i}", "k", b"new %d" % i) for i in range(400))
        assert replies == sorted(
            (i % PARTITIONS, CLS, f"o{i}", "r", b"new %d" % i, 20.0 + i) for i in range(400)
        )

    async def test_same_reply_key_twice_in_a_batch_keeps_the_later(
        self, sqlite: SqliteStorage
    ) -> None:
        """Two write-sets of one object with the same idempotency key, 300 entries apart (so in
        different statements) and right next to each other (one statement): the later wins."""
        entries = [
            _write("far", idempotent_reply=IdempotentReply("k", b"first", 100.0)),
            _write("near", idempotent_reply=IdempotentReply("k", b"first", 100.0)),
            _write("near", idempotent_reply=IdempotentReply("k", b"second", 200.0)),
            *(
                _write(f"f{i}", idempotent_reply=IdempotentReply("k", b"%d" % i, 50.0))
                for i in range(300)
            ),
            _write("far", idempotent_reply=IdempotentReply("k", b"second", 200.0)),
        ]
        await sqlite.commit(entries)
        for oid in ("far", "near"):
            assert await sqlite.read_idempotent(CLS, oid, "k", 150.0) == b"second"
            assert await sqlite.idempotency_horizon(CLS, oid, 0.0) == 200.0
        _, replies = await _partition_rows(sqlite)
        assert len(replies) == 302

    async def test_puts_and_deletes_across_write_sets_keep_the_last(
        self, sqlite: SqliteStorage
    ) -> None:
        """300 objects, each with keys already stored, get five rounds of puts, deletes and
        clears of the same keys in one batch (several hundred upserts and deletes): each
        object ends exactly as a dict model applying the write-sets in order."""
        rng = random.Random(20261202)
        keys = ["k", "l", "m\x00"]
        model: dict[str, dict[str, bytes]] = {}
        before: list[ObjectWrite] = []
        for i in range(300):
            model[f"o{i}"] = {k: b"before %s" % k.encode() for k in keys}
            before.append(_write(f"o{i}", partition=i % PARTITIONS, writes=dict(model[f"o{i}"])))
        await sqlite.commit(before)
        batch: list[ObjectWrite] = []
        for round_ in range(5):
            for i in rng.sample(range(300), 300):
                oid = f"o{i}"
                cleared = rng.random() < 0.05
                writes: dict[str, bytes | None] = {
                    k: None if rng.random() < 0.4 else b"%d:%d" % (round_, i)
                    for k in rng.sample(keys, rng.randint(1, 3))
                }
                batch.append(_write(oid, partition=i % PARTITIONS, writes=writes, cleared=cleared))
                if cleared:
                    model[oid].clear()
                for k, v in writes.items():
                    if v is None:
                        model[oid].pop(k, None)
                    else:
                        model[oid][k] = v
        assert await sqlite.commit(batch) == frozenset()
        for i in range(300):
            oid = f"o{i}"
            rows = await sqlite.read_range(
                CLS, oid, start=None, end=None, limit=None, reverse=False
            )
            assert rows == sorted(model[oid].items()), oid
        kv, _ = await _partition_rows(sqlite)
        assert kv == sorted(
            (int(oid[1:]) % PARTITIONS, CLS, oid, k, v)
            for oid, values in model.items()
            for k, v in values.items()
        )

    async def test_fences_of_a_mixed_batch(self, tmp_path: Path) -> None:
        """One batch over partitions with a fence and the right epoch, with a fence and another
        epoch (older and newer), and without a fence: exactly the mismatched and unfenced
        partitions are reported and skipped. Partitions 1 and 11, 2 and 12 test that
        the fences read as one row are told apart."""
        storage = await _open_sqlite(tmp_path / "f.db", partitions=16)
        try:
            assert await storage.claim_partitions([1], "w", 3) == {1: 3}
            assert await storage.claim_partitions([11], "w", 12) == {11: 12}
            assert await storage.claim_partitions([2, 12], "w") == {2: 1, 12: 1}
            assert await storage.claim_partitions([0], "w", 10**12) == {0: 10**12}
            assert await storage.claim_partitions([5], "w", 4) == {5: 4}
            assert await storage.claim_partitions([5], "w") == {5: 5}  # re-claimed: 4 is old
            writes = {
                # partition: epoch the write carries
                0: 10**12,  # fence matches
                1: 3,  # fence matches (11's epoch is 12)
                11: 12,  # fence matches (1's epoch is 3)
                2: 1,  # fence matches
                12: 2,  # fence is 1: newer than the fence does not match either
                5: 4,  # fence moved on to 5
                3: 3,  # no fence (1's epoch is 3)
                13: 12,  # no fence (11's epoch is 12)
                4: 0,  # no fence
            }
            entries = [
                _write(
                    f"p{p}",
                    partition=p,
                    epoch=epoch,
                    writes={"k": b"%d" % p},
                    idempotent_reply=IdempotentReply("r", b"%d" % p, 1e12),
                )
                for p, epoch in writes.items()
            ]
            fenced = await storage.commit(entries)
            assert fenced == frozenset({12, 5, 3, 13, 4})
            for p in writes:
                expected = None if p in fenced else b"%d" % p
                assert await storage.read(CLS, f"p{p}", "k") == expected, p
                assert await storage.read_idempotent(CLS, f"p{p}", "r", 0.0) == expected, p
            assert await storage.commit(
                [_write("x", partition=p, epoch=1, writes={"k": b"x"}) for p in (6, 7, 8)]
            ) == frozenset({6, 7, 8})  # no partition of the batch has a fence
            assert await storage.read(CLS, "x", "k") is None
        finally:
            await storage.close()

    async def test_fences_of_many_partitions(self, tmp_path: Path) -> None:
        """A batch over 1024 partitions, all fenced, with epochs of one to ten digits, one in
        ten of them stale: exactly the stale ones are fenced."""
        partitions = 1024
        storage = await _open_sqlite(tmp_path / "many.db", partitions=partitions)
        try:
            lengths = [1, 9, 10, 99, 100, 12_345, 10**9]
            epochs = {p: lengths[p % len(lengths)] for p in range(partitions)}
            for epoch in lengths:
                group = [p for p, e in epochs.items() if e == epoch]
                await storage.claim_partitions(group, f"w{epoch}", epoch)
            stale = {p for p in range(partitions) if p % 10 == 3}
            entries = [
                _write(
                    f"p{p}",
                    partition=p,
                    epoch=epochs[p] - 1 if p in stale else epochs[p],
                    writes={"k": b"%d" % p},
                )
                for p in range(partitions)
            ]
            assert await storage.commit(entries) == frozenset(stale)
            for p in range(partitions):
                expected = None if p in stale else b"%d" % p
                assert await storage.read(CLS, f"p{p}", "k") == expected, p
        finally:
            await storage.close()


class TestSharedFile:
    """Processes sharing the file take turns at the write lock (``<db>.writelock``)."""

    async def test_commit_waits_for_the_write_lock(self, sqlite: SqliteStorage) -> None:
        """While another holder has the lock, a commit waits; it lands once the lock is free."""
        await sqlite.claim_partitions(range(PARTITIONS), "test", EPOCH)
        lock_path = sqlite.path.with_name(sqlite.path.name + ".writelock")
        with lock_path.open("a") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            commit = asyncio.create_task(sqlite.commit([_write(writes={"k": _encode(1)})]))
            await asyncio.sleep(0.2)
            assert not commit.done()
            fcntl.flock(holder, fcntl.LOCK_UN)
            assert await asyncio.wait_for(commit, 5) == frozenset()
        assert msgspec.msgpack.decode(await sqlite.read(CLS, OID, "k") or b"") == 1

    async def test_two_stores_on_one_file(self, db_path: Path) -> None:
        """Two stores (as two workers) commit concurrently to one file; nothing is lost."""
        first, second = await _open_sqlite(db_path), await _open_sqlite(db_path)
        try:
            await first.claim_partitions([0], "a", EPOCH)
            await second.claim_partitions([1], "b", EPOCH)
            await asyncio.gather(
                *(
                    store.commit([_write(f"o{i}", partition=p, writes={"n": _encode(i)})])
                    for i in range(50)
                    for p, store in ((0, first), (1, second))
                )
            )
            for i in range(50):
                assert await first.read(CLS, f"o{i}", "n") == _encode(i)
        finally:
            await first.close()
            await second.close()


class TestLifecycle:
    """Opening checks the partition count; a closed store refuses every call."""

    async def test_partition_count_is_fixed(self, db_path: Path) -> None:
        """Reopening with another partition count fails and says how to fix it."""
        storage = await _open_sqlite(db_path, partitions=8)
        await storage.close()
        other = SqliteStorage(db_path, partitions=16)
        with pytest.raises(PartitionCountError) as error:
            await other.open()
        assert (error.value.stored, error.value.configured) == (8, 16)
        assert "--partitions 8" in str(error.value)
        with pytest.raises(StorageClosedError):
            await other.read(CLS, OID, "k")  # a failed open leaves nothing half-open
        again = await _open_sqlite(db_path, partitions=8)
        await again.close()

    async def test_closed_store_refuses_everything(self, db_path: Path) -> None:
        """After close every call raises StorageClosedError; close is idempotent; no reopen."""
        storage = await _open_sqlite(db_path)
        await storage.close()
        await storage.close()
        calls = [
            storage.read(CLS, OID, "k"),
            storage.read_many(CLS, OID, ["k"]),
            storage.read_range(CLS, OID, start=None, end=None, limit=None, reverse=False),
            storage.read_alarm(CLS, OID),
            storage.read_idempotent(CLS, OID, "k", 0.0),
            storage.idempotency_horizon(CLS, OID, 0.0),
            storage.commit([_write(writes={"k": b"v"})]),
            storage.claim_partitions([0], "w"),
            storage.due_alarms(None, 0.0, 1),
            storage.next_alarm_time(None),
            storage.purge_idempotency(0.0, 1),
            storage.open(),
        ]
        for call in calls:
            with pytest.raises(StorageClosedError):
                await call


@dataclass
class _Waiter:
    """A CommitWaiter that records its outcome in a shared list."""

    name: int
    outcomes: list[tuple[int, BaseException | None]]
    wanted: bool = True

    def commit_wanted(self) -> bool:
        return self.wanted

    async def commit_done(self, error: BaseException | None) -> None:
        self.outcomes.append((self.name, error))


@dataclass
class _Submitter:
    """Submits numbered write-sets of one object each to a committer."""

    committer: GroupCommitter
    outcomes: list[tuple[int, BaseException | None]] = field(default_factory=list)
    count: int = 0

    def submit(self, write: ObjectWrite | None = None, *, wanted: bool = True) -> int:
        name = self.count
        self.count += 1
        if write is None:
            write = _write(f"o{name}", partition=name % PARTITIONS, writes={"n": b"%d" % name})
        self.committer.submit(PendingCommit(write, _Waiter(name, self.outcomes, wanted)))
        return name

    async def settled(self) -> list[tuple[int, BaseException | None]]:
        await eventually(lambda: len(self.outcomes) == self.count)
        return self.outcomes


@pytest.fixture(name="committer")
async def _committer(sqlite: SqliteStorage) -> AsyncIterator[GroupCommitter]:
    """A started GroupCommitter over the test's SQLite file."""
    committer = GroupCommitter(sqlite)
    committer.start()
    try:
        yield committer
    finally:
        await committer.stop()


class TestGroupCommitter:
    """Write-sets queued while a commit is in flight share the next transaction; FIFO replies."""

    async def test_batches_while_a_commit_is_in_flight(
        self, committer: GroupCommitter, sqlite: SqliteStorage
    ) -> None:
        """100 write-sets, 99 of them queued during the first commit, take two transactions."""
        submitter = _Submitter(committer)
        submitter.submit()
        await eventually(lambda: committer.queued == 0, interval=0)  # the first batch left
        for _ in range(99):
            submitter.submit()
        outcomes = await submitter.settled()
        assert outcomes == [(i, None) for i in range(100)]  # every reply, in submission order
        assert committer.stats.write_sets == 100
        assert committer.stats.transactions == 2
        for i in range(100):
            assert await sqlite.read(CLS, f"o{i}", "n") == b"%d" % i

    async def test_order_across_many_batches(self, committer: GroupCommitter) -> None:
        """Submissions spread over many loop turns are still answered strictly in order."""
        submitter = _Submitter(committer)
        for round_ in range(20):
            for _ in range(round_ % 4 + 1):
                submitter.submit()
            await asyncio.sleep(0)
        outcomes = await submitter.settled()
        assert [name for name, _ in outcomes] == list(range(submitter.count))
        assert all(error is None for _, error in outcomes)
        assert committer.stats.transactions < committer.stats.write_sets

    async def test_unwanted_write_is_abandoned(
        self, committer: GroupCommitter, sqlite: SqliteStorage
    ) -> None:
        """commit_wanted() False: the waiter gets CommitAbandonedError and nothing is written."""
        submitter = _Submitter(committer)
        submitter.submit()
        submitter.submit(wanted=False)
        submitter.submit()
        outcomes = await submitter.settled()
        assert [name for name, _ in outcomes] == [0, 1, 2]
        assert outcomes[0][1] is None and outcomes[2][1] is None
        assert isinstance(outcomes[1][1], CommitAbandonedError)
        assert await sqlite.read(CLS, "o1", "n") is None
        assert committer.stats.write_sets == 2

    async def test_nothing_to_write_waits_for_earlier_commits(
        self, committer: GroupCommitter
    ) -> None:
        """A write-set with nothing in it (or none at all) needs no transaction but keeps order."""
        submitter = _Submitter(committer)
        submitter.submit(_write("empty"))
        outcomes = await submitter.settled()
        assert outcomes == [(0, None)]
        assert committer.stats.transactions == 0
        submitter.submit()
        committer.submit(PendingCommit(None, _Waiter(99, submitter.outcomes)))
        submitter.count += 1
        outcomes = await submitter.settled()
        assert outcomes == [(0, None), (1, None), (99, None)]
        assert committer.stats.transactions == 1

    async def test_fenced_write_sets(
        self, committer: GroupCommitter, sqlite: SqliteStorage
    ) -> None:
        """Waiters of a fenced partition get FencedError; others in the batch succeed."""
        await sqlite.claim_partitions([1], "newer")
        submitter = _Submitter(committer)
        for _ in range(4):
            submitter.submit()
        outcomes = await submitter.settled()
        assert [name for name, _ in outcomes] == [0, 1, 2, 3]
        assert [error is None for _, error in outcomes] == [True, False, True, True]
        assert isinstance(outcomes[1][1], FencedError)
        assert outcomes[1][1].partitions == frozenset({1})
        assert committer.stats.write_sets == 3

    async def test_failed_transaction_fails_its_whole_batch(
        self, committer: GroupCommitter, sqlite: SqliteStorage
    ) -> None:
        """When storage fails, every waiter of the batch hears the error, in order."""
        await sqlite.close()
        submitter = _Submitter(committer)
        for _ in range(3):
            submitter.submit()
        outcomes = await submitter.settled()
        assert [name for name, _ in outcomes] == [0, 1, 2]
        assert all(isinstance(error, StorageClosedError) for _, error in outcomes)
        assert committer.stats.failures >= 1
        assert committer.stats.transactions == 0

    async def test_stop_flushes_then_refuses(self, sqlite: SqliteStorage) -> None:
        """stop() commits what is queued; a submit after stop raises StorageClosedError."""
        committer = GroupCommitter(sqlite)
        committer.start()
        submitter = _Submitter(committer)
        for _ in range(10):
            submitter.submit()
        await committer.stop()
        assert submitter.outcomes == [(i, None) for i in range(10)]
        with pytest.raises(StorageClosedError):
            submitter.submit()
        await committer.stop()

    async def test_no_restart_after_stop(self, sqlite: SqliteStorage) -> None:
        """A stopped committer refuses to start again (its loop would exit at the first lull)."""
        committer = GroupCommitter(sqlite)
        committer.start()
        await committer.stop()
        with pytest.raises(RuntimeError):
            committer.start()
        await committer.stop()


Outcomes = list[tuple[int, BaseException | None]]
Log = list[tuple[str, int]]
"""What happened, in order: ``("commit started", n)``, ``("commit ended", n)`` (the n-th call of
``commit``), ``("asked", name)`` (``commit_wanted``) and ``("told", name)`` (``commit_done``)."""


class _LoggedStorage(SqliteStorage):
    """Real SQLite that logs when each commit starts and ends, and can hold a commit back
    (while ``release`` is clear), fail the next ``fail`` commits, or fail ``partial_fail``
    partitions of the next commit (committing the rest, as replicated storage can)."""

    def __init__(self, path: Path, log: Log) -> None:
        super().__init__(path, partitions=PARTITIONS)
        self.log = log
        self.commits = 0
        self.release = asyncio.Event()
        self.release.set()
        self.held = asyncio.Event()
        """Set once a commit waits for ``release``."""
        self.fail = 0
        self.partial_fail: frozenset[int] = frozenset()

    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        self.commits += 1
        number = self.commits
        self.log.append(("commit started", number))
        try:
            if not self.release.is_set():
                self.held.set()
                await self.release.wait()
            if self.fail:
                self.fail -= 1
                raise StorageError("disk full (simulated)")
            if self.partial_fail:
                lost, self.partial_fail = self.partial_fail, frozenset()
                fenced = await super().commit([e for e in entries if e.partition not in lost])
                raise PartialCommitError(
                    {p: StorageError(f"partition {p} lost (simulated)") for p in lost}, fenced
                )
            return await super().commit(entries)
        finally:
            self.log.append(("commit ended", number))


@pytest.fixture(name="logged")
async def _logged(db_path: Path) -> AsyncIterator[_LoggedStorage]:
    """A _LoggedStorage on the test's SQLite file, every partition claimed with ``EPOCH``."""
    storage = _LoggedStorage(db_path, [])
    await storage.open()
    try:
        await storage.claim_partitions(range(PARTITIONS), "test", EPOCH)
        yield storage
    finally:
        await storage.close()


def _always() -> bool:
    return True


@dataclass(eq=False)
class _LoggedWaiter:
    """A CommitWaiter that logs when it is asked and told. ``commit_done`` may block on
    ``gate`` (``entered`` is set once it does) and yields to the loop, as sending a reply does,
    before it calls ``on_done`` and records its outcome."""

    name: int
    log: Log
    outcomes: Outcomes
    gate: asyncio.Event | None = None
    wanted: Callable[[], bool] = _always
    on_done: Callable[[], None] | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    def commit_wanted(self) -> bool:
        self.log.append(("asked", self.name))
        return self.wanted()

    async def commit_done(self, error: BaseException | None) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.on_done is not None:
            self.on_done()
        self.outcomes.append((self.name, error))
        self.log.append(("told", self.name))


def _submit_logged(
    committer: GroupCommitter, waiter: _LoggedWaiter, *, partition: int | None = None
) -> None:
    """Submit a write of ``n = name`` to object ``o<name>`` for ``waiter``."""
    name = waiter.name
    write = _write(
        f"o{name}",
        partition=name % PARTITIONS if partition is None else partition,
        writes={"n": b"%d" % name},
    )
    committer.submit(PendingCommit(write, waiter))


class TestGroupCommitterDelivery:
    """A cleanly committed batch's waiters are told while the next batch commits, in order;
    after a failed, fenced or abandoned write-set they are told before the next batch is taken;
    ``stop()`` waits for every delivery."""

    async def test_delivery_overlaps_the_next_commit(self, logged: _LoggedStorage) -> None:
        """While the first batch's first waiter is stuck in commit_done, the second batch is
        committed, and no more (one delivery overlaps one commit: a stuck waiter holds up
        commits); once it is released every waiter is told once, in submission order."""
        log = logged.log
        outcomes: Outcomes = []
        gate = asyncio.Event()
        committer = GroupCommitter(logged)
        committer.start()
        try:
            first = _LoggedWaiter(0, log, outcomes, gate=gate)
            _submit_logged(committer, first)
            _submit_logged(committer, _LoggedWaiter(1, log, outcomes))  # same batch
            await asyncio.wait_for(first.entered.wait(), 5)
            for name in (2, 3):  # the second batch, committed while waiter 0 is stuck
                _submit_logged(committer, _LoggedWaiter(name, log, outcomes))
            await eventually(lambda: ("commit ended", 2) in log)
            assert await logged.read(CLS, "o3", "n") == b"3"
            _submit_logged(committer, _LoggedWaiter(4, log, outcomes))  # the third
            for _ in range(20):
                await asyncio.sleep(0)
            assert ("commit started", 3) not in log  # held until the first batch is told
            assert outcomes == []  # nobody is told ahead of waiter 0
            gate.set()
            await committer.stop()
        finally:
            gate.set()
            await committer.stop()
        assert outcomes == [(i, None) for i in range(5)]  # each once, in submission order
        assert log.index(("commit started", 2)) < log.index(("told", 0))
        assert log.index(("told", 1)) < log.index(("commit started", 3))
        assert await logged.read(CLS, "o4", "n") == b"4"
        assert logged.commits == committer.stats.transactions == 3
        assert committer.stats.write_sets == 5

    async def test_order_across_batches_with_every_delivery_slow(
        self, logged: _LoggedStorage
    ) -> None:
        """Every waiter yields in commit_done, batches keep coming: still told exactly once each,
        strictly in submission order, and every write is stored."""
        log = logged.log
        outcomes: Outcomes = []
        committer = GroupCommitter(logged)
        committer.start()
        name = 0
        try:
            for round_ in range(30):
                for _ in range(round_ % 5 + 1):
                    _submit_logged(committer, _LoggedWaiter(name, log, outcomes))
                    name += 1
                await asyncio.sleep(0)
        finally:
            await committer.stop()
        assert outcomes == [(i, None) for i in range(name)]
        assert committer.stats.write_sets == name
        assert committer.stats.transactions > 1
        for i in range(name):
            assert await logged.read(CLS, f"o{i}", "n") == b"%d" % i

    @pytest.mark.parametrize("kind", ["failed", "partial", "fenced", "abandoned"])
    async def test_next_batch_is_taken_after_a_failed_batch_was_told(
        self, logged: _LoggedStorage, kind: str
    ) -> None:
        """Waiter 0's write fails (the whole commit, its partition of it, its fence, or it was
        abandoned); its commit_done resets its object. Waiter 2, queued while that commit ran,
        asks commit_wanted only after that reset, so it is abandoned and nothing of it is
        written. Waiter 1 shares the first batch on another partition."""
        log = logged.log
        outcomes: Outcomes = []
        reset = False

        def reset_object() -> None:
            nonlocal reset
            reset = True

        if kind == "fenced":
            await logged.claim_partitions([1], "newer")
        elif kind == "failed":
            logged.fail = 1
        elif kind == "partial":
            logged.partial_fail = frozenset({1})
        logged.release.clear()
        committer = GroupCommitter(logged)
        committer.start()
        try:
            failing = _LoggedWaiter(
                0, log, outcomes, wanted=lambda: kind != "abandoned", on_done=reset_object
            )
            _submit_logged(committer, failing, partition=1)
            _submit_logged(committer, _LoggedWaiter(1, log, outcomes), partition=2)
            await asyncio.wait_for(logged.held.wait(), 5)
            _submit_logged(
                committer,
                _LoggedWaiter(2, log, outcomes, wanted=lambda: not reset),
                partition=1,
            )
        finally:
            logged.release.set()
            await committer.stop()
        assert [name for name, _ in outcomes] == [0, 1, 2]
        errors = dict(outcomes)
        expected_first = {
            "failed": StorageError,
            "partial": StorageError,
            "fenced": FencedError,
            "abandoned": CommitAbandonedError,
        }[kind]
        assert isinstance(errors[0], expected_first), errors[0]
        if kind == "failed":
            assert isinstance(errors[1], StorageError)
            assert await logged.read(CLS, "o1", "n") is None
        else:
            assert errors[1] is None
            assert await logged.read(CLS, "o1", "n") == b"1"
        assert isinstance(errors[2], CommitAbandonedError)
        assert await logged.read(CLS, "o2", "n") is None
        assert log.index(("told", 1)) < log.index(("asked", 2))
        assert log.count(("asked", 2)) == 1
        assert logged.commits == 1  # the second batch had nothing left to write

    async def test_failed_batch_is_told_after_a_clean_batch_still_being_told(
        self, logged: _LoggedStorage
    ) -> None:
        """A clean batch's delivery is stuck when the next commit fails: the failed batch's
        waiters are told after it, and the batch after them is taken only then (its write,
        built on the failed one, is abandoned)."""
        log = logged.log
        outcomes: Outcomes = []
        gate = asyncio.Event()
        reset = False

        def reset_object() -> None:
            nonlocal reset
            reset = True

        committer = GroupCommitter(logged)
        committer.start()
        try:
            stuck = _LoggedWaiter(0, log, outcomes, gate=gate)
            _submit_logged(committer, stuck)
            await asyncio.wait_for(stuck.entered.wait(), 5)
            logged.fail = 1
            _submit_logged(committer, _LoggedWaiter(1, log, outcomes, on_done=reset_object))
            await eventually(lambda: ("commit ended", 2) in log)  # failed
            _submit_logged(committer, _LoggedWaiter(2, log, outcomes, wanted=lambda: not reset))
            for _ in range(20):  # the loop gets every chance to take waiter 2 early
                await asyncio.sleep(0)
            assert ("asked", 2) not in log
            assert committer.queued == 1
            assert outcomes == []
            gate.set()
        finally:
            gate.set()
            await committer.stop()
        assert [name for name, _ in outcomes] == [0, 1, 2]
        assert outcomes[0][1] is None
        assert isinstance(outcomes[1][1], StorageError)
        assert isinstance(outcomes[2][1], CommitAbandonedError)
        assert log.index(("told", 1)) < log.index(("asked", 2))
        assert await logged.read(CLS, "o0", "n") == b"0"
        assert await logged.read(CLS, "o1", "n") is None
        assert await logged.read(CLS, "o2", "n") is None

    async def test_stop_waits_for_a_stuck_delivery(self, logged: _LoggedStorage) -> None:
        """stop() is called while the first batch's delivery is stuck and the second batch's
        waits behind it; another task releases it later. stop() returns only after both
        batches' waiters were told."""
        log = logged.log
        outcomes: Outcomes = []
        gate = asyncio.Event()
        committer = GroupCommitter(logged)
        committer.start()
        stuck = _LoggedWaiter(0, log, outcomes, gate=gate)
        _submit_logged(committer, stuck)
        _submit_logged(committer, _LoggedWaiter(1, log, outcomes))
        await asyncio.wait_for(stuck.entered.wait(), 5)
        _submit_logged(committer, _LoggedWaiter(2, log, outcomes))
        await eventually(lambda: ("commit ended", 2) in log)

        async def release_later() -> None:
            for _ in range(20):  # far more loop turns than stop() needs when it does not wait
                await asyncio.sleep(0)
            log.append(("released", 0))
            gate.set()

        releaser = asyncio.create_task(release_later())
        try:
            await committer.stop()
            assert releaser.done()
            assert outcomes == [(0, None), (1, None), (2, None)]
            assert log.index(("released", 0)) < log.index(("told", 0))
        finally:
            gate.set()
            await releaser
            await committer.stop()

    async def test_stop_flushes_the_queue_behind_a_stuck_delivery(
        self, logged: _LoggedStorage
    ) -> None:
        """Write-sets queued when stop() is called are committed and told even while an
        earlier delivery is stuck; everything is told, in order, before stop() returns."""
        log = logged.log
        outcomes: Outcomes = []
        gate = asyncio.Event()
        committer = GroupCommitter(logged)
        committer.start()
        stuck = _LoggedWaiter(0, log, outcomes, gate=gate)
        _submit_logged(committer, stuck)
        await asyncio.wait_for(stuck.entered.wait(), 5)
        for name in range(1, 6):
            _submit_logged(committer, _LoggedWaiter(name, log, outcomes))
        stopping = asyncio.create_task(committer.stop())
        try:
            await eventually(lambda: ("commit ended", 2) in log)
            assert await logged.read(CLS, "o5", "n") == b"5"
            assert not stopping.done()
            gate.set()
            await stopping
        finally:
            gate.set()
            await committer.stop()
        assert outcomes == [(i, None) for i in range(6)]
        with pytest.raises(StorageClosedError):
            _submit_logged(committer, _LoggedWaiter(6, log, outcomes))


def _actor_storage(backend: Storage, limits: StorageLimits | None = None) -> ActorStorage:
    return ActorStorage(backend, CLS, OID, limits or StorageLimits())


def _object_write(changes: TurnWrites) -> ObjectWrite:
    return _write(writes=dict(changes.writes), cleared=changes.cleared, alarm=changes.alarm)


async def _committed(backend: Storage, values: dict[str, object]) -> None:
    await backend.commit([_write(writes={k: _encode(v) for k, v in values.items()})])


class TestActorStorageTurns:
    """A handler reads its own writes; end_turn hands them over, abort_turn drops them."""

    async def test_read_your_writes(self, backend: Storage) -> None:
        """get, get_many and list see the turn's puts and deletes before any commit."""
        await _committed(backend, {"a": 1, "b": 2})
        storage = _actor_storage(backend)
        storage.put("c", [3])
        storage.delete("a")
        storage.put_many({"b": "two", "d": {"x": 1}})
        assert await storage.get("a", "gone") == "gone"
        assert await storage.get("b") == "two"
        assert await storage.get_many(["a", "b", "c", "zz"]) == {"b": "two", "c": [3]}
        assert await storage.list() == {"b": "two", "c": [3], "d": {"x": 1}}
        storage.delete_many(["c", "d"])
        assert await storage.list() == {"b": "two"}

    async def test_values_are_copies(self, backend: Storage) -> None:
        """Mutating a value after put or after get never changes what is stored."""
        storage = _actor_storage(backend)
        value = [1, 2]
        storage.put("k", value)
        value.append(3)
        got = await storage.get("k")
        got.append(4)
        assert await storage.get("k") == [1, 2]

    async def test_end_turn_then_commit(self, backend: Storage) -> None:
        """end_turn returns exactly the turn's changes; a fresh view reads them once committed."""
        await _committed(backend, {"a": 1})
        storage = _actor_storage(backend)
        storage.put("b", 2)
        storage.delete("a")
        await storage.set_alarm(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        changes = storage.end_turn()
        assert changes.writes == {"b": _encode(2), "a": None}
        assert not changes.cleared
        assert changes.alarm == dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
        assert storage.end_turn().is_empty()
        # The next turn reads the previous turn's writes before they are durable.
        assert await storage.list() == {"b": 2}
        await backend.commit([_object_write(changes)])
        fresh = _actor_storage(backend)
        assert await fresh.list() == {"b": 2}
        assert await fresh.get_alarm() == changes.alarm

    async def test_abort_turn_discards_everything(self, backend: Storage) -> None:
        """Puts, deletes, delete_all and alarm changes of an aborted turn vanish."""
        await _committed(backend, {"a": 1})
        storage = _actor_storage(backend)
        storage.put("b", 2)
        storage.delete("a")
        storage.delete_all()
        await storage.set_alarm(100.0)
        storage.abort_turn()
        assert await storage.get("a") == 1
        assert await storage.get("b") is None
        assert await storage.list() == {"a": 1}
        assert await storage.get_alarm() is None
        assert storage.end_turn().is_empty()

    async def test_delete_all_then_reads(self, backend: Storage) -> None:
        """After delete_all only later writes of the turn exist, before and after the commit."""
        await _committed(backend, {"a": 1, "b": 2, "c": 3})
        storage = _actor_storage(backend)
        assert await storage.get("a") == 1
        storage.put("z", 0)
        storage.delete_all()
        assert await storage.get("a") is None
        assert await storage.get("z") is None
        assert await storage.list() == {}
        storage.put("b", "new")
        assert await storage.get_many(["a", "b", "c"]) == {"b": "new"}
        assert await storage.list(prefix="b") == {"b": "new"}
        changes = storage.end_turn()
        assert changes.cleared
        assert changes.writes == {"b": _encode("new")}
        # Before the commit lands, the object still sees only its new state.
        assert await storage.list() == {"b": "new"}
        assert await storage.get("c") is None
        await backend.commit([_object_write(changes)])
        assert await _actor_storage(backend).list() == {"b": "new"}

    async def test_alarm_arguments(self, backend: Storage) -> None:
        """set_alarm takes aware datetimes or epoch seconds >= 0 and refuses anything else."""
        storage = _actor_storage(backend)
        for bad in (dt.datetime(2030, 1, 1), -1.0, float("nan"), "soon"):
            with pytest.raises(BadRequestError):
                await storage.set_alarm(bad)  # type: ignore[arg-type]
        await storage.set_alarm(12.5)
        assert await storage.get_alarm() == 12.5
        await storage.delete_alarm()
        assert await storage.get_alarm() is None


class TestActorStorageList:
    """list() merges the cache, uncommitted turns and committed rows like one sorted dict."""

    @pytest.mark.parametrize("limit", [None, 0, 1, 2, 5])
    @pytest.mark.parametrize("reverse", [False, True])
    async def test_merges_pending_deletes_with_limit(
        self, backend: Storage, limit: int | None, reverse: bool
    ) -> None:
        """Keys deleted by an uncommitted turn never appear, and never shorten a limited page."""
        await _committed(backend, {f"k{i}": i for i in range(10)})
        storage = _actor_storage(backend)
        storage.delete_many(["k0", "k1", "k8", "k9"])
        storage.put("k05", "new")
        storage.end_turn()  # not committed: storage still has k0, k1, k8, k9
        expected_keys = sorted(["k2", "k3", "k4", "k5", "k6", "k7", "k05"], reverse=reverse)
        if limit is not None:
            expected_keys = expected_keys[:limit]
        got = await storage.list(limit=limit, reverse=reverse)
        assert list(got) == expected_keys

    async def test_negative_limit(self, backend: Storage) -> None:
        """A negative limit is a bad request."""
        with pytest.raises(BadRequestError):
            await _actor_storage(backend).list(limit=-1)

    async def test_randomized_against_a_dict_model(self, backend: Storage) -> None:
        """800 random operations (puts, deletes, clears, aborts, commits in batches, reloads)
        never make get, get_many or list disagree with a plain dict."""
        rng = random.Random(5150)
        keys = [*UNICODE_KEYS, "ab\U0010ffff", "b\x00", "c", "ca", "d"]
        bounds = [None, "", "a", "a\x00", "ab", "b", "c", "é", "\U0001f600", "\U0010ffff"]
        prefixes = [None, "", "a", "ab", "a\x00", "b", "c", "é", "日", "\U0001f600", "zz"]
        await _committed(backend, {k: f"initial {k}" for k in rng.sample(keys, 9)})
        visible: dict[str, object] = {
            k: msgspec.msgpack.decode(v)
            for k, v in await backend.read_range(
                CLS, OID, start=None, end=None, limit=None, reverse=False
            )
        }
        turn_start = dict(visible)
        pending: list[ObjectWrite] = []
        storage = _actor_storage(backend)

        async def commit_some() -> None:
            count = rng.randint(1, len(pending)) if pending else 0
            batch, pending[:] = pending[:count], pending[count:]
            assert await backend.commit(batch) == frozenset()

        for step in range(800):
            op = rng.choices(
                [
                    "put",
                    "delete",
                    "get",
                    "get_many",
                    "list",
                    "end",
                    "abort",
                    "clear",
                    "commit",
                    "reload",
                    "put_many",
                ],
                weights=[25, 12, 8, 5, 25, 10, 3, 2, 6, 2, 4],
            )[0]
            if op == "put":
                key = rng.choice(keys)
                storage.put(key, step)
                visible[key] = step
            elif op == "put_many":
                entries = {k: [step, k] for k in rng.sample(keys, 3)}
                storage.put_many(entries)
                visible.update(entries)
            elif op == "delete":
                key = rng.choice(keys)
                storage.delete(key)
                visible.pop(key, None)
            elif op == "clear":
                storage.delete_all()
                visible.clear()
            elif op == "get":
                key = rng.choice(keys)
                assert await storage.get(key, "absent") == visible.get(key, "absent"), step
            elif op == "get_many":
                wanted = rng.sample(keys, 5)
                assert await storage.get_many(wanted) == {
                    k: visible[k] for k in wanted if k in visible
                }, step
            elif op == "list":
                prefix = rng.choice(prefixes)
                start, end = rng.choice(bounds), rng.choice(bounds)
                limit = rng.choice([None, None, 0, 1, 2, 3, 7])
                reverse = rng.random() < 0.5
                model = sorted(
                    k
                    for k in visible
                    if (prefix is None or k.startswith(prefix))
                    and (start is None or k >= start)
                    and (end is None or k < end)
                )
                if reverse:
                    model.reverse()
                if limit is not None:
                    model = model[:limit]
                got = await storage.list(
                    prefix=prefix, start=start, end=end, limit=limit, reverse=reverse
                )
                assert list(got.items()) == [(k, visible[k]) for k in model], (
                    step,
                    prefix,
                    start,
                    end,
                    limit,
                    reverse,
                )
            elif op == "end":
                changes = storage.end_turn()
                if not changes.is_empty():
                    pending.append(_object_write(changes))
                turn_start = dict(visible)
            elif op == "abort":
                storage.abort_turn()
                visible = dict(turn_start)
            elif op == "commit":
                await commit_some()
            elif op == "reload":  # the object went idle (all durable) and was evicted
                changes = storage.end_turn()
                if not changes.is_empty():
                    pending.append(_object_write(changes))
                await backend.commit(pending)
                pending.clear()
                storage = _actor_storage(backend)
                turn_start = dict(visible)
        changes = storage.end_turn()
        await backend.commit([*pending, _object_write(changes)])
        assert await _actor_storage(backend).list() == visible
        rows = await backend.read_range(CLS, OID, start=None, end=None, limit=None, reverse=False)
        assert [(k, msgspec.msgpack.decode(v)) for k, v in rows] == sorted(visible.items())

    async def test_prefix_ending_before_the_surrogate_block(self, db_path: Path) -> None:
        """list(prefix=...) works for a prefix ending in U+D7FF (the range end must be UTF-8)."""
        storage = await _open_sqlite(db_path)
        try:
            await storage.claim_partitions(range(PARTITIONS), "test", EPOCH)
            await _committed(storage, {"\ud7ff": 1, "\ud7ffa": 2, "\ue000": 3})
            assert await _actor_storage(storage).list(prefix="\ud7ff") == {
                "\ud7ff": 1,
                "\ud7ffa": 2,
            }
        finally:
            await storage.close()


class TestActorStorageLimits:
    """Keys, values and key counts over the limits fail the call, not the commit."""

    LIMITS = StorageLimits(max_key_bytes=16, max_value_bytes=32, max_keys_per_call=4)

    @pytest.fixture(name="storage")
    def _storage(self) -> ActorStorage:
        """A view with small limits (checks happen before any I/O)."""
        return _actor_storage(InMemoryStorage(), self.LIMITS)

    @pytest.mark.parametrize("key", ["k" * 16, "é" * 8, "\U0001f600" * 4, ""])
    async def test_keys_at_the_limit(self, storage: ActorStorage, key: str) -> None:
        """A key of exactly max_key_bytes UTF-8 bytes is accepted everywhere."""
        storage.put(key, 1)
        assert await storage.get(key) == 1
        storage.delete(key)

    @pytest.mark.parametrize("key", ["k" * 17, "é" * 9, "\U0001f600" * 5, "a" * 15 + "é"])
    async def test_keys_over_the_limit(self, storage: ActorStorage, key: str) -> None:
        """One byte more raises PayloadTooLargeError from every call that takes keys."""
        calls: list[Callable[[], None]] = [
            lambda: storage.put(key, 1),
            lambda: storage.put_many({key: 1}),
            lambda: storage.delete(key),
            lambda: storage.delete_many([key]),
        ]
        for call in calls:
            with pytest.raises(PayloadTooLargeError) as error:
                call()
            assert error.value.type == "key_too_large"
        for coroutine in (storage.get(key), storage.get_many([key])):
            with pytest.raises(PayloadTooLargeError):
                await coroutine
        assert storage.end_turn().is_empty()

    async def test_values_over_the_limit(self, storage: ActorStorage) -> None:
        """An encoded value over max_value_bytes is refused and the turn keeps nothing of it."""
        storage.put("ok", "x" * 31)  # 32 bytes of MessagePack: at the limit
        with pytest.raises(PayloadTooLargeError) as error:
            storage.put("big", "x" * 32)
        assert error.value.type == "value_too_large"
        with pytest.raises(PayloadTooLargeError):
            storage.put_many({"a": 1, "big": "x" * 100})
        assert await storage.get("a") is None  # put_many is all or nothing
        assert await storage.list() == {"ok": "x" * 31}

    async def test_unencodable_and_non_string(self, storage: ActorStorage) -> None:
        """Values msgspec cannot encode and keys that are not str are bad requests."""
        with pytest.raises(BadRequestError) as error:
            storage.put("k", object())
        assert error.value.type == "unencodable_value"
        with pytest.raises(BadRequestError):
            storage.put(7, 1)  # type: ignore[arg-type]

    async def test_too_many_keys(self, storage: ActorStorage) -> None:
        """More than max_keys_per_call keys in one call is refused with a fix-it message."""
        four = ["a", "b", "c", "d"]
        storage.put_many(dict.fromkeys(four, 1))
        assert len(await storage.get_many(four)) == 4
        storage.delete_many(four)
        five = [*four, "e"]
        with pytest.raises(BadRequestError, match="split the call") as error:
            await storage.get_many(five)
        assert error.value.type == "too_many_keys"
        with pytest.raises(BadRequestError):
            storage.put_many(dict.fromkeys(five, 1))
        with pytest.raises(BadRequestError):
            storage.delete_many(five)

    async def test_key_that_cannot_be_stored(self, storage: ActorStorage) -> None:
        """A key with a lone surrogate can never be committed, so put refuses it at once."""
        with pytest.raises(BadRequestError):
            storage.put("\udc80", 1)


class TestPrefixRange:
    """prefix_range turns a prefix into [start, end) bounds that storage can use."""

    @pytest.mark.parametrize(
        ("prefix", "bounds"),
        [
            ("", ("", None)),
            ("a", ("a", "b")),
            ("msg:", ("msg:", "msg;")),
            ("a\x00", ("a\x00", "a\x01")),
            ("é", ("é", "ê")),
            ("\U0010ffff", ("\U0010ffff", None)),
            ("\U0010ffff\U0010ffff", ("\U0010ffff\U0010ffff", None)),
            ("a\U0010ffff", ("a\U0010ffff", "b")),
            ("ab\U0010ffff\U0010ffff", ("ab\U0010ffff\U0010ffff", "ac")),
        ],
    )
    def test_bounds(self, prefix: str, bounds: tuple[str, str | None]) -> None:
        """The end bound increments the last character that can be incremented."""
        assert prefix_range(prefix) == bounds

    def test_exactly_the_prefixed_keys(self) -> None:
        """For random keys and prefixes, start <= key < end exactly when key starts with prefix."""
        rng = random.Random(7)
        alphabet = ["a", "b", "\x00", "é", "\U0010ffff", "\U0010fffe", "\ud7ff", "\ue000", "z"]
        for _ in range(3000):
            prefix = "".join(rng.choices(alphabet, k=rng.randint(0, 3)))
            key = "".join(rng.choices(alphabet, k=rng.randint(0, 5)))
            if rng.random() < 0.3:
                key = prefix + key
            start, end = prefix_range(prefix)
            inside = start <= key and (end is None or key < end)
            assert inside == key.startswith(prefix), (prefix, key)

    @pytest.mark.parametrize("prefix", ["\ud7ff", "a\ud7ff", "\ud7ff\U0010ffff"])
    def test_end_bound_is_valid_utf8(self, prefix: str) -> None:
        """The end bound never lands in the surrogate block, which UTF-8 (and SQLite) refuse."""
        _, end = prefix_range(prefix)
        assert end is not None
        end.encode("utf-8")
