"""Fixtures that run a real ndo worker in-process against the test's nats-server and SQLite."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import Actor, ActorClient, RetryPolicy
from ndo.examples import Account, ChatRoom, Counter, DrawingBoard, RateLimiter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import ReplicatedStorage, Worker, WorkerConfig
from tests.objects import Faulty, Probe, Relay, Reminder, Slow, Store

ALL_CLASSES: list[type[Actor]] = [
    Counter,
    Account,
    RateLimiter,
    ChatRoom,
    DrawingBoard,
    Slow,
    Faulty,
    Store,
    Reminder,
    Relay,
    Probe,
]
WorkerFactory = Callable[..., Awaitable[Worker]]


@contextlib.asynccontextmanager
async def worker_factory(
    base: Callable[[int], WorkerConfig], default_classes: Sequence[type[Actor]] = ALL_CLASSES
) -> AsyncIterator[WorkerFactory]:
    """``await start(classes=None, **overrides)`` starts a worker whose config is ``base(n)``
    (``n``: how many were started before) with ``overrides``; all are stopped on exit."""
    workers: list[Worker] = []

    async def start(classes: list[type[Actor]] | None = None, **overrides: Any) -> Worker:
        config = msgspec.structs.replace(base(len(workers)), **overrides)
        worker = Worker(config, classes or list(default_classes))
        workers.append(worker)
        await worker.start()
        return worker

    try:
        yield start
    finally:
        for worker in reversed(workers):
            await worker.stop()


@pytest.fixture(name="data_dir")
def _data_dir(tmp_path: Path) -> Path:
    """A fresh data directory for the test's workers."""
    return tmp_path / "data"


@pytest.fixture(name="start_worker")
async def _start_worker(
    nats_server: EmbeddedNatsServer, data_dir: Path
) -> AsyncIterator[WorkerFactory]:
    """Factory: ``await start_worker(**config)`` starts a worker on the test's server."""

    def base(_: int) -> WorkerConfig:
        return WorkerConfig(nats_url=nats_server.url, data_dir=data_dir, partitions=8)

    async with worker_factory(base) as start:
        yield start


@pytest.fixture(name="worker")
async def _worker(start_worker: WorkerFactory) -> Worker:
    """A running worker with default settings serving every test class."""
    return await start_worker()


@pytest.fixture(name="nc")
async def _nc(nats_server: EmbeddedNatsServer) -> AsyncIterator[NatsClient]:
    """A nats-py connection to the test's server."""
    conn = await nats.connect(nats_server.url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(name="client")
def _client(nc: NatsClient) -> ActorClient:
    """An ActorClient with a short retry policy."""
    return ActorClient(nc, timeout=5.0, retry=RetryPolicy(attempts=3, initial_backoff=0.05))


class Replicas:
    """Opens ``ReplicatedStorage`` instances on one server, each with its own directory, and
    closes them after the test."""

    def __init__(self, nc: NatsClient, root: Path) -> None:
        self.nc = nc
        self.root = root
        self.opened: list[ReplicatedStorage] = []
        self.lost: list[tuple[str, int]] = []

    async def open(self, name: str, *, snapshot_every: int = 1_000) -> ReplicatedStorage:
        storage = ReplicatedStorage(
            self.root / name / "replica.sqlite3",
            partitions=8,
            writer=name,
            snapshot_every=snapshot_every,
            append_timeout=5.0,
        )
        await storage.open()
        await storage.connect(self.nc, prefix="ndo", replicas=1)
        storage.on_lost = lambda partition, reason: self.lost.append((name, partition))
        self.opened.append(storage)
        return storage

    async def close(self) -> None:
        for storage in self.opened:
            await storage.close()


@pytest.fixture(name="replicas")
async def _replicas(nc: NatsClient, tmp_path: Path) -> AsyncIterator[Replicas]:
    """``ReplicatedStorage`` copies on the test's server (``await replicas.open("a")``)."""
    replicas = Replicas(nc, tmp_path)
    try:
        yield replicas
    finally:
        await replicas.close()
