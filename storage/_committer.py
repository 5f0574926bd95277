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
)
from ndo.storage._records import ObjectWrite

__all__ = ["CommitAbandonedError", "CommitStats", "CommitWaiter", "GroupCommitter", "PendingCommit"]

DEFAULT_MAX_BATCH: Final = 2048
"""Most write-sets in one transaction; a longer queue is committed in several."""

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
    _observer: Callable[[list[ObjectWrite], float], None] | None
    _on_failure: Callable[[BaseException], None] | None
    # State
    _queue: deque[PendingCommit]
    _wakeup: asyncio.Event
    _task: asyncio.Task[None] | None
    _delivery: asyncio.Task[None] | None
    """Telling the waiters of the last clean commit (runs while the next one commits)."""
    _stopping: bool
    stats: CommitStats

    def __init__(
        self,
        storage: Storage,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        observer: Callable[[list[ObjectWrite], float], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Create a committer writing to ``storage``; call ``start()`` before submitting.

        ``observer(entries, seconds)`` is told about every successful transaction (metrics,
        alarm wake-ups); it must not keep ``entries``. ``on_failure(error)`` is told about every
        transaction that failed.
        """
        self._storage = storage
        self._max_batch = max_batch
        self._observer = observer
        self._on_failure = on_failure
        self._queue = deque()
        self._wakeup = asyncio.Event()
        self._task = None
        self._delivery = None
        self._stopping = False
        self.stats = CommitStats()

    @property
    def queued(self) -> int:
        """Write-sets waiting for a transaction."""
        return len(self._queue)

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
        fenced: frozenset[int] = frozenset()
        failed: dict[int, StorageError] = {}
        if entries:
            started = time.perf_counter()
            try:
                fenced = await self._storage.commit(entries)
            except PartialCommitError as exc:  # some partitions durable, others not
                self.stats.failures += 1
                _log.error("group commit failed in part", write_sets=len(entries), error=str(exc))
                if self._on_failure is not None:
                    self._on_failure(exc)
                fenced, failed = exc.fenced, exc.failed
            except (StorageError, ValueError) as exc:
                self.stats.failures += 1
                _log.error("group commit failed", write_sets=len(entries), error=str(exc))
                if self._on_failure is not None:
                    self._on_failure(exc)
                return [
                    (pending, CommitAbandonedError() if id(pending) in abandoned else exc)
                    for pending in batch
                ], False
            self.stats.transactions += 1
            self.stats.write_sets += sum(
                1 for e in entries if e.partition not in fenced and e.partition not in failed
            )
            if self._observer is not None:
                self._observer(entries, time.perf_counter() - started)
        outcomes: list[tuple[PendingCommit, BaseException | None]] = []
        for pending in batch:  # outcomes in submission order, abandoned ones included
            write = pending.write
            if id(pending) in abandoned:
                outcomes.append((pending, CommitAbandonedError()))
            elif write is not None and write.partition in failed:
                outcomes.append((pending, failed[write.partition]))
            elif write is not None and write.partition in fenced:
                outcomes.append((pending, FencedError({write.partition})))
            else:
                outcomes.append((pending, None))
        return outcomes, not (abandoned or fenced or failed)


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
