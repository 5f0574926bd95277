"""The test kit (``ndo.testing.ObjectHarness``): objects run in-process on the worker's rules.

What a harness answers is checked against a real worker (the same calls through both give the
same replies and errors), then each harness feature on its own: write-sets and the output
gate, idempotency, seeding and reading storage, alarms on the fake clock, events, calls between
objects, SQLite files and the lifecycle.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import ndo.ops._kit
from ndo import (
    Actor,
    ActorClient,
    ActorError,
    AlarmInfo,
    Caller,
    ConflictError,
    DeadlineExceededError,
    HandlerError,
    NotFoundError,
    method,
)
from ndo.examples import ChatRoom, Counter, Session
from ndo.service import WorkerConfig
from ndo.storage import InMemoryStorage
from ndo.subjects import MSGPACK_CONTENT_TYPE, Header, rpc_subject
from ndo.testing import AlarmRun, FakeClock, ObjectHarness
from tests.objects import Faulty, Flusher, Relay, Reminder, Slow
from tests.worker_fixtures import ALL_CLASSES


class OwnConflict(ConflictError):
    """A handler's own error class (a caller over the wire sees only its code)."""


class Ticker(Actor):
    """Counts its alarms and re-arms ``every`` seconds later until it has ``times`` ticks."""

    @method
    async def start(self, every: float, times: int) -> None:
        self.storage.put_many({"every": every, "times": times})
        await self.storage.set_alarm(self.now() + every)

    @method
    async def ticks(self) -> list[float]:
        ticks: list[float] = await self.storage.get("ticks", [])
        return ticks

    @method
    async def whoami(self) -> list[str] | None:
        caller = self.caller
        return None if caller is None else [caller.account, caller.user, caller.name]

    @method
    async def refuse(self) -> None:
        raise OwnConflict("not now", type="not_now")

    async def alarm(self, info: AlarmInfo) -> None:
        ticks = await self.storage.get("ticks", [])
        ticks.append(self.now())
        self.storage.put("ticks", ticks)
        if len(ticks) < await self.storage.get("times", 0):
            await self.storage.set_alarm(self.now() + await self.storage.get("every", 1.0))


CLASSES: list[type[Actor]] = [*ALL_CLASSES, Ticker, Session, Flusher]
START = 1_700_000_000.0
"""The fake clock's start (epoch seconds)."""


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture(name="harness")
async def _harness(clock: FakeClock) -> AsyncIterator[ObjectHarness]:
    """A harness of every test class on in-memory storage, on ``clock``."""
    async with ObjectHarness(CLASSES, clock=clock) as harness:
        yield harness


def _subject(class_name: str, object_id: str, method_name: str) -> str:
    return rpc_subject("ndo", class_name, object_id, method_name)


async def _outcome(send: Any, subject: str, body: bytes) -> tuple[Any, ...]:
    """What a request got: ``("ok", reply)`` or the error's class, code, type and message."""
    try:
        return ("ok", msgspec.json.decode(await send(subject, body)))
    except ActorError as error:
        message = "" if error.type == "unknown_class" else error.message
        return (type(error).__name__, error.code, error.type, message)


PARITY_CALLS = [
    (_subject("Counter", "p1", "increment"), b'{"by": 2}'),
    (_subject("Counter", "p1", "increment"), b"{}"),
    (_subject("Counter", "p1", "incremnt"), b""),
    (_subject("Counter", "p1", "increment"), b'{"by": "two"}'),
    (_subject("Counter", "p1", "increment"), b"{not json"),
    (_subject("Counter", "p1", "increment"), b'{"by": 1, "extra": 1}'),
    ("ndo.rpc.Counter.bad$id.get", b""),
    (_subject("Nope", "p1", "get"), b""),
    (_subject("Faulty", "p1", "write_then_raise"), b'{"value": 3}'),
    (_subject("Faulty", "p1", "state"), b""),
    (_subject("Faulty", "p1", "conflict"), b""),
    (_subject("Faulty", "p1", "unencodable"), b""),
    (_subject("Faulty", "p1", "store_unencodable"), b""),
    (_subject("Faulty", "p1", "big_value"), b'{"size": 200000}'),
    (_subject("Relay", "r1", "forward"), b'{"to": "p1", "by": 5}'),
    (_subject("Relay", "r1", "call_self"), b""),
    (_subject("Relay", "r1", "chain"), b'{"path": ["r2", "r1"]}'),
    (_subject("Relay", "r1", "chain"), b'{"path": ["r2", "r3"]}'),
    (_subject("Counter", "p1", "get"), b""),
]
"""Calls whose answers a harness and a worker must agree on, in order (state carries over)."""


class TestSameAnswersAsAWorker:
    """The same calls through a worker over NATS and through a harness get the same replies and
    the same errors (class, code, type and message)."""

    async def test_replies_and_errors_match(self, worker: object, client: ActorClient) -> None:
        """Routing, argument checks, handler failures, limits, calls between objects."""
        over_nats = [await _outcome(client.request, s, b) for s, b in PARITY_CALLS]
        async with ObjectHarness(ALL_CLASSES) as harness:
            in_process = [await _outcome(harness.request, s, b) for s, b in PARITY_CALLS]
        assert in_process == over_nats
        assert over_nats[0] == ("ok", 2)
        assert {outcome[2] for outcome in over_nats if outcome[0] != "ok"} >= {
            "unknown_method",
            "unknown_class",
            "invalid_subject",
            "invalid_arguments",
            "malformed_body",
            "handler_error",
            "busy",
            "value_too_large",
            "call_cycle",
        }

    async def test_errors_are_the_wire_classes(self, harness: ObjectHarness) -> None:
        """A handler's own ConflictError subclass reaches the caller as ConflictError, as over
        NATS, chained to the handler's exception."""
        with pytest.raises(ConflictError) as caught:
            await harness.get(Ticker, "t").refuse()
        assert type(caught.value) is ConflictError
        assert caught.value.type == "not_now"
        assert isinstance(caught.value.__cause__, OwnConflict)

    async def test_a_handler_error_keeps_its_traceback(self, harness: ObjectHarness) -> None:
        """A 500 is chained to what the handler raised (pytest shows where it failed)."""
        with pytest.raises(HandlerError, match="boom after writing") as caught:
            await harness.get(Faulty, "f").write_then_raise(value=1)
        assert isinstance(caught.value.__cause__, RuntimeError)

    async def test_deadline(self, clock: FakeClock) -> None:
        """A handler past ``handler_timeout`` is a 504 and its writes are discarded."""
        async with ObjectHarness([Slow], clock=clock, handler_timeout=0.2) as harness:
            with pytest.raises(DeadlineExceededError):
                await harness.get(Slow, "s").sleep(seconds=30.0)
            assert await harness.state(Slow, "s") == {}
            assert await harness.get(Slow, "s").give_up_after(limit=0.01) == "gave up"


class TestWriteSets:
    """A turn's writes are committed before its reply (output gate); a failed turn writes
    nothing and the object reloads; a read-only turn commits nothing."""

    async def test_committed_before_the_reply(self, clock: FakeClock) -> None:
        """The reply comes after the commit; reads and failures commit nothing."""
        storage = InMemoryStorage()
        async with ObjectHarness([Faulty, Counter], storage=storage, clock=clock) as harness:
            assert await harness.get(Counter, "c").increment(by=4) == 4
            assert storage.object_items("Counter", "c") == {"value": msgspec.msgpack.encode(4)}
            commits = storage.commits
            assert await harness.get(Counter, "c").get() == 4
            with pytest.raises(HandlerError):
                await harness.get(Faulty, "f").write_then_raise(value=9)
            assert storage.commits == commits

    async def test_failed_turn_rebuilds_the_instance(self, harness: ObjectHarness) -> None:
        """After a failure the instance starts again (on_start) from storage."""
        faulty = harness.get(Faulty, "f")
        assert await faulty.write(value=5) == 5
        with pytest.raises(HandlerError):
            await faulty.write_then_raise(value=9)
        assert await faulty.state() == {"stored": 5, "attribute": 5}
        assert await harness.state(Faulty, "f") == {"n": 5}

    async def test_limits_come_from_the_settings(self, clock: FakeClock) -> None:
        """``WorkerConfig`` fields given to the harness apply to its objects."""
        async with ObjectHarness([Faulty], clock=clock, max_value_bytes=100) as harness:
            with pytest.raises(ActorError) as caught:
                await harness.get(Faulty, "f").big_value(size=200)
            assert (caught.value.code, caught.value.type) == (413, "value_too_large")
        config = WorkerConfig(max_object_bytes=300)
        async with ObjectHarness([Faulty], clock=clock, config=config) as harness:
            with pytest.raises(ActorError) as caught:
                await harness.get(Faulty, "f").big_value(size=400)
            assert caught.value.type == "object_too_large"


class TestIdempotency:
    """An Idempotency-Key committed for an object answers its first reply, as a worker does."""

    async def test_a_retry_gets_the_first_reply(self, harness: ObjectHarness) -> None:
        """Same key: the stored reply, no second turn; another call with it: 409."""
        subject = _subject("Counter", "k", "increment")
        first = await harness.request(subject, b'{"by": 2}', idempotency_key="key-1")
        again = await harness.request(subject, b'{"by": 2}', idempotency_key="key-1")
        assert first == again == b"2"
        assert await harness.state(Counter, "k") == {"value": 2}
        with pytest.raises(ConflictError) as caught:
            await harness.request(subject, b'{"by": 3}', idempotency_key="key-1")
        assert caught.value.type == "idempotency_key_reused"

    async def test_msgpack_and_json_retries(self, harness: ObjectHarness) -> None:
        """A MessagePack call is answered in MessagePack; its JSON retry gets JSON."""
        subject = _subject("Counter", "m", "increment")
        msgpack = {Header.CONTENT_TYPE.value: MSGPACK_CONTENT_TYPE}
        body = msgspec.msgpack.encode({"by": 7})
        reply = await harness.request(subject, body, idempotency_key="m1", headers=msgpack)
        assert msgspec.msgpack.decode(reply) == 7
        assert await harness.request(subject, b'{"by": 7}', idempotency_key="m1") == b"7"

    async def test_keys_expire_on_the_fake_clock(self, harness: ObjectHarness) -> None:
        """After the idempotency window, the same key runs the call again."""
        subject = _subject("Counter", "e", "increment")
        await harness.request(subject, b"{}", idempotency_key="e1")
        harness.clock.advance(harness.config.idempotency_window + 1)
        assert await harness.request(subject, b"{}", idempotency_key="e1") == b"2"


class TestStorageAccess:
    """``seed`` writes state straight to storage, ``state`` and ``alarm`` read it."""

    async def test_seed_then_call(self, harness: ObjectHarness) -> None:
        """A running object sees seeded state at its next call (on_start runs again)."""
        faulty = harness.get(Faulty, "s")
        assert await faulty.write(value=1) == 1
        starts = Faulty.starts
        await harness.seed(Faulty, "s", {"n": 41})
        assert await faulty.state() == {"stored": 41, "attribute": 41}
        assert Faulty.starts == starts + 1

    async def test_seed_replace_and_alarm(self, harness: ObjectHarness) -> None:
        """``replace`` drops the other keys; ``alarm`` sets the alarm; values are decoded."""
        await harness.seed(ChatRoom, "r", {"seq": 1, "other": {"a": [1, 2]}})
        assert await harness.state(ChatRoom, "r") == {"seq": 1, "other": {"a": [1, 2]}}
        await harness.seed(ChatRoom, "r", {"seq": 2}, replace=True, alarm=START + 5)
        assert await harness.state(ChatRoom, "r") == {"seq": 2}
        assert await harness.alarm(ChatRoom, "r") == START + 5
        message = await harness.get(ChatRoom, "r").post(user="ann", text="hi")
        assert message.seq == 3

    async def test_unknown_class(self, harness: ObjectHarness) -> None:
        """Storage helpers refuse a class the harness does not host, as a call would."""
        with pytest.raises(NotFoundError) as caught:
            await harness.state("Nope", "x")
        assert caught.value.type == "unknown_class"


class TestAlarms:
    """``fire_alarm`` delivers one alarm now; ``advance`` moves the fake clock and delivers
    every alarm falling due, in due order, with the worker's retries."""

    async def test_fire_alarm_now(self, harness: ObjectHarness) -> None:
        """The alarm runs at once, whatever its time; the clock does not move."""
        await harness.get(Reminder, "r").schedule(at=START + 3600)
        run = await harness.fire_alarm(Reminder, "r")
        assert (run.due, run.attempt, run.at, run.ok) == (START + 3600, 1, START, True)
        assert await harness.get(Reminder, "r").fired() == [[START + 3600, 1]]
        assert await harness.alarm(Reminder, "r") is None
        with pytest.raises(NotFoundError) as caught:
            await harness.fire_alarm(Reminder, "r")
        assert caught.value.type == "alarm_not_set"

    async def test_fire_alarm_of_a_class_without_alarm(self, harness: ObjectHarness) -> None:
        """A class without ``alarm()`` gets the turn engine's 404 ``no_alarm``."""
        await harness.seed(Counter, "c", alarm=START)
        with pytest.raises(NotFoundError) as caught:
            await harness.fire_alarm(Counter, "c")
        assert caught.value.type == "no_alarm"

    async def test_fire_alarm_failures_count_as_attempts(self, clock: FakeClock) -> None:
        """A failed delivery raises; the next is attempt 2; the last allowed one drops it."""
        async with ObjectHarness([Reminder], clock=clock, alarm_max_attempts=2) as harness:
            await harness.get(Reminder, "r").schedule(at=START + 1, fail_times=5)
            with pytest.raises(HandlerError, match="attempt 1"):
                await harness.fire_alarm(Reminder, "r")
            with pytest.raises(HandlerError, match="attempt 2"):
                await harness.fire_alarm(Reminder, "r")
            assert await harness.alarm(Reminder, "r") is None

    async def test_advance_rearms_in_due_order(self, harness: ObjectHarness) -> None:
        """A re-armed alarm fires again inside the window, at its due time, in order with
        other objects' alarms; the clock ends at the window's end."""
        await harness.get(Ticker, "a").start(every=10.0, times=5)
        await harness.get(Reminder, "r").schedule(at=START + 15)
        runs = await harness.advance(35)
        assert [(run.address.object_id, run.at - START) for run in runs] == [
            ("a", 10.0),
            ("r", 15.0),
            ("a", 20.0),
            ("a", 30.0),
        ]
        assert all(run.ok and run.at == run.due for run in runs)
        assert harness.clock() == START + 35
        assert await harness.get(Ticker, "a").ticks() == [START + 10, START + 20, START + 30]
        assert await harness.alarm(Ticker, "a") == START + 40
        assert [run.at - START for run in await harness.advance(100)] == [40.0, 50.0]
        assert await harness.advance(1000) == []

    async def test_alarms_already_due_fire_now(self, harness: ObjectHarness) -> None:
        """An alarm set in the past fires at the current time; the clock never goes back."""
        await harness.get(Reminder, "r").schedule(at=START - 100)
        runs = await harness.advance(0)
        assert [(run.due, run.at) for run in runs] == [(START - 100, START)]

    async def test_failed_deliveries_are_retried_then_dropped(self, clock: FakeClock) -> None:
        """Failures are reported in the runs, retried after the backoff (1 s, 2 s, ...), and
        the alarm is deleted after ``alarm_max_attempts``."""
        async with ObjectHarness(
            [Reminder], clock=clock, alarm_initial_backoff=1.0, alarm_max_attempts=3
        ) as harness:
            await harness.get(Reminder, "ok").schedule(at=START + 10, fail_times=2)
            await harness.get(Reminder, "bad").schedule(at=START + 20, fail_times=9)
            runs = await harness.advance(60)
            assert [_brief(run) for run in runs] == [
                ("ok", 10.0, 1, "handler_error", False),
                ("ok", 11.0, 2, "handler_error", False),
                ("ok", 13.0, 3, None, False),
                ("bad", 20.0, 1, "handler_error", False),
                ("bad", 21.0, 2, "handler_error", False),
                ("bad", 23.0, 3, "handler_error", True),
            ]
            assert await harness.get(Reminder, "ok").fired() == [[START + 10, 3]]
            assert await harness.alarm(Reminder, "bad") is None

    async def test_a_retry_outside_the_window_waits(self, clock: FakeClock) -> None:
        """A retry due after the window is made by a later ``advance``."""
        async with ObjectHarness([Reminder], clock=clock) as harness:
            await harness.get(Reminder, "r").schedule(at=START + 1, fail_times=1)
            assert [run.attempt for run in await harness.advance(1.5)] == [1]
            assert [run.attempt for run in await harness.advance(1.0)] == [2]

    async def test_bounded(self, harness: ObjectHarness, monkeypatch: pytest.MonkeyPatch) -> None:
        """An alarm that keeps re-arming stops ``advance`` with a message saying what to do."""
        monkeypatch.setattr(ndo.ops._kit, "MAX_ALARM_RUNS", 5)
        await harness.get(Ticker, "t").start(every=1.0, times=100)
        with pytest.raises(RuntimeError, match="advance in smaller steps"):
            await harness.advance(60)

    async def test_fake_clock(self, harness: ObjectHarness) -> None:
        """``Actor.now()`` is the fake clock; moving the clock alone fires nothing."""
        assert await harness.get(Session, "s").save(data={"a": "b"}) == START + Session.IDLE
        harness.clock.advance(Session.IDLE * 2)
        assert await harness.state(Session, "s") != {}
        with pytest.raises(ValueError, match=">= 0"):
            harness.clock.advance(-1)
        with pytest.raises(ValueError, match="finite"):
            FakeClock(float("nan"))


def _brief(run: AlarmRun) -> tuple[str, float, int, str | None, bool]:
    error = None if run.error is None else run.error.type
    return (run.address.object_id, run.at - START, run.attempt, error, run.dropped)


class TestEvents:
    """Events are recorded only when their turn committed, in order, JSON-decoded."""

    async def test_only_committed_turns_emit(self, harness: ObjectHarness) -> None:
        """A failed turn's events are discarded; alarm turns emit too; filters and clear."""
        with pytest.raises(HandlerError):
            await harness.get(Faulty, "f").write_then_raise(value=1)
        assert harness.events() == []
        await harness.get(ChatRoom, "a").post(user="ann", text="one")
        await harness.get(ChatRoom, "b").post(user="bob", text="two")
        await harness.get(Reminder, "r").schedule(at=START)
        await harness.advance(0)
        assert [(e.address.object_id, e.topic) for e in harness.events()] == [
            ("a", "message"),
            ("b", "message"),
            ("r", "fired"),
        ]
        (first,) = harness.events(ChatRoom, "a", topic="message")
        assert first.data["text"] == "one"
        assert first.subject == "ndo.evt.ChatRoom.a.message"
        assert msgspec.json.decode(first.payload) == first.data
        assert harness.events("Reminder", topic="message") == []
        harness.clear_events()
        assert harness.events() == []


class TestCallsBetweenObjects:
    """``self.call(...)`` stays in the harness, with the worker's call rules."""

    async def test_a_handler_calls_another_object(self, harness: ObjectHarness) -> None:
        """The call is made and committed; both objects' writes are durable."""
        assert await harness.get(Relay, "r").forward(to="c", by=3) == 3
        assert await harness.state(Counter, "c") == {"value": 3}
        assert await harness.state(Relay, "r") == {"sent": 1}
        assert await harness.get(Relay, "a").chain(path=["b", "c"]) == ["a", "b", "c"]

    async def test_cycles_are_refused(self, harness: ObjectHarness) -> None:
        """Calling itself, or back into a waiting object, is a 409 ``call_cycle``."""
        for call in (
            harness.get(Relay, "a").call_self(),
            harness.get(Relay, "a").chain(path=["b", "a"]),
        ):
            with pytest.raises(ConflictError) as caught:
                await call
            assert caught.value.type == "call_cycle"

    async def test_the_target_must_be_hosted(self, clock: FakeClock) -> None:
        """A call to a class the harness does not host is a 404, and the caller writes
        nothing."""
        async with ObjectHarness([Relay], clock=clock) as harness:
            with pytest.raises(NotFoundError):
                await harness.get(Relay, "r").forward(to="c")
            assert await harness.state(Relay, "r") == {}


class TestCallerAndEviction:
    """``get(..., caller=)`` sets ``Actor.caller``; ``evict`` takes an object out of memory,
    running its ``on_stop``, as closing the harness does for every object."""

    async def test_caller(self, harness: ObjectHarness) -> None:
        """The handler sees the caller the test names, and none otherwise."""
        assert await harness.get(Ticker, "t").whoami() is None
        stub = harness.get(Ticker, "t", caller=Caller("BILLING", "u1", "app"))
        assert await stub.whoami() == ["BILLING", "u1", "app"]

    async def test_evict(self, harness: ObjectHarness) -> None:
        """The next call starts a new instance that reads storage."""
        faulty = harness.get(Faulty, "e")
        await faulty.write(value=2)
        starts = Faulty.starts
        await harness.evict(Faulty, "e")
        assert await faulty.state() == {"stored": 2, "attribute": 2}
        assert Faulty.starts == starts + 1

    async def test_evict_runs_on_stop(self, harness: ObjectHarness) -> None:
        """``on_stop`` commits like a turn (its events recorded); a failed one raises and
        writes nothing, and the object is out of memory either way."""
        flusher = harness.get(Flusher, "f")
        await flusher.add(by=3)
        await harness.evict(Flusher, "f")
        assert await harness.state(Flusher, "f") == {"total": 3, "stops": 1}
        assert [e.data for e in harness.events(Flusher, "f", topic="stopped")] == [{"flushed": 3}]
        await harness.evict(Flusher, "f")  # no live instance: nothing runs
        assert await flusher.add(by=2) == 2  # a new instance
        await flusher.stop_badly()
        with pytest.raises(HandlerError, match="on_stop failed on purpose"):
            await harness.evict(Flusher, "f")
        assert await harness.state(Flusher, "f") == {"total": 3, "stops": 1}
        assert await flusher.add() == 1

    async def test_close_runs_on_stop(self, tmp_path: Path, clock: FakeClock) -> None:
        """Closing the harness is an orderly shutdown: ``on_stop`` of each live object runs
        and commits before the storage closes."""
        path = tmp_path / "flush.sqlite3"
        async with ObjectHarness([Flusher], storage=path, clock=clock) as first:
            await first.get(Flusher, "a").add(by=4)
            await first.get(Flusher, "b").add(by=5)
        async with ObjectHarness([Flusher], storage=path, clock=clock) as second:
            assert await second.state(Flusher, "a") == {"total": 4, "stops": 1}
            assert await second.state(Flusher, "b") == {"total": 5, "stops": 1}
            await second.get(Flusher, "c").stop_badly()
            await second.get(Flusher, "d").add(by=6)
            with pytest.raises(HandlerError, match="on_stop failed on purpose"):
                await second.close()
        async with ObjectHarness([Flusher], storage=path, clock=clock) as third:
            assert await third.state(Flusher, "c") == {}
            assert await third.state(Flusher, "d") == {"total": 6, "stops": 1}


class TestSqliteFile:
    """``storage=<path>``: a SQLite file that a second harness reopens."""

    async def test_state_alarm_and_keys_persist(self, tmp_path: Path, clock: FakeClock) -> None:
        """Values, alarms and committed Idempotency-Keys survive the first harness."""
        path = tmp_path / "kit.sqlite3"
        subject = _subject("Counter", "c", "increment")
        async with ObjectHarness(CLASSES, storage=path, clock=clock) as first:
            assert await first.request(subject, b'{"by": 2}', idempotency_key="k") == b"2"
            await first.get(Reminder, "r").schedule(at=START + 5)
        async with ObjectHarness(CLASSES, storage=path, clock=clock) as second:
            assert await second.request(subject, b'{"by": 2}', idempotency_key="k") == b"2"
            assert await second.state(Counter, "c") == {"value": 2}
            assert [run.ok for run in await second.advance(10)] == [True]
            assert await second.get(Reminder, "r").fired() == [[START + 5, 1]]


class TestLifecycle:
    """A harness is used between ``open`` and ``close``, once."""

    async def test_open_once(self) -> None:
        """Calls before open or after close, and a second open, are refused clearly."""
        harness = ObjectHarness([Counter])
        with pytest.raises(RuntimeError, match="async with"):
            await harness.get(Counter, "c").get()
        async with harness:
            assert await harness.get(Counter, "c").get() == 0
        await harness.close()
        with pytest.raises(RuntimeError, match="closed"):
            await harness.state(Counter, "c")
        with pytest.raises(RuntimeError, match="opens once"):
            await harness.open()

    def test_bad_classes_and_settings(self) -> None:
        """Duplicate class names, no classes and unknown settings fail at construction."""
        with pytest.raises(ValueError, match="no actor classes"):
            ObjectHarness([])
        with pytest.raises(TypeError):
            ObjectHarness([Counter], no_such_setting=1)
        with pytest.raises(ValueError, match="handler_timeout"):
            ObjectHarness([Counter], handler_timeout=-1)


class TestPublicApi:
    """``ndo.testing`` exports exactly the kit."""

    def test_names(self) -> None:
        """The harness, its clock and records, and the bound on alarm deliveries."""
        import ndo.testing

        assert ndo.testing.__all__ == [
            "MAX_ALARM_RUNS",
            "AlarmRun",
            "EmittedEvent",
            "FakeClock",
            "ObjectHarness",
            "StorageSpec",
        ]
