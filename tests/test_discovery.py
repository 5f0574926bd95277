"""Workers are visible to standard NATS tooling through the service API (``nats micro ls``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client as NatsClient

from ndo.service import Worker
from tests.helpers import run_ndo
from tests.worker_fixtures import WorkerFactory


async def test_ping_and_info_name_the_worker(worker: Worker, nc: NatsClient) -> None:
    """``$SRV.INFO.ndo`` answers with the worker's name, prefix and classes."""
    info = json.loads((await nc.request("$SRV.INFO.ndo", b"", timeout=2)).data)
    assert info["name"] == "ndo"
    assert info["metadata"]["worker"] == worker.name
    assert info["metadata"]["prefix"] == worker.config.prefix
    assert "Counter" in info["metadata"]["classes"].split(",")
    ping = json.loads((await nc.request("$SRV.PING.ndo", b"", timeout=2)).data)
    assert ping["type"] == "io.nats.micro.v1.ping_response"


async def test_stopped_worker_leaves_discovery(start_worker: WorkerFactory, nc: NatsClient) -> None:
    """Two workers answer a ping; after one stops, only the other does."""
    first = await start_worker()
    second = await start_worker()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING.ndo", b"", reply=inbox)
    names = {json.loads((await sub.next_msg(2)).data)["metadata"]["worker"] for _ in range(2)}
    assert names == {first.name, second.name}
    await first.stop()
    await nc.publish("$SRV.PING.ndo", b"", reply=inbox)
    assert json.loads((await sub.next_msg(2)).data)["metadata"]["worker"] == second.name
    await nc.flush()
    assert sub.pending_msgs == 0


class TestStatusWithoutLeases:
    """``ndo status`` on a server without JetStream lists the workers found by discovery."""

    async def test_lists_standalone_workers(
        self, make_nats_server: Any, start_worker: WorkerFactory
    ) -> None:
        """No lease bucket: exit 0 with the worker's name and classes, in text and JSON."""
        server = await make_nats_server(jetstream=False)
        worker = await start_worker(nats_url=server.url, worker_name="solo")
        assert worker.member_id is None  # serving alone, no leases
        result = await asyncio.to_thread(run_ndo, "status", "--nats-url", server.url)
        assert result.returncode == 0, result.stderr
        assert "no JetStream" in result.stdout
        assert "solo" in result.stdout and "Counter" in result.stdout
        result = await asyncio.to_thread(run_ndo, "status", "--json", "--nats-url", server.url)
        document = json.loads(result.stdout)
        assert document["standalone"] is True
        assert [w["name"] for w in document["workers"]] == ["solo"]

    async def test_nobody_there(self, make_nats_server: Any) -> None:
        """No lease bucket and no worker answering: exit 1, saying both."""
        server = await make_nats_server(jetstream=False)
        result = await asyncio.to_thread(run_ndo, "status", "--nats-url", server.url)
        assert result.returncode == 1
        assert "no JetStream" in result.stderr and "no worker answered" in result.stderr
