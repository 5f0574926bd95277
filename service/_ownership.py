"""Partition ownership: membership and leases in a JetStream KV bucket, and hand-over.

Why a module of its own: this is the one place that decides which worker serves which
partition. The worker asks it two questions on the hot path (``accepts(p)``, ``epoch_of(p)``)
and implements a small ``OwnershipHost`` interface it calls back (subscribe, claim, drain,
drop); everything else — the KV bucket, renewals, the assignment — stays in here.

The bucket ``<prefix>-leases`` (``lease_bucket``) holds:

``config``
    ``{"partitions": N, "epoch_base": B}``, written once by the first worker. A worker
    configured with another partition count is refused (``DeploymentMismatchError``).
``members.<member id>``
    One per live worker, with a per-key TTL, renewed every ``lease_ttl / 3``.
``leases.<p>``
    The lease of partition ``p``: ``{"owner": <member id>, "epoch": E}``, per-key TTL, renewed
    by publishing directly to the key's subject with ``Nats-Expected-Last-Subject-Sequence``
    (compare-and-set) and ``Nats-TTL``. The bucket has ``limit_marker_ttl`` so an expiry is
    seen by every watcher at once.

Epochs: a lease acquired at KV revision ``r`` has epoch ``B + r``. KV revisions are stream
sequences, so every later acquisition of any partition has a higher epoch; the holder records
the epoch in SQLite (``Storage.claim_partitions``) *before* it serves, and every commit checks it
inside its transaction. A worker that lost its lease without knowing (paused, cut off) cannot
commit: timing never decides safety. ``B`` is the bucket's creation time in microseconds, so a
bucket that is deleted and re-created still issues epochs above every earlier one.

Assignment: every worker computes the same balanced rendezvous assignment over the live
members (``assign_partitions``). A worker drains and releases the partitions it should not hold
(stops taking their messages — new ones get 503 "moving" and are retried by the client —
waits for their queued turns and commits, deactivates their objects, deletes the lease) and
acquires the free ones it should hold. A lease whose holder died expires after ``lease_ttl``.
Locally a worker stops serving a partition as soon as its own clock says the lease may have
expired (``accepts``), and drops it when a renewal finds the lease taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, Protocol

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter, Gauge

from ndo.service._errors import DeploymentMismatchError, OwnershipError
from ndo.storage import FencedError, StorageError

__all__ = [
    "CONFIG_KEY",
    "DeploymentMismatchError",
    "DeploymentRecord",
    "LeaseRecord",
    "LeaseState",
    "MemberRecord",
    "OwnershipError",
    "OwnershipHost",
    "OwnershipManager",
    "assign_partitions",
    "lease_bucket",
    "lease_key",
    "member_key",
    "partitions_text",
]

_log = structlog.get_logger("ndo.ownership")

CONFIG_KEY: Final = "config"
"""KV key of the deployment record."""
_MEMBER_PREFIX: Final = "members."
_LEASE_PREFIX: Final = "leases."
_MARKER_TTL: Final = 60.0
"""Seconds an expiry or purge marker stays in the bucket (watchers see it at once)."""
_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_CAS_CONFLICT: Final = (10071, 10164)
"""JetStream error codes of a failed compare-and-set (wrong last sequence)."""
_DRAIN_POLL: Final = 0.02
"""Seconds between checks of draining partitions."""

_TRANSIENT = (nats.errors.Error, OSError, TimeoutError)
"""Failures a later step may not see again (server restarting, network)."""


class LeaseState(Enum):
    """Where this worker is with one partition it holds a lease on."""

    ACQUIRING = "acquiring"
    """Lease written; claiming the fence in storage. Not serving yet."""
    SERVING = "serving"
    """Serving requests and alarms."""
    DRAINING = "draining"
    """New messages get 503 "moving"; queued turns and commits finish."""
    RELEASING = "releasing"
    """Objects deactivated; the lease is being deleted."""


class DeploymentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ``config`` key: facts fixed for the life of a deployment."""

    partitions: int
    epoch_base: int
    """Added to a lease's KV revision to form its fencing epoch."""
    created: float = 0.0
    """Epoch seconds when the bucket was set up."""


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A ``members.<id>`` value: one live worker."""

    id: str
    name: str
    host: str = ""
    pid: int = 0
    started: float = 0.0
    routing: str = ""
    """Routing mode the worker detected (``mapped`` or ``forward``)."""


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A ``leases.<p>`` value."""

    owner: str
    """Member id of the holder."""
    name: str = ""
    """Worker name of the holder (for people)."""
    epoch: int = 0
    """Fencing epoch; 0 in the acquiring write itself, whose epoch is ``epoch_base + revision``."""


_ENCODER: Final = msgspec.json.Encoder()
_CONFIG_DECODER: Final = msgspec.json.Decoder(DeploymentRecord)
_MEMBER_DECODER: Final = msgspec.json.Decoder(MemberRecord)
_LEASE_DECODER: Final = msgspec.json.Decoder(LeaseRecord)


def lease_bucket(prefix: str) -> str:
    """Name of the KV bucket holding a deployment's leases and members."""
    return f"{prefix.replace('.', '_')}-leases"


def lease_key(partition: int) -> str:
    """KV key of a partition's lease."""
    return f"{_LEASE_PREFIX}{partition}"


def member_key(member_id: str) -> str:
    """KV key of a member's record."""
    return f"{_MEMBER_PREFIX}{member_id}"


def _score(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{member}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_partitions(members: Collection[str], partitions: int) -> dict[int, str]:
    """The partition -> member assignment every worker computes from the same member set.

    Rendezvous hashing with a load cap: pairs (member, partition) are taken in order of their
    hash score, each partition going to the best-scoring member that still has room (every
    member gets ``partitions // members`` or one more). Deterministic, balanced to within one
    partition, and a change of membership moves little more than the share of the member that
    came or went.
    """
    if not members:
        return {}
    ordered = sorted(members)
    floor, extra = divmod(partitions, len(ordered))
    pairs = sorted(((_score(m, p), p, m) for m in ordered for p in range(partitions)), reverse=True)
    load = dict.fromkeys(ordered, 0)
    owner: dict[int, str] = {}
    for _, p, m in pairs:
        if p in owner:
            continue
        if load[m] < floor:
            owner[p] = m
            load[m] += 1
        elif load[m] == floor and extra:
            owner[p] = m
            load[m] += 1
            extra -= 1
    return owner


class OwnershipHost(Protocol):
    """What the ownership manager needs from its worker."""

    name: str

    async def subscribe_partition(self, partition: int) -> None:
        """Start receiving ``partition``'s requests (answered 503 until it is served)."""
        ...

    def unsubscribe_partitions(self, partitions: Collection[int]) -> None:
        """Stop receiving the requests of ``partitions`` (at once; what was already received
        still runs through ingress)."""
        ...

    async def claim_partition(self, partition: int, epoch: int) -> None:
        """Make ``partition`` ready to serve at ``epoch``: wait for leftovers of an earlier
        tenure, then record the epoch in storage (raises ``FencedError`` if a newer one is
        there)."""
        ...

    def busy_partitions(self) -> set[int]:
        """Partitions with queued, running or uncommitted turns."""
        ...

    def drop_partition(self, partition: int) -> None:
        """Deactivate every object of ``partition`` (busy ones finish; their writes fail)."""
        ...

    def partitions_changed(self) -> None:
        """The served set changed (alarms re-check)."""
        ...


@dataclass(slots=True, eq=False)
class _Lease:
    """A lease this worker holds."""

    epoch: int
    revision: int
    """Latest KV revision of the lease key (the next renewal's expected last sequence)."""
    deadline: float
    """``time.monotonic()`` after which the lease may have expired on the server."""
    record: bytes
    state: LeaseState = LeaseState.ACQUIRING
    drain_deadline: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True, frozen=True)
class _LeaseView:
    """Someone's lease as last seen in the bucket."""

    owner: str
    name: str
    epoch: int
    revision: int


class OwnershipManager:
    """Holds, renews, acquires and releases this worker's partition leases."""

    # Configuration
    _host: OwnershipHost
    _nc: NatsClient
    _js: JetStreamContext
    _prefix: str
    _partitions: int
    _ttl: int
    _replicas: int
    _drain_timeout: float
    member_id: str
    """This worker's id in the bucket (its name plus a random suffix)."""
    _member_record: bytes
    # Bucket
    _bucket: str
    _kv: KeyValue | None
    _epoch_base: int
    # What we hold
    _held: dict[int, _Lease]
    _serving: dict[int, float]
    """Served partitions and their lease deadlines: the hot-path view of ``_held``."""
    _acquiring: dict[int, asyncio.Task[None]]
    _released: dict[int, float]
    """Released or dropped partitions still subscribed (answering 503), and when to unsubscribe."""
    _member_rev: int | None
    _member_deadline: float
    _leaving: bool
    # What we see
    _members: dict[str, MemberRecord]
    _leases: dict[int, _LeaseView]
    _tombstones: dict[int, int]
    _watch: KeyValue.KeyWatcher | None
    _watch_task: asyncio.Task[None] | None
    _watch_seen: float
    _caught_up: asyncio.Event
    _restart_watch: bool
    _assignment: tuple[frozenset[str], dict[int, str]]
    # Loop
    _task: asyncio.Task[None] | None
    _wakeup: asyncio.Event
    _next_renew: float
    # Metrics
    _held_gauge: Gauge
    _moves: Counter

    def __init__(
        self,
        host: OwnershipHost,
        nc: NatsClient,
        *,
        prefix: str,
        partitions: int,
        lease_ttl: int,
        replicas: int = 1,
        drain_timeout: float = 30.0,
        routing: str = "",
        registry: CollectorRegistry | None = None,
    ) -> None:
        """Create the manager; ``start()`` joins the deployment."""
        self._host = host
        self._nc = nc
        self._js = nc.jetstream()
        self._prefix = prefix
        self._partitions = partitions
        self._ttl = lease_ttl
        self._replicas = replicas
        self._drain_timeout = drain_timeout
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in host.name)[:64] or "worker"
        self.member_id = f"{safe}-{os.urandom(3).hex()}"
        self._member_record = _ENCODER.encode(
            MemberRecord(
                id=self.member_id,
                name=host.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                started=time.time(),
                routing=routing,
            )
        )
        self._bucket = lease_bucket(prefix)
        self._kv = None
        self._epoch_base = 0
        self._held = {}
        self._serving = {}
        self._acquiring = {}
        self._released = {}
        self._member_rev = None
        self._member_deadline = 0.0
        self._leaving = False
        self._members = {}
        self._leases = {}
        self._tombstones = {}
        self._watch = None
        self._watch_task = None
        self._watch_seen = 0.0
        self._caught_up = asyncio.Event()
        self._restart_watch = True
        self._assignment = (frozenset(), {})
        self._task = None
        self._wakeup = asyncio.Event()
        self._next_renew = 0.0
        registry = registry if registry is not None else CollectorRegistry()
        self._held_gauge = Gauge(
            "ndo_partitions_held", "Partitions this worker serves.", registry=registry
        )
        self._moves = Counter(
            "ndo_partition_moves_total",
            "Partitions this worker acquired, released after draining, or lost.",
            ["change"],
            registry=registry,
        )

    # Hot path (ingress, turns)

    def accepts(self, partition: int) -> bool:
        """Whether this worker serves ``partition`` right now (lease held and not expired)."""
        deadline = self._serving.get(partition)
        return deadline is not None and time.monotonic() < deadline

    def epoch_of(self, partition: int) -> int:
        """Fencing epoch for writes to ``partition``; -1 (always fenced) when not held."""
        lease = self._held.get(partition)
        if lease is None or lease.state not in (LeaseState.SERVING, LeaseState.DRAINING):
            return -1
        return lease.epoch

    def holder(self, partition: int) -> str | None:
        """Member id holding ``partition`` as far as this worker knows, or None."""
        if partition in self._held:
            return self.member_id
        view = self._leases.get(partition)
        return None if view is None else view.owner

    @property
    def serving(self) -> frozenset[int]:
        """Partitions served now."""
        return frozenset(self._serving)

    @property
    def members(self) -> dict[str, MemberRecord]:
        """Live members as last seen."""
        return dict(self._members)

    @property
    def epoch_base(self) -> int:
        """The deployment's epoch base (see the module docstring)."""
        return self._epoch_base

    def desired(self) -> frozenset[int]:
        """Partitions the assignment gives this worker now."""
        members = set(self._members)
        if self._member_rev is not None:
            members.add(self.member_id)
        key = frozenset(members)
        if key != self._assignment[0]:
            self._assignment = (key, assign_partitions(key, self._partitions))
        assignment = self._assignment[1]
        return frozenset(p for p, m in assignment.items() if m == self.member_id)

    def set_routing(self, routing: str) -> None:
        """Publish another routing mode in this worker's member record (next renewal)."""
        record = _MEMBER_DECODER.decode(self._member_record)
        self._member_record = _ENCODER.encode(msgspec.structs.replace(record, routing=routing))

    def on_reconnect(self) -> None:
        """The NATS connection came back: rebuild the view from the bucket."""
        self._restart_watch = True
        self._wakeup.set()

    # Lifecycle

    async def start(self, settle_timeout: float) -> None:
        """Join: set up the bucket, check the deployment, register, start the loop, and wait
        (up to ``settle_timeout``) until this worker serves what the assignment gives it.

        Raises:
            DeploymentMismatchError: the deployment has another partition count.
        """
        await self._open_bucket()
        await self._ensure_member()
        await self._start_watch()
        self._task = asyncio.create_task(self._run(), name="ndo-ownership")
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:
            if self._caught_up.is_set() and self.desired() <= self.serving:
                break
            await asyncio.sleep(0.01)
        _log.info(
            "joined deployment",
            member=self.member_id,
            members=len(self._members),
            serving=len(self._serving),
            desired=len(self.desired()),
        )

    async def leave(self) -> None:
        """Hand everything over: leave the member set, drain and release every partition."""
        if self._task is None:
            return
        self._leaving = True
        if self._member_rev is not None:
            with contextlib.suppress(*_TRANSIENT):
                await self._cas_delete(member_key(self.member_id), self._member_rev)
        self._member_rev = None
        self._wakeup.set()
        deadline = time.monotonic() + self._drain_timeout + 5.0
        while (self._held or self._acquiring) and time.monotonic() < deadline:
            if self._task.done():
                break
            await asyncio.sleep(0.005)
        # Stale forwarders may still send to us for a moment: keep answering "moving" until the
        # new holders appear, if anyone is there to take over.
        others = set(self._members) - {self.member_id}
        grace = time.monotonic() + min(2.0, float(self._ttl))
        while others and time.monotonic() < grace and self._released:
            self._reap_released()
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop the loop and the watch; unsubscribe everything (no KV writes)."""
        tasks = [t for t in (self._task, self._watch_task, *self._acquiring.values()) if t]
        self._task = self._watch_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, *_TRANSIENT):
                await task
        await self._stop_watch()
        subscribed = set(self._held) | set(self._released)
        self._held.clear()
        self._serving.clear()
        self._released.clear()
        self._held_gauge.set(0)
        if subscribed:
            self._host.unsubscribe_partitions(subscribed)

    # The loop

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._step()
                backoff = 0.05
            except (*_TRANSIENT, StorageError) as exc:
                _log.warning("ownership step failed; retrying", error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._renew_interval)
                continue
            except Exception:  # a bug must not silently stop lease renewal: log, keep going
                _log.exception("ownership step crashed; retrying")
                await asyncio.sleep(self._renew_interval)
                continue
            now = time.monotonic()
            wake = min(
                [self._next_renew]
                + [lease.deadline for lease in self._held.values()]
                + [now + _DRAIN_POLL for lease in self._held.values() if _draining(lease)]
                + list(self._released.values())
            )
            if wake > now:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wake - now):
                        await self._wakeup.wait()
            self._wakeup.clear()

    @property
    def _renew_interval(self) -> float:
        return self._ttl / 3

    @property
    def _margin(self) -> float:
        """How long before the server's expiry this worker stops trusting a lease."""
        return min(0.5, self._ttl * 0.2)

    async def _step(self) -> None:
        now = time.monotonic()
        if now >= self._next_renew:
            # Renew before expiring: a renewal that succeeds proves the lease is still ours
            # (compare-and-set on our revision), however late this step runs.
            self._next_renew = now + self._renew_interval
            await self._renew()
        self._expire(time.monotonic())
        if not self._leaving:  # leaving works even with the server gone: no watch needed
            if self._kv is None:
                await self._open_bucket()
            if self._restart_watch or self._watch_broken():
                await self._start_watch()
        if not self._leaving:
            await self._ensure_member()
        await self._progress_drains()
        self._rebalance()
        self._reap_released()
        self._held_gauge.set(len(self._serving))

    def _watch_broken(self) -> bool:
        if self._watch_task is None or self._watch_task.done():
            return True
        # Our own renewals show up in the watch every renew interval: silence means it stalled.
        quiet = time.monotonic() - self._watch_seen
        return self._member_rev is not None and quiet > 3 * self._renew_interval + 1.0

    def _expire(self, now: float) -> None:
        for partition, lease in list(self._held.items()):
            if now >= lease.deadline and lease.state is not LeaseState.RELEASING:
                self._drop(partition, lease, "lease not renewed in time")
        if self._member_rev is not None and now >= self._member_deadline:
            self._member_rev = None

    def _rebalance(self) -> None:
        if self._leaving:
            for partition, lease in self._held.items():
                if lease.state is LeaseState.SERVING:
                    self._begin_drain(partition, lease)
            return
        if not self._caught_up.is_set():
            return
        if self._member_rev is None:
            return  # not a member right now: change nothing until registered again
        desired = self.desired()
        for partition, lease in self._held.items():
            if partition not in desired and lease.state is LeaseState.SERVING:
                self._begin_drain(partition, lease)
        for partition in desired:
            if partition in self._held or partition in self._acquiring:
                continue
            view = self._leases.get(partition)
            if view is None:
                last = self._tombstones.get(partition, 0)
            elif view.owner == self.member_id:
                last = view.revision  # ours from an earlier tenure: take it up with a new epoch
            else:
                continue  # held by someone else: they release it, or it expires
            self._acquiring[partition] = asyncio.create_task(
                self._acquire(partition, last), name=f"ndo-acquire-{partition}"
            )
        for partition, view in list(self._leases.items()):
            if (
                view.owner == self.member_id
                and partition not in desired
                and partition not in self._held
                and partition not in self._acquiring
            ):
                # A lease of ours we no longer use (an earlier tenure): free it for its owner.
                del self._leases[partition]
                self._acquiring[partition] = asyncio.create_task(
                    self._free(partition, view.revision), name=f"ndo-free-{partition}"
                )

    # Acquire

    async def _acquire(self, partition: int, last: int) -> None:
        try:
            self._released.pop(partition, None)
            await self._host.subscribe_partition(partition)
            record = LeaseRecord(owner=self.member_id, name=self._host.name)
            started = time.monotonic()
            try:
                revision = await self._cas_put(lease_key(partition), _ENCODER.encode(record), last)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _CAS_CONFLICT:
                    raise
                await self._refresh_lease(partition)
                self._released[partition] = time.monotonic()
                return
            epoch = self._epoch_base + revision
            lease = _Lease(
                epoch=epoch,
                revision=revision,
                deadline=started + self._ttl - self._margin,
                record=_ENCODER.encode(
                    LeaseRecord(owner=self.member_id, name=self._host.name, epoch=epoch)
                ),
            )
            self._held[partition] = lease
            try:
                await self._host.claim_partition(partition, epoch)
            except FencedError:
                _log.error(
                    "storage holds a newer epoch than this lease; giving the partition up "
                    "(was the lease bucket re-created with an older clock?)",
                    partition=partition,
                    epoch=epoch,
                )
                await self._give_up(partition, lease)
                return
            except Exception as exc:  # storage failed (or a bug): never keep an unserved lease
                _log.warning("claiming a partition failed", partition=partition, error=repr(exc))
                await self._give_up(partition, lease)
                return
            if self._held.get(partition) is not lease or lease.state is not LeaseState.ACQUIRING:
                return
            lease.state = LeaseState.SERVING
            self._serving[partition] = lease.deadline
            self._moves.labels("acquired").inc()
            _log.debug("partition acquired", partition=partition, epoch=epoch)
            self._host.partitions_changed()
        except _TRANSIENT as exc:
            _log.warning("acquiring a partition failed", partition=partition, error=repr(exc))
            if partition not in self._held:
                self._released[partition] = time.monotonic()
        finally:
            self._acquiring.pop(partition, None)
            self._wakeup.set()

    async def _give_up(self, partition: int, lease: _Lease) -> None:
        if self._held.get(partition) is lease:
            del self._held[partition]
        with contextlib.suppress(*_TRANSIENT):
            await self._cas_delete(lease_key(partition), lease.revision)
        self._released[partition] = time.monotonic()

    async def _free(self, partition: int, revision: int) -> None:
        try:
            with contextlib.suppress(*_TRANSIENT):
                await self._cas_delete(lease_key(partition), revision)
        finally:
            self._acquiring.pop(partition, None)

    # Renew

    async def _renew(self) -> None:
        await asyncio.gather(
            self._renew_member(),
            *(self._renew_lease(p, lease) for p, lease in list(self._held.items())),
        )

    async def _renew_lease(self, partition: int, lease: _Lease) -> None:
        async with lease.lock:
            if self._held.get(partition) is not lease or lease.state is LeaseState.RELEASING:
                return
            started = time.monotonic()
            try:
                revision = await self._cas_put(
                    lease_key(partition), lease.record, lease.revision, timeout=self._renew_interval
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _CAS_CONFLICT:
                    _log.debug("lease renewal failed", partition=partition, error=repr(exc))
                    return
                # Either someone else has it now, or our previous renewal landed unacknowledged.
                try:
                    current, raw = await self._read(lease_key(partition))
                except _TRANSIENT:
                    return  # find out next time; the local deadline still bounds serving
                record = None if raw is None else _LEASE_DECODER.decode(raw)
                if (
                    record is None
                    or record.owner != self.member_id
                    or (record.epoch or self._epoch_base + current) != lease.epoch
                ):
                    self._drop(partition, lease, "lease taken over")
                    return
                lease.revision = current
                return
            except _TRANSIENT as exc:
                _log.debug("lease renewal failed", partition=partition, error=repr(exc))
                return
            if self._held.get(partition) is not lease:
                return
            lease.revision = revision
            lease.deadline = started + self._ttl - self._margin
            if partition in self._serving:
                self._serving[partition] = lease.deadline

    async def _renew_member(self) -> None:
        if self._member_rev is None:
            return
        started = time.monotonic()
        try:
            revision = await self._cas_put(
                member_key(self.member_id),
                self._member_record,
                self._member_rev,
                timeout=self._renew_interval,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _CAS_CONFLICT:
                self._member_rev = None  # expired meanwhile: register again
            return
        except _TRANSIENT:
            return
        self._member_rev = revision
        self._member_deadline = started + self._ttl - self._margin

    async def _ensure_member(self) -> None:
        if self._member_rev is not None:
            return
        key = member_key(self.member_id)
        last, _ = await self._read(key)
        started = time.monotonic()
        self._member_rev = await self._cas_put(key, self._member_record, last)
        self._member_deadline = started + self._ttl - self._margin

    # Release

    def _begin_drain(self, partition: int, lease: _Lease) -> None:
        lease.state = LeaseState.DRAINING
        lease.drain_deadline = time.monotonic() + self._drain_timeout
        self._serving.pop(partition, None)
        self._host.partitions_changed()
        self._wakeup.set()

    async def _progress_drains(self) -> None:
        draining = [(p, lease) for p, lease in self._held.items() if _draining(lease)]
        if not draining:
            return
        busy = self._host.busy_partitions()
        now = time.monotonic()
        done = [(p, lease) for p, lease in draining if p not in busy or now >= lease.drain_deadline]
        for partition, _ in done:
            if partition in busy:
                _log.warning(
                    "drain timeout: handing a partition over with busy objects",
                    partition=partition,
                )
        if done:
            await asyncio.gather(*(self._finish_release(p, lease) for p, lease in done))

    async def _finish_release(self, partition: int, lease: _Lease) -> None:
        async with lease.lock:
            if self._held.get(partition) is not lease:
                return
            lease.state = LeaseState.RELEASING
            self._host.drop_partition(partition)
            try:
                await self._cas_delete(lease_key(partition), lease.revision)
            except _TRANSIENT as exc:  # nobody renews it any more: it expires on its own
                _log.warning("lease delete failed", partition=partition, error=repr(exc))
            self._held.pop(partition, None)
            self._released[partition] = time.monotonic() + min(2.0, float(self._ttl))
        self._moves.labels("released").inc()
        _log.debug("partition released", partition=partition)
        self._host.partitions_changed()

    def _drop(self, partition: int, lease: _Lease, reason: str) -> None:
        """Stop serving at once (the lease is or may be gone); no KV writes."""
        if self._held.get(partition) is lease:
            del self._held[partition]
        self._serving.pop(partition, None)
        lease.state = LeaseState.RELEASING
        self._host.drop_partition(partition)
        self._released[partition] = time.monotonic()
        self._moves.labels("lost").inc()
        _log.warning("partition lost", partition=partition, reason=reason)
        self._host.partitions_changed()
        self._wakeup.set()

    def _reap_released(self) -> None:
        """Unsubscribe released partitions once their grace ends or a new holder shows up."""
        now = time.monotonic()
        gone = [
            p
            for p, until in self._released.items()
            if p not in self._held
            and p not in self._acquiring
            and (now >= until or self._holder_is_other(p))
        ]
        if not gone:
            return
        for p in gone:
            del self._released[p]
        self._host.unsubscribe_partitions(gone)

    def _holder_is_other(self, partition: int) -> bool:
        view = self._leases.get(partition)
        return view is not None and view.owner != self.member_id

    # Watch

    async def _start_watch(self) -> None:
        await self._stop_watch()
        self._members.clear()
        self._leases.clear()
        self._tombstones.clear()
        self._caught_up.clear()
        assert self._kv is not None
        self._watch = await self._kv.watch(">")
        self._watch_seen = time.monotonic()
        self._watch_task = asyncio.create_task(self._consume(self._watch), name="ndo-lease-watch")
        self._restart_watch = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._caught_up.wait()

    async def _stop_watch(self) -> None:
        task, watch = self._watch_task, self._watch
        self._watch_task = self._watch = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if watch is not None:
            with contextlib.suppress(*_TRANSIENT, AttributeError):
                await watch.stop()  # type: ignore[no-untyped-call]

    async def _consume(self, watch: KeyValue.KeyWatcher) -> None:
        async for entry in watch:
            self._watch_seen = time.monotonic()
            if entry is None:
                self._caught_up.set()
                self._wakeup.set()
                continue
            try:
                self._apply(entry)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                _log.warning(
                    "ignoring a malformed lease bucket entry", key=entry.key, error=str(exc)
                )

    def _apply(self, entry: KeyValue.Entry) -> None:
        key, revision = entry.key, entry.revision or 0
        deleted = entry.operation in ("DEL", "PURGE")
        if key.startswith(_MEMBER_PREFIX):
            member = key[len(_MEMBER_PREFIX) :]
            if deleted:
                if self._members.pop(member, None) is not None:
                    self._wakeup.set()
            elif entry.value:
                if member not in self._members:
                    self._wakeup.set()
                self._members[member] = _MEMBER_DECODER.decode(entry.value)
        elif key.startswith(_LEASE_PREFIX):
            partition = int(key[len(_LEASE_PREFIX) :])
            if deleted:
                self._tombstones[partition] = revision
                if self._leases.pop(partition, None) is not None:
                    self._wakeup.set()
            elif entry.value:
                record = _LEASE_DECODER.decode(entry.value)
                previous = self._leases.get(partition)
                epoch = record.epoch or self._epoch_base + revision
                self._leases[partition] = _LeaseView(record.owner, record.name, epoch, revision)
                if previous is None or previous.owner != record.owner:
                    self._wakeup.set()

    async def _refresh_lease(self, partition: int) -> None:
        revision, raw = await self._read(lease_key(partition))
        record = None if raw is None else _LEASE_DECODER.decode(raw)
        if record is None:
            self._leases.pop(partition, None)
            self._tombstones[partition] = revision
        else:
            epoch = record.epoch or self._epoch_base + revision
            self._leases[partition] = _LeaseView(record.owner, record.name, epoch, revision)

    # Bucket access

    async def _open_bucket(self) -> None:
        js = self._js
        try:
            kv = await js.key_value(self._bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=self._bucket,
                description=f"ndo partition leases and members ({self._prefix})",
                history=1,
                storage=StorageType.FILE,
                replicas=self._replicas,
                limit_marker_ttl=_MARKER_TTL,
            )
            try:
                kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # created concurrently by another worker
                kv = await js.key_value(self._bucket)
        self._kv = kv
        last, raw = await self._read(CONFIG_KEY)
        record = None if raw is None else _CONFIG_DECODER.decode(raw)
        if record is None:
            record = DeploymentRecord(
                partitions=self._partitions,
                epoch_base=int(time.time() * 1_000_000),
                created=time.time(),
            )
            try:
                await self._cas_put(CONFIG_KEY, _ENCODER.encode(record), last, ttl=None)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _CAS_CONFLICT:
                    raise
                _, raw = await self._read(CONFIG_KEY)
                if raw is None:
                    raise
                record = _CONFIG_DECODER.decode(raw)
        if record.partitions != self._partitions:
            raise DeploymentMismatchError(
                f"the deployment using lease bucket {self._bucket!r} has {record.partitions} "
                f"partitions but this worker was started with {self._partitions}; the partition "
                f"count is fixed per deployment: start with --partitions {record.partitions}"
            )
        self._epoch_base = record.epoch_base

    def _subject(self, key: str) -> str:
        return f"$KV.{self._bucket}.{key}"

    async def _cas_put(
        self, key: str, value: bytes, last: int, *, ttl: int | None = -1, timeout: float = 5.0
    ) -> int:
        """Write ``key`` if its last revision is ``last`` (0: absent); return the new revision.

        ``ttl`` -1 means the lease TTL, None no TTL.
        """
        headers = {_EXPECTED_LAST: str(last)}
        seconds = self._ttl if ttl == -1 else ttl
        if seconds is not None:
            headers["Nats-TTL"] = f"{seconds}s"
        ack = await self._js.publish(self._subject(key), value, headers=headers, timeout=timeout)
        return int(ack.seq)

    async def _cas_delete(self, key: str, last: int) -> None:
        headers = {"KV-Operation": "DEL", _EXPECTED_LAST: str(last)}
        try:
            await self._js.publish(self._subject(key), b"", headers=headers, timeout=2.0)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _CAS_CONFLICT:
                raise  # a conflict means it is gone or someone else's already: nothing to do

    async def _read(self, key: str) -> tuple[int, bytes | None]:
        """The key's last revision (0 if none) and its value (None if absent or deleted)."""
        try:
            msg = await self._js.get_msg(f"KV_{self._bucket}", subject=self._subject(key))
        except nats.js.errors.NotFoundError:
            return 0, None
        headers = msg.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            return int(msg.seq or 0), None
        return int(msg.seq or 0), msg.data or b""


def _draining(lease: _Lease) -> bool:
    return lease.state is LeaseState.DRAINING


def partitions_text(partitions: Iterable[int]) -> str:
    """``0-3,7,9-10``: a compact list of partition numbers for people."""
    ordered = sorted(partitions)
    runs: list[str] = []
    start = prev = None
    for p in ordered:
        if start is None:
            start = prev = p
        elif prev is not None and p == prev + 1:
            prev = p
        else:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = p
    if start is not None:
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(runs) or "-"
