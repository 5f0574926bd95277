"""Partitions shared between workers through leases in the lease bucket: the state machine.

Also ``open_ownership``, which decides between these leases and ``ServeAll`` for a worker.

``LeaseOwnership`` is the ``Ownership`` of a worker that shares its deployment with others. It
joins the member set, computes the assignment (``assign_partitions``) over the live members,
acquires the free partitions the assignment gives it, renews what it holds, and drains and
releases what it should no longer hold. Records and I/O are ``service._lease_bucket``'s; local
effects (subscribe, fence in storage, drop objects) go through the ``PartitionHost``.

Epochs: a lease acquired at KV revision ``r`` has epoch ``B + r`` (``B`` is the deployment's
``epoch_base``). KV revisions are stream sequences, so every later acquisition of any partition
has a higher epoch; the holder records the epoch in storage (``PartitionHost.claim``) *before*
it serves, and every commit checks it inside its transaction. A worker that lost its lease
without knowing (paused, cut off) cannot commit: timing never decides safety. ``B`` is the
bucket's creation time in microseconds, so a bucket that is deleted and re-created still issues
epochs above every earlier one.

A partition's life here (``LeaseState``): ACQUIRING (lease written, fence being claimed) →
SERVING → DRAINING (new messages get 503 "moving", queued turns and commits finish) → RELEASING
(objects dropped, lease deleted). A lease whose holder died expires after ``lease_ttl``. Locally
a worker stops serving a partition as soon as its own clock says the lease may have expired
(``accepts``), and drops it when a renewal finds the lease taken.

Foreign values (anything not written by ndo: the bucket sits on a shared bus): an unreadable
lease is free (``BucketView``), so whoever the assignment gives it to takes it over with a
compare-and-set on its revision, at a new epoch (``B`` + the new revision, above every epoch
issued before); its holder's next renewal fails the compare-and-set, finds the unreadable value
and drops the partition, to take it up again the same way. A lease nobody renews that never
expires (a readable value written without a TTL, whose owner is not a member) is taken over
after ``2 * lease_ttl + 1`` seconds. Each unreadable key is logged at most once a minute. A
partition whose claim fails (its storage refuses it) is not claimed again for a growing pause
(up to one lease TTL), so a partition that cannot be served does not spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from ndo.service._assignment import assign_partitions, partitions_text
from ndo.service._config import WorkerConfig
from ndo.service._connection import redact_url
from ndo.service._errors import OwnershipError
from ndo.service._lease_bucket import (
    BucketView,
    LeaseBucket,
    LeaseRecord,
    LeaseView,
    MemberRecord,
    decode_lease,
    encode_record,
    entry_value,
    is_cas_conflict,
    lease_key,
    member_key,
)
from ndo.service._local_peers import process_gone, this_machine
from ndo.service._metrics import WorkerMetrics
from ndo.service._ownership import Ownership, PartitionHost, ServeAll
from ndo.storage import FencedError, StorageError

__all__ = ["LeaseOwnership", "LeaseState", "open_ownership"]

_log = structlog.get_logger("ndo.ownership")

_DRAIN_POLL: Final = 0.02
"""Seconds between checks of draining partitions."""

_TRANSIENT = (nats.errors.Error, OSError, TimeoutError)
"""Failures a later step may not see again (server restarting, network)."""

_WARN_INTERVAL: Final = 60.0
"""Seconds between two warnings about the same unreadable bucket key."""
_WARNED_KEYS: Final = 1024
"""Most keys remembered for ``_WARN_INTERVAL`` (beyond it, the expired ones are forgotten)."""
_CLAIM_BACKOFF: Final = 0.25
"""Seconds before a partition whose claim failed is claimed again (doubling up to the TTL)."""

_MEMBER_DECODER: Final = msgspec.json.Decoder(MemberRecord)


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
    applied: int = -1
    """Log position last published in ``record`` (replicated storage)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LeaseOwnership:
    """Holds, renews, acquires and releases this worker's partition leases."""

    # Configuration
    _host: PartitionHost
    _bucket: LeaseBucket
    _partitions: int
    _storage: str
    _ttl: int
    _drain_timeout: float
    _settle_timeout: float
    _metrics: WorkerMetrics
    _member_id: str
    """This worker's id in the bucket (its name plus a random suffix)."""
    _member_record: bytes
    # What we hold
    _held: dict[int, _Lease]
    _serving: dict[int, float]
    """Served partitions and their lease deadlines: the hot-path view of ``_held``."""
    _acquiring: dict[int, asyncio.Task[None]]
    """Acquisitions and frees of leases running in the background."""
    _claiming: set[int]
    """Partitions being acquired (lease written or being written, fence being claimed)."""
    _released: dict[int, float]
    """Released or dropped partitions still subscribed (answering 503), and when to unsubscribe."""
    _member_rev: int | None
    _member_deadline: float
    _leaving: bool
    _starting: bool
    """Between ``start`` and the first settled assignment."""
    _claim_failures: dict[int, tuple[int, float]]
    """Partitions whose last claim failed: consecutive failures, and when to try again."""
    _gone: set[str]
    """Members of this machine whose process has ended (crashed): not counted as members, and
    their leases taken over at once instead of after their expiry."""
    _forgetting: set[asyncio.Task[None]]
    """Deletions of the records of members in ``_gone``."""
    # What we see
    _view: BucketView
    _watch: KeyValue.KeyWatcher | None
    _watch_task: asyncio.Task[None] | None
    _watch_seen: float
    _caught_up: asyncio.Event
    _restart_watch: bool
    _assignment: tuple[frozenset[str], dict[int, str]]
    _warned: dict[str, float]
    """Unreadable keys logged lately, and when."""
    # Loop
    _task: asyncio.Task[None] | None
    _wakeup: asyncio.Event
    _next_renew: float

    def __init__(
        self,
        host: PartitionHost,
        nc: NatsClient,
        *,
        prefix: str,
        partitions: int,
        lease_ttl: int,
        metrics: WorkerMetrics,
        replicas: int = 1,
        storage: str = "local",
        drain_timeout: float = 30.0,
        routing: str = "",
    ) -> None:
        """Describe this worker's membership; ``start()`` joins the deployment.

        Args:
            host: the worker side (subscriptions, fences, objects).
            nc: the worker's connection (JetStream on the server).
            prefix: the deployment's subject prefix.
            partitions: the deployment's partition count.
            lease_ttl: whole seconds a lease lives unrenewed.
            metrics: where partitions held and moves are counted.
            replicas: replicas of the lease bucket when this worker creates it.
            storage: the storage mode, checked against the deployment's.
            drain_timeout: longest wait for a released partition's turns to finish.
            routing: the routing mode, published in the member record.
        """
        self._host = host
        self._bucket = LeaseBucket(nc, prefix, ttl=lease_ttl, replicas=replicas)
        self._partitions = partitions
        self._storage = storage
        self._ttl = lease_ttl
        self._drain_timeout = drain_timeout
        self._settle_timeout = 2.0 * lease_ttl + 1.0
        self._metrics = metrics
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in host.name)[:64] or "worker"
        self._member_id = f"{safe}-{os.urandom(3).hex()}"
        self._member_record = encode_record(
            MemberRecord(
                id=self._member_id,
                name=host.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                started=time.time(),
                routing=routing,
                machine=this_machine(),
            )
        )
        self._held = {}
        self._serving = {}
        self._acquiring = {}
        self._claiming = set()
        self._released = {}
        self._member_rev = None
        self._member_deadline = 0.0
        self._leaving = False
        self._starting = False
        self._claim_failures = {}
        self._gone = set()
        self._forgetting = set()
        self._view = BucketView(epoch_base=0)
        self._watch = None
        self._watch_task = None
        self._watch_seen = 0.0
        self._caught_up = asyncio.Event()
        self._restart_watch = True
        self._assignment = (frozenset(), {})
        self._warned = {}
        self._task = None
        self._wakeup = asyncio.Event()
        self._next_renew = 0.0

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

    def held_elsewhere(self, partition: int) -> bool:
        """Whether another worker holds ``partition`` as far as this worker knows."""
        if partition in self._held:
            return False
        view = self._view.leases.get(partition)
        return view is not None and view.owner != self._member_id and view.owner not in self._gone

    def acquiring(self, partition: int) -> bool:
        """Whether this worker is taking ``partition`` up right now (its lease being written or
        its fence claimed, or, while it starts, the assignment gives it a free partition): its
        requests may wait for it a moment."""
        if partition in self._claiming:
            return True
        if not self._starting:
            return False
        if not self._caught_up.is_set() or self._member_rev is None:
            return True  # joining: which partitions this worker gets is not known yet
        return partition in self.desired() and not self.held_elsewhere(partition)

    @property
    def member_id(self) -> str:
        """This worker's id in the lease bucket."""
        return self._member_id

    @property
    def serving(self) -> frozenset[int]:
        """Partitions served now."""
        return frozenset(self._serving)

    def desired(self) -> frozenset[int]:
        """Partitions the assignment gives this worker now."""
        members = set(self._view.members) - self._gone
        if self._member_rev is not None:
            members.add(self._member_id)
        key = frozenset(members)
        if key != self._assignment[0]:
            self._assignment = (key, assign_partitions(key, self._partitions))
        assignment = self._assignment[1]
        return frozenset(p for p, m in assignment.items() if m == self._member_id)

    def set_routing(self, routing: str) -> None:
        """Publish another routing mode in this worker's member record (next renewal)."""
        record = _MEMBER_DECODER.decode(self._member_record)
        self._member_record = encode_record(msgspec.structs.replace(record, routing=routing))

    def lost(self, partition: int, reason: str) -> None:
        """Storage says ``partition`` cannot be served any more (another tenure wrote to it, or
        its copy must be re-read): stop serving it now and free the lease, so the assignment
        takes it up again (here or elsewhere) with a fresh claim."""
        lease = self._held.get(partition)
        if lease is None or lease.state is LeaseState.RELEASING:
            return
        revision = lease.revision
        self._drop(partition, lease, reason)
        self._acquiring.setdefault(
            partition,
            asyncio.create_task(self._free(partition, revision), name=f"ndo-free-{partition}"),
        )

    def on_reconnect(self) -> None:
        """The NATS connection came back: rebuild the view from the bucket."""
        self._restart_watch = True
        self._wakeup.set()

    # Lifecycle

    async def start(self) -> None:
        """Join: set up the bucket, check the deployment, register, start the loop, and wait
        (up to twice the lease TTL) until this worker serves what the assignment gives it.

        Raises:
            DeploymentMismatchError: the deployment has another partition count.
        """
        self._starting = True
        try:
            await self._open_bucket()
            await self._ensure_member()
            await self._start_watch()
            self._task = asyncio.create_task(self._run(), name="ndo-ownership")
            deadline = time.monotonic() + self._settle_timeout
            while time.monotonic() < deadline:
                if self._caught_up.is_set() and self.desired() <= self.serving:
                    break
                await asyncio.sleep(0.01)
        finally:
            self._starting = False
        waiting = self.desired() - self.serving
        _log.info(
            "joined deployment",
            member=self._member_id,
            members=len(self._view.members),
            serving=len(self._serving),
            desired=len(self.desired()),
        )
        if waiting:
            holders = sorted(
                {view.name or view.owner for p, view in self._view.leases.items() if p in waiting}
            )
            _log.warning(
                "some partitions of this worker are still held elsewhere; their requests get "
                "503 moving until those leases are released or expire",
                partitions=partitions_text(waiting),
                held_by=",".join(holders) or "-",
            )

    async def leave(self) -> None:
        """Hand everything over: leave the member set, drain and release every partition."""
        if self._task is None:
            return
        self._leaving = True
        if self._member_rev is not None:
            with contextlib.suppress(*_TRANSIENT):
                await self._bucket.delete(member_key(self._member_id), self._member_rev)
        self._member_rev = None
        self._wakeup.set()
        deadline = time.monotonic() + self._drain_timeout + 5.0
        while (self._held or self._acquiring) and time.monotonic() < deadline:
            if self._task.done():
                break
            await asyncio.sleep(0.005)
        # Stale forwarders may still send to us for a moment: keep answering "moving" until the
        # new holders appear, if anyone is there to take over.
        others = set(self._view.members) - {self._member_id}
        grace = time.monotonic() + min(2.0, float(self._ttl))
        while others and time.monotonic() < grace and self._released:
            self._reap_released()
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop the loop and the watch; unsubscribe everything (no KV writes)."""
        tasks = [
            t
            for t in (self._task, self._watch_task, *self._acquiring.values(), *self._forgetting)
            if t
        ]
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
        self._metrics.partitions_held.set(0)
        if subscribed:
            self._host.unsubscribe(subscribed)

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
                + [at for _, at in self._claim_failures.values() if at > now]
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
    def _abandon_after(self) -> float:
        """Seconds a lease of a non-member may stay unrenewed before it is taken over (a lease
        ndo wrote expires after one TTL, and its holder renews it every third of one)."""
        return 2.0 * self._ttl + 1.0

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
            if not self._bucket.opened:
                await self._open_bucket()
            if self._restart_watch or self._watch_broken():
                await self._start_watch()
            await self._ensure_member()
        await self._progress_drains()
        self._find_gone_members()
        self._rebalance()
        self._reap_released()
        self._metrics.partitions_held.set(len(self._serving))

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
        leases = self._view.leases
        now = time.monotonic()
        for partition in desired:
            if partition in self._held or partition in self._acquiring:
                continue
            if self._claim_failures.get(partition, (0, 0.0))[1] > now:
                continue  # its claim failed a moment ago: try again after a pause
            view = leases.get(partition)
            if view is None:
                last = self._view.tombstones.get(partition, 0)
            elif view.owner == self._member_id:
                last = view.revision  # ours from an earlier tenure: take it up with a new epoch
            elif view.owner in self._gone:
                last = view.revision  # its holder's process ended: no need to wait for expiry
            elif self._abandoned(view, now):
                _log.warning(
                    "taking over a lease nobody renews (written without a TTL?)",
                    partition=partition,
                    owner=view.owner,
                    unrenewed=round(now - view.seen, 1),
                )
                last = view.revision
            else:
                continue  # held by someone else: they release it, or it expires
            self._acquiring[partition] = asyncio.create_task(
                self._acquire(partition, last), name=f"ndo-acquire-{partition}"
            )
        for partition, view in list(leases.items()):
            if (
                view.owner == self._member_id
                and partition not in desired
                and partition not in self._held
                and partition not in self._acquiring
            ):
                # A lease of ours we no longer use (an earlier tenure): free it for its owner.
                del leases[partition]
                self._acquiring[partition] = asyncio.create_task(
                    self._free(partition, view.revision), name=f"ndo-free-{partition}"
                )

    def _find_gone_members(self) -> None:
        """Note members whose process on this machine has ended (``service._local_peers``), so
        a worker restarted after a crash takes its predecessor's partitions over at once; their
        records are deleted for the other workers' sake (best effort)."""
        members = self._view.members
        self._gone &= set(members)
        for member, record in members.items():
            if (
                member == self._member_id
                or member in self._gone
                or not process_gone(record.pid, record.started, record.machine)
            ):
                continue
            self._gone.add(member)
            _log.info(
                "a worker of this machine has ended; taking its partitions over now",
                member=member,
                pid=record.pid,
            )
            task = asyncio.create_task(self._forget_member(member), name="ndo-forget-member")
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    async def _forget_member(self, member: str) -> None:
        with contextlib.suppress(*_TRANSIENT):
            revision, _ = await self._bucket.read(member_key(member))
            if revision:
                await self._bucket.delete(member_key(member), revision)

    def _abandoned(self, view: LeaseView, now: float) -> bool:
        """Whether a lease of another worker is one nobody renews and nothing will expire: its
        owner is not a member and its revision has not moved for ``_abandon_after``."""
        return view.owner not in self._view.members and now - view.seen > self._abandon_after

    # Acquire

    async def _acquire(self, partition: int, last: int) -> None:
        self._claiming.add(partition)
        try:
            self._released.pop(partition, None)
            await self._host.subscribe(partition)
            record = LeaseRecord(owner=self._member_id, name=self._host.name)
            started = time.monotonic()
            try:
                revision = await self._bucket.put(lease_key(partition), encode_record(record), last)
            except nats.js.errors.APIError as exc:
                if not is_cas_conflict(exc):
                    raise
                await self._refresh_lease(partition)
                self._released[partition] = time.monotonic()
                return
            epoch = self._view.epoch_base + revision
            lease = _Lease(
                epoch=epoch,
                revision=revision,
                deadline=started + self._ttl - self._margin,
                record=encode_record(
                    LeaseRecord(owner=self._member_id, name=self._host.name, epoch=epoch)
                ),
            )
            self._held[partition] = lease
            try:
                await self._host.claim([partition], epoch)
            except FencedError:
                _log.error(
                    "storage holds a newer epoch than this lease; giving the partition up "
                    "(was the lease bucket re-created with an older clock?)",
                    partition=partition,
                    epoch=epoch,
                )
                self._claim_failed(partition)
                await self._give_up(partition, lease)
                return
            except Exception as exc:  # storage failed (or a bug): never keep an unserved lease
                _log.warning("claiming a partition failed", partition=partition, error=repr(exc))
                self._claim_failed(partition)
                await self._give_up(partition, lease)
                return
            self._claim_failures.pop(partition, None)
            if self._held.get(partition) is not lease or lease.state is not LeaseState.ACQUIRING:
                return
            lease.state = LeaseState.SERVING
            self._serving[partition] = lease.deadline
            self._metrics.count(self._metrics.partition_moves, "acquired")
            _log.debug("partition acquired", partition=partition, epoch=epoch)
            self._changed()
        except _TRANSIENT as exc:
            _log.warning("acquiring a partition failed", partition=partition, error=repr(exc))
            if partition not in self._held:
                self._released[partition] = time.monotonic()
        finally:
            self._claiming.discard(partition)
            self._acquiring.pop(partition, None)
            self._wakeup.set()

    def _claim_failed(self, partition: int) -> None:
        """Pause before claiming ``partition`` again: 0.25 s, doubling, up to one lease TTL."""
        failures = self._claim_failures.get(partition, (0, 0.0))[0] + 1
        pause = min(float(self._ttl), _CLAIM_BACKOFF * 2 ** min(failures - 1, 16))
        self._claim_failures[partition] = (failures, time.monotonic() + pause)

    async def _give_up(self, partition: int, lease: _Lease) -> None:
        if self._held.get(partition) is lease:
            del self._held[partition]
        with contextlib.suppress(*_TRANSIENT):
            await self._bucket.delete(lease_key(partition), lease.revision)
        self._released[partition] = time.monotonic()

    async def _free(self, partition: int, revision: int) -> None:
        try:
            with contextlib.suppress(*_TRANSIENT):
                await self._bucket.delete(lease_key(partition), revision)
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
            applied = self._host.log_position(partition)
            if applied is not None and applied != lease.applied:
                lease.applied = applied
                lease.record = encode_record(
                    LeaseRecord(
                        owner=self._member_id,
                        name=self._host.name,
                        epoch=lease.epoch,
                        applied=applied,
                    )
                )
            try:
                revision = await self._bucket.put(
                    lease_key(partition), lease.record, lease.revision, timeout=self._renew_interval
                )
            except nats.js.errors.APIError as exc:
                if not is_cas_conflict(exc):
                    _log.debug("lease renewal failed", partition=partition, error=repr(exc))
                    return
                await self._check_renewal_conflict(partition, lease)
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

    async def _check_renewal_conflict(self, partition: int, lease: _Lease) -> None:
        """A renewal lost its compare-and-set: either someone else has the lease now, or our
        previous renewal landed unacknowledged."""
        try:
            current, raw = await self._bucket.read(lease_key(partition))
        except _TRANSIENT:
            return  # find out next time; the local deadline still bounds serving
        try:
            record = None if raw is None else decode_lease(raw)
        except ValueError as exc:
            # A foreign value where our lease was: stop serving, and take it over again through
            # the compare-and-set on its revision (a new revision: a new, higher epoch).
            self._view.set_lease(partition, current, raw)
            self._warn_unreadable(lease_key(partition), str(exc), "re-acquiring the partition")
            self._drop(partition, lease, "lease overwritten by an unreadable value")
            return
        if (
            record is None
            or record.owner != self._member_id
            or (record.epoch or self._view.epoch_base + current) != lease.epoch
        ):
            self._drop(partition, lease, "lease taken over")
            return
        lease.revision = current

    async def _renew_member(self) -> None:
        if self._member_rev is None:
            return
        started = time.monotonic()
        try:
            revision = await self._bucket.put(
                member_key(self._member_id),
                self._member_record,
                self._member_rev,
                timeout=self._renew_interval,
            )
        except nats.js.errors.APIError as exc:
            if is_cas_conflict(exc):
                self._member_rev = None  # expired meanwhile: register again
            return
        except _TRANSIENT:
            return
        self._member_rev = revision
        self._member_deadline = started + self._ttl - self._margin

    async def _ensure_member(self) -> None:
        if self._member_rev is not None:
            return
        key = member_key(self._member_id)
        last, _ = await self._bucket.read(key)
        started = time.monotonic()
        self._member_rev = await self._bucket.put(key, self._member_record, last)
        self._member_deadline = started + self._ttl - self._margin

    # Release

    def _begin_drain(self, partition: int, lease: _Lease) -> None:
        lease.state = LeaseState.DRAINING
        lease.drain_deadline = time.monotonic() + self._drain_timeout
        self._serving.pop(partition, None)
        self._changed()
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
            self._host.drop(partition)
            try:
                await self._bucket.delete(lease_key(partition), lease.revision)
            except _TRANSIENT as exc:  # nobody renews it any more: it expires on its own
                _log.warning("lease delete failed", partition=partition, error=repr(exc))
            self._held.pop(partition, None)
            self._released[partition] = time.monotonic() + min(2.0, float(self._ttl))
        self._metrics.count(self._metrics.partition_moves, "released")
        _log.debug("partition released", partition=partition)
        self._changed()

    def _drop(self, partition: int, lease: _Lease, reason: str) -> None:
        """Stop serving at once (the lease is or may be gone); no KV writes."""
        if self._held.get(partition) is lease:
            del self._held[partition]
        self._serving.pop(partition, None)
        lease.state = LeaseState.RELEASING
        self._host.drop(partition)
        self._released[partition] = time.monotonic()
        self._metrics.count(self._metrics.partition_moves, "lost")
        _log.warning("partition lost", partition=partition, reason=reason)
        self._changed()
        self._wakeup.set()

    def _changed(self) -> None:
        self._host.partitions_changed(self.serving)

    def _reap_released(self) -> None:
        """Unsubscribe released partitions once their grace ends or a new holder shows up."""
        now = time.monotonic()
        gone = [
            p
            for p, until in self._released.items()
            if p not in self._held
            and p not in self._acquiring
            and (now >= until or self.held_elsewhere(p))
        ]
        if not gone:
            return
        for p in gone:
            del self._released[p]
        self._host.unsubscribe(gone)

    # Watch

    async def _open_bucket(self) -> None:
        record = await self._bucket.open(self._partitions, self._storage)
        self._view.epoch_base = record.epoch_base

    async def _start_watch(self) -> None:
        await self._stop_watch()
        self._view.clear()
        self._caught_up.clear()
        self._watch = await self._bucket.watch()
        self._watch_seen = time.monotonic()
        self._watch_task = asyncio.create_task(self._consume(self._watch), name="ndo-lease-watch")
        self._restart_watch = False
        with contextlib.suppress(TimeoutError):  # the loop goes on; rebalancing waits for it
            async with asyncio.timeout(self._renew_interval):
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
            changed = self._view.apply(entry.key, entry.revision or 0, entry_value(entry))
            reason = self._view.unreadable.get(entry.key)
            if reason is not None:
                self._warn_unreadable(entry.key, reason, _unreadable_action(entry.key))
                changed = True  # a lease may have become free
            if changed:
                self._wakeup.set()

    async def _refresh_lease(self, partition: int) -> None:
        revision, raw = await self._bucket.read(lease_key(partition))
        self._view.set_lease(partition, revision, raw)  # an unreadable value reads as free

    def _warn_unreadable(self, key: str, reason: str, action: str) -> None:
        """Log an unreadable bucket value, at most once per key every ``_WARN_INTERVAL``."""
        now = time.monotonic()
        last = self._warned.get(key)
        if last is not None and now - last < _WARN_INTERVAL:
            return
        if len(self._warned) >= _WARNED_KEYS:
            self._warned = {k: t for k, t in self._warned.items() if now - t < _WARN_INTERVAL}
            if len(self._warned) >= _WARNED_KEYS:
                self._warned.clear()
        self._warned[key] = now
        _log.warning(
            "unreadable value in the lease bucket (not written by ndo?)",
            key=key,
            reason=reason,
            action=action,
        )


def _draining(lease: _Lease) -> bool:
    return lease.state is LeaseState.DRAINING


def _unreadable_action(key: str) -> str:
    """What the workers do about an unreadable value at ``key`` (for the log line)."""
    if key.startswith("leases."):
        return "treated as a free lease: taken over at a new epoch"
    if key.startswith("members."):
        return "not counted as a member"
    return "ignored"


async def open_ownership(
    config: WorkerConfig,
    nc: NatsClient,
    host: PartitionHost,
    *,
    routing: str,
    metrics: WorkerMetrics,
    replicas: int = 1,
) -> Ownership:
    """The ownership ``config.ownership`` asks for on this server (see ``WorkerConfig``).

    ``auto`` shares partitions through leases when the server has JetStream, and otherwise serves
    every partition alone, with a warning.

    Raises:
        OwnershipError: ``leases`` was asked for and the server has no JetStream.
    """
    if config.ownership == "standalone":
        return ServeAll(host, config.partitions)
    try:
        await nc.jetstream().account_info()
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
        if config.storage == "replicated":
            raise OwnershipError(
                "--storage replicated keeps partitions in JetStream, which "
                f"{redact_url(config.nats_url)} does not offer; enable JetStream on the servers "
                "(or use --storage local)"
            ) from exc
        if config.ownership == "leases":
            raise OwnershipError(
                f"ownership='leases' needs JetStream, which {redact_url(config.nats_url)} does not "
                "offer; enable JetStream on the server (or run one worker, standalone)"
            ) from exc
        _log.warning(
            "the NATS server has no JetStream: this worker serves every partition alone; "
            "do not start a second worker on this deployment (enable JetStream to scale out)"
        )
        return ServeAll(host, config.partitions)
    return LeaseOwnership(
        host,
        nc,
        prefix=config.prefix,
        partitions=config.partitions,
        lease_ttl=config.lease_ttl,
        replicas=replicas,
        storage=config.storage,
        drain_timeout=config.drain_timeout,
        routing=routing,
        metrics=metrics,
    )
