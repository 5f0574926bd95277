"""The nats-servers a storage mode's workers talk to: one embedded server, or a loopback cluster.

A module of its own because starting a cluster is more than starting three servers: the route
ports must be known up front (each server names the others), and the cluster is usable only
once it can create a replicated stream, some time after every server listens.

``NatsServers.single`` is the server the bench has always started (random port, JetStream as
deployed); ``NatsServers.cluster`` starts ``size`` clustered servers on 127.0.0.1, each with its
own store directory, and waits until an R``size`` stream can be created. Both give the URL to
pass to ``ndo serve --nats-url`` (every server, comma-separated), the URL the load generators
and the harness use (the first server), and every server's pid (their CPU is sampled together).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Final

import nats
import nats.errors
import nats.js.api as js_api
import nats.js.errors

from ndo.ops._errors import BenchError
from ndo.ops._nats_server import ClusterSpec, EmbeddedNatsServer

__all__ = ["NatsServers", "free_ports"]

_CLUSTER_READY_TIMEOUT: Final = 60.0
"""Seconds a fresh cluster may take to elect a meta leader and accept a replicated stream."""
_READY_STREAM: Final = "NDO_BENCH_READY"
"""The throw-away stream the readiness check creates and deletes."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held open together, so they
    differ)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class NatsServers:
    """One nats-server, or a cluster of them on loopback, started and stopped together."""

    servers: list[EmbeddedNatsServer]
    """The servers, in the order of ``url``."""

    def __init__(self, servers: list[EmbeddedNatsServer]) -> None:
        """Wrap ``servers`` (not started); use ``single`` or ``cluster``."""
        self.servers = servers

    @classmethod
    def single(cls, store_dir: Path, *, jetstream: bool) -> NatsServers:
        """One server on a random port with its store in ``store_dir``."""
        return cls([EmbeddedNatsServer(store_dir=store_dir, port=0, jetstream=jetstream)])

    @classmethod
    def cluster(cls, root: Path, size: int) -> NatsServers:
        """``size`` clustered servers with JetStream, their stores in ``root/n<i>``."""
        ports = free_ports(2 * size)
        client, route = ports[:size], ports[size:]
        return cls(
            [
                EmbeddedNatsServer(
                    store_dir=root / f"n{i}",
                    port=client[i],
                    cluster=ClusterSpec(
                        server_name=f"n{i}",
                        port=route[i],
                        routes=tuple(f"127.0.0.1:{route[j]}" for j in range(size) if j != i),
                    ),
                )
                for i in range(size)
            ]
        )

    @property
    def clustered(self) -> bool:
        """Whether these servers form a cluster."""
        return len(self.servers) > 1

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated: what ``ndo serve --nats-url`` takes."""
        return ",".join(server.url for server in self.servers)

    @property
    def client_url(self) -> str:
        """The first server's URL: where the load generators and the harness connect."""
        return self.servers[0].url

    @property
    def pids(self) -> list[int]:
        """Pids of the servers that are running."""
        return [server.pid for server in self.servers if server.pid is not None]

    def by_name(self, name: str) -> EmbeddedNatsServer:
        """The cluster member called ``name`` (``n0``, ``n1``, ...).

        Raises:
            BenchError: no member has that name.
        """
        for i, server in enumerate(self.servers):
            if name == f"n{i}":
                return server
        raise BenchError(f"no server called {name!r} in this cluster")

    async def start(self) -> None:
        """Start every server; a cluster also waits until it accepts a replicated stream.

        Raises:
            BenchError: a server did not start, or the cluster did not become ready in time.
        """
        try:
            await asyncio.gather(*(server.start() for server in self.servers))
        except Exception as exc:
            await self.stop()
            raise BenchError(f"nats-server did not start: {exc}") from None
        if self.clustered:
            try:
                await self._wait_cluster_ready()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        """Stop every server (idempotent)."""
        await asyncio.gather(*(server.stop() for server in self.servers), return_exceptions=True)

    async def _wait_cluster_ready(self) -> None:
        """Wait until the cluster can create (and delete) a stream with one replica per
        server."""
        nc = await nats.connect(servers=[s.url for s in self.servers], connect_timeout=5)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + _CLUSTER_READY_TIMEOUT
            while True:
                try:
                    await js.add_stream(
                        js_api.StreamConfig(
                            name=_READY_STREAM,
                            subjects=["ndo-bench.ready"],
                            num_replicas=len(self.servers),
                        )
                    )
                    await js.delete_stream(_READY_STREAM)
                    return
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                    if time.monotonic() >= deadline:
                        raise BenchError(
                            f"the {len(self.servers)}-server cluster did not accept a "
                            f"replicated stream within {_CLUSTER_READY_TIMEOUT:g}s: {exc!r}"
                        ) from None
                    await asyncio.sleep(0.25)
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()
