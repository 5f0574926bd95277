"""A 3-node NATS cluster with JetStream on loopback, for the tests of replicated storage.

The cluster itself is ``ndo bench``'s (``NatsServers.cluster``): each server an
``EmbeddedNatsServer`` with its own store directory and client and route ports chosen up front
(routes must name each other), so a killed server restarts on the same ports with its JetStream
data and rejoins; started once it accepts a replicated stream. ``url`` lists all three servers,
as an operator passes ``--nats-url`` to a worker on such a cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from ndo.ops import EmbeddedNatsServer
from ndo.ops.bench._servers import NatsServers


class NatsCluster:
    """Three clustered nats-servers."""

    def __init__(self, root: Path, size: int = 3) -> None:
        self._servers = NatsServers.cluster(root, size)

    @property
    def servers(self) -> list[EmbeddedNatsServer]:
        return self._servers.servers

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated (what ``--nats-url`` takes)."""
        return self._servers.url

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    async def start(self) -> None:
        await self._servers.start()

    async def stop(self) -> None:
        await self._servers.stop()

    async def stream_leader(self, stream: str) -> EmbeddedNatsServer:
        """The server leading ``stream``."""
        nc = await nats.connect(servers=self.urls, connect_timeout=2)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        leader = info.cluster.leader if info.cluster else None
        if leader is None:
            raise AssertionError(f"no leader known for {stream}: {info.cluster}")
        return self._servers.by_name(leader)


@pytest.fixture(name="nats_cluster")
async def _nats_cluster(tmp_path: Path, nats_server_binary: str) -> AsyncIterator[NatsCluster]:
    """A started 3-node JetStream cluster on loopback, stopped after the test (the
    ``nats_server_binary`` fixture fails the test at once when the binary is missing)."""
    cluster = NatsCluster(tmp_path)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
