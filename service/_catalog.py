"""The activation table: which objects are in memory, created once per id, evicted LRU or idle.

``max_active`` is a hard bound: when every object in memory is busy (queued, running or
committing) a new one is refused with 503 "overloaded" instead of growing the table.

An evicted object whose instance has an ``on_stop`` does not leave at once: its ``on_stop`` is
queued in its mailbox (``Activation.queue_stop``) and it leaves when that turn is over, unless
messages arrived meanwhile (a new instance serves them, and it stays). Until then it counts as
busy; the one activation per id holds throughout.
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
    _leaving: int
    """Evicted objects still in the table while their ``on_stop`` runs."""

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
        self._leaving = 0
        services.stopped = self._stopped

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
            over = len(self._table) + 1 - self._max_active - self._leaving
            if over > 0:  # (objects running on_stop before they leave make room already)
                evicted = self._evict_lru(over, scan=_EVICTION_SCAN)
                if evicted < over:  # the least recently used are busy: look through them all
                    self._evict_lru(over - evicted, scan=len(self._table))
            if len(self._table) >= self._max_active:
                raise UnavailableError(
                    f"this worker holds {len(self._table)} objects in memory (--max-active) and "
                    "all are busy (or running on_stop before they leave); retry with backoff",
                    type="overloaded",
                )
        activation = Activation(self._services, info, object_id, partition)
        self._table[address] = activation
        self._services.metrics.active_objects.set(len(self._table))
        return activation

    def _evict_lru(self, over: int, *, scan: int) -> int:
        """Evict up to ``over`` idle activations among the ``scan`` least recently used;
        return how many (removed, or leaving once their ``on_stop`` ran)."""
        victims: list[Activation] = []
        for i, activation in enumerate(self._table.values()):
            if i >= scan or len(victims) >= over:
                break
            if activation.idle:
                victims.append(activation)
        for activation in victims:
            self._evict(activation, "lru")
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
            self._evict(activation, "idle")
        return len(victims)

    def evict_all_idle(self, reason: str = "shutdown") -> int:
        """Remove every idle activation at once, running no ``on_stop`` (at the end of
        shutdown, after ``stop_all``); return how many."""
        victims = [a for a in self._table.values() if a.idle]
        for activation in victims:
            self._remove(activation, reason)
        return len(victims)

    def stop_all(self) -> int:
        """Queue ``on_stop`` for every object whose instance has one (at shutdown, once no new
        message can arrive); they stay in the table. Return how many were queued."""
        return sum(1 for a in list(self._table.values()) if a.queue_stop())

    def stop_partition(self, partition: int) -> None:
        """Queue ``on_stop`` for the objects of ``partition`` whose instance has one (its
        hand-over began: they run while it drains, its epoch still held); they stay in the
        table until ``deactivate_partition``."""
        for activation in [a for a in self._table.values() if a.partition == partition]:
            activation.queue_stop()

    def deactivate_partition(self, partition: int) -> list[Activation]:
        """Remove every activation of ``partition`` (its lease moved or ended).

        Idle ones without a live ``on_stop`` are simply dropped. The others are removed too,
        so no new message reaches them; they finish what they already queued, then run
        ``on_stop``, and their writes are fenced if the partition was claimed elsewhere
        meanwhile. They are returned so the caller can wait for them before serving the
        partition again.
        """
        victims = [a for a in self._table.values() if a.partition == partition]
        for activation in victims:
            self._remove(activation, "moved")
        for activation in victims:
            activation.queue_stop()
        return [a for a in victims if not a.idle]

    def busy_partitions(self) -> set[int]:
        """Partitions that have an activation with queued, running or uncommitted turns."""
        return {a.partition for a in self._table.values() if not a.idle}

    def _evict(self, activation: Activation, reason: str) -> None:
        """Remove an idle activation, or queue its ``on_stop`` and remove it when that is over
        (``_stopped``)."""
        self._leaving += 1  # first: an eager pump may run on_stop to its end right here
        if not activation.queue_stop(reason):
            self._leaving -= 1
            self._remove(activation, reason)

    def _stopped(self, activation: Activation) -> None:
        """The ``on_stop`` of an object evicted by ``_evict`` is over: it leaves, unless a
        message arrived meanwhile (queued, or served by a new instance)."""
        self._leaving -= 1
        if self._table.get(activation.address) is activation and activation.spent:
            self._remove(activation, activation.leaving)

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
