"""Replicated storage: how long restore, hand-over and failover take (not a test; run it by hand).
The numbers are quoted in docs/benchmarks.md, "Replicated storage (issue 11)".

    python -m tests.bench_replicated restore    # a fresh worker (empty data dir) catches up:
                                                #   1k/10k/50k log records, 10k/100k keys
                                                #   from a snapshot; R1 and R3
    python -m tests.bench_replicated handover   # kill -9 of a holder, its data dir deleted:
                                                #   time until the other worker commits
    python -m tests.bench_replicated failover   # kill -9 of the nats-server leading NDO_LOG
                                                #   (R3): time until commits succeed again
    python -m tests.bench_replicated all        # (--help: sizes, repeats, --keep)

Everything runs on 127.0.0.1 in a temporary directory: nats-servers started by the script (one
for R1, a 3-server cluster for R3, ``ndo.ops.bench._servers``) and real ``ndo serve --storage
replicated`` processes, each with its own data directory. Partition logs are filled straight
through JetStream by ``ndo.ops.bench._log_loader`` (the record format a worker writes, no worker
running), so a 50,000-record log takes seconds, not a 50,000-commit run.

The clocks: *restore* is the worker's own "partition caught up from its log" line (its
``seconds`` cover reading the log, restoring a snapshot and applying, not process start-up);
the wall time from spawn to serving every partition is printed next to it. *Hand-over* and
*failover* are what callers see: probe loops (two per partition, each an ``increment()`` with an
``Idempotency-Key``, retried every 20 ms until it succeeds) record when each partition first
commits again with a request sent after the kill. At the end every probe counter must equal its
acknowledged increments: nothing acknowledged was lost, nothing applied twice.

Every case is bounded in time (``_CASE_TIMEOUT``) and in size (the flags' defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from ndo.ops import configure_logging
from ndo.ops.bench import BenchPlan
from ndo.ops.bench._log_loader import LogLoader
from ndo.ops.bench._processes import Worker, start_worker
from ndo.ops.bench._protocol import ERROR_CODE_HEADER
from ndo.ops.bench._servers import NatsServers
from ndo.ops.bench._storage_modes import StorageMode, storage_mode
from ndo.service import ReplicatedStorage, log_stream_name, read_bucket
from ndo.storage import ObjectWrite
from ndo.subjects import partition_of

CLASS: Final = "Counter"
_VALUE_KEY: Final = "value"
_CASE_TIMEOUT: Final = 120.0
"""Seconds one hand-over or failover may take before the case is reported as not recovered."""
_START_TIMEOUT: Final = 300.0
"""Seconds a worker may take to serve every partition (it restores them first)."""
_SNAPSHOT_CHUNK: Final = 500
"""Write-sets per log record when a partition is filled to be snapshotted."""
_encode = msgspec.msgpack.Encoder().encode


def _progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def ids_in(partition: int, count: int, partitions: int, tag: str) -> list[str]:
    """``count`` object ids of class ``Counter`` that fall into ``partition``."""
    ids: list[str] = []
    number = 0
    while len(ids) < count:
        object_id = f"{tag}{number}"
        if partition_of(CLASS, object_id, partitions) == partition:
            ids.append(object_id)
        number += 1
    return ids


def counter_write(object_id: str, partition: int, value: int) -> ObjectWrite:
    """A write-set setting a counter's value (what ``increment()`` commits)."""
    return ObjectWrite(
        class_name=CLASS,
        object_id=object_id,
        partition=partition,
        epoch=0,
        writes={_VALUE_KEY: _encode(value)},
    )


class Site:
    """One storage mode's nats-servers, the script's connection, and a directory for data."""

    def __init__(self, mode: StorageMode, root: Path, partitions: int) -> None:
        self.mode = mode
        self.root = root / mode.name
        self.partitions = partitions
        if mode.servers > 1:
            self.servers = NatsServers.cluster(self.root / "nats", mode.servers)
        else:
            self.servers = NatsServers.single(self.root / "nats", jetstream=True)
        self._nc: NatsClient | None = None
        self._cases = 0

    @property
    def nc(self) -> NatsClient:
        assert self._nc is not None
        return self._nc

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        await self.servers.start()
        self._nc = await nats.connect(
            servers=[s.url for s in self.servers.servers],
            connect_timeout=5,
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
        )
        _progress(f"{self.mode.name}: {self.servers.url} up in {time.monotonic() - started:.1f}s")

    async def stop(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.close()
        await self.servers.stop()

    def new_prefix(self, kind: str) -> str:
        """A fresh deployment prefix: its own log stream, snapshots and lease bucket."""
        self._cases += 1
        return f"{kind}{self._cases}"

    async def worker(
        self, prefix: str, name: str, *, url: str | None = None, **flags: Any
    ) -> tuple[Worker, float]:
        """Start a replicated worker of deployment ``prefix`` with an empty data directory
        (``url``: its ``--nats-url``, default every server); return it and the seconds from
        spawn to serving every partition."""
        plan = BenchPlan(partitions=self.partitions)
        started = time.monotonic()
        worker = await start_worker(
            f"{prefix}-{name}",
            url or self.servers.url,
            self.data_dir(prefix, name),
            self.root,
            plan,
            self.nc,
            start_timeout=_START_TIMEOUT,
            prefix=prefix,
            storage="replicated",
            replicas=self.mode.replicas,
            worker_name=name,
            log_level="info",
            **flags,
        )
        return worker, time.monotonic() - started

    def data_dir(self, prefix: str, name: str) -> Path:
        return self.root / f"data-{prefix}-{name}"

    async def get(self, prefix: str, object_id: str) -> int:
        msg = await self.nc.request(f"{prefix}.rpc.{CLASS}.{object_id}.get", b"", timeout=10)
        if msg.headers and msg.headers.get(ERROR_CODE_HEADER):
            raise RuntimeError(f"get() of {object_id} failed: {msg.data!r}")
        return int(msgspec.json.decode(msg.data))


def worker_events(worker: Worker, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines whose event is ``event``."""
    found = []
    for line in worker.child.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def catch_up_of(worker: Worker, partitions: set[int]) -> tuple[int, float]:
    """Records the worker's last logged catch-up of each of ``partitions`` applied, and the wall
    seconds from the first of those catch-ups starting to the last one ending (a worker
    restores partitions concurrently)."""
    last: dict[int, dict[str, Any]] = {}
    for record in worker_events(worker, "partition caught up from its log"):
        if record.get("partition") in partitions:
            last[int(record["partition"])] = record
    if not last:
        return 0, 0.0
    ends = [dt.datetime.fromisoformat(r["timestamp"]).timestamp() for r in last.values()]
    starts = [end - float(r["seconds"]) for end, r in zip(ends, last.values(), strict=True)]
    return sum(int(r["records"]) for r in last.values()), max(ends) - min(starts)


# Restore


async def restore_case(site: Site, *, records: int = 0, keys: int = 0) -> dict[str, Any]:
    """Partition 0 holds ``records`` log records of one write-set each (over up to 1,000
    counters), or ``keys`` counters restored from a snapshot; a fresh worker catches up."""
    prefix = site.new_prefix("rs")
    loader = LogLoader(site.nc, prefix, replicas=site.mode.replicas)
    await loader.open()
    started = time.monotonic()
    check: tuple[str, int] | None
    if keys:
        objects = ids_in(0, keys, site.partitions, "k")
        writes = [counter_write(oid, 0, i) for i, oid in enumerate(objects)]
        chunks = [writes[i : i + _SNAPSHOT_CHUNK] for i in range(0, keys, _SNAPSHOT_CHUNK)]
        await loader.append(0, chunks)
        check = (objects[-1], keys - 1)
    else:
        objects = ids_in(0, min(max(records, 1), 1_000), site.partitions, "o")
        await loader.append(
            0, ([counter_write(objects[i % len(objects)], 0, i)] for i in range(records))
        )
        check = (objects[(records - 1) % len(objects)], records - 1) if records else None
    fill = time.monotonic() - started
    snapshot_s = None
    if keys:
        snapshot_s = await _snapshot_partition_zero(site, prefix)
    worker, ready = await site.worker(prefix, "fresh")
    try:
        if check is not None:
            value = await site.get(prefix, check[0])
            if value != check[1]:
                raise RuntimeError(f"{check[0]} = {value} after the restore, expected {check[1]}")
        applied, seconds = catch_up_of(worker, {0})
        snapshots = worker_events(worker, "partition restored from its snapshot")
    finally:
        await worker.child.stop()
    return {
        "case": "restore",
        "storage": site.mode.name,
        "log_records": records,
        "snapshot_keys": keys,
        "fill_s": round(fill, 2),
        "fill_records_per_s": round(loader.appended / fill) if fill and loader.appended else None,
        "snapshot_store_s": None if snapshot_s is None else round(snapshot_s, 2),
        "restored_from_snapshot": bool(snapshots),
        "caught_up_records": applied,
        "catch_up_s": round(seconds, 3),
        "records_per_s": round(applied / seconds) if applied and seconds else None,
        "keys_per_s": round(keys / seconds) if keys and seconds else None,
        "ready_s": round(ready, 2),
    }


async def _snapshot_partition_zero(site: Site, prefix: str) -> float:
    """Hold partition 0 in this process (ndo's own ``ReplicatedStorage``), store its snapshot
    and purge its log below it, as a holder does every ``--snapshot-every`` records."""
    holder = ReplicatedStorage(
        site.root / f"holder-{prefix}.sqlite3",
        partitions=site.partitions,
        writer="bench-holder",
        snapshot_every=1_000_000,
        append_timeout=30.0,
    )
    await holder.open()
    try:
        await holder.connect(site.nc, prefix=prefix, replicas=site.mode.replicas)
        await holder.claim_partitions([0], "bench-holder")
        started = time.monotonic()
        if await holder.snapshot(0) is None:
            raise RuntimeError("the snapshot of partition 0 was not stored")
        return time.monotonic() - started
    finally:
        await holder.close()


# Probes: what callers see during a hand-over or a failover


class Probes:
    """Increment loops on one counter per partition, with idempotent retries."""

    def __init__(self, nc: NatsClient, prefix: str, objects: dict[int, str], loops: int = 2):
        self.nc = nc
        self.prefix = prefix
        self.objects = objects
        self.acks = dict.fromkeys(objects, 0)
        self.successes: dict[int, list[tuple[float, float]]] = {p: [] for p in objects}
        self.failed_attempts: dict[str, int] = {}
        """Failed attempts by kind: an error code, ``timeout`` or another client error."""
        self.longest_call = 0.0
        self.stopping = asyncio.Event()
        self.tasks = [
            asyncio.create_task(self._run(p, oid))
            for p, oid in objects.items()
            for _ in range(loops)
        ]

    async def _run(self, partition: int, object_id: str) -> None:
        subject = f"{self.prefix}.rpc.{CLASS}.{object_id}.increment"
        while not self.stopping.is_set():
            key = uuid.uuid4().hex
            began = time.monotonic()
            while True:
                sent = time.monotonic()
                try:
                    msg = await self.nc.request(
                        subject, b'{"by":1}', timeout=1.0, headers={"Idempotency-Key": key}
                    )
                    code = msg.headers.get(ERROR_CODE_HEADER) if msg.headers else None
                    if not code:
                        break
                    kind = str(code)
                except (nats.errors.TimeoutError, TimeoutError):
                    kind = "timeout"
                except nats.errors.Error as exc:
                    kind = type(exc).__name__
                self.failed_attempts[kind] = self.failed_attempts.get(kind, 0) + 1
                if time.monotonic() - began > 2 * _CASE_TIMEOUT:
                    raise RuntimeError(f"{object_id}: no commit for {2 * _CASE_TIMEOUT:g}s")
                await asyncio.sleep(0.02)
            done = time.monotonic()
            self.acks[partition] += 1
            self.successes[partition].append((sent, done))
            self.longest_call = max(self.longest_call, done - began)
            await asyncio.sleep(0.05)

    def recovered(self, since: float) -> dict[int, float | None]:
        """Per partition: seconds from ``since`` until a request sent after it committed."""
        out: dict[int, float | None] = {}
        for partition, done in self.successes.items():
            after = [d for s, d in done if s >= since]
            out[partition] = min(after) - since if after else None
        return out

    async def wait_recovered(self, since: float, partitions: set[int]) -> bool:
        deadline = time.monotonic() + _CASE_TIMEOUT
        while time.monotonic() < deadline:
            got = self.recovered(since)
            if all(got[p] is not None for p in partitions):
                return True
            await asyncio.sleep(0.05)
        return False

    async def finish(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def lost_or_doubled(self, site: Site) -> list[str]:
        """Counters that do not equal their acknowledged increments."""
        problems = []
        for partition, object_id in self.objects.items():
            value = await site.get(self.prefix, object_id)
            if value != self.acks[partition]:
                problems.append(f"{object_id}: {value} != {self.acks[partition]} acknowledged")
        return problems


def _summary(times: dict[int, float | None], parts: set[int]) -> dict[str, Any]:
    values = [times[p] for p in parts]
    known = [v for v in values if v is not None]
    return {
        "recovered": len(known),
        "of": len(values),
        "max_ms": round(max(known) * 1000) if known else None,
        "median_ms": round(statistics.median(known) * 1000) if known else None,
    }


# Hand-over


async def handover_case(site: Site, *, records: int, lease_ttl: int) -> dict[str, Any]:
    """Workers A and B share the partitions (each log holds ``records`` records); A gets
    kill -9 and its data directory is deleted; B takes A's partitions over, restoring them
    from their logs."""
    prefix = site.new_prefix("ho")
    loader = LogLoader(site.nc, prefix, replicas=site.mode.replicas)
    await loader.open()
    for partition in range(site.partitions):
        objects = ids_in(partition, 200, site.partitions, "o")
        await loader.append(
            partition,
            ([counter_write(objects[i % len(objects)], partition, i)] for i in range(records)),
        )
    a, a_ready = await site.worker(prefix, "A", lease_ttl=lease_ttl)
    b, b_ready = await site.worker(prefix, "B", lease_ttl=lease_ttl)
    probes: Probes | None = None
    try:
        holders = await _settled(site, prefix, {"A", "B"})
        a_parts = {p for p, name in holders.items() if name == "A"}
        probe_ids = {p: ids_in(p, 1, site.partitions, "probe")[0] for p in range(site.partitions)}
        probes = Probes(site.nc, prefix, probe_ids)
        await asyncio.sleep(1.5)
        killed = time.monotonic()
        a.child.proc.kill()
        await a.child.proc.wait()
        shutil.rmtree(site.data_dir(prefix, "A"))
        await probes.wait_recovered(killed, a_parts)
        times = probes.recovered(killed)
        await asyncio.sleep(0.5)
        await probes.finish()
        problems = await probes.lost_or_doubled(site)
        restored, restore_s = catch_up_of(b, a_parts)
    finally:
        if probes is not None and not probes.stopping.is_set():
            await probes.finish()
        await a.child.stop()
        await b.child.stop()
    moved = _summary(times, a_parts)
    target = lease_ttl + restore_s + 1.0
    return {
        "case": "handover",
        "storage": site.mode.name,
        "records_per_partition": records,
        "lease_ttl_s": lease_ttl,
        "a_ready_s": round(a_ready, 2),
        "b_ready_s": round(b_ready, 2),
        "moved_partitions": moved,
        "other_partitions_max_ms": _summary(times, set(probe_ids) - a_parts)["max_ms"],
        "b_restored_records": restored,
        "b_restore_s": round(restore_s, 3),
        "target_ms": round(target * 1000),
        "target_met": moved["max_ms"] is not None and moved["max_ms"] <= target * 1000,
        "longest_call_ms": round(probes.longest_call * 1000),
        "failed_attempts": probes.failed_attempts,
        "check": "ok" if not problems else "; ".join(problems[:3]),
    }


async def _settled(site: Site, prefix: str, names: set[str]) -> dict[int, str]:
    """Wait until every partition is leased and every worker in ``names`` holds some, the same
    for one second; return partition -> holder."""
    deadline = time.monotonic() + _CASE_TIMEOUT
    stable_since, last = 0.0, None
    while time.monotonic() < deadline:
        try:
            _, view, _ = await read_bucket(site.nc, prefix)
            holders = {p: lease.name for p, lease in view.leases.items()}
        except (nats.errors.Error, nats.js.errors.Error, OSError):
            holders = {}
        done = len(holders) == site.partitions and set(holders.values()) == names
        if done and holders == last:
            if time.monotonic() - stable_since >= 1.0:
                return holders
        else:
            stable_since, last = time.monotonic(), holders
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the partitions did not settle over {sorted(names)}: {last}")


# Failover


async def failover_round(
    site: Site, prefix: str, *, number: int, kind: str, lease_ttl: int
) -> dict[str, Any]:
    """Kill -9 the server leading the partition log stream under a fresh worker and probes;
    measure until every partition commits again; restart the server.

    ``kind`` places the rest: ``log-leader``: the victim leads the partition log only (the
    lease bucket, journal and snapshots are led by the worker's server, which survives);
    ``all``: the victim also leads every other asset of the deployment and is the server the
    worker is connected to. The probes are connected to a third server in both.
    """
    servers = site.servers.servers
    victim_at = number % len(servers)
    worker_at = victim_at if kind == "all" else (victim_at + 1) % len(servers)
    probe_at = (victim_at + 2) % len(servers)
    victim = servers[victim_at]
    worker, _ = await site.worker(
        prefix, f"W{number}", url=servers[worker_at].url, lease_ttl=lease_ttl
    )
    probe_nc = await nats.connect(servers[probe_at].url, connect_timeout=5)
    tag = f"probe{number}x"  # fresh counters every round
    objects = {p: ids_in(p, 1, site.partitions, tag)[0] for p in range(site.partitions)}
    probes = Probes(probe_nc, prefix, objects)
    try:
        stream = log_stream_name(prefix)
        for name in await _assets(site, prefix):
            target = victim_at if name == stream or kind == "all" else worker_at
            await _move_leader(site, name, f"n{target}")
        leaders = await _assets(site, prefix)
        await asyncio.sleep(2.0)
        events = {e: len(worker_events(worker, e)) for e in _WORKER_EVENTS}
        killed = time.monotonic()
        await victim.kill()
        recovered = await probes.wait_recovered(killed, set(objects))
        times = probes.recovered(killed)
        await asyncio.sleep(0.5)
        await probes.finish()
        result: dict[str, Any] = {
            "case": "failover",
            "storage": site.mode.name,
            "round": number,
            "kind": kind,
            "killed": f"n{victim_at}",
            "it_led": sorted(k for k, v in leaders.items() if v == f"n{victim_at}"),
            "worker_on_killed_server": worker_at == victim_at,
            "all_recovered": recovered,
            "partitions": _summary(times, set(objects)),
            "worker_events": {e: len(worker_events(worker, e)) - n for e, n in events.items()},
            "longest_call_ms": round(probes.longest_call * 1000),
            "failed_attempts": probes.failed_attempts,
        }
        await victim.start()
        for name in leaders:
            await _wait_replicas_current(site, name)
        problems = await probes.lost_or_doubled(site)
        result["check"] = "ok" if not problems else "; ".join(problems[:3])
        return result
    finally:
        if not probes.stopping.is_set():
            await probes.finish()
        with contextlib.suppress(nats.errors.Error, OSError):
            await probe_nc.close()
        await worker.child.stop()
        if not victim.running:
            await victim.start()


async def raw_failover(site: Site, number: int) -> dict[str, Any]:
    """The floor under any ndo failover: kill -9 the leader of a plain R3 stream while a client
    on another server publishes to it; time until a publish is acknowledged again."""
    servers = site.servers.servers
    victim_at = number % len(servers)
    stream = "NDO_BENCH_RAW"
    js = site.nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(stream)
    await js.add_stream(name=stream, subjects=["ndo-bench.raw"], num_replicas=len(servers))
    await _move_leader(site, stream, f"n{victim_at}")
    nc = await nats.connect(servers[(victim_at + 1) % len(servers)].url, connect_timeout=5)
    acked: list[tuple[float, float]] = []
    stop, back = asyncio.Event(), asyncio.Event()
    killed = float("inf")

    async def publish() -> None:
        client = nc.jetstream()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                await client.publish("ndo-bench.raw", b"x", timeout=0.5)
                acked.append((sent, time.monotonic()))
                if sent >= killed:
                    back.set()
                await asyncio.sleep(0.02)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await asyncio.sleep(0.02)

    loops = [asyncio.create_task(publish()) for _ in range(4)]
    victim = servers[victim_at]
    try:
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        await victim.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(back.wait(), _CASE_TIMEOUT)
        after = [d for s, d in acked if s >= killed]
    finally:
        stop.set()
        await asyncio.gather(*loops)
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()
        await victim.start()
    await _wait_replicas_current(site, stream)
    return {
        "case": "failover",
        "storage": site.mode.name,
        "round": number,
        "kind": "raw-stream",
        "killed": f"n{victim_at}",
        "it_led": [stream],
        "worker_on_killed_server": False,
        "all_recovered": bool(after),
        "partitions": {
            "recovered": 1 if after else 0,
            "of": 1,
            "max_ms": round((min(after) - killed) * 1000) if after else None,
            "median_ms": round((min(after) - killed) * 1000) if after else None,
        },
        "worker_events": {},
        "longest_call_ms": None,
        "failed_attempts": {},
        "check": "ok",
    }


_WORKER_EVENTS: Final = (
    "partition lost",
    "giving a partition up",
    "ownership step failed; retrying",
    "disconnected from nats; reconnecting",
)
"""Worker log events a failover round counts (what the worker went through)."""


async def _assets(site: Site, prefix: str) -> dict[str, str]:
    """Each JetStream asset (stream) of deployment ``prefix`` and the server leading it."""
    out: dict[str, str] = {}
    for info in await site.nc.jetstream().streams_info():
        name = info.config.name or ""
        ours = name == log_stream_name(prefix) or prefix in name.lower()
        if ours and info.cluster is not None and info.cluster.leader:
            out[name] = info.cluster.leader
    if log_stream_name(prefix) not in out:
        raise RuntimeError(f"no leader known for {log_stream_name(prefix)}: {out}")
    return out


async def _move_leader(site: Site, stream: str, server: str) -> None:
    """Make ``server`` the leader of ``stream`` (a leader step-down naming it as preferred)."""
    js = site.nc.jetstream()
    for _ in range(10):
        info = await js.stream_info(stream)
        leader = info.cluster.leader if info.cluster else None
        if leader == server:
            return
        request = json.dumps({"placement": {"preferred": server}}).encode()
        await site.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", request, timeout=5)
        for _ in range(100):
            info = await js.stream_info(stream)
            now = info.cluster.leader if info.cluster else None
            if now and now != leader:
                break
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{stream}'s leader did not move to {server}")


async def _wait_replicas_current(site: Site, stream: str) -> None:
    """Wait until every replica of ``stream`` is current again (the restarted server caught up)."""
    deadline = time.monotonic() + _CASE_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            info = await site.nc.jetstream().stream_info(stream)
            peers = info.cluster.replicas if info.cluster else None
            leader = info.cluster.leader if info.cluster else None
            if (
                leader
                and peers
                and len(peers) == 2
                and all(p.current and not p.offline for p in peers)
            ):
                return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{stream} did not get its replicas back")


# Command line


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="ndo-bench-replicated-"))
    results: list[dict[str, Any]] = []

    def emit(result: dict[str, Any]) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)

    sites: dict[str, Site] = {}

    async def site(name: str) -> Site:
        if name not in sites:
            sites[name] = Site(storage_mode(name), root, args.partitions)
            await sites[name].start()
        return sites[name]

    try:
        for _ in range(args.repeat):
            if args.what in ("restore", "all"):
                for name in args.storage.split(","):
                    s = await site(name)
                    for records in [0, *_ints(args.records)]:
                        emit(await restore_case(s, records=records))
                    for keys in _ints(args.keys):
                        emit(await restore_case(s, keys=keys))
            if args.what in ("handover", "all"):
                for name in args.handover_storage.split(","):
                    s = await site(name)
                    for records in _ints(args.handover_records):
                        emit(await handover_case(s, records=records, lease_ttl=args.lease_ttl))
        if args.what in ("failover", "all"):
            s = await site("r3")
            prefix = s.new_prefix("fo")
            for number in range(1, args.rounds + 1):
                kind = ("raw-stream", "log-leader", "all")[(number - 1) % 3]
                if kind == "raw-stream":
                    emit(await raw_failover(s, number))
                    continue
                emit(
                    await failover_round(
                        s, prefix, number=number, kind=kind, lease_ttl=args.lease_ttl
                    )
                )
    finally:
        for s in sites.values():
            await s.stop()
        if args.keep:
            _progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return results


def _iter_rows(results: list[dict[str, Any]]) -> Iterator[str]:
    for r in results:
        if r["case"] == "restore":
            what = (
                f"{r['snapshot_keys']:,} keys (snapshot)"
                if r["snapshot_keys"]
                else f"{r['log_records']:,} records"
            )
            yield (
                f"restore  {r['storage']:<3} {what:<22} catch-up {r['catch_up_s']:>7.3f} s "
                f"({r['records_per_s'] or r['keys_per_s'] or '-'}/s), worker ready "
                f"{r['ready_s']:.2f} s; log filled at {r['fill_records_per_s'] or '-'} records/s"
            )
        elif r["case"] == "handover":
            m = r["moved_partitions"]
            yield (
                f"handover {r['storage']:<3} {r['records_per_partition']:,} records/partition: "
                f"{m['recovered']}/{m['of']} moved partitions back after max {m['max_ms']} ms "
                f"(median {m['median_ms']}), target {r['target_ms']} ms "
                f"(TTL {r['lease_ttl_s']} s + restore {r['b_restore_s']} s + 1 s) "
                f"{'met' if r['target_met'] else 'NOT met'}; check {r['check']}"
            )
        else:
            p = r["partitions"]
            yield (
                f"failover {r['storage']:<3} round {r['round']} ({r['kind']}): killed "
                f"{r['killed']} (leader of {', '.join(r['it_led'])}"
                f"{'; the worker was on it' if r['worker_on_killed_server'] else ''}): "
                f"{p['recovered']}/{p['of']} partitions committing again after max "
                f"{p['max_ms']} ms (median {p['median_ms']}); worker: {r['worker_events']}; "
                f"check {r['check']}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("what", choices=["restore", "handover", "failover", "all"])
    parser.add_argument("--storage", default="r1,r3", help="restore: modes (r1,r3)")
    parser.add_argument("--records", default="1000,10000,50000", help="restore: log lengths")
    parser.add_argument("--keys", default="10000,100000", help="restore: snapshot sizes")
    parser.add_argument("--handover-storage", default="r1", help="handover: modes (r1)")
    parser.add_argument("--handover-records", default="1000,10000", help="records/partition")
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="failover rounds, cycling raw-stream, log-leader, all",
    )
    parser.add_argument("--repeat", type=int, default=1, help="restore and handover repeats")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--lease-ttl", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the directory (worker logs)")
    configure_logging("console", "warning")  # the in-process snapshot holder's info lines
    found = asyncio.run(main(parser.parse_args()))
    print("\n".join(_iter_rows(found)))
