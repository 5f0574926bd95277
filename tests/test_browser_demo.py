"""The browser demo (``ndo serve --websocket-port P --demo``, docs/demo.md): its options, its
small web server, and two real headless Chromium pages that draw and chat through it.

The browser test drives Debian's ``chromium`` with Node.js and ``playwright-core`` (both from
the repository's ``npm install``; nothing is downloaded here) through
``tests/browser/demo_two_pages.mjs``; it skips, saying why, where one of them is missing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ndo.ops._demo import DemoServer, find_nats_ws_bundle
from ndo.ops._errors import OpsError
from tests.helpers import REPO_ROOT, ServeProcess, free_port, run_ndo

pytestmark = pytest.mark.slow

_SCRIPT = REPO_ROOT / "tests" / "browser" / "demo_two_pages.mjs"
_NODE_MODULES = REPO_ROOT / "node_modules"
_BROWSER_TIMEOUT = 90.0
"""Seconds the Node.js script may run (it bounds itself to 60 s)."""


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def _browser_tools() -> tuple[str, str]:
    """Node.js and the Chromium binary, or skip saying what is missing."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed: the browser demo test needs Node.js >= 18")
    for package, file in (("playwright-core", "package.json"), ("nats.ws", "esm/nats.js")):
        if not (_NODE_MODULES / package / file).is_file():
            pytest.skip(f"node_modules lacks {package}: run `npm install` in the repository")
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "no chromium binary (/usr/bin/chromium or chromium on PATH): "
            "apt-get install chromium (.ci/run does it where it can)"
        )
    return node, chromium


async def _get(port: int, request: str) -> tuple[str, dict[str, str], bytes]:
    """One raw HTTP request to 127.0.0.1:``port``: status line, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode() + b"\r\n\r\n")
    async with asyncio.timeout(5):
        response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


class TestDemoOptions:
    """``--demo`` goes with the embedded server's WebSocket listener, and says so."""

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--demo"], "--demo needs --websocket-port"),
            (["--websocket-port", "9222", "--demo-port", "8001"], "--demo-port needs --demo"),
            (["--nats-url", "nats://127.0.0.1:1", "--demo"], "leave out --nats-url"),
        ],
        ids=["no-websocket", "port-alone", "nats-url"],
    )
    def test_usage_errors(self, tmp_path: Path, args: list[str], message: str) -> None:
        """A wrong combination is a usage error (exit 2) naming what to do."""
        result = run_ndo("serve", *args, "--data-dir", str(tmp_path))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr

    def test_demo_port_taken(self, tmp_path: Path) -> None:
        """A demo port in use stops ``ndo serve`` at start, before anything else runs."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run_ndo(
                "serve", "--websocket-port", str(free_port()), "--demo", "--demo-port",
                str(port), "--port", str(free_port()), "--data-dir", str(tmp_path),
            )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert f"cannot serve the demo on 127.0.0.1:{port}" in result.stderr
        assert "pick another --demo-port" in result.stderr

    def test_missing_bundle_says_run_npm_install(self, tmp_path: Path) -> None:
        """Without nats.ws in node_modules the error says to run ``npm install``."""
        with pytest.raises(OpsError, match=r"run `npm install` in the ndo repository"):
            find_nats_ws_bundle([tmp_path])


class TestDemoServer:
    """The demo's web server answers GET for its fixed files and nothing else."""

    @pytest.fixture(name="demo")
    async def _demo(self, tmp_path: Path) -> AsyncIterator[DemoServer]:
        """A demo server on a free port, with a stand-in for the nats.ws bundle."""
        bundle = tmp_path / "nats.js"
        bundle.write_text("export const connect = null;\n")
        demo = DemoServer(websocket_url="ws://127.0.0.1:9222", prefix="app", port=0, bundle=bundle)
        async with demo:
            yield demo

    async def test_files(self, demo: DemoServer) -> None:
        """The page, its script, the client bundle and the config, with their content types."""
        expected = {
            "/": "text/html; charset=utf-8",
            "/index.html": "text/html; charset=utf-8",
            "/demo.js": "text/javascript; charset=utf-8",
            "/nats.js": "text/javascript; charset=utf-8",
            "/drawing_board.html": "text/html; charset=utf-8",
            "/config.json": "application/json",
        }
        for path, content_type in expected.items():
            status, headers, body = await _get(demo.port, f"GET {path}?x=1 HTTP/1.1")
            assert status == "HTTP/1.1 200 OK", path
            assert headers["Content-Type"] == content_type
            assert int(headers["Content-Length"]) == len(body) > 0
        _, _, config = await _get(demo.port, "GET /config.json HTTP/1.1")
        assert json.loads(config) == {
            "websocket_url": "ws://127.0.0.1:9222",
            "prefix": "app",
            "login": False,
        }
        assert demo.origins == (
            f"http://127.0.0.1:{demo.port}",
            f"http://localhost:{demo.port}",
        )

    @pytest.mark.parametrize(
        ("request_line", "status"),
        [
            ("GET /../pyproject.toml HTTP/1.1", "404 Not Found"),
            ("GET /node_modules/nats.ws/esm/nats.js HTTP/1.1", "404 Not Found"),
            ("GET /demo/../../ops/_demo.py HTTP/1.1", "404 Not Found"),
            ("GET /%2e%2e/pyproject.toml HTTP/1.1", "404 Not Found"),
            ("POST / HTTP/1.1", "405 Method Not Allowed"),
            ("garbage", "400 Bad Request"),
        ],
    )
    async def test_refused(self, demo: DemoServer, request_line: str, status: str) -> None:
        """Any other path is 404 (no file system path is ever built from a request), any
        other method 405, a malformed request 400."""
        answered, _, _ = await _get(demo.port, request_line)
        assert answered == f"HTTP/1.1 {status}"


class TestTwoBrowserPages:
    """Two headless Chromium pages on one board and room see each other's strokes and
    messages live, through NATS."""

    @pytest.mark.timeout(150)
    def test_stroke_and_message_reach_the_other_page(self, tmp_path: Path) -> None:
        """A stroke drawn and a message posted in page A appear in page B (as NATS events on
        B's own connection), a later page loads both from history, and the message is in the
        ChatRoom object."""
        node, chromium = _browser_tools()
        port = free_port()
        object_id = f"t{uuid.uuid4().hex[:10]}"
        with ServeProcess(
            "--websocket-port", str(free_port()), "--demo", "--demo-port", str(free_port()),
            "--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=REPO_ROOT,
        ) as served:  # fmt: skip
            served.wait_serving()
            url = served.wait_for_event("demo:")["url"]
            run = subprocess.run(
                [node, str(_SCRIPT), url, object_id, chromium, "60000"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=_BROWSER_TIMEOUT,
                check=False,
            )
            print(run.stdout)
            assert run.returncode == 0 and "RESULT ok" in run.stdout, run.stdout + run.stderr
            history = run_ndo(
                "call", "ChatRoom", object_id, "history", "--nats-url", f"nats://127.0.0.1:{port}"
            )
            assert history.returncode == 0, history.stderr
            assert [m["user"] for m in json.loads(history.stdout)] == ["alice"]
