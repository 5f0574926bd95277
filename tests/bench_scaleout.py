"""Scale-out measurements quoted in docs/scale-out.md (not a test; run it by hand).

    python -m tests.bench_scaleout throughput   # 1/2/3 workers x forward/mapped
    python -m tests.bench_scaleout handover     # graceful, kill -9, join: gaps and retries
    python -m tests.bench_scaleout all

Workers are real ``ndo serve`` processes sharing one data directory (journal off); the load comes
from Node.js processes (the ``nats`` npm package in the repository root's ``node_modules``), far
cheaper per request than a nats-py requester on two cores. CPU is read from ``/proc/<pid>/stat``
for workers, server and load.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
import nats.errors

from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import server_mapping
from tests.cluster_fixtures import REPO_ROOT, Cluster, one_object_per_partition

_TICK = os.sysconf("SC_CLK_TCK")
PARTITIONS = 64

_NODE_LOAD = r"""
const { connect, StringCodec } = require("nats");
const [url, objects, inflight, seconds] = process.argv.slice(2).map((v, i) => i ? Number(v) : v);
const body = StringCodec().encode('{"by":1}');
(async () => {
  const nc = await connect({ servers: url });
  process.stdout.write("ready\n");
  await new Promise((r) => process.stdin.once("data", r));
  let ok = 0, errors = 0; const lat = [];
  const t0 = Date.now(); const end = t0 + seconds * 1000;
  async function loop() {
    while (Date.now() < end) {
      const id = Math.floor(Math.random() * objects);
      const t = process.hrtime.bigint();
      try {
        const m = await nc.request(`ndo.rpc.Counter.b${id}.increment`, body, { timeout: 5000 });
        if (m.headers && m.headers.get("Nats-Service-Error-Code")) errors++; else ok++;
      } catch (e) { errors++; }
      lat.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
  }
  await Promise.all(Array.from({ length: inflight }, loop));
  const elapsed = (Date.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
  process.stdout.write(JSON.stringify({ ok, errors, elapsed, p50: q(0.5), p99: q(0.99) }) + "\n");
  await nc.close();
})();
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _commit_counters(port: int) -> tuple[float, float]:
    """(transactions, write-sets) from a worker's Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("ndo_commits_total ", "ndo_commit_write_sets_sum ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("ndo_commits_total", 0.0), values.get("ndo_commit_write_sets_sum", 0.0)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _start_server(tmp: Path, mapped: bool) -> EmbeddedNatsServer:
    mappings = dict([server_mapping("ndo", PARTITIONS)]) if mapped else None
    server = EmbeddedNatsServer(
        store_dir=tmp / f"nats-{uuid.uuid4().hex[:6]}", port=0, mappings=mappings
    )
    await server.start()
    return server


async def _cluster(server: EmbeddedNatsServer, tmp: Path, lease_ttl: int = 3) -> Cluster:
    nc = await nats.connect(server.url)
    return Cluster(nc, server.url, tmp, partitions=PARTITIONS, lease_ttl=lease_ttl, extra=[])


async def throughput(workers: int, mapped: bool, *, seconds: float = 8.0) -> dict[str, Any]:
    """Counter.increment on 5,000 objects, 2 Node processes x 64 in flight."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        server = await _start_server(tmp, mapped)
        cluster = await _cluster(server, tmp)
        try:
            names = {f"t{i}" for i in range(workers)}
            ports = [_free_port() for _ in names]
            for n, port in zip(sorted(names), ports, strict=True):
                cluster.spawn(n, "--metrics-port", str(port))
            await cluster.settled(names, timeout=60)
            script = tmp / "load.js"
            script.write_text(_NODE_LOAD)
            env = dict(os.environ, NODE_PATH=str(REPO_ROOT / "node_modules"))
            # Warm-up: activate the objects once. The runs block, so they go to a thread.
            await asyncio.to_thread(_run_load, script, env, server.url, 2, 3.0)
            pids = {"workers": [w.pid for w in cluster.workers], "server": [server.pid or 0]}
            results, cpu, commits = await asyncio.to_thread(
                _measured_load, script, env, server.url, seconds, pids, ports
            )
            transactions = sum(c[0] for c in commits)
            ok = sum(r["ok"] for r in results)
            elapsed = max(r["elapsed"] for r in results)
            return {
                "mode": "mapped" if mapped else "forward",
                "workers": workers,
                "requests_per_s": round(ok / elapsed),
                "errors": sum(r["errors"] for r in results),
                "p50_ms": round(max(r["p50"] for r in results), 2),
                "p99_ms": round(max(r["p99"] for r in results), 2),
                "worker_cpu_s_per_1k": round(cpu["workers"] / ok * 1000, 3),
                "server_cpu_s_per_1k": round(cpu["server"] / ok * 1000, 3),
                "commits_per_s": round(transactions / elapsed),
                "write_sets_per_commit": round(
                    sum(c[1] for c in commits) / max(1, transactions), 1
                ),
            }
        finally:
            cluster.kill_all()
            await cluster.nc.close()
            await server.stop()


def _measured_load(
    script: Path,
    env: dict[str, str],
    url: str,
    seconds: float,
    pids: dict[str, list[int]],
    ports: list[int],
) -> tuple[list[dict[str, Any]], dict[str, float], list[tuple[float, float]]]:
    """Two Node generators x 64 in flight; CPU and commit counters sampled around the run."""
    loads = [
        subprocess.Popen(
            ["node", str(script), url, "5000", "64", str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    for proc in loads:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    before = {k: sum(_cpu(p) for p in v) for k, v in pids.items()}
    commits_before = [_commit_counters(port) for port in ports]
    for proc in loads:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    results = [json.loads(proc.communicate()[0].decode().splitlines()[-1]) for proc in loads]
    cpu = {k: sum(_cpu(p) for p in v) - before[k] for k, v in pids.items()}
    commits = [
        (a[0] - b[0], a[1] - b[1])
        for a, b in zip([_commit_counters(port) for port in ports], commits_before, strict=True)
    ]
    return results, cpu, commits


def _run_load(script: Path, env: dict[str, str], url: str, procs: int, seconds: float) -> None:
    loads = [
        subprocess.Popen(
            ["node", str(script), url, "5000", "16", str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(procs)
    ]
    for proc in loads:
        assert proc.stdout is not None
        proc.stdout.readline()
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    for proc in loads:
        proc.communicate()


class _Callers:
    """Python callers with idempotent retries; records failures, retries and the longest call."""

    def __init__(self, nc: Any, ids: list[str]) -> None:
        self.nc, self.ids = nc, ids
        self.ok = self.retries = self.failed = 0
        self.longest = 0.0
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self._run(i)) for i in ids for _ in range(2)]

    async def _run(self, object_id: str) -> None:
        while not self.stop.is_set():
            key, started, attempt = uuid.uuid4().hex, time.monotonic(), 0
            while True:
                attempt += 1
                try:
                    msg = await self.nc.request(
                        f"ndo.rpc.Counter.{object_id}.increment",
                        b"",
                        timeout=1.5,
                        headers={"Idempotency-Key": key},
                    )
                    if not (msg.headers and "Nats-Service-Error-Code" in msg.headers):
                        break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    pass
                if attempt >= 40:
                    self.failed += 1
                    break
                self.retries += 1
                await asyncio.sleep(min(0.02 * 2**attempt, 0.3))
            self.ok += 1
            self.longest = max(self.longest, time.monotonic() - started)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def handover(kind: str, mapped: bool, lease_ttl: int = 3) -> dict[str, Any]:
    """One move under load: ``graceful`` (SIGTERM), ``kill`` (-9) or ``join`` (a new worker)."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        server = await _start_server(tmp, mapped)
        cluster = await _cluster(server, tmp, lease_ttl)
        try:
            first = cluster.spawn("a")
            await cluster.settled({"a"}, timeout=60)
            if kind != "join":
                cluster.spawn("b")
                await cluster.settled({"a", "b"}, timeout=60)
            callers = _Callers(cluster.nc, one_object_per_partition("Counter", PARTITIONS, "h"))
            await asyncio.sleep(1.5)
            began = time.monotonic()
            if kind == "graceful":
                first.signal(signal.SIGTERM)
                await cluster.settled({"b"}, timeout=60)
            elif kind == "kill":
                first.signal(signal.SIGKILL)
                await cluster.settled({"b"}, timeout=60)
            else:
                cluster.spawn("b")
                await cluster.settled({"a", "b"}, timeout=60)
            moved = time.monotonic() - began
            await asyncio.sleep(1.0)
            await callers.finish()
            return {
                "kind": kind,
                "mode": "mapped" if mapped else "forward",
                "lease_ttl": lease_ttl,
                "move_ms": round(moved * 1000),
                "calls": callers.ok,
                "retried_tries": callers.retries,
                "failed_calls": callers.failed,
                "longest_call_ms": round(callers.longest * 1000),
            }
        finally:
            cluster.kill_all()
            await cluster.nc.close()
            await server.stop()


async def main(what: str) -> None:
    if what in ("throughput", "all"):
        for mapped in (False, True):
            for workers in (1, 2, 3):
                print(json.dumps(await throughput(workers, mapped)), flush=True)
    if what in ("handover", "all"):
        for kind in ("graceful", "kill", "join"):
            for mapped in (False, True):
                for _ in range(3):
                    print(json.dumps(await handover(kind, mapped)), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "all"))
