"""Workers are visible to standard NATS tooling through the service API (``nats micro ls``)."""

from __future__ import annotations

import json

from nats.aio.client import Client as NatsClient

from service import Worker
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
