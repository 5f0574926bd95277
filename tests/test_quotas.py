"""Size limits on what objects store and do: the per-object quota (``--max-object-bytes``), the
write size of one turn (``--max-turn-bytes``, and what one partition log record holds with
replicated storage), and ``set_alarm``'s refusals and re-arm rule.

Unit tests drive ``ActorStorage`` against ``InMemoryStorage`` and a real SQLite file the way the
turn engine does; the rest go through a real worker and ``ActorClient``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from ndo import Actor, AlarmInfo, method
from ndo.actors import ActorClient, ActorStorage, BadRequestError, PayloadTooLargeError
from ndo.actors.runtime import (
    ALARM_REARM_DELAY,
    WRITE_FRAMING,
    StorageLimits,
    TurnWrites,
    check_quota,
)
from ndo.service import ReplicatedStorage, WorkerConfig
from ndo.storage import (
    IdempotentReply,
    InMemoryStorage,
    LogRecord,
    ObjectWrite,
    SqliteStorage,
    Storage,
    encode_log_record,
)
from tests.worker_fixtures import WorkerFactory

CLS, OID = "Bulk", "b1"
KIB = 1024


class Bulk(Actor):
    """Writes, deletes and counts many keys of a chosen size in one call."""

    @method
    async def fill(self, prefix: str, count: int, size: int) -> int:
        """Put ``count`` keys ``<prefix><i>`` holding ``size`` characters each."""
        for i in range(count):
            self.storage.put(f"{prefix}{i}", "x" * size)
        return count

    @method
    async def fill_and_echo(self, count: int, size: int) -> str:
        """Put ``count`` keys and return a reply of ``size`` characters."""
        for i in range(count):
            self.storage.put(f"e{i}", "x" * KIB)
        return "y" * size

    @method
    async def drop(self, prefix: str, count: int) -> None:
        """Delete keys ``<prefix>0`` .. ``<prefix><count-1>``."""
        self.storage.delete_many(f"{prefix}{i}" for i in range(count))

    @method
    async def swap(self, old: str, new: str, size: int) -> None:
        """Delete ``old`` and put ``new`` with ``size`` characters, in one turn."""
        self.storage.delete(old)
        self.storage.put(new, "x" * size)

    @method
    async def keys(self) -> list[str]:
        """Every key stored."""
        return list(await self.storage.list())


class Clock(Actor):
    """An alarm that re-arms itself in the past every time it fires."""

    @method
    async def start(self) -> None:
        """Arm the alarm for now."""
        await self.storage.set_alarm(time.time())

    @method
    async def stop(self) -> int:
        """Cancel the alarm; return how many times it fired."""
        await self.storage.delete_alarm()
        fired: int = await self.storage.get("fired", 0)
        return fired

    @method
    async def when(self) -> float | None:
        """The alarm time set, if any."""
        return await self.storage.get_alarm()

    @method
    async def arm(self, when: str) -> None:
        """``set_alarm`` with a value named by ``when`` (JSON cannot carry nan or inf)."""
        values: dict[str, object] = {
            "true": True,
            "nan": float("nan"),
            "inf": float("inf"),
            "negative": -1.0,
            "milliseconds": time.time() * 1000,
            "text": "soon",
            "naive": dt.datetime(2030, 1, 1),
        }
        await self.storage.set_alarm(values[when])  # type: ignore[arg-type]

    async def alarm(self, info: AlarmInfo) -> None:
        """Count the delivery, then re-arm 60 s in the past."""
        self.storage.put("fired", await self.storage.get("fired", 0) + 1)
        await self.storage.set_alarm(time.time() - 60)


CLASSES: list[type[Actor]] = [Bulk, Clock]


class _CountingStorage(InMemoryStorage):
    """In-memory storage that counts the reads the quota check makes."""

    def __init__(self) -> None:
        super().__init__()
        self.size_reads = 0
        self.many_reads: list[list[str]] = []

    async def object_size(self, class_name: str, object_id: str) -> int:
        self.size_reads += 1
        return await super().object_size(class_name, object_id)

    async def read_many(
        self, class_name: str, object_id: str, keys: Sequence[str]
    ) -> dict[str, bytes]:
        self.many_reads.append(list(keys))
        return await super().read_many(class_name, object_id, keys)


def _view(backend: Storage, **limits: int) -> ActorStorage:
    return ActorStorage(backend, CLS, OID, StorageLimits(**limits))


async def _commit(backend: Storage, changes: TurnWrites) -> None:
    await backend.commit([ObjectWrite(CLS, OID, 0, 0, changes.writes, changes.cleared)])


async def _turn(view: ActorStorage, backend: Storage) -> None:
    """End a turn as the runtime does: the quota check, then the commit."""
    if view.quota_due():
        await check_quota(view)
    await _commit(backend, view.end_turn())


def _entry(key: str, value: object) -> int:
    return len(key.encode()) + len(msgspec.msgpack.encode(value))


class TestTurnWriteSize:
    """A turn's writes are counted as they are made; past ``max_turn_bytes`` a write fails."""

    async def test_counts_keys_values_and_framing(self) -> None:
        """Each key counts its bytes, its value and WRITE_FRAMING; exactly the limit fits."""
        value = "x" * 100
        limit = 3 * (_entry("k0", value) + WRITE_FRAMING)
        view = _view(InMemoryStorage(), max_turn_bytes=limit)
        view.put_many({"k0": value, "k1": value, "k2": value})
        with pytest.raises(PayloadTooLargeError) as refused:
            view.delete("k3")
        assert refused.value.type == "turn_too_large"
        assert f"over the {limit}-byte limit" in refused.value.message
        assert "--max-turn-bytes" in refused.value.message
        assert sorted(view.end_turn().writes) == ["k0", "k1", "k2"]

    async def test_rewriting_a_key_counts_it_once(self) -> None:
        """Putting one key many times in a turn counts only its last value."""
        view = _view(InMemoryStorage(), max_turn_bytes=2 * KIB)
        for _ in range(100):
            view.put("k", "x" * KIB)
        view.delete("k")
        view.put("k", "x" * KIB)
        assert view.end_turn().writes.keys() == {"k"}

    async def test_a_refused_put_many_writes_nothing(self) -> None:
        """put_many is all or nothing when it crosses the limit."""
        view = _view(InMemoryStorage(), max_turn_bytes=KIB)
        view.put("small", 1)
        with pytest.raises(PayloadTooLargeError):
            view.put_many({"a": "x" * 400, "b": "x" * 400, "c": "x" * 400})
        assert view.end_turn().writes.keys() == {"small"}

    async def test_each_turn_and_delete_all_start_from_zero(self) -> None:
        """The count resets at the turn boundary, on abort and on delete_all."""
        view = _view(InMemoryStorage(), max_turn_bytes=KIB)
        for _ in range(3):
            view.put("a", "x" * 900)
            view.end_turn()
        view.put("a", "x" * 900)
        view.abort_turn()
        view.put("b", "x" * 900)
        view.delete_all()
        view.put("c", "x" * 900)
        assert view.end_turn().writes.keys() == {"c"}

    async def test_zero_means_no_limit(self) -> None:
        """max_turn_bytes=0 lets a turn write any amount."""
        view = _view(InMemoryStorage(), max_turn_bytes=0, max_object_bytes=0)
        for i in range(300):
            view.put(f"k{i}", "x" * (100 * KIB))
        assert len(view.end_turn().writes) == 300

    async def test_a_stored_reply_counts(self) -> None:
        """The reply remembered with a turn's writes counts toward its write size."""
        view = _view(InMemoryStorage(), max_turn_bytes=KIB)
        view.put("a", "x" * 500)
        with pytest.raises(PayloadTooLargeError) as refused:
            view.count_stored_reply(600)
        assert "Idempotency-Key" in refused.value.message


class TestObjectQuota:
    """The quota check knows the object's size from one read and keeps it up to date."""

    async def test_size_is_read_once_then_tracked(self) -> None:
        """One size read at the first writing turn; read-only turns have nothing to check."""
        backend = _CountingStorage()
        view = _view(backend, max_object_bytes=10 * KIB)
        await view.get("a")
        assert not view.quota_due()
        for i in range(5):
            view.put("a", "x" * i)
            await _turn(view, backend)
        assert backend.size_reads == 1
        assert backend.many_reads == []  # "a" was cached by the first get

    async def test_old_values_of_uncached_keys_are_read_in_one_call(self) -> None:
        """Keys written without being read first are looked up together, once."""
        backend = _CountingStorage()
        first = _view(backend, max_object_bytes=10 * KIB)
        first.put_many({"a": "x" * 1000, "b": "x" * 1000})
        await _turn(first, backend)
        view = _view(backend, max_object_bytes=10 * KIB)
        view.put_many({"a": "x" * 10, "b": "x" * 10, "c": "x" * 10})
        backend.many_reads.clear()
        await _turn(view, backend)
        assert [sorted(keys) for keys in backend.many_reads] == [["a", "b", "c"]]
        view.put_many({"a": 1, "c": 2})
        await _turn(view, backend)
        assert len(backend.many_reads) == 1

    async def test_growth_past_the_quota_is_refused(self) -> None:
        """A turn that would store more than the quota fails and changes nothing."""
        backend = InMemoryStorage()
        view = _view(backend, max_object_bytes=3 * KIB)
        view.put_many({"a": "x" * KIB, "b": "x" * KIB})
        await _turn(view, backend)
        view.put("c", "x" * KIB)
        with pytest.raises(PayloadTooLargeError) as refused:
            await check_quota(view)
        assert refused.value.type == "object_too_large"
        size = 2 * _entry("a", "x" * KIB) + _entry("c", "x" * KIB)
        assert f"store {size} bytes" in refused.value.message
        assert "--max-object-bytes" in refused.value.message
        view.abort_turn()
        view.put("c", "x" * 900)  # what fits still goes in
        await _turn(view, backend)
        assert sorted(backend.object_items(CLS, OID)) == ["a", "b", "c"]

    async def test_an_object_over_its_quota_may_shrink(self) -> None:
        """Over the quota (lowered meanwhile), deletes and shrinking rewrites succeed and
        growth does not."""
        backend = InMemoryStorage()
        big = _view(backend, max_object_bytes=0)
        big.put_many({f"k{i}": "x" * KIB for i in range(8)})
        await _turn(big, backend)
        view = _view(backend, max_object_bytes=2 * KIB)
        view.put("k0", "x" * (KIB + 1))
        with pytest.raises(PayloadTooLargeError):
            await check_quota(view)
        view.abort_turn()
        view.delete("k0")
        view.put("k1", "x" * 10)
        await _turn(view, backend)
        view.put("k2", "x" * KIB)  # same size: allowed
        await _turn(view, backend)
        view.delete_many([f"k{i}" for i in range(3, 8)])
        await _turn(view, backend)
        view.put("k9", "x" * 100)
        await _turn(view, backend)
        assert sorted(backend.object_items(CLS, OID)) == ["k1", "k2", "k9"]

    async def test_delete_all_leaves_only_the_new_writes(self) -> None:
        """After delete_all the object's size is its new writes, with nothing read."""
        backend = _CountingStorage()
        big = _view(backend, max_object_bytes=0)
        big.put_many({f"k{i}": "x" * KIB for i in range(8)})
        await _turn(big, backend)
        view = _view(backend, max_object_bytes=2 * KIB)
        view.delete_all()
        view.put("only", "x" * KIB)
        await _turn(view, backend)
        view.put("more", "x" * 900)
        await _turn(view, backend)
        assert backend.many_reads == []
        view.put("too much", "x" * 200)
        with pytest.raises(PayloadTooLargeError):
            await check_quota(view)

    async def test_sqlite_counts_utf8_bytes(self, tmp_path: Path) -> None:
        """SQLite and memory agree on an object's size, non-ASCII keys counted in UTF-8."""
        sqlite = SqliteStorage(tmp_path / "db.sqlite3", partitions=8)
        await sqlite.open()
        memory = InMemoryStorage()
        try:
            assert await sqlite.object_size(CLS, OID) == 0
            writes: dict[str, bytes | None] = {"ключ": b"\x01" * 100, "k": b"v", "日本": b""}
            for backend in (sqlite, memory):
                await backend.claim_partitions([0], "test", 0)
                await _commit(backend, TurnWrites(writes, False, -1.0))
            expected = len("ключ".encode()) + 100 + 1 + 1 + len("日本".encode())
            assert await sqlite.object_size(CLS, OID) == expected
            assert await memory.object_size(CLS, OID) == expected
        finally:
            await sqlite.close()


class TestSetAlarmUnit:
    """set_alarm refuses times that cannot be meant and slows down alarms that re-arm."""

    @pytest.mark.parametrize(
        "when",
        [True, float("nan"), float("inf"), -1.0, time.time() * 1000, dt.datetime(2030, 1, 1)],
        ids=["bool", "nan", "inf", "negative", "milliseconds", "naive"],
    )
    async def test_refused(self, when: object) -> None:
        """Each is a 400 invalid_alarm_time."""
        view = _view(InMemoryStorage())
        with pytest.raises(BadRequestError) as refused:
            await view.set_alarm(when)  # type: ignore[arg-type]
        assert refused.value.type == "invalid_alarm_time"

    async def test_milliseconds_are_named(self) -> None:
        """The far-future refusal says it looks like milliseconds and to pass seconds."""
        view = _view(InMemoryStorage())
        with pytest.raises(BadRequestError) as refused:
            await view.set_alarm(time.time() * 1000)
        assert "milliseconds" in refused.value.message
        assert "seconds" in refused.value.message

    async def test_a_past_time_inside_the_alarm_moves_to_one_second_ahead(self) -> None:
        """Inside an alarm turn a past (or too near) time becomes now + ALARM_REARM_DELAY;
        later times and ordinary turns are left alone."""
        view = _view(InMemoryStorage())
        view.alarm_fired(time.time())
        before = time.time()
        await view.set_alarm(before - 60)
        moved = await view.get_alarm()
        assert moved is not None and moved >= before + ALARM_REARM_DELAY
        later = time.time() + 30
        await view.set_alarm(later)
        assert await view.get_alarm() == later
        view.end_turn()
        await view.set_alarm(before - 60)  # an ordinary turn: fires at once
        assert await view.get_alarm() == before - 60


class TestQuotaThroughAWorker:
    """A real worker refuses growth past --max-object-bytes with 413 and keeps nothing of it."""

    async def test_refused_then_deletes_work(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """Over the quota: 413 object_too_large, nothing changed; deleting keys then works and
        frees room for new writes."""
        await start_worker(classes=CLASSES, max_object_bytes=10 * KIB)
        bulk = client.get(Bulk, "q1")
        await bulk.call(Bulk.fill, "a", 8, KIB)
        with pytest.raises(PayloadTooLargeError) as refused:
            await bulk.call(Bulk.fill, "b", 4, KIB)
        assert refused.value.type == "object_too_large"
        assert "--max-object-bytes" in refused.value.message
        assert sorted(await bulk.call(Bulk.keys)) == [f"a{i}" for i in range(8)]
        await bulk.call(Bulk.drop, "a", 4)
        await bulk.call(Bulk.fill, "b", 4, KIB)
        assert len(await bulk.call(Bulk.keys)) == 8

    async def test_a_fresh_activation_reads_the_size(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """After eviction the quota still counts what is stored."""
        worker = await start_worker(classes=CLASSES, max_object_bytes=10 * KIB)
        bulk = client.get(Bulk, "q2")
        await bulk.call(Bulk.fill, "a", 8, KIB)
        assert worker.catalog.evict_all_idle("test") >= 1
        with pytest.raises(PayloadTooLargeError):
            await bulk.call(Bulk.fill, "b", 4, KIB)
        assert len(await bulk.call(Bulk.keys)) == 8

    async def test_the_quota_holds_across_restarts(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """A restarted worker knows the object's size from storage; one restarted with a lower
        quota lets the object shrink but not grow."""
        first = await start_worker(classes=CLASSES, max_object_bytes=10 * KIB)
        bulk = client.get(Bulk, "q3")
        await bulk.call(Bulk.fill, "a", 8, KIB)
        await first.stop()
        second = await start_worker(classes=CLASSES, max_object_bytes=10 * KIB)
        with pytest.raises(PayloadTooLargeError):
            await bulk.call(Bulk.fill, "b", 4, KIB)
        await second.stop()
        await start_worker(classes=CLASSES, max_object_bytes=4 * KIB)
        with pytest.raises(PayloadTooLargeError):
            await bulk.call(Bulk.swap, "a0", "big", 2 * KIB)
        await bulk.call(Bulk.swap, "a0", "small", 10)
        await bulk.call(Bulk.drop, "a", 8)
        assert await bulk.call(Bulk.keys) == ["small"]
        await bulk.call(Bulk.fill, "c", 3, KIB)

    async def test_turn_too_large(self, start_worker: WorkerFactory, client: ActorClient) -> None:
        """A call writing more than --max-turn-bytes gets 413 turn_too_large and writes
        nothing."""
        await start_worker(classes=CLASSES, max_turn_bytes=5 * KIB)
        bulk = client.get(Bulk, "t1")
        with pytest.raises(PayloadTooLargeError) as refused:
            await bulk.call(Bulk.fill, "a", 6, KIB)
        assert refused.value.type == "turn_too_large"
        assert await bulk.call(Bulk.keys) == []
        await bulk.call(Bulk.fill, "a", 4, KIB)

    @pytest.mark.parametrize(
        "when", ["true", "nan", "inf", "negative", "milliseconds", "text", "naive"]
    )
    async def test_set_alarm_refusals(
        self, start_worker: WorkerFactory, client: ActorClient, when: str
    ) -> None:
        """Each bad alarm time is a 400 invalid_alarm_time, and no alarm is set."""
        await start_worker(classes=CLASSES)
        clock = client.get(Clock, f"bad-{when}")
        with pytest.raises(BadRequestError) as refused:
            await clock.call(Clock.arm, when)
        assert refused.value.type == "invalid_alarm_time"
        assert await clock.call(Clock.when) is None


class TestAlarmRearm:
    """An alarm handler that re-arms in the past cannot spin the worker."""

    async def test_fires_a_bounded_number_of_times(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """Re-armed 60 s in the past on every delivery, it fires about once a second (at most
        5 times in 3 s, where an unbounded loop fires hundreds of times)."""
        await start_worker(classes=CLASSES)
        clock = client.get(Clock, "spin")
        await clock.call(Clock.start)
        await asyncio.sleep(3.0)
        fired = await clock.call(Clock.stop)
        assert 2 <= fired <= 5


class TestReplicated:
    """With replicated storage the quota holds, and a turn too large for one log record is a
    413 as it writes, not a 503 at every commit."""

    async def test_quota_and_turn_size(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """Quota refusals and a 2 MiB turn (the server's max_payload is 1 MiB) are 413s; the
        worker counts no commit failure and the object keeps working."""
        worker = await start_worker(
            classes=CLASSES, storage="replicated", journal=False, max_object_bytes=4 * 1024 * KIB
        )
        bulk = client.get(Bulk, "r1")
        for prefix in "abcde":  # 800 KiB a call: each fits one log record
            await bulk.call(Bulk.fill, prefix, 8, 100 * KIB)
        with pytest.raises(PayloadTooLargeError) as refused:
            await bulk.call(Bulk.fill, "f", 8, 100 * KIB)
        assert refused.value.type == "object_too_large"
        for prefix in "abcde":
            await bulk.call(Bulk.drop, prefix, 8)
        big = client.get(Bulk, "r2")
        with pytest.raises(PayloadTooLargeError) as too_big:
            await big.call(Bulk.fill, "a", 20, 100 * KIB)
        assert too_big.value.type == "turn_too_large"
        with pytest.raises(PayloadTooLargeError) as with_reply:
            await big.call(Bulk.fill_and_echo, 5, 1020 * KIB)  # its reply is stored too
        assert with_reply.value.type == "turn_too_large"
        assert worker.stats().commit_failures == 0
        await big.call(Bulk.fill, "a", 5, KIB)
        assert len(await big.call(Bulk.keys)) == 5
        assert len(await bulk.call(Bulk.keys)) == 0


class TestReplicatedRecordFits:
    """A turn just under replicated storage's turn limit fits one partition log record."""

    @pytest.mark.parametrize("value_size", [0, 300, 100 * KIB], ids=["tiny", "small", "large"])
    async def test_a_full_turn_encodes_under_the_record_limit(
        self, tmp_path: Path, value_size: int
    ) -> None:
        """Filled until refused, with the longest names and idempotency key, the write-set's
        log record stays under the server's default max_payload less its headroom."""
        replicated = ReplicatedStorage(
            tmp_path / "r.sqlite3",
            partitions=8,
            writer="w" * 64,
            snapshot_every=10,
            append_timeout=1,
        )
        limits = replicated.turn_limits(StorageLimits())
        assert 0 < limits.max_turn_bytes < 1024 * KIB
        view = ActorStorage(InMemoryStorage(), "C" * 64, "i" * 128, limits)
        reply = b"r" * 100
        view.count_stored_reply(len(reply))
        with pytest.raises(PayloadTooLargeError):  # noqa: PT012 (filled until refused)
            for i in range(1024 * KIB):
                view.put(f"{i:06d}", b"v" * value_size)
        changes = view.end_turn()
        write = ObjectWrite(
            "C" * 64, "i" * 128, 7, 2**62, changes.writes, alarm=time.time(),
            idempotent_reply=IdempotentReply("k" * 256, reply, time.time()),
        )  # fmt: skip
        record = LogRecord(prev=2**62, epoch=2**62, writer="w" * 64, writes=[write])
        assert len(encode_log_record(record)) <= 1024 * KIB - 4096


def test_worker_defaults() -> None:
    """The worker's defaults: 1 GiB per object, 32 MiB per turn, the same as StorageLimits'."""
    limits = WorkerConfig().storage_limits()
    assert (limits.max_object_bytes, limits.max_turn_bytes) == (1024**3, 32 * 1024**2)
    assert limits == StorageLimits()
