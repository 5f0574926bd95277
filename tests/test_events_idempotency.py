"""Events after commit, exactly-once retries with idempotency keys, and size limits."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, BadRequestError, PayloadTooLargeError
from ndo.examples import ChatRoom, Counter, DrawingBoard
from ndo.service import Worker
from tests.objects import Faulty, Store
from tests.worker_fixtures import WorkerFactory


class TestEvents:
    """Events leave after their turn's commit, in commit order, never for failed turns."""

    async def test_chat_events_in_commit_order(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """Every post arrives as an event, in sequence order, via plain NATS."""
        sub = await nc.subscribe("ndo.evt.ChatRoom.room1.*")
        room = client.get(ChatRoom, "room1")
        await asyncio.gather(*(room.call(ChatRoom.post, "u", f"m{i}") for i in range(50)))
        seqs = []
        for _ in range(50):
            msg = await sub.next_msg(timeout=2)
            assert msg.subject == "ndo.evt.ChatRoom.room1.message"
            seqs.append(json.loads(msg.data)["seq"])
        assert seqs == list(range(1, 51))

    async def test_client_events_iterator(self, worker: Worker, client: ActorClient) -> None:
        """handle.events() yields the drawing board's stroke and clear events."""
        board = client.get(DrawingBoard, "canvas")
        events = board.events()
        received: list[str] = []

        async def collect() -> None:
            async for event in events:
                received.append(event.subject.rsplit(".", 1)[1])
                if len(received) == 2:
                    return

        task = asyncio.create_task(collect())
        await asyncio.sleep(0.1)
        await board.call(DrawingBoard.stroke, [(1, 1)])
        await board.call(DrawingBoard.clear)
        await asyncio.wait_for(task, 5)
        await events.aclose()
        assert received == ["stroke", "clear"]

    async def test_no_event_for_failed_turn(
        self, worker: Worker, client: ActorClient, nc: NatsClient
    ) -> None:
        """A handler that emits then raises publishes nothing."""
        sub = await nc.subscribe("ndo.evt.Faulty.>")
        with pytest.raises(Exception, match="boom"):
            await client.get(Faulty, "e").call(Faulty.write_then_raise, 1)
        with pytest.raises(asyncio.TimeoutError):
            await sub.next_msg(timeout=0.3)


class TestIdempotency:
    """A request whose Idempotency-Key was committed returns the stored reply, unapplied."""

    async def test_duplicate_key_applies_once(self, worker: Worker, nc: NatsClient) -> None:
        """The same key sent twice increments once and replies the same value twice."""
        headers = {"Idempotency-Key": "k-1"}
        first = await nc.request("ndo.rpc.Counter.i.increment", b"", timeout=5, headers=headers)
        again = await nc.request("ndo.rpc.Counter.i.increment", b"", timeout=5, headers=headers)
        other = await nc.request("ndo.rpc.Counter.i.increment", b"", timeout=5)
        assert (first.data, again.data, other.data) == (b"1", b"1", b"2")

    async def test_nats_msg_id_is_a_key(self, worker: Worker, nc: NatsClient) -> None:
        """Nats-Msg-Id works as the key when Idempotency-Key is absent."""
        headers = {"Nats-Msg-Id": "m-1"}
        for _ in range(3):
            msg = await nc.request("ndo.rpc.Counter.j.increment", b"", timeout=5, headers=headers)
            assert msg.data == b"1"

    async def test_concurrent_duplicates(self, worker: Worker, nc: NatsClient) -> None:
        """Duplicates arriving while the first is still committing get the same reply."""
        replies = await asyncio.gather(
            *(
                nc.request(
                    "ndo.rpc.Counter.c.increment",
                    b'{"by": 5}',
                    timeout=5,
                    headers={"Idempotency-Key": f"k{i % 10}"},
                )
                for i in range(100)
            )
        )
        values = {int(r.data) for r in replies}
        assert values == {5 * n for n in range(1, 11)}
        final = await nc.request("ndo.rpc.Counter.c.get", b"", timeout=5)
        assert final.data == b"50"

    async def test_key_survives_restart(self, start_worker: WorkerFactory, nc: NatsClient) -> None:
        """A key committed before a restart still dedupes after it."""
        first = await start_worker()
        headers = {"Idempotency-Key": "persist"}
        msg = await nc.request("ndo.rpc.Counter.p.increment", b"", timeout=5, headers=headers)
        assert msg.data == b"1"
        await first.stop()
        await start_worker()
        msg = await nc.request("ndo.rpc.Counter.p.increment", b"", timeout=5, headers=headers)
        assert msg.data == b"1"
        msg = await nc.request("ndo.rpc.Counter.p.get", b"", timeout=5)
        assert msg.data == b"1"

    async def test_key_expires(self, start_worker: WorkerFactory, nc: NatsClient) -> None:
        """After the idempotency window the same key applies again."""
        await start_worker(idempotency_window=0.3)
        headers = {"Idempotency-Key": "short"}
        assert (
            await nc.request("ndo.rpc.Counter.x.increment", b"", timeout=5, headers=headers)
        ).data == b"1"
        await asyncio.sleep(0.5)
        assert (
            await nc.request("ndo.rpc.Counter.x.increment", b"", timeout=5, headers=headers)
        ).data == b"2"

    async def test_failed_call_is_not_remembered(self, worker: Worker, nc: NatsClient) -> None:
        """A key whose handler failed can be retried and applies then."""
        headers = {"Idempotency-Key": "retry-me"}
        bad = await nc.request(
            "ndo.rpc.Counter.f.increment", b'{"by": "x"}', timeout=5, headers=headers
        )
        assert bad.headers["Nats-Service-Error-Code"] == "400"
        ok = await nc.request("ndo.rpc.Counter.f.increment", b"", timeout=5, headers=headers)
        assert ok.data == b"1"

    async def test_client_retry_after_timeout_applies_once(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """The client's timeout retries reuse the key: a slow first try is not applied twice."""
        await start_worker()
        client = ActorClient(nc, timeout=0.2)
        # Queue a slow call ahead so the increment's first try times out in the mailbox.
        slow = asyncio.create_task(
            nc.request("ndo.rpc.Slow.shared.sleep", b'{"seconds": 0.5}', timeout=5)
        )
        await asyncio.sleep(0.05)
        assert await client.get("Slow", "shared").call("bump") == 1
        await slow
        assert await client.get("Slow", "shared").call("read") == 1


class TestLimits:
    """Limits answer 413/400 at the boundary and just over it."""

    async def test_value_size_boundary(self, start_worker: WorkerFactory, client: ActorClient):
        """A value of exactly max_value_bytes is stored; one byte more is refused."""
        await start_worker(max_value_bytes=100)
        store = client.get(Store, "lim")
        at_limit = "x" * 98  # msgpack str8 header is 2 bytes
        await store.call(Store.put, "k", at_limit)
        with pytest.raises(PayloadTooLargeError):
            await store.call(Store.put, "k", at_limit + "x")
        assert await store.call(Store.get, "k") == at_limit

    async def test_key_size_boundary(self, start_worker: WorkerFactory, client: ActorClient):
        """A key of exactly max_key_bytes is accepted; one byte more is refused."""
        await start_worker(max_key_bytes=16)
        store = client.get(Store, "keys")
        await store.call(Store.put, "k" * 16, 1)
        with pytest.raises(PayloadTooLargeError) as too_long:
            await store.call(Store.put, "k" * 17, 1)
        assert too_long.value.type == "key_too_large"

    async def test_keys_per_call(self, start_worker: WorkerFactory, client: ActorClient):
        """put_many/get_many over max_keys_per_call fail with 400; at the limit they work."""
        await start_worker(max_keys_per_call=4)
        store = client.get(Store, "many")
        await store.call(Store.put_many, {f"k{i}": i for i in range(4)})
        with pytest.raises(BadRequestError):
            await store.call(Store.put_many, {f"k{i}": i for i in range(5)})
        assert len(await store.call(Store.get_many, [f"k{i}" for i in range(4)])) == 4
        with pytest.raises(BadRequestError):
            await store.call(Store.get_many, [f"k{i}" for i in range(5)])

    async def test_request_payload_boundary(self, start_worker: WorkerFactory, nc: NatsClient):
        """A request body of exactly max_payload is accepted; one byte more gets 413."""
        await start_worker(max_payload=200)
        body = b'{"by": 1}' + b" " * (200 - 9)
        assert (await nc.request("ndo.rpc.Counter.b.increment", body, timeout=5)).data == b"1"
        over = await nc.request("ndo.rpc.Counter.b.increment", body + b" ", timeout=5)
        assert over.headers["Nats-Service-Error-Code"] == "413"

    async def test_reply_too_large(self, start_worker: WorkerFactory, client: ActorClient):
        """A reply over max_payload fails the turn with 413 and its writes are discarded."""
        await start_worker(max_payload=300)
        store = client.get(Store, "reply")
        await store.call(Store.put, "a", "x" * 100)
        await store.call(Store.put, "b", "y" * 100)
        await store.call(Store.put, "c", "z" * 100)
        with pytest.raises(PayloadTooLargeError):
            await store.call(Store.list)

    async def test_counter_unchanged_after_errors(self, worker: Worker, client: ActorClient):
        """The worker keeps serving after every kind of error above."""
        assert await client.get(Counter, "alive").call(Counter.increment) == 1
