"""How many replicas the JetStream assets of a deployment get, from the cluster we are on.

Every asset ndo creates (lease bucket, journal, partition logs, snapshots) is replicated like
the cluster: ``min(3, cluster size)`` unless the operator says otherwise. An R1 asset on a
cluster is a single point of failure: with the lease bucket at one replica, killing one server
of three left every object unreadable (``../shared/NATS-NOTES.md``).

The cluster's size comes from the server's INFO: a clustered server lists every server's client
URL in ``connect_urls``; a server outside a cluster has no ``cluster`` name.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NatsClient

from ndo.service._errors import ServiceError

__all__ = ["ReplicasError", "cluster_size", "resolve_replicas"]

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
