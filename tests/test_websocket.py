"""Browsers reach objects over NATS WebSockets: ``ndo serve --websocket-port`` (the embedded
server's ``websocket`` listener) carries the same wire protocol, checked here with a minimal
RFC 6455 client speaking raw NATS protocol, as ``examples/drawing_board.html`` does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from typing import Any

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
        assert response.startswith(b"HTTP/1.1 101"), response
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
        self.writer.close()


async def test_request_over_websocket(make_nats_server: Any, start_worker: WorkerFactory) -> None:
    """CONNECT, SUB an inbox, PUB a request with headers: the object's reply comes back."""
    port = free_port()
    server = await make_nats_server(websocket_port=port)
    await start_worker(nats_url=server.url)
    ws = await asyncio.wait_for(_WebSocket.connect(port), 5)
    try:
        info = await asyncio.wait_for(ws.until(b"\r\n"), 5)
        assert info.startswith(b"INFO ")
        ws.send('CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n')
        ws.send("SUB _INBOX.ws 1\r\n")
        body = json.dumps({"by": 5})
        ws.send(f"PUB ndo.rpc.Counter.browser.increment _INBOX.ws {len(body)}\r\n{body}\r\n")
        line = await asyncio.wait_for(ws.until(b"\r\n"), 5)
        while line.startswith(b"PING"):
            ws.send("PONG\r\n")
            line = await asyncio.wait_for(ws.until(b"\r\n"), 5)
        assert line.startswith(b"MSG _INBOX.ws 1 ") or line.startswith(b"HMSG _INBOX.ws 1 "), line
        size = int(line.split()[-1])
        payload = await asyncio.wait_for(ws.until(b"\r\n"), 5)
        assert payload[:size].endswith(b"5")
    finally:
        ws.close()
