"""Browsers reach objects over NATS WebSockets: ``ndo serve --websocket-port`` (the embedded
server's ``websocket`` listener) carries the same wire protocol, checked here with a minimal
RFC 6455 client speaking raw NATS protocol, as the browser demo (``examples/demo/``) does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from typing import Any

import pytest

from ndo.ops._browser_access import browser_access
from ndo.service import server_mapping
from tests.helpers import free_port
from tests.worker_fixtures import WorkerFactory


class _WebSocket:
    """Just enough of a WebSocket client for the NATS text protocol (binary frames)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int, origin: str | None = None) -> _WebSocket:
        """Open the WebSocket as a page of ``origin`` would (default: the listener's own)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: {origin or f'http://127.0.0.1:{port}'}"
                "\r\n\r\n"
            ).encode()
        )
        response = await reader.readuntil(b"\r\n\r\n")
        if not response.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise AssertionError(response)
        return cls(reader, writer)

    def send(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        header = bytes([0x82])  # FIN + binary frame
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def _frame(self) -> bytes:
        _flags, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return await self.reader.readexactly(length)

    async def until(self, marker: bytes) -> bytes:
        """Read frames until ``marker`` appears; return everything up to and including it."""
        while marker not in self.buffer:
            self.buffer += await self._frame()
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def close(self) -> None:
        self.writer.transport.abort()  # no close handshake: the server may have hung up


async def _call(
    ws: _WebSocket, subject: str, body: str, login: dict[str, str] | None = None
) -> bytes:
    """CONNECT (with ``login``), SUB an inbox, PUB a request: the reply's payload, or the
    server's ``-ERR`` line when it refuses."""
    info = await asyncio.wait_for(ws.until(b"\r\n"), 5)
    assert info.startswith(b"INFO ")
    fields = {"verbose": False, "headers": True, "no_responders": True, **(login or {})}
    ws.send(f"CONNECT {json.dumps(fields)}\r\n")
    ws.send("SUB _INBOX.ws 1\r\n")
    ws.send(f"PUB {subject} _INBOX.ws {len(body)}\r\n{body}\r\n")
    line = await asyncio.wait_for(ws.until(b"\r\n"), 5)
    while line.startswith(b"PING"):
        ws.send("PONG\r\n")
        line = await asyncio.wait_for(ws.until(b"\r\n"), 5)
    if line.startswith(b"-ERR"):
        return line
    assert line.startswith(b"MSG _INBOX.ws 1 ") or line.startswith(b"HMSG _INBOX.ws 1 "), line
    size = int(line.split()[-1])
    payload = await asyncio.wait_for(ws.until(b"\r\n"), 5)
    return payload[:size]


async def test_request_over_websocket(make_nats_server: Any, start_worker: WorkerFactory) -> None:
    """CONNECT, SUB an inbox, PUB a request with headers: the object's reply comes back."""
    port = free_port()
    server = await make_nats_server(websocket_port=port)
    await start_worker(nats_url=server.url)
    ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
    try:
        body = json.dumps({"by": 5})
        reply = await _call(ws, "ndo.rpc.Counter.browser.increment", body)
        assert reply.endswith(b"5")
    finally:
        ws.close()


class TestBrowserAccess:
    """The embedded server's WebSocket listener as ``ndo serve`` configures it: held to its
    origin (and the allowed ones), browsers get caller rights only, optionally after a login."""

    async def _server(
        self, make_nats_server: Any, *, origins: tuple[str, ...] = (), user: str = ""
    ) -> tuple[Any, int]:
        port = free_port()
        access = browser_access("ndo", user=user, password="pw" if user else "")
        server = await make_nats_server(
            websocket_port=port,
            websocket_origins=origins,
            websocket_no_auth_user=access.websocket_no_auth_user,
            extra_config=access.config,
            mappings=dict([server_mapping("ndo", 8)]),  # start_worker serves 8 partitions
        )
        return server, port

    async def test_pages_of_other_origins_are_refused(self, make_nats_server: Any) -> None:
        """Another site, a local file (origin null) and another port get 403; the listener's
        own origin and an allowed one get the WebSocket."""
        _, port = await self._server(make_nats_server, origins=("http://127.0.0.1:8000",))
        for origin in ("http://evil.example", "null", "http://127.0.0.1:8001"):
            with pytest.raises(AssertionError, match="403"):
                await asyncio.wait_for(_WebSocket.connect(port, origin), 5)
        for origin in (f"http://127.0.0.1:{port}", "http://127.0.0.1:8000"):
            ws = await asyncio.wait_for(_WebSocket.connect(port, origin), 5)
            ws.close()

    async def test_same_origin_only_by_default(self, make_nats_server: Any) -> None:
        """Without allowed origins, only the listener's own origin is admitted."""
        _, port = await self._server(make_nats_server)
        with pytest.raises(AssertionError, match="403"):
            await asyncio.wait_for(_WebSocket.connect(port, "http://127.0.0.1:8000"), 5)
        ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
        ws.close()

    async def test_browsers_are_callers_only(
        self, make_nats_server: Any, start_worker: WorkerFactory
    ) -> None:
        """A browser calls objects, but cannot write the lease bucket, reach internal subjects
        or the JetStream API; the worker (an anonymous local TCP client) serves as before."""
        server, port = await self._server(make_nats_server)
        await start_worker(nats_url=server.url)
        ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
        try:
            assert await _call(ws, "ndo.rpc.Counter.web.increment", '{"by": 3}') == b"3"
        finally:
            ws.close()
        for subject in (
            "$KV.ndo-leases.leases.3",
            "ndo.sys.fwd.3.Counter.web.increment",
            "$JS.API.STREAM.DELETE.NDO_JOURNAL",
        ):
            ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
            try:
                refused = await _call(ws, subject, "x")
            finally:
                ws.close()
            assert refused.startswith(b"-ERR 'Permissions Violation for Publish"), refused

    async def test_login_required_with_a_websocket_user(
        self, make_nats_server: Any, start_worker: WorkerFactory
    ) -> None:
        """With --websocket-user, an anonymous browser can do nothing, a wrong password is
        refused, and the user gets its caller rights."""
        server, port = await self._server(make_nats_server, user="painter")
        await start_worker(nats_url=server.url)
        body = '{"by": 2}'
        ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
        try:
            refused = await _call(ws, "ndo.rpc.Counter.web.increment", body)
            assert refused.startswith(b"-ERR 'Permissions Violation"), refused
        finally:
            ws.close()
        ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
        try:
            await asyncio.wait_for(ws.until(b"\r\n"), 5)  # INFO
            ws.send('CONNECT {"verbose":false,"user":"painter","pass":"nope"}\r\nPING\r\n')
            refused = await asyncio.wait_for(ws.until(b"\r\n"), 5)
            assert refused.startswith(b"-ERR 'Authorization Violation'"), refused
        finally:
            ws.close()
        ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
        try:
            login = {"user": "painter", "pass": "pw"}
            assert await _call(ws, "ndo.rpc.Counter.web.increment", body, login) == b"2"
        finally:
            ws.close()
