"""``ReplicatedStorage``: partitions whose durable record is a replicated JetStream log.

``ndo serve --storage replicated``. Every partition has a log (``service._partition_log``) in a
stream replicated by the NATS cluster; the worker's SQLite file is only its *materialised copy*
of the partitions it holds (``synchronous=NORMAL``: no fsync on the reply path).

Commit (one group commit of the worker)
    The batch's write-sets are grouped per partition; each partition's share becomes one log
    record, appended with the partition's last sequence as the expected one. The appends of a
    batch go out together. A reply waits for its partition's append to be acknowledged by
    JetStream (with R3, by a quorum of servers); then the records are applied to the local copy,
    each moving the partition's stored position in the same transaction.

Fencing
    The append is the fence. A refused append (the log moved on) means another tenure wrote to
    the partition: its turns fail with ``FencedError`` and the ownership is told to drop it. An
    append whose outcome stays unknown past ``append_timeout`` fails its turns (retryable) and
    the partition is given up and claimed again, so the copy is re-read from the log.

Claim (taking up a partition)
    Bring the local copy to the end of the log (restoring the snapshot first when the copy is
    missing or older than what the log still holds), then append a *claim record* at the new
    epoch. After it, any append of an earlier holder is refused; before it, such an append lands
    and is read by the next catch-up — either way nothing acknowledged is lost.

Snapshots
    Every ``snapshot_every`` records, the holder stores a copy of the partition (its rows and
    log position) in the object store and purges the log below it, so streams stay bounded.

Foreign messages (something other than ndo published on a log subject)
    Every ndo append is fenced on the subject's last sequence, so an ndo record's ``prev`` is
    the sequence of the message right before it on the subject, whatever that message is, and
    its ``Nats-Msg-Id`` ends with that ``prev``. A message right after the copy's position that
    does not decode (or decodes but cannot sit there: its ``prev`` is before the position or
    not before itself) is therefore no ndo append: it is skipped, logged, and the position
    moves onto it (an empty step), so the next record, whose ``prev`` names it, follows. "Right
    after" must be proven, or records purged below a snapshot could hide behind it: the
    position's own message is still in the stream (purges only cut a prefix), or, for an empty
    copy, no snapshot was ever stored (so nothing was ever purged); otherwise the snapshot must
    cover the message. A message that does not decode but carries ndo's id for this place (an
    ndo of another version appended it) is never skipped: the claim fails, loudly, and the
    partition answers 503 until an ndo that reads it takes over. A holder whose append is
    refused because a foreign message landed after its last record skips it the same way and
    appends again, keeping its tenure (the fence still holds: any record of another tenure in
    between makes the refusal stand).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

import structlog
from nats.aio.client import Client as NatsClient

from ndo.actors.runtime import StorageLimits
from ndo.service._metrics import WorkerMetrics
from ndo.service._partition_log import (
    MAX_BATCH,
    AppendOutcomeUnknownError,
    LogConflictError,
    LogEntry,
    PartitionLog,
)
from ndo.service._snapshots import SnapshotStore
from ndo.storage import (
    AppliedMigration,
    AppliedRecord,
    ClassMigration,
    FencedError,
    LogRecord,
    MigrationError,
    ObjectWrite,
    PartialCommitError,
    SqliteStorage,
    Storage,
    StorageError,
    StoredAlarm,
    StoredObject,
    encode_log_record,
    pending_migrations,
)

__all__ = ["ReplicaStats", "ReplicatedStorage"]

_log = structlog.get_logger("ndo.storage")

_CLAIM_ATTEMPTS: Final = 5
"""Catch-up-then-claim rounds before claiming gives up (another writer kept appending)."""
_APPLY_BATCH: Final = 512
"""Log records applied to the local copy per transaction while catching up."""
_RECORD_HEADROOM: Final = 4096
"""Bytes kept free under the server's max_payload for headers and framing."""
_WRITE_SET_HEADROOM: Final = 4096
"""Bytes of a record kept for one write-set's own fields (names, alarm, idempotency key)."""
_SKIP_ROUNDS: Final = 3
"""Times one append skips foreign messages and tries again before it counts as fenced."""
_SKIP_AT_ONCE: Final = 64
"""Most foreign messages a holder skips in place; beyond it the partition is re-claimed."""
_SKIP_NOTES: Final = 5
"""Foreign messages logged one by one per catch-up (the rest are counted)."""
_CHAIN_ROUNDS: Final = 3
"""Attempts to find where a copy continues on the log (a snapshot restore takes one)."""


class _Verdict(Enum):
    """What a log message right after a copy's position is (``_verdict``)."""

    RECORD = "record"
    """An ndo record that follows the position: apply it."""
    FOREIGN = "foreign"
    """No ndo append could be there: skip it (once the position is proven to precede it)."""
    GAP = "gap"
    """An ndo record that follows a later position: the records between are missing."""
    UNREADABLE = "unreadable"
    """Its id says ndo appended it after the position, but this version cannot decode it."""


@dataclass(slots=True)
class _Tenure:
    """A partition this worker holds in the log."""

    epoch: int
    last_seq: int
    """The partition's last log record (the next append's ``prev``)."""
    since_snapshot: int = 0
    """Records appended since the last snapshot (or since the claim)."""


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What replicated storage has done since it opened."""

    appends: int
    """Log records appended (claims included)."""
    restored_records: int
    """Log records applied while catching up."""
    snapshots: int
    """Snapshots stored."""


LostCallback = Callable[[int, str], None]
"""``lost(partition, reason)``: this worker must stop serving ``partition`` now."""


class ReplicatedStorage(Storage):
    """Storage whose durable record is a replicated log per partition (see the module doc)."""

    # Configuration
    local: SqliteStorage
    """The local materialised copy (reads go straight to it)."""
    writer: str
    """This worker's name (in log records)."""
    _snapshot_every: int
    _append_timeout: float
    _metrics: WorkerMetrics
    # Parts reached through NATS (None until ``connect``)
    _log_stream: PartitionLog | None
    _snapshots: SnapshotStore | None
    _max_record: int
    # State
    _tenures: dict[int, _Tenure]
    _snapshotting: set[int]
    on_lost: LostCallback
    """Told when a partition must be dropped (set by the worker)."""
    _appends: int
    _restored: int
    _snapshots_taken: int

    def __init__(
        self,
        path: Path | str,
        *,
        partitions: int,
        writer: str,
        snapshot_every: int,
        append_timeout: float,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """Describe replicated storage with its local copy at ``path``; ``open`` opens the copy
        and ``connect`` reaches the logs.

        Args:
            path: the local copy's SQLite file.
            partitions: the deployment's partition count.
            writer: this worker's name.
            snapshot_every: log records of a partition between two snapshots.
            append_timeout: seconds an append retries while its outcome is unknown.
            metrics: where appends, restores and snapshots are counted (a private set when
                omitted).
        """
        self.local = SqliteStorage(path, partitions=partitions, synchronous="NORMAL")
        self.writer = writer
        self._snapshot_every = snapshot_every
        self._append_timeout = append_timeout
        self._metrics = metrics or WorkerMetrics()
        self._log_stream = None
        self._snapshots = None
        self._max_record = 1024 * 1024 - _RECORD_HEADROOM
        self._tenures = {}
        self._snapshotting = set()
        self.on_lost = _ignore_lost
        self._appends = 0
        self._restored = 0
        self._snapshots_taken = 0

    @property
    def stats(self) -> ReplicaStats:
        """Counters since open."""
        return ReplicaStats(
            appends=self._appends,
            restored_records=self._restored,
            snapshots=self._snapshots_taken,
        )

    def position(self, partition: int) -> int | None:
        """The last log record applied for a held partition (None: not held)."""
        tenure = self._tenures.get(partition)
        return None if tenure is None else tenure.last_seq

    # Lifecycle

    async def open(self) -> None:
        """Open the local copy."""
        await self.local.open()

    async def connect(self, nc: NatsClient, *, prefix: str, replicas: int) -> None:
        """Reach (creating if needed) the partition log stream and the snapshot store.

        Raises:
            StorageError: either cannot be created (for example: more replicas than servers).
        """
        log_stream = PartitionLog(
            nc, prefix, replicas=replicas, append_timeout=self._append_timeout
        )
        await log_stream.open()
        snapshots = SnapshotStore(nc, prefix, replicas=replicas)
        await snapshots.open()
        self._log_stream, self._snapshots = log_stream, snapshots
        self._max_record = max(64 * 1024, nc.max_payload - _RECORD_HEADROOM)

    def turn_limits(self, limits: StorageLimits) -> StorageLimits:
        """``limits`` with ``max_turn_bytes`` lowered to what one log record holds (known after
        ``connect``), so a turn too large to append fails with 413 ``turn_too_large`` as it
        writes, not with a 503 at its commit (and at every retry)."""
        fits = self._max_record - _WRITE_SET_HEADROOM
        if 0 < limits.max_turn_bytes <= fits:
            return limits
        return dataclasses.replace(limits, max_turn_bytes=fits)

    async def close(self) -> None:
        """Close the local copy and stop listening for acknowledgements."""
        self._tenures.clear()
        if self._log_stream is not None:
            await self._log_stream.close()
        await self.local.close()

    def _parts(self) -> tuple[PartitionLog, SnapshotStore]:
        if self._log_stream is None or self._snapshots is None:
            raise StorageError("replicated storage is not connected to NATS")
        return self._log_stream, self._snapshots

    # Reads: the local copy

    async def read(self, class_name: str, object_id: str, key: str) -> bytes | None:
        return await self.local.read(class_name, object_id, key)

    async def read_many(
        self, class_name: str, object_id: str, keys: Sequence[str]
    ) -> dict[str, bytes]:
        return await self.local.read_many(class_name, object_id, keys)

    async def read_range(
        self,
        class_name: str,
        object_id: str,
        *,
        start: str | None,
        end: str | None,
        limit: int | None,
        reverse: bool,
    ) -> list[tuple[str, bytes]]:
        return await self.local.read_range(
            class_name, object_id, start=start, end=end, limit=limit, reverse=reverse
        )

    async def read_alarm(self, class_name: str, object_id: str) -> float | None:
        return await self.local.read_alarm(class_name, object_id)

    async def object_size(self, class_name: str, object_id: str) -> int:
        return await self.local.object_size(class_name, object_id)

    async def list_objects(
        self,
        partition: int,
        *,
        class_name: str | None = None,
        id_prefix: str = "",
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[StoredObject]:
        return await self.local.list_objects(
            partition, class_name=class_name, id_prefix=id_prefix, after=after, limit=limit
        )

    async def count_objects(
        self, partition: int, *, class_name: str | None = None, id_prefix: str = ""
    ) -> dict[str, int]:
        return await self.local.count_objects(partition, class_name=class_name, id_prefix=id_prefix)

    async def read_idempotent(
        self, class_name: str, object_id: str, key: str, now: float
    ) -> bytes | None:
        return await self.local.read_idempotent(class_name, object_id, key, now)

    async def idempotency_horizon(
        self, class_name: str, object_id: str, now: float
    ) -> float | None:
        return await self.local.idempotency_horizon(class_name, object_id, now)

    async def due_alarms(
        self, partitions: Collection[int] | None, now: float, limit: int
    ) -> list[StoredAlarm]:
        return await self.local.due_alarms(partitions, now, limit)

    async def next_alarm_time(
        self, partitions: Collection[int] | None, after: float | None = None
    ) -> float | None:
        return await self.local.next_alarm_time(partitions, after)

    async def purge_idempotency(self, now: float, limit: int) -> int:
        """Expired idempotency records go from the local copy (every copy expires its own; a
        restored snapshot's expired records go at the next purge)."""
        return await self.local.purge_idempotency(now, limit)

    # Commit

    async def commit(self, entries: Sequence[ObjectWrite]) -> frozenset[int]:
        """Append each partition's share of the batch to its log, then apply what was
        acknowledged to the local copy.

        Raises:
            PartialCommitError: some partitions were not made durable (their turns fail).
            StorageError: none of the batch was made durable.
        """
        if not entries:
            return frozenset()
        shares: dict[int, list[ObjectWrite]] = {}
        for entry in entries:
            shares.setdefault(entry.partition, []).append(entry)
        fenced: set[int] = set()
        appending: list[tuple[int, _Tenure, list[ObjectWrite]]] = []
        for partition, share in shares.items():
            tenure = self._tenures.get(partition)
            if tenure is None or any(w.epoch != tenure.epoch for w in share):
                fenced.add(partition)  # not held, or written by an earlier tenure
            else:
                appending.append((partition, tenure, share))
        records: list[AppliedRecord] = []
        failed: dict[int, StorageError] = {}
        batched = await self._append_batch(appending, failed)
        if batched is not None:
            records.extend(batched)
            appending = []  # appended (or failed) as one batch
        outcomes = await asyncio.gather(
            *(self._append_share(p, tenure, share) for p, tenure, share in appending),
            return_exceptions=True,
        )
        for (partition, _, _), outcome in zip(appending, outcomes, strict=True):
            if isinstance(outcome, LogConflictError):
                fenced.add(partition)
                self._lose(partition, "another tenure appended to the partition's log")
            elif isinstance(outcome, StorageError):
                failed[partition] = outcome
                if isinstance(outcome, AppendOutcomeUnknownError):
                    self._lose(partition, "an append's outcome is unknown; re-reading the log")
            elif isinstance(outcome, Exception):  # a bug: fail the share, re-read the log
                _log.error("appending to a partition log failed", error=repr(outcome))
                failed[partition] = StorageError(f"appending to the log failed: {outcome!r}")
                self._lose(partition, "an append failed unexpectedly; re-reading the log")
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                records.extend(outcome)
        await self._apply_acknowledged(records)
        if failed:
            raise PartialCommitError(failed, frozenset(fenced))
        return frozenset(fenced)

    async def _append_batch(
        self,
        appending: list[tuple[int, _Tenure, list[ObjectWrite]]],
        failed: dict[int, StorageError],
    ) -> list[AppliedRecord] | None:
        """Append every partition's share as one atomic batch: one message each, one
        acknowledgement for all (the server stores them together, not one by one).

        Returns:
            The appended records; ``[]`` when the batch's outcome is unknown (its partitions
            are then in ``failed`` and given up); None when the shares must be appended one by
            one instead (one share only, a share too large for one record, a server without
            atomic batches, or a batch refused because some partition's log moved on: appending
            one by one finds out which).
        """
        log_stream, _ = self._parts()
        if len(appending) < 2 or len(appending) > MAX_BATCH or not log_stream.batches:
            return None
        if any(_estimated_size(share) > self._max_record // 2 for _, _, share in appending):
            return None
        batch = [
            (p, LogRecord(prev=t.last_seq, epoch=t.epoch, writer=self.writer, writes=share))
            for p, t, share in appending
        ]
        started = time.perf_counter()
        try:
            seqs = await log_stream.append_batch(batch)
        except LogConflictError:
            return None
        except AppendOutcomeUnknownError as exc:
            self._metrics.count(self._metrics.log_appends, "failed", amount=len(appending))
            for partition, _, _ in appending:
                failed[partition] = exc
                self._lose(partition, "an append's outcome is unknown; re-reading the log")
            return []
        except StorageError as exc:
            _log.warning("an atomic batch was refused; appending one by one", error=str(exc))
            return None
        self._appends += len(batch)
        self._metrics.count(self._metrics.log_appends, "ok", amount=len(batch))
        self._metrics.log_append_seconds.observe(time.perf_counter() - started)
        applied: list[AppliedRecord] = []
        for (partition, tenure, share), (_, record), seq in zip(
            appending, batch, seqs, strict=True
        ):
            tenure.last_seq = seq
            tenure.since_snapshot += 1
            applied.append(AppliedRecord(partition, record.prev, seq, tenure.epoch, share))
        return applied

    async def _append_share(
        self, partition: int, tenure: _Tenure, share: list[ObjectWrite]
    ) -> list[AppliedRecord]:
        """Append one partition's share as one record (several when it exceeds the server's
        payload limit), in order."""
        chunks = self._chunks(share)
        applied: list[AppliedRecord] = []
        for i, chunk in enumerate(chunks):
            started = time.perf_counter()
            try:
                record, seq = await self._append_past_foreign(partition, tenure, chunk, applied)
            except LogConflictError:
                self._metrics.count(self._metrics.log_appends, "fenced")
                raise
            except AppendOutcomeUnknownError:
                self._metrics.count(self._metrics.log_appends, "failed")
                raise
            except StorageError as exc:
                self._metrics.count(self._metrics.log_appends, "failed")
                if i == 0:
                    raise  # refused, and nothing of this share is in the log
                # Earlier records of the share are in the log, this one is not: the copy
                # must be re-read, as after an unknown outcome.
                raise AppendOutcomeUnknownError(str(exc)) from None
            self._appends += 1
            self._metrics.count(self._metrics.log_appends, "ok")
            self._metrics.log_append_seconds.observe(time.perf_counter() - started)
            tenure.last_seq = seq
            tenure.since_snapshot += 1
            applied.append(AppliedRecord(partition, record.prev, seq, tenure.epoch, chunk))
        return applied

    async def _append_past_foreign(
        self,
        partition: int,
        tenure: _Tenure,
        chunk: list[ObjectWrite],
        applied: list[AppliedRecord],
    ) -> tuple[LogRecord, int]:
        """Append one record; when it is refused because only foreign messages landed after
        the tenure's last record, skip them (an empty step each in ``applied``) and append
        again.

        Raises:
            LogConflictError: another tenure appended (or the log could not be checked).
        """
        log_stream, _ = self._parts()
        for rounds in range(_SKIP_ROUNDS + 1):
            record = LogRecord(
                prev=tenure.last_seq, epoch=tenure.epoch, writer=self.writer, writes=chunk
            )
            try:
                return record, await log_stream.append(partition, record)
            except LogConflictError:
                if rounds == _SKIP_ROUNDS:
                    raise
                try:
                    skipped_to = await self._skip_foreign(partition, tenure.last_seq)
                except StorageError as exc:
                    _log.warning(
                        "cannot check why an append was refused",
                        partition=partition,
                        error=str(exc),
                    )
                    raise LogConflictError(partition, "the log could not be checked") from None
                if skipped_to is None:
                    raise
            applied.append(AppliedRecord(partition, tenure.last_seq, skipped_to, tenure.epoch, []))
            tenure.last_seq = skipped_to
        raise AssertionError("unreachable")  # the last round returns or raises

    async def _skip_foreign(self, partition: int, last_seq: int) -> int | None:
        """After a refused append: the sequence of the last message the log gained after
        ``last_seq`` (this tenure's last record) if all of them are foreign; None if any is
        not (another tenure appended: the refusal stands), or if there are too many.

        Raises:
            StorageError: the log could not be read.
        """
        log_stream, _ = self._parts()
        if not await log_stream.holds(partition, last_seq):
            return None  # our own record was purged: someone else took a snapshot
        at = last_seq
        for _ in range(_SKIP_AT_ONCE):
            entry = await log_stream.entry_after(partition, at)
            if entry is None:
                return None if at == last_seq else at
            if _verdict(partition, entry, at) is not _Verdict.FOREIGN:
                return None
            self._note_skip(partition, entry, at)
            at = entry.seq
        return None

    def _note_skip(self, partition: int, entry: LogEntry, at: int) -> None:
        _log.warning(
            "skipping a message on a partition log that ndo did not append",
            partition=partition,
            seq=entry.seq,
            after=at,
            reason=entry.problem or _misplaced(entry, at),
            stream=self._parts()[0].stream,
        )

    def _chunks(self, share: list[ObjectWrite]) -> list[list[ObjectWrite]]:
        """Split a share into records under the payload limit; one write-set stays whole.

        Raises:
            StorageError: one write-set alone is larger than the limit (nothing is appended).
        """
        if _estimated_size(share) <= self._max_record // 2:
            return [share]  # the common case: no need to encode it twice
        whole = LogRecord(prev=0, epoch=0, writer=self.writer, writes=share)
        if len(encode_log_record(whole)) <= self._max_record:
            return [share]
        chunks: list[list[ObjectWrite]] = [[]]
        size = 0
        for write in share:
            one = len(encode_log_record(LogRecord(prev=0, epoch=0, writer="", writes=[write])))
            if one > self._max_record:
                raise StorageError(
                    f"a write-set of {one} bytes does not fit in one partition log record "
                    f"(at most {self._max_record} bytes: the NATS server's max_payload); "
                    "write less in one call, or raise max_payload on the server"
                )
            if chunks[-1] and size + one > self._max_record:
                chunks.append([])
                size = 0
            chunks[-1].append(write)
            size += one
        return chunks

    async def _apply_acknowledged(self, records: list[AppliedRecord]) -> None:
        """Apply acknowledged records to the local copy. They are durable whatever happens
        here; a partition whose copy could not follow is dropped and claimed again (re-read)."""
        if not records:
            return
        try:
            broken = await self.local.apply_records(records)
        except StorageError as exc:
            _log.error("applying acknowledged records to the local copy failed", error=str(exc))
            broken = {r.partition: str(exc) for r in records}
        for partition, why in broken.items():
            self._lose(partition, f"the local copy did not follow the log: {why}")

    def _lose(self, partition: int, reason: str) -> None:
        if self._tenures.pop(partition, None) is not None:
            _log.warning("giving a partition up", partition=partition, reason=reason)
            self.on_lost(partition, reason)

    # Claim

    async def claim_partitions(
        self, partitions: Iterable[int], owner: str, epoch: int | None = None
    ) -> dict[int, int]:
        """Bring each partition's local copy to the end of its log, then append a claim record
        at ``epoch`` (``None``: one above the log's latest epoch).

        Raises:
            FencedError: the log already holds a newer epoch than ``epoch``.
            StorageError: the log could not be read or appended to.
        """
        claimed: dict[int, int] = {}
        for partition in partitions:
            claimed[partition] = await self._claim(partition, epoch)
        return claimed

    async def _claim(self, partition: int, epoch: int | None) -> int:
        log_stream, _ = self._parts()
        self._tenures.pop(partition, None)
        for _ in range(_CLAIM_ATTEMPTS):
            seq, last_epoch = await self.catch_up(partition)
            new_epoch = last_epoch + 1 if epoch is None else epoch
            if last_epoch > new_epoch:
                raise FencedError({partition})
            record = LogRecord(prev=seq, epoch=new_epoch, writer=self.writer, claim=True)
            try:
                new_seq = await log_stream.append(partition, record)
            except LogConflictError:
                self._metrics.count(self._metrics.log_appends, "fenced")
                continue  # someone appended meanwhile: read again
            self._appends += 1
            self._metrics.count(self._metrics.log_appends, "ok")
            broken = await self.local.apply_records(
                [AppliedRecord(partition, seq, new_seq, new_epoch, [])]
            )
            if broken:
                raise StorageError(f"partition {partition}: {broken[partition]}")
            self._tenures[partition] = _Tenure(new_epoch, new_seq)
            return new_epoch
        raise StorageError(
            f"partition {partition}'s log kept moving while this worker claimed it "
            "(another worker still appends to it?)"
        )

    async def catch_up(self, partition: int) -> tuple[int, int]:
        """Bring the local copy of ``partition`` to the end of its log, skipping messages that
        ndo did not append (see the module doc).

        Returns:
            The copy's log position and the epoch of the last record applied.

        Raises:
            StorageError: the log or the snapshot store could not be read, they do not cover
                the copy's gap, or the log holds a record this version cannot read.
        """
        log_stream, _ = self._parts()
        positions = await self.local.log_positions()
        at, epoch = positions.get(partition, (0, 0))
        tail = await log_stream.last(partition)
        if tail == at:
            return at, epoch
        if tail < at:
            raise StorageError(
                f"partition {partition}'s local copy is at log record {at} but the log "
                f"{log_stream.stream} ends at {tail}: the stream was deleted or replaced. "
                "Move this data directory aside to serve from what the log holds"
            )
        started = time.monotonic()
        at, epoch = await self._chain_start(partition, at, epoch)
        restored = skipped = unapplied = 0
        pending: list[AppliedRecord] = []
        async for batch in log_stream.entries(partition, at, tail):
            for entry in batch:
                verdict = _verdict(partition, entry, at)
                if verdict is _Verdict.RECORD and entry.record is not None:
                    record = entry.record
                    pending.append(
                        AppliedRecord(partition, at, entry.seq, record.epoch, record.writes)
                    )
                    epoch = record.epoch
                    restored += 1
                    unapplied += 1
                elif verdict is _Verdict.FOREIGN:
                    if skipped < _SKIP_NOTES:
                        self._note_skip(partition, entry, at)
                    pending.append(AppliedRecord(partition, at, entry.seq, epoch, []))
                    skipped += 1
                else:
                    raise self._unfollowable(partition, entry, at, verdict)
                at = entry.seq
                if len(pending) >= _APPLY_BATCH:
                    await self._apply_caught_up(partition, pending, unapplied)
                    pending, unapplied = [], 0
        await self._apply_caught_up(partition, pending, unapplied)
        self._restored += restored
        if at != tail:
            raise StorageError(f"partition {partition}'s log ended at {at}, expected {tail}")
        if skipped > _SKIP_NOTES:
            _log.warning(
                "skipped messages on a partition log that ndo did not append",
                partition=partition,
                count=skipped,
            )
        _log.info(
            "partition caught up from its log",
            partition=partition,
            records=restored,
            skipped=skipped,
            position=at,
            seconds=round(time.monotonic() - started, 3),
        )
        return at, epoch

    async def _apply_caught_up(
        self, partition: int, pending: list[AppliedRecord], records: int
    ) -> None:
        """Apply what a catch-up read (``records`` of them are log records, the rest skips)."""
        if not pending:
            return
        broken = await self.local.apply_records(pending)
        if broken:
            raise StorageError(f"partition {partition}: {broken[partition]}")
        self._metrics.restored_records.inc(records)

    async def _chain_start(self, partition: int, at: int, epoch: int) -> tuple[int, int]:
        """Where the copy continues on the log: ``(at, epoch)`` when the message after ``at``
        follows it (or is a foreign message proven to come right after it), else the position
        of the snapshot restored to cover the gap.

        Raises:
            StorageError: nothing covers the gap, or the message after ``at`` is a record this
                version cannot read.
        """
        log_stream, _ = self._parts()
        for _ in range(_CHAIN_ROUNDS):
            first = await log_stream.entry_after(partition, at)
            if first is None:
                return at, epoch
            verdict = _verdict(partition, first, at)
            if verdict is _Verdict.RECORD:
                return at, epoch
            if verdict is _Verdict.UNREADABLE:
                raise self._unfollowable(partition, first, at, verdict)
            if verdict is _Verdict.GAP and first.record is not None:
                at, epoch = await self._restore_snapshot(partition, at, first.record.prev)
                continue
            # Foreign: skippable only if it comes right after ``at`` (nothing purged between).
            if await self._contiguous(partition, at):
                return at, epoch
            if first.record is not None and first.record.prev < at:
                raise StorageError(
                    f"partition {partition}'s local copy (at log record {at}) is not on the "
                    f"log's chain (record {first.seq} follows {first.record.prev}); move this "
                    "data directory aside to serve from what the log holds"
                )
            at, epoch = await self._restore_snapshot(partition, at, first.seq)
        raise StorageError(
            f"partition {partition}'s log does not continue its snapshot at {at}; move the "
            "data directory aside, or restore the log"
        )

    async def _contiguous(self, partition: int, at: int) -> bool:
        """Whether the log's next message after position ``at`` is the one that followed it
        when appended: nothing after ``at`` was purged (``at``'s own message is still there;
        for an empty copy, no snapshot was ever stored, and ndo purges only below one)."""
        log_stream, snapshots = self._parts()
        if at == 0:
            return await snapshots.info(partition) is None
        return await log_stream.holds(partition, at)

    def _unfollowable(
        self, partition: int, entry: LogEntry, at: int, verdict: _Verdict
    ) -> StorageError:
        """The error (logged) for a message the copy cannot get past."""
        stream = self._parts()[0].stream
        if verdict is _Verdict.UNREADABLE:
            message = (
                f"message {entry.seq} of {stream} on partition {partition}'s log carries ndo's "
                f"append id ({entry.msg_id}) but is not a record this version reads "
                f"({entry.problem}); written by another ndo version? The partition is not "
                "served until a worker that reads it claims it"
            )
            _log.error(
                "a partition log record cannot be read; not serving the partition",
                partition=partition,
                seq=entry.seq,
                reason=entry.problem,
            )
        else:
            prev = entry.record.prev if entry.record is not None else "?"
            message = (
                f"partition {partition}'s log skips from {at} to {prev} before record "
                f"{entry.seq} (purged meanwhile?)"
            )
        return StorageError(message)

    async def _restore_snapshot(self, partition: int, at: int, needed: int) -> tuple[int, int]:
        """Load the partition's snapshot: the log no longer holds the records after ``at``;
        the snapshot must cover at least ``needed``."""
        _, snapshots = self._parts()
        snapshot = await snapshots.get(partition)
        if snapshot is None or snapshot.seq < needed:
            have = "no readable snapshot" if snapshot is None else f"a snapshot at {snapshot.seq}"
            raise StorageError(
                f"partition {partition} cannot be restored: the local copy is at log record "
                f"{at}, the log resumes after {needed}, and the store has {have}"
            )
        await self.local.import_partition(snapshot)
        _log.info(
            "partition restored from its snapshot",
            partition=partition,
            position=snapshot.seq,
            keys=len(snapshot.kv),
        )
        return snapshot.seq, snapshot.epoch

    # Snapshots

    async def run_snapshots(self, interval: float = 1.0) -> None:
        """Snapshot held partitions that reached ``snapshot_every`` records (runs until
        cancelled)."""
        while True:
            await asyncio.sleep(interval)
            due = [p for p, t in self._tenures.items() if t.since_snapshot >= self._snapshot_every]
            for partition in due:
                try:
                    await self.snapshot(partition)
                except StorageError as exc:
                    _log.warning("snapshot failed", partition=partition, error=str(exc))

    async def snapshot(self, partition: int) -> int | None:
        """Store a snapshot of a held partition and purge its log below it.

        Returns:
            The log position the snapshot covers (None: the partition is not held).
        """
        log_stream, snapshots = self._parts()
        tenure = self._tenures.get(partition)
        if tenure is None or partition in self._snapshotting:
            return None
        self._snapshotting.add(partition)
        try:
            appended = tenure.since_snapshot
            snapshot = await self.local.export_partition(partition)
            stored = await snapshots.info(partition)
            if stored is not None and stored.readable and stored.seq >= snapshot.seq:
                if stored.seq <= await log_stream.last(partition):
                    return stored.seq  # a newer tenure's (we are stale), or ours already
                _log.warning(
                    "replacing a snapshot that claims a log position past the log's end "
                    "(not written by ndo?)",
                    partition=partition,
                    claimed=stored.seq,
                )
            size = await snapshots.put(snapshot)
            if self._tenures.get(partition) is not tenure:
                return None  # given up meanwhile: the new holder purges
            await log_stream.purge_below(partition, snapshot.seq)
            tenure.since_snapshot = max(0, tenure.since_snapshot - appended)
            self._snapshots_taken += 1
            self._metrics.snapshots.inc()
            _log.debug(
                "partition snapshot stored",
                partition=partition,
                position=snapshot.seq,
                bytes=size,
            )
            return snapshot.seq
        finally:
            self._snapshotting.discard(partition)

    # Class migrations

    async def stored_classes(self) -> list[str]:
        """The classes in the local copy (only the partitions this machine held last)."""
        return await self.local.stored_classes()

    async def applied_migrations(self) -> list[AppliedMigration]:
        return await self.local.applied_migrations()

    async def apply_migrations(
        self,
        migrations: Sequence[ClassMigration],
        *,
        partition_of: Callable[[str, str], int],
        worker: str,
    ) -> list[AppliedMigration]:
        """Refuse pending migrations: not supported with replicated storage (yet).

        The partition logs are the durable record and this SQLite file only a copy of them: a
        rename made here would be undone by the next catch-up or restore, and differ from every
        other machine's copy. Migrations recorded in the copy are only checked.

        Raises:
            MigrationError: some of ``migrations`` were never applied.
        """
        pending = pending_migrations(migrations, await self.local.applied_migrations())
        if pending:
            tags = ", ".join(repr(m.tag) for m in pending)
            raise MigrationError(
                f"class migration(s) {tags} cannot be applied with --storage replicated: the "
                "durable record is each partition's JetStream log, and a rename or deletion "
                "made in this machine's SQLite copy would be undone by the log (and differ from "
                "the other machines' copies). Remove them from the config file and keep serving "
                "the classes under their stored names (a Python class keeps its stored name "
                "when it keeps its class name); see docs/migrations.md"
            )
        return []


def _verdict(partition: int, entry: LogEntry, at: int) -> _Verdict:
    """What ``entry`` is, as the message right after position ``at`` of ``partition``'s log.

    An ndo append is fenced on the subject's last sequence, so its ``prev`` is the message
    before it (``at`` here) and its id is ``<epoch>.<partition>.<prev>``.
    """
    record = entry.record
    if record is None:
        epoch, _, rest = entry.msg_id.partition(".")
        if epoch.isdigit() and rest == f"{partition}.{at}":
            return _Verdict.UNREADABLE
        return _Verdict.FOREIGN
    if record.prev == at:
        return _Verdict.RECORD
    if at < record.prev < entry.seq:
        return _Verdict.GAP
    return _Verdict.FOREIGN


def _misplaced(entry: LogEntry, at: int) -> str:
    """Why a decodable record is no ndo append after position ``at``."""
    prev = entry.record.prev if entry.record is not None else 0
    return f"a record claiming to follow {prev} cannot sit after {at}"


def _estimated_size(share: list[ObjectWrite]) -> int:
    """An upper bound-ish of a share's encoded size (exact when it matters: near the limit)."""
    size = 0
    for write in share:
        size += 128 + len(write.class_name) + len(write.object_id)
        size += sum(len(k) + (0 if v is None else len(v)) + 8 for k, v in write.writes.items())
        if write.idempotent_reply is not None:
            size += 32 + len(write.idempotent_reply.key) + len(write.idempotent_reply.reply)
    return size


def _ignore_lost(partition: int, reason: str) -> None:
    """``on_lost`` before the worker sets it."""
