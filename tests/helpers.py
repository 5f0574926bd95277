"""Helpers shared by several test modules: bounded polling, and ``ndo serve`` as a child process.

``ServeProcess`` runs the real entry point (``python -m ndo.ops.cli serve ...``) with JSON logs. A
reader thread collects every log line, so a chatty worker never blocks on a full pipe and tests
can wait for a log event (``wait_for_event``) with a deadline. Every wait is bounded; ``close``
kills whatever is still running, so a failing test never leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import msgspec
from nats.aio.client import Client as NatsClient

from ndo.service import CONFIG_KEY, DeploymentRecord, LeaseRecord, lease_bucket, lease_key
from ndo.storage import SqliteStorage

NDO_COMMAND: tuple[str, ...] = (sys.executable, "-m", "ndo.ops.cli")
"""How the tests run the ``ndo`` command (the venv's interpreter, no PATH lookup)."""

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout; as the working directory it makes ``tests.objects`` importable by ``ndo``."""

STARTUP_TIMEOUT = 20.0
"""Seconds a child ``ndo serve`` may take to log that it is serving (2 slow cores)."""


async def eventually(
    predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Wait until ``predicate()`` is true, polling every ``interval`` seconds.

    Raises:
        TimeoutError: still false after ``timeout`` seconds.
    """
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event to wait on
            await asyncio.sleep(interval)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ndo_env(**overrides: str) -> dict[str, str]:
    """This process's environment without any ``NDO_*`` variable, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NDO_")}
    env.update(overrides)
    return env


def run_ndo(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run one ``ndo`` command to completion (bounded by ``timeout``) and capture its output."""
    return subprocess.run(
        [*NDO_COMMAND, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else ndo_env(),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie waiting for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


class ServeProcess:
    """One ``ndo serve`` child process with its log collected in the background."""

    # Configuration
    args: list[str]
    _cwd: Path | None
    _env: dict[str, str]
    # State
    _proc: subprocess.Popen[str] | None
    _records: list[dict[str, Any]]
    _lines: list[str]
    _changed: threading.Condition
    _readers: list[threading.Thread]

    def __init__(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        """Describe ``ndo serve <args> --log-format json``; nothing runs until ``start``."""
        self.args = ["serve", *args, "--log-format", "json"]
        self._cwd = cwd
        self._env = env if env is not None else ndo_env()
        self._proc = None
        self._records = []
        self._lines = []
        self._changed = threading.Condition()
        self._readers = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """Process id of the ``ndo serve`` process."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or ``None`` while it runs."""
        assert self._proc is not None, "not started"
        return self._proc.poll()

    @property
    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr lines, interleaved)."""
        with self._changed:
            return "\n".join(self._lines)

    def start(self) -> Self:
        """Spawn the process and start reading its output."""
        assert self._proc is None, "already started"
        self._proc = subprocess.Popen(
            [*NDO_COMMAND, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self._cwd,
            env=self._env,
        )
        for stream in (self._proc.stdout, self._proc.stderr):
            assert stream is not None
            reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream: Any) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            with self._changed:
                self._lines.append(line)
                if isinstance(record, dict):
                    self._records.append(record)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def events(self, prefix: str) -> list[dict[str, Any]]:
        """Log records so far whose ``event`` starts with ``prefix``."""
        with self._changed:
            return [r for r in self._records if str(r.get("event", "")).startswith(prefix)]

    def wait_for_event(self, prefix: str, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """Block until a log record's ``event`` starts with ``prefix`` and return it.

        Raises:
            AssertionError: the process exited first, or ``timeout`` passed; with its output.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for record in self._records:
                    if str(record.get("event", "")).startswith(prefix):
                        return record
                left = deadline - time.monotonic()
                exited = self._proc is not None and self._proc.poll() is not None
                if left <= 0 or (exited and not any(r.is_alive() for r in self._readers)):
                    code = self._proc.poll() if self._proc is not None else None
                    raise AssertionError(
                        f"ndo serve never logged {prefix!r} (exit code {code}); output:\n"
                        + "\n".join(self._lines[-40:])
                    )
                self._changed.wait(min(left, 0.1))

    def wait_serving(self, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """Block until the worker logs that it is serving."""
        return self.wait_for_event("serving", timeout)

    async def async_wait_serving(self, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """``wait_serving`` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_serving, timeout)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the ``ndo serve`` process (not its children)."""
        assert self._proc is not None, "not started"
        self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code.

        Raises:
            subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        assert self._proc is not None, "not started"
        code = self._proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=2)
        return code

    async def async_wait(self, timeout: float) -> int:
        """``wait`` without blocking the event loop."""
        return await asyncio.to_thread(self.wait, timeout)

    def close(self) -> None:
        """Kill the process if it still runs and reap it (idempotent)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=2)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


HOLD_WRITE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""
"""Takes ndo's cross-process write lock (the ``flock`` on ``<db>.writelock``, argument 1) and
holds it until stdin closes: a frozen peer worker."""

HOLD_SQLITE_WRITE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
"""
"""Holds an SQLite write transaction on the database (argument 1), not ndo's lock, until stdin
closes: another tool writing to the file."""


class LockHolder:
    """Another process holding a lock (``HOLD_WRITE_LOCK`` or ``HOLD_SQLITE_WRITE``) from
    construction until ``release``: a frozen peer, or a disk so slow that commits and partition
    claims wait."""

    _proc: subprocess.Popen[str]

    def __init__(self, script: str, path: Path) -> None:
        """Run ``script`` on ``path``; returns once the lock is held."""
        self._proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "locked"

    @classmethod
    def write_lock(cls, data_dir: Path) -> LockHolder:
        """Hold the write lock of the SQLite storage in ``data_dir``."""
        return cls(HOLD_WRITE_LOCK, data_dir / "ndo.sqlite3.writelock")

    def release(self) -> None:
        """Let go of the lock: the process exits (idempotent)."""
        proc = self._proc
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.asynccontextmanager
async def held_lock(script: str, path: Path) -> AsyncIterator[None]:
    """Hold a lock (see ``LockHolder``) in another process while the block runs."""
    holder = await asyncio.to_thread(LockHolder, script, path)
    try:
        yield
    finally:
        await asyncio.to_thread(holder.release)


async def steal_lease(nc: NatsClient, partition: int, rogue: SqliteStorage) -> int:
    """Take ``partition``'s lease the way a new holder would after an expiry: a KV write over
    the current holder's, then its epoch (the bucket's epoch base plus the write's revision)
    fenced into ``rogue``'s storage. Returns that epoch."""
    js = nc.jetstream()
    kv = await js.key_value(lease_bucket("ndo"))
    config = await kv.get(CONFIG_KEY)
    assert config.value is not None
    base = msgspec.json.decode(config.value, type=DeploymentRecord)
    current = await kv.get(lease_key(partition))
    ack = await js.publish(
        f"$KV.{lease_bucket('ndo')}.{lease_key(partition)}",
        msgspec.json.encode(LeaseRecord(owner="rogue", name="rogue")),
        headers={
            "Nats-Expected-Last-Subject-Sequence": str(current.revision),
            "Nats-TTL": "2s",
        },
    )
    epoch = base.epoch_base + ack.seq
    await rogue.claim_partitions([partition], "rogue", epoch=epoch)
    return epoch
