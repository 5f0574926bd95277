"""Recording every finished turn to the journal stream, off the reply path.

The record format lives in ``service.journal`` (a contract with the tools that read it); this
module owns the two things only the worker does: creating or updating the **stream**
(``ensure_journal_stream``), and the **publisher** (``JournalPublisher``), plus the cheap
in-memory ``JournalEntry`` an activation hands over.

Publishing: an activation hands a finished turn to ``JournalPublisher.record`` *after* its reply
left (for a turn that wrote, after the commit). ``record`` only appends a cheap ``JournalEntry``
(references, nothing encoded) to a bounded buffer. A background task collects what arrives
during ``flush_interval`` (50 ms), encodes each entry as one JSON line and publishes **one
message per journal shard** holding all of that shard's lines (``<prefix>.sys.journal.<shard>``,
16 shards; a message stays under the server's max_payload). JetStream's cost is per stored
message (with ``sync_interval: always`` each one is a write and an fsync), so a message of a
hundred records costs the server about what one record did: this is what keeps history cheap
(docs/journal.md has the measurements). Each message asks for its own acknowledgement on the
publisher's inbox. No request ever waits for JetStream. A full buffer drops the entry; a missing
stream, a rejected message or an acknowledgement that does not arrive within ``ack_timeout``
loses its records. Each loss is counted in ``ndo_journal_failures_total{reason}`` and logged
(rate limited); none fails a request.

What is recorded: every turn that changed state or could explain a problem (writes, alarm
deliveries, errors, aborted turns, duplicates, ``on_stop`` turns that wrote, emitted or failed);
a read-only turn that succeeded only with ``reads`` (``--journal-reads``): reads are most of the
traffic and change nothing replay needs.

Record order: records of one object leave in the order its turns ran. Committed turns are
released in commit order; a turn that needs no commit (a failure, a duplicate) is recorded
behind the object's pending writes (the activation makes it a follower of the pending turn).

A worker without a journal gets ``JOURNAL_OFF``, which records nothing, so activations never
ask whether there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import deque
from itertools import takewhile
from typing import Any, Final, Protocol

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api

from ndo.actors import ActorError, ActorId
from ndo.actors.runtime import TurnWrites
from ndo.service._cluster import until_ready
from ndo.service._envelope import Envelope
from ndo.service._metrics import WorkerMetrics
from ndo.service.journal import (
    JournalAlarm,
    JournalError,
    JournalRecord,
    TurnKind,
    TurnStatus,
    encode_journal_record,
    journal_stream_name,
    journal_stream_subjects,
    jsonable_args,
    jsonable_value,
    jsonable_writes,
)
from ndo.subjects import (
    MSGPACK_CONTENT_TYPE,
    Header,
    journal_shard,
    journal_shard_of_partition,
    journal_subject,
)

__all__ = [
    "JOURNAL_OFF",
    "Journal",
    "JournalEntry",
    "JournalPublisher",
    "ensure_journal_stream",
    "journal_record",
]

_log = structlog.get_logger("ndo.journal")

_STREAM_DESCRIPTION: Final = (
    "ndo journal: <prefix>.sys.journal.<shard>, many turn records (JSON lines) per message"
)
_STATUS: Final = "Status"
_STORED: Final = b'{"stream":'
"""How a JetStream PubAck starts (an error reply starts with ``{"error":``)."""
_WARN_EVERY: Final = 30.0
"""Seconds between two warnings about lost journal records (the counter has every loss)."""
_SWEEP_INTERVAL: Final = 0.5
"""Seconds between checks for acknowledgements that did not arrive in time."""
_FLUSH_INTERVAL: Final = 0.05
"""Seconds the publisher collects records before it publishes them (the most a record waits)."""
_MAX_PASS: Final = 20_000
"""Most entries one pass encodes before it publishes (bounds the time between two awaits)."""
_MAX_MESSAGE: Final = 512 * 1024
"""Most bytes of one journal message (lower when the server's max_payload is lower)."""


class JournalEntry:
    """A finished turn as the activation hands it over: references only, encoded later.

    Building one costs an allocation; the decoding and encoding happen in the publisher's
    background task, never on the reply path.
    """

    __slots__ = (
        "activation",
        "address",
        "body",
        "changes",
        "duration",
        "envelope",
        "error",
        "fresh",
        "kind",
        "only_if_aborted",
        "partition",
        "started",
        "status",
        "write_count",
    )

    address: ActorId
    partition: int
    kind: TurnKind
    status: TurnStatus
    envelope: Envelope
    body: bytes | None
    """The reply body (``ok`` and ``duplicate``)."""
    error: ActorError | None
    changes: TurnWrites | None
    """The committed write-set (``ok``); never mutated after the turn ended."""
    started: float
    """``time.time()`` when the turn started."""
    duration: float
    fresh: bool
    activation: str
    """Token of the activation that ran the turn (stamped when the record is released)."""
    write_count: int
    """State-changing records of that activation up to this one (stamped on release)."""
    only_if_aborted: bool
    """A read-only turn that is journaled only if the runtime aborts it (reads are not
    journaled by default; every failed call is)."""

    def __init__(
        self,
        address: ActorId,
        partition: int,
        envelope: Envelope,
        *,
        status: TurnStatus,
        kind: TurnKind | None = None,
        body: bytes | None = None,
        error: ActorError | None = None,
        changes: TurnWrites | None = None,
        started: float = 0.0,
        duration: float = 0.0,
        fresh: bool = False,
        only_if_aborted: bool = False,
    ) -> None:
        """Describe one finished turn (``kind`` defaults from the envelope)."""
        self.address = address
        self.partition = partition
        self.envelope = envelope
        self.status = status
        if kind is None:
            kind = "request" if envelope.alarm is None else "alarm"
        self.kind = kind
        self.body = body
        self.error = error
        self.changes = changes
        self.started = started or time.time()
        self.duration = duration
        self.fresh = fresh
        self.activation = ""
        self.write_count = 0
        self.only_if_aborted = only_if_aborted

    @property
    def advances_state(self) -> bool:
        """Whether the record carries a committed, non-empty write-set (counted in
        ``write_count``; matches ``record_advances_state`` on the encoded record)."""
        return self.status == "ok" and self.changes is not None and not self.changes.is_empty()

    @property
    def changes_state(self) -> bool:
        """Whether replay needs this record to reconstruct the object's state: a committed
        write-set, or an alarm delivery (which consumes the alarm)."""
        return self.kind in ("alarm", "alarm_dropped") or self.advances_state

    def aborted(self, error: ActorError) -> JournalEntry:
        """This turn, discarded by the runtime with ``error``.

        Only a turn that succeeded (``ok``) changes; a failure or a duplicate already had its
        outcome delivered and is recorded as it was.
        """
        if self.status != "ok":
            return self
        return JournalEntry(
            self.address,
            self.partition,
            self.envelope,
            status="aborted",
            kind=self.kind,
            error=error,
            started=self.started,
            duration=self.duration,
            fresh=self.fresh,
        )


def journal_record(
    entry: JournalEntry, worker: str, *, truncated: bool = False, checked: bool = True
) -> JournalRecord:
    """Build the record of a finished turn, ready for ``encode_journal_record`` (its ``args``
    and ``reply`` may hold a Struct and raw JSON; decode the encoded record to inspect it).

    ``checked=False`` skips the test-encode of every stored value (``jsonable_value``): faster,
    but encoding the record may then fail for a value JSON cannot express; retry checked.
    """
    envelope = entry.envelope
    headers: dict[str, str] = {}
    if envelope.idempotency_key is not None:
        headers[Header.IDEMPOTENCY_KEY.value] = envelope.idempotency_key
    if envelope.msgpack:
        headers[Header.CONTENT_TYPE.value] = MSGPACK_CONTENT_TYPE
    # For speed, the record is built to be encoded, not inspected: the arguments stay the
    # decoded Struct (msgspec encodes it as the same JSON object to_builtins would give), and a
    # JSON reply body is embedded as it was sent (it is valid JSON: the worker encoded it).
    args: Any = {}
    if envelope.args is not None and not truncated:
        args = envelope.args if not checked else jsonable_args(envelope.args)
    delivery = envelope.alarm
    reply = None
    if entry.body is not None and entry.status in ("ok", "duplicate") and not truncated:
        if envelope.msgpack:
            reply = jsonable_value(entry.body, checked=checked)
        elif entry.body:
            reply = msgspec.Raw(entry.body)
    error = entry.error
    return JournalRecord(
        kind=entry.kind,
        status=entry.status,
        class_name=entry.address.class_name,
        object_id=entry.address.object_id,
        partition=entry.partition,
        method=envelope.method if entry.kind in ("request", "stop", "inspect") else "alarm",
        args=args,
        headers=headers,
        alarm=None
        if delivery is None
        else JournalAlarm(due=delivery.due, attempt=delivery.attempt),
        reply=reply,
        error=None
        if error is None
        else JournalError(code=error.code, type=error.type, message=error.message),
        writes=jsonable_writes(entry.changes, truncated=truncated, checked=checked)
        if entry.advances_state and entry.changes is not None
        else None,
        time=entry.started,
        duration=entry.duration,
        worker=worker,
        fresh=entry.fresh,
        truncated=truncated,
        activation=entry.activation,
        write_count=entry.write_count,
    )


class Journal(Protocol):
    """Where activations hand finished turns (a ``JournalPublisher``, or ``JOURNAL_OFF``)."""

    @property
    def enabled(self) -> bool:
        """Whether ``record`` keeps anything (entries need not be built otherwise)."""
        ...

    @property
    def reads(self) -> bool:
        """Whether read-only turns that succeeded are recorded too (``--journal-reads``)."""
        ...

    def record(self, entry: JournalEntry) -> None:
        """Take a finished turn; never raises, never waits."""
        ...


class _JournalOff:
    """The journal of a worker that records nothing."""

    enabled: Final = False
    reads: Final = False

    def record(self, entry: JournalEntry) -> None:
        """Drop ``entry``."""


JOURNAL_OFF: Final[Journal] = _JournalOff()
"""The journal of a worker started without one (``--no-journal``, or no JetStream)."""


# Stream


async def ensure_journal_stream(
    nc: NatsClient, prefix: str, *, max_age: float, max_bytes: int, replicas: int = 1
) -> js_api.StreamInfo:
    """Create the journal stream, or bring an existing one to this retention.

    Settings an operator changed on an existing stream (replicas, placement, storage) are kept;
    only subjects, ``max_age`` and ``max_bytes`` are set.

    Raises:
        nats.js.errors.ServiceUnavailableError: the server has no JetStream.
        nats.js.errors.APIError: the stream could not be created or updated.
        nats.errors.TimeoutError: JetStream did not answer.
    """
    js = nc.jetstream()
    name = journal_stream_name(prefix)
    subjects = journal_stream_subjects(prefix)
    what = f"journal stream {name}"
    try:
        info = await until_ready(nc, lambda: js.stream_info(name), what=what)
    except nats.js.errors.NotFoundError:
        config = js_api.StreamConfig(
            name=name,
            description=_STREAM_DESCRIPTION,
            subjects=subjects,
            retention=js_api.RetentionPolicy.LIMITS,
            discard=js_api.DiscardPolicy.OLD,
            storage=js_api.StorageType.FILE,
            max_age=max_age,
            max_bytes=max_bytes,
            num_replicas=replicas,
            allow_direct=True,
        )
        try:
            return await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # not "already in use": another worker won the race
                raise
            info = await until_ready(nc, lambda: js.stream_info(name), what=what)
    current = info.config
    if (
        current.subjects == subjects
        and current.max_bytes == max_bytes
        and current.max_age is not None
        and abs(current.max_age - max_age) < 1e-3
    ):
        return info
    wanted = dataclasses.replace(current, subjects=subjects, max_age=max_age, max_bytes=max_bytes)
    return await js.update_stream(wanted)


# Publisher


class JournalPublisher:
    """Records finished turns to the journal stream in the background (see the module doc).

    ``start`` ensures the stream and returns False (after a warning) when the journal cannot run;
    ``record`` never blocks or raises; ``stop`` publishes what is buffered and waits a moment for
    the acknowledgements.
    """

    # Configuration
    _nc: NatsClient
    _prefix: str
    _stream: str
    _worker: str
    _metrics: WorkerMetrics
    _max_age: float
    _max_bytes: int
    _max_pending: int
    _replicas: int
    _ack_timeout: float
    _flush_interval: float
    _reads: bool
    _partitions: int
    # State
    _queue: deque[tuple[JournalEntry, int]]
    """Entries waiting to be published, each with the bytes it holds (``_entry_bytes``)."""
    _queued_bytes: int
    """Reply and write-set bytes the queued entries hold."""
    _max_pending_bytes: int
    _inflight: dict[str, tuple[float, int]]
    """Reply token -> (monotonic deadline of its acknowledgement, records it confirms), oldest
    first."""
    _unconfirmed: int
    """Records published and not yet acknowledged (sum over ``_inflight``)."""
    _next_token: int
    _inbox: str
    _sub: Subscription | None
    _task: asyncio.Task[None] | None
    _wakeup: asyncio.Event
    _stopping: bool
    _running: bool
    _last_warning: float

    def __init__(
        self,
        nc: NatsClient,
        *,
        prefix: str,
        worker: str,
        metrics: WorkerMetrics,
        max_age: float,
        max_bytes: int,
        max_pending: int = 10_000,
        max_pending_bytes: int = 64 * 1024 * 1024,
        replicas: int = 1,
        ack_timeout: float = 5.0,
        flush_interval: float = _FLUSH_INTERVAL,
        reads: bool = False,
        partitions: int = 0,
    ) -> None:
        """Describe the publisher; nothing happens until ``start``.

        Args:
            nc: the worker's NATS connection.
            prefix: the deployment's subject prefix.
            worker: the worker name written into every record.
            metrics: where records and failures are counted.
            max_age: stream retention, seconds.
            max_bytes: stream retention, bytes.
            max_pending: records buffered or waiting for their acknowledgement before new ones
                are dropped.
            max_pending_bytes: reply and write-set bytes buffered before new records are
                dropped (a few large turns must not hold the memory of ``max_pending``).
            replicas: replicas of the stream when this worker creates it.
            ack_timeout: seconds after which an unacknowledged message's records count as lost.
            flush_interval: seconds records are collected before they are published.
            reads: record read-only turns that succeeded too.
            partitions: the deployment's partition count (finds an entry's journal shard from
                its partition without hashing again); 0: always hash.
        """
        self._nc = nc
        self._prefix = prefix
        self._stream = journal_stream_name(prefix)
        self._worker = worker
        self._metrics = metrics
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._replicas = replicas
        self._ack_timeout = ack_timeout
        self._flush_interval = flush_interval
        self._reads = reads
        self._partitions = partitions
        self._queue = deque()
        self._queued_bytes = 0
        self._inflight = {}
        self._unconfirmed = 0
        self._next_token = 0
        self._inbox = ""
        self._sub = None
        self._task = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._running = False
        self._last_warning = -_WARN_EVERY

    @property
    def stream(self) -> str:
        """Name of the journal stream."""
        return self._stream

    @property
    def enabled(self) -> bool:
        """Whether records are taken (between ``start`` and ``stop``)."""
        return self._running

    @property
    def reads(self) -> bool:
        """Whether read-only turns that succeeded are recorded too."""
        return self._reads

    @property
    def pending(self) -> int:
        """Records buffered or waiting for their acknowledgement."""
        return len(self._queue) + self._unconfirmed

    async def start(self) -> bool:
        """Create or update the stream and start publishing.

        Returns:
            True when journaling runs; False when the server has no JetStream or the stream
            cannot be set up (a warning says why and how to fix it; the worker serves on).
        """
        try:
            info = await ensure_journal_stream(
                self._nc,
                self._prefix,
                max_age=self._max_age,
                max_bytes=self._max_bytes,
                replicas=self._replicas,
            )
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            _log.warning(
                "JetStream is not enabled on the NATS server: running WITHOUT the journal "
                "(ndo replay and ndo tail will have nothing from this worker); enable JetStream "
                "on the server (nats-server -js) or pass --no-journal to silence this warning",
                stream=self._stream,
            )
            return False
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            _log.warning(
                "journal stream could not be created or updated: running WITHOUT the journal; "
                "fix the stream (or lower --journal-max-bytes if the server lacks storage) and "
                "restart, or pass --no-journal",
                stream=self._stream,
                error=str(exc),
            )
            return False
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._handle_ack)
        self._running = True
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="ndo-journal")
        _log.info(
            "journal on",
            stream=self._stream,
            subjects=info.config.subjects,
            max_age=self._max_age,
            max_bytes=self._max_bytes,
            reads=self._reads,
        )
        return True

    def record(self, entry: JournalEntry) -> None:
        """Queue a finished turn for the journal; drops (and counts) it when the buffer is full."""
        if not self._running:
            return
        backlog = len(self._queue) + self._unconfirmed
        if backlog >= self._max_pending // 2 and not entry.changes_state:
            # Past half full, records that changed nothing (reads, errors, duplicates) give way,
            # so the records replay needs to rebuild state keep the other half of the buffer.
            self._fail("shed", "journal buffer half full: read-only records shed")
            return
        if backlog >= self._max_pending:
            self._fail("dropped", "journal buffer full")
            return
        size = _entry_bytes(entry)
        if self._queued_bytes + size > self._max_pending_bytes:
            self._fail("dropped", "journal buffer full (bytes)")
            return
        self._queued_bytes += size
        self._queue.append((entry, size))
        if len(self._queue) == 1:
            self._wakeup.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish what is buffered, wait up to ``timeout`` for acknowledgements, stop (idempotent).

        Records still unacknowledged then count as ``timeout`` failures.
        """
        task, self._task = self._task, None
        if task is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping = True
        self._wakeup.set()
        while (self._queue or self._inflight) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._running = False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        lost = len(self._queue) + self._unconfirmed
        self._queue.clear()
        self._queued_bytes = 0
        self._inflight.clear()
        self._unconfirmed = 0
        if lost:
            self._fail("timeout", f"{lost} journal records unconfirmed at shutdown", count=lost)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SWEEP_INTERVAL):
                    await self._wakeup.wait()
            self._wakeup.clear()
            self._expire(time.monotonic())
            if self._queue and not self._stopping:
                await asyncio.sleep(self._flush_interval)  # let a window of records gather
            while self._queue:
                for subject, data, count in self._messages(self._encode_pass()):
                    await self._publish(subject, data, count)

    def _encode_pass(self) -> dict[int, list[bytes]]:
        """Take up to ``_MAX_PASS`` buffered entries and encode each as one JSON line, grouped by
        journal shard in arrival order (no await in here, so ``record`` cannot interleave);
        entries that cannot be encoded are counted lost."""
        shards: dict[int, list[bytes]] = {}
        limit = self._message_limit()
        taken = 0
        while self._queue and taken < _MAX_PASS:
            entry, size = self._queue.popleft()
            self._queued_bytes -= size
            taken += 1
            try:
                data = self._encode(entry, limit)
            except (
                msgspec.EncodeError,
                TypeError,
                ValueError,
                OverflowError,
                RecursionError,
            ) as exc:
                self._fail("encode_error", str(exc))
                continue
            if len(data) > limit:
                self._fail("too_large", f"record of {len(data)} bytes")
                continue
            shard = journal_shard_of_partition(entry.partition, self._partitions)
            if shard is None:
                shard = journal_shard(entry.address.class_name, entry.address.object_id)
            lines = shards.get(shard)
            if lines is None:
                shards[shard] = [data]
            else:
                lines.append(data)
        return shards

    def _encode(self, entry: JournalEntry, limit: int) -> bytes:
        """One entry's JSON line: unchecked first (one encode per value saved), checked when
        a value JSON cannot express made that fail, truncated when over ``limit``."""
        try:
            data = encode_journal_record(journal_record(entry, self._worker, checked=False))
        except (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError):
            data = encode_journal_record(journal_record(entry, self._worker))
        if len(data) > limit:
            data = encode_journal_record(journal_record(entry, self._worker, truncated=True))
        return data

    def _messages(self, shards: dict[int, list[bytes]]) -> list[tuple[str, bytes, int]]:
        """Join each shard's lines into messages under the size limit: (subject, body, records)."""
        limit = self._message_limit()
        messages: list[tuple[str, bytes, int]] = []
        for shard, lines in shards.items():
            subject = journal_subject(self._prefix, shard)
            start, size = 0, 0
            for index, line in enumerate(lines):
                if index > start and size + 1 + len(line) > limit:
                    messages.append((subject, b"\n".join(lines[start:index]), index - start))
                    start, size = index, 0
                size += len(line) + (1 if index > start else 0)
            messages.append((subject, b"\n".join(lines[start:]), len(lines) - start))
        return messages

    def _message_limit(self) -> int:
        """Most bytes of one journal message (the record's line included)."""
        max_payload = self._nc.max_payload
        return min(_MAX_MESSAGE, max_payload - 1024 if max_payload > 4096 else max_payload)

    async def _publish(self, subject: str, data: bytes, count: int) -> None:
        """Publish one journal message that confirms ``count`` records when acknowledged."""
        token = str(self._next_token)
        self._next_token += 1
        self._inflight[token] = (time.monotonic() + self._ack_timeout, count)
        self._unconfirmed += count
        try:
            # No Nats-Expected-Stream header: streams cannot overlap, so only ours takes these
            # subjects, and a header-less publish is cheaper.
            await self._nc.publish(subject, data, reply=f"{self._inbox}.{token}")
        except nats.errors.Error as exc:
            if self._inflight.pop(token, None) is not None:
                self._unconfirmed -= count
                self._fail("publish_error", str(exc), count=count)

    async def _handle_ack(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        confirmed = self._inflight.pop(token, None)
        if confirmed is None:
            return  # already counted as timed out
        count = confirmed[1]
        self._unconfirmed -= count
        data = msg.data
        if data.startswith(_STORED):  # the common case, without parsing
            self._metrics.journal_records.inc(count)
            return
        if msg.headers and msg.headers.get(_STATUS) == "503":
            self._fail(
                "no_stream",
                f"no stream captures the journal subjects ({self._stream})",
                count=count,
            )
            return
        try:
            reply = json.loads(msg.data)
        except ValueError:
            self._fail("rejected", "unreadable acknowledgement", count=count)
            return
        if isinstance(reply, dict) and "error" in reply:
            error = reply["error"]
            detail = error.get("description", str(error)) if isinstance(error, dict) else error
            self._fail("rejected", str(detail), count=count)
            return
        self._metrics.journal_records.inc(count)

    def _expire(self, now: float) -> None:
        expired = [
            token for token, _ in takewhile(lambda item: item[1][0] <= now, self._inflight.items())
        ]
        lost = sum(self._inflight.pop(token)[1] for token in expired)
        if lost:
            self._unconfirmed -= lost
            self._fail("timeout", f"{lost} journal records not acknowledged", count=lost)

    def _fail(self, reason: str, detail: str, *, count: int = 1) -> None:
        self._metrics.count(self._metrics.journal_failures, reason, amount=count)
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            _log.warning(
                "journal records lost (requests are unaffected); counted in "
                "ndo_journal_failures_total",
                reason=reason,
                detail=detail,
                stream=self._stream,
            )


def _entry_bytes(entry: JournalEntry) -> int:
    """The payload bytes a queued entry keeps alive: its reply and its write-set's values."""
    size = len(entry.body) if entry.body else 0
    changes = entry.changes
    if changes is not None:
        for key, value in changes.writes.items():
            size += len(key) + (len(value) if value else 0)
    return size
