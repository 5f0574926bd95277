"""The partition logs of replicated storage: one JetStream stream, one subject per partition.

Stream ``<PREFIX>_LOG`` captures ``<prefix>.sys.log.*``; partition ``p``'s log is the subject
``<prefix>.sys.log.<p>``. Every append carries ``Nats-Expected-Last-Subject-Sequence`` (the
record's ``prev``): JetStream refuses it when anyone appended to that partition meanwhile, so
the append *is* the fence (``LogConflictError``). It also carries a ``Nats-Msg-Id`` made of the
tenure's epoch, the partition and ``prev``, so an append retried after a lost acknowledgement
(a stream leader died mid-way) is answered with the first one's sequence instead of landing
twice or being refused.

A holder reads its partition's log to the end before it serves (``last``, ``entries``) and
purges it below a snapshot (``purge_below``). Messages are decoded defensively: ``entries`` and
``entry_after`` give a ``LogEntry`` whose ``record`` is None for a message that is not a log
record (someone else published on the subject), and ``ReplicatedStorage`` decides whether it
may skip it; ``read`` and ``first_after`` (for tools and tests) refuse such a message with a
``StorageError`` naming it. Nothing undecodable is ever applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import nats.errors
import nats.js.api as js_api
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

from ndo.service._cluster import supports_atomic_batches, until_ready
from ndo.storage import LogRecord, StorageError, decode_log_record, encode_log_record
from ndo.subjects import log_subject

__all__ = [
    "MAX_BATCH",
    "AppendOutcomeUnknownError",
    "LogConflictError",
    "LogEntry",
    "PartitionLog",
    "log_stream_name",
]

_log = structlog.get_logger("ndo.storage")

_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE: Final = 10071
_DUPLICATE_IN_BATCH: Final = 10201
"""An atomic batch holds a message id already stored: on a retry, the first attempt landed."""
_RETRYABLE_STATUS: Final = (503, 408)
_BATCH_ID: Final = "Nats-Batch-Id"
_BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
_BATCH_COMMIT: Final = "Nats-Batch-Commit"
MAX_BATCH: Final = 1_000
"""Most messages in one atomic batch (the server's limit)."""
_NOT_FOUND: Final = 10037
_FETCH_BATCH: Final = 512
_FETCH_UNREADY_RETRIES: Final = 10
"""Pulls retried while a fresh consumer answers 503 (about 5 s in all)."""
_RETRY_WAIT: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Seconds between attempts of an append whose outcome is unknown (then every second)."""
_REASON_LENGTH: Final = 160
"""Longest reason kept for a message that is not a log record."""
_TRANSIENT: Final = (nats.errors.Error, OSError, TimeoutError)
"""Failures of a publish or read that a retry may not see (no stream response during a
leader election, a reconnect, a timeout). JetStream API errors are handled before these."""


class LogConflictError(StorageError):
    """An append was refused: the partition's log moved on since ``prev`` (someone else appended,
    or the partition was claimed by a newer tenure). Deterministic for this record."""

    def __init__(self, partition: int, detail: str) -> None:
        self.partition = partition
        super().__init__(f"partition {partition}'s log moved on ({detail})")


class AppendOutcomeUnknownError(StorageError):
    """No acknowledgement came for an append within the append timeout: the record may or may
    not be in the log. The writer must re-read the log before it appends again."""


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One message of a partition's log, decoded defensively."""

    seq: int
    """Its stream sequence."""
    record: LogRecord | None
    """The record; None when the message is not a log record (``problem`` says why)."""
    problem: str = ""
    """Why the message is not a log record (empty when it is one)."""
    msg_id: str = ""
    """Its ``Nats-Msg-Id`` header: every ndo append carries ``<epoch>.<partition>.<prev>``."""


def log_stream_name(prefix: str) -> str:
    """Name of the partition log stream of a deployment: ``ndo`` -> ``NDO_LOG``."""
    return prefix.upper().replace(".", "_").replace("-", "_") + "_LOG"


class PartitionLog:
    """Appends to and reads the partition logs of one deployment."""

    # Configuration
    stream: str
    """The stream's name."""
    _nc: NatsClient
    _prefix: str
    _replicas: int
    _append_timeout: float
    _js: JetStreamContext
    _atomic: bool
    """The stream takes atomic batch publishes (nats-server 2.12+)."""
    # Batch acknowledgements
    _acks_inbox: str
    _acks_sub: Subscription | None
    _acks: dict[str, asyncio.Future[Msg]]
    _next_batch: int
    _batch_prefix: str

    def __init__(
        self, nc: NatsClient, prefix: str, *, replicas: int, append_timeout: float
    ) -> None:
        """Describe the logs of deployment ``prefix``; ``open`` creates the stream if needed.

        Args:
            nc: a connection to a server with JetStream.
            prefix: the deployment's subject prefix.
            replicas: replicas of the stream when ``open`` creates it.
            append_timeout: seconds an append keeps retrying while its outcome is unknown.
        """
        self.stream = log_stream_name(prefix)
        self._nc = nc
        self._prefix = prefix
        self._replicas = replicas
        self._append_timeout = append_timeout
        self._js = nc.jetstream()
        self._atomic = False
        self._acks_inbox = ""
        self._acks_sub = None
        self._acks = {}
        self._next_batch = 0
        self._batch_prefix = os.urandom(6).hex()

    async def open(self) -> js_api.StreamInfo:
        """Create the stream, or check the one that is there.

        Raises:
            StorageError: the stream cannot be created (for example: more replicas than the
                cluster has servers).
        """
        info = await self._open()
        self._atomic = bool(info.config.allow_atomic)
        if not self._atomic and supports_atomic_batches(self._nc):
            # A stream made before atomic batches were used: let it take them.
            with contextlib.suppress(nats.js.errors.Error, *_TRANSIENT):
                wanted = dataclasses.replace(info.config, allow_atomic=True)
                info = await self._js.update_stream(wanted)
                self._atomic = bool(info.config.allow_atomic)
        return info

    async def _open(self) -> js_api.StreamInfo:
        js = self._js
        what = f"partition log stream {self.stream}"
        try:
            return await until_ready(self._nc, lambda: js.stream_info(self.stream), what=what)
        except nats.js.errors.NotFoundError:
            pass
        config = js_api.StreamConfig(
            name=self.stream,
            description=f"ndo partition logs ({self._prefix}): the durable record of every "
            "partition with --storage replicated",
            subjects=[log_subject(self._prefix)],
            retention=js_api.RetentionPolicy.LIMITS,
            discard=js_api.DiscardPolicy.NEW,
            storage=js_api.StorageType.FILE,
            num_replicas=self._replicas,
            duplicate_window=120.0,
            allow_direct=True,
            allow_atomic=True if supports_atomic_batches(self._nc) else None,
        )
        try:
            return await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10058:  # already in use: another worker created it first
                return await until_ready(self._nc, lambda: js.stream_info(self.stream), what=what)
            raise StorageError(
                f"cannot create the partition log stream {self.stream} with "
                f"{self._replicas} replica(s): {exc.description}"
            ) from None
        except nats.js.errors.APIError as exc:
            raise StorageError(
                f"cannot create the partition log stream {self.stream} with "
                f"{self._replicas} replica(s): {exc.description}"
            ) from None

    async def append(self, partition: int, record: LogRecord) -> int:
        """Append ``record`` to ``partition``'s log if its last record is ``record.prev``.

        Retries while the outcome is unknown (no acknowledgement), up to the append timeout;
        a retry that finds the first attempt landed gets its sequence (deduplicated by id).

        Returns:
            The record's stream sequence.

        Raises:
            LogConflictError: the log moved on (the fence: this tenure is over).
            AppendOutcomeUnknownError: no acknowledgement within the append timeout (the
                record may or may not be in the log).
            StorageError: the server refused the record (it is not in the log).
        """
        data = encode_log_record(record)
        headers = _ids(partition, record)
        subject = log_subject(self._prefix, partition)
        js = self._js
        deadline = time.monotonic() + self._append_timeout
        attempt = 0
        while True:
            try:
                ack = await js.publish(subject, data, headers=headers, timeout=2.0)
                return int(ack.seq)
            except nats.js.errors.APIError as exc:
                if exc.err_code == _WRONG_LAST_SEQUENCE:
                    raise LogConflictError(
                        partition, exc.description or "wrong last sequence"
                    ) from None
                if not _retryable(exc):
                    raise StorageError(
                        f"the partition log refused a record of partition {partition}: "
                        f"{exc.description or exc}"
                    ) from None
                error: Exception = exc
            except _TRANSIENT as exc:
                error = exc
            if time.monotonic() >= deadline:
                raise AppendOutcomeUnknownError(
                    f"no acknowledgement from the partition log for partition {partition} in "
                    f"{self._append_timeout:g}s ({error!r}); the record may or may not be there"
                )
            await asyncio.sleep(_RETRY_WAIT[min(attempt, len(_RETRY_WAIT) - 1)])
            attempt += 1

    @property
    def batches(self) -> bool:
        """Whether ``append_batch`` can be used (the stream takes atomic batches)."""
        return self._atomic

    async def append_batch(self, records: Sequence[tuple[int, LogRecord]]) -> list[int]:
        """Append records of several partitions as one atomic batch: all of them or none.

        Each keeps its own fence (``Nats-Expected-Last-Subject-Sequence``) and id; the server
        stores a batch in one go and in order, so the records' sequences are consecutive and
        one acknowledgement covers them all. Retries while the outcome is unknown, like
        ``append``; a retry refused as a duplicate means the batch landed, and its sequences
        are then read back from the partitions' last records.

        Returns:
            Each record's stream sequence, in order.

        Raises:
            LogConflictError: some partition's log moved on (nothing was appended; which one
                is not said: append them one by one to find out).
            AppendOutcomeUnknownError: no acknowledgement within the append timeout.
            StorageError: the server refused the batch (nothing was appended).
        """
        if not 1 <= len(records) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} records, not {len(records)}")
        payloads = [
            (
                log_subject(self._prefix, partition),
                encode_log_record(record),
                _ids(partition, record),
            )
            for partition, record in records
        ]
        deadline = time.monotonic() + self._append_timeout
        attempt = 0
        while True:
            try:
                reply = await self._publish_batch(payloads)
            except _TRANSIENT as exc:
                error: object = exc
            else:
                code, value = _batch_outcome(reply)
                if code is None:
                    return list(range(value - len(records) + 1, value + 1))
                if code == _WRONG_LAST_SEQUENCE:
                    raise LogConflictError(records[0][0], f"batch refused: {value}")
                if code == _DUPLICATE_IN_BATCH and attempt > 0:
                    return await self._landed(records, payloads)
                if code not in _RETRYABLE_STATUS:
                    raise StorageError(f"the partition log refused a batch: {value}")
                error = value
            if time.monotonic() >= deadline:
                raise AppendOutcomeUnknownError(
                    f"no acknowledgement from the partition log for a batch of {len(records)} "
                    f"records in {self._append_timeout:g}s ({error!r}); they may or may not "
                    "be there"
                )
            await asyncio.sleep(_RETRY_WAIT[min(attempt, len(_RETRY_WAIT) - 1)])
            attempt += 1

    async def _publish_batch(self, payloads: list[tuple[str, bytes, dict[str, str]]]) -> Msg:
        """Publish one atomic batch and wait for its acknowledgement (the commit's reply)."""
        if self._acks_sub is None:
            self._acks_inbox = self._nc.new_inbox()
            self._acks_sub = await self._nc.subscribe(f"{self._acks_inbox}.*", cb=self._on_ack)
        token = str(self._next_batch)
        self._next_batch += 1
        batch_id = f"{self._batch_prefix}-{token}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        try:
            count = len(payloads)
            for index, (subject, data, ids) in enumerate(payloads, start=1):
                headers = {**ids, _BATCH_ID: batch_id, _BATCH_SEQUENCE: str(index)}
                last = index == count
                if last:
                    headers[_BATCH_COMMIT] = "1"
                await self._nc.publish(
                    subject,
                    data,
                    reply=f"{self._acks_inbox}.{token}" if last else "",
                    headers=headers,
                )
            async with asyncio.timeout(2.0):
                return await future
        except TimeoutError:
            raise nats.errors.TimeoutError() from None
        finally:
            self._acks.pop(token, None)

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.get(msg.subject.rpartition(".")[2])
        if future is not None and not future.done():
            future.set_result(msg)

    async def _landed(
        self,
        records: Sequence[tuple[int, LogRecord]],
        payloads: list[tuple[str, bytes, dict[str, str]]],
    ) -> list[int]:
        """The sequences of a batch that landed on an earlier attempt, from each partition's
        last record (its id must be ours: else the outcome stays unknown)."""
        seqs: list[int] = []
        for (partition, _), (_, _, ids) in zip(records, payloads, strict=True):
            try:
                msg = await self._js.get_msg(
                    self.stream, subject=log_subject(self._prefix, partition)
                )
            except (nats.js.errors.Error, *_TRANSIENT) as exc:
                raise AppendOutcomeUnknownError(
                    f"a batch landed but partition {partition}'s record cannot be read: {exc!r}"
                ) from None
            if (msg.headers or {}).get("Nats-Msg-Id") != ids["Nats-Msg-Id"]:
                raise AppendOutcomeUnknownError(
                    f"a batch landed, and partition {partition}'s log moved on since"
                )
            seqs.append(int(msg.seq or 0))
        return seqs

    async def close(self) -> None:
        """Stop listening for batch acknowledgements."""
        sub, self._acks_sub = self._acks_sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def last(self, partition: int) -> int:
        """Sequence of the last record of ``partition``'s log (0: the log is empty).

        Raises:
            StorageError: the stream did not answer.
        """
        try:
            msg = await self._nc.jetstream().get_msg(
                self.stream, subject=log_subject(self._prefix, partition)
            )
        except nats.js.errors.NotFoundError:
            return 0
        except (nats.js.errors.APIError, *_TRANSIENT) as exc:
            raise StorageError(f"cannot read partition {partition}'s log: {exc!r}") from None
        return int(msg.seq or 0)

    async def first_after(self, partition: int, seq: int) -> tuple[int, LogRecord] | None:
        """The first record of ``partition``'s log after sequence ``seq``, or None.

        Raises:
            StorageError: the stream did not answer, or the message is not a log record.
        """
        entry = await self.entry_after(partition, seq)
        return None if entry is None else (entry.seq, self._record(partition, entry))

    async def entry_after(self, partition: int, seq: int) -> LogEntry | None:
        """The first message of ``partition``'s log after sequence ``seq`` (None: there is none),
        whatever it holds.

        Raises:
            StorageError: the stream did not answer.
        """
        try:
            msg = await self._nc.jetstream().get_msg(
                self.stream, seq=seq + 1, subject=log_subject(self._prefix, partition), next=True
            )
        except nats.js.errors.NotFoundError:
            return None
        except (nats.js.errors.APIError, *_TRANSIENT) as exc:
            raise StorageError(f"cannot read partition {partition}'s log: {exc!r}") from None
        return _entry(int(msg.seq or 0), msg.data or b"", msg.headers)

    async def holds(self, partition: int, seq: int) -> bool:
        """Whether message ``seq`` of the stream is still there, on ``partition``'s log (it was
        not purged: every later message of the partition is there too).

        Raises:
            StorageError: the stream did not answer.
        """
        if seq <= 0:
            return False
        try:
            msg = await self._nc.jetstream().get_msg(self.stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.js.errors.APIError, *_TRANSIENT) as exc:
            raise StorageError(f"cannot read partition {partition}'s log: {exc!r}") from None
        return msg.subject == log_subject(self._prefix, partition)

    async def read(
        self, partition: int, after: int, until: int
    ) -> AsyncIterator[list[tuple[int, LogRecord]]]:
        """Yield ``partition``'s records after ``after`` up to ``until``, oldest first, in
        batches.

        Raises:
            StorageError: the stream did not answer, or a message is not a log record.
        """
        async for batch in self.entries(partition, after, until):
            yield [(entry.seq, self._record(partition, entry)) for entry in batch]

    async def entries(
        self, partition: int, after: int, until: int
    ) -> AsyncIterator[list[LogEntry]]:
        """Yield ``partition``'s messages after ``after`` up to ``until``, oldest first, in
        batches, each decoded defensively (``LogEntry.record`` None: not a log record).

        Raises:
            StorageError: the stream did not answer.
        """
        js = self._nc.jetstream()
        config = js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after + 1,
            ack_policy=js_api.AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
            description=f"ndo restore of partition {partition}",
        )
        subject = log_subject(self._prefix, partition)
        try:
            psub = await js.pull_subscribe(subject, stream=self.stream, config=config)
        except (nats.js.errors.APIError, *_TRANSIENT) as exc:
            raise StorageError(f"cannot read partition {partition}'s log: {exc!r}") from None
        try:
            at = after
            unready = 0
            while at < until:
                try:
                    msgs = await psub.fetch(_FETCH_BATCH, timeout=5.0)
                except nats.js.errors.ServiceUnavailableError:
                    # A consumer just created on a cluster may not answer its first pull yet.
                    unready += 1
                    if unready > _FETCH_UNREADY_RETRIES:
                        raise StorageError(
                            f"reading partition {partition}'s log: its consumer never became ready"
                        ) from None
                    await asyncio.sleep(0.1 * unready)
                    continue
                except (nats.js.errors.APIError, *_TRANSIENT) as exc:
                    raise StorageError(
                        f"reading partition {partition}'s log stopped at {at} of {until}: {exc!r}"
                    ) from None
                batch: list[LogEntry] = []
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if seq > until:
                        break
                    batch.append(_entry(seq, msg.data, msg.headers))
                    at = seq
                if batch:
                    yield batch
                if msgs and msgs[-1].metadata.sequence.stream >= until:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                consumer = (await psub.consumer_info()).name
                await psub.unsubscribe()
                await js.delete_consumer(self.stream, consumer)

    async def purge_below(self, partition: int, seq: int) -> None:
        """Drop ``partition``'s records below ``seq`` (a snapshot covers them)."""
        try:
            await self._nc.jetstream().purge_stream(
                self.stream, subject=log_subject(self._prefix, partition), seq=seq
            )
        except (nats.js.errors.APIError, *_TRANSIENT) as exc:
            _log.warning("purging a partition log failed", partition=partition, error=repr(exc))

    async def info(self) -> js_api.StreamInfo:
        """The stream's info (for status)."""
        return await self._nc.jetstream().stream_info(self.stream)

    def _record(self, partition: int, entry: LogEntry) -> LogRecord:
        if entry.record is None:
            raise StorageError(
                f"message {entry.seq} of {self.stream} on partition {partition}'s log is not a "
                f"log record ({entry.problem}); something other than ndo published there"
            )
        return entry.record


def _entry(seq: int, data: bytes, headers: dict[str, str] | None) -> LogEntry:
    """A log message decoded defensively."""
    msg_id = (headers or {}).get("Nats-Msg-Id", "")
    try:
        return LogEntry(seq, decode_log_record(data), msg_id=msg_id)
    except ValueError as exc:
        return LogEntry(seq, None, str(exc)[:_REASON_LENGTH], msg_id)


def _ids(partition: int, record: LogRecord) -> dict[str, str]:
    """The headers that fence a record (expected last sequence) and name it (its id)."""
    return {
        _EXPECTED_LAST: str(record.prev),
        "Nats-Msg-Id": f"{record.epoch}.{partition}.{record.prev}",
    }


def _batch_outcome(reply: Msg) -> tuple[int | None, Any]:
    """``(None, last sequence)`` for a stored batch, else ``(error code, description)``."""
    if reply.headers and reply.headers.get("Status") in ("503", "408"):
        return int(reply.headers["Status"]), "no stream response"
    try:
        answer = json.loads(reply.data)
    except ValueError:
        return 0, "unreadable acknowledgement"
    if not isinstance(answer, dict):
        return 0, "unreadable acknowledgement"
    error = answer.get("error")
    if isinstance(error, dict):
        code = error.get("err_code") or error.get("code") or 0
        if error.get("code") in _RETRYABLE_STATUS:
            code = error["code"]
        return int(code), str(error.get("description", error))
    seq = answer.get("seq")
    if not isinstance(seq, int) or seq <= 0:
        return 0, f"acknowledgement without a sequence: {answer}"
    return None, seq


def _retryable(exc: nats.js.errors.APIError) -> bool:
    """Whether a JetStream API error may pass (leader election, cluster catching up)."""
    return isinstance(exc, nats.js.errors.ServiceUnavailableError) or exc.code in (503, 408)
