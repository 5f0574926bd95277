"""A full disk, end to end: ``ndo serve`` with its data directory on a 4 MiB tmpfs of its own.

The worker runs through ``tests/disk_full_driver.py`` inside a private mount namespace
(``unshare -rm``: a user namespace maps this user to root there, so no privilege is needed where
unprivileged user namespaces are allowed); the network is shared, so it serves the test's
nats-server on 127.0.0.1. The test fills the tmpfs through ``/proc/<pid>/root`` and checks what
callers see: writes fail with ``503 storage_failure``, reads keep working,
``ndo_commit_failures_total`` rises; then it frees the space and checks that writes resume and
that every acknowledged value is in the database file. Skipped, with the reason, where the
machine does not allow the namespace or the mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, RetryPolicy, UnavailableError
from ndo.ops._nats_server import EmbeddedNatsServer
from tests.helpers import REPO_ROOT, STARTUP_TIMEOUT, free_port, ndo_env
from tests.objects import Store

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).parent / "disk_full_driver.py"
TMPFS_SIZE = "4m"
"""Room for the database, its WAL and shared memory, and little else."""
BIG = "x" * 100_000
"""A value whose commit must grow the WAL by ~100 KB (cannot fit once the disk is full)."""


def _namespace_unavailable(mountpoint: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the unshare command (util-linux) is not installed"
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        probe = subprocess.run(
            [unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{mountpoint}'"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -rm could not run: {exc}"
    if probe.returncode != 0:
        return (
            "this machine does not allow a private mount namespace with a tmpfs "
            f"(unshare -rm ... mount -t tmpfs: {probe.stderr.strip() or probe.returncode})"
        )
    return None


class _Driver:
    """``disk_full_driver.py`` under ``unshare -rm``: one JSON log line per record, collected
    by a reader thread; every wait is bounded."""

    def __init__(self, mountpoint: Path, *serve_args: str) -> None:
        unshare = shutil.which("unshare")
        assert unshare is not None
        self.proc = subprocess.Popen(
            [unshare, "-rm", sys.executable, str(DRIVER), str(mountpoint), TMPFS_SIZE,
             *serve_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            env=ndo_env(),
            start_new_session=True,  # the driver and the worker: one process group to kill
        )  # fmt: skip
        self.mountpoint = mountpoint
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def path(self, name: str) -> Path:
        """``name`` in the tmpfs, as this process sees it (through the namespace's root)."""
        return Path(f"/proc/{self.proc.pid}/root{self.mountpoint}") / name

    def wait_for_event(self, prefix: str, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        """Block until a JSON line's ``event`` starts with ``prefix`` and return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and str(record.get("event", "")).startswith(prefix):
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"never logged {prefix!r} (exit code {self.proc.poll()}); output:\n"
                        + "\n".join(self.lines[-40:])
                    )
                self._changed.wait(min(left, 0.1))

    def close(self) -> None:
        """Kill the driver and its worker if they still run, and reap them (idempotent)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=2)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem is full; return the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as file:
        for chunk in (65536, 4096, 512):
            while True:
                try:
                    written += file.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def _commit_failures(port: int) -> float:
    """``ndo_commit_failures_total`` from the worker's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("ndo_commit_failures_total "):
            return float(line.split()[1])
    raise AssertionError("ndo_commit_failures_total is not exported")


def _stored_values(db: Path, copy: Path) -> dict[tuple[str, str], object]:
    """Every Store value in the database file ``db`` (the worker is gone), read from a copy:
    SQLite resolves the ``/proc/<pid>/root`` link to this namespace's root, not the tmpfs's."""
    assert not db.with_name(db.name + "-wal").exists(), "the worker's close left a WAL"
    shutil.copyfile(db, copy)
    conn = sqlite3.connect(copy)
    try:
        rows = conn.execute("SELECT oid, key, value FROM kv WHERE cls = 'Store'").fetchall()
    finally:
        conn.close()
    return {(oid, key): msgspec.msgpack.decode(value) for oid, key, value in rows}


@pytest.fixture(name="driver_factory")
def _driver_factory() -> Iterator[list[_Driver]]:
    """Drivers started by the test; killed afterwards if still running."""
    drivers: list[_Driver] = []
    try:
        yield drivers
    finally:
        for driver in drivers:
            if driver.proc.stdin is not None:
                driver.proc.stdin.close()  # lets a driver whose worker exited end by itself
            driver.close()


class TestDiskFull:
    """With the data directory's filesystem full, writes are refused with a retryable 503 and
    counted, reads are served, and once space is freed writes resume with every acknowledged
    value intact."""

    async def test_full_then_freed(
        self,
        nats_server: EmbeddedNatsServer,
        nc: NatsClient,
        tmp_path: Path,
        driver_factory: list[_Driver],
    ) -> None:
        """Fill the tmpfs under a serving worker, write, read, free it, write again, stop,
        and read the file."""
        mountpoint = tmp_path / "mnt"
        reason = _namespace_unavailable(mountpoint)
        if reason is not None:
            pytest.skip(reason)
        metrics_port = free_port()
        driver = _Driver(
            mountpoint, "tests.objects", "--nats-url", nats_server.url,
            "--data-dir", str(mountpoint), "--metrics-port", str(metrics_port),
            "--log-format", "json",
        )  # fmt: skip
        driver_factory.append(driver)
        await asyncio.to_thread(driver.wait_for_event, "serving")
        client = ActorClient(nc, timeout=10.0, retry=RetryPolicy(attempts=1))
        acknowledged: dict[tuple[str, str], object] = {}

        async def put(object_id: str, key: str, value: object) -> None:
            await client.get(Store, object_id).call(Store.put, key=key, value=value)
            acknowledged[(object_id, key)] = value

        for i in range(30):
            await put(f"s{i % 10}", f"k{i}", i)
        await put("big0", "v", BIG)

        filler = driver.path("filler")
        assert await asyncio.to_thread(_fill, filler) > 0
        before = await asyncio.to_thread(_commit_failures, metrics_port)
        for i in range(3):
            with pytest.raises(UnavailableError) as full:
                await put(f"big{i + 1}", "v", BIG)
            assert full.value.type == "storage_failure"
            assert "full" in full.value.message
        for (object_id, key), value in acknowledged.items():  # reads are served
            assert await client.get(Store, object_id).call(Store.get, key=key) == value
        assert await asyncio.to_thread(_commit_failures, metrics_port) >= before + 3

        await asyncio.to_thread(filler.unlink)
        for i in range(3):
            await put(f"big{i + 1}", "v", BIG)
        await put("s0", "after", "freed")
        for (object_id, key), value in acknowledged.items():
            assert await client.get(Store, object_id).call(Store.get, key=key) == value

        driver.proc.send_signal(signal.SIGTERM)  # forwarded to the worker
        exited = await asyncio.to_thread(driver.wait_for_event, "driver: worker exited", 60)
        assert exited["code"] == 0, "\n".join(driver.lines[-40:])
        stored = await asyncio.to_thread(
            _stored_values, driver.path("ndo.sqlite3"), tmp_path / "copy.sqlite3"
        )
        assert stored == acknowledged
