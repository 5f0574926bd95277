"""The Python load generator (nats-py), the fallback when the Node.js one is unavailable.

Runs in its own process: ``python -m ndo.ops.bench._python_generator``, then the protocol of
``ndo.ops.bench._protocol`` on stdin and stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time

import msgspec
import nats
import nats.errors

from ndo.ops.bench._protocol import ERROR_CODE_HEADER, LoadJob, LoadResult, latency_bucket

__all__ = ["main"]


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
                code = msg.headers.get(ERROR_CODE_HEADER) if msg.headers else None
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
                bucket = latency_bucket((done - now) * 1e6)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ndo.ops.bench._python_generator`` (takes no arguments)."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m ndo.ops.bench._python_generator", file=sys.stderr)
        return 2
    return asyncio.run(_generate_main())


if __name__ == "__main__":
    raise SystemExit(main())
