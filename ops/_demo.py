"""``ndo serve --demo``: the browser demo's web server (``examples/demo/``, docs/demo.md).

A page from a ``file://`` URL cannot open WebSockets to an origin-checked listener, and a CDN
would make the demo need the internet, so ``ndo serve`` serves the page itself: a tiny HTTP/1.1
server on 127.0.0.1 that answers ``GET`` for a fixed set of files read into memory at start (the
page, its script, the ``nats.ws`` client's single-file bundle from ``node_modules`` and a
``config.json`` saying where the WebSocket listener is), and 404 for anything else. No path from
a request ever reaches the file system, so there is no directory to traverse. One request per
connection; the serve task starts it before the embedded nats-server (whose allowed origins
include :attr:`DemoServer.origins`) and stops it with the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final, Self

import structlog

from ndo.ops._errors import OpsError

__all__ = ["DEFAULT_DEMO_PORT", "DemoServer", "find_nats_ws_bundle"]

DEFAULT_DEMO_PORT: Final = 8000
"""Port of the demo page when ``--demo-port`` is not given."""

_HOST: Final = "127.0.0.1"
"""The demo is for the developer's own browser: loopback only."""

_PACKAGE_DIR: Final = Path(__file__).resolve().parents[1]
"""The ``ndo`` package (the repository root in an editable install: ``resolve`` follows the
strict editable install's links back into the checkout)."""

_DEMO_DIR: Final = _PACKAGE_DIR / "examples" / "demo"
"""The page and its script."""

_BUNDLE: Final = Path("nats.ws") / "esm" / "nats.js"
"""The ``nats.ws`` npm package's ESM bundle (no imports of its own), under ``node_modules``."""

_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
}
"""Content types of the files served, by suffix."""

_MAX_REQUEST_HEAD: Final = 16 * 1024
"""Longest request line plus headers accepted, in bytes."""

_READ_TIMEOUT: Final = 10.0
"""Seconds a client has to send its request head."""

_log = structlog.get_logger("ndo.demo")


def find_nats_ws_bundle(search: Sequence[Path] | None = None) -> Path:
    """Return the ``nats.ws`` bundle from the first ``node_modules`` of ``search`` that has it
    (default: the working directory's, then the one next to the ``ndo`` package).

    Raises:
        OpsError: not installed anywhere; the message says to run ``npm install``.
    """
    folders = search if search is not None else (Path.cwd(), _PACKAGE_DIR)
    candidates = [folder / "node_modules" / _BUNDLE for folder in folders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise OpsError(
        "the demo needs the NATS JavaScript client (the nats.ws npm package), which is not "
        f"installed: run `npm install` in the ndo repository ({_PACKAGE_DIR}), or in this "
        f"directory `npm install nats.ws`; looked for {looked}"
    )


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str


class _State(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class DemoServer:
    """The demo's HTTP server: made with its files read, ``start`` listens, ``stop`` closes
    (or ``async with``)."""

    # Configuration
    _port: int
    _files: dict[str, _File]
    # State
    _state: _State
    _server: asyncio.Server | None
    _handlers: set[asyncio.Task[None]]
    _writers: set[asyncio.StreamWriter]

    def __init__(
        self,
        *,
        websocket_url: str,
        prefix: str,
        login: bool = False,
        port: int = DEFAULT_DEMO_PORT,
        bundle: Path | None = None,
    ) -> None:
        """Read the page, its script and the ``nats.ws`` bundle; nothing listens until ``start``.

        Args:
            websocket_url: where the page connects (the embedded server's WebSocket listener).
            prefix: the deployment's subject prefix.
            login: browsers must log in (``--websocket-user``): the page asks for credentials.
            port: the port to serve on; 0: any free port (read back from :attr:`port`).
            bundle: the ``nats.js`` file; default: :func:`find_nats_ws_bundle`.

        Raises:
            OpsError: the bundle or a page file is missing (the message says what to do).
        """
        bundle = bundle or find_nats_ws_bundle()
        config = {"websocket_url": websocket_url, "prefix": prefix, "login": login}
        self._files = {"/config.json": _File(json.dumps(config).encode(), _TYPES[".json"])}
        sources = {
            "/": _DEMO_DIR / "index.html",
            "/index.html": _DEMO_DIR / "index.html",
            "/demo.js": _DEMO_DIR / "demo.js",
            "/drawing_board.html": _DEMO_DIR.parent / "drawing_board.html",
            "/nats.js": bundle,
        }
        for url_path, source in sources.items():
            try:
                body = source.read_bytes()
            except OSError as exc:
                raise OpsError(
                    f"cannot read the demo's file {source}: {exc.strerror}; reinstall ndo "
                    "(the page ships in ndo/examples/demo/)"
                ) from None
            self._files[url_path] = _File(body, _TYPES[source.suffix])
        self._port = port
        self._state = _State.NEW
        self._server = None
        self._handlers = set()
        self._writers = set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port served on (the real one once started, if 0 was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://{_HOST}:{self._port}/"

    @property
    def origins(self) -> tuple[str, ...]:
        """The page's origins, for the WebSocket listener's allowed origins."""
        return (f"http://{_HOST}:{self._port}", f"http://localhost:{self._port}")

    async def start(self) -> None:
        """Listen on 127.0.0.1.

        Raises:
            OpsError: the port cannot be bound (in use), or the server was started before.
        """
        if self._state is not _State.NEW:
            raise OpsError("the demo server cannot be started twice")
        try:
            self._server = await asyncio.start_server(
                self._handle_connection, _HOST, self._port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise OpsError(
                f"cannot serve the demo on {_HOST}:{self._port}: {exc.strerror}; pick another "
                "--demo-port"
            ) from None
        self._port = self._server.sockets[0].getsockname()[1]
        self._state = _State.RUNNING

    async def stop(self) -> None:
        """Stop listening and end open connections (idempotent)."""
        if self._state is _State.STOPPED:
            return
        self._state = _State.STOPPED
        if self._server is None:
            return
        self._server.close()
        # Closing a connection ends its handler (its read fails), which then returns normally:
        # asyncio's stream server reports handler tasks that end cancelled as errors.
        for writer in self._writers:
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=_READ_TIMEOUT)
        await self._server.wait_closed()

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target = _request_line(head)
            await self._respond(writer, method, target)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away, or was slow or sent too much: nothing to answer
        except ConnectionError:
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, writer: asyncio.StreamWriter, method: str, target: str) -> None:
        path = target.split("?", 1)[0].split("#", 1)[0]
        found = self._files.get(path)
        extra: list[str] = []
        if not method:
            status, file = "400 Bad Request", _File(b"bad request\n", "text/plain")
        elif method != "GET":
            status, file = "405 Method Not Allowed", _File(b"only GET\n", "text/plain")
            extra.append("Allow: GET")
        elif found is None:
            status, file = "404 Not Found", _File(b"not found\n", "text/plain")
        else:
            status, file = "200 OK", found
        lines = [
            f"HTTP/1.1 {status}",
            f"Content-Type: {file.content_type}",
            f"Content-Length: {len(file.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
            *extra,
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + file.body)
        await writer.drain()
        _log.debug("demo request", method=method, path=path, status=status[:3])


def _request_line(head: bytes) -> tuple[str, str]:
    """The method and target of a request head; ``("", "")`` when malformed (answered 400)."""
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = first.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "", ""
    return parts[0], parts[1]
