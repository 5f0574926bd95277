"""The journal (turns recorded to JetStream), ``ndo replay`` and ``ndo tail``.

Real nats-server with JetStream and a real worker throughout. Most tests stop the worker before
reading: ``stop`` publishes what the journal buffered and waits for the acknowledgements, so every
record is in the stream.

A journal message holds the records of one flush window (50 ms) for the objects of one journal
shard, one JSON line each; a step's position is the message's stream sequence plus its place
among the object's records in that message (``1234`` alone, ``1234.2`` when it shares one).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from structlog.testing import capture_logs

from ndo.actors import (
    Actor,
    ActorClient,
    ActorId,
    ConflictError,
    HandlerError,
    RetryPolicy,
    method,
)
from ndo.actors.runtime import ALARM_UNCHANGED, TurnWrites
from ndo.examples import Counter
from ndo.ops import cli
from ndo.ops._replay import (
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_OK,
    JournalStep,
    ReplayOptions,
    StepPosition,
    parse_point,
    read_journal,
    reconstruct,
    run_replay,
    select_steps,
)
from ndo.ops._tail import TailOptions, run_tail
from ndo.service import Envelope, Worker, WorkerMetrics, parse_duration, parse_size
from ndo.service._journal import JournalEntry, JournalPublisher
from ndo.service.journal import (
    JournalRecord,
    JournalWrites,
    decode_journal_message,
    encode_journal_record,
    journal_stream_name,
)
from ndo.subjects import (
    MSGPACK_CONTENT_TYPE,
    Header,
    journal_shard,
    journal_subject,
    journal_wildcard,
    legacy_journal_subject,
    partition_of,
    rpc_subject,
)
from tests.conftest import NatsServerFactory
from tests.helpers import eventually
from tests.objects import Faulty, Flusher, Reminder, Store
from tests.worker_fixtures import ALL_CLASSES, WorkerFactory

_FLUSH_GAP: float = 0.2
"""Seconds to wait so the next record goes out in another journal message (the publisher
collects records for 50 ms before it publishes them)."""


@pytest.fixture(name="worker")
async def _worker(start_worker: WorkerFactory) -> Worker:
    """A worker that journals successful reads too (``journal_reads=True``): most tests here
    check read steps (``get``, ``list``) or re-execute them. Tests of the default start their
    own worker with ``start_worker()``."""
    return await start_worker(journal_reads=True)


async def _steps(nc: NatsClient, class_name: str, object_id: str) -> list[JournalStep]:
    return list(reconstruct(await read_journal(nc, "ndo", class_name, object_id)))


def _plain_record() -> JournalRecord:
    """A successful request record of object C/i (for tests of step selection)."""
    return JournalRecord(
        kind="request",
        status="ok",
        class_name="C",
        object_id="i",
        partition=0,
        method="m",
        time=100.0,
        duration=0.0,
        worker="w",
    )


async def _replay_json(url: str, **options: Any) -> tuple[int, list[dict[str, Any]], str]:
    out, err = io.StringIO(), io.StringIO()
    classes = options.pop("classes", ())
    code = await run_replay(
        ReplayOptions(nats_url=url, as_json=True, **options), classes=classes, out=out, err=err
    )
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


async def _wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def _failures(worker: Worker, reason: str) -> float:
    value = worker.metrics.registry.get_sample_value(
        "ndo_journal_failures_total", {"reason": reason}
    )
    return value or 0.0


def _candidates(object_id: str) -> Iterator[str]:
    return (f"{object_id}-{n}" for n in itertools.count())


def _same_shard_id(class_name: str, object_id: str) -> str:
    """Another id of ``class_name`` in the journal shard of ``object_id``."""
    shard = journal_shard(class_name, object_id)
    return next(c for c in _candidates(object_id) if journal_shard(class_name, c) == shard)


def _other_shard_id(class_name: str, object_id: str) -> str:
    """An id of ``class_name`` in another journal shard than ``object_id``."""
    shard = journal_shard(class_name, object_id)
    return next(c for c in _candidates(object_id) if journal_shard(class_name, c) != shard)


async def _stream_messages(nc: NatsClient) -> list[tuple[int, str, bytes]]:
    """Every message of the journal stream as ``(seq, subject, body)``."""
    js = nc.jetstream()
    info = await js.stream_info("NDO_JOURNAL")
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("NDO_JOURNAL", seq)
        assert msg.seq is not None and msg.subject is not None and msg.data is not None
        found.append((msg.seq, msg.subject, msg.data))
    return found


class TestJournalRecords:
    """Turns are recorded: input, outcome, write-set, time, duration, worker."""

    async def test_request_records(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """Requests are recorded in order with their decoded arguments, reply and write-set
        (the ``get`` because this worker journals reads)."""
        store = client.get(Store, "s1")
        before = time.time()
        await store.call(Store.put, key="a", value={"n": 1})
        await store.call(Store.put_many, entries={"b": [1, 2], "c": None})
        assert await store.call(Store.get, key="b") == [1, 2]
        await store.call(Store.delete, key="a")
        await store.call(Store.delete_all)
        packed = await nc.request(
            rpc_subject("ndo", "Store", "s1", "put"),
            msgspec.msgpack.encode({"key": "m", "value": b"\x01\x02"}),
            headers={Header.CONTENT_TYPE.value: MSGPACK_CONTENT_TYPE},
        )
        assert msgspec.msgpack.decode(packed.data) is None
        await worker.stop()

        records = [step.record for step in await _steps(nc, "Store", "s1")]
        assert [r.method for r in records] == [
            "put",
            "put_many",
            "get",
            "delete",
            "delete_all",
            "put",
        ]
        assert {r.kind for r in records} == {"request"}
        assert {r.status for r in records} == {"ok"}
        first = records[0]
        assert first.args == {"key": "a", "value": {"n": 1}}
        assert first.writes is not None and first.writes.put == {"a": {"n": 1}}
        assert first.fresh and not records[1].fresh
        assert "Idempotency-Key" in first.headers  # ActorClient with retries sends one
        assert records[1].writes is not None and records[1].writes.put == {"b": [1, 2], "c": None}
        assert records[2].reply == [1, 2] and records[2].writes is None
        assert records[3].writes is not None and records[3].writes.delete == ["a"]
        assert records[4].writes is not None and records[4].writes.cleared
        assert records[5].headers == {"Content-Type": MSGPACK_CONTENT_TYPE}
        assert records[5].writes is not None and records[5].writes.put == {"m": "AQI="}
        for record in records:
            assert record.class_name == "Store" and record.object_id == "s1"
            assert record.worker == worker.name
            assert before <= record.time <= time.time()
            assert 0 <= record.duration < 1
        assert worker.metrics.registry.get_sample_value("ndo_journal_records_total") == 6

    async def test_failed_turn_has_error_and_no_writes(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """A handler that raises after writing is recorded with its error and no write-set."""
        faulty = client.get(Faulty, "f1")
        with pytest.raises(HandlerError):
            await faulty.call(Faulty.write_then_raise, value=7)
        await faulty.call(Faulty.write, value=8)
        await worker.stop()
        failed, written = [step.record for step in await _steps(nc, "Faulty", "f1")]
        assert failed.status == "error" and failed.writes is None
        assert failed.error is not None
        assert (failed.error.code, failed.error.type) == (500, "handler_error")
        assert "boom after writing" in failed.error.message
        assert written.status == "ok" and written.fresh  # rebuilt after the failure
        assert written.writes is not None and written.writes.put == {"n": 8}

    async def test_value_json_cannot_express(self, worker: Worker, nc: NatsClient) -> None:
        """A stored MessagePack extension value is journaled as ``{"$msgpack": base64}`` (the
        publisher's unchecked encode fails for it and the checked one takes over), and the
        records around it are unaffected."""
        packed = msgspec.msgpack.encode({"key": "x", "value": msgspec.msgpack.Ext(5, b"\x01\x02")})
        headers = {Header.CONTENT_TYPE.value: MSGPACK_CONTENT_TYPE}
        for body in (msgspec.msgpack.encode({"key": "a", "value": 1}), packed):
            await nc.request(rpc_subject("ndo", "Store", "ext", "put"), body, headers=headers)
        await worker.stop()
        plain, extension = [step.record for step in await _steps(nc, "Store", "ext")]
        assert plain.writes is not None and plain.writes.put == {"a": 1}
        raw = msgspec.msgpack.encode(msgspec.msgpack.Ext(5, b"\x01\x02"))
        expected = {"$msgpack": base64.b64encode(raw).decode("ascii")}
        assert extension.writes is not None and extension.writes.put == {"x": expected}
        assert extension.args == {"key": "x", "value": expected}
        assert _failures(worker, "encode_error") == 0

    async def test_stream_retention_created_and_updated(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """The stream is created with the configured retention and updated at the next start."""
        worker = await start_worker(journal_max_age=3600.0, journal_max_bytes=64 * 1024 * 1024)
        assert worker.journal_stream == "NDO_JOURNAL"
        info = await nc.jetstream().stream_info("NDO_JOURNAL")
        assert info.config.subjects == ["ndo.sys.journal.>"]
        assert (info.config.max_age, info.config.max_bytes) == (3600.0, 64 * 1024 * 1024)
        await worker.stop()
        await start_worker(journal_max_age=7200.0, journal_max_bytes=32 * 1024 * 1024)
        info = await nc.jetstream().stream_info("NDO_JOURNAL")
        assert (info.config.max_age, info.config.max_bytes) == (7200.0, 32 * 1024 * 1024)

    async def test_journal_off(self, start_worker: WorkerFactory, nc: NatsClient) -> None:
        """With journal=False no stream is created and requests work as before."""
        worker = await start_worker(journal=False, prefix="quiet")
        quiet = ActorClient(nc, prefix="quiet", retry=RetryPolicy(attempts=1))
        await quiet.get(Store, "s").call(Store.put, key="k", value=1)
        assert worker.journal_stream is None
        streams = await nc.jetstream().streams_info()
        assert journal_stream_name("quiet") not in {s.config.name for s in streams}


class Announcer(Actor):
    """Emits an event from a method that writes nothing."""

    @method
    async def announce(self, text: str) -> str:
        self.emit("said", {"text": text})
        return text


class TestWhatIsRecorded:
    """By default the journal keeps every turn that changed state or could explain a problem,
    not successful reads; ``journal_reads`` keeps those too."""

    async def test_default_skips_successful_reads(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient
    ) -> None:
        """Writes, failures (of reads too), duplicates and a read that emits an event are
        recorded; reads that succeeded are not."""
        worker = await start_worker(classes=[*ALL_CLASSES, Announcer])
        store = client.get(Store, "r")
        await store.call(Store.put, key="a", value=1)
        assert await store.call(Store.get, key="a") == 1
        assert await store.call(Store.list) == [["a", 1]]
        subject = rpc_subject("ndo", "Store", "r", "put")
        for _ in range(2):  # the second is answered from its idempotency record
            await nc.request(
                subject, b'{"key": "b", "value": 2}', timeout=5, headers={"Idempotency-Key": "k"}
            )
        assert await store.call(Store.get, key="b") == 2
        faulty = client.get(Faulty, "f")
        with pytest.raises(ConflictError):
            await faulty.call(Faulty.conflict)  # writes nothing, fails
        with pytest.raises(HandlerError):
            await faulty.call(Faulty.write_then_raise, value=1)
        assert await faulty.call(Faulty.state) == {"stored": 0, "attribute": 0}
        assert await client.get(Announcer, "a").call(Announcer.announce, text="hi") == "hi"
        await worker.stop()

        store_steps = [(s.record.method, s.record.status) for s in await _steps(nc, "Store", "r")]
        assert store_steps == [("put", "ok"), ("put", "ok"), ("put", "duplicate")]
        faulty_steps = [(s.record.method, s.record.status) for s in await _steps(nc, "Faulty", "f")]
        assert faulty_steps == [("conflict", "error"), ("write_then_raise", "error")]
        [announced] = [s.record for s in await _steps(nc, "Announcer", "a")]
        assert (announced.method, announced.status, announced.reply) == ("announce", "ok", "hi")
        assert announced.writes is None
        assert worker.metrics.registry.get_sample_value("ndo_journal_records_total") == 6

    async def test_reads_recorded_when_asked(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient
    ) -> None:
        """With ``journal_reads`` every successful read is a step too, with its reply."""
        worker = await start_worker(journal_reads=True)
        store = client.get(Store, "r")
        await store.call(Store.put, key="a", value=1)
        assert await store.call(Store.get, key="a") == 1
        assert await store.call(Store.list) == [["a", 1]]
        await worker.stop()
        records = [s.record for s in await _steps(nc, "Store", "r")]
        assert [(r.method, r.status) for r in records] == [
            ("put", "ok"),
            ("get", "ok"),
            ("list", "ok"),
        ]
        assert (records[1].reply, records[1].writes) == (1, None)
        assert records[2].reply == [["a", 1]]
        assert worker.metrics.registry.get_sample_value("ndo_journal_records_total") == 3


class TestReconstruction:
    """Replaying the recorded write-sets rebuilds the object's state at every step."""

    async def test_equals_live_state_at_every_step(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """At each ``list`` step, the reconstructed state equals what the live object listed."""
        store = client.get(Store, "live")
        operations: list[tuple[Any, dict[str, Any]]] = [
            (Store.put, {"key": "a", "value": 1}),
            (Store.put_many, {"entries": {"b": "two", "c": [3], "d": None}}),
            (Store.delete, {"key": "a"}),
            (Store.put, {"key": "b", "value": {"nested": True}}),
            (Store.delete_all, {}),
            (Store.put_many, {"entries": {"x": 1.5, "y": "why"}}),
            (Store.delete, {"key": "missing"}),
            (Store.put, {"key": "x", "value": -2}),
        ]
        listed = []
        for fn, kwargs in operations:
            await store.call(fn, **kwargs)
            listed.append(await store.call(Store.list))
        await worker.stop()
        steps = await _steps(nc, "Store", "live")
        assert len(steps) == 2 * len(operations)
        list_steps = [s for s in steps if s.record.method == "list"]
        assert [s.record.reply for s in list_steps] == listed
        for step in list_steps:
            assert step.state == dict(step.record.reply)
        for done, step in zip(steps[::2], list_steps, strict=True):
            assert done.state == step.state  # the write's own step already shows it

    async def test_at_and_since(self, worker: Worker, client: ActorClient, nats_url: str) -> None:
        """--at stops at a step or time; --since starts at one; state is always complete."""
        counter = client.get(Store, "c")
        for value in range(1, 6):
            await counter.call(Store.put, key="v", value=value)
            await asyncio.sleep(0.02)
        await worker.stop()
        url = nats_url
        code, everything, _ = await _replay_json(url, class_name="Store", object_id="c")
        assert code == EXIT_OK
        assert [line["state"] for line in everything] == [{"v": v} for v in range(1, 6)]
        steps = [line["step"] for line in everything]  # records may share a message: 12.1, 12.2
        positions = [(line["seq"], line["place"]) for line in everything]
        assert positions == sorted(positions) and len(set(positions)) == 5

        at = parse_point(steps[2])
        _, upto, _ = await _replay_json(url, class_name="Store", object_id="c", at=at)
        assert [line["step"] for line in upto] == steps[:3]
        assert upto[-1]["state"] == {"v": 3}

        since = parse_point(steps[3])
        _, tail, _ = await _replay_json(url, class_name="Store", object_id="c", since=since)
        assert [line["state"] for line in tail] == [{"v": 4}, {"v": 5}]

        middle = (everything[1]["timestamp"] + everything[2]["timestamp"]) / 2
        _, at_time, _ = await _replay_json(
            url, class_name="Store", object_id="c", at=("time", middle)
        )
        assert at_time[-1]["state"] == {"v": 2}
        _, since_time, _ = await _replay_json(
            url, class_name="Store", object_id="c", since=("time", middle)
        )
        assert [line["step"] for line in since_time] == steps[2:]

    def test_select_steps_window(self) -> None:
        """The step before the window is returned as the starting state of a re-execution."""
        record = _plain_record()
        steps = [JournalStep(seq, record, {"s": seq}, None, False) for seq in (3, 5, 9)]
        chosen, before = select_steps(steps, since=("seq", 4), at=("seq", 9))
        assert [s.seq for s in chosen] == [5, 9]
        assert before is steps[0]
        assert select_steps(steps, since=("seq", 10)) == ([], None)

    def test_select_steps_by_position(self) -> None:
        """Steps sharing a message: ``N.k`` picks one of them, a bare ``N`` all of them."""
        record = _plain_record()
        where = [(3, 0), (7, 1), (7, 2), (7, 3), (9, 0)]
        steps = [JournalStep(seq, record, {}, None, False, 0, place) for seq, place in where]
        assert [s.position.label for s in steps] == ["3", "7.1", "7.2", "7.3", "9"]

        def labels(chosen: list[JournalStep]) -> list[str]:
            return [s.position.label for s in chosen]

        chosen, _ = select_steps(steps, at=parse_point("7"))
        assert labels(chosen) == ["3", "7.1", "7.2", "7.3"]
        chosen, _ = select_steps(steps, at=parse_point("7.2"))
        assert labels(chosen) == ["3", "7.1", "7.2"]
        chosen, before = select_steps(steps, since=parse_point("7.2"))
        assert labels(chosen) == ["7.2", "7.3", "9"] and before is steps[1]
        chosen, before = select_steps(steps, since=parse_point("7"))
        assert labels(chosen) == ["7.1", "7.2", "7.3", "9"] and before is steps[0]
        chosen, before = select_steps(steps, since=parse_point("7.2"), at=parse_point("7.2"))
        assert labels(chosen) == ["7.2"] and before is steps[1]
        chosen, _ = select_steps(steps, since=parse_point("8"), at=parse_point("8"))
        assert chosen == []


class TestJournalMessages:
    """Many records per message, older one-record messages, and step positions."""

    async def test_many_records_few_messages(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient
    ) -> None:
        """200 concurrent writes to 100 objects: at most 100 messages, each on the shard subject
        of all its records; every object's replay has both its writes."""
        worker = await start_worker()
        ids = [f"o{n}" for n in range(100)]
        await asyncio.gather(
            *(
                client.get(Store, oid).call(Store.put, key=key, value=f"{oid}{key}")
                for oid in ids
                for key in ("a", "b")
            )
        )
        await worker.stop()
        assert worker.metrics.registry.get_sample_value("ndo_journal_records_total") == 200
        messages = await _stream_messages(nc)
        assert len(messages) <= 100
        records = 0
        for _, subject, data in messages:
            lines = decode_journal_message(data)
            records += len(lines)
            shards = {journal_shard(r.class_name, r.object_id) for _, r in lines}
            assert [journal_subject("ndo", shard) for shard in shards] == [subject]
        assert records == 200
        for oid in ids:
            steps = await _steps(nc, "Store", oid)
            assert sorted(s.record.args["key"] for s in steps) == ["a", "b"]
            assert steps[-1].state == {"a": f"{oid}a", "b": f"{oid}b"}
            assert not any(s.missing_before or s.incomplete for s in steps)

    async def test_older_per_object_records(
        self, worker: Worker, client: ActorClient, nc: NatsClient, nats_url: str
    ) -> None:
        """A record an older ndo wrote on the per-object subject replays first, and the state
        goes on from it through the new records."""
        older = JournalRecord(
            kind="request",
            status="ok",
            class_name="Store",
            object_id="old",
            partition=partition_of("Store", "old", 8),
            method="put",
            args={"key": "a", "value": 1},
            writes=JournalWrites(put={"a": 1}),
            time=time.time() - 3600,
            duration=0.001,
            worker="older-ndo",
        )
        ack = await nc.jetstream().publish(
            legacy_journal_subject("ndo", "Store", "old"),
            encode_journal_record(older),
            stream="NDO_JOURNAL",
        )
        store = client.get(Store, "old")
        await store.call(Store.put, key="b", value=2)
        await store.call(Store.put, key="a", value=3)
        await worker.stop()
        code, lines, err = await _replay_json(nats_url, class_name="Store", object_id="old")
        assert code == EXIT_OK, err
        assert (lines[0]["step"], lines[0]["place"]) == (str(ack.seq), 0)
        assert [line["worker"] for line in lines] == ["older-ndo", worker.name, worker.name]
        assert [line["state"] for line in lines] == [{"a": 1}, {"a": 1, "b": 2}, {"a": 3, "b": 2}]
        assert not any(line["missing_before"] or line["incomplete"] for line in lines)
        code, executed, _ = await _replay_json(
            nats_url, class_name="Store", object_id="old", execute=True, classes=[Store]
        )
        assert code == EXIT_OK
        assert all(line["executed"] and not line["diverged"] for line in executed)

    async def test_steps_sharing_a_message(
        self, worker: Worker, client: ActorClient, nats_url: str
    ) -> None:
        """Writes of one object in one message are steps ``N.1``, ``N.2``...; ``--at N.1`` stops
        after the first, ``--at N`` includes them all, ``--since N.2`` starts at the second."""
        store = client.get(Store, "p")
        await asyncio.gather(*(store.call(Store.put, key=f"k{n}", value=n) for n in range(8)))
        await worker.stop()
        code, lines, _ = await _replay_json(nats_url, class_name="Store", object_id="p")
        assert code == EXIT_OK and len(lines) == 8
        assert lines[-1]["state"] == {f"k{n}": n for n in range(8)}
        groups: dict[int, list[dict[str, Any]]] = {}
        for line in lines:
            groups.setdefault(line["seq"], []).append(line)
        assert list(groups) == sorted(groups)
        for seq, group in groups.items():
            if len(group) == 1:
                assert (group[0]["place"], group[0]["step"]) == (0, str(seq))
            else:
                assert [line["place"] for line in group] == list(range(1, len(group) + 1))
                assert [line["step"] for line in group] == [
                    f"{seq}.{n}" for n in range(1, len(group) + 1)
                ]
        shared = [seq for seq, group in groups.items() if len(group) > 1]
        assert shared, "concurrent writes of one object share a journal message"
        seq, size = shared[0], len(groups[shared[0]])
        first = next(n for n, line in enumerate(lines) if line["seq"] == seq)
        everything = [line["step"] for line in lines]

        _, upto, _ = await _replay_json(
            nats_url, class_name="Store", object_id="p", at=parse_point(f"{seq}.1")
        )
        assert [line["step"] for line in upto] == everything[: first + 1]
        assert upto[-1]["step"] == f"{seq}.1" and upto[-1]["state"] == lines[first]["state"]

        _, whole, _ = await _replay_json(
            nats_url, class_name="Store", object_id="p", at=parse_point(str(seq))
        )
        assert [line["step"] for line in whole] == everything[: first + size]
        assert whole[-1]["step"] == f"{seq}.{size}"

        _, since, _ = await _replay_json(
            nats_url, class_name="Store", object_id="p", since=parse_point(f"{seq}.2")
        )
        assert [line["step"] for line in since] == everything[first + 1 :]

        out = io.StringIO()
        options = ReplayOptions(
            class_name="Store", object_id="p", nats_url=nats_url, at=parse_point(f"{seq}.2")
        )
        assert await run_replay(options, out=out) == EXIT_OK
        table = out.getvalue().splitlines()
        assert table[0].split()[0] == "STEP"
        assert [row.split()[0] for row in table[1 : first + 3]] == everything[: first + 2]


class _ChangedStore(Actor):
    """Today's code in the divergence test: Store with two behaviour changes."""

    @method
    async def put(self, key: str, value: object) -> None:
        self.storage.put(key, value)
        if key == "audited":
            self.storage.put("audit", key)  # changed: an extra write

    @method
    async def get(self, key: str) -> object:
        value = await self.storage.get(key)
        return {"wrapped": value} if key == "missing" else value  # changed: another reply

    @method
    async def delete(self, key: str) -> None:
        self.storage.delete(key)


_ChangedStore.__name__ = "Store"


class TestLostRecords:
    """Replay finds state-changing records the journal lost, from each activation's write count."""

    @pytest.mark.parametrize("reads", [True, False], ids=["reads", "default"])
    async def test_no_false_alarm_in_a_mixed_history(
        self,
        start_worker: WorkerFactory,
        client: ActorClient,
        nc: NatsClient,
        nats_url: str,
        reads: bool,
    ) -> None:
        """Writes, reads, errors, duplicates and a reload from storage: nothing is missing
        (whether the reads are in the journal or not)."""
        worker = await start_worker(journal_reads=reads)
        store = client.get(Store, "mixed")
        await store.call(Store.put, key="a", value=1)
        await store.call(Store.get, key="a")
        subject = rpc_subject("ndo", "Store", "mixed", "put")
        for _ in range(2):  # the second is a duplicate: its stored reply, no new write
            await nc.request(
                subject, b'{"key": "b", "value": 2}', timeout=5, headers={"Idempotency-Key": "k1"}
            )
        await nc.request(subject, b'{"key": 3}', timeout=5)  # 400: wrong type, no turn
        assert worker.catalog.evict_all_idle("test") >= 1
        await store.call(Store.put, key="c", value=3)
        await store.call(Store.get, key="c")
        await worker.stop()
        code, lines, err = await _replay_json(nats_url, class_name="Store", object_id="mixed")
        assert code == EXIT_OK, err
        assert [line["missing_before"] for line in lines] == [0] * len(lines)
        assert lines[-1]["state"] == {"a": 1, "b": 2, "c": 3}
        assert not lines[-1]["incomplete"]
        assert "lost" not in err
        assert len({line["activation"] for line in lines}) == 2  # evicted and reloaded once
        methods = ["put", "get", "put", "put", "put", "get"] if reads else ["put"] * 4
        assert [line["method"] for line in lines] == methods
        assert [line["status"] for line in lines if line["method"] == "put"] == [
            "ok",
            "ok",
            "duplicate",
            "ok",
        ]

    async def test_lost_record_is_reported(
        self, worker: Worker, client: ActorClient, nc: NatsClient, nats_url: str
    ) -> None:
        """With one write's record gone from the stream, the next step says so and the state
        from there on is marked incomplete."""
        store = client.get(Store, "gap")
        for key, value in (("a", 1), ("b", 2), ("c", 3)):
            await store.call(Store.put, key=key, value=value)
            # Each record in its own journal message: deleting the second write's message must
            # lose that record only (records of one flush window share a message).
            await asyncio.sleep(_FLUSH_GAP)
        await worker.stop()
        _, lines, _ = await _replay_json(nats_url, class_name="Store", object_id="gap")
        assert [line["place"] for line in lines] == [0, 0, 0]  # alone in its message
        assert len({line["seq"] for line in lines}) == 3
        await nc.jetstream().delete_msg("NDO_JOURNAL", lines[1]["seq"])
        code, lines, _ = await _replay_json(nats_url, class_name="Store", object_id="gap")
        assert code == EXIT_OK
        assert [line["missing_before"] for line in lines] == [0, 1]
        assert lines[1]["state"] == {"a": 1, "c": 3}
        assert lines[1]["incomplete"]
        out = io.StringIO()
        await run_replay(
            ReplayOptions(class_name="Store", object_id="gap", nats_url=nats_url), out=out
        )
        assert "!! 1 state-changing record(s) lost by the journal" in out.getvalue()
        assert "1 state-changing record(s) lost by the journal: state incomplete" in out.getvalue()

    async def test_divergence_after_a_gap_is_attributed(
        self, worker: Worker, client: ActorClient, nc: NatsClient, nats_url: str
    ) -> None:
        """--execute: a step that diverges because a lost write is missing is reported as
        possibly caused by the gap (the exit code still says it diverged)."""
        store = client.get(Store, "gap-exec")
        await store.call(Store.put, key="b", value=2)
        # The first write's record alone in its journal message: deleting that message must
        # lose it only (records of one flush window share a message).
        await asyncio.sleep(_FLUSH_GAP)
        await store.call(Store.put, key="c", value=3)
        assert await store.call(Store.get, key="b") == 2
        await worker.stop()
        _, lines, _ = await _replay_json(nats_url, class_name="Store", object_id="gap-exec")
        assert lines[0]["place"] == 0 and lines[1]["seq"] != lines[0]["seq"]
        await nc.jetstream().delete_msg("NDO_JOURNAL", lines[0]["seq"])
        out, err = io.StringIO(), io.StringIO()
        options = ReplayOptions(
            class_name="Store", object_id="gap-exec", nats_url=nats_url, execute=True
        )
        code = await run_replay(options, classes=[Store], out=out, err=err)
        assert code == EXIT_DIVERGED
        assert "1 diverged (1 of them after records the journal lost" in out.getvalue()


class TestExecute:
    """--execute re-runs recorded inputs on today's code and reports where it diverges."""

    async def _history(self, worker: Worker, client: ActorClient) -> None:
        store = client.get(Store, "x")
        await store.call(Store.put, key="a", value=1)
        await store.call(Store.put, key="audited", value=2)
        await store.call(Store.get, key="a")
        await store.call(Store.get, key="missing")
        await store.call(Store.delete, key="a")
        await store.call(Store.put, key="a", value=3)
        await worker.stop()

    async def test_unchanged_code_does_not_diverge(
        self,
        worker: Worker,
        client: ActorClient,
        nats_url: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Through the CLI: the same code reproduces every reply and write-set (exit 0)."""
        await self._history(worker, client)
        capsys.readouterr()  # the worker's logs
        argv = [
            "replay",
            "Store",
            "x",
            "--nats-url",
            nats_url,
            "--execute",
            "--app",
            "tests.objects",
        ]
        assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == EXIT_OK
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(lines) == 6
        assert all(line["executed"] and not line["diverged"] for line in lines)
        assert lines[-1]["state"] == {"audited": 2, "a": 3}
        assert await asyncio.to_thread(cli.main, argv) == EXIT_OK
        table = capsys.readouterr().out
        assert table.splitlines()[0].split()[:3] == ["STEP", "CHECK", "TIME"]
        labels = [row.split()[0] for row in table.splitlines()[1:7]]
        assert labels == [line["step"] for line in lines]
        assert "6 of 6 recorded steps of Store/x; no divergence" in table

    async def test_changed_code_reports_exactly_the_differing_steps(
        self, worker: Worker, client: ActorClient, nats_url: str
    ) -> None:
        """Only the step whose writes changed and the step whose reply changed diverge."""
        await self._history(worker, client)
        code, lines, summary = await _replay_json(
            nats_url, class_name="Store", object_id="x", execute=True, classes=[_ChangedStore]
        )
        assert code == EXIT_DIVERGED
        assert "2 diverged" in summary
        diverged = {line["args"]["key"]: line["differences"] for line in lines if line["diverged"]}
        assert set(diverged) == {"audited", "missing"}
        [writes] = diverged["audited"]
        assert writes["field"] == "writes"
        assert writes["recorded"]["put"] == {"audited": 2}
        assert writes["replayed"]["put"] == {"audited": 2, "audit": "audited"}
        assert diverged["missing"] == [
            {"field": "reply", "recorded": None, "replayed": {"wrapped": None}}
        ]

        per_step = await _replay_json(
            nats_url,
            class_name="Store",
            object_id="x",
            execute=True,
            per_step=True,
            classes=[_ChangedStore],
        )
        assert [line["diverged"] for line in per_step[1]] == [line["diverged"] for line in lines]

    async def test_failure_that_now_succeeds_diverges(
        self, worker: Worker, client: ActorClient, nats_url: str
    ) -> None:
        """A recorded error that today's code turns into a success is an ``outcome`` change."""
        with pytest.raises(HandlerError):
            await client.get(Faulty, "f").call(Faulty.write_then_raise, value=1)
        await worker.stop()

        class Fixed(Actor):
            @method
            async def write_then_raise(self, value: int) -> None:
                self.storage.put("n", value)

        Fixed.__name__ = "Faulty"
        code, [line], _ = await _replay_json(
            nats_url, class_name="Faulty", object_id="f", execute=True, classes=[Fixed]
        )
        assert code == EXIT_DIVERGED
        [difference] = line["differences"]
        assert difference["field"] == "outcome"
        assert difference["recorded"]["error"]["type"] == "handler_error"
        assert difference["replayed"]["writes"]["put"] == {"n": 1}

    async def test_since_starts_from_the_reconstructed_state(
        self, worker: Worker, client: ActorClient, nats_url: str
    ) -> None:
        """Re-execution from the middle runs on the state rebuilt from the steps before it."""
        counter = client.get(Counter, "n")
        for _ in range(5):
            await counter.call(Counter.increment, by=2)
        await worker.stop()
        _, lines, _ = await _replay_json(nats_url, class_name="Counter", object_id="n")
        code, tail, _ = await _replay_json(
            nats_url,
            class_name="Counter",
            object_id="n",
            since=parse_point(lines[3]["step"]),
            execute=True,
            classes=[Counter],
        )
        assert code == EXIT_OK
        assert [line["replayed"]["reply"] for line in tail] == [8, 10]

    async def test_duplicates_are_recorded_and_skipped(
        self, worker: Worker, nc: NatsClient, nats_url: str
    ) -> None:
        """A retried request answered from its idempotency record is a ``duplicate`` step."""
        subject = rpc_subject("ndo", "Counter", "dup", "increment")
        headers = {Header.IDEMPOTENCY_KEY.value: "once"}
        first = await nc.request(subject, b'{"by": 5}', headers=headers)
        again = await nc.request(subject, b'{"by": 5}', headers=headers)
        assert json.loads(first.data) == json.loads(again.data) == 5
        await worker.stop()
        code, lines, _ = await _replay_json(
            nats_url, class_name="Counter", object_id="dup", execute=True, classes=[Counter]
        )
        assert code == EXIT_OK
        assert [(line["status"], line["reply"]) for line in lines] == [("ok", 5), ("duplicate", 5)]
        assert lines[1]["headers"] == {"Idempotency-Key": "once"}
        assert [line["executed"] for line in lines] == [True, False]
        assert lines[1]["state"] == {"value": 5}

    async def test_record_over_max_payload_is_truncated(
        self, worker: Worker, client: ActorClient, nats_url: str
    ) -> None:
        """A record too large for one message loses its values; replay says state is partial."""
        big = {f"k{i}": "x" * 120_000 for i in range(5)}
        await client.get(Store, "big").call(Store.put_many, entries=big)
        await client.get(Store, "big").call(Store.put, key="small", value=1)
        await worker.stop()
        code, lines, summary = await _replay_json(nats_url, class_name="Store", object_id="big")
        assert code == EXIT_OK
        assert lines[0]["args"] == {} and lines[0]["writes"]["put"] == {}
        assert lines[0]["incomplete"] and lines[1]["state"] == {"small": 1}
        assert "state incomplete" in summary
        code, lines, _ = await _replay_json(
            nats_url, class_name="Store", object_id="big", execute=True, classes=[Store]
        )
        assert code == EXIT_OK
        assert [line["replayed"]["status"] for line in lines] == ["applied", "ok"]

    async def test_never_touches_the_live_data_dir(
        self,
        worker: Worker,
        client: ActorClient,
        nats_url: str,
        data_dir: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Re-execution writes nothing to the worker's data directory nor the current one."""
        await self._history(worker, client)

        def snapshot() -> dict[str, tuple[int, int]]:
            found = {}
            for root, _, files in os.walk(data_dir):
                for name in files:
                    stat = os.stat(os.path.join(root, name))
                    found[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
            return found

        before = snapshot()
        assert before  # the worker did write there
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        code, _, _ = await _replay_json(
            nats_url, class_name="Store", object_id="x", execute=True, classes=[Store]
        )
        assert code == EXIT_OK
        assert snapshot() == before
        assert list(cwd.iterdir()) == []


class TestAlarmJournal:
    """Alarm deliveries are journaled like requests, and replay through alarm()."""

    async def test_alarm_attempts_recorded_and_replayed(
        self, start_worker: WorkerFactory, client: ActorClient, nats_url: str
    ) -> None:
        """A failed then successful delivery: two alarm steps with attempts, alarm cleared."""
        worker = await start_worker(alarm_initial_backoff=0.05)
        reminder = client.get(Reminder, "r")
        at = time.time() + 0.05
        await reminder.call(Reminder.schedule, at=at, fail_times=1)
        await _wait_for(lambda: reminder.call(Reminder.fired))
        await worker.stop()
        code, lines, _ = await _replay_json(
            nats_url, class_name="Reminder", object_id="r", execute=True, classes=[Reminder]
        )
        assert code == EXIT_OK
        assert not any(line["diverged"] for line in lines)
        lines = [line for line in lines if line["method"] != "fired"]  # the polls
        assert [(line["kind"], line["status"]) for line in lines] == [
            ("request", "ok"),
            ("alarm", "error"),
            ("alarm", "ok"),
        ]
        assert [line["alarm"]["attempt"] for line in lines[1:3]] == [1, 2]
        assert lines[0]["state_alarm"] == at and lines[1]["state_alarm"] == at
        assert lines[2]["state_alarm"] is None
        assert lines[2]["state"]["fired"] == [[at, 2]]

    async def test_dropped_alarm_recorded(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient, nats_url: str
    ) -> None:
        """An alarm given up after its attempts is followed by an alarm_dropped step."""
        worker = await start_worker(alarm_initial_backoff=0.05, alarm_max_attempts=2)
        reminder = client.get(Reminder, "gone")
        await reminder.call(Reminder.schedule, at=time.time() + 0.05, fail_times=9)

        async def dropped() -> bool:
            return await reminder.call(Reminder.alarm_time) is None

        await _wait_for(dropped)
        await worker.stop()
        steps = [s for s in await _steps(nc, "Reminder", "gone") if s.record.method != "alarm_time"]
        kinds = [(s.record.kind, s.record.status) for s in steps]
        assert kinds == [
            ("request", "ok"),
            ("alarm", "error"),
            ("alarm", "error"),
            ("alarm_dropped", "ok"),
        ]
        assert steps[0].alarm is not None and steps[3].alarm is None
        code, lines, _ = await _replay_json(
            nats_url, class_name="Reminder", object_id="gone", execute=True, classes=[Reminder]
        )
        assert code == EXIT_OK
        dropped_line = next(line for line in lines if line["kind"] == "alarm_dropped")
        assert dropped_line["replayed"]["status"] == "applied"
        assert dropped_line["replayed"]["writes"]["alarm"] is None


class TestStopJournal:
    """on_stop turns are journaled as ``stop`` steps; replay applies and re-runs them."""

    async def test_stop_steps_recorded_reconstructed_and_replayed(
        self, start_worker: WorkerFactory, client: ActorClient, nc: NatsClient, nats_url: str
    ) -> None:
        """An on_stop that wrote is a ``stop`` step (method ``on_stop``) with its writes, and
        one that failed a ``stop`` error step; the rebuilt state includes the writes, and
        --execute re-runs both on_stop hooks without divergence (the reads that built the
        in-memory count are in the journal: ``journal_reads``)."""
        worker = await start_worker(
            classes=[Flusher], journal_reads=True, idle_timeout=0.2, scan_interval=0.05
        )
        await client.get(Flusher, "j").call(Flusher.add, by=2)
        await client.get(Flusher, "j").call(Flusher.add, by=3)
        await client.get(Flusher, "bad").call(Flusher.add, by=4)
        await client.get(Flusher, "bad").call(Flusher.stop_badly)
        await eventually(lambda: len(worker.catalog) == 0, timeout=10)
        await worker.stop()
        steps = await _steps(nc, "Flusher", "j")
        assert [(s.record.kind, s.record.method, s.record.status) for s in steps] == [
            ("request", "add", "ok"),
            ("request", "add", "ok"),
            ("stop", "on_stop", "ok"),
        ]
        stop = steps[-1]
        assert stop.record.writes is not None
        assert stop.record.writes.put == {"total": 5, "stops": 1}
        assert stop.state == {"total": 5, "stops": 1}
        assert stop.record.write_count == 1 and stop.missing_before == 0
        failed = (await _steps(nc, "Flusher", "bad"))[-1].record
        assert (failed.kind, failed.status, failed.writes) == ("stop", "error", None)
        assert failed.error is not None and failed.error.type == "handler_error"
        for object_id in ("j", "bad"):
            code, lines, err = await _replay_json(
                nats_url, class_name="Flusher", object_id=object_id, execute=True, classes=[Flusher]
            )
            assert code == EXIT_OK, err
            assert lines[-1]["kind"] == "stop" and lines[-1]["executed"]
            assert not any(line["diverged"] for line in lines)
        assert lines[-1]["replayed"]["error"]["type"] == "handler_error"


class TestJournalFailures:
    """A journal that cannot record never fails or slows requests."""

    async def test_server_without_jetstream(self, make_nats_server: Any, tmp_path: Path) -> None:
        """A clear warning at start, no journal, requests served normally."""
        server = await make_nats_server(jetstream=False)
        from ndo.service import WorkerConfig

        config = WorkerConfig(nats_url=server.url, data_dir=tmp_path / "nojs", partitions=8)
        with capture_logs() as logs:
            worker = Worker(config, [Store])
            await worker.start()
        try:
            assert worker.journal_stream is None
            warnings = [e for e in logs if e["log_level"] == "warning"]
            assert any("JetStream is not enabled" in e["event"] for e in warnings)
            nc = await nats.connect(server.url)
            try:
                store = ActorClient(nc, retry=RetryPolicy(attempts=1)).get(Store, "s")
                started = time.perf_counter()
                for value in range(20):
                    await store.call(Store.put, key="k", value=value)
                assert await store.call(Store.get, key="k") == 19
                assert time.perf_counter() - started < 2.0
            finally:
                await nc.close()
        finally:
            await worker.stop()

    async def test_stream_deleted_while_running(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """Records that no stream takes are counted as failures; requests are unaffected."""
        await nc.jetstream().delete_stream("NDO_JOURNAL")
        store = client.get(Store, "s")
        for value in range(20):
            started = time.perf_counter()
            await store.call(Store.put, key="k", value=value)
            assert time.perf_counter() - started < 0.5
        assert await store.call(Store.get, key="k") == 19

        async def counted() -> bool:
            return _failures(worker, "no_stream") >= 21

        await _wait_for(counted)


def _entry(
    class_name: str, object_id: str, value: object = 1, *, partitions: int = 64, writes: bool = True
) -> JournalEntry:
    """A finished request of ``class_name/object_id`` that wrote ``n = value`` (or nothing)."""
    changes = (
        TurnWrites({"n": msgspec.msgpack.encode(value)}, False, ALARM_UNCHANGED) if writes else None
    )
    return JournalEntry(
        ActorId(class_name, object_id),
        partition_of(class_name, object_id, partitions),
        Envelope(None, None, ""),
        status="ok",
        changes=changes,
    )


def _publisher(
    nc: NatsClient, metrics: WorkerMetrics, *, partitions: int = 64, **options: Any
) -> JournalPublisher:
    return JournalPublisher(
        nc,
        prefix="ndo",
        worker="w",
        metrics=metrics,
        max_age=60.0,
        max_bytes=8 * 1024 * 1024,
        partitions=partitions,
        **options,
    )


def _written(record: JournalRecord) -> object:
    assert record.writes is not None
    return record.writes.put["n"]


class TestPublisher:
    """The publisher: one message per journal shard and flush, each acknowledged on its own, every
    record counted as stored or lost; a full buffer drops, reads give way to writes."""

    @pytest.mark.parametrize("partitions", [64, 8], ids=["shard-from-partition", "hashed"])
    async def test_one_message_per_shard(
        self, nats_server: Any, nc: NatsClient, partitions: int
    ) -> None:
        """600 records of two objects in two shards, buffered at once: two messages on the two
        shard subjects, each holding its objects' records in order; all counted."""
        a = "a"
        b = _other_shard_id("C", a)
        metrics = WorkerMetrics()
        publisher = _publisher(nc, metrics, partitions=partitions)
        assert await publisher.start()
        for value in range(600):  # no await: one flush
            publisher.record(_entry("C", a if value % 3 else b, value, partitions=partitions))
        await publisher.stop()
        assert publisher.pending == 0
        assert metrics.registry.get_sample_value("ndo_journal_records_total") == 600
        messages = await _stream_messages(nc)
        assert sorted(subject for _, subject, _ in messages) == sorted(
            [
                journal_subject("ndo", journal_shard("C", a)),
                journal_subject("ndo", journal_shard("C", b)),
            ]
        )
        for _, subject, data in messages:
            lines = decode_journal_message(data)
            object_id = a if subject == journal_subject("ndo", journal_shard("C", a)) else b
            expected = [v for v in range(600) if (v % 3 != 0) == (object_id == a)]
            assert [number for number, _ in lines] == list(range(len(expected)))
            assert [_written(record) for _, record in lines] == expected
            assert {(r.class_name, r.object_id, r.worker) for _, r in lines} == {
                ("C", object_id, "w")
            }
        read = await read_journal(nc, "ndo", "C", b)
        [seq] = {position.seq for position, _ in read}
        assert [position for position, _ in read] == [StepPosition(seq, i) for i in range(1, 201)]
        assert [_written(record) for _, record in read] == list(range(0, 600, 3))

    async def test_lost_messages_count_every_record(self, nats_server: Any, nc: NatsClient) -> None:
        """With the stream gone, each message's failed acknowledgement counts all its records."""
        b = _other_shard_id("C", "a")
        metrics = WorkerMetrics()
        publisher = _publisher(nc, metrics)
        assert await publisher.start()
        await nc.jetstream().delete_stream("NDO_JOURNAL")
        for value in range(40):  # no await: one flush, two messages
            publisher.record(_entry("C", "a" if value % 2 else b, value))
        await publisher.stop()
        assert publisher.pending == 0
        assert metrics.registry.get_sample_value("ndo_journal_records_total") == 0
        failures = metrics.registry.get_sample_value(
            "ndo_journal_failures_total", {"reason": "no_stream"}
        )
        assert failures == 40

    async def test_unacknowledged_messages_count_every_record(
        self, nats_server: Any, nats_url: str, nc: NatsClient
    ) -> None:
        """Messages nobody acknowledges (no stream, a plain subscriber takes them): every
        record of each counts as a ``timeout`` failure."""
        b = _other_shard_id("C", "a")
        metrics = WorkerMetrics()
        publisher = _publisher(nc, metrics, ack_timeout=0.2)
        assert await publisher.start()
        await nc.jetstream().delete_stream("NDO_JOURNAL")
        swallowed: list[tuple[str, bytes]] = []
        sink = await nats.connect(nats_url)
        try:

            async def swallow(msg: Any) -> None:
                swallowed.append((msg.subject, msg.data))

            await sink.subscribe(journal_wildcard("ndo"), cb=swallow)
            await sink.flush()
            for value in range(10):  # no await: one flush, two messages
                publisher.record(_entry("C", "a" if value % 2 else b, value))

            async def both_arrived() -> bool:
                return len(swallowed) == 2

            await _wait_for(both_arrived)
            await publisher.stop(timeout=1.0)
        finally:
            await sink.close()
        assert publisher.pending == 0
        assert metrics.registry.get_sample_value("ndo_journal_records_total") == 0
        failures = metrics.registry.get_sample_value(
            "ndo_journal_failures_total", {"reason": "timeout"}
        )
        assert failures == 10
        values = sorted(
            _written(r) for _, data in swallowed for _, r in decode_journal_message(data)
        )
        assert values == list(range(10))

    async def test_split_at_the_message_size_limit(
        self, make_nats_server: NatsServerFactory
    ) -> None:
        """Lines that do not fit one message (the server's max_payload) go out in several, in
        order; a record larger than a message is journaled truncated."""
        max_payload = 16 * 1024
        server = await make_nats_server(max_payload=max_payload)
        nc = await nats.connect(server.url)
        try:
            metrics = WorkerMetrics()
            publisher = _publisher(nc, metrics)
            assert await publisher.start()
            values = [f"{i}:" + "x" * 2000 for i in range(30)]
            for value in values:  # no await: one flush of about 65 KB
                publisher.record(_entry("C", "big", value))
            publisher.record(_entry("C", "big", "y" * 20_000))  # over the limit alone
            await publisher.stop()
            assert metrics.registry.get_sample_value("ndo_journal_records_total") == 31
            messages = await _stream_messages(nc)
            assert len(messages) >= 5
            assert all(len(data) <= max_payload - 1024 for _, _, data in messages)
            assert {subject for _, subject, _ in messages} == {
                journal_subject("ndo", journal_shard("C", "big"))
            }
            records = [r for _, _, data in messages for _, r in decode_journal_message(data)]
            assert [_written(r) for r in records[:30]] == values
            assert not any(r.truncated for r in records[:30])
            assert records[30].truncated and records[30].writes == JournalWrites()
            read = await read_journal(nc, "ndo", "C", "big")
            assert [record for _, record in read] == records
            positions = [position for position, _ in read]
            assert positions == sorted(positions)
            for _, group in itertools.groupby(positions, key=lambda p: p.seq):
                places = [p.place for p in group]
                assert places == ([0] if len(places) == 1 else list(range(1, len(places) + 1)))
        finally:
            await nc.close()

    async def test_full_buffer_drops_and_counts(self, nats_server: Any, nc: NatsClient) -> None:
        """Entries beyond max_pending are dropped and counted; ``record`` never blocks."""
        metrics = WorkerMetrics()
        publisher = _publisher(nc, metrics, max_pending=10)
        assert await publisher.start()
        for value in range(25):  # no await: the sender cannot run in between
            publisher.record(_entry("C", "i", value))
        assert (
            metrics.registry.get_sample_value("ndo_journal_failures_total", {"reason": "dropped"})
            == 15
        )
        await publisher.stop()
        assert metrics.registry.get_sample_value("ndo_journal_records_total") == 10
        [(_, _, data)] = await _stream_messages(nc)
        assert [_written(r) for _, r in decode_journal_message(data)] == list(range(10))

    async def test_buffer_is_bounded_in_bytes(self, nats_server: Any, nc: NatsClient) -> None:
        """A few large turns cannot hold ``max_pending`` records' worth of memory: past
        ``max_pending_bytes`` of buffered replies and values, new records are dropped."""
        metrics = WorkerMetrics()
        publisher = _publisher(nc, metrics, max_pending=1_000, max_pending_bytes=100_000)
        assert await publisher.start()
        big = "x" * 30_000
        for _ in range(5):  # no await: nothing is published in between
            publisher.record(_entry("C", "big", big))
        assert (
            metrics.registry.get_sample_value("ndo_journal_failures_total", {"reason": "dropped"})
            == 2
        )
        publisher.record(_entry("C", "small", 1))  # small records still fit
        await publisher.stop()
        assert metrics.registry.get_sample_value("ndo_journal_records_total") == 4

    async def test_reads_give_way_to_writes(self, nats_server: Any, nc: NatsClient) -> None:
        """Past half full, records that changed nothing are shed; writes keep the other half."""
        metrics = WorkerMetrics()
        publisher = _publisher(nc, metrics, max_pending=10)
        assert await publisher.start()
        for _ in range(8):
            publisher.record(_entry("C", "i", writes=False))
        for _ in range(8):
            publisher.record(_entry("C", "i"))

        def failures(reason: str) -> float | None:
            return metrics.registry.get_sample_value(
                "ndo_journal_failures_total", {"reason": reason}
            )

        assert (failures("shed"), failures("dropped")) == (3, 3)  # 5 reads + 5 writes kept
        await publisher.stop()
        assert metrics.registry.get_sample_value("ndo_journal_records_total") == 10
        [(_, _, data)] = await _stream_messages(nc)
        kept = [r.writes is not None for _, r in decode_journal_message(data)]
        assert kept == [False] * 5 + [True] * 5


class TestTail:
    """``ndo tail`` follows records as they are written, with wildcards."""

    async def test_follows_with_wildcard(
        self, worker: Worker, client: ActorClient, nats_url: str
    ) -> None:
        """Records of every matching object appear, each object's in order, one JSON object
        each (objects of different journal shards go out in different messages)."""
        out = io.StringIO()
        ready = asyncio.Event()
        task = asyncio.create_task(
            run_tail(
                TailOptions(class_name="Store", nats_url=nats_url, count=3, as_json=True),
                out=out,
                ready=ready,
            )
        )
        await asyncio.wait_for(ready.wait(), 5)
        await client.get(Faulty, "ignored").call(Faulty.write, value=1)
        await client.get(Store, "one").call(Store.put, key="k", value=1)
        await client.get(Store, "two").call(Store.put, key="k", value=2)
        await client.get(Store, "one").call(Store.get, key="k")
        assert await asyncio.wait_for(task, 10) == EXIT_OK
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert sorted((line["id"], line["method"]) for line in lines) == [
            ("one", "get"),
            ("one", "put"),
            ("two", "put"),
        ]
        one = [line for line in lines if line["id"] == "one"]
        assert [line["method"] for line in one] == ["put", "get"]
        assert one[1]["reply"] == 1
        assert [line["seq"] for line in lines] == sorted(line["seq"] for line in lines)
        assert (one[0]["seq"], one[0]["place"]) < (one[1]["seq"], one[1]["place"])
        for line in lines:
            assert line["step"] == StepPosition(line["seq"], line["place"]).label

    async def test_one_object_skips_its_shard_neighbours(
        self, worker: Worker, client: ActorClient, nc: NatsClient, nats_url: str
    ) -> None:
        """Following one object prints its records only, with its own positions, though an object
        of the same journal shard writes in the same messages."""
        neighbour = _same_shard_id("Store", "x")
        out = io.StringIO()
        ready = asyncio.Event()
        options = TailOptions(
            class_name="Store", object_id="x", nats_url=nats_url, count=4, as_json=True
        )
        task = asyncio.create_task(run_tail(options, out=out, ready=ready))
        await asyncio.wait_for(ready.wait(), 5)
        x, other = client.get(Store, "x"), client.get(Store, neighbour)
        for n in range(4):  # concurrent: the neighbour's records share x's flush windows
            await asyncio.gather(
                other.call(Store.put, key=f"n{n}", value=n),
                x.call(Store.put, key=f"k{n}", value=n),
                other.call(Store.get, key="n0"),
            )
        assert await asyncio.wait_for(task, 10) == EXIT_OK
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [(line["id"], line["args"]) for line in lines] == [
            ("x", {"key": f"k{n}", "value": n}) for n in range(4)
        ]
        shared = 0
        for seq in dict.fromkeys(line["seq"] for line in lines):
            printed = [line for line in lines if line["seq"] == seq]
            message = await nc.jetstream().get_msg("NDO_JOURNAL", seq)
            assert message.subject == journal_subject("ndo", journal_shard("Store", "x"))
            assert message.data is not None
            records = [record for _, record in decode_journal_message(message.data)]
            mine = [r for r in records if r.object_id == "x"]
            assert [r.args for r in mine] == [line["args"] for line in printed]
            places = [0] if len(mine) == 1 else list(range(1, len(mine) + 1))
            assert [line["place"] for line in printed] == places
            shared += any(r.object_id == neighbour for r in records)
        assert shared, "the neighbour's records were in x's messages"

    @pytest.mark.parametrize("since", ["0", "1"])
    async def test_since_the_beginning(
        self, worker: Worker, client: ActorClient, nats_url: str, since: str
    ) -> None:
        """``--since 0`` (or 1) starts at the first record (JetStream itself refuses 0)."""
        for value in (1, 2):
            await client.get(Store, "old").call(Store.put, key="k", value=value)
        out = io.StringIO()
        options = TailOptions(
            class_name="Store",
            nats_url=nats_url,
            count=2,
            as_json=True,
            since=parse_point(since),
        )
        assert await asyncio.wait_for(run_tail(options, out=out), 10) == EXIT_OK
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["args"] for line in lines] == [
            {"key": "k", "value": 1},
            {"key": "k", "value": 2},
        ]


class TestCommandLine:
    """Parsing of points, durations and sizes, and the commands' error exits."""

    def test_parse_point(self) -> None:
        """Integers and ``N.k`` are steps; ISO times, times of day and ages are times."""
        assert parse_point("42") == ("seq", 42)
        assert parse_point("2024-05-01T14:02:00Z") == ("time", 1714572120.0)
        assert parse_point("10m", now=1000.0) == ("time", 400.0)
        kind, _ = parse_point("14:02")
        assert kind == "time"
        with pytest.raises(ValueError, match=r"as a step \(1234, 1234\.2\)"):
            parse_point("yesterday-ish")

    def test_step_positions(self) -> None:
        """``N.k`` is the k-th step of the object in message N: between N and N+1, in order, and
        read back exactly as the position replay gives the step."""
        assert parse_point("12.3") == ("seq", StepPosition(12, 3).value)
        assert parse_point(StepPosition(12, 3).label) == parse_point("12.3")
        assert (StepPosition(12, 3).label, StepPosition(12).label) == ("12.3", "12")
        assert parse_point("12") == ("seq", StepPosition(12).value) == ("seq", 12)
        values = [StepPosition(*where).value for where in ((12, 0), (12, 1), (12, 9), (12, 10))]
        assert values == sorted(values) and len(set(values)) == 4
        assert values[-1] < StepPosition(13).value
        assert parse_point("7.12")[1] > parse_point("7.2")[1]  # places, not decimals

    def test_parse_duration_and_size(self) -> None:
        """Units as operators write them."""
        assert parse_duration("90") == 90 and parse_duration("7d") == 7 * 86400
        assert parse_duration("500ms") == 0.5
        assert parse_size("512M") == 512 * 1024**2 and parse_size("1GiB") == 1024**3
        assert parse_size("2048") == 2048
        with pytest.raises(ValueError, match="size"):
            parse_size("lots")

    def test_serve_journal_flags(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """serve takes --no-journal, --journal-reads (NDO_JOURNAL_READS) and retention flags."""
        monkeypatch.delenv("NDO_JOURNAL_READS", raising=False)
        args = cli.build_parser().parse_args(
            ["serve", "--no-journal", "--journal-max-age", "12h", "--journal-max-bytes", "10G"]
        )
        assert (args.journal, args.journal_max_age, args.journal_max_bytes) == (
            False,
            12 * 3600,
            10 * 1024**3,
        )
        defaults = cli.build_parser().parse_args(["serve"])
        assert defaults.journal and defaults.journal_max_age == 7 * 86400
        assert not defaults.journal_reads
        assert cli.build_parser().parse_args(["serve", "--journal-reads"]).journal_reads
        monkeypatch.setenv("NDO_JOURNAL_READS", "1")
        assert cli.build_parser().parse_args(["serve"]).journal_reads

    async def test_replay_without_stream_is_an_error(
        self, nats_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No journal stream on the server: exit 1 with what to check."""
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["replay", "Store", "x", "--nats-url", nats_url])
        assert code == EXIT_ERROR
        assert "no journal stream NDO_JOURNAL" in capsys.readouterr().err
