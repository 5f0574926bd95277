"""The storage modes ``ndo bench --storage`` compares: where a worker's partitions are durable.

``local``
    ``ndo serve`` as before: one SQLite file in the data directory (``synchronous=FULL``), on
    the bench's own nats-server (JetStream only for leases and the journal).
``r1``
    ``--storage replicated --replicas 1`` on a single server of its own (a deployment is one
    storage mode): every group commit appends one record per touched partition to the
    ``NDO_LOG`` stream and replies once JetStream has it; the worker's SQLite file is only its
    copy.
``r3``
    ``--storage replicated --replicas 3`` on a 3-server cluster on loopback that the harness
    starts for it: every append waits for a quorum of the three servers.

A module of its own so the plan (names), the harness (which servers, which flags) and the report
(the order of the comparison) read one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["STORAGE_MODES", "StorageMode", "storage_mode"]


@dataclass(frozen=True, slots=True)
class StorageMode:
    """One way of storing partitions, and what it takes to run a worker that way."""

    name: str
    """``local``, ``r1`` or ``r3``: the ``--storage`` value and the rows' ``storage``."""
    replicas: int
    """Replicas of the partition log (0: no log, local SQLite)."""
    servers: int
    """nats-servers the worker runs against (1: the bench's own server; more: a cluster)."""
    description: str
    """One line for people."""

    @property
    def replicated(self) -> bool:
        """Whether partitions are durable in a JetStream log rather than in local SQLite."""
        return self.replicas > 0

    def worker_flags(self) -> dict[str, str]:
        """The ``ndo serve`` options that select this mode."""
        if not self.replicated:
            return {}
        return {"storage": "replicated", "replicas": str(self.replicas)}


_MODES: Final = (
    StorageMode("local", 0, 1, "SQLite in the data directory, fsync per group commit"),
    StorageMode("r1", 1, 1, "replicated: JetStream partition log, 1 replica (one server)"),
    StorageMode("r3", 3, 3, "replicated: JetStream partition log, 3 replicas (loopback cluster)"),
)

STORAGE_MODES: Final = tuple(mode.name for mode in _MODES)
"""Mode names, in the order a run measures them (``local`` first: the others' reference)."""


def storage_mode(name: str) -> StorageMode:
    """The mode called ``name``.

    Raises:
        ValueError: there is no such mode (the message lists them).
    """
    for mode in _MODES:
        if mode.name == name:
            return mode
    raise ValueError(f"unknown storage mode {name!r}; choose from {', '.join(STORAGE_MODES)}")
