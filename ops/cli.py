"""The ``ndo`` command line: ``serve`` runs a worker, ``call`` calls an object, ``replay`` and
``tail`` read objects' journals, ``inspect`` lists, shows, exports, imports and deletes stored
objects, ``status`` and ``mapping`` describe a deployment,
``permissions`` prints the NATS permissions each role needs, ``bench`` measures it.

Every option can also come from an ``NDO_<OPTION>`` environment variable (``--nats-url`` ->
``NDO_NATS_URL``); a flag on the command line wins over the environment. ``ndo serve``'s worker
settings are generated from ``WorkerConfig``'s declaration (``ops/_options.py``); its other
options are the ``CliOption`` records below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry, start_http_server

from ndo.actors import ActorClient, ActorError, RetryPolicy
from ndo.ops._browser_access import browser_access
from ndo.ops._config_file import ConfigFileError, load_config_file
from ndo.ops._connect import DEFAULT_NATS_URL, CannotConnectError, connect_once
from ndo.ops._demo import DEFAULT_DEMO_PORT, DemoServer
from ndo.ops._errors import OpsError
from ndo.ops._inspect import add_inspect_parser, inspect_options, run_inspect
from ndo.ops._loader import DEFAULT_MODULES, load_actor_classes
from ndo.ops._logging import configure_logging, quiet_tls_eof_warning
from ndo.ops._loop import LOOP_CHOICES, resolve_loop
from ndo.ops._loop import run as run_on_loop
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._options import (
    AUTH_OPTIONS,
    CliOption,
    add_options,
    argument_type,
    auth_from_args,
    build_worker_config,
    check_file_keys,
    worker_options,
)
from ndo.ops._permissions import (
    ROLES,
    admin_permissions,
    caller_permissions,
    render_user,
    tools_permissions,
    worker_permissions,
)
from ndo.ops._replay import EXIT_ERROR, EXIT_USAGE, ReplayOptions, parse_point, run_replay
from ndo.ops._status import (
    StatusError,
    discover_workers,
    fetch_status,
    format_discovered,
    format_status,
)
from ndo.ops._tail import TailOptions, run_tail
from ndo.ops.bench import add_bench_parser, run_bench
from ndo.service import (
    ServiceError,
    Worker,
    WorkerConfig,
    mapping_snippet,
    redact_url,
    server_mapping,
)
from ndo.storage import StorageError
from ndo.subjects import (
    DEFAULT_PARTITIONS,
    DEFAULT_PREFIX,
    DEFAULT_REPLY_PREFIXES,
    InvalidSubjectError,
    parse_reply_prefixes,
    rpc_subject,
)

__all__ = ["build_parser", "main", "serve_options"]

_log = structlog.get_logger("ndo")

_SERVE_OPTIONS: Final = (
    CliOption(dest="port", type=int, default=4222, help="embedded server's client port; 0: any"),
    CliOption(
        dest="websocket_port",
        type=int,
        help="embedded server also accepts WebSocket clients (browsers: see --demo) on this "
        "port, without TLS",
    ),
    CliOption(
        dest="websocket_allowed_origin",
        help="with --websocket-port: further web page origins that may connect, comma-separated "
        "(e.g. http://127.0.0.1:8000); default: only pages of the listener's own origin",
    ),
    CliOption(
        dest="websocket_user",
        help="with --websocket-port: browsers must log in as this user (with "
        "--websocket-password) to call objects; default: any page of an allowed origin may",
    ),
    CliOption(dest="websocket_password", help="password of --websocket-user"),
    CliOption(
        dest="demo",
        default=False,
        help="with --websocket-port: also serve the browser demo (a drawing board and a chat "
        "room, docs/demo.md) on http://127.0.0.1:<demo-port>/; needs `npm install` in the "
        "repository (the nats.ws client)",
    ),
    CliOption(
        dest="demo_port",
        type=int,
        default_text=str(DEFAULT_DEMO_PORT),
        help="port of --demo's page on 127.0.0.1; 0: any",
    ),
    CliOption(dest="metrics_port", type=int, help="serve Prometheus metrics on this port"),
    CliOption(dest="metrics_host", default="127.0.0.1", help="address of the metrics endpoint"),
    CliOption(
        dest="log_format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log output; auto: console on a terminal, else json",
    ),
    CliOption(dest="log_level", default="info", help="minimum log level"),
    CliOption(
        dest="loop",
        choices=LOOP_CHOICES,
        default="auto",
        help="event loop: uvloop is faster (pip install 'ndo[fast]'); auto: uvloop when installed",
    ),
)
"""``ndo serve``'s options that are not worker settings (those come from ``WorkerConfig``)."""


def _env(name: str, default: Any) -> Any:
    """Default for an option: ``NDO_<NAME>`` if set, else ``default``.

    The environment's value stays a string: argparse runs an option's ``type`` on string
    defaults, so ``NDO_PORT=four`` is a usage error (exit 2) like ``--port four``.
    """
    return os.environ.get(f"NDO_{name.upper()}", default)


_PREFIX_OPTION: Final = CliOption(dest="prefix", default=DEFAULT_PREFIX, help="subject prefix")
"""``--prefix``, on every command that names subjects."""

_CONNECTION_OPTIONS: Final = (
    CliOption(
        dest="nats_url",
        help="NATS server URL; several servers of one cluster separated by commas",
        default_text=DEFAULT_NATS_URL,
    ),
    _PREFIX_OPTION,
    *AUTH_OPTIONS,
)
"""How ``call``, ``status``, ``replay`` and ``tail`` reach a deployment."""


def _add_connection_options(
    parser: argparse.ArgumentParser, file_values: Mapping[str, Any]
) -> None:
    """Add ``--config``, ``--nats-url``, ``--prefix`` and the credentials options; of a config
    file's keys (``file_values``) only these options' are used."""
    _add_config_option(parser, "the connection settings (nats-url, prefix, nats-creds, ...)")
    dests = {option.dest for option in _CONNECTION_OPTIONS}
    add_options(
        parser,
        _CONNECTION_OPTIONS,
        {key: value for key, value in file_values.items() if key in dests},
    )


def _add_config_option(parser: argparse.ArgumentParser, used: str) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=_env("config", None),
        metavar="FILE",
        help=f"TOML file of options by flag name (ndo serve's file); {used} are taken from "
        "it; flags and NDO_* variables win over it [env NDO_CONFIG]",
    )


def build_parser(file_values: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """Build the argument parser of the ``ndo`` command.

    ``file_values`` (from ``--config``) replace the built-in defaults of options that have no
    ``NDO_*`` variable set: all of ``ndo serve``'s, the connection options of the other
    commands; command-line flags still win.

    Raises:
        ConfigFileError: ``file_values`` names an option ``ndo serve`` does not have.
    """
    parser = argparse.ArgumentParser(
        prog="ndo", description="NATS Durable Objects: stateful actors over NATS and SQLite."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a worker (starts an embedded nats-server unless --nats-url is given)",
        description="Serve actor classes. Without --nats-url, an embedded nats-server "
        "(JetStream on, 127.0.0.1) is started and stopped with the worker.",
    )
    serve.add_argument(
        "modules",
        nargs="*",
        metavar="MODULE",
        help="module (or module:Class) with Actor subclasses; default: the bundled examples",
    )
    _add_config_option(serve, 'all options (data-dir = "/srv/ndo") and modules = [...]')
    options = serve_options()
    file_values = dict(file_values or {})
    check_file_keys(file_values, options, extra={"modules", "migrations"})
    if "modules" in file_values:
        serve.set_defaults(modules=file_values.pop("modules"))
    serve.set_defaults(migrations=file_values.pop("migrations", ()))  # the file's [[migrations]]
    add_options(serve, options, file_values)

    replay = commands.add_parser(
        "replay",
        help="print an object's journal step by step, or re-run it on today's code",
        description="Read CLASS/ID's journal and print each step: position, time, method, "
        "arguments, reply or error, and the state after it (rebuilt from the recorded "
        "write-sets; no user code runs). With --execute, re-run the steps against today's "
        "code on scratch in-memory storage and report where replies or writes diverge. "
        "Exit codes: 0 ok / no divergence, 1 error, 2 bad usage, 3 divergence.",
    )
    replay.add_argument("class_name", metavar="CLASS")
    replay.add_argument("object_id", metavar="ID")
    _add_connection_options(replay, file_values)
    replay.add_argument(
        "--at",
        type=argument_type(parse_point),
        metavar="STEP|TIME",
        help="stop at this step: a step (1234, 1234.2), a time (2024-05-01T14:02:00Z, 14:02) "
        "or an age (10m)",
    )
    replay.add_argument(
        "--since",
        type=argument_type(parse_point),
        metavar="TIME|STEP",
        help="start showing (and executing) at this time or step (1234, 1234.2)",
    )
    replay.add_argument(
        "--execute",
        action="store_true",
        help="re-run the recorded inputs against today's code and compare",
    )
    replay.add_argument(
        "--app",
        action="append",
        metavar="MODULE",
        help="module (or module:Class) with today's classes, for --execute (repeatable); "
        "default: the bundled examples",
    )
    replay.add_argument(
        "--per-step",
        action="store_true",
        help="with --execute: start every step from its recorded state instead of from the "
        "state the re-run produced",
    )
    replay.add_argument("--json", action="store_true", help="one JSON object per step")
    replay.add_argument("--wide", action="store_true", help="do not shorten table cells")

    tail = commands.add_parser(
        "tail",
        help="follow objects' journal records live",
        description="Print journal records of CLASS/ID as they are recorded; CLASS and ID may "
        "be '*' (quote it in the shell).",
    )
    tail.add_argument("class_name", metavar="CLASS")
    tail.add_argument("object_id", metavar="ID", nargs="?", default="*")
    _add_connection_options(tail, file_values)
    tail.add_argument(
        "--since",
        type=argument_type(parse_point),
        metavar="TIME|STEP",
        help="start with older records: from this time, age (10m) or step",
    )
    tail.add_argument("--count", type=int, help="exit after this many records")
    tail.add_argument("--json", action="store_true", help="one JSON object per record")
    tail.add_argument("--wide", action="store_true", help="do not shorten fields")

    status = commands.add_parser(
        "status",
        help="show the workers, which partitions each holds, and lease epochs",
        description="Read the deployment's lease bucket: live workers, the partitions each "
        "holds, and every partition's holder and fencing epoch.",
    )
    _add_connection_options(status, file_values)
    status.add_argument(
        "--brief", action="store_true", help="workers only, without the per-partition table"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    mapping = commands.add_parser(
        "mapping",
        help="print the nats-server subject mapping that routes requests to partition owners",
        description="Print the mappings block to add to an existing nats-server (or cluster) "
        "config so each request goes straight to its partition's worker (no forwarding hop). "
        "Reload the server with `nats-server --signal reload`. Workers detect the mapping when "
        "they start.",
    )
    add_options(mapping, (_PREFIX_OPTION,))
    mapping.add_argument(
        "--partitions",
        type=int,
        default=_env("partitions", DEFAULT_PARTITIONS),
        help=f"the deployment's partition count [env NDO_PARTITIONS; default {DEFAULT_PARTITIONS}]",
    )
    mapping.add_argument(
        "--account", help="wrap the mapping in an account block (accounts { NAME: { ... } })"
    )

    permissions = commands.add_parser(
        "permissions",
        help="print the least NATS permissions a worker, a caller or the tools need",
        description="Print a nats-server `users` entry with the least permissions ROLE needs "
        "(docs/security.md explains each subject). worker: `ndo serve`; caller: a client "
        "calling some classes and methods; tools: `ndo status`, `replay`, `tail` and `inspect`'s "
        "reads; admin: the tools' rights and `ndo inspect import` and `delete`.",
    )
    permissions.add_argument(
        "role", choices=ROLES, metavar="ROLE", help="worker, caller, tools or admin"
    )
    add_options(permissions, (_PREFIX_OPTION,))
    permissions.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="CLASS",
        help="caller: a class it may call (repeatable; default: every class)",
    )
    permissions.add_argument(
        "--method",
        dest="methods",
        action="append",
        default=[],
        metavar="METHOD",
        help="caller: a method it may call (repeatable; default: every method)",
    )
    permissions.add_argument(
        "--events", action="store_true", help="caller: may also subscribe to the classes' events"
    )
    permissions.add_argument(
        "--inbox-prefix",
        default=DEFAULT_REPLY_PREFIXES[0].rstrip("."),
        help="caller: its own inbox prefix (nats-py inbox_prefix=, nats.js inboxPrefix), so "
        "that it cannot read other users' replies; add it to the workers' --reply-prefixes "
        "(default: _INBOX)",
    )
    permissions.add_argument("--user", help="user name in the entry (default: the role)")

    call = commands.add_parser(
        "call",
        help="call an object method and print the reply",
        description="Call CLASS/ID.METHOD with a JSON object of keyword arguments.",
    )
    call.add_argument("class_name", metavar="CLASS")
    call.add_argument("object_id", metavar="ID")
    call.add_argument("method", metavar="METHOD")
    call.add_argument(
        "arguments",
        nargs="?",
        default="",
        metavar="JSON",
        help="keyword arguments as a JSON object, e.g. '{\"by\": 2}'",
    )
    _add_connection_options(call, file_values)
    call.add_argument(
        "--timeout",
        type=float,
        default=_env("timeout", 5.0),
        help="seconds to wait for each try [env NDO_TIMEOUT; default 5]",
    )
    add_inspect_parser(commands, lambda parser: _add_connection_options(parser, file_values))
    add_bench_parser(commands)
    return parser


def serve_options() -> tuple[CliOption, ...]:
    """Every option of ``ndo serve`` but ``--config``: its own, then the worker's settings.

    ``--nats-url`` has no default here: without it, ``ndo serve`` starts an embedded server.
    """
    return (*_SERVE_OPTIONS, *worker_options(unset={"nats_url"}), *AUTH_OPTIONS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ndo`` command; return the process exit code."""
    quiet_tls_eof_warning()
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is not None:
        try:
            values = load_config_file(args.config)
            args = build_parser(values).parse_args(argv)
        except ConfigFileError as exc:
            print(f"ndo {args.command}: config file {args.config}: {exc}", file=sys.stderr)
            return 2
    if args.command == "serve":
        return _serve(args)
    if args.command == "call":
        return asyncio.run(_call(args))
    if args.command == "replay":
        return _replay(args)
    if args.command == "tail":
        return _tail(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "status":
        return asyncio.run(_status(args))
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "permissions":
        return _permissions(args)
    if args.command == "mapping":
        print(mapping_snippet(args.prefix, args.partitions, args.account))
        return 0
    raise AssertionError(args.command)


# serve


def _serve(args: argparse.Namespace) -> int:
    try:
        websocket_options = (
            args.websocket_port,
            args.websocket_allowed_origin,
            args.websocket_user,
            args.websocket_password,
        )
        if args.nats_url is not None and any(value is not None for value in websocket_options):
            raise ValueError(
                "the --websocket-* options configure the embedded nats-server; with --nats-url, "
                "configure websocket { ... } in your server (docs/security.md shows how)"
            )
        if args.websocket_port is None and any(v is not None for v in websocket_options[1:]):
            raise ValueError("--websocket-allowed-origin/-user/-password need --websocket-port")
        if (args.websocket_user is None) != (args.websocket_password is None):
            raise ValueError("--websocket-user and --websocket-password go together")
        if args.demo and args.nats_url is not None:
            raise ValueError(
                "--demo serves a page for the embedded nats-server's WebSocket listener: "
                "leave out --nats-url"
            )
        if args.demo and args.websocket_port is None:
            raise ValueError(
                "--demo needs --websocket-port (the page talks to the embedded nats-server "
                "over WebSocket), e.g. ndo serve --websocket-port 9222 --demo"
            )
        if args.demo_port is not None and not args.demo:
            raise ValueError("--demo-port needs --demo")
        if args.demo_port is not None and not 0 <= args.demo_port <= 65535:
            raise ValueError(f"--demo-port must be 0 (any) or 1-65535, got {args.demo_port}")
        configure_logging(args.log_format, args.log_level)
        classes = load_actor_classes(args.modules or list(DEFAULT_MODULES))
        config = build_worker_config(args)
        loop = resolve_loop(args.loop)
    except ValueError as exc:
        print(f"ndo serve: {exc}", file=sys.stderr)
        return 2
    try:
        return run_on_loop(_run_service(config, classes, args, loop), loop)
    except (OpsError, ServiceError, StorageError, OSError, nats.errors.Error) as exc:
        print(f"ndo serve: {exc}", file=sys.stderr)
        return 1


async def _run_service(
    config: WorkerConfig, classes: list[Any], args: argparse.Namespace, loop_name: str
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    metrics_server = None
    if args.metrics_port is not None:
        try:
            metrics_server, _ = start_http_server(
                args.metrics_port, addr=args.metrics_host, registry=registry
            )
        except OSError as exc:
            raise OpsError(
                f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: "
                f"{exc.strerror}; pick another --metrics-port (or leave it out)"
            ) from None
        _log.info("metrics endpoint", url=f"http://{args.metrics_host}:{args.metrics_port}/metrics")
    embedded: EmbeddedNatsServer | None = None
    demo: DemoServer | None = None
    try:
        if args.demo:
            # First: its port (0: any) is one of the WebSocket listener's allowed origins.
            demo = DemoServer(
                websocket_url=f"ws://127.0.0.1:{args.websocket_port}",
                prefix=config.prefix,
                login=args.websocket_user is not None,
                port=DEFAULT_DEMO_PORT if args.demo_port is None else args.demo_port,
            )
            await demo.start()
        if args.nats_url is None:
            # Started with the partition mapping: requests go straight to their partition's worker.
            embedded = _embedded_server(config, args, () if demo is None else demo.origins)
            await embedded.start()
            config = msgspec.structs.replace(config, nats_url=embedded.url)
            _log.info(
                "embedded nats-server started",
                url=embedded.url,
                pid=embedded.pid,
                websocket=None
                if args.websocket_port is None
                else f"ws://127.0.0.1:{args.websocket_port}",
            )
        async with Worker(config, classes, registry=registry, migrations=args.migrations) as worker:
            _log.info(
                "serving; press Ctrl-C to stop",
                partitions=f"{len(worker.partitions)} of {config.partitions}",
                nats_url=redact_url(config.nats_url),
                classes=sorted(c.__name__ for c in classes),
                loop=loop_name,
            )
            if demo is not None:
                _log.info(f"demo: open {demo.url} in two windows", url=demo.url)
            await stop.wait()
            _log.info("shutting down")
    finally:
        if demo is not None:
            await demo.stop()
        if embedded is not None:
            await embedded.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


# permissions


def _permissions(args: argparse.Namespace) -> int:
    try:
        if args.role == "worker":
            granted = worker_permissions(args.prefix)
        elif args.role == "caller":
            granted = caller_permissions(
                args.prefix,
                args.classes,
                args.methods,
                events=args.events,
                inbox_prefix=parse_reply_prefixes(args.inbox_prefix)[0],
            )
        elif args.role == "admin":
            granted = admin_permissions(args.prefix)
        else:
            granted = tools_permissions(args.prefix)
    except (InvalidSubjectError, ValueError) as exc:
        print(f"ndo permissions: {exc}", file=sys.stderr)
        return 2
    print(f"# ndo permissions {args.role}: one entry of authorization {{ users = [ ... ] }}")
    print(render_user(granted, user=args.user or args.role))
    return 0


def _embedded_server(
    config: WorkerConfig, args: argparse.Namespace, demo_origins: tuple[str, ...] = ()
) -> EmbeddedNatsServer:
    """``ndo serve``'s own nats-server: the partition mapping, and the WebSocket listener held to
    its origins (those of the options, and the demo page's ``demo_origins``) and to caller
    rights (``ops/_browser_access.py``)."""
    access = None
    origins: tuple[str, ...] = ()
    if args.websocket_port is not None:
        access = browser_access(
            config.prefix, user=args.websocket_user or "", password=args.websocket_password or ""
        )
        origins = (
            tuple(
                origin.strip()
                for origin in (args.websocket_allowed_origin or "").split(",")
                if origin.strip()
            )
            + demo_origins
        )
    return EmbeddedNatsServer(
        store_dir=config.data_dir / "nats",
        port=args.port,
        mappings=dict([server_mapping(config.prefix, config.partitions)]),
        websocket_port=args.websocket_port,
        websocket_origins=origins,
        websocket_no_auth_user="" if access is None else access.websocket_no_auth_user,
        extra_config="" if access is None else access.config,
    )


# status


async def _status(args: argparse.Namespace) -> int:
    url = args.nats_url or DEFAULT_NATS_URL
    try:
        nc = await connect_once(url, auth_from_args(args), name="ndo status")
    except (CannotConnectError, ValueError) as exc:
        print(f"ndo status: {exc}", file=sys.stderr)
        return 1
    try:
        status = await fetch_status(nc, args.prefix, migrations=True)
    except StatusError as exc:
        # No lease bucket (no JetStream, or only standalone workers): list who answers the
        # NATS service API instead, which every worker does.
        return await _print_standalone(nc, args, str(exc))
    except nats.errors.Error as exc:
        print(f"ndo status: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if args.json:
        _print_json(status)
    else:
        print(format_status(status, partitions=not args.brief))
    return 0


async def _print_standalone(nc: NatsClient, args: argparse.Namespace, reason: str) -> int:
    """``ndo status`` without a lease bucket: the workers found through discovery."""
    try:
        workers = await discover_workers(nc, args.prefix)
    except nats.errors.Error as exc:
        print(f"ndo status: {reason}; discovery failed: {exc}", file=sys.stderr)
        return 1
    if not workers:
        print(f"ndo status: {reason}; no worker answered $SRV.INFO.ndo", file=sys.stderr)
        return 1
    if args.json:
        _print_json({"standalone": True, "reason": reason, "workers": workers})
    else:
        print(format_discovered(workers, reason))
    return 0


def _print_json(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value).decode(), indent=2))


# call


async def _call(args: argparse.Namespace) -> int:
    url = args.nats_url or DEFAULT_NATS_URL
    try:
        subject = rpc_subject(args.prefix, args.class_name, args.object_id, args.method)
    except InvalidSubjectError as exc:
        print(f"ndo call: {exc}", file=sys.stderr)
        return 2
    body = args.arguments.encode()
    if body:
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError as exc:
            print(f"ndo call: arguments are not valid JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(parsed, dict):
            print("ndo call: arguments must be a JSON object, e.g. '{\"by\": 2}'", file=sys.stderr)
            return 2
    try:
        nc = await connect_once(
            url,
            auth_from_args(args),
            hint="is `ndo serve` running? (or pass --nats-url)",
            name="ndo call",
        )
    except (CannotConnectError, ValueError) as exc:
        print(f"ndo call: {exc}", file=sys.stderr)
        return 1
    try:
        client = ActorClient(
            nc, prefix=args.prefix, timeout=args.timeout, retry=RetryPolicy(attempts=3)
        )
        reply = await client.request(subject, body)
    except ActorError as exc:
        print(f"ndo call: error {exc.code} {exc.type}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    try:
        print(json.dumps(json.loads(reply), indent=2, ensure_ascii=False))
    except json.JSONDecodeError:
        print(reply.decode(errors="replace"))
    return 0


# inspect


def _inspect(args: argparse.Namespace) -> int:
    try:
        auth = auth_from_args(args)
    except ValueError as exc:
        print(f"ndo inspect: {exc}", file=sys.stderr)
        return 2
    options = inspect_options(args, args.nats_url or DEFAULT_NATS_URL, auth)
    try:
        return asyncio.run(run_inspect(options))
    except KeyboardInterrupt:
        return 130


# replay and tail


def _replay(args: argparse.Namespace) -> int:
    try:
        auth = auth_from_args(args)
    except ValueError as exc:
        print(f"ndo replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    classes: list[Any] = []
    if args.execute:
        try:
            classes = load_actor_classes(args.app or list(DEFAULT_MODULES))
        except ValueError as exc:
            print(f"ndo replay: {exc}", file=sys.stderr)
            return EXIT_ERROR
    options = ReplayOptions(
        class_name=args.class_name,
        object_id=args.object_id,
        nats_url=args.nats_url or DEFAULT_NATS_URL,
        auth=auth,
        prefix=args.prefix,
        at=args.at,
        since=args.since,
        execute=args.execute,
        per_step=args.per_step,
        as_json=args.json,
        wide=args.wide,
    )
    return asyncio.run(run_replay(options, classes=classes))


def _tail(args: argparse.Namespace) -> int:
    try:
        auth = auth_from_args(args)
    except ValueError as exc:
        print(f"ndo tail: {exc}", file=sys.stderr)
        return 2
    options = TailOptions(
        class_name=args.class_name,
        object_id=args.object_id,
        nats_url=args.nats_url or DEFAULT_NATS_URL,
        auth=auth,
        prefix=args.prefix,
        since=args.since,
        count=args.count,
        as_json=args.json,
        wide=args.wide,
    )
    try:
        return asyncio.run(run_tail(options))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
