"""The single-worker runtime end to end: real nats-server, real SQLite, requests over NATS."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from ndo.actors import (
    ActorClient,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    HandlerError,
    NotFoundError,
    PayloadTooLargeError,
    RetryPolicy,
)
from ndo.examples import ChatMessage, ChatRoom, Counter, DrawingBoard, RateLimiter
from ndo.service import Worker
from ndo.subjects import partition_of
from tests.objects import Faulty, Slow, Store
from tests.worker_fixtures import WorkerFactory


async def _raw(nc: NatsClient, subject: str, body: bytes = b"", headers=None):
    msg = await nc.request(subject, body, timeout=5, headers=headers)
    return msg


class TestWireProtocol:
    """Plain NATS requests get JSON replies and NATS-service-style errors."""

    async def test_plain_request_reply(self, worker: Worker, nc: NatsClient) -> None:
        """A request on ndo.rpc.Counter.a1.increment with a JSON body returns the JSON result."""
        msg = await _raw(nc, "ndo.rpc.Counter.a1.increment", b'{"by": 2}')
        assert msg.data == b"2"
        assert not msg.headers or "Nats-Service-Error-Code" not in msg.headers
        msg = await _raw(nc, "ndo.rpc.Counter.a1.get")
        assert msg.data == b"2"

    async def test_msgpack_both_ways(self, worker: Worker, nc: NatsClient) -> None:
        """Content-Type: application/msgpack switches request and reply to MessagePack."""
        headers = {"Content-Type": "application/msgpack"}
        msg = await _raw(
            nc, "ndo.rpc.Counter.m.increment", msgspec.msgpack.encode({"by": 5}), headers
        )
        assert msgspec.msgpack.decode(msg.data) == 5
        assert msg.headers["Content-Type"] == "application/msgpack"

    @pytest.mark.parametrize(
        ("subject", "body", "code", "error_type"),
        [
            ("ndo.rpc.Counter.a1.increment", b"{not json", 400, "malformed_body"),
            ("ndo.rpc.Counter.a1.increment", b"[1, 2]", 400, "invalid_arguments"),
            ("ndo.rpc.Counter.a1.increment", b'{"by": "two"}', 400, "invalid_arguments"),
            ("ndo.rpc.Counter.a1.increment", b'{"by": 1, "extra": 1}', 400, "invalid_arguments"),
            ("ndo.rpc.Nope.a1.increment", b"", 404, "unknown_class"),
            ("ndo.rpc.Counter.a1.nope", b"", 404, "unknown_method"),
            ("ndo.rpc.Counter.a1.on_start", b"", 404, "unknown_method"),
            ("ndo.rpc.Counter.a1.__init__", b"", 404, "unknown_method"),
            ("ndo.rpc.Counter.bad$id.get", b"", 400, "invalid_subject"),
            ("ndo.rpc.Counter." + "x" * 129 + ".get", b"", 400, "invalid_subject"),
            ("ndo.rpc.9Counter.a.get", b"", 400, "invalid_subject"),
        ],
    )
    async def test_bad_input_gets_precise_error(
        self, worker: Worker, nc: NatsClient, subject: str, body: bytes, code: int, error_type: str
    ) -> None:
        """Every kind of bad input is answered with its code and type, and changes nothing."""
        msg = await _raw(nc, subject, body)
        assert msg.headers["Nats-Service-Error-Code"] == str(code)
        assert msg.headers["Nats-Service-Error"]
        error = json.loads(msg.data)["error"]
        assert error["code"] == code
        assert error["type"] == error_type
        assert error["message"]
        # The worker still serves, and nothing was written.
        assert (await _raw(nc, "ndo.rpc.Counter.a1.get")).data == b"0"

    async def test_malformed_msgpack(self, worker: Worker, nc: NatsClient) -> None:
        """A body that is not MessagePack gets a 400 in MessagePack."""
        headers = {"Content-Type": "application/msgpack"}
        msg = await _raw(nc, "ndo.rpc.Counter.a1.increment", b"\xc1\xc1", headers)
        assert msg.headers["Nats-Service-Error-Code"] == "400"
        assert msgspec.msgpack.decode(msg.data)["error"]["type"] == "malformed_body"

    async def test_oversized_payload(self, start_worker: WorkerFactory, nc: NatsClient) -> None:
        """A body over max_payload is refused with 413 before any object sees it."""
        await start_worker(max_payload=1000)
        body = json.dumps({"key": "k", "value": "x" * 2000}).encode()
        msg = await _raw(nc, "ndo.rpc.Store.s.put", body)
        assert msg.headers["Nats-Service-Error-Code"] == "413"
        assert (await _raw(nc, "ndo.rpc.Store.s.get", b'{"key": "k"}')).data == b"null"


class TestClient:
    """The Python client: typed calls, typed errors, retries."""

    async def test_typed_call(self, worker: Worker, client: ActorClient) -> None:
        """call(Class.method, ...) decodes the reply with the method's return annotation."""
        room = client.get(ChatRoom, "lobby")
        posted = await room.call(ChatRoom.post, "ann", "hello")
        assert isinstance(posted, ChatMessage)
        assert posted.seq == 1
        history = await room.call(ChatRoom.history, limit=10)
        assert [m.text for m in history] == ["hello"]
        assert await client.get("Counter", "c").call("increment", by=3) == 3

    async def test_typed_errors(self, worker: Worker, client: ActorClient) -> None:
        """Wire error codes come back as the matching exception classes."""
        with pytest.raises(NotFoundError):
            await client.get("Counter", "c").call("missing")
        with pytest.raises(BadRequestError):
            await client.get("Counter", "c").call("increment", by="x")
        with pytest.raises(ConflictError) as conflict:
            await client.get(Faulty, "f").call(Faulty.conflict)
        assert conflict.value.type == "busy"

    async def test_retries_until_a_worker_appears(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """No responders is retried with backoff; a worker that starts meanwhile answers."""
        client = ActorClient(nc, retry=RetryPolicy(attempts=10, initial_backoff=0.05))
        call = asyncio.create_task(client.get(Counter, "late").call(Counter.increment))
        await asyncio.sleep(0.1)
        await start_worker()
        assert await call == 1

    async def test_sends_idempotency_key(self, worker: Worker, nc: NatsClient) -> None:
        """Every client call carries an Idempotency-Key header."""
        sub = await nc.subscribe("probe.rpc.>")
        client = ActorClient(nc, prefix="probe")
        task = asyncio.create_task(client.get("Other", "x").call("m"))
        msg = await sub.next_msg(timeout=2)
        assert len(msg.headers["Idempotency-Key"]) >= 16
        await msg.respond(b"1")
        assert await task == 1


class TestSerialization:
    """Messages for one object run one at a time, in order; objects run concurrently."""

    async def test_500_concurrent_increments(self, worker: Worker, client: ActorClient) -> None:
        """500 concurrent increments on one id return exactly 1..500, each once."""
        counter = client.get(Counter, "hot")
        results = await asyncio.gather(*(counter.call(Counter.increment) for _ in range(500)))
        assert sorted(results) == list(range(1, 501))
        assert await counter.call(Counter.get) == 500

    async def test_read_modify_write_with_await_never_loses(
        self, worker: Worker, client: ActorClient
    ) -> None:
        """A handler that awaits between read and write still never interleaves."""
        slow = client.get(Slow, "s")
        results = await asyncio.gather(*(slow.call(Slow.bump, 0.001) for _ in range(100)))
        assert sorted(results) == list(range(1, 101))

    async def test_objects_run_concurrently(self, worker: Worker, client: ActorClient) -> None:
        """Twenty objects each sleeping 0.3 s finish together, not one after another."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(client.get(Slow, f"o{i}").call(Slow.sleep, 0.3) for i in range(20)))
        assert loop.time() - started < 3.0  # serial would be 6 s


class TestHandlerFailures:
    """A failing handler discards its writes and events, and the instance is rebuilt."""

    async def test_raise_discards_writes_and_rebuilds(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """Writes, events and attribute changes of a failed turn are gone."""
        faulty = client.get(Faulty, "f")
        assert await faulty.call(Faulty.write, 1) == 1
        events = await nc.subscribe("ndo.evt.Faulty.f.>")
        with pytest.raises(HandlerError) as failure:
            await faulty.call(Faulty.write_then_raise, 99)
        assert "boom after writing" in failure.value.message
        assert await faulty.call(Faulty.state) == {"stored": 1, "attribute": 1}
        with pytest.raises(asyncio.TimeoutError):
            await events.next_msg(timeout=0.3)

    async def test_failure_log_names_the_object(self, worker: Worker, client: ActorClient) -> None:
        """A failed turn's log line carries the object's class, id, partition and method, also
        when several turns of different methods run in one pump."""
        faulty = client.get(Faulty, "logged")
        with capture_logs(processors=[merge_contextvars]) as logs:
            outcomes = await asyncio.gather(
                faulty.call(Faulty.write_then_raise, 1),
                faulty.call(Faulty.conflict),
                return_exceptions=True,
            )
        assert [type(o) for o in outcomes] == [HandlerError, ConflictError]
        failed = [e for e in logs if e["event"] == "turn failed"]
        assert [(e["class_name"], e["object_id"], e["method"]) for e in failed] == [
            ("Faulty", "logged", "write_then_raise"),
            ("Faulty", "logged", "conflict"),
        ]
        partition = partition_of("Faulty", "logged", worker.config.partitions)
        assert all(e["partition"] == partition for e in failed)

    async def test_deadline(self, start_worker: WorkerFactory, client: ActorClient) -> None:
        """A handler past handler_timeout is cancelled with 504 and writes nothing."""
        await start_worker(handler_timeout=0.2)
        slow = client.get(Slow, "late")
        with pytest.raises(DeadlineExceededError):
            await slow.call(Slow.sleep, 5.0)
        assert await client.get(Store, "late").call(Store.get, "slept") is None
        assert await slow.call(Slow.sleep, 0.0) == "done"

    async def test_handler_timeout_of_its_own(self, worker: Worker, client: ActorClient) -> None:
        """A handler's own ``asyncio.timeout`` cancels the handler, nothing else: the turn may
        start inside ingress (an eager task on Python 3.12+), and a timeout armed against the
        wrong task would cancel the subscription that delivers every object's requests."""
        slow = client.get(Slow, "own-timeout")
        results = await asyncio.gather(
            *(slow.call(Slow.give_up_after, 0.05) for _ in range(3)),
            *(client.get(Slow, f"other-{n}").call(Slow.read) for n in range(20)),
        )
        assert results[:3] == ["gave up"] * 3
        assert results[3:] == [0] * 20
        assert await client.get(Slow, "after").call(Slow.read) == 0

    async def test_unencodable_reply_and_value(self, worker: Worker, client: ActorClient) -> None:
        """Return values and stored values msgspec cannot encode fail the turn cleanly."""
        faulty = client.get(Faulty, "u")
        with pytest.raises(HandlerError):
            await faulty.call(Faulty.unencodable)
        with pytest.raises(BadRequestError) as bad:
            await faulty.call(Faulty.store_unencodable)
        assert bad.value.type == "unencodable_value"

    async def test_value_too_large(self, start_worker: WorkerFactory, client: ActorClient) -> None:
        """A value over max_value_bytes fails the turn with 413."""
        await start_worker(max_value_bytes=1000)
        with pytest.raises(PayloadTooLargeError) as too_big:
            await client.get(Faulty, "b").call(Faulty.big_value, 2000)
        assert too_big.value.type == "value_too_large"
        await client.get(Faulty, "b").call(Faulty.big_value, 900)


class TestExamples:
    """The bundled example objects behave as documented."""

    async def test_rate_limiter_burst_then_cooldown(
        self, worker: Worker, client: ActorClient
    ) -> None:
        """BURST calls pass, the next is refused with a retry_after within the cooldown."""
        limiter = client.get(RateLimiter, "user-1")
        decisions = [await limiter.call(RateLimiter.check) for _ in range(RateLimiter.BURST + 1)]
        assert all(d.allowed for d in decisions[:-1])
        assert not decisions[-1].allowed
        assert 0 < decisions[-1].retry_after <= RateLimiter.COOLDOWN

    async def test_chat_keeps_latest(self, worker: Worker, client: ActorClient) -> None:
        """The chat room keeps only its latest KEEP messages."""
        room = client.get(ChatRoom, "busy")
        for i in range(ChatRoom.KEEP + 5):
            await room.call(ChatRoom.post, "bot", f"m{i}")
        history = await room.call(ChatRoom.history, limit=1000)
        assert len(history) == ChatRoom.KEEP
        assert history[0].text == "m5"
        assert history[-1].text == f"m{ChatRoom.KEEP + 4}"

    async def test_drawing_board(self, worker: Worker, client: ActorClient) -> None:
        """Strokes are stored, validated and cleared."""
        board = client.get(DrawingBoard, "b")
        assert await board.call(DrawingBoard.stroke, [(0, 0), (1, 1)], "#ff0000", 3) == 1
        with pytest.raises(BadRequestError):
            await board.call(DrawingBoard.stroke, [(0, 0)], "red")
        strokes = await board.call(DrawingBoard.strokes)
        assert [s.color for s in strokes] == ["#ff0000"]
        await board.call(DrawingBoard.clear)
        assert await board.call(DrawingBoard.strokes) == []
        assert await board.call(DrawingBoard.stroke, [(2, 2)]) == 2
