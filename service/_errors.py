"""The worker runtime's errors (what callers of ``Worker.start`` may need to catch).

    ServiceError (RuntimeError)
    ├── OwnershipError            partition leases cannot work as configured
    │   └── DeploymentMismatchError   another partition count than the running deployment
    └── RoutingError              the server's subject mapping disagrees with the deployment

All are deterministic: fix the configuration or the server; retrying cannot help. Errors about a
single request are ``actors.ActorError`` subclasses, and storage failures ``StorageError``.
"""

from __future__ import annotations

__all__ = ["DeploymentMismatchError", "OwnershipError", "RoutingError", "ServiceError"]


class ServiceError(RuntimeError):
    """Base of the worker runtime's errors; the message says what to fix."""


class OwnershipError(ServiceError):
    """Partition ownership cannot work as configured. Deterministic: fix the configuration or
    the server; retrying cannot help."""


class DeploymentMismatchError(OwnershipError):
    """This worker's configuration disagrees with the running deployment (partition count)."""


class RoutingError(ServiceError):
    """The server's subject mapping disagrees with the deployment. Deterministic: fix the
    server's mapping (``ndo mapping`` prints the right one) or the worker's ``--partitions``."""
