"""The journal's record format: what ``ndo replay``, ``ndo tail`` and any tool read back.

A public module, apart from the publisher (``service._journal``), because it is a contract: the
worker writes these records and tools read them, possibly of another ndo version. Records are
JSON (readable with any NATS tool, ``nats stream view``), tagged and versioned: a reader refuses a
version newer than it knows, with a message that says to upgrade.

The stream is ``<PREFIX>_JOURNAL`` (``journal_stream_name``) on ``<prefix>.sys.journal.>``. A
message holds the records of many turns, one JSON line each (``decode_journal_message``), of the
objects of one journal shard (``ndo.subjects.journal_subject``; ``journal_shard`` says which);
a step is identified by the message's stream sequence and the record's place in it. ndo before
journal shards wrote one record per message on a per-object subject
(``ndo.subjects.legacy_journal_subject``): such a message is a one-line message here.

The journal sits on a shared bus, so a reader meets lines no ndo wrote: ``decode_journal_message``
hands those to the caller's ``on_unreadable`` (tools print a warning and go on with the valid
records). A line that *is* a journal record of a newer version is never skipped that way: the
reader refuses it, since skipping it would silently hide history.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, UnsetType

from ndo.actors.runtime import ALARM_UNCHANGED, TurnWrites
from ndo.subjects import sys_subject

__all__ = [
    "JOURNAL_VERSION",
    "JournalAlarm",
    "JournalError",
    "JournalRecord",
    "JournalWrites",
    "TurnKind",
    "TurnStatus",
    "decode_journal_message",
    "decode_journal_record",
    "encode_journal_record",
    "journal_builtins",
    "journal_stream_name",
    "journal_stream_subjects",
    "jsonable_args",
    "jsonable_reply",
    "jsonable_value",
    "jsonable_writes",
    "object_marker",
    "record_advances_state",
]

JOURNAL_VERSION: Final = 1
"""Version of ``JournalRecord`` written by this ndo; readers refuse newer ones."""

TurnKind: TypeAlias = Literal["request", "alarm", "alarm_dropped", "stop", "inspect"]
"""What started the step: a request, an alarm delivery, the runtime dropping an alarm that
failed ``alarm_max_attempts`` times (no user code ran; its write-set deletes the alarm), the
object leaving memory (``stop``: its ``on_stop`` hook ran; method ``on_stop``), or an operator
replacing or deleting its state (``inspect``: ``ndo inspect import`` or ``delete``, method
``inspect.import`` / ``inspect.delete``; no user code ran)."""

TurnStatus: TypeAlias = Literal["ok", "error", "aborted", "duplicate"]
"""How the step ended.

* ``ok``: the handler returned; its write-set was committed and its reply sent.
* ``error``: the handler (or encoding its reply) failed; nothing was written.
* ``aborted``: the handler ran but the runtime discarded the turn (a commit failed, or the object
  was reset meanwhile); nothing was written and the caller was told to retry.
* ``duplicate``: the request's idempotency key was already applied; the stored reply was sent
  and no handler ran.
"""


_STREAM_SUFFIX: Final = "_JOURNAL"


class JournalError(msgspec.Struct, frozen=True, kw_only=True):
    """The error a step ended with, as the caller received it."""

    code: int
    """HTTP-like wire code (400, 409, 500, 503, 504, ...)."""
    type: str
    """Stable error type, e.g. ``handler_error`` or ``object_reset``."""
    message: str
    """Human-readable description."""


class JournalAlarm(msgspec.Struct, frozen=True, kw_only=True):
    """The alarm delivery a step handled."""

    due: float
    """Epoch seconds the alarm was set for."""
    attempt: int
    """1 for the first delivery, 2 for the first retry, ..."""


class JournalWrites(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The write-set a step committed, values decoded from MessagePack to JSON-able data.

    Applied in this order: ``cleared`` (delete every key), then ``delete``, then ``put``.
    """

    put: dict[str, Any] = {}
    """Keys set, with their new values."""
    delete: list[str] = []
    """Keys deleted (kept apart from ``put`` because ``null`` is a storable value)."""
    cleared: bool = False
    """Every key of the object was deleted first (``delete_all``)."""
    alarm: float | UnsetType | None = UNSET
    """New alarm time (epoch seconds); ``null``: alarm deleted; absent: alarm unchanged."""


class JournalRecord(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="record", tag="turn"
):
    """One step of one object's history: input, outcome, write-set, timing.

    The message's JetStream stream sequence is the step's ``seq`` (not stored in the body).
    """

    version: int = JOURNAL_VERSION
    """Record format version; readers refuse versions newer than they know."""
    kind: TurnKind
    """What started the step."""
    status: TurnStatus
    """How it ended."""
    class_name: str = msgspec.field(name="class")
    """The object's class."""
    object_id: str = msgspec.field(name="id")
    """The object's id."""
    partition: int
    """The partition the object hashes to."""
    method: str
    """Method called (``alarm`` for alarm steps, ``on_stop`` for ``stop`` steps)."""
    args: dict[str, Any] = {}
    """The decoded arguments, defaults filled in."""
    headers: dict[str, str] = {}
    """Request headers that change behaviour (``Idempotency-Key``, ``Content-Type``)."""
    alarm: JournalAlarm | None = None
    """The delivery, for ``alarm`` and ``alarm_dropped`` steps."""
    reply: Any = None
    """The reply value (``ok`` and ``duplicate``)."""
    error: JournalError | None = None
    """The error reply (``error`` and ``aborted``)."""
    writes: JournalWrites | None = None
    """The committed write-set (``ok`` steps that changed something)."""
    time: float
    """Epoch seconds the step started."""
    duration: float
    """Seconds the handler ran (0 when none ran)."""
    worker: str
    """Name of the worker that ran the step."""
    fresh: bool = False
    """A new instance was built for this step (``on_start`` ran before it)."""
    truncated: bool = False
    """The full record was over the server's max_payload: ``args``, ``reply`` and the values of
    ``writes.put`` were left out, so it cannot be re-run and the state after it is incomplete."""
    activation: str = ""
    """Token of the in-memory instance (activation) that ran the step; a new one after every
    eviction, reload or move. Empty in records written before it existed."""
    write_count: int = 0
    """Steps of this activation so far, this one included, that committed a non-empty write-set
    (``writes`` present). Replay checks it for gaps: a record the journal lost (buffer full,
    timeout) that changed state leaves ``write_count`` one step ahead of what replay counted."""


class _RecordHeader(msgspec.Struct, frozen=True, tag_field="record", tag="turn"):
    """What every version of a journal record has: its tag and version."""

    version: int = JOURNAL_VERSION


class _NewerRecordError(ValueError):
    """A journal record of a newer version than this ndo reads."""


_REASON_LENGTH: Final = 160
"""Longest reason given for an unreadable line (a decode error can quote the input)."""

_RECORD_ENCODER: Final = msgspec.json.Encoder()
_RECORD_DECODER: Final = msgspec.json.Decoder(JournalRecord)
_HEADER_DECODER: Final = msgspec.json.Decoder(_RecordHeader)
_JSON_DECODER: Final = msgspec.json.Decoder()
_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder()


def encode_journal_record(record: JournalRecord) -> bytes:
    """Encode a record as the JSON body of a journal message."""
    return _RECORD_ENCODER.encode(record)


def decode_journal_record(data: bytes) -> JournalRecord:
    """Decode a journal message body.

    Raises:
        ValueError: the body is not a journal record this ndo understands (the message says
            whether a newer ndo wrote it).
    """
    try:
        record = _RECORD_DECODER.decode(data)
    except msgspec.DecodeError as exc:
        _check_version(data)
        raise ValueError(f"not an ndo journal record: {str(exc)[:_REASON_LENGTH]}") from None
    _refuse_newer(record.version)
    return record


def _check_version(data: bytes) -> None:
    """Raise ``_NewerRecordError`` if ``data`` is a journal record of a newer version (one this
    ndo cannot decode, because the format changed)."""
    try:
        header = _HEADER_DECODER.decode(data)
    except msgspec.DecodeError:
        return
    _refuse_newer(header.version)


def _refuse_newer(version: int) -> None:
    if version > JOURNAL_VERSION:
        raise _NewerRecordError(
            f"journal record version {version} was written by a newer ndo (this one "
            f"reads up to version {JOURNAL_VERSION}); upgrade ndo to read it"
        )


def decode_journal_message(
    data: bytes,
    marker: bytes | None = None,
    *,
    on_unreadable: Callable[[int, str], None] | None = None,
) -> list[tuple[int, JournalRecord]]:
    """Decode a journal message: its records as ``(line number, record)``, in order.

    Args:
        data: the message body (JSON lines).
        marker: only decode lines holding these bytes (``object_marker``): a cheap pre-filter
            for one object's records; the caller still checks each record's class and id.
        on_unreadable: called with ``(line number, reason)`` for each line that is not a
            journal record (something other than ndo published it), which is then skipped.
            Without it, such a line raises.

    Raises:
        ValueError: a line is a journal record of a newer version (always), or, without
            ``on_unreadable``, a line is not a journal record.
    """
    if marker is not None and marker not in data:
        return []
    records: list[tuple[int, JournalRecord]] = []
    for number, line in enumerate(data.split(b"\n")):
        if marker is not None and marker not in line:
            continue
        try:
            records.append((number, decode_journal_record(line)))
        except _NewerRecordError:
            raise
        except ValueError as exc:
            if on_unreadable is None:
                raise
            on_unreadable(number, str(exc))
    return records


def journal_builtins(value: Any) -> Any:
    """``value`` (a record or a part of one) as plain data with every field present.

    Records are encoded without their default values (``error: null``, ``delete: []``) to keep
    messages small; tools that print them as JSON use this so every documented key is there.
    """
    if isinstance(value, msgspec.Struct):
        fields: dict[str, Any] = {}
        for field in msgspec.structs.fields(value):
            item = getattr(value, field.name)
            if item is not UNSET:
                fields[field.encode_name] = journal_builtins(item)
        return fields
    return msgspec.to_builtins(value)


def object_marker(class_name: str, object_id: str) -> bytes:
    """Bytes every encoded record of object ``(class_name, object_id)`` contains (its class and
    id as the encoder writes them, side by side)."""
    return (
        b'"class":'
        + _RECORD_ENCODER.encode(class_name)
        + b',"id":'
        + _RECORD_ENCODER.encode(object_id)
        + b","
    )


def _base64(raw: bytes) -> dict[str, str]:
    return {"$msgpack": base64.b64encode(raw).decode("ascii")}


def jsonable_value(raw: bytes, *, checked: bool = True) -> Any:
    """Decode a stored MessagePack value into JSON-able data.

    Bytes become base64 strings and non-string map keys strings (as JSON would write them); a
    value JSON cannot express at all (a MessagePack extension type) is kept as
    ``{"$msgpack": "<base64 of the raw value>"}``. With ``checked=False`` the value is only
    decoded, not test-encoded: encoding the record may then fail, and the caller retries with
    ``checked=True`` (the worker does, to save an encode per value on the common path).
    """
    try:
        value = _MSGPACK_DECODER.decode(raw)
        if checked:
            _RECORD_ENCODER.encode(value)
    except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return _base64(raw)
    return value


def jsonable_args(args: Any) -> Any:
    """Decoded call arguments (a Struct, a dict) as JSON-able data: a MessagePack extension
    value anywhere in them becomes ``{"$msgpack": "<base64>"}``."""
    return _without_extensions(_MSGPACK_DECODER.decode(msgspec.msgpack.encode(args)))


def _without_extensions(value: Any) -> Any:
    if isinstance(value, msgspec.msgpack.Ext):
        return _base64(msgspec.msgpack.encode(value))
    if isinstance(value, dict):
        return {key: _without_extensions(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_extensions(item) for item in value]
    return value


def jsonable_reply(body: bytes, msgpack: bool) -> Any:
    """Decode a reply body (JSON, or MessagePack when ``msgpack``) into JSON-able data."""
    if msgpack:
        return jsonable_value(body)
    try:
        return _JSON_DECODER.decode(body)
    except msgspec.DecodeError:
        return body.decode("utf-8", "replace")


def jsonable_writes(
    changes: TurnWrites, *, truncated: bool = False, checked: bool = True
) -> JournalWrites:
    """Turn a committed write-set into its journal form (``put`` left empty when ``truncated``;
    ``checked``: see ``jsonable_value``)."""
    put: dict[str, Any] = {}
    delete: list[str] = []
    for key, raw in changes.writes.items():
        if raw is None:
            delete.append(key)
        elif not truncated:
            put[key] = jsonable_value(raw, checked=checked)
    alarm: float | UnsetType | None = UNSET if changes.alarm == ALARM_UNCHANGED else changes.alarm
    return JournalWrites(put=put, delete=sorted(delete), cleared=changes.cleared, alarm=alarm)


def record_advances_state(record: JournalRecord) -> bool:
    """Whether a record counts in its activation's ``write_count`` (a committed write-set)."""
    return record.status == "ok" and record.writes is not None


# Stream


def journal_stream_name(prefix: str) -> str:
    """Name of the journal stream of a deployment: ``ndo`` -> ``NDO_JOURNAL``."""
    return prefix.upper().replace(".", "_").replace("-", "_") + _STREAM_SUFFIX


def journal_stream_subjects(prefix: str) -> list[str]:
    """Subjects the journal stream captures (never the RPC subjects)."""
    return [sys_subject(prefix, "journal", ">")]
