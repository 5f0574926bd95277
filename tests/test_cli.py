"""The ``ndo`` command end to end: real ``ndo serve`` and ``ndo call`` processes.

``ndo serve`` here starts its own embedded nats-server, so each server gets a port picked by
``free_port()`` (the worker must know it before it starts). Every process is bounded by a
timeout and killed at teardown.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ndo.ops import ConfigFileError
from ndo.ops._config_file import load_config_file
from ndo.ops._options import build_worker_config
from ndo.ops.cli import build_parser, main
from ndo.service import HIDDEN_WORKER_FIELDS, WORKER_OPTIONS, WorkerConfig
from tests.helpers import ServeProcess, free_port, ndo_env, process_gone, run_ndo

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT = 10.0
"""Seconds a signalled ``ndo serve`` may take to drain and exit."""


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Poll until ``pid`` is gone (sync tests only)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)


@dataclass(frozen=True)
class Served:
    """A running ``ndo serve`` with an embedded server and a metrics endpoint."""

    process: ServeProcess
    nats_url: str
    port: int
    metrics_port: int


@pytest.fixture(name="served", scope="module")
def _served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``ndo serve`` (embedded nats-server, bundled examples) shared by this module."""
    port, metrics_port = free_port(), free_port()
    data_dir = tmp_path_factory.mktemp("served") / "data"
    with ServeProcess(
        "--port", str(port), "--data-dir", str(data_dir), "--metrics-port", str(metrics_port)
    ) as process:
        process.wait_serving()
        yield Served(process, f"nats://127.0.0.1:{port}", port, metrics_port)


def _embedded(tmp_path: Path, *args: str, **kwargs: object) -> tuple[ServeProcess, str]:
    """An unstarted ``ndo serve`` with an embedded server on a free port, and its URL."""
    port = free_port()
    process = ServeProcess(
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "data"),
        *args,
        **kwargs,  # type: ignore[arg-type]
    )
    return process, f"nats://127.0.0.1:{port}"


class TestCall:
    """``ndo call`` prints the reply, or an error with a distinct exit code."""

    def test_call_prints_the_result(self, served: Served) -> None:
        """A JSON-object argument is sent as keyword arguments; the reply is printed as JSON."""
        first = run_ndo(
            "call", "Counter", "cli-a1", "increment", '{"by": 2}', "--nats-url", served.nats_url
        )
        assert (first.returncode, first.stdout, first.stderr) == (0, "2\n", "")
        second = run_ndo(
            "call", "Counter", "cli-a1", "increment", '{"by": 2}', "--nats-url", served.nats_url
        )
        assert second.stdout == "4\n"
        read = run_ndo("call", "Counter", "cli-a1", "get", "--nats-url", served.nats_url)
        assert (read.returncode, read.stdout) == (0, "4\n")

    def test_structured_reply(self, served: Served) -> None:
        """A Struct reply is printed as indented JSON."""
        result = run_ndo(
            "call",
            "ChatRoom",
            "cli-room",
            "post",
            '{"user": "ann", "text": "hé"}',
            "--nats-url",
            served.nats_url,
        )
        assert result.returncode == 0, result.stderr
        posted = json.loads(result.stdout)
        assert (posted["seq"], posted["user"], posted["text"]) == (1, "ann", "hé")

    def test_error_reply_exits_1(self, served: Served) -> None:
        """An error reply exits 1 with code, type and message on stderr, nothing on stdout."""
        result = run_ndo("call", "Counter", "cli-b", "nope", "--nats-url", served.nats_url)
        assert (result.returncode, result.stdout) == (1, "")
        assert "error 404 unknown_method" in result.stderr
        assert "increment" in result.stderr  # the message lists the callable methods

    @pytest.mark.parametrize(
        ("args", "code", "error_type"),
        [
            (["Nope", "cli-b", "get"], 404, "unknown_class"),
            (["Counter", "cli-b", "increment", '{"by": "two"}'], 400, "invalid_arguments"),
            (["Counter", "cli-b", "increment", '{"by": 1, "extra": 1}'], 400, "invalid_arguments"),
        ],
    )
    def test_error_replies(
        self,
        served: Served,
        capsys: pytest.CaptureFixture[str],
        args: list[str],
        code: int,
        error_type: str,
    ) -> None:
        """Each error code is reported as such (the command run in-process against the server)."""
        assert main(["call", *args, "--nats-url", served.nats_url]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert f"error {code} {error_type}" in captured.err

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["Counter", "a1", "increment", "{by: 2}"], "not valid JSON"),
            (["Counter", "a1", "increment", "[2]"], "must be a JSON object"),
            (["Counter", "a.1", "get"], "invalid object id"),
            (["Counter", "a1", "9get"], "invalid method name"),
        ],
    )
    def test_usage_errors(
        self, served: Served, capsys: pytest.CaptureFixture[str], args: list[str], message: str
    ) -> None:
        """Bad JSON or a bad subject part exits 2 before anything is sent."""
        assert main(["call", *args, "--nats-url", served.nats_url]) == 2
        assert message in capsys.readouterr().err

    def test_invalid_json_in_a_real_process(self, served: Served) -> None:
        """The same from the shell: exit 2 and a message, no traceback."""
        result = run_ndo(
            "call", "Counter", "a1", "increment", "{by: 2}", "--nats-url", served.nats_url
        )
        assert result.returncode == 2
        assert "arguments are not valid JSON" in result.stderr
        assert "Traceback" not in result.stderr

    def test_unreachable_server(self) -> None:
        """With no server at the URL, call exits 1 quickly with a hint, not a hang."""
        url = f"nats://127.0.0.1:{free_port()}"
        try:
            result = run_ndo("call", "Counter", "a1", "get", "--nats-url", url, timeout=8)
        except subprocess.TimeoutExpired:
            pytest.fail("ndo call kept retrying an unreachable server for 8 s")
        assert result.returncode == 1
        assert "cannot connect" in result.stderr
        assert "Traceback" not in result.stderr


class TestServe:
    """``ndo serve`` flags, metrics and startup failures."""

    def test_metrics_endpoint(self, served: Served) -> None:
        """--metrics-port serves Prometheus text with ndo_requests_total samples."""
        assert (
            run_ndo(
                "call", "Counter", "cli-m", "increment", "--nats-url", served.nats_url
            ).returncode
            == 0
        )
        url = f"http://127.0.0.1:{served.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        assert "# TYPE ndo_requests_total counter" in text
        samples = [line for line in text.splitlines() if line.startswith("ndo_requests_total{")]
        assert any(
            'class_name="Counter"' in s and 'method="increment"' in s and 'outcome="ok"' in s
            for s in samples
        ), samples

    def test_second_serve_on_the_same_port(self, served: Served, tmp_path: Path) -> None:
        """A second serve on a taken port exits non-zero and says the port is in use."""
        with ServeProcess("--port", str(served.port), "--data-dir", str(tmp_path / "d")) as second:
            code = second.wait(timeout=20)
            output = second.output
        assert code != 0
        assert f"port {served.port}" in output
        assert "already in use" in output
        assert "Traceback" not in output
        # The first one is unharmed.
        assert (
            run_ndo("call", "Counter", "cli-p", "get", "--nats-url", served.nats_url).stdout
            == "0\n"
        )

    @pytest.mark.parametrize(
        ("modules", "message"),
        [(["no_such_module_xyz"], "cannot import"), (["json"], "defines no Actor")],
    )
    def test_bad_module(self, tmp_path: Path, modules: list[str], message: str) -> None:
        """A module that cannot be served is reported before anything starts (exit 2)."""
        result = run_ndo("serve", *modules, "--port", str(free_port()), "--data-dir", str(tmp_path))
        assert result.returncode == 2
        assert message in result.stderr
        assert not (tmp_path / "nats").exists()

    def test_metrics_port_taken(self, tmp_path: Path) -> None:
        """A metrics port in use exits 1 with a fix-it message, before starting anything."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run_ndo(
                "serve", "--port", "0", "--data-dir", str(tmp_path), "--metrics-port", str(port)
            )
        assert result.returncode == 1
        assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
        assert "pick another --metrics-port" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "nats").exists()

    def test_websocket_port_needs_the_embedded_server(self, tmp_path: Path) -> None:
        """--websocket-port with --nats-url is a usage error saying what to do instead."""
        result = run_ndo(
            "serve", "--nats-url", "nats://127.0.0.1:1", "--websocket-port", "9222",
            "--data-dir", str(tmp_path),
        )  # fmt: skip
        assert result.returncode == 2
        assert "configure websocket" in result.stderr

    def test_bad_config_value(self, tmp_path: Path) -> None:
        """An invalid setting exits 2 with a fix-it message."""
        result = run_ndo("serve", "--partitions", "0", "--data-dir", str(tmp_path))
        assert result.returncode == 2
        assert "partitions must be > 0" in result.stderr

    def test_malformed_environment_value(self, tmp_path: Path) -> None:
        """A malformed NDO_* number is a usage error (exit 2) naming the option, no traceback."""
        result = run_ndo("serve", "--data-dir", str(tmp_path), env=ndo_env(NDO_PORT="four"))
        assert result.returncode == 2, result.stderr
        assert "port" in result.stderr.lower()
        assert "Traceback" not in result.stderr

    def test_environment_variables(self, tmp_path: Path) -> None:
        """NDO_PREFIX, NDO_PORT and NDO_DATA_DIR configure serve and call without flags."""
        port = free_port()
        env = ndo_env(NDO_PREFIX="acme", NDO_PORT=str(port), NDO_DATA_DIR=str(tmp_path / "env"))
        with ServeProcess(env=env) as process:
            ready = process.wait_serving()
            assert ready["nats_url"] == f"nats://127.0.0.1:{port}"
            call_env = ndo_env(NDO_PREFIX="acme", NDO_NATS_URL=f"nats://127.0.0.1:{port}")
            result = run_ndo("call", "Counter", "e1", "increment", '{"by": 5}', env=call_env)
            assert (result.returncode, result.stdout) == (0, "5\n"), result.stderr
            # The default prefix reaches no worker.
            other = run_ndo("call", "Counter", "e1", "get", "--prefix", "ndo", env=call_env)
            assert other.returncode == 1
            assert "no worker is serving ndo.rpc.Counter.e1.get" in other.stderr
        assert (tmp_path / "env" / "ndo.sqlite3").is_file()

    def test_user_module(self, tmp_path: Path) -> None:
        """`ndo serve mymodule` serves the Actor classes of a module in the working directory."""
        (tmp_path / "greetings.py").write_text(
            textwrap.dedent(
                """
                from ndo.actors import Actor, method

                class Greeter(Actor):
                    @method
                    async def hello(self, name: str) -> str:
                        count = await self.storage.get("count", 0) + 1
                        self.storage.put("count", count)
                        return f"hello {name} #{count}"
                """
            )
        )
        process, url = _embedded(tmp_path, "greetings", cwd=tmp_path)
        with process:
            ready = process.wait_serving()
            assert ready["classes"] == ["Greeter"]
            for expected in ("hello ann #1", "hello ann #2"):
                result = run_ndo(
                    "call", "Greeter", "g1", "hello", '{"name": "ann"}', "--nats-url", url
                )
                assert (result.returncode, json.loads(result.stdout)) == (0, expected)
            missing = run_ndo("call", "Counter", "c", "get", "--nats-url", url)
            assert missing.returncode == 1
            assert "unknown_class" in missing.stderr

    def test_user_packages_named_like_ndo_folders(self, tmp_path: Path) -> None:
        """A user's own ``storage``, ``service`` and ``ops`` packages import as theirs under
        `ndo serve`: ndo installs one top-level package, ``ndo``, so nothing shadows them."""
        for package in ("storage", "service", "ops", "myapp"):
            (tmp_path / package).mkdir()
        for package in ("storage", "service", "ops"):
            (tmp_path / package / "__init__.py").write_text(f"user_{package} = 'mine'\n")
        (tmp_path / "myapp" / "__init__.py").write_text("")
        (tmp_path / "myapp" / "objects.py").write_text(
            textwrap.dedent(
                """
                from ops import user_ops
                from service import user_service
                from storage import user_storage

                from ndo import Actor, method

                class Owned(Actor):
                    @method
                    async def whose(self) -> list[str]:
                        return [user_ops, user_service, user_storage]
                """
            )
        )
        process, url = _embedded(tmp_path, "myapp.objects", cwd=tmp_path)
        with process:
            assert process.wait_serving()["classes"] == ["Owned"]
            result = run_ndo("call", "Owned", "o1", "whose", "--nats-url", url)
            assert (result.returncode, json.loads(result.stdout)) == (0, ["mine"] * 3), (
                result.stderr
            )


class TestEventLoop:
    """``--loop`` / ``NDO_LOOP`` picks the worker's event loop; handler deadlines hold on each."""

    def test_auto_prefers_uvloop(self, served: Served) -> None:
        """Without --loop, serve runs on uvloop when it is installed, else on asyncio."""
        expected = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        assert served.process.wait_serving()["loop"] == expected

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_deadline_on_each_loop(self, tmp_path: Path, loop: str) -> None:
        """On either loop a handler past --handler-timeout fails with 504 and the object keeps
        serving."""
        if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            pytest.skip("uvloop is not installed (pip install 'ndo[fast]')")
        (tmp_path / "sleepy.py").write_text(
            textwrap.dedent(
                """
                import asyncio

                from ndo.actors import Actor, method

                class Sleepy(Actor):
                    @method
                    async def nap(self, seconds: float) -> str:
                        self.storage.put("napped", seconds)
                        await asyncio.sleep(seconds)
                        return "rested"

                    @method
                    async def napped(self) -> float | None:
                        return await self.storage.get("napped")
                """
            )
        )
        process, url = _embedded(
            tmp_path, "sleepy", "--loop", loop, "--handler-timeout", "0.3", cwd=tmp_path
        )
        with process:
            assert process.wait_serving()["loop"] == loop
            late = run_ndo("call", "Sleepy", "s", "nap", '{"seconds": 5}', "--nats-url", url)
            assert late.returncode == 1
            assert "deadline" in late.stderr
            quick = run_ndo("call", "Sleepy", "s", "nap", '{"seconds": 0}', "--nats-url", url)
            assert (quick.returncode, json.loads(quick.stdout)) == (0, "rested"), quick.stderr
            stored = run_ndo("call", "Sleepy", "s", "napped", "--nats-url", url)
            assert json.loads(stored.stdout) == 0  # the late call's write was discarded

    def test_unknown_loop_in_environment(self, tmp_path: Path) -> None:
        """NDO_LOOP with an unknown loop is a usage error (exit 2) naming the choices."""
        result = run_ndo("serve", "--data-dir", str(tmp_path), env=ndo_env(NDO_LOOP="tokio"))
        assert result.returncode == 2, result.stderr
        assert "asyncio" in result.stderr
        assert "Traceback" not in result.stderr


class TestShutdown:
    """Signals stop ``ndo serve`` cleanly, and its nats-server never outlives it."""

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    def test_signal_stops_cleanly(self, tmp_path: Path, sig: signal.Signals) -> None:
        """A signal drains the worker, stops the embedded server and exits 0."""
        process, url = _embedded(tmp_path)
        with process:
            process.wait_serving()
            server_pid = process.events("embedded nats-server started")[0]["pid"]
            assert not process_gone(server_pid)
            assert run_ndo("call", "Counter", "s1", "increment", "--nats-url", url).returncode == 0
            process.send_signal(sig)
            try:
                code = process.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"ndo serve still running {SHUTDOWN_TIMEOUT}s after {sig.name}")
            assert code == 0, process.output
            assert process.events("worker stopped")
            assert _wait_gone(server_pid), f"nats-server {server_pid} outlived ndo serve"

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    async def test_signal_after_the_server_died(
        self, tmp_path: Path, make_nats_server: Any, loop: str
    ) -> None:
        """With its NATS server gone (the worker is reconnecting), SIGTERM still drains,
        closes storage and exits 0 without a traceback."""
        if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            pytest.skip("uvloop is not installed (pip install -e '.[fast]')")
        server = await make_nats_server()
        process = ServeProcess(
            "--nats-url", server.url, "--data-dir", str(tmp_path / "data"), "--loop", loop
        )
        with process:
            await process.async_wait_serving()
            await server.stop()
            await asyncio.sleep(1.0)  # the worker notices and starts reconnecting
            process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(process.wait, SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"ndo serve still running {SHUTDOWN_TIMEOUT}s after SIGTERM")
            assert code == 0, process.output
            assert "Traceback" not in process.output
            assert process.events("worker stopped")

    def test_kill_9_takes_the_server_along(self, tmp_path: Path) -> None:
        """Even SIGKILL of ndo serve stops its nats-server (parent-death signal)."""
        process, _ = _embedded(tmp_path)
        with process:
            process.wait_serving()
            server_pid = process.events("embedded nats-server started")[0]["pid"]
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=SHUTDOWN_TIMEOUT)
            assert _wait_gone(server_pid), f"nats-server {server_pid} survived kill -9 of ndo"


class TestConfigFile:
    """``ndo serve --config FILE``: TOML options, below NDO_* variables and flags."""

    @staticmethod
    def _parse(config: Path, *flags: str) -> argparse.Namespace:
        argv = ["serve", "--config", str(config), *flags]
        return build_parser(load_config_file(config)).parse_args(argv)

    def test_values_and_precedence(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """File values become defaults (converted like flags); env beats file; flag beats env."""
        config = tmp_path / "ndo.toml"
        config.write_text(
            'data-dir = "/srv/ndo"\nmax_active = 123\nidle-timeout = 2.5\n'
            'modules = ["myapp.objects"]\njournal = false\nprefix = "file"\nport = 5000\n'
        )
        monkeypatch.delenv("NDO_PREFIX", raising=False)
        monkeypatch.delenv("NDO_PORT", raising=False)
        args = self._parse(config)
        assert args.data_dir == Path("/srv/ndo")
        assert (args.max_active, args.idle_timeout, args.journal) == (123, 2.5, False)
        assert args.modules == ["myapp.objects"]
        monkeypatch.setenv("NDO_PREFIX", "env")
        monkeypatch.setenv("NDO_PORT", "6000")
        args = self._parse(config, "--port", "7000", "other.module")
        assert (args.prefix, args.port, args.modules) == ("env", 7000, ["other.module"])

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("bogus = 1\n", "unknown option(s) bogus; valid options:"),
            ("max-active = 'many'\n", "invalid int value: 'many'"),
            ("x = [\n", "not valid TOML"),
            ("[journal]\nage = 1\n", "must be a value, not a table"),
            ("modules = [1]\n", "modules must be a list of module names"),
            ("port = [1, 2]\n", "takes one value, not a list"),
        ],
    )
    def test_bad_file_is_a_usage_error(self, tmp_path: Path, text: str, message: str) -> None:
        """A bad file exits 2 with a message that names the problem, and starts nothing."""
        config = tmp_path / "ndo.toml"
        config.write_text(text)
        result = run_ndo("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "d").exists()

    def test_one_module_as_a_string(self, tmp_path: Path) -> None:
        """``modules = "pkg.mod"`` means one module, not a list of characters."""
        config = tmp_path / "ndo.toml"
        config.write_text('modules = "myapp.objects"\n')
        assert self._parse(config).modules == ["myapp.objects"]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config file that does not exist is a usage error naming it."""
        result = run_ndo("serve", "--config", str(tmp_path / "nope.toml"))
        assert result.returncode == 2
        assert "nope.toml: cannot read it" in result.stderr

    def test_serves_with_a_config_file(self, tmp_path: Path) -> None:
        """``ndo serve --config`` runs with the file's port, data directory and modules."""
        port = free_port()
        config = tmp_path / "ndo.toml"
        config.write_text(
            f'port = {port}\ndata-dir = "{tmp_path / "data"}"\nmodules = ["ndo.examples.objects"]\n'
        )
        with ServeProcess("--config", str(config)) as process:
            process.wait_serving()
            result = run_ndo(
                "call", "Counter", "cfg", "increment", "--nats-url", f"nats://127.0.0.1:{port}"
            )
            assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
        assert (tmp_path / "data" / "ndo.sqlite3").exists()


# Options generated from WorkerConfig

SERVE_ONLY = {
    "port", "websocket_port", "websocket_allowed_origin", "websocket_user", "websocket_password",
    "demo", "demo_port", "metrics_port", "metrics_host", "log_format", "log_level", "loop",
    "nats_creds", "nats_nkey", "nats_token", "nats_user", "nats_password", "tls_ca", "tls_cert",
    "tls_key",
}  # fmt: skip
"""``ndo serve`` options that are not ``WorkerConfig`` fields (``--config`` aside)."""

README = Path(__file__).parents[1] / "README.md"


def _serve_actions() -> dict[str, argparse.Action]:
    """``ndo serve``'s options by dest (argparse keeps a parser's options in ``_actions``)."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    return {action.dest: action for action in serve._actions if action.option_strings}


@pytest.fixture(name="clean_env")
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``NDO_*`` variable of the test process leaks into a parser built in-process."""
    for name in list(os.environ):
        if name.startswith("NDO_"):
            monkeypatch.delenv(name)
    return monkeypatch


class TestWorkerOptions:
    """``ndo serve``'s worker options are generated from ``WorkerConfig``'s declaration."""

    def test_every_field_is_exposed_or_hidden(self) -> None:
        """Each field is in WORKER_OPTIONS (once) or in HIDDEN_WORKER_FIELDS, never both."""
        fields = {field.name for field in msgspec.structs.fields(WorkerConfig)}
        exposed = [option.field for option in WORKER_OPTIONS]
        assert len(set(exposed)) == len(exposed)
        assert set(exposed).isdisjoint(HIDDEN_WORKER_FIELDS)
        assert set(exposed) | HIDDEN_WORKER_FIELDS == fields

    def test_serve_options_are_exposed_fields_or_serve_only(self, clean_env: object) -> None:
        """Every worker option of the parser is a declared field and every declared field has
        its option; the others are the known serve-only options."""
        dests = set(_serve_actions()) - {"help", "config"}
        fields = {field.name for field in msgspec.structs.fields(WorkerConfig)}
        assert dests & fields == {option.field for option in WORKER_OPTIONS}
        assert dests - fields == SERVE_ONLY

    def test_flags(self, clean_env: object) -> None:
        """The flags of ``ndo serve`` (a new one is a deliberate change to this list)."""
        flags = {flag for action in _serve_actions().values() for flag in action.option_strings}
        assert flags == {
            "-h", "--help", "--config", "--nats-url", "--prefix", "--port", "--websocket-port",
            "--data-dir", "--metrics-port", "--metrics-host", "--log-format", "--log-level",
            "--loop", "--partitions", "--max-active", "--idle-timeout", "--handler-timeout",
            "--max-payload", "--max-mailbox", "--drain-timeout", "--idempotency-window",
            "--max-value-bytes", "--max-key-bytes", "--max-turn-bytes", "--max-object-bytes",
            "--no-journal", "--journal-reads",
            "--journal-max-age", "--journal-max-bytes", "--worker-name", "--lease-ttl",
            "--ownership", "--storage", "--replicas", "--snapshot-every", "--reply-prefixes",
            "--caller-info",
            "--websocket-allowed-origin", "--websocket-user", "--websocket-password",
            "--demo", "--demo-port",
            "--nats-creds", "--nats-nkey", "--nats-token", "--nats-user", "--nats-password",
            "--tls-ca", "--tls-cert", "--tls-key",
        }  # fmt: skip

    @pytest.mark.parametrize("option", WORKER_OPTIONS, ids=lambda option: option.field)
    def test_help_comes_from_the_declaration(self, clean_env: object, option: Any) -> None:
        """Each option's flag and help sentence are the declared ones, then its variable."""
        action = _serve_actions()[option.field]
        assert action.option_strings == [option.flag or "--" + option.field.replace("_", "-")]
        assert action.help is not None
        assert action.help.startswith(f"{option.help} [env NDO_{option.field.upper()}")

    @pytest.mark.parametrize(
        "option",
        [option for option in WORKER_OPTIONS if option.parse and option.default_text],
        ids=lambda option: option.field,
    )
    def test_default_text_reads_as_the_default(self, option: Any) -> None:
        """A default shown as text (``7d``) reads back as the field's default."""
        assert option.parse(option.default_text) == getattr(WorkerConfig(), option.field)

    def test_defaults_are_the_config_defaults(self, clean_env: object) -> None:
        """With nothing set, serve builds the default WorkerConfig."""
        assert build_worker_config(build_parser().parse_args(["serve"])) == WorkerConfig()

    @pytest.mark.parametrize(
        ("field", "text", "value"),
        [
            ("max_active", "123", 123),
            ("lease_ttl", "7", 7),
            ("idle_timeout", "2.5", 2.5),
            ("drain_timeout", "4", 4.0),
            ("journal_max_age", "12h", 12 * 3600.0),
            ("journal_max_bytes", "512M", 512 * 1024**2),
            ("journal", "0", False),
            ("journal", "off", False),
            ("journal", "1", True),
            ("ownership", "standalone", "standalone"),
            ("data_dir", "/srv/ndo", Path("/srv/ndo")),
            ("worker_name", "w1", "w1"),
            ("nats_url", "nats://10.0.0.1:4222", "nats://10.0.0.1:4222"),
        ],
    )
    def test_environment_reaches_the_config(
        self, clean_env: pytest.MonkeyPatch, field: str, text: str, value: object
    ) -> None:
        """``NDO_<FIELD>`` is read like the flag and ends up in the built WorkerConfig."""
        clean_env.setenv(f"NDO_{field.upper()}", text)
        config = build_worker_config(build_parser().parse_args(["serve"]))
        assert getattr(config, field) == value

    @pytest.mark.parametrize(
        ("key", "toml", "value"),
        [
            ("max-active", "123", 123),
            ("lease_ttl", "7", 7),
            ("idle-timeout", "2.5", 2.5),
            ("idle-timeout", "3", 3.0),
            ("journal-max-age", '"12h"', 12 * 3600.0),
            ("journal-max-age", "60", 60.0),
            ("journal-max-bytes", '"512M"', 512 * 1024**2),
            ("journal-max-bytes", "4096", 4096),
            ("journal", "false", False),
            ("journal", '"off"', False),
            ("ownership", '"leases"', "leases"),
            ("data-dir", '"/srv/ndo"', Path("/srv/ndo")),
        ],
    )
    def test_config_file_reaches_the_config(
        self, clean_env: object, tmp_path: Path, key: str, toml: str, value: object
    ) -> None:
        """A config file value is read like the flag and ends up in the built WorkerConfig."""
        path = tmp_path / "ndo.toml"
        path.write_text(f"{key} = {toml}\n")
        args = build_parser(load_config_file(path)).parse_args(["serve", "--config", str(path)])
        assert getattr(build_worker_config(args), key.replace("-", "_")) == value

    def test_environment_beats_the_file_for_a_switch(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """``NDO_JOURNAL=1`` wins over ``journal = false``; ``--no-journal`` wins over both."""
        clean_env.setenv("NDO_JOURNAL", "1")
        parser = build_parser({"journal": False})
        assert parser.parse_args(["serve"]).journal is True
        assert parser.parse_args(["serve", "--no-journal"]).journal is False

    @pytest.mark.parametrize(
        ("variable", "text", "message"),
        [
            ("NDO_JOURNAL_MAX_AGE", "soon", "cannot read 'soon' as a duration"),
            ("NDO_JOURNAL_MAX_BYTES", "lots", "cannot read 'lots' as a size"),
            ("NDO_IDLE_TIMEOUT", "long", "invalid float value: 'long'"),
        ],
    )
    def test_malformed_environment_is_a_usage_error(
        self,
        clean_env: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        variable: str,
        text: str,
        message: str,
    ) -> None:
        """A malformed variable exits 2 naming the option, like the flag would."""
        clean_env.setenv(variable, text)
        with pytest.raises(SystemExit) as exc_info:
            build_parser().parse_args(["serve"])
        assert exc_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err
        assert "--" + variable.removeprefix("NDO_").lower().replace("_", "-") in err

    def test_file_accepts_exactly_the_parser_options(self, clean_env: object) -> None:
        """An unknown key's error lists every serve option (but --config) and modules."""
        with pytest.raises(ConfigFileError) as exc_info:
            build_parser({"bogus": 1})
        listed = str(exc_info.value).split("valid options: ")[1].split(", ")
        dests = set(_serve_actions()) - {"help", "config"}
        assert sorted(listed) == sorted(
            d.replace("_", "-") for d in dests | {"modules", "migrations"}
        )


class TestReadme:
    """README's Options table lists exactly the options of ``ndo serve``."""

    def test_options_table_matches_the_parser(self, clean_env: object) -> None:
        """Every flag in the table exists, and every flag (but --help) is in the table."""
        section = README.read_text().split("\n## Options\n")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| `")]
        documented = {
            flag for row in rows for flag in re.findall(r"--[a-z][a-z-]*", row.split("|")[1])
        }
        flags = {flag for action in _serve_actions().values() for flag in action.option_strings}
        assert documented == flags - {"-h", "--help"}
