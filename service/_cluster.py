"""How many replicas the JetStream assets of a deployment get, from the cluster we are on.

Every asset ndo creates (lease bucket, journal, partition logs, snapshots) is replicated like
the cluster: ``min(3, cluster size)`` unless the operator says otherwise. An R1 asset on a
cluster is a single point of failure: with the lease bucket at one replica, killing one server
of three left every object unreadable (``../shared/NATS-NOTES.md``).

The cluster's size comes from the server's INFO: a clustered server lists every server's client
URL in ``connect_urls``; a server outside a cluster has no ``cluster`` name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient

from ndo.service._errors import ServiceError

__all__ = [
    "NOT_READY",
    "ReplicasError",
    "cluster_size",
    "has_jetstream",
    "resolve_replicas",
    "supports_atomic_batches",
    "until_ready",
]

_log = structlog.get_logger("ndo.worker")

_T = TypeVar("_T")

NOT_READY: Final = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)
"""What JetStream answers about an asset that exists but cannot serve yet: a stream another
worker has just created whose replicas are still electing a leader (its requests time out, or
get 503), or a cluster whose meta leader is being elected."""

_READY_TIMEOUT: Final = 30.0
"""Seconds a worker waits at start for an asset to become ready before it gives up."""

_MAX_DEFAULT_REPLICAS = 3


class ReplicasError(ServiceError):
    """The requested replica count cannot be satisfied by this cluster. Deterministic: change
    ``--replicas`` or add servers."""


def cluster_size(nc: NatsClient) -> int:
    """Servers in the cluster of the server ``nc`` is connected to (1 outside a cluster)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    if not info.get("cluster"):
        return 1
    urls = info.get("connect_urls") or []
    return max(1, len(urls))


def resolve_replicas(requested: int, nc: NatsClient) -> int:
    """The replica count to create assets with: ``requested``, or (0) the cluster's size up
    to 3.

    Raises:
        ReplicasError: ``requested`` is larger than the cluster.
    """
    size = cluster_size(nc)
    if requested == 0:
        return min(_MAX_DEFAULT_REPLICAS, size)
    if requested > size:
        raise ReplicasError(
            f"--replicas {requested} needs a JetStream cluster of at least {requested} servers, "
            f"but the server this worker reached is in a cluster of {size}; start with "
            f"--replicas {min(_MAX_DEFAULT_REPLICAS, size)} (or leave it out), or add servers"
        )
    return requested


def supports_atomic_batches(nc: NatsClient) -> bool:
    """Whether the connected server takes atomic batch publishes (nats-server 2.12+)."""
    try:
        version = nc.connected_server_version
        return (version.major, version.minor) >= (2, 12)
    except (ValueError, TypeError):  # an unparsable version string
        return False


def has_jetstream(nc: NatsClient) -> bool:
    """Whether the server ``nc`` is connected to says (in its INFO) that it runs JetStream."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    return bool(info.get("jetstream"))


async def until_ready(
    nc: NatsClient,
    step: Callable[[], Awaitable[_T]],
    *,
    what: str,
    within: float = _READY_TIMEOUT,
) -> _T:
    """Run ``step`` until it gets past ``NOT_READY`` errors, for at most ``within`` seconds.

    Workers started together on a fresh cluster find each other's just-created streams without a
    leader for a few seconds; this waits for them instead of exiting with ``nats: timeout``. On
    a server without JetStream (``has_jetstream``) those errors are final: ``step`` runs once.

    Raises:
        The last ``NOT_READY`` error once ``within`` has passed (at once without JetStream);
        any other error at once.
    """
    if not has_jetstream(nc):
        return await step()
    deadline = time.monotonic() + within
    delay = 0.1
    while True:
        try:
            return await step()
        except NOT_READY as exc:
            if time.monotonic() + delay > deadline:
                raise
            _log.info("waiting for JetStream to be ready", asset=what, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)
