"""Recording every finished turn to the journal stream, off the reply path.

The record format lives in ``service.journal`` (a contract with the tools that read it); this
module owns the two things only the worker does: creating or updating the **stream**
(``ensure_journal_stream``), and the **publisher** (``JournalPublisher``), plus the cheap
in-memory ``JournalEntry`` an activation hands over.

Publishing: an activation hands a finished turn to ``JournalPublisher.record`` *after* its reply
left (for a turn that wrote, after the commit). ``record`` only appends a cheap ``JournalEntry``
(references, nothing encoded) to a bounded buffer. A background task encodes entries and sends
them with core-NATS publishes, a *burst* at a time (what was buffered, up to
``_CONFIRM_EVERY`` records): on nats-server 2.12+ as one atomic batch (``Nats-Batch-*``
headers; the stream has ``allow_atomic``), stored all or nothing and several times faster for
JetStream than single records; on older servers as plain publishes. Either way only the last
record carries a reply subject on the publisher's own inbox, and its acknowledgement confirms
the whole burst (for plain publishes because the server stores one connection's publishes in
order and the stream discards old records, never new ones). No request ever waits for
JetStream. A full buffer drops the entry; a missing stream, a rejected record or an
acknowledgement that does not arrive within ``ack_timeout`` is a lost record. Each loss is
counted in ``ndo_journal_failures_total{reason}`` and logged (rate limited); none fails a
request.

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
import os
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
from ndo.service._cluster import supports_atomic_batches, until_ready
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
    jsonable_value,
    jsonable_writes,
)
from ndo.subjects import MSGPACK_CONTENT_TYPE, Header, journal_subject

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
    "ndo journal: <prefix>.sys.journal.<Class>.<id>, one subject per object"
)
_STATUS: Final = "Status"
_STORED: Final = b'{"stream":'
"""How a JetStream PubAck starts (an error reply starts with ``{"error":``)."""
_WARN_EVERY: Final = 30.0
"""Seconds between two warnings about lost journal records (the counter has every loss)."""
_SWEEP_INTERVAL: Final = 0.5
"""Seconds between checks for acknowledgements that did not arrive in time."""
_CONFIRM_EVERY: Final = 256
"""Most records in one burst (one atomic batch, one acknowledgement); servers allow 1,000."""
_BATCH_ID: Final = "Nats-Batch-Id"
_BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
_BATCH_COMMIT: Final = "Nats-Batch-Commit"


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

    @property
    def advances_state(self) -> bool:
        """Whether the record carries a committed, non-empty write-set (counted in
        ``write_count``; matches ``record_advances_state`` on the encoded record)."""
        return self.status == "ok" and self.changes is not None and not self.changes.is_empty()

    @property
    def changes_state(self) -> bool:
        """Whether replay needs this record to reconstruct the object's state: a committed
        write-set, or an alarm delivery (which consumes the alarm)."""
        return self.kind != "request" or self.advances_state

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


def journal_record(entry: JournalEntry, worker: str, *, truncated: bool = False) -> JournalRecord:
    """Build the record of a finished turn, ready for ``encode_journal_record`` (its ``args``
    and ``reply`` may hold a Struct and raw JSON; decode the encoded record to inspect it)."""
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
        args = envelope.args
    delivery = envelope.alarm
    reply = None
    if entry.body is not None and entry.status in ("ok", "duplicate") and not truncated:
        if envelope.msgpack:
            reply = jsonable_value(entry.body)
        elif entry.body:
            reply = msgspec.Raw(entry.body)
    error = entry.error
    return JournalRecord(
        kind=entry.kind,
        status=entry.status,
        class_name=entry.address.class_name,
        object_id=entry.address.object_id,
        partition=entry.partition,
        method="alarm" if entry.kind != "request" else envelope.method,
        args=args,
        headers=headers,
        alarm=None
        if delivery is None
        else JournalAlarm(due=delivery.due, attempt=delivery.attempt),
        reply=reply,
        error=None
        if error is None
        else JournalError(code=error.code, type=error.type, message=error.message),
        writes=jsonable_writes(entry.changes, truncated=truncated)
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

    def record(self, entry: JournalEntry) -> None:
        """Take a finished turn; never raises, never waits."""
        ...


class _JournalOff:
    """The journal of a worker that records nothing."""

    enabled: Final = False

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
    # Older servers do not know allow_atomic (and a strict one would refuse the field).
    atomic: bool | None = True if supports_atomic_batches(nc) else None
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
            allow_atomic=atomic,  # bursts go in as atomic batches (nats-server 2.12+)
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
        and (current.allow_atomic or atomic is None)
    ):
        return info
    wanted = dataclasses.replace(
        current,
        subjects=subjects,
        max_age=max_age,
        max_bytes=max_bytes,
        allow_atomic=atomic if atomic else current.allow_atomic,
    )
    return await js.update_stream(wanted)


# Publisher


class JournalPublisher:
    """Records finished turns to the journal stream in the background (see the module doc).

    ``start`` ensures the stream and returns False (after a warning) when the journal cannot run;
    ``record`` never blocks or raises; ``stop`` waits a moment for what is buffered.
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
    # State
    _queue: deque[JournalEntry]
    _inflight: dict[str, tuple[float, int]]
    """Reply token -> (monotonic deadline of its acknowledgement, records it confirms), oldest
    first."""
    _unconfirmed: int
    """Records published and not yet acknowledged (sum over ``_inflight``, plus the current
    burst's records sent so far)."""
    _atomic: bool
    """The stream takes atomic batches (nats-server 2.12+): a burst is stored all or nothing."""
    _batch_prefix: str
    """Prefix of this publisher's batch ids (unique per publisher)."""
    _next_token: int
    _inbox: str
    _sub: Subscription | None
    _task: asyncio.Task[None] | None
    _wakeup: asyncio.Event
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
        replicas: int = 1,
        ack_timeout: float = 5.0,
        atomic_batches: bool = True,
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
            replicas: replicas of the stream when this worker creates it.
            ack_timeout: seconds after which an unacknowledged record counts as lost.
            atomic_batches: publish bursts as atomic batches when the stream allows them
                (False: plain publishes, as on servers before 2.12).
        """
        self._nc = nc
        self._prefix = prefix
        self._stream = journal_stream_name(prefix)
        self._worker = worker
        self._metrics = metrics
        self._max_age = max_age
        self._max_bytes = max_bytes
        self._max_pending = max_pending
        self._replicas = replicas
        self._ack_timeout = ack_timeout
        self._queue = deque()
        self._inflight = {}
        self._unconfirmed = 0
        self._atomic = atomic_batches  # and the stream allows them: checked in start()
        self._batch_prefix = ""
        self._next_token = 0
        self._inbox = ""
        self._sub = None
        self._task = None
        self._wakeup = asyncio.Event()
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
        self._atomic = self._atomic and bool(info.config.allow_atomic)  # None before 2.12
        self._batch_prefix = os.urandom(6).hex() + "-"
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._handle_ack)
        self._running = True
        self._task = asyncio.create_task(self._run(), name="ndo-journal")
        _log.info(
            "journal on",
            stream=self._stream,
            subjects=info.config.subjects,
            max_age=self._max_age,
            max_bytes=self._max_bytes,
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
        self._queue.append(entry)
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
        self._wakeup.set()
        while (self._queue or self._inflight) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._running = False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        lost = len(self._queue) + self._unconfirmed
        self._queue.clear()
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
            while self._queue:
                await self._publish_burst(self._encode_burst())

    def _encode_burst(self) -> list[tuple[str, bytes]]:
        """Take up to ``_CONFIRM_EVERY`` buffered entries and encode them (no await in here,
        so ``record`` cannot interleave); entries that cannot be encoded are counted lost."""
        burst: list[tuple[str, bytes]] = []
        while self._queue and len(burst) < _CONFIRM_EVERY:
            entry = self._queue.popleft()
            try:
                data = encode_journal_record(journal_record(entry, self._worker))
                if len(data) > self._nc.max_payload:
                    data = encode_journal_record(
                        journal_record(entry, self._worker, truncated=True)
                    )
            except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
                self._fail("encode_error", str(exc))
                continue
            if len(data) > self._nc.max_payload:
                self._fail("too_large", f"record of {len(data)} bytes")
                continue
            address = entry.address
            burst.append(
                (journal_subject(self._prefix, address.class_name, address.object_id), data)
            )
        return burst

    async def _publish_burst(self, burst: list[tuple[str, bytes]]) -> None:
        """Publish a burst with one acknowledgement for all of it: as one atomic batch when the
        stream allows it, else as plain publishes of which the last asks for the ack."""
        if not burst:
            return
        count = len(burst)
        token = str(self._next_token)
        self._next_token += 1
        self._inflight[token] = (time.monotonic() + self._ack_timeout, count)
        self._unconfirmed += count
        reply = f"{self._inbox}.{token}"
        batch_id = f"{self._batch_prefix}{token}" if self._atomic and count > 1 else None
        try:
            for index, (subject, data) in enumerate(burst, start=1):
                last = index == count
                if batch_id is None:
                    # No Nats-Expected-Stream header: streams cannot overlap, so only ours takes
                    # these subjects, and a header-less publish is cheaper.
                    await self._nc.publish(subject, data, reply=reply if last else "")
                    continue
                headers = {_BATCH_ID: batch_id, _BATCH_SEQUENCE: str(index)}
                if last:
                    headers[_BATCH_COMMIT] = "1"
                await self._nc.publish(subject, data, reply=reply if last else "", headers=headers)
        except nats.errors.Error as exc:
            # The burst cannot be confirmed any more (an atomic batch left open is discarded by
            # the server): count all of it lost.
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
