"""``ndo tail``: follow objects' journal records live.

An ordered push consumer (ephemeral, in memory, flow controlled) on the journal: on one object's
journal shard when the class and the id are given, else on every journal subject. Records of
other objects in the same messages are skipped (the class and the id may each be ``*``). It
starts at new records, or at ``since`` (a step or a time), and prints one line per record (or one
JSON object with ``--json``) until interrupted or ``count`` records were printed. A line that is
not a journal record (something other than ndo published it) is skipped with a note on stderr
(the first ten; the rest are counted, ``SkippedLines``); the records around it are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sys
from typing import Any, TextIO

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api as js_api

from ndo.ops._connect import DEFAULT_NATS_URL
from ndo.ops._replay import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Point,
    ReplayError,
    SkippedLines,
    StepPosition,
    check_journal_stream,
    connect,
    format_time,
    line_note,
    method_cell,
    result_cell,
    shorten,
    sorted_json,
    step_positions,
)
from ndo.service import NatsAuth
from ndo.service.journal import JournalRecord, decode_journal_message, journal_builtins
from ndo.subjects import (
    DEFAULT_PREFIX,
    InvalidSubjectError,
    journal_shard,
    journal_subject,
    journal_wildcard,
    validate_id,
    validate_name,
)

__all__ = ["TailOptions", "record_json", "run_tail"]

_JSON = msgspec.json.Encoder()


class TailOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ndo tail`` was asked to follow."""

    class_name: str = "*"
    """Class to follow, or ``*`` for every class."""
    object_id: str = "*"
    """Object id to follow, or ``*`` for every object."""
    nats_url: str = DEFAULT_NATS_URL
    auth: NatsAuth = NatsAuth()
    """Credentials and TLS files for the connection."""
    prefix: str = DEFAULT_PREFIX
    since: Point | None = None
    """Start at this sequence or time instead of at new records."""
    count: int | None = None
    """Stop after this many records."""
    as_json: bool = False
    wide: bool = False


def record_json(position: StepPosition, record: JournalRecord) -> dict[str, Any]:
    """The ``--json`` object of one followed record: ``seq``, ``place``, ``step``, ``time`` and
    the record's fields."""
    line: dict[str, Any] = {"seq": position.seq, "place": position.place, "step": position.label}
    line.update(journal_builtins(record))
    line["time"] = format_time(record.time)
    line["timestamp"] = record.time
    return line


def _line(position: StepPosition, record: JournalRecord, wide: bool) -> str:
    limit = None if wide else 60
    args = sorted_json(record.args) if record.kind == "request" else ""
    parts = [
        f"{position.label:>6}",
        format_time(record.time),
        f"{record.class_name}/{record.object_id}",
        method_cell(record),
        shorten(args, limit),
        shorten(result_cell(record), limit),
    ]
    if record.writes is not None:
        writes = msgspec.to_builtins(record.writes)
        writes = {k: v for k, v in writes.items() if v not in ({}, [], False)}
        parts.append("writes " + shorten(sorted_json(writes), limit))
    return "  ".join(p for p in parts if p)


def _consumer_config(since: Point | None) -> js_api.ConsumerConfig:
    if since is None:
        return js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW)
    kind, value = since
    if kind == "seq" and value <= 1:  # sequences start at 1; JetStream refuses a start of 0
        return js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    if kind == "seq":  # from the start of the step's message
        return js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=int(value)
        )
    return js_api.ConsumerConfig(
        deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
        opt_start_time=dt.datetime.fromtimestamp(value, dt.UTC),
    )


def _matching(lines: list[tuple[int, JournalRecord]], options: TailOptions) -> list[JournalRecord]:
    """The records of a journal message that ``options`` follows, in order."""
    return [
        record
        for _, record in lines
        if options.class_name in ("*", record.class_name)
        and options.object_id in ("*", record.object_id)
    ]


async def run_tail(
    options: TailOptions,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    ready: asyncio.Event | None = None,
) -> int:
    """Run ``ndo tail`` until cancelled or ``options.count`` records; return the exit code.

    Args:
        options: what to follow.
        out: where records go (stdout by default).
        err: where errors go (stderr by default).
        ready: set once the subscription is in place (records published later are seen).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        if options.class_name != "*":
            validate_name(options.class_name, "class")
        if options.object_id != "*":
            validate_id(options.object_id)
    except InvalidSubjectError as exc:
        err.write(f"ndo tail: {exc}\n")
        return EXIT_USAGE
    one_object = options.class_name != "*" and options.object_id != "*"
    subject = (
        journal_subject(options.prefix, journal_shard(options.class_name, options.object_id))
        if one_object
        else journal_wildcard(options.prefix)
    )
    try:
        nc = await connect(options.nats_url, options.auth)
    except ReplayError as exc:
        err.write(f"ndo tail: {exc}\n")
        return EXIT_ERROR
    try:
        stream = await check_journal_stream(nc, options.prefix)
        sub = await nc.jetstream().subscribe(
            subject, stream=stream, ordered_consumer=True, config=_consumer_config(options.since)
        )
        if ready is not None:
            ready.set()
        shown = 0
        skipped = SkippedLines("ndo tail", err)
        unreadable: list[tuple[int, str]] = []

        def note(number: int, reason: str) -> None:
            unreadable.append((number, reason))

        while options.count is None or shown < options.count:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            seq = msg.metadata.sequence.stream
            try:
                lines = decode_journal_message(msg.data, on_unreadable=note)
            except ValueError as exc:  # a record of a newer ndo
                err.write(f"ndo tail: journal message {seq} on {msg.subject}: {exc}\n")
                continue
            finally:
                for number, reason in unreadable:
                    skipped(line_note(seq, msg.subject, number, reason))
                unreadable.clear()
            records = _matching(lines, options)
            for position, record in step_positions(seq, records):
                if options.count is not None and shown >= options.count:
                    break
                if options.as_json:
                    out.write(_JSON.encode(record_json(position, record)).decode() + "\n")
                else:
                    out.write(_line(position, record, options.wide) + "\n")
                shown += 1
            out.flush()
        return EXIT_OK
    except ReplayError as exc:
        err.write(f"ndo tail: {exc}\n")
        return EXIT_ERROR
    except (nats.js.errors.Error, nats.errors.Error) as exc:
        err.write(f"ndo tail: {exc}\n")
        return EXIT_ERROR
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
