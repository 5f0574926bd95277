"""Events after commit, exactly-once retries with idempotency keys, and size limits."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ndo.actors import ActorClient, BadRequestError, PayloadTooLargeError
from ndo.examples import ChatRoom, Counter, DrawingBoard
from ndo.service import Worker
from ndo.service._codec import replay_reply, stored_fingerprint, stored_reply
from ndo.service._idempotency import (
    MAX_REMEMBERED_BYTES,
    IdempotencyCache,
    call_fingerprint,
)
from ndo.storage import IdempotentReply, ObjectWrite, SqliteStorage
from ndo.subjects import partition_of
from tests.objects import Faulty, Store
from tests.worker_fixtures import WorkerFactory

MSGPACK = {"Content-Type": "application/msgpack"}
_CounterArgs = msgspec.defstruct("Counter_increment_args", [("by", int)], kw_only=True)


def _error(msg: Msg) -> tuple[int, str]:
    """``(code, type)`` of an error reply."""
    assert msg.headers is not None and "Nats-Service-Error-Code" in msg.headers, msg.data
    error = json.loads(msg.data)["error"]
    return int(msg.headers["Nats-Service-Error-Code"]), error["type"]


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


class TestIdempotencyKeyBinding:
    """An Idempotency-Key is bound to the method and arguments it was first used with."""

    async def test_other_arguments_get_409(self, worker: Worker, nc: NatsClient) -> None:
        """The same key with other arguments is refused with 409 and applies nothing."""
        headers = {"Idempotency-Key": "bound-1"}
        subject = "ndo.rpc.Counter.kb1.increment"
        first = await nc.request(subject, b'{"by": 2}', timeout=5, headers=headers)
        reused = await nc.request(subject, b'{"by": 3}', timeout=5, headers=headers)
        assert first.data == b"2"
        assert _error(reused) == (409, "idempotency_key_reused")
        assert "fresh key" in json.loads(reused.data)["error"]["message"]
        retried = await nc.request(subject, b'{"by": 2}', timeout=5, headers=headers)
        assert retried.data == b"2"
        final = await nc.request("ndo.rpc.Counter.kb1.get", b"", timeout=5)
        assert final.data == b"2"

    async def test_other_method_gets_409(self, worker: Worker, nc: NatsClient) -> None:
        """The same key on another method of the object is refused with 409."""
        headers = {"Nats-Msg-Id": "bound-2"}
        await nc.request("ndo.rpc.Counter.kb2.increment", b"", timeout=5, headers=headers)
        reused = await nc.request("ndo.rpc.Counter.kb2.reset", b"", timeout=5, headers=headers)
        assert _error(reused) == (409, "idempotency_key_reused")
        final = await nc.request("ndo.rpc.Counter.kb2.get", b"", timeout=5)
        assert final.data == b"1"

    async def test_same_call_in_any_form_replays(self, worker: Worker, nc: NatsClient) -> None:
        """The same call as MessagePack, with its map keys reordered or a default spelled out,
        replays the stored reply instead of being refused."""
        headers = {"Idempotency-Key": "bound-3"}
        subject = "ndo.rpc.Store.kb3.put"
        body = {"key": "k", "value": {"a": 1, "b": [1, 2]}}
        first = await nc.request(subject, json.dumps(body).encode(), timeout=5, headers=headers)
        assert first.data == b"null"
        reordered = b'{"value": {"b": [1, 2], "a": 1}, "key": "k"}'
        again = await nc.request(subject, reordered, timeout=5, headers=headers)
        assert again.data == b"null"
        packed = await nc.request(
            subject, msgspec.msgpack.encode(body), timeout=5, headers={**headers, **MSGPACK}
        )
        assert packed.headers == MSGPACK and msgspec.msgpack.decode(packed.data) is None
        counter = "ndo.rpc.Counter.kb3.increment"
        assert (await nc.request(counter, b"", timeout=5, headers=headers)).data == b"1"
        spelled = await nc.request(counter, b'{"by": 1}', timeout=5, headers=headers)
        assert spelled.data == b"1"

    async def test_reuse_while_first_commits(self, worker: Worker, nc: NatsClient) -> None:
        """A reuse arriving while the first call is still committing is refused too; an exact
        duplicate then follows the first call's reply."""
        subject = "ndo.rpc.Counter.kb4.increment"
        headers = {"Idempotency-Key": "bound-4"}
        replies = await asyncio.gather(
            *(
                nc.request(subject, b'{"by": %d}' % (1 + i % 2), timeout=5, headers=headers)
                for i in range(20)
            )
        )
        assert [r.data for r in replies[::2]] == [b"1"] * 10
        assert {_error(r) for r in replies[1::2]} == {(409, "idempotency_key_reused")}
        final = await nc.request("ndo.rpc.Counter.kb4.get", b"", timeout=5)
        assert final.data == b"1"

    async def test_binding_survives_restart(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """A key read back from storage after a restart is still bound to its call."""
        first = await start_worker()
        headers = {"Idempotency-Key": "bound-5"}
        subject = "ndo.rpc.Counter.kb5.increment"
        assert (await nc.request(subject, b'{"by": 4}', timeout=5, headers=headers)).data == b"4"
        await first.stop()
        await start_worker()
        reused = await nc.request(subject, b'{"by": 5}', timeout=5, headers=headers)
        assert _error(reused) == (409, "idempotency_key_reused")
        packed = await nc.request(
            subject, msgspec.msgpack.encode({"by": 4}), timeout=5, headers={**headers, **MSGPACK}
        )
        assert msgspec.msgpack.decode(packed.data) == 4

    async def test_rows_without_fingerprint_still_replay(
        self, start_worker: WorkerFactory, nc: NatsClient, data_dir: Path
    ) -> None:
        """A reply remembered by an ndo without fingerprints replays for any call with its key
        (it cannot be checked; it is never refused)."""
        first = await start_worker()
        subject = "ndo.rpc.Counter.kb6.increment"
        assert (await nc.request(subject, b"", timeout=5)).data == b"1"
        await first.stop()
        storage = SqliteStorage(data_dir / "ndo.sqlite3", partitions=8)
        await storage.open()
        try:
            partition = partition_of("Counter", "kb6", 8)
            epoch = (await storage.claim_partitions([partition], "old-ndo"))[partition]
            legacy = IdempotentReply("old-key", b"\x00" + b"1", time.time() + 300)
            write = ObjectWrite("Counter", "kb6", partition, epoch, idempotent_reply=legacy)
            assert await storage.commit([write]) == frozenset()
        finally:
            await storage.close()
        await start_worker()
        headers = {"Idempotency-Key": "old-key"}
        replayed = await nc.request(subject, b'{"by": 9}', timeout=5, headers=headers)
        assert replayed.data == b"1"
        assert (await nc.request("ndo.rpc.Counter.kb6.get", b"", timeout=5)).data == b"1"


class TestStoredReplyFormat:
    """Remembered replies carry the call's fingerprint; rows written without one still read."""

    def test_round_trip_with_fingerprint(self) -> None:
        """A stored reply gives back its fingerprint and its body, re-encoded on demand."""
        fingerprint = call_fingerprint("increment", _CounterArgs(by=2))
        stored = stored_reply(b"[1,2]", False, fingerprint)
        assert stored_fingerprint(stored) == fingerprint
        assert replay_reply(stored, False) == (b"[1,2]", None)
        body, headers = replay_reply(stored, True)
        assert msgspec.msgpack.decode(body) == [1, 2] and headers is not None

    def test_legacy_rows(self) -> None:
        """Rows of the old form (encoding byte, body) have no fingerprint and replay as before."""
        assert stored_fingerprint(b"\x00[1]") is None
        assert replay_reply(b"\x00[1]", False) == (b"[1]", None)
        assert replay_reply(b"\x01" + msgspec.msgpack.encode(7), False) == (b"7", None)

    def test_unencodable_in_the_other_encoding(self) -> None:
        """A JSON reply MessagePack cannot hold is a 400 naming the encoding to retry in."""
        stored = stored_reply(b"123456789012345678901234567890", False, bytes(16))
        with pytest.raises(BadRequestError) as refused:
            replay_reply(stored, True)
        assert refused.value.type == "unencodable_reply" and "retry in JSON" in str(refused.value)

    def test_fingerprint_tells_calls_apart(self) -> None:
        """Method and arguments both change the fingerprint; huge integers are fingerprinted."""
        base = call_fingerprint("increment", _CounterArgs(by=1))
        assert base == call_fingerprint("increment", _CounterArgs(by=1))
        assert base != call_fingerprint("increment", _CounterArgs(by=2))
        assert base != call_fingerprint("decrement", _CounterArgs(by=1))
        huge = call_fingerprint("increment", _CounterArgs(by=10**30))
        assert huge != call_fingerprint("increment", _CounterArgs(by=10**30 + 1))


class TestIdempotencyCacheBounds:
    """The in-memory key cache is bounded in bytes as well as in keys."""

    async def test_byte_cap_moves_the_horizon(self) -> None:
        """Replies over the byte cap are dropped oldest first, and their keys are then looked
        up in storage until they expire."""
        cache: IdempotencyCache[object] = IdempotencyCache(300.0)
        asked: list[str] = []

        async def no_horizon() -> float | None:
            return None

        async def stored(key: str) -> bytes | None:
            asked.append(key)
            return b"from storage"

        assert await cache.lookup("k0", no_horizon, stored) is None
        reply = b"x" * (MAX_REMEMBERED_BYTES // 4)
        for i in range(10):
            cache.remember(f"k{i}", reply)
        assert cache.remembered_bytes <= MAX_REMEMBERED_BYTES
        assert len(cache) == 4
        assert await cache.lookup("k9", no_horizon, stored) == reply
        assert await cache.lookup("k0", no_horizon, stored) == b"from storage"
        assert asked == ["k0"]

    async def test_pending_turn_is_not_dropped_for_size(self) -> None:
        """A key whose turn is still committing stays in memory whatever the byte total."""
        cache: IdempotencyCache[object] = IdempotencyCache(300.0)
        pending = object()
        cache.remember("pending", pending)
        cache.remember("big", b"x" * (MAX_REMEMBERED_BYTES + 1))

        async def no_horizon() -> float | None:
            return None

        async def stored(key: str) -> bytes | None:
            raise AssertionError(f"storage asked for {key}")

        assert await cache.lookup("pending", no_horizon, stored) is pending
        cache.update("pending", b"done", pending)
        assert cache.remembered_bytes <= MAX_REMEMBERED_BYTES


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
