"""Partition ownership behind one interface: which partitions this worker serves, at which epoch.

Why a module of its own: this is the one place that decides how a worker comes to serve
partitions, so the rest of the worker never asks *how*. Two implementations:

``ServeAll``
    This worker serves every partition alone (the server has no JetStream, or
    ``ownership="standalone"``). It fences every partition in storage at start.
``LeaseOwnership`` (``service._leases``)
    Partitions are leased in a JetStream KV bucket and shared with the other workers of the
    deployment; they move when workers join, leave or die.

``open_ownership`` (in ``service._leases``) picks one. The worker asks the hot-path questions
(``accepts``, ``epoch_of``, ``held_elsewhere``); the ownership acts on the worker only through
``PartitionHost``: subscribe to a partition's requests, claim its fence in storage, drop its
objects, say what is served.
``NOT_SERVING`` stands in before a worker has started: it serves nothing.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final, Protocol

__all__ = [
    "NOT_SERVING",
    "Ownership",
    "PartitionHost",
    "ServeAll",
]


class PartitionHost(Protocol):
    """What an ownership needs from its worker."""

    name: str
    """The worker's name (in lease records and fences)."""

    async def subscribe(self, partition: int) -> None:
        """Start receiving ``partition``'s requests (answered 503 until it is served)."""
        ...

    async def subscribe_all(self) -> None:
        """Receive the requests of every partition through one subscription."""
        ...

    def unsubscribe(self, partitions: Collection[int]) -> None:
        """Stop receiving the requests of ``partitions`` (at once; what was already received
        still runs through ingress)."""
        ...

    async def claim(self, partitions: Collection[int], epoch: int | None) -> dict[int, int]:
        """Make ``partitions`` ready to serve: wait for leftovers of an earlier tenure, then
        record the fencing epoch in storage (``None``: one above any stored) and return it per
        partition.

        Raises:
            FencedError: storage holds a newer epoch than ``epoch``.
        """
        ...

    def busy_partitions(self) -> set[int]:
        """Partitions with queued, running or uncommitted turns."""
        ...

    def drop(self, partition: int) -> None:
        """Deactivate every object of ``partition`` (busy ones finish; their writes fail)."""
        ...

    def partitions_changed(self, serving: frozenset[int]) -> None:
        """The served set is now ``serving`` (alarms look again; a summary is logged)."""
        ...

    def log_position(self, partition: int) -> int | None:
        """The last partition log record applied here (None: storage keeps no log)."""
        ...


class Ownership(Protocol):
    """Which partitions this worker serves, and with which fencing epoch."""

    @property
    def member_id(self) -> str | None:
        """This worker's id among the deployment's members (None when it serves alone)."""
        ...

    @property
    def serving(self) -> frozenset[int]:
        """Partitions served now."""
        ...

    def accepts(self, partition: int) -> bool:
        """Whether requests and alarms of ``partition`` may run here right now."""
        ...

    def epoch_of(self, partition: int) -> int:
        """Fencing epoch for writes to ``partition``; -1 (always fenced) when not held."""
        ...

    def held_elsewhere(self, partition: int) -> bool:
        """Whether another worker holds ``partition`` (a request for it can be forwarded)."""
        ...

    def acquiring(self, partition: int) -> bool:
        """Whether this worker is taking ``partition`` up right now (a request for it may wait
        a moment instead of being refused)."""
        ...

    async def start(self) -> None:
        """Begin serving (and, with leases, join the deployment)."""
        ...

    async def leave(self) -> None:
        """Hand every partition over before shutdown (drain, then release)."""
        ...

    async def close(self) -> None:
        """Stop everything in the background; no more hand-over."""
        ...

    def on_reconnect(self) -> None:
        """The NATS connection came back."""
        ...

    def lost(self, partition: int, reason: str) -> None:
        """Storage found ``partition`` cannot be served from here any more (its log moved on,
        or its copy must be re-read): stop serving it at once."""
        ...

    def set_routing(self, routing: str) -> None:
        """The routing mode changed (published to the other members)."""
        ...


class _NotServing:
    """The ownership of a worker that has not started: it serves nothing."""

    member_id: Final = None
    serving: Final = frozenset[int]()

    def accepts(self, partition: int) -> bool:
        """Never."""
        return False

    def epoch_of(self, partition: int) -> int:
        """Always fenced."""
        return -1

    def held_elsewhere(self, partition: int) -> bool:
        """Unknown: no."""
        return False

    def acquiring(self, partition: int) -> bool:
        """Nothing is being taken up."""
        return False

    async def start(self) -> None:
        """Nothing to start."""

    async def leave(self) -> None:
        """Nothing to hand over."""

    async def close(self) -> None:
        """Nothing to close."""

    def on_reconnect(self) -> None:
        """Nothing to do."""

    def lost(self, partition: int, reason: str) -> None:
        """Nothing is served."""

    def set_routing(self, routing: str) -> None:
        """Nothing to publish."""


NOT_SERVING: Final[Ownership] = _NotServing()
"""Ownership before start: no partition is served, every write is fenced."""


class ServeAll:
    """One worker serves every partition alone: no leases, no hand-over.

    Two workers of this kind on one deployment would both serve everything; the fences in
    storage still keep writes safe (each start raises every partition's epoch, fencing the
    other), but callers would see errors: run one.
    """

    # Configuration
    _host: PartitionHost
    _partitions: int
    # State
    _epochs: dict[int, int]
    _serving: frozenset[int]

    def __init__(self, host: PartitionHost, partitions: int) -> None:
        """Describe serving ``partitions`` partitions through ``host``; ``start`` does it."""
        self._host = host
        self._partitions = partitions
        self._epochs = {}
        self._serving = frozenset()

    @property
    def member_id(self) -> None:
        """No membership: this worker serves alone."""
        return None

    @property
    def serving(self) -> frozenset[int]:
        """Every partition, once started."""
        return self._serving

    def accepts(self, partition: int) -> bool:
        """Every partition, once started."""
        return partition in self._epochs

    def epoch_of(self, partition: int) -> int:
        """The epoch claimed at start."""
        return self._epochs.get(partition, -1)

    def held_elsewhere(self, partition: int) -> bool:
        """Never: nobody else serves this deployment."""
        return False

    def acquiring(self, partition: int) -> bool:
        """Never: every partition is claimed before the first request is taken."""
        return False

    async def start(self) -> None:
        """Fence every partition in storage with a new epoch, then take every request."""
        self._epochs = await self._host.claim(range(self._partitions), None)
        self._serving = frozenset(self._epochs)
        await self._host.subscribe_all()

    async def leave(self) -> None:
        """Nothing to hand over: the worker drains its objects itself."""

    async def close(self) -> None:
        """Nothing runs in the background."""

    def on_reconnect(self) -> None:
        """Nothing depends on the connection."""

    def lost(self, partition: int, reason: str) -> None:
        """Only replicated storage loses partitions, and it never runs standalone."""

    def set_routing(self, routing: str) -> None:
        """Nobody to tell."""
