"""A 3-node NATS cluster with JetStream on loopback, for the tests of replicated storage.

Each server is an ``EmbeddedNatsServer`` with its own store directory, a client port and a route
port chosen up front (routes must name each other), so a killed server restarts on the same
ports with its JetStream data and rejoins. ``url`` lists all three servers, as an operator
passes ``--nats-url`` to a worker on such a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import nats.js.api as js_api
import nats.js.errors
import pytest

from ndo.ops import ClusterSpec, EmbeddedNatsServer


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsCluster:
    """Three clustered nats-servers."""

    def __init__(self, root: Path, binary: str, size: int = 3) -> None:
        ports = free_ports(2 * size)
        client, route = ports[:size], ports[size:]
        self.servers = [
            EmbeddedNatsServer(
                store_dir=root / f"nats-n{i}",
                port=client[i],
                binary=binary,
                cluster=ClusterSpec(
                    server_name=f"n{i}",
                    port=route[i],
                    routes=tuple(f"127.0.0.1:{route[j]}" for j in range(size) if j != i),
                ),
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated (what ``--nats-url`` takes)."""
        return ",".join(server.url for server in self.servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    async def start(self) -> None:
        await asyncio.gather(*(server.start() for server in self.servers))
        await self.wait_ready()

    async def stop(self) -> None:
        await asyncio.gather(*(server.stop() for server in self.servers), return_exceptions=True)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the cluster can create (and delete) an R3 stream."""
        nc = await nats.connect(servers=self.urls, connect_timeout=2)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    await js.add_stream(
                        js_api.StreamConfig(
                            name="READY_CHECK",
                            subjects=["ready.check"],
                            num_replicas=len(self.servers),
                        )
                    )
                    await js.delete_stream("READY_CHECK")
                    return
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.25)
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def stream_leader(self, stream: str) -> EmbeddedNatsServer:
        """The server leading ``stream``."""
        nc = await nats.connect(servers=self.urls, connect_timeout=2)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        leader = info.cluster.leader if info.cluster else None
        for i, server in enumerate(self.servers):
            if leader == f"n{i}":
                return server
        raise AssertionError(f"no leader known for {stream}: {info.cluster}")


@pytest.fixture(name="nats_cluster")
async def _nats_cluster(tmp_path: Path, nats_server_binary: str) -> AsyncIterator[NatsCluster]:
    """A started 3-node JetStream cluster on loopback, stopped after the test."""
    cluster = NatsCluster(tmp_path, nats_server_binary)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
