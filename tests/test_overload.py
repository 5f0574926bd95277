"""Bounded under overload: every queue between a caller and the disk has a limit, and a caller
past it is told so (503 "overloaded") instead of the worker's memory growing or a request going
unanswered."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, HandlerError, RetryPolicy, UnavailableError
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import _ingress, _routing
from tests.helpers import LockHolder
from tests.objects import Slow
from tests.worker_fixtures import WorkerFactory


def _client(nc: NatsClient) -> ActorClient:
    return ActorClient(nc, timeout=20.0, retry=RetryPolicy(attempts=1))


async def _outcome(call: asyncio.Future[object] | asyncio.Task[object]) -> str:
    try:
        await call
    except UnavailableError as exc:
        return exc.type
    return "ok"


async def test_one_object_cannot_queue_without_bound(
    start_worker: WorkerFactory, nats_url: str, data_dir: Path
) -> None:
    """While commits are stuck, a hot object runs at most ``max_mailbox`` turns ahead of its
    commits and queues at most ``max_mailbox`` more; the rest are refused at once, and every
    acknowledged increment is there once the disk is back."""
    await start_worker(max_mailbox=4)
    nc = await nats.connect(nats_url)
    counter = _client(nc).get(Counter, "hot")
    try:
        assert await counter.call(Counter.increment) == 1
        holder = LockHolder.write_lock(data_dir)
        try:
            calls = []
            for _ in range(40):  # spaced out: each is taken before the next arrives
                calls.append(asyncio.ensure_future(counter.call(Counter.increment)))
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # every call has arrived: queued, pending or refused
            refused = [c for c in calls if c.done()]
            assert len(refused) >= 40 - 8, "more than 2 x max_mailbox calls were taken in"
        finally:
            holder.release()
        outcomes = Tally([await _outcome(call) for call in calls])
        assert set(outcomes) == {"ok", "overloaded"}, outcomes
        assert await counter.call(Counter.get) == 1 + outcomes["ok"]
    finally:
        await nc.close()


async def test_max_active_is_a_hard_bound(start_worker: WorkerFactory, nats_url: str) -> None:
    """With ``max_active`` objects in memory, all busy, a new object is refused, not added."""
    worker = await start_worker(max_active=2)
    nc = await nats.connect(nats_url)
    client = _client(nc)
    try:
        busy = [
            asyncio.ensure_future(client.get(Slow, name).call(Slow.sleep, seconds=1.5))
            for name in ("a", "b")
        ]
        await asyncio.sleep(0.3)
        with pytest.raises(UnavailableError) as refused:
            await client.get(Slow, "c").call(Slow.read)
        assert refused.value.type == "overloaded"
        assert "--max-active" in refused.value.message
        assert len(worker.catalog) == 2
        assert await asyncio.gather(*busy) == ["done", "done"]
        assert await client.get(Slow, "c").call(Slow.read) == 0  # room again: idle ones go
    finally:
        await nc.close()


async def test_requests_dropped_by_a_slow_consumer_are_answered(
    start_worker: WorkerFactory, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NATS client buffers only so many requests per subscription; the ones it drops are
    answered 503 "overloaded" from its error callback instead of timing out."""
    monkeypatch.setattr(_routing, "_PENDING_MSGS", 4)
    monkeypatch.setattr(_routing, "_PARTITION_MIN_MSGS", 4)
    await start_worker(classes=[Counter])
    nc = await nats.connect(nats_url)
    try:

        async def one(i: int) -> str:
            msg = await nc.request(f"ndo.rpc.Counter.n{i}.get", b"", timeout=20)
            return (msg.headers or {}).get("Nats-Service-Error-Code", "ok")

        replies = Tally(await asyncio.gather(*(one(i) for i in range(400))))
        assert set(replies) == {"ok", "503"}, replies  # every request answered; some dropped
    finally:
        await nc.close()


async def test_a_bug_in_ingress_is_answered_with_a_request_id(
    worker: object, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is not an ``ActorError`` (a bug) still gets an answer: 500
    internal_error with a request id, and the worker keeps serving."""

    def broken(self: object, *args: object) -> object:
        raise RuntimeError("a bug")

    nc = await nats.connect(nats_url)
    counter = _client(nc).get(Counter, "x")
    try:
        with monkeypatch.context() as patch:
            patch.setattr(_ingress.Ingress, "_envelope", broken)
            with pytest.raises(HandlerError) as crashed:
                await counter.call(Counter.increment)
        assert crashed.value.type == "internal_error"
        assert "request id" in crashed.value.message
        assert await counter.call(Counter.increment) == 1
    finally:
        await nc.close()


async def test_subscriptions_are_sized_per_partition(nats_server: EmbeddedNatsServer) -> None:
    """64 partition subscriptions share one buffer budget instead of 64 whole ones."""
    nc = await nats.connect(nats_server.url)

    async def nothing(msg: object) -> None:
        return None

    try:
        router = _routing.Router(
            nc,
            "ndo",
            _routing.RoutingMode.MAPPED,
            partitions=64,
            on_rpc=nothing,
            on_routed=nothing,
        )
        for partition in range(64):
            await router.add(partition)
        limits = [sub._pending_bytes_limit for sub in router.detach(range(64))]
        assert sum(limits) <= 256 * 1024 * 1024
    finally:
        await nc.close()
