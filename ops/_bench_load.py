"""The processes ``ndo bench`` drives: load generators and the raw-NATS baseline responder.

Kept apart from the harness (``ndo.ops._bench``) because everything here runs in *other* processes:
the harness spawns them, talks to them over stdin/stdout and measures their CPU from ``/proc``.

Load generator protocol (the same for the Node.js and the Python generator, so the baseline and
ndo are always driven by the same code):

1. the harness writes one JSON line, a :class:`LoadJob`;
2. the generator connects, builds its subjects and prints ``ready``;
3. the harness writes ``go`` (after sampling CPU counters), the generator runs the job and prints
   one JSON line, a :class:`LoadResult`;
4. the harness samples CPU again and closes stdin; the generator exits.

A job either runs ``duration`` seconds picking objects at random (``mode="random"``), or touches
each of its ``count`` objects once, in order (``mode="once"``), bounded by ``duration`` too. Every
reply must be a JSON number (Counter ``get``/``increment`` and the baseline both answer one); the
generator keeps, per object, the number of numeric replies and their sum, and counts replies that
did not increase per object when ``increasing`` is set (an object's replies leave in commit
order, so one connection must see them strictly increasing). The harness turns those into the
correctness check. Latencies go into a log histogram with 1% wide buckets.

The Node.js generator needs ``node`` and the ``nats`` npm package (``node_modules`` after
``npm install`` at the repository root); one Node process costs the machine several times
less CPU per request than a nats-py requester, which matters on two cores.

Run ``python -m ndo.ops._bench_load generate`` (the Python generator) or
``python -m ndo.ops._bench_load baseline URL SUBJECT`` (the baseline responder).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import sys
import time
from typing import Final, Literal

import msgspec
import nats
import nats.errors
from nats.aio.msg import Msg

from ndo.ops._loop import run as run_on_loop

__all__ = [
    "BASELINE_QUEUE_GROUP",
    "HISTOGRAM_BASE",
    "NODE_GENERATOR_JS",
    "LoadJob",
    "LoadResult",
    "bucket_value_ms",
    "main",
]

HISTOGRAM_BASE: Final = 1.01
"""Latency bucket ``k`` holds latencies in ``[BASE**k, BASE**(k+1))`` microseconds."""

BASELINE_QUEUE_GROUP: Final = "ndo-bench-baseline"
"""Queue group of the baseline responder (mirrors the worker's queue subscription)."""

_ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
_PENDING_MSGS_LIMIT: Final = 1_000_000
_PENDING_BYTES_LIMIT: Final = 512 * 1024 * 1024


class LoadJob(msgspec.Struct, frozen=True, kw_only=True):
    """What one load generator process does (written to its stdin as one JSON line)."""

    url: str
    """NATS server URL."""
    subject: str
    """Request subject with ``{id}`` where the object id goes, e.g. ``ndo.rpc.Counter.{id}.get``."""
    id_prefix: str
    """Object ids are ``f"{id_prefix}{first + k}"`` for ``k`` in ``range(count)``."""
    first: int
    """Number of the generator's first object."""
    count: int
    """How many objects (the per-object arrays of the result have this length)."""
    body: str
    """Request body (JSON text)."""
    inflight: int
    """Requests kept in flight by this process."""
    mode: Literal["random", "once"]
    """``random``: pick objects at random for ``duration`` s; ``once``: each object once."""
    duration: float
    """Seconds to run (``random``), or the most seconds to take (``once``)."""
    timeout_ms: int
    """Per-request timeout in milliseconds."""
    increasing: bool
    """Count per-object replies that are not larger than the previous one."""
    seed: int
    """Seed of the object picker (``random`` mode)."""


class LoadResult(msgspec.Struct, kw_only=True):
    """What a generator reports after its run (one JSON line on stdout)."""

    ok: int = 0
    """Successful replies."""
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    """Failed requests by kind: an error code (``503``), ``timeout``, ``no_responders``..."""
    elapsed: float = 0.0
    """Seconds from ``go`` to the last reply."""
    hist: dict[int, int] = msgspec.field(default_factory=dict)
    """Latency histogram: bucket (see ``HISTOGRAM_BASE``) -> count."""
    obj_n: list[int] = msgspec.field(default_factory=list)
    """Numeric replies per object."""
    obj_sum: list[int] = msgspec.field(default_factory=list)
    """Sum of the numeric replies per object."""
    violations: int = 0
    """Replies that did not increase for their object (``increasing`` jobs)."""
    fatal: str | None = None
    """Set when the generator itself failed (could not connect, ...)."""


def bucket_value_ms(bucket: int) -> float:
    """Representative latency of a histogram bucket (its geometric middle), in milliseconds."""
    return float(HISTOGRAM_BASE ** (bucket + 0.5) / 1000.0)


def _bucket(latency_us: float) -> int:
    return int(math.log(max(latency_us, 1.0)) / _LOG_BASE)


_LOG_BASE: Final = math.log(HISTOGRAM_BASE)

NODE_GENERATOR_JS: Final = r"""
"use strict";
// ndo bench load generator for Node.js: the protocol is described in ops/_bench_load.py.
const { connect, ErrorCode } = require("nats");
const readline = require("readline");

const queued = [];
let waiting = null;
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (waiting) { const w = waiting; waiting = null; w(line); } else { queued.push(line); }
}).on("close", () => { if (waiting) { const w = waiting; waiting = null; w(null); } });
function nextLine() {
  return queued.length ? Promise.resolve(queued.shift()) : new Promise((r) => { waiting = r; });
}

const LOG_BASE = Math.log(@BASE@);
const ERROR_HEADER = "@HEADER@";

async function main() {
  const job = JSON.parse(await nextLine());
  const nc = await connect({ servers: job.url, reconnect: false, timeout: 10000, noEcho: true });
  const [head, tail] = job.subject.split("{id}");
  const subjects = new Array(job.count);
  for (let k = 0; k < job.count; k++) {
    subjects[k] = head + job.id_prefix + (job.first + k) + tail;
  }
  const body = new TextEncoder().encode(job.body);
  const decoder = new TextDecoder();
  const objN = new Array(job.count).fill(0);
  const objSum = new Array(job.count).fill(0);
  const last = new Float64Array(job.count).fill(-Infinity);
  const hist = new Map();
  const errors = {};
  let ok = 0;
  let violations = 0;
  let seed = (job.seed >>> 0) || 1;
  function pick() {
    seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0;
    return seed % job.count;
  }
  function fail(kind) { errors[kind] = (errors[kind] || 0) + 1; }
  process.stdout.write("ready\n");
  if ((await nextLine()) === null) { await nc.close(); return; }
  const start = performance.now();
  const deadline = start + job.duration * 1000;
  let cursor = 0;
  let finished = start;
  async function lane() {
    for (;;) {
      const now = performance.now();
      if (now >= deadline) { return; }
      let k;
      if (job.mode === "once") {
        if (cursor >= job.count) { return; }
        k = cursor++;
      } else {
        k = job.count === 1 ? 0 : pick();
      }
      try {
        const msg = await nc.request(subjects[k], body, { timeout: job.timeout_ms });
        const done = performance.now();
        finished = done;
        const code = msg.headers ? msg.headers.get(ERROR_HEADER) : "";
        if (code) { fail(code); continue; }
        const value = JSON.parse(decoder.decode(msg.data));
        if (typeof value !== "number") { fail("not_a_number"); continue; }
        ok++;
        const bucket = Math.floor(Math.log(Math.max((done - now) * 1000, 1)) / LOG_BASE);
        hist.set(bucket, (hist.get(bucket) || 0) + 1);
        objN[k]++;
        objSum[k] += value;
        if (job.increasing) { if (value <= last[k]) { violations++; } last[k] = value; }
      } catch (err) {
        finished = performance.now();
        if (err.code === ErrorCode.Timeout) { fail("timeout"); }
        else if (err.code === ErrorCode.NoResponders) { fail("no_responders"); }
        else { fail("client_error"); }
      }
    }
  }
  const lanes = [];
  for (let i = 0; i < job.inflight; i++) { lanes.push(lane()); }
  await Promise.all(lanes);
  const result = {
    ok, errors, elapsed: (finished - start) / 1000, hist: Object.fromEntries(hist),
    obj_n: objN, obj_sum: objSum, violations,
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  await nc.close();
  await nextLine();  // stay alive (for the harness's CPU sample) until stdin closes
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ fatal: String(err && err.stack || err) }) + "\n");
  process.exitCode = 1;
});
""".replace("@BASE@", repr(HISTOGRAM_BASE)).replace("@HEADER@", _ERROR_CODE_HEADER)
"""Source of the Node.js generator; the harness writes it to its run directory (CommonJS, so
``NODE_PATH`` can point at a ``node_modules`` that holds the ``nats`` package)."""


# Python generator


async def _generate(job: LoadJob, lines: asyncio.Queue[str | None]) -> LoadResult:
    nc = await nats.connect(
        job.url, connect_timeout=10, allow_reconnect=False, max_reconnect_attempts=0
    )
    try:
        head, _, tail = job.subject.partition("{id}")
        subjects = [f"{head}{job.id_prefix}{job.first + k}{tail}" for k in range(job.count)]
        body = job.body.encode()
        result = LoadResult(obj_n=[0] * job.count, obj_sum=[0] * job.count)
        last = [-math.inf] * job.count
        hist = result.hist
        errors = result.errors
        rng = random.Random(job.seed)
        cursor = 0
        print("ready", flush=True)
        if await lines.get() is None:
            return result
        start = time.perf_counter()
        deadline = start + job.duration
        finished = start

        async def lane() -> None:
            nonlocal cursor, finished
            while True:
                now = time.perf_counter()
                if now >= deadline:
                    return
                if job.mode == "once":
                    if cursor >= job.count:
                        return
                    k = cursor
                    cursor += 1
                else:
                    k = 0 if job.count == 1 else rng.randrange(job.count)
                try:
                    msg = await nc.request(subjects[k], body, timeout=job.timeout_ms / 1000)
                except nats.errors.NoRespondersError:
                    errors["no_responders"] = errors.get("no_responders", 0) + 1
                    finished = time.perf_counter()
                    continue
                except nats.errors.TimeoutError:
                    errors["timeout"] = errors.get("timeout", 0) + 1
                    finished = time.perf_counter()
                    continue
                done = finished = time.perf_counter()
                code = msg.headers.get(_ERROR_CODE_HEADER) if msg.headers else None
                if code:
                    errors[code] = errors.get(code, 0) + 1
                    continue
                try:
                    value = msgspec.json.decode(msg.data)
                except msgspec.DecodeError:
                    value = None
                if not isinstance(value, int) or isinstance(value, bool):
                    errors["not_a_number"] = errors.get("not_a_number", 0) + 1
                    continue
                result.ok += 1
                bucket = _bucket((done - now) * 1e6)
                hist[bucket] = hist.get(bucket, 0) + 1
                result.obj_n[k] += 1
                result.obj_sum[k] += value
                if job.increasing:
                    if value <= last[k]:
                        result.violations += 1
                    last[k] = value

        async with asyncio.TaskGroup() as group:
            for _ in range(job.inflight):
                group.create_task(lane())
        result.elapsed = finished - start
        return result
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()


async def _read_lines(queue: asyncio.Queue[str | None]) -> None:
    """Feed stdin lines into ``queue`` (``None`` at EOF) without blocking the event loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        queue.put_nowait(line.decode().strip())
    queue.put_nowait(None)


async def _generate_main() -> int:
    lines: asyncio.Queue[str | None] = asyncio.Queue(maxsize=0)  # at most 3 lines ever arrive
    feeder = asyncio.create_task(_read_lines(lines))
    first = await lines.get()
    if first is None:
        return 2
    job = msgspec.json.decode(first, type=LoadJob)
    try:
        result = await _generate(job, lines)
    except (OSError, nats.errors.Error) as exc:
        result = LoadResult(fatal=f"{type(exc).__name__}: {exc}")
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            while await lines.get() is not None:
                pass
    feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder
    return 0 if result.fatal is None else 1


# Baseline responder


class _BaselineArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    by: int = 1


async def _baseline_main(url: str, subject: str) -> int:
    """Answer every request on ``subject`` with its decoded ``by`` re-encoded; nothing else."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(url, connect_timeout=10, allow_reconnect=False)
    decoder = msgspec.json.Decoder(_BaselineArgs)
    encoder = msgspec.json.Encoder()

    async def _handle_request(msg: Msg) -> None:
        args = decoder.decode(msg.data or b"{}")
        await nc.publish(msg.reply, encoder.encode(args.by))

    await nc.subscribe(
        subject,
        queue=BASELINE_QUEUE_GROUP,
        cb=_handle_request,
        pending_msgs_limit=_PENDING_MSGS_LIMIT,
        pending_bytes_limit=_PENDING_BYTES_LIMIT,
    )
    await nc.flush()
    print("ready", flush=True)
    await stop.wait()
    with contextlib.suppress(nats.errors.Error, OSError):
        await nc.drain()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ndo.ops._bench_load {generate | baseline URL SUBJECT}``."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["generate"]:
        return asyncio.run(_generate_main())
    if len(args) == 3 and args[0] == "baseline":
        # The same event loop as `ndo serve` picks in this environment (NDO_LOOP, default auto),
        # so the baseline and the worker are compared on equal terms.
        return run_on_loop(_baseline_main(args[1], args[2]), os.environ.get("NDO_LOOP", "auto"))
    print(
        "usage: python -m ndo.ops._bench_load generate | baseline NATS_URL SUBJECT",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
