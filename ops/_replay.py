"""``ndo replay``: an object's history read back from the journal, and re-run on today's code.

A module of its own because it is a library as well as a command (tests and tools call
``run_replay`` and the step functions), and because it runs user handlers outside a worker:
always on scratch ``InMemoryStorage``, never on a worker's data directory.

* **Reading** (``read_journal``): an ephemeral pull consumer on the object's journal shard
  ``<prefix>.sys.journal.<shard>`` (and on the per-object subject older ndo wrote to), fetched in
  batches until the consumer has nothing pending; only lines holding the object's class and id
  are decoded. A step's position is its message's stream sequence, plus its place among the
  object's records in that message when there are several (``1234.2``). A line that is not a
  journal record (someone else published on the journal's subjects) is skipped with a note
  (``SkippedLines``), never the end of the replay; a record of a newer ndo stops it (upgrade).
* **Reconstruction** (``reconstruct``): every ``ok`` step's write-set is applied to a dict
  (``cleared``, then ``delete``, then ``put``, and the alarm). No user code runs.
* **Re-execution** (``Reexecutor``, ``compare``): scratch storage is loaded with the state
  reconstructed just before the first step shown; each step's recorded input then runs through
  today's class on the worker's own turn engine (``ndo.service.TurnRunner``: ``on_start`` when
  the record says a fresh instance ran, the handler deadline, the same error mapping) and its
  reply (or error) and write-set are compared with the record. Later steps run on the state
  today's code produced. A ``stop`` step re-runs ``on_stop`` (on the live instance, or on a new
  one after ``on_start``). Steps the runtime answered without running the handler (``duplicate``)
  or discarded (``aborted``) are skipped; the write-sets of a dropped alarm and of a
  ``truncated`` record (its input is unknown) are applied as recorded.

Exit codes of the command: ``EXIT_OK`` (0) nothing diverged, ``EXIT_ERROR`` (1) replay could not
run, ``EXIT_USAGE`` (2) bad arguments, ``EXIT_DIVERGED`` (3) at least one step diverged.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TextIO, TypeAlias

import msgspec
import nats
import nats.errors
import nats.js.errors
from msgspec import UNSET
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

from ndo.actors import Actor, ActorError, ActorId, ActorStorage
from ndo.actors.runtime import (
    ActorClassInfo,
    ActorContext,
    StorageLimits,
    TurnWrites,
    describe_class,
)
from ndo.ops._connect import DEFAULT_NATS_URL, CannotConnectError, connect_once
from ndo.ops._errors import ReplayError
from ndo.service import (
    AlarmDelivery,
    DeadlineWatchdog,
    Envelope,
    NatsAuth,
    TurnRunner,
    WorkerConfig,
    object_write,
    parse_duration,
)
from ndo.service.journal import (
    JournalError,
    JournalRecord,
    JournalWrites,
    decode_journal_message,
    journal_builtins,
    journal_stream_name,
    jsonable_reply,
    jsonable_writes,
    object_marker,
    record_advances_state,
)
from ndo.storage import InMemoryStorage, ObjectWrite
from ndo.subjects import (
    DEFAULT_PREFIX,
    MSGPACK_CONTENT_TYPE,
    Header,
    InvalidSubjectError,
    journal_shard,
    journal_subject,
    legacy_journal_subject,
    validate_id,
    validate_name,
)

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "Difference",
    "JournalStep",
    "Point",
    "Reexecutor",
    "ReplayError",
    "ReplayOptions",
    "SkippedLines",
    "StepOutcome",
    "StepPosition",
    "check_journal_stream",
    "compare",
    "connect",
    "format_time",
    "line_note",
    "method_cell",
    "parse_point",
    "read_journal",
    "reconstruct",
    "result_cell",
    "run_replay",
    "select_steps",
    "shorten",
    "sorted_json",
    "step_json",
    "step_positions",
]

EXIT_OK: Final = 0
"""Replay ran and (with ``--execute``) nothing diverged."""
EXIT_ERROR: Final = 1
"""Replay could not run: no connection, no journal stream, a newer ndo's record, unknown class."""
EXIT_USAGE: Final = 2
"""Bad arguments (also argparse's code)."""
EXIT_DIVERGED: Final = 3
"""``--execute`` found at least one step whose reply, error or write-set differs."""

Point: TypeAlias = tuple[Literal["seq", "time"], float]
"""A point in an object's history: a step position (``1234``: every step of journal message
1234; ``1234.2``: the object's second step in it, see ``StepPosition.value``) or epoch seconds."""

_INDEX_SCALE: Final = 1_000_000
"""A step's place within its message, as a fraction of a position (a message holds far fewer
records than this; places stay distinct as floats below sequence 2**33, about 8.6e9)."""


class StepPosition(NamedTuple):
    """Where a step is in the journal: its message and its place among the object's records in
    that message."""

    seq: int
    """Stream sequence of the journal message."""
    place: int = 0
    """1-based place among this object's records in the message; 0 when it is the only one."""

    @property
    def label(self) -> str:
        """How tables print it and ``--at``/``--since`` take it: ``1234`` or ``1234.2``."""
        return str(self.seq) if not self.place else f"{self.seq}.{self.place}"

    @property
    def value(self) -> float:
        """The position as the number a ``("seq", ...)`` point compares with."""
        return self.seq + self.place / _INDEX_SCALE


_FETCH_BATCH: Final = 256
_FETCH_TIMEOUT: Final = 5.0
_JSON: Final = msgspec.json.Encoder()
_JSON_ANY: Final = msgspec.json.Decoder()
_MSGPACK: Final = msgspec.msgpack.Encoder()


# Parsing command-line values


def parse_point(text: str, *, now: float | None = None) -> Point:
    """Read a point in history.

    Accepted: a step position (``1234``, ``1234.2``: see ``StepPosition``); an ISO 8601 time
    (``2024-05-01T14:02:00Z``, ``2024-05-01 14:02``; without a zone it is local time); a time of
    day today (``14:02``); an age (``10m``, ``2h``, ``1d`` ago).

    Raises:
        ValueError: none of those.
    """
    text = text.strip()
    if text.isdigit():
        return ("seq", int(text))
    seq, dot, index = text.partition(".")
    if dot and seq.isdigit() and index.isdigit() and int(index) < _INDEX_SCALE:
        return ("seq", StepPosition(int(seq), int(index)).value)
    with contextlib.suppress(ValueError):
        return ("time", (time.time() if now is None else now) - parse_duration(text))
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        try:
            clock = dt.time.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"cannot read {text!r} as a step (1234, 1234.2), a time "
                "(2024-05-01T14:02:00Z, 14:02) or an age (10m, 2h, 1d)"
            ) from None
        when = dt.datetime.combine(dt.date.today(), clock)
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return ("time", when.timestamp())


def format_time(epoch: float) -> str:
    """Epoch seconds as UTC ISO 8601 with milliseconds (``2024-05-01T14:02:03.123Z``)."""
    when = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Reading


async def connect(url: str, auth: NatsAuth | None = None) -> NatsClient:
    """Connect for a one-shot command (no reconnects), with ``auth``'s credentials.

    Raises:
        ReplayError: the server cannot be reached or refused us.
    """
    try:
        return await connect_once(url, auth)
    except CannotConnectError as exc:
        raise ReplayError(str(exc)) from None


async def check_journal_stream(nc: NatsClient, prefix: str) -> str:
    """Return the journal stream's name after checking it exists.

    Raises:
        ReplayError: no JetStream, or no journal stream under ``prefix``.
    """
    stream = journal_stream_name(prefix)
    try:
        await nc.jetstream().stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise ReplayError(
            f"no journal stream {stream} on this server: workers create it at start when the "
            f"journal is on (the default) and the server has JetStream; check --prefix"
        ) from None
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise ReplayError("the NATS server has no JetStream, so there is no journal") from None
    except (nats.js.errors.Error, nats.errors.Error) as exc:
        raise ReplayError(f"cannot read the journal stream {stream}: {exc}") from None
    return stream


async def read_journal(
    nc: NatsClient,
    prefix: str,
    class_name: str,
    object_id: str,
    *,
    until_seq: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> list[tuple[StepPosition, JournalRecord]]:
    """Read one object's journal records, oldest first, with their positions.

    Reads the object's journal shard, and the per-object subject ndo wrote to before shards
    (usually empty), decoding only the lines that hold the object's class and id. Lines that
    are not journal records (something other than ndo published them) are skipped.

    Args:
        nc: a NATS connection.
        prefix: the deployment's subject prefix.
        class_name: the object's class.
        object_id: the object's id.
        until_seq: stop after this stream sequence.
        progress: called with ``(messages read, messages known)`` as messages arrive.
        on_unreadable: called with a note (message, subject, line, why) for each skipped line.

    Raises:
        ReplayError: no JetStream, no journal stream, or a record of a newer ndo.
    """
    stream = await check_journal_stream(nc, prefix)
    marker = object_marker(class_name, object_id)
    found: list[tuple[StepPosition, JournalRecord]] = []
    unreadable: list[tuple[int, str]] = []

    def note(number: int, reason: str) -> None:
        unreadable.append((number, reason))

    for subject in (
        legacy_journal_subject(prefix, class_name, object_id),
        journal_subject(prefix, journal_shard(class_name, object_id)),
    ):
        async for seq, data in _messages(nc, stream, subject, until_seq, progress):
            try:
                lines = decode_journal_message(data, marker, on_unreadable=note)
            except ValueError as exc:  # a record of a newer ndo
                raise ReplayError(f"journal message {seq} on {subject}: {exc}") from None
            for number, reason in unreadable:
                if on_unreadable is not None:
                    on_unreadable(line_note(seq, subject, number, reason))
            unreadable.clear()
            mine = [
                record
                for _, record in lines
                if record.class_name == class_name and record.object_id == object_id
            ]
            found.extend(step_positions(seq, mine))
    found.sort(key=lambda item: item[0])
    return found


def line_note(seq: int, subject: str, number: int, reason: str) -> str:
    """Where a journal line is (message ``seq`` on ``subject``, line ``number`` counted from 0)
    and what is wrong with it, for a note."""
    return f"journal message {seq} on {subject}, line {number + 1}: {reason}"


def step_positions(
    seq: int, records: Sequence[JournalRecord]
) -> list[tuple[StepPosition, JournalRecord]]:
    """The positions of records read from journal message ``seq``, in order: each object's
    records there are numbered 1, 2, ..., and an object's only record gets place 0."""
    per_object = Counter((record.class_name, record.object_id) for record in records)
    places: dict[tuple[str, str], int] = {}
    positioned: list[tuple[StepPosition, JournalRecord]] = []
    for record in records:
        key = (record.class_name, record.object_id)
        places[key] = places.get(key, 0) + 1
        positioned.append((StepPosition(seq, places[key] if per_object[key] > 1 else 0), record))
    return positioned


async def _messages(
    nc: NatsClient,
    stream: str,
    subject: str,
    until_seq: int | None,
    progress: Callable[[int, int], None] | None,
) -> AsyncIterator[tuple[int, bytes]]:
    """Yield ``(stream sequence, body)`` of the messages on ``subject``, oldest first, through
    an ephemeral pull consumer (deleted afterwards)."""
    js = nc.jetstream()
    config = js_api.ConsumerConfig(
        deliver_policy=js_api.DeliverPolicy.ALL,
        ack_policy=js_api.AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=30.0,
        description="ndo replay",
    )
    try:
        psub = await js.pull_subscribe(subject, stream=stream, config=config)
        info = await psub.consumer_info()
    except (nats.js.errors.Error, nats.errors.Error) as exc:
        raise ReplayError(f"cannot read {subject} from {stream}: {exc}") from None
    try:
        remaining = info.num_pending or 0
        done = 0
        while remaining > 0:
            try:
                msgs = await psub.fetch(min(remaining, _FETCH_BATCH), timeout=_FETCH_TIMEOUT)
            except nats.errors.TimeoutError:
                break  # messages expired from the stream while we read
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if until_seq is not None and seq > until_seq:
                    return
                yield seq, msg.data
                remaining = msg.metadata.num_pending
                done += 1
                if progress is not None:
                    progress(done, done + remaining)
    finally:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await psub.unsubscribe()
            await js.delete_consumer(stream, info.name)


# Reconstruction


@dataclass(frozen=True, slots=True)
class JournalStep:
    """One journal record and the object's state right after it."""

    seq: int
    """Stream sequence of the record's journal message."""
    record: JournalRecord
    state: dict[str, Any]
    """Every key of the object after this step."""
    alarm: float | None
    """The object's alarm after this step (epoch seconds), or None."""
    incomplete: bool
    """A too-large record, or a lost one, at or before this step: ``state`` misses values."""
    missing_before: int = 0
    """State-changing records the journal lost right before this step (found by the gap in
    ``write_count``); from here on ``state`` misses their writes."""
    index: int = 0
    """Place among the object's records in the same message (``StepPosition.place``)."""

    @property
    def position(self) -> StepPosition:
        """Where the step is in the journal (``position.label`` is what tables print)."""
        return StepPosition(self.seq, self.index)


def _apply(state: dict[str, Any], writes: JournalWrites) -> None:
    if writes.cleared:
        state.clear()
    for key in writes.delete:
        state.pop(key, None)
    state.update(writes.put)


def reconstruct(
    records: Iterable[tuple[StepPosition | int, JournalRecord]],
) -> Iterator[JournalStep]:
    """Yield each step with the state its recorded write-sets lead to (no user code runs).

    The state starts empty: records that retention already removed are not known.
    """
    state: dict[str, Any] = {}
    alarm: float | None = None
    incomplete = False
    write_counts: dict[str, int] = {}  # activation token -> write_count of its last record
    for where, record in records:
        position = where if isinstance(where, StepPosition) else StepPosition(where)
        missing = _missing_before(record, write_counts)
        writes = record.writes
        if record.status == "ok" and writes is not None:
            _apply(state, writes)
            if writes.alarm is not UNSET:
                alarm = writes.alarm
            incomplete = incomplete or record.truncated
        incomplete = incomplete or missing > 0
        yield JournalStep(
            position.seq, record, dict(state), alarm, incomplete, missing, position.place
        )


def _missing_before(record: JournalRecord, write_counts: dict[str, int]) -> int:
    """State-changing records of the record's activation that should have come before it."""
    if not record.activation:  # written by an ndo without write counts
        return 0
    expected = write_counts.get(record.activation, 0) + (1 if record_advances_state(record) else 0)
    write_counts[record.activation] = max(record.write_count, expected)
    return max(0, record.write_count - expected)


def _in_window(step: JournalStep, at: Point | None, since: Point | None) -> bool:
    for point, after in ((since, True), (at, False)):
        if point is None:
            continue
        kind, value = point
        position = step.position.value if kind == "seq" else step.record.time
        if kind == "seq" and not after and value == int(value):
            value += 1 - 1 / _INDEX_SCALE  # `--at 1234`: every step of message 1234
        if (position < value) if after else (position > value):
            return False
    return True


def select_steps(
    steps: Sequence[JournalStep], *, at: Point | None = None, since: Point | None = None
) -> tuple[list[JournalStep], JournalStep | None]:
    """Pick the steps from ``since`` through ``at`` (both inclusive).

    Returns:
        The selected steps, and the step just before the first of them (its state is where
        a re-execution starts), or None when they start at the beginning.
    """
    chosen = [i for i, step in enumerate(steps) if _in_window(step, at, since)]
    if not chosen:
        return [], None
    return [steps[i] for i in chosen], steps[chosen[0] - 1] if chosen[0] else None


# Re-execution


class Difference(msgspec.Struct, frozen=True, kw_only=True):
    """One way a re-executed step differs from its record."""

    field: Literal["outcome", "reply", "error", "writes"]
    """``outcome`` (one succeeded, the other failed), ``reply``, ``error`` or ``writes``."""
    recorded: Any
    replayed: Any


class StepOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What today's code did with one recorded step."""

    executed: bool
    """False when no handler ran (skipped, or a runtime step applied as recorded)."""
    status: Literal["ok", "error", "skipped", "applied"]
    reply: Any = None
    error: JournalError | None = None
    writes: JournalWrites | None = None


def _normalize(value: Any) -> Any:
    """``value`` as it reads back from JSON (so recorded and replayed values compare equal)."""
    return _JSON_ANY.decode(_JSON.encode(value))


def _to_msgpack(value: Any) -> bytes:
    if isinstance(value, dict) and len(value) == 1 and "$msgpack" in value:
        return base64.b64decode(value["$msgpack"])  # a value JSON could not express
    return _MSGPACK.encode(value)


def _writes_view(writes: JournalWrites | None) -> Any:
    return _normalize(msgspec.to_builtins(writes if writes is not None else JournalWrites()))


def _result_view(status: str, reply: Any, error: JournalError | None, writes: Any) -> Any:
    if status == "ok":
        return {"reply": _normalize(reply), "writes": _writes_view(writes)}
    return {"error": msgspec.to_builtins(error)}


def compare(record: JournalRecord, outcome: StepOutcome) -> list[Difference]:
    """List how ``outcome`` differs from ``record`` (empty: the step reproduced exactly)."""
    if not outcome.executed:
        return []
    if record.status != outcome.status:
        return [
            Difference(
                field="outcome",
                recorded=_result_view(record.status, record.reply, record.error, record.writes),
                replayed=_result_view(outcome.status, outcome.reply, outcome.error, outcome.writes),
            )
        ]
    differences: list[Difference] = []
    if record.status == "ok":
        if _normalize(record.reply) != _normalize(outcome.reply):
            differences.append(
                Difference(
                    field="reply",
                    recorded=_normalize(record.reply),
                    replayed=_normalize(outcome.reply),
                )
            )
        recorded_writes, replayed_writes = _writes_view(record.writes), _writes_view(outcome.writes)
        if recorded_writes != replayed_writes:
            differences.append(
                Difference(field="writes", recorded=recorded_writes, replayed=replayed_writes)
            )
    elif msgspec.to_builtins(record.error) != msgspec.to_builtins(outcome.error):
        differences.append(
            Difference(
                field="error",
                recorded=msgspec.to_builtins(record.error),
                replayed=msgspec.to_builtins(outcome.error),
            )
        )
    return differences


class _ScratchObject(TurnRunner):
    """One object on scratch in-memory storage, run by the worker's turn engine."""

    __slots__ = ("_address", "_limits", "_partition", "_prefix", "storage")

    storage: InMemoryStorage
    """The scratch store (replaced by ``Reexecutor.load``)."""

    def __init__(
        self,
        info: ActorClassInfo,
        address: ActorId,
        *,
        prefix: str,
        partition: int,
        limits: StorageLimits,
        handler_timeout: float,
        max_reply_bytes: int,
    ) -> None:
        self._address = address
        self._prefix = prefix
        self._partition = partition
        self._limits = limits
        self.storage = InMemoryStorage()
        super().__init__(info, DeadlineWatchdog(handler_timeout), max_reply_bytes=max_reply_bytes)

    def new_context(self) -> ActorContext:
        """A fresh context reading through the scratch store."""
        view = ActorStorage(
            self.storage, self._address.class_name, self._address.object_id, self._limits
        )
        return ActorContext(self._address, self._partition, self._prefix, view)


class Reexecutor:
    """Runs recorded steps of one object against today's class, on scratch in-memory storage.

    Each step runs through the worker's own turn engine (``ndo.service.TurnRunner``): the same
    instance rules, handler deadline and error mapping. A step whose method today's class lacks,
    or whose arguments it no longer accepts, fails as ingress would answer it (404, 400) without
    touching the instance.
    """

    # Configuration
    _info: ActorClassInfo
    _address: ActorId
    _partition: int
    # State
    _runner: _ScratchObject

    def __init__(
        self,
        cls: type[Actor],
        object_id: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        partition: int = 0,
        limits: StorageLimits | None = None,
        handler_timeout: float | None = None,
    ) -> None:
        """Prepare to run steps of ``cls`` object ``object_id``; the state starts empty.

        Args:
            cls: today's class of the object.
            object_id: the object's id.
            prefix: subject prefix the object sees in its context.
            partition: partition the object sees in its context.
            limits: storage limits (the worker defaults when omitted).
            handler_timeout: handler deadline (the worker default when omitted).
        """
        defaults = WorkerConfig()
        self._info = describe_class(cls)
        self._address = ActorId(self._info.name, object_id)
        self._partition = partition
        self._runner = _ScratchObject(
            self._info,
            self._address,
            prefix=prefix,
            partition=partition,
            limits=limits or defaults.storage_limits(),
            handler_timeout=handler_timeout or defaults.handler_timeout,
            max_reply_bytes=defaults.max_payload,
        )

    @property
    def storage(self) -> InMemoryStorage:
        """The scratch store (inspectable by tests)."""
        return self._runner.storage

    async def load(self, state: dict[str, Any], alarm: float | None) -> None:
        """Replace the scratch object's state and alarm; the next step builds a new instance."""
        storage = self._runner.storage = InMemoryStorage()
        await storage.open()
        await storage.commit(
            [
                ObjectWrite(
                    class_name=self._address.class_name,
                    object_id=self._address.object_id,
                    partition=self._partition,
                    epoch=0,
                    writes={key: _to_msgpack(value) for key, value in state.items()},
                    cleared=True,
                    alarm=alarm,
                )
            ]
        )
        self._runner.reload()

    async def _commit(self, changes: TurnWrites) -> JournalWrites | None:
        if changes.is_empty():
            return None
        await self.storage.commit([object_write(self._address, self._partition, 0, changes)])
        return jsonable_writes(changes)

    async def _apply(self, record: JournalRecord) -> JournalWrites | None:
        writes = record.writes
        if record.status != "ok" or writes is None:
            return None
        view = self._runner.context.storage
        if writes.cleared:
            view.delete_all()
        for key in writes.delete:
            view.delete(key)
        for key, value in writes.put.items():
            view.put(key, value)
        if writes.alarm is None:
            await view.delete_alarm()
        elif writes.alarm is not UNSET:
            await view.set_alarm(writes.alarm)
        return await self._commit(view.end_turn())

    def _envelope(self, record: JournalRecord, msgpack: bool) -> Envelope:
        """The message a recorded step carried, as ingress would build it today.

        Raises:
            NotFoundError: today's class has no such method.
            BadRequestError: today's method does not accept the recorded arguments.
        """
        if record.kind == "alarm":
            assert record.alarm is not None
            return Envelope(
                None, None, "", alarm=AlarmDelivery(record.alarm.due, record.alarm.attempt)
            )
        spec = self._info.method_spec(record.method)
        args = spec.decode_args(_JSON.encode(record.args))
        return Envelope(spec, args, "", msgpack=msgpack)

    async def run(self, record: JournalRecord) -> StepOutcome:
        """Run one recorded step (or skip or apply it, see the module doc) and commit it."""
        if record.status in ("duplicate", "aborted"):
            return StepOutcome(executed=False, status="skipped")
        if record.kind == "alarm_dropped":
            writes = await self._commit(self._runner.drop_alarm())
            return StepOutcome(executed=False, status="applied", writes=writes)
        if record.kind == "inspect":  # an operator replaced the state: no user code ran
            self._runner.drop_instance()
            return StepOutcome(executed=False, status="applied", writes=await self._apply(record))
        if record.truncated:  # its input is not known: apply what the record has
            return StepOutcome(executed=False, status="applied", writes=await self._apply(record))
        if record.kind == "stop":
            return await self._stop()
        if record.fresh:
            self._runner.drop_instance()
        msgpack = record.headers.get(Header.CONTENT_TYPE.value) == MSGPACK_CONTENT_TYPE
        try:
            envelope = self._envelope(record, msgpack)
        except ActorError as exc:
            return _failed(exc)
        outcome = await self._runner.run(envelope)
        if outcome.error is not None:
            return _failed(outcome.error)
        assert outcome.changes is not None
        writes = await self._commit(outcome.changes)
        return StepOutcome(
            executed=True,
            status="ok",
            reply=_normalize(jsonable_reply(outcome.body, msgpack)),
            writes=writes,
        )

    async def _stop(self) -> StepOutcome:
        """Re-run a ``stop`` step: ``on_stop`` (nothing, when today's class has none)."""
        outcome = await self._runner.stop(start=True)
        if outcome is None:
            return StepOutcome(executed=True, status="ok")
        if outcome.error is not None:
            return _failed(outcome.error)
        assert outcome.changes is not None
        return StepOutcome(executed=True, status="ok", writes=await self._commit(outcome.changes))


def _failed(error: ActorError) -> StepOutcome:
    return StepOutcome(
        executed=True,
        status="error",
        error=JournalError(code=error.code, type=error.type, message=error.message),
    )


# The command


class ReplayOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ndo replay`` was asked to do."""

    class_name: str
    object_id: str
    nats_url: str = DEFAULT_NATS_URL
    auth: NatsAuth = NatsAuth()
    """Credentials and TLS files for the connection."""
    prefix: str = DEFAULT_PREFIX
    at: Point | None = None
    """Last step to show (inclusive)."""
    since: Point | None = None
    """First step to show (inclusive)."""
    execute: bool = False
    """Re-run the shown steps on today's code and compare."""
    per_step: bool = False
    """With ``execute``: start every step from its recorded state, with a new instance."""
    as_json: bool = False
    """One JSON object per step instead of a table."""
    wide: bool = False
    """Do not shorten table cells."""


class SkippedLines:
    """Notes about journal lines that are not journal records, which ``ndo replay`` and
    ``ndo tail`` skip: the first ``limit`` are written to ``stream`` as they come, the rest are
    only counted, so a journal full of foreign messages cannot flood the terminal."""

    # Configuration
    _command: str
    _stream: TextIO
    _limit: int
    _before: Callable[[], None] | None
    # State
    count: int
    """Lines skipped so far."""

    def __init__(
        self,
        command: str,
        stream: TextIO,
        *,
        limit: int = 10,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Notes of ``command`` (``ndo replay``) on ``stream``; ``before`` runs before each
        note (clearing a progress line)."""
        self._command = command
        self._stream = stream
        self._limit = limit
        self._before = before
        self.count = 0

    def __call__(self, note: str) -> None:
        """Record one skipped line (``note`` says which and why)."""
        self.count += 1
        if self.count > self._limit:
            return
        if self._before is not None:
            self._before()
        self._stream.write(f"{self._command}: skipped a line that is not a record: {note}\n")
        if self.count == self._limit:
            self._stream.write(f"{self._command}: further skipped lines are only counted\n")

    def summary(self) -> str | None:
        """One line about the lines skipped beyond the ones shown (None: all were shown)."""
        if self.count <= self._limit:
            return None
        return (
            f"{self._command}: skipped {self.count} lines that are not journal records "
            f"(something other than ndo published on the journal's subjects)"
        )


class _Progress:
    """A one-line progress indicator on a terminal's stderr (silent otherwise)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._on = stream.isatty()
        self._shown = False
        self._last = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._on or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        self._shown = True
        self._stream.write(f"\r{label} {done}/{total}\x1b[K")
        self._stream.flush()

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False


def _compact(value: Any) -> str:
    return _JSON.encode(value).decode()


def sorted_json(value: Any) -> str:
    """Compact JSON with object keys sorted."""
    return msgspec.json.encode(value, order="sorted").decode()


def shorten(text: str, width: int | None) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (``None``: unchanged)."""
    if width is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def method_cell(record: JournalRecord) -> str:
    """What started a step, for a table cell (``increment``, ``alarm#2``, ...)."""
    if record.kind == "alarm_dropped":
        return "(alarm dropped)"
    if record.kind == "alarm" and record.alarm is not None:
        return f"alarm#{record.alarm.attempt}"
    return record.method


def result_cell(record: JournalRecord) -> str:
    """How a step ended, for a table cell (``-> 5``, ``error 500 handler_error: ...``)."""
    error = record.error
    if record.status == "ok":
        if record.kind in ("alarm_dropped", "stop"):
            return ""
        return "-> " + _compact(record.reply)
    if record.status == "duplicate":
        return "duplicate -> " + _compact(record.reply)
    assert error is not None
    if record.status == "aborted":
        return f"aborted {error.code} {error.type}"
    return f"error {error.code} {error.type}: {error.message}"


def _state_cell(step: JournalStep) -> str:
    text = sorted_json(step.state)
    if step.alarm is not None:
        text += f" alarm={format_time(step.alarm)}"
    if step.incomplete:
        text += " (incomplete)"
    return text


def step_json(
    step: JournalStep, outcome: StepOutcome | None, differences: list[Difference] | None
) -> dict[str, Any]:
    """The ``--json`` object of one step."""
    record = step.record
    line: dict[str, Any] = {
        "seq": step.seq,
        "place": step.index,
        "step": step.position.label,
        "time": format_time(record.time),
        "timestamp": record.time,
        "class": record.class_name,
        "id": record.object_id,
        "kind": record.kind,
        "status": record.status,
        "method": record.method,
        "args": record.args,
        "headers": record.headers,
        "alarm": journal_builtins(record.alarm),
        "reply": record.reply,
        "error": journal_builtins(record.error),
        "writes": journal_builtins(record.writes),
        "duration": record.duration,
        "worker": record.worker,
        "activation": record.activation,
        "write_count": record.write_count,
        "fresh": record.fresh,
        "state": step.state,
        "state_alarm": step.alarm,
        "incomplete": step.incomplete,
        "truncated": record.truncated,
        "missing_before": step.missing_before,
    }
    if outcome is not None:
        line["executed"] = outcome.executed
        line["diverged"] = bool(differences)
        line["differences"] = msgspec.to_builtins(differences or [])
        line["replayed"] = {
            "status": outcome.status,
            "reply": outcome.reply,
            "error": journal_builtins(outcome.error),
            "writes": journal_builtins(outcome.writes),
        }
    return line


def _print_table(
    out: TextIO,
    steps: list[JournalStep],
    checks: list[tuple[StepOutcome, list[Difference]]] | None,
    wide: bool,
) -> None:
    limit = None if wide else 48
    header = ["STEP", "TIME", "METHOD", "ARGS", "RESULT", "STATE AFTER"]
    if checks is not None:
        header.insert(1, "CHECK")
    rows: list[list[str]] = []
    for index, step in enumerate(steps):
        record = step.record
        row = [
            step.position.label,
            format_time(record.time),
            method_cell(record),
            shorten(sorted_json(record.args) if record.kind == "request" else "", limit),
            shorten(result_cell(record), limit),
            shorten(_state_cell(step), None if wide else 72),
        ]
        if checks is not None:
            outcome, differences = checks[index]
            row.insert(
                1, "DIVERGED" if differences else ("same" if outcome.executed else outcome.status)
            )
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip() + "\n")
    for index, row in enumerate(rows):
        if steps[index].missing_before:
            out.write(
                f"!! {steps[index].missing_before} state-changing record(s) lost by the journal "
                "here (see ndo_journal_failures_total): the state from here on misses them\n"
            )
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
        if checks is not None:
            for difference in checks[index][1]:
                recorded = shorten(sorted_json(difference.recorded), None if wide else 160)
                replayed = shorten(sorted_json(difference.replayed), None if wide else 160)
                out.write(f"    {difference.field}: recorded {recorded}\n")
                out.write(f"    {' ' * len(difference.field)}  replayed {replayed}\n")


async def run_replay(
    options: ReplayOptions,
    *,
    classes: Sequence[type[Actor]] = (),
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run ``ndo replay``: print an object's steps, optionally re-executed; return the exit code.

    Args:
        options: what to replay.
        classes: today's actor classes (needed with ``execute``; looked up by class name).
        out: where steps go (stdout by default).
        err: where notes, errors and progress go (stderr by default).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        validate_name(options.class_name, "class")
        validate_id(options.object_id)
    except InvalidSubjectError as exc:
        err.write(f"ndo replay: {exc}\n")
        return EXIT_USAGE
    cls = None
    if options.execute:
        cls = next((c for c in classes if c.__name__ == options.class_name), None)
        if cls is None:
            known = ", ".join(sorted(c.__name__ for c in classes)) or "none"
            err.write(
                f"ndo replay: --execute needs class {options.class_name} from --app modules "
                f"(found: {known})\n"
            )
            return EXIT_ERROR
    progress = _Progress(err)
    skipped = SkippedLines("ndo replay", err, before=progress.clear)
    try:
        nc = await connect(options.nats_url, options.auth)
        try:
            at_seq = int(options.at[1]) if options.at and options.at[0] == "seq" else None
            records = await read_journal(
                nc,
                options.prefix,
                options.class_name,
                options.object_id,
                until_seq=at_seq,
                progress=lambda done, total: progress("reading journal", done, total),
                on_unreadable=skipped,
            )
        finally:
            progress.clear()
            with contextlib.suppress(Exception):
                await nc.close()
    except ReplayError as exc:
        err.write(f"ndo replay: {exc}\n")
        return EXIT_ERROR
    if (note := skipped.summary()) is not None:
        err.write(note + "\n")
    label = f"{options.class_name}/{options.object_id}"
    if not records:
        err.write(f"ndo replay: no journal records for {label}\n")
        return EXIT_OK
    steps, before = select_steps(list(reconstruct(records)), at=options.at, since=options.since)
    checks: list[tuple[StepOutcome, list[Difference]]] | None = None
    if cls is not None:
        checks = await _execute(cls, options, steps, before, progress)
    if options.as_json:
        for index, step in enumerate(steps):
            outcome, differences = checks[index] if checks is not None else (None, None)
            out.write(_JSON.encode(step_json(step, outcome, differences)).decode() + "\n")
    elif steps:
        _print_table(out, steps, checks, options.wide)
    diverged = sum(1 for _, differences in checks or () if differences)
    summary = f"{len(steps)} of {len(records)} recorded steps of {label}"
    if checks is not None:
        summary += f"; {diverged} diverged" if diverged else "; no divergence"
        after_gap = sum(
            1
            for step, (_, differences) in zip(steps, checks, strict=True)
            if differences and step.incomplete
        )
        if after_gap:
            summary += (
                f" ({after_gap} of them after records the journal lost or truncated: the "
                "re-run started from a state missing those writes, so the gap may be the cause)"
            )
    lost = sum(step.missing_before for step in steps)
    if lost:
        summary += f"; {lost} state-changing record(s) lost by the journal: state incomplete"
    elif steps and steps[-1].incomplete:
        summary += "; state incomplete (a record was too large to journal in full)"
    (err if options.as_json else out).write(summary + "\n")
    return EXIT_DIVERGED if diverged else EXIT_OK


async def _execute(
    cls: type[Actor],
    options: ReplayOptions,
    steps: list[JournalStep],
    before: JournalStep | None,
    progress: _Progress,
) -> list[tuple[StepOutcome, list[Difference]]]:
    partition = steps[0].record.partition if steps else 0
    runner = Reexecutor(cls, options.object_id, prefix=options.prefix, partition=partition)
    await runner.load(before.state if before else {}, before.alarm if before else None)
    checks = []
    previous = before
    try:
        for index, step in enumerate(steps):
            if options.per_step and index:
                assert previous is not None
                await runner.load(previous.state, previous.alarm)
            outcome = await runner.run(step.record)
            checks.append((outcome, compare(step.record, outcome)))
            previous = step
            progress("executing", index + 1, len(steps))
    finally:
        progress.clear()
    return checks
