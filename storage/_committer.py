"""Group commit: many objects' write-sets share one transaction and one fsync.

The committer takes everything queued since its last commit, writes it in one ``Storage.commit``
call, then tells each waiter, in submission order, whether its write-set is durable. While a
commit is in flight new write-sets queue up and form the next batch; when nothing else is queued a
write-set commits at once (no timer). Being FIFO, it makes each object's turns durable in the
order they ran.

**Delivery overlaps the next commit.** Telling a batch's waiters (each sends its reply, events
and journal record) takes a good part of a millisecond for a batch of tens; when the batch was
committed in full, the next batch's transaction starts at once and the waiters are told
meanwhile, by a delivery task; the next delivery waits for it, so batches are told in order and
at most one delivery overlaps one commit. This is safe because a waiter of a
clean commit only releases what is already durable. After a commit that failed or was fenced in
part, the waiters are told before the next batch is taken: they reset their objects, and the
next batch must see that (``commit_wanted``) so no write built on a failed one is committed.

**A refused write-set fails only its own object.** When a batch's transaction fails for what
a write-set holds (``WriteRejectedError``: a constraint, a value storage cannot store, a damaged
page; or a ``ValueError`` from building its rows), the batch is committed again without it: its
objects are split in halves, each half committed on its own, and a half that fails again is
split further, until the objects at fault are alone (about two transactions per halving, so
one bad object in a batch of n costs ~2·log2(n) extra transactions). Each object's write-sets
stay together and in order; objects are independent, so committing them in several
transactions changes nothing but the number of fsyncs. Only the waiters of the refused objects
get the error; the others are durable and told so. A failure that is about the disk or the
process (full, I/O, busy, closed) fails every write-set of the batch alike, with no retry;
during the split it fails the objects not yet committed. ``stats.failures`` counts every failed
transaction, the split's included.

**A bounded queue.** ``max_queued`` write-sets may wait (default 20,000); past it ``full`` is
true. ``submit`` still accepts (a turn already ran and must be answered), so the bound is kept
by whoever runs turns: it waits in ``wait_for_room()`` before running a turn that may write,
which returns at once while the queue is not full and otherwise when the next batch is taken.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from ndo.storage._base import Storage
from ndo.storage._errors import (
    FencedError,
    PartialCommitError,
    StorageClosedError,
    StorageError,
    WriteRejectedError,
)
from ndo.storage._records import ObjectWrite

__all__ = ["CommitAbandonedError", "CommitStats", "CommitWaiter", "GroupCommitter", "PendingCommit"]

DEFAULT_MAX_BATCH: Final = 2048
"""Most write-sets in one transaction; a longer queue is committed in several."""

DEFAULT_MAX_QUEUED: Final = 20_000
"""Write-sets that may wait for a transaction before the committer counts as ``full``."""

_ObjectKey = tuple[str, str]
"""``(class_name, object_id)``."""

_log = structlog.get_logger("ndo.storage")


class CommitAbandonedError(StorageError):
    """A write-set was not committed because an earlier write-set of the same object failed."""

    def __init__(self) -> None:
        super().__init__("an earlier write of this object failed; this one was not applied")


class CommitWaiter(Protocol):
    """Who learns the outcome of a submitted write-set (a turn in the runtime)."""

    def commit_wanted(self) -> bool:
        """Return False to drop the write-set unwritten (its object was reset meanwhile)."""
        ...

    async def commit_done(self, error: BaseException | None) -> None:
        """Called once, in submission order: ``None`` when durable, else why not.

        It runs inside the commit loop (that is how replies leave in order), so it must not
        raise and should not wait on anything but sending its reply.
        """
        ...


@dataclass(slots=True)
class PendingCommit:
    """A write-set waiting for the next group commit, with whoever waits for it."""

    write: ObjectWrite | None
    """``None``: nothing to write; the waiter only needs the commits before it to be durable."""
    waiter: CommitWaiter


@dataclass(slots=True)
class CommitStats:
    """Counters since the committer started."""

    transactions: int = 0
    """Storage transactions run (one fsync each)."""
    write_sets: int = 0
    """Non-empty write-sets made durable."""
    failures: int = 0
    """Transactions that failed."""


class GroupCommitter:
    """Batches write-sets into storage transactions, FIFO, one transaction at a time."""

    # Configuration
    _storage: Storage
    _max_batch: int
    _max_queued: int
    _observer: Callable[[list[ObjectWrite], float], None] | None
    _on_failure: Callable[[BaseException], None] | None
    # State
    _queue: deque[PendingCommit]
    _wakeup: asyncio.Event
    _task: asyncio.Task[None] | None
    _delivery: asyncio.Task[None] | None
    """Telling the waiters of the last clean commit (runs while the next one commits)."""
    _room: asyncio.Future[None] | None
    """Resolved when the next batch is taken (exists while someone waits for room)."""
    _stopping: bool
    stats: CommitStats

    def __init__(
        self,
        storage: Storage,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queued: int = DEFAULT_MAX_QUEUED,
        observer: Callable[[list[ObjectWrite], float], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Create a committer writing to ``storage``; call ``start()`` before submitting.

        ``max_queued``: write-sets that may wait before ``full`` is true (see the module doc).
        ``observer(entries, seconds)`` is told about every successful transaction (metrics,
        alarm wake-ups); it must not keep ``entries``. ``on_failure(error)`` is told about every
        transaction that failed.
        """
        if max_batch < 1 or max_queued < 1:
            raise ValueError(
                f"max_batch and max_queued must be >= 1, got {max_batch} and {max_queued}"
            )
        self._storage = storage
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._observer = observer
        self._on_failure = on_failure
        self._queue = deque()
        self._wakeup = asyncio.Event()
        self._task = None
        self._delivery = None
        self._room = None
        self._stopping = False
        self.stats = CommitStats()

    @property
    def queued(self) -> int:
        """Write-sets waiting for a transaction."""
        return len(self._queue)

    @property
    def max_queued(self) -> int:
        """Write-sets that may wait before the committer is ``full``."""
        return self._max_queued

    @property
    def full(self) -> bool:
        """True when ``max_queued`` or more write-sets wait (``submit`` still accepts)."""
        return len(self._queue) >= self._max_queued

    async def wait_for_room(self) -> None:
        """Return at once when the queue is not full, else once batches taken made room (or
        the committer stops: ``submit`` then refuses)."""
        while self.full and not self._stopping:
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            # Shielded: one cancelled waiter must not cancel the future the others wait on.
            await asyncio.shield(self._room)

    def _room_made(self) -> None:
        """Wake whoever waits for room (a batch was taken, or the committer stops)."""
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    def start(self) -> None:
        """Start the commit loop."""
        if self._task is not None or self._stopping:
            raise RuntimeError("committer already started (a stopped one cannot restart)")
        self._task = asyncio.create_task(self._run(), name="ndo-group-commit")

    def submit(self, pending: PendingCommit) -> None:
        """Queue a write-set for the next transaction (never blocks)."""
        if self._stopping and self._task is None:
            raise StorageClosedError()
        self._queue.append(pending)
        self._wakeup.set()

    async def stop(self) -> None:
        """Commit everything already queued, then stop (idempotent)."""
        self._stopping = True
        self._wakeup.set()
        self._room_made()
        task, self._task = self._task, None
        if task is not None:
            await task
        while self._queue:  # submitted after the loop ended
            await _safe_done(self._queue.popleft(), StorageClosedError())

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._stopping:
                        return
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                outcomes, clean = await self._commit_next_batch()
                if self._delivery is not None:
                    # At most one delivery overlaps one commit: a waiter stuck in commit_done
                    # holds up the commits, as it did before deliveries were overlapped.
                    await self._delivery
                    self._delivery = None
                if clean:
                    self._delivery = asyncio.create_task(
                        _deliver(outcomes), name="ndo-commit-delivery"
                    )
                else:
                    await _deliver(outcomes)
        finally:
            delivery, self._delivery = self._delivery, None
            if delivery is not None:
                # Its outcomes are durable: it runs to the end even if this loop is cancelled.
                await asyncio.shield(delivery)

    async def _commit_next_batch(
        self,
    ) -> tuple[list[tuple[PendingCommit, BaseException | None]], bool]:
        """Commit the next batch; return each waiter's outcome in submission order, and whether
        the batch was committed in full (nothing failed, fenced or abandoned)."""
        batch: list[PendingCommit] = []
        abandoned: set[int] = set()  # ids of waiters that no longer want their write
        entries: list[ObjectWrite] = []
        while self._queue and len(batch) < self._max_batch:
            pending = self._queue.popleft()
            batch.append(pending)
            if not pending.waiter.commit_wanted():
                abandoned.add(id(pending))
            elif pending.write is not None and not pending.write.is_empty():
                entries.append(pending.write)
        self._room_made()
        fenced: frozenset[int] = frozenset()
        failed: dict[int, StorageError] = {}
        by_object: dict[_ObjectKey, BaseException] = {}
        if entries:
            try:
                fenced, failed = await self._transaction(entries)
            except (StorageError, ValueError) as exc:
                _log.error("group commit failed", write_sets=len(entries), error=str(exc))
                if not _refused(exc) or len({_key(e) for e in entries}) < 2:
                    return [
                        (pending, CommitAbandonedError() if id(pending) in abandoned else exc)
                        for pending in batch
                    ], False
                fenced, by_object = await self._isolate(entries, exc)
        outcomes: list[tuple[PendingCommit, BaseException | None]] = []
        for pending in batch:  # outcomes in submission order, abandoned ones included
            write = pending.write
            if id(pending) in abandoned:
                outcomes.append((pending, CommitAbandonedError()))
            elif write is None:
                outcomes.append((pending, None))
            elif (error := by_object.get(_key(write))) is not None:
                outcomes.append((pending, error))
            elif write.partition in failed:
                outcomes.append((pending, failed[write.partition]))
            elif write.partition in fenced:
                outcomes.append((pending, FencedError({write.partition})))
            else:
                outcomes.append((pending, None))
        return outcomes, not (abandoned or fenced or failed or by_object)

    async def _transaction(
        self, entries: list[ObjectWrite]
    ) -> tuple[frozenset[int], dict[int, StorageError]]:
        """Run one storage transaction; return the fenced partitions and those that failed
        alone (replicated storage), and count it.

        Raises:
            StorageError, ValueError: the transaction failed; nothing of it was written.
        """
        started = time.perf_counter()
        failed: dict[int, StorageError] = {}
        try:
            fenced = await self._storage.commit(entries)
        except PartialCommitError as exc:  # some partitions durable, others not
            self._failed(exc)
            _log.error("group commit failed in part", write_sets=len(entries), error=str(exc))
            fenced, failed = exc.fenced, exc.failed
        except (StorageError, ValueError) as exc:
            self._failed(exc)
            raise
        self.stats.transactions += 1
        self.stats.write_sets += sum(
            1 for e in entries if e.partition not in fenced and e.partition not in failed
        )
        if self._observer is not None:
            self._observer(entries, time.perf_counter() - started)
        return fenced, failed

    def _failed(self, error: BaseException) -> None:
        self.stats.failures += 1
        if self._on_failure is not None:
            self._on_failure(error)

    async def _isolate(
        self, entries: list[ObjectWrite], error: BaseException
    ) -> tuple[frozenset[int], dict[_ObjectKey, BaseException]]:
        """Commit a batch that was refused (``error``) again without the objects at fault, by
        halving it (see the module doc). Returns the partitions fenced in any transaction and
        each object whose write-sets were not made durable, with why."""
        groups: dict[_ObjectKey, list[ObjectWrite]] = {}
        for entry in entries:
            groups.setdefault(_key(entry), []).append(entry)
        keys = list(groups)
        fenced: set[int] = set()
        errors: dict[_ObjectKey, BaseException] = {}
        halted: BaseException | None = None  # a failure of the disk or process: stop there
        mid = len(keys) // 2
        stack = [keys[mid:], keys[:mid]]  # the first half is committed first
        while stack:
            part = stack.pop()
            if halted is not None:
                errors.update(dict.fromkeys(part, halted))
                continue
            writes = [w for key in part for w in groups[key]]
            try:
                part_fenced, part_failed = await self._transaction(writes)
            except (StorageError, ValueError) as exc:
                if not _refused(exc):
                    halted = exc
                    errors.update(dict.fromkeys(part, exc))
                elif len(part) == 1:
                    errors[part[0]] = exc
                    _log.error(
                        "write-set refused; only its object fails",
                        class_name=part[0][0],
                        object_id=part[0][1],
                        write_sets=len(writes),
                        error=str(exc),
                    )
                else:
                    half = len(part) // 2
                    stack.append(part[half:])
                    stack.append(part[:half])
                continue
            fenced.update(part_fenced)
            for w in writes:
                if w.partition in part_failed:
                    errors[_key(w)] = part_failed[w.partition]
                elif w.partition in part_fenced:
                    errors[_key(w)] = FencedError({w.partition})
        _log.warning(
            "group commit retried without the refused write-sets",
            objects=len(keys),
            refused=sum(1 for e in errors.values() if _refused(e)),
            failed=len(errors),
            first_error=str(error),
        )
        return frozenset(fenced), errors


def _key(write: ObjectWrite) -> _ObjectKey:
    return (write.class_name, write.object_id)


def _refused(error: BaseException) -> bool:
    """True when ``error`` refuses what the write-sets hold (deterministic), not the disk."""
    return isinstance(error, (WriteRejectedError, ValueError))


async def _deliver(outcomes: list[tuple[PendingCommit, BaseException | None]]) -> None:
    """Tell each waiter of one batch its outcome, in submission order."""
    for pending, error in outcomes:
        await _safe_done(pending, error)


async def _safe_done(pending: PendingCommit, error: BaseException | None) -> None:
    """Deliver an outcome; a waiter bug must not stop the commit loop."""
    try:
        await pending.waiter.commit_done(error)
    except Exception:  # a waiter must not raise; log and keep committing for everyone else
        _log.exception("commit waiter raised")
