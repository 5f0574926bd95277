"""The ``ndo`` command line: ``serve`` runs a worker, ``call`` calls an object.

Every option can also come from an ``NDO_<OPTION>`` environment variable (``--nats-url`` ->
``NDO_NATS_URL``); a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import structlog
from prometheus_client import CollectorRegistry, start_http_server

from actors import ActorClient, ActorError, RetryPolicy
from ops._loader import DEFAULT_MODULES, load_actor_classes
from ops._logging import configure_logging
from ops._nats_server import EmbeddedNatsServer, NatsServerError
from service import Worker, WorkerConfig
from storage import StorageError
from subjects import DEFAULT_PARTITIONS, DEFAULT_PREFIX, InvalidSubjectError, rpc_subject

__all__ = ["build_parser", "main"]

_log = structlog.get_logger("ndo")


def _env(name: str, default: Any) -> Any:
    """Default for an option: ``NDO_<NAME>`` if set, else ``default``."""
    return os.environ.get(f"NDO_{name.upper()}", default)


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        default=_env("nats_url", None),
        help="NATS server URL [env NDO_NATS_URL]"
        + ("" if parser.prog.endswith("serve") else "; default nats://127.0.0.1:4222"),
    )
    parser.add_argument(
        "--prefix",
        default=_env("prefix", DEFAULT_PREFIX),
        help=f"subject prefix [env NDO_PREFIX; default {DEFAULT_PREFIX}]",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``ndo`` command."""
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
    _add_connection_options(serve)
    serve.add_argument(
        "--port",
        type=int,
        default=int(_env("port", 4222)),
        help="embedded server's client port [env NDO_PORT; default 4222; 0=any]",
    )
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("data_dir", "ndo-data")),
        help="directory for SQLite and JetStream data [env NDO_DATA_DIR; default ./ndo-data]",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=_int_or_none(_env("metrics_port", None)),
        help="serve Prometheus metrics on this port [env NDO_METRICS_PORT]",
    )
    serve.add_argument(
        "--metrics-host",
        default=_env("metrics_host", "127.0.0.1"),
        help="address of the metrics endpoint [env NDO_METRICS_HOST; default 127.0.0.1]",
    )
    serve.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        default=_env("log_format", "auto"),
        help="log output [env NDO_LOG_FORMAT; default: console on a terminal, else json]",
    )
    serve.add_argument(
        "--log-level",
        default=_env("log_level", "info"),
        help="minimum log level [env NDO_LOG_LEVEL; default info]",
    )
    defaults = WorkerConfig()
    serve.add_argument(
        "--partitions",
        type=int,
        default=int(_env("partitions", DEFAULT_PARTITIONS)),
        help=f"partition count, fixed per deployment [env NDO_PARTITIONS; "
        f"default {DEFAULT_PARTITIONS}]",
    )
    for flag, kind, help_text in (
        ("max-active", int, "objects kept in memory before LRU eviction"),
        ("idle-timeout", float, "seconds before an idle object is evicted"),
        ("handler-timeout", float, "seconds a handler may run before it fails with 504"),
        ("max-payload", int, "largest request body in bytes"),
        ("max-mailbox", int, "messages that may queue for one object before 503"),
        ("drain-timeout", float, "seconds shutdown waits for queued messages"),
        ("idempotency-window", float, "seconds a committed Idempotency-Key is remembered"),
        ("max-value-bytes", int, "largest stored value in bytes"),
        ("max-key-bytes", int, "longest storage key in bytes"),
    ):
        dest = flag.replace("-", "_")
        default = getattr(defaults, dest)
        serve.add_argument(
            f"--{flag}",
            type=kind,
            default=kind(_env(dest, default)),
            help=f"{help_text} [env NDO_{dest.upper()}; default {default}]",
        )

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
    _add_connection_options(call)
    call.add_argument(
        "--timeout",
        type=float,
        default=float(_env("timeout", 5.0)),
        help="seconds to wait for each try [env NDO_TIMEOUT; default 5]",
    )
    return parser


def _int_or_none(value: str | None) -> int | None:
    return None if value is None or value == "" else int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ndo`` command; return the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "call":
        return asyncio.run(_call(args))
    raise AssertionError(args.command)


# serve


def _serve(args: argparse.Namespace) -> int:
    try:
        configure_logging(args.log_format, args.log_level)
        classes = load_actor_classes(args.modules or list(DEFAULT_MODULES))
        config = WorkerConfig(
            nats_url=args.nats_url or "nats://127.0.0.1:4222",
            prefix=args.prefix,
            data_dir=args.data_dir,
            partitions=args.partitions,
            max_active=args.max_active,
            idle_timeout=args.idle_timeout,
            handler_timeout=args.handler_timeout,
            max_payload=args.max_payload,
            max_mailbox=args.max_mailbox,
            drain_timeout=args.drain_timeout,
            idempotency_window=args.idempotency_window,
            max_value_bytes=args.max_value_bytes,
            max_key_bytes=args.max_key_bytes,
        )
    except ValueError as exc:
        print(f"ndo serve: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_service(config, classes, args))
    except (NatsServerError, StorageError, OSError, nats.errors.Error) as exc:
        print(f"ndo serve: {exc}", file=sys.stderr)
        return 1


async def _run_service(config: WorkerConfig, classes: list[Any], args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    metrics_server = None
    if args.metrics_port is not None:
        metrics_server, _ = start_http_server(
            args.metrics_port, addr=args.metrics_host, registry=registry
        )
        _log.info("metrics endpoint", url=f"http://{args.metrics_host}:{args.metrics_port}/metrics")
    embedded: EmbeddedNatsServer | None = None
    try:
        if args.nats_url is None:
            embedded = EmbeddedNatsServer(store_dir=config.data_dir / "nats", port=args.port)
            await embedded.start()
            config = msgspec.structs.replace(config, nats_url=embedded.url)
            _log.info("embedded nats-server started", url=embedded.url, pid=embedded.pid)
        async with Worker(config, classes, registry=registry):
            _log.info(
                "serving; press Ctrl-C to stop",
                nats_url=config.nats_url,
                classes=sorted(c.__name__ for c in classes),
            )
            await stop.wait()
            _log.info("shutting down")
    finally:
        if embedded is not None:
            await embedded.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
    return 0


# call


async def _call(args: argparse.Namespace) -> int:
    url = args.nats_url or "nats://127.0.0.1:4222"
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
        nc = await nats.connect(
            url, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False
        )
    except (OSError, nats.errors.Error) as exc:
        print(f"ndo call: cannot connect to {url}: {exc}; is `ndo serve` running?", file=sys.stderr)
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


if __name__ == "__main__":
    raise SystemExit(main())
