"""NATS service discovery: each worker answers ``$SRV.PING|INFO|STATS`` through nats-py micro.

This makes workers visible to standard tooling (``nats micro ls``, ``nats micro info ndo``)
without routing requests through micro: ndo's own ingress keeps serving the RPC subjects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from nats.aio.client import Client as NatsClient
from nats.micro import add_service
from nats.micro.service import Service

__all__ = ["SERVICE_NAME", "SERVICE_VERSION", "start_discovery"]

SERVICE_NAME: Final = "ndo"
"""Name workers register under (``nats micro info ndo``)."""
SERVICE_VERSION: Final = "0.1.0"
"""Version reported to the service API."""


async def start_discovery(
    nc: NatsClient, *, worker: str, prefix: str, classes: Iterable[str]
) -> Service:
    """Register this worker with the NATS service API; ``await service.stop()`` to leave."""
    return await add_service(
        nc,
        name=SERVICE_NAME,
        version=SERVICE_VERSION,
        description="NATS Durable Objects worker",
        metadata={
            "worker": worker,
            "prefix": prefix,
            "classes": ",".join(sorted(classes)),
            "rpc_subject": f"{prefix}.rpc.<Class>.<id>.<method>",
        },
    )
