"""``LocalPartitions``: what taking up or giving up a partition means on this worker.

The ownership (``service._ownership``) decides *which* partitions this worker serves; this is the
``PartitionHost`` it acts through: subscribe to a partition's requests (through ingress), fence
the partition in storage before serving it, drop its objects when it goes, and tell the alarm
scheduler and the log what is served now.

Objects of a partition that went away while they were busy ("leftovers") finish what they had
queued (their writes are fenced); the partition is not fenced for a new tenure until they are
idle, so two tenures of one partition never run turns at once on this worker.

``on_stop``: when a partition leaves the served set (its hand-over began: it drains with its
epoch still held), its objects' ``on_stop`` hooks are queued, so they run and commit before the
partition is released; objects of a partition dropped without a drain run theirs as leftovers,
whose writes are fenced once another worker claimed it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Final

import structlog

from ndo.service._activation import Activation
from ndo.service._alarms import AlarmScheduler
from ndo.service._assignment import partitions_text
from ndo.service._catalog import Catalog
from ndo.service._ingress import Ingress
from ndo.service._inspector import Inspector
from ndo.service._replicated import ReplicatedStorage
from ndo.storage import Storage, StorageError

__all__ = ["LocalPartitions"]

_log = structlog.get_logger("ndo.worker")

_SUMMARY_DELAY: Final = 0.5
"""Seconds partition moves settle before the worker logs what it serves now."""


class LocalPartitions:
    """The worker side of partition ownership (implements ``PartitionHost``)."""

    # Configuration
    name: str
    """The worker's name (in lease records and fences)."""
    _leftover_wait: float
    """Longest wait for a previous tenure's busy objects before claiming a partition again."""
    # Collaborators
    _ingress: Ingress
    _inspector: Inspector
    """Answers ``ndo inspect`` for the partitions subscribed here."""
    _catalog: Catalog
    _storage: Storage
    _alarms: AlarmScheduler
    # State
    _leftovers: dict[int, list[Activation]]
    """Busy objects of partitions that were taken away, until they are idle."""
    _summary: asyncio.TimerHandle | None
    """Pending "serving partitions" log line."""
    _summarised: frozenset[int]
    """Partitions the last summary reported."""
    _serving: frozenset[int]
    _closed: bool

    def __init__(
        self,
        name: str,
        *,
        ingress: Ingress,
        inspector: Inspector,
        catalog: Catalog,
        storage: Storage,
        alarms: AlarmScheduler,
        handler_timeout: float,
    ) -> None:
        """Describe the worker ``name``'s side of ownership."""
        self.name = name
        self._leftover_wait = 2 * handler_timeout + 5.0
        self._ingress = ingress
        self._inspector = inspector
        self._catalog = catalog
        self._storage = storage
        self._alarms = alarms
        self._leftovers = {}
        self._summary = None
        self._summarised = frozenset()
        self._serving = frozenset()
        self._closed = False

    @property
    def busy_leftovers(self) -> int:
        """Leftover objects still busy (shutdown waits for them too)."""
        return sum(1 for objects in self._leftovers.values() for a in objects if not a.idle)

    def close(self) -> None:
        """No more summaries (at shutdown)."""
        self._closed = True
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None

    # PartitionHost

    async def subscribe(self, partition: int) -> None:
        """Receive ``partition``'s requests (and ``ndo inspect``'s)."""
        await self._ingress.subscribe(partition)
        await self._inspector.subscribe(partition)

    async def subscribe_all(self) -> None:
        """Receive every partition's requests (and ``ndo inspect``'s)."""
        await self._ingress.subscribe_all()
        await self._inspector.subscribe_all()

    def unsubscribe(self, partitions: Collection[int]) -> None:
        """Stop receiving the requests of ``partitions``."""
        self._ingress.unsubscribe(partitions)
        self._inspector.unsubscribe(partitions)

    async def claim(self, partitions: Collection[int], epoch: int | None) -> dict[int, int]:
        """Wait for leftovers of an earlier tenure, then fence ``partitions`` in storage.

        Raises:
            StorageError: leftovers stayed busy too long, or storage failed.
            FencedError: storage holds a newer epoch than ``epoch``.
        """
        deadline = time.monotonic() + self._leftover_wait
        for partition in partitions:
            leftovers = self._leftovers.get(partition, [])
            while any(not a.idle for a in leftovers):
                if time.monotonic() >= deadline:
                    raise StorageError(
                        f"objects of partition {partition} from its previous tenure are still busy"
                    )
                await asyncio.sleep(0.01)
            self._leftovers.pop(partition, None)
        return await self._storage.claim_partitions(partitions, self.name, epoch)

    def log_position(self, partition: int) -> int | None:
        """The last log record applied for ``partition`` (None: local storage keeps no log)."""
        if isinstance(self._storage, ReplicatedStorage):
            return self._storage.position(partition)
        return None

    def busy_partitions(self) -> set[int]:
        """Partitions with queued, running or uncommitted turns."""
        return self._catalog.busy_partitions()

    def drop(self, partition: int) -> None:
        """Deactivate ``partition``'s objects; busy ones are remembered until idle."""
        busy = self._catalog.deactivate_partition(partition)
        if busy:
            self._leftovers.setdefault(partition, []).extend(busy)
        for p, objects in list(self._leftovers.items()):  # forget the ones that finished
            still_busy = [a for a in objects if not a.idle]
            if still_busy:
                self._leftovers[p] = still_busy
            else:
                del self._leftovers[p]

    def partitions_changed(self, serving: frozenset[int]) -> None:
        """The served partitions changed: run ``on_stop`` of the objects of partitions no
        longer served (they drain, or were dropped already), let held requests and the alarm
        scheduler look again, and log a summary once the moves of the moment have settled (one
        line, not one per partition)."""
        for partition in self._serving - serving:
            self._catalog.stop_partition(partition)
        self._serving = serving
        self._ingress.partitions_changed()
        self._alarms.partitions_changed()
        if self._summary is None and not self._closed:
            self._summary = asyncio.get_running_loop().call_later(_SUMMARY_DELAY, self._log_summary)

    def _log_summary(self) -> None:
        self._summary = None
        serving = self._serving
        gained = sorted(serving - self._summarised)
        lost = sorted(self._summarised - serving)
        self._summarised = serving
        if gained or lost:
            _log.info(
                "serving partitions",
                worker=self.name,
                count=len(serving),
                partitions=partitions_text(serving),
                acquired=partitions_text(gained),
                released=partitions_text(lost),
            )
