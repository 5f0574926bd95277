"""The activation table: which objects are in memory, created once per id, evicted LRU or idle."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from actors import ActorClassInfo, ActorId
from service._activation import Activation, Host
from subjects import partition_of

__all__ = ["Catalog"]

_EVICTION_SCAN: int = 64
"""Most entries examined per insert when over capacity (busy objects are skipped)."""


class Catalog:
    """Activations by ``ActorId``, in least-recently-used order."""

    # Collaborators
    _host: Host
    # State
    _table: OrderedDict[ActorId, Activation]

    def __init__(self, host: Host) -> None:
        """Create an empty catalog for ``host``'s activations."""
        self._host = host
        self._table = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[Activation]:
        return iter(list(self._table.values()))

    def get(self, address: ActorId) -> Activation | None:
        """Return the activation of ``address`` if it is in memory."""
        return self._table.get(address)

    def activate(self, info: ActorClassInfo, object_id: str) -> Activation:
        """Return the object's activation, creating it if needed.

        Synchronous (no await), so concurrent arrivals can never activate an id twice.
        """
        address = ActorId(info.name, object_id)
        activation = self._table.get(address)
        if activation is not None:
            self._table.move_to_end(address)
            return activation
        partition = partition_of(info.name, object_id, self._host.config.partitions)
        activation = Activation(self._host, info, object_id, partition)
        self._table[address] = activation
        self._host.metrics.active_objects.set(len(self._table))
        if len(self._table) > self._host.config.max_active:
            self._evict_lru()
        return activation

    def _evict_lru(self) -> None:
        over = len(self._table) - self._host.config.max_active
        victims: list[Activation] = []
        for i, activation in enumerate(self._table.values()):
            if i >= _EVICTION_SCAN or len(victims) >= over:
                break
            if activation.idle:
                victims.append(activation)
        for activation in victims:
            self._remove(activation, "lru")

    def evict_idle(self, now: float) -> int:
        """Evict objects idle since before ``now - idle_timeout``; return how many."""
        cutoff = now - self._host.config.idle_timeout
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

    def _remove(self, activation: Activation, reason: str) -> None:
        del self._table[activation.address]
        activation.deactivate()
        self._host.metrics.evictions.labels(reason).inc()
        self._host.metrics.active_objects.set(len(self._table))

    @property
    def busy(self) -> int:
        """Activations with queued, running or uncommitted turns."""
        return sum(1 for a in self._table.values() if not a.idle)
