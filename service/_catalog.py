"""The activation table: which objects are in memory, created once per id, evicted LRU or idle.

``max_active`` is a hard bound: when every object in memory is busy (queued, running or
committing) a new one is refused with 503 "overloaded" instead of growing the table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from ndo.actors import ActorId, UnavailableError
from ndo.actors.runtime import ActorClassInfo
from ndo.service._activation import Activation, ActivationServices
from ndo.subjects import partition_of

__all__ = ["Catalog"]

_EVICTION_SCAN: int = 64
"""Most entries examined per insert when over capacity (busy objects are skipped)."""


class Catalog:
    """Activations by ``ActorId``, in least-recently-used order."""

    # Configuration
    _partitions: int
    _max_active: int
    """Activations kept before the least recently used idle ones are evicted."""
    _idle_timeout: float
    """Seconds without messages after which an idle activation is evicted."""
    # Collaborators
    _services: ActivationServices
    # State
    _table: OrderedDict[ActorId, Activation]

    def __init__(
        self,
        services: ActivationServices,
        *,
        partitions: int,
        max_active: int,
        idle_timeout: float,
    ) -> None:
        """Create an empty catalog whose activations share ``services``."""
        self._services = services
        self._partitions = partitions
        self._max_active = max_active
        self._idle_timeout = idle_timeout
        self._table = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[Activation]:
        return iter(list(self._table.values()))

    def get(self, address: ActorId) -> Activation | None:
        """Return the activation of ``address`` if it is in memory."""
        return self._table.get(address)

    def activate(
        self, info: ActorClassInfo, object_id: str, partition: int | None = None
    ) -> Activation:
        """Return the object's activation, creating it if needed.

        Synchronous (no await), so concurrent arrivals can never activate an id twice.
        ``partition`` saves recomputing the object's partition when the caller knows it.

        Raises:
            UnavailableError: ``max_active`` objects are in memory and none of them is idle.
        """
        address = ActorId(info.name, object_id)
        activation = self._table.get(address)
        if activation is not None:
            self._table.move_to_end(address)
            return activation
        if partition is None:
            partition = partition_of(info.name, object_id, self._partitions)
        # Make room before inserting: the newcomer is idle until its first message is queued,
        # and must never be its own LRU victim (that message would land on an orphan).
        if len(self._table) >= self._max_active:
            over = len(self._table) + 1 - self._max_active
            evicted = self._evict_lru(over, scan=_EVICTION_SCAN)
            if evicted < over:  # the least recently used are busy: look through them all
                self._evict_lru(over - evicted, scan=len(self._table))
            if len(self._table) >= self._max_active:
                raise UnavailableError(
                    f"this worker holds {len(self._table)} objects in memory (--max-active) and "
                    "all are busy; retry with backoff",
                    type="overloaded",
                )
        activation = Activation(self._services, info, object_id, partition)
        self._table[address] = activation
        self._services.metrics.active_objects.set(len(self._table))
        return activation

    def _evict_lru(self, over: int, *, scan: int) -> int:
        """Evict up to ``over`` idle activations among the ``scan`` least recently used;
        return how many."""
        victims: list[Activation] = []
        for i, activation in enumerate(self._table.values()):
            if i >= scan or len(victims) >= over:
                break
            if activation.idle:
                victims.append(activation)
        for activation in victims:
            self._remove(activation, "lru")
        return len(victims)

    def evict_idle(self, now: float) -> int:
        """Evict objects idle since before ``now - idle_timeout``; return how many."""
        cutoff = now - self._idle_timeout
        victims: list[Activation] = []
        for activation in self._table.values():
            if activation.last_used > cutoff:
                break
            if activation.idle:
                victims.append(activation)
        for activation in victims:
            self._remove(activation, "idle")
        return len(victims)

    def evict_all_idle(self, reason: str = "shutdown") -> int:
        """Evict every idle activation (at shutdown); return how many."""
        victims = [a for a in self._table.values() if a.idle]
        for activation in victims:
            self._remove(activation, reason)
        return len(victims)

    def deactivate_partition(self, partition: int) -> list[Activation]:
        """Remove every activation of ``partition`` (its lease moved or ended).

        Idle ones are simply dropped. Busy ones are removed too, so no new message reaches
        them; they finish what they already queued, and their writes are fenced. They are
        returned so the caller can wait for them before serving the partition again.
        """
        victims = [a for a in self._table.values() if a.partition == partition]
        for activation in victims:
            self._remove(activation, "moved")
        return [a for a in victims if not a.idle]

    def busy_partitions(self) -> set[int]:
        """Partitions that have an activation with queued, running or uncommitted turns."""
        return {a.partition for a in self._table.values() if not a.idle}

    def _remove(self, activation: Activation, reason: str) -> None:
        del self._table[activation.address]
        activation.deactivate()
        metrics = self._services.metrics
        metrics.count(metrics.evictions, reason)
        metrics.active_objects.set(len(self._table))

    @property
    def busy(self) -> int:
        """Activations with queued, running or uncommitted turns."""
        return sum(1 for a in self._table.values() if not a.idle)
