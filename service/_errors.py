"""The worker runtime's errors (what callers of ``Worker.start`` may need to catch).

    ServiceError (RuntimeError)
    ├── OwnershipError            partition leases cannot work as configured
    │   └── DeploymentMismatchError   another partition count than the running deployment
    ├── RoutingError              the server's subject mapping disagrees with the deployment
    └── OrphanClassesError        storage holds objects of classes no served module defines

All are deterministic: fix the configuration or the server; retrying cannot help. Errors about a
single request are ``actors.ActorError`` subclasses, and storage failures ``StorageError``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "DeploymentMismatchError",
    "OrphanClassesError",
    "OwnershipError",
    "RoutingError",
    "ServiceError",
]


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


class OrphanClassesError(ServiceError):
    """Storage holds objects of classes that none of the served modules defines, so the worker
    refuses to start rather than leave their data unreachable. Deterministic: serve the module
    that defines them, or declare a class migration (docs/migrations.md)."""

    classes: tuple[str, ...]
    """The stored classes nobody serves, sorted."""

    def __init__(self, classes: Iterable[str], served: Iterable[str]) -> None:
        self.classes = tuple(sorted(classes))
        names = ", ".join(self.classes)
        example = self.classes[0] if self.classes else "OldName"
        super().__init__(
            f"storage holds objects of class(es) {names} that no served module defines "
            f"(serving: {', '.join(sorted(served)) or 'nothing'}).\n"
            "The worker does not start, so that their data is not silently orphaned. Either:\n"
            f"  - serve the module that defines {'it' if len(self.classes) == 1 else 'them'} "
            "(ndo serve myapp.objects ...), or\n"
            "  - declare a class migration in the config file (ndo serve --config FILE), "
            "applied once at the next start:\n\n"
            "    [[migrations]]\n"
            '    tag = "v2"\n'
            f'    renamed_classes = [{{ from = "{example}", to = "NewName" }}]  # keep the data\n'
            f'    # or: deleted_classes = ["{example}"]  # delete its objects and alarms\n\n'
            "(docs/migrations.md)"
        )
