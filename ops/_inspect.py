"""``ndo inspect``: which objects a running deployment stores, what one holds, and moving objects
out of it and into it (JSONL), over NATS.

Every request goes to the holder of the object's partition (``service/_inspector.py``), so the
tool works the same with local and replicated storage and never opens a file a worker holds:

* ``objects``: each partition's holder lists a page of its objects (in ``(class, id)`` order)
  and counts them per class; the pages are merged here, and ``--after CLASS/ID`` continues;
* ``show``: the object's keys, values (decoded from MessagePack), alarm, partition and holder;
* ``export``: one JSON line per object (``ExportedObject``), values as JSON where JSON holds them
  exactly, else as their stored MessagePack (base64, under ``binary``);
* ``import``: every line checked before anything is written; objects that already hold state
  are refused (nothing is imported) unless ``--replace``; each object is written in one turn
  through its owner, idempotent under retries;
* ``delete``: every key and the alarm, in one turn through the owner.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, ActorError, RetryPolicy
from ndo.ops._connect import CannotConnectError, connect_once
from ndo.ops._replay import format_time, shorten
from ndo.ops._text import count, table
from ndo.service import NatsAuth
from ndo.service.inspection import (
    MAX_LIST_LIMIT,
    DeleteRequest,
    ImportRequest,
    InfoReply,
    ListedObject,
    ObjectsReply,
    ObjectsRequest,
    ShowReply,
    ShowRequest,
    WriteReply,
)
from ndo.subjects import inspect_subject, is_valid_id, partition_of, validate_name

__all__ = [
    "ExportedObject",
    "InspectClient",
    "InspectOptions",
    "add_inspect_parser",
    "inspect_options",
    "run_inspect",
]

_T = TypeVar("_T")

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2

_IN_FLIGHT: Final = 16
"""Requests ``ndo inspect`` keeps in flight at once (partitions listed, objects exported)."""
_EXPORT_PAGE: Final = 200
"""Objects listed per partition request while exporting."""
_VALUE_WIDTH: Final = 60
"""Characters of a value shown in a table cell (``--wide``: all)."""


class ExportedObject(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One line of ``ndo inspect export`` (and of ``import``'s input)."""

    class_name: str = msgspec.field(name="class")
    id: str
    state: dict[str, Any] = {}
    """Keys whose values JSON holds exactly, decoded."""
    binary: dict[str, str] = {}
    """Keys whose values JSON cannot hold exactly (bytes, maps with non-string keys, ...): the
    stored MessagePack, base64."""
    alarm: float | None = None
    """The alarm time (epoch seconds), or null."""

    def entries(self) -> dict[str, bytes]:
        """The stored bytes of every key.

        Raises:
            ValueError: a key is in both ``state`` and ``binary``, or a ``binary`` value is not
                base64 MessagePack, or a ``state`` value cannot be encoded.
        """
        both = sorted(set(self.state) & set(self.binary))
        if both:
            raise ValueError(f"key {both[0]!r} is in both state and binary")
        stored = {key: msgspec.msgpack.encode(value) for key, value in self.state.items()}
        for key, text in self.binary.items():
            try:
                raw = base64.b64decode(text, validate=True)
                msgspec.msgpack.decode(raw)
            except (binascii.Error, ValueError, msgspec.DecodeError):
                raise ValueError(f"binary value of key {key!r} is not base64 MessagePack") from None
            stored[key] = raw
        return stored


def export_record(class_name: str, object_id: str, show: Shown) -> ExportedObject:
    """The export line of an object: values in ``state`` when JSON holds them exactly."""
    record = ExportedObject(class_name=class_name, id=object_id, alarm=show.alarm)
    for key, raw in show.entries:
        value = msgspec.msgpack.decode(raw)
        try:
            exact = msgspec.msgpack.encode(msgspec.json.decode(msgspec.json.encode(value))) == raw
        except (TypeError, ValueError, msgspec.EncodeError):
            exact = False
        if exact:
            record.state[key] = value
        else:
            record.binary[key] = base64.b64encode(raw).decode()
    return record


@dataclass(frozen=True, slots=True)
class Shown:
    """One object as its owner has it stored: every key, not one page."""

    first: ShowReply
    """The first page (partition, holder, epoch, alarm, size)."""
    entries: list[tuple[str, bytes]]

    @property
    def alarm(self) -> float | None:
        """The object's alarm, or None."""
        return self.first.alarm

    @property
    def exists(self) -> bool:
        """It holds a key or an alarm."""
        return bool(self.entries) or self.first.alarm is not None


class InspectClient:
    """``ndo inspect``'s requests to a deployment (``service/inspection.py`` records)."""

    _client: ActorClient
    _nc: NatsClient
    """The connection (its ``max_payload`` bounds an import)."""
    _prefix: str
    partitions: int
    """The deployment's partition count (``connect``)."""

    def __init__(self, nc: NatsClient, prefix: str, *, timeout: float = 5.0) -> None:
        """Talk to deployment ``prefix`` over ``nc``; call ``connect`` first."""
        self._client = ActorClient(
            nc, prefix=prefix, timeout=timeout, retry=RetryPolicy(attempts=4)
        )
        self._nc = nc
        self._prefix = prefix
        self.partitions = 0

    async def connect(self) -> InfoReply:
        """Ask any worker for the deployment's partition count.

        Raises:
            ActorError: no worker answered (``UnavailableError``).
        """
        body = await self._client.request(inspect_subject(self._prefix, "info"), b"")
        info = msgspec.json.decode(body, type=InfoReply)
        self.partitions = info.partitions
        return info

    def partition(self, class_name: str, object_id: str) -> int:
        """The partition of an object."""
        return partition_of(class_name, object_id, self.partitions)

    async def objects(self, partition: int, request: ObjectsRequest) -> ObjectsReply:
        """One page of ``partition``'s objects."""
        return await self._ask("objects", partition, request, ObjectsReply)

    async def show(self, class_name: str, object_id: str) -> Shown:
        """Every key of an object (page after page), its alarm and its holder."""
        partition = self.partition(class_name, object_id)
        first = page = await self._ask(
            "show", partition, ShowRequest(class_name=class_name, id=object_id), ShowReply
        )
        entries = list(page.entries)
        while page.more and page.entries:
            after = page.entries[-1][0]
            request = ShowRequest(class_name=class_name, id=object_id, after=after)
            page = await self._ask("show", partition, request, ShowReply)
            entries.extend(page.entries)
        return Shown(first, entries)

    async def write(self, request: ImportRequest | DeleteRequest) -> WriteReply:
        """Import or delete one object through its owner (idempotent under retries).

        Raises:
            ActorError: refused (409 ``object_exists``, 400, 413), or not answered.
            ValueError: the request is larger than the server's max_payload.
        """
        operation = "import" if isinstance(request, ImportRequest) else "delete"
        body = msgspec.json.encode(request)
        if len(body) > self._nc.max_payload:
            raise ValueError(
                f"{len(body):,} bytes encoded, over the NATS server's max_payload "
                f"({self._nc.max_payload:,}); raise max_payload in the server's configuration"
            )
        partition = self.partition(request.class_name, request.id)
        reply = await self._client.request(
            inspect_subject(self._prefix, operation, partition), body
        )
        return msgspec.json.decode(reply, type=WriteReply)

    async def _ask(self, operation: str, partition: int, request: Any, kind: type[_T]) -> _T:
        subject = inspect_subject(self._prefix, operation, partition)
        reply = await self._client.request(subject, msgspec.json.encode(request))
        return msgspec.json.decode(reply, type=kind)


def add_inspect_parser(
    commands: Any, add_connection_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``ndo inspect`` and its subcommands to the ``ndo`` command's subparsers
    (``add_connection_options`` adds ``--nats-url``, ``--prefix`` and the credentials)."""
    inspect = commands.add_parser(
        "inspect",
        help="list, show, export, import and delete stored objects of a running deployment",
        description="Ask a running deployment over NATS (each partition's holder answers, so "
        "this works with local and replicated storage and never opens a worker's files). "
        "Reads never block the workers; import and delete go through each object's owner, "
        "in one turn. Exit codes: 0 ok, 1 error (or partitions that did not answer), 2 bad "
        "usage.",
    )
    actions = inspect.add_subparsers(dest="inspect_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=description
        )
        add_connection_options(parser)
        parser.add_argument(
            "--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)"
        )
        return parser

    objects = action(
        "objects",
        "stored objects and their count per class, a page at a time",
        "List stored objects (those holding a key or an alarm) in (class, id) order, with the "
        "number of objects of each class.",
    )
    objects.add_argument("--class", dest="class_name", metavar="CLASS", help="only this class")
    objects.add_argument(
        "--id-prefix",
        dest="id_prefix",
        default="",
        metavar="TEXT",
        help="only ids that start with TEXT (--prefix is the deployment's subject prefix)",
    )
    objects.add_argument(
        "--after", metavar="CLASS/ID", help="the next page: objects after this one"
    )
    objects.add_argument(
        "--limit", type=int, default=50, help=f"objects per page (1-{MAX_LIST_LIMIT}; default 50)"
    )
    objects.add_argument("--json", action="store_true", help="print JSON")

    show = action(
        "show",
        "one object's keys and values, alarm, partition and holder",
        "Print what CLASS/ID has stored: its keys and values (decoded), its alarm, its "
        "partition and the worker holding it.",
    )
    show.add_argument("class_name", metavar="CLASS")
    show.add_argument("object_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--wide", action="store_true", help="do not shorten values")

    export = action(
        "export",
        "write objects as JSON lines to standard output",
        "Write every stored object (or CLASS's, or CLASS/ID) as one JSON line: class, id, "
        "state (values JSON holds exactly), binary (base64 MessagePack of the others), alarm. "
        "`ndo inspect import` loads it back.",
    )
    export.add_argument("class_name", metavar="CLASS", nargs="?")
    export.add_argument("object_id", metavar="ID", nargs="?")
    export.add_argument(
        "--id-prefix",
        dest="id_prefix",
        default="",
        metavar="TEXT",
        help="only ids that start with TEXT",
    )

    load = action(
        "import",
        "load objects from JSON lines (an export)",
        "Load objects from FILE (`-`: standard input), written by `ndo inspect export`. Every "
        "line is checked first; objects that already hold state are refused, and nothing is "
        "imported, unless --replace. Each object is written in one turn by its owner.",
    )
    load.add_argument("file", metavar="FILE")
    load.add_argument(
        "--replace", action="store_true", help="overwrite objects that already hold state"
    )
    load.add_argument("--json", action="store_true", help="print the summary as JSON")

    delete = action(
        "delete",
        "delete an object's keys and alarm, through its owner",
        "Delete every key of CLASS/ID and its alarm, in one turn of the object (its owner "
        "runs it in order with the object's calls; the next call starts from empty state).",
    )
    delete.add_argument("class_name", metavar="CLASS")
    delete.add_argument("object_id", metavar="ID")
    delete.add_argument("--json", action="store_true", help="print JSON")


def inspect_options(
    args: argparse.Namespace, nats_url: str, auth: NatsAuth | None
) -> InspectOptions:
    """The ``InspectOptions`` of parsed ``ndo inspect`` arguments."""
    return InspectOptions(
        command=args.inspect_command,
        nats_url=nats_url,
        auth=auth,
        prefix=args.prefix,
        class_name=getattr(args, "class_name", None),
        object_id=getattr(args, "object_id", None),
        id_prefix=getattr(args, "id_prefix", ""),
        after=getattr(args, "after", None),
        limit=getattr(args, "limit", 50),
        file=getattr(args, "file", "-"),
        replace=getattr(args, "replace", False),
        as_json=getattr(args, "json", False),
        wide=getattr(args, "wide", False),
        timeout=args.timeout,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class InspectOptions:
    """What one ``ndo inspect`` run does (from the command line)."""

    command: str
    """``objects``, ``show``, ``export``, ``import`` or ``delete``."""
    nats_url: str
    auth: NatsAuth | None
    prefix: str
    class_name: str | None = None
    object_id: str | None = None
    id_prefix: str = ""
    after: str | None = None
    """``objects``: continue after this ``CLASS/ID``."""
    limit: int = 50
    file: str = "-"
    """``import``: the JSONL file (``-``: standard input)."""
    replace: bool = False
    as_json: bool = False
    wide: bool = False
    timeout: float = 5.0


class _Failure(Exception):
    """A run that must stop: the message is printed, the code returned."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


async def run_inspect(
    options: InspectOptions, *, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """Run one ``ndo inspect`` command; return its exit code (0 ok, 1 error, 2 bad usage)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        _check_names(options)
        lines = _read_import(options.file) if options.command == "import" else []
    except _Failure as failure:
        print(f"ndo inspect {options.command}: {failure}", file=err)
        return failure.code
    try:
        nc = await connect_once(
            options.nats_url,
            options.auth,
            hint="is `ndo serve` running? (or pass --nats-url)",
            name="ndo inspect",
        )
    except (CannotConnectError, ValueError) as exc:
        print(f"ndo inspect: {exc}", file=err)
        return EXIT_ERROR
    try:
        client = InspectClient(nc, options.prefix, timeout=options.timeout)
        try:
            await client.connect()
        except ActorError as exc:
            raise _Failure(
                f"no worker of deployment {options.prefix!r} answered ({exc.message}); is "
                "`ndo serve` running, with this --prefix?"
            ) from None
        command = _COMMANDS[options.command]
        return await command(client, options, _Output(out, err), lines)
    except _Failure as failure:
        print(f"ndo inspect {options.command}: {failure}", file=err)
        return failure.code
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


@dataclass(frozen=True, slots=True)
class _Output:
    out: IO[str]
    err: IO[str]

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def json(self, value: Any) -> None:
        print(msgspec.json.format(msgspec.json.encode(value).decode(), indent=2), file=self.out)

    def note(self, text: str) -> None:
        print(text, file=self.err)

    def progress(self, text: str) -> None:
        """A progress line on a terminal (overwritten by the next one); nothing otherwise."""
        if self.err.isatty():
            print(f"\r{text}", end="", file=self.err, flush=True)

    def progress_done(self) -> None:
        if self.err.isatty():
            print("\r\033[K", end="", file=self.err, flush=True)


def _check_names(options: InspectOptions) -> None:
    try:
        if options.class_name is not None:
            validate_name(options.class_name, "class name")
    except ValueError as exc:
        raise _Failure(str(exc), EXIT_USAGE) from None
    if options.object_id is not None and not is_valid_id(options.object_id):
        raise _Failure(
            f"invalid object id {options.object_id!r} (letters, digits, '_' and '-')", EXIT_USAGE
        )
    if not 1 <= options.limit <= MAX_LIST_LIMIT:
        raise _Failure(f"--limit must be 1-{MAX_LIST_LIMIT}", EXIT_USAGE)


# objects


async def _objects(
    client: InspectClient, options: InspectOptions, output: _Output, _: list[ExportedObject]
) -> int:
    after = _parse_after(options.after) if options.after else None
    request = ObjectsRequest(
        class_name=options.class_name, prefix=options.id_prefix, after=after, limit=options.limit
    )
    replies, missing = await _each_partition(
        client, lambda p: client.objects(p, request), output, "listed"
    )
    counts: dict[str, int] = {}
    for reply in replies:
        for name, number in reply.counts.items():
            counts[name] = counts.get(name, 0) + number
    listed = sorted(
        ((o, r.partition) for r in replies for o in r.objects),
        key=lambda x: (x[0].class_name, x[0].id),
    )
    shown = listed[: options.limit]
    more = len(listed) > options.limit or any(len(r.objects) == options.limit for r in replies)
    following = f"{shown[-1][0].class_name}/{shown[-1][0].id}" if more and shown else None
    if options.as_json:
        output.json(
            {
                "counts": dict(sorted(counts.items())),
                "total": sum(counts.values()),
                "objects": [_listed_json(o, p) for o, p in shown],
                "next": following,
                "missing_partitions": missing,
            }
        )
    else:
        _print_objects(output, counts, shown, following, options)
    return _missing(output, missing, client.partitions)


def _listed_json(listed: ListedObject, partition: int) -> dict[str, Any]:
    return {**msgspec.to_builtins(listed), "partition": partition}


def _print_objects(
    output: _Output,
    counts: dict[str, int],
    shown: Sequence[tuple[ListedObject, int]],
    following: str | None,
    options: InspectOptions,
) -> None:
    if not counts:
        output.line("no objects stored" + _filters(options))
        return
    rows = [(name, f"{number:,}") for name, number in sorted(counts.items())]
    if len(rows) > 1:
        rows.append(("(all)", f"{sum(counts.values()):,}"))
    for line in table(("CLASS", "OBJECTS"), rows):
        output.line(line)
    output.line()
    for line in table(
        ("CLASS", "ID", "KEYS", "BYTES", "ALARM", "PARTITION"),
        [
            (
                o.class_name,
                o.id,
                f"{o.keys:,}",
                f"{o.size:,}",
                "-" if o.alarm is None else format_time(o.alarm),
                str(p),
            )
            for o, p in shown
        ],
    ):
        output.line(line)
    if following:
        output.line()
        output.line(
            f"more objects follow; next page: ndo inspect objects --after {following}"
            + (f" --limit {options.limit}" if options.limit != 50 else "")
        )


def _filters(options: InspectOptions) -> str:
    said = []
    if options.class_name:
        said.append(f"class {options.class_name}")
    if options.id_prefix:
        said.append(f"ids starting with {options.id_prefix!r}")
    if options.after:
        said.append(f"after {options.after}")
    return f" ({', '.join(said)})" if said else ""


def _parse_after(text: str) -> tuple[str, str]:
    class_name, _, object_id = text.partition("/")
    if not class_name or not object_id:
        raise _Failure(f"--after takes CLASS/ID, got {text!r}", EXIT_USAGE)
    return class_name, object_id


async def _each_partition(
    client: InspectClient,
    ask: Callable[[int], Awaitable[_T]],
    output: _Output,
    verb: str,
) -> tuple[list[_T], list[int]]:
    """``ask`` of every partition, ``_IN_FLIGHT`` at a time: the replies, and the partitions
    whose holder did not answer."""
    gate = asyncio.Semaphore(_IN_FLIGHT)
    done = 0

    async def one(partition: int) -> _T | None:
        nonlocal done
        async with gate:
            try:
                return await ask(partition)
            except ActorError as exc:
                if exc.code < 500:
                    raise _Failure(f"partition {partition}: {exc.message}") from None
                return None
            finally:
                done += 1
                output.progress(f"{verb} {done}/{client.partitions} partitions")

    results = await asyncio.gather(*(one(p) for p in range(client.partitions)))
    output.progress_done()
    missing = [p for p, r in enumerate(results) if r is None]
    return [r for r in results if r is not None], missing


def _missing(output: _Output, missing: list[int], partitions: int) -> int:
    if not missing:
        return EXIT_OK
    shown = ", ".join(str(p) for p in missing[:20]) + (" ..." if len(missing) > 20 else "")
    output.note(
        f"ndo inspect: {len(missing)} of {partitions} partitions did not answer ({shown}): the "
        "result is incomplete; `ndo status` shows which worker holds them"
    )
    return EXIT_ERROR


# show


async def _show(
    client: InspectClient, options: InspectOptions, output: _Output, _: list[ExportedObject]
) -> int:
    assert options.class_name is not None and options.object_id is not None
    shown = await _ask_object(client.show(options.class_name, options.object_id))
    first = shown.first
    values = {key: _decoded(raw) for key, raw in shown.entries}
    if options.as_json:
        output.json(
            {
                "class": options.class_name,
                "id": options.object_id,
                "exists": shown.exists,
                "partition": first.partition,
                "worker": first.worker,
                "epoch": first.epoch,
                "active": first.active,
                "alarm": first.alarm,
                "size": first.size,
                "keys": values,
            }
        )
        return EXIT_OK
    name = f"{options.class_name}/{options.object_id}"
    summary = [
        ("object", name if shown.exists else f"{name} (stores nothing)"),
        ("partition", f"{first.partition} (held by {first.worker}, epoch {first.epoch})"),
        ("in memory", "yes" if first.active else "no"),
        ("alarm", "-" if first.alarm is None else format_time(first.alarm)),
        ("stored", f"{count(len(shown.entries), 'key')}, {count(first.size, 'byte')}"),
    ]
    for label, value in summary:
        output.line(f"{label + ':':<11}{value}")
    if shown.entries:
        output.line()
        width = None if options.wide else _VALUE_WIDTH
        rows = [
            (key, shorten(_json_text(values[key]), width), f"{len(raw):,}")
            for key, raw in shown.entries
        ]
        for line in table(("KEY", "VALUE", "BYTES"), rows):
            output.line(line)
    return EXIT_OK


def _decoded(raw: bytes) -> Any:
    """A stored value as JSON can show it (bytes as base64 text, odd maps as text)."""
    value = msgspec.msgpack.decode(raw)
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, ValueError, msgspec.EncodeError):
        return repr(value)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _ask_object(request: Awaitable[_T]) -> _T:
    try:
        return await request
    except ActorError as exc:
        raise _Failure(f"error {exc.code} {exc.type}: {exc.message}") from None


# export


async def _export(
    client: InspectClient, options: InspectOptions, output: _Output, _: list[ExportedObject]
) -> int:
    if options.object_id is not None:
        assert options.class_name is not None
        shown = await _ask_object(client.show(options.class_name, options.object_id))
        if not shown.exists:
            raise _Failure(f"{options.class_name}/{options.object_id} stores nothing")
        output.line(
            msgspec.json.encode(
                export_record(options.class_name, options.object_id, shown)
            ).decode()
        )
        output.note("exported 1 object")
        return EXIT_OK
    exported = keys = 0
    missing: list[int] = []
    gate = asyncio.Semaphore(_IN_FLIGHT)

    async def record(listed: ListedObject) -> ExportedObject:
        async with gate:
            shown = await _ask_object(client.show(listed.class_name, listed.id))
        return export_record(listed.class_name, listed.id, shown)

    for partition in range(client.partitions):
        after: tuple[str, str] | None = None
        while True:
            request = ObjectsRequest(
                class_name=options.class_name,
                prefix=options.id_prefix,
                after=after,
                limit=_EXPORT_PAGE,
            )
            try:
                page = await client.objects(partition, request)
            except ActorError as exc:
                if exc.code < 500:
                    raise _Failure(f"partition {partition}: {exc.message}") from None
                missing.append(partition)
                break
            records = await asyncio.gather(*(record(o) for o in page.objects))
            for line in records:
                if line.state or line.binary or line.alarm is not None:  # deleted meanwhile
                    output.line(msgspec.json.encode(line).decode())
                    exported += 1
                    keys += len(line.state) + len(line.binary)
            output.progress(
                f"exported {count(exported, 'object')} "
                f"(partition {partition + 1}/{client.partitions})"
            )
            if len(page.objects) < _EXPORT_PAGE:
                break
            last = page.objects[-1]
            after = (last.class_name, last.id)
    output.progress_done()
    output.note(
        f"exported {count(exported, 'object')} ({count(keys, 'key')}) from "
        f"{client.partitions - len(missing)} partitions"
    )
    return _missing(output, missing, client.partitions)


# import


def _read_import(path: str) -> list[ExportedObject]:
    """Every line of an export file, checked; the first problems stop the import before
    anything is written."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise _Failure(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise _Failure(f"{path} is not UTF-8 text") from None
    records: list[ExportedObject] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    decoder = msgspec.json.Decoder(ExportedObject)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = decoder.decode(line)
            validate_name(record.class_name, "class name")
            if not is_valid_id(record.id):
                raise ValueError(f"invalid object id {record.id!r}")
            if record.alarm is not None and not 0 <= record.alarm < float("inf"):
                raise ValueError(f"alarm must be epoch seconds >= 0, got {record.alarm!r}")
            record.entries()
        except (msgspec.DecodeError, ValueError) as exc:
            problems.append(f"line {number}: {exc}")
            continue
        address = (record.class_name, record.id)
        if address in seen:
            problems.append(
                f"line {number}: {address[0]}/{address[1]} is also on line {seen[address]}"
            )
            continue
        seen[address] = number
        records.append(record)
    if problems:
        listed = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise _Failure(
            f"{path}: {count(len(problems), 'bad line')}; nothing was imported:\n  {listed}{more}",
            EXIT_USAGE,
        )
    return records


async def _import(
    client: InspectClient, options: InspectOptions, output: _Output, records: list[ExportedObject]
) -> int:
    gate = asyncio.Semaphore(_IN_FLIGHT)
    if not options.replace:

        async def holds_state(record: ExportedObject) -> bool:
            async with gate:
                shown = await _ask_object(client.show(record.class_name, record.id))
            return shown.exists

        existing = [
            r
            for r, held in zip(
                records, await asyncio.gather(*map(holds_state, records)), strict=True
            )
            if held
        ]
        if existing:
            names = ", ".join(f"{r.class_name}/{r.id}" for r in existing[:10])
            more = " ..." if len(existing) > 10 else ""
            raise _Failure(
                f"{count(len(existing), 'object')} already hold state ({names}{more}); nothing "
                "was imported. Pass --replace to overwrite them"
            )
    done = 0
    results: dict[str, int] = {"imported": 0, "replaced": 0}
    failures: list[dict[str, str]] = []

    async def one(record: ExportedObject) -> None:
        nonlocal done
        request = ImportRequest(
            class_name=record.class_name,
            id=record.id,
            entries=list(record.entries().items()),
            alarm=record.alarm,
            replace=options.replace,
        )
        async with gate:
            try:
                reply = await client.write(request)
            except (ActorError, ValueError) as exc:
                message = exc.message if isinstance(exc, ActorError) else str(exc)
                failures.append({"class": record.class_name, "id": record.id, "error": message})
            else:
                results["replaced" if reply.existed else "imported"] += 1
            done += 1
            output.progress(f"imported {done:,}/{len(records):,} objects")

    await asyncio.gather(*map(one, records))
    output.progress_done()
    if options.as_json:
        output.json({**results, "failed": failures})
    else:
        output.line(
            f"imported {count(results['imported'], 'new object')}, replaced "
            f"{results['replaced']:,}, failed {len(failures):,}"
        )
        if failures:
            output.line()
            for line in table(
                ("CLASS", "ID", "ERROR"), [(f["class"], f["id"], f["error"]) for f in failures]
            ):
                output.line(line)
    return EXIT_ERROR if failures else EXIT_OK


# delete


async def _delete(
    client: InspectClient, options: InspectOptions, output: _Output, _: list[ExportedObject]
) -> int:
    assert options.class_name is not None and options.object_id is not None
    reply = await _ask_object(
        client.write(DeleteRequest(class_name=options.class_name, id=options.object_id))
    )
    name = f"{options.class_name}/{options.object_id}"
    if options.as_json:
        output.json(
            {"class": options.class_name, "id": options.object_id, **msgspec.to_builtins(reply)}
        )
    elif reply.existed:
        output.line(
            f"deleted {name}: its keys and alarm are gone (partition {reply.partition}, "
            f"by its holder {reply.worker})"
        )
    else:
        output.line(f"{name} stored nothing; nothing to delete")
    return EXIT_OK


_Command = Callable[[InspectClient, InspectOptions, _Output, list[ExportedObject]], Awaitable[int]]

_COMMANDS: Final[dict[str, _Command]] = {
    "objects": _objects,
    "show": _show,
    "export": _export,
    "import": _import,
    "delete": _delete,
}
