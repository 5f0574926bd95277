"""``ndo tail``: follow objects' journal records live.

An ordered push consumer (ephemeral, in memory, flow controlled) on
``<prefix>.sys.journal.<Class>.<id>``, where the class and the id may each be ``*``. It starts at
new records, or at ``since`` (a sequence number or a time), and prints one line per record (or one
JSON object with ``--json``) until interrupted or ``count`` records were printed.
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
    check_journal_stream,
    connect,
    format_time,
    method_cell,
    result_cell,
    shorten,
    sorted_json,
)
from ndo.service.journal import JournalRecord, decode_journal_record
from ndo.subjects import (
    DEFAULT_PREFIX,
    InvalidSubjectError,
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
    prefix: str = DEFAULT_PREFIX
    since: Point | None = None
    """Start at this sequence or time instead of at new records."""
    count: int | None = None
    """Stop after this many records."""
    as_json: bool = False
    wide: bool = False


def record_json(seq: int, record: JournalRecord) -> dict[str, Any]:
    """The ``--json`` object of one followed record: ``seq``, ``time`` and the record's fields."""
    line: dict[str, Any] = {"seq": seq, "time": format_time(record.time)}
    line.update(msgspec.to_builtins(record))
    line["timestamp"] = record.time
    del line["record"]
    return line


def _line(seq: int, record: JournalRecord, wide: bool) -> str:
    limit = None if wide else 60
    args = sorted_json(record.args) if record.kind == "request" else ""
    parts = [
        f"{seq:>6}",
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
    if kind == "seq":
        return js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=int(value)
        )
    return js_api.ConsumerConfig(
        deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
        opt_start_time=dt.datetime.fromtimestamp(value, dt.UTC),
    )


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
    subject = journal_wildcard(options.prefix, options.class_name, options.object_id)
    try:
        nc = await connect(options.nats_url)
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
        while options.count is None or shown < options.count:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            seq = msg.metadata.sequence.stream
            try:
                record = decode_journal_record(msg.data)
            except ValueError as exc:
                err.write(f"ndo tail: record {seq} on {msg.subject}: {exc}\n")
                continue
            if options.as_json:
                out.write(_JSON.encode(record_json(seq, record)).decode() + "\n")
            else:
                out.write(_line(seq, record, options.wide) + "\n")
            out.flush()
            shown += 1
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
