"""The turn path in-process: CPU (or, under callgrind, instructions) per turn, without NATS.

Not a test: a benchmark for the runtime's own cost per turn, free of the network and of the
load generator's noise. A ``Worker`` is built but not started (no NATS): ``Counter`` objects
are activated in its catalog and fed envelopes 64 at a time, as ingress would; replies go
nowhere and journal entries to a counter. Storage is in memory, so a write turn costs the commit
pipeline but no fsync.

    python -m tests.bench_turns get              # CPU per read turn, best of 15 rounds
    python -m tests.bench_turns increment        # CPU per write turn
    python -m tests.bench_turns cold             # a read on an object never seen before (an
                                                 # activation, and an LRU eviction, per turn)

Deterministic counts (this machine's CPU time is noisy): run it under callgrind at two sizes
and divide the difference by the turns between them, with a fixed hash seed::

    for n in 1000 3000; do PYTHONHASHSEED=0 valgrind --tool=callgrind \\
        --callgrind-out-file=/dev/null python -m tests.bench_turns get --turns $n --rounds 2 \\
        2>&1 | grep 'I   refs'; done
    # instructions per turn = (refs at 3000 - refs at 1000) / ((3008 - 1024) * 2)
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Collection

from ndo.examples import Counter
from ndo.service import Envelope, Worker, WorkerConfig
from ndo.service._journal import JournalEntry
from ndo.service._ownership import ServeAll
from ndo.storage import InMemoryStorage, Storage

_OBJECTS = 1000
_BATCH = 64


class _CountingJournal:
    """A journal that only counts entries (every turn records one: the end of a turn)."""

    enabled = True
    reads = True  # every turn records one entry, reads included

    def __init__(self) -> None:
        self.entries = 0
        self._target = 0
        self._reached = asyncio.Event()

    def record(self, entry: JournalEntry) -> None:
        self.entries += 1
        if self.entries >= self._target:
            self._reached.set()

    async def reached(self, target: int) -> None:
        """Wait until ``target`` entries have been recorded."""
        self._target = target
        if self.entries < target:
            self._reached.clear()
            await self._reached.wait()


class _FencesOnly:
    """The PartitionHost of a worker without NATS: fences in storage, no subscriptions."""

    name = "bench"

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def claim(self, partitions: Collection[int], epoch: int | None) -> dict[int, int]:
        return await self._storage.claim_partitions(partitions, self.name, epoch)

    async def subscribe_all(self) -> None:
        """Nothing to subscribe to."""


async def _measure(scenario: str, turns: int, rounds: int) -> float:
    """Best CPU microseconds per turn over ``rounds`` rounds of ``turns`` turns."""
    cold = scenario == "cold"
    method = "get" if cold else scenario
    config = WorkerConfig(partitions=8, max_active=200 if cold else 10_000)
    worker = Worker(config, [Counter], storage=InMemoryStorage())
    await worker.storage.open()
    journal = _CountingJournal()
    services = worker._services
    services.journal = journal
    ownership = ServeAll(_FencesOnly(worker.storage), 8)  # type: ignore[arg-type]
    await ownership.start()
    services.ownership = ownership
    worker.committer.start()
    info = worker.classes["Counter"]
    spec = info.methods[method]
    args = spec.decode_args(b"")
    activations = [worker.catalog.activate(info, f"t{i}") for i in range(_OBJECTS)]

    fresh_ids = iter(range(1 << 62))

    async def run(first: int, count: int) -> int:
        """Run ``count`` turns, rounded up to whole batches; return how many ran."""
        batches = range(first, first + count, _BATCH)
        for start in batches:
            target = journal.entries + _BATCH
            for k in range(start, start + _BATCH):
                if cold:
                    activation = worker.catalog.activate(info, f"c{next(fresh_ids)}")
                else:
                    activation = activations[k % _OBJECTS]
                activation.enqueue(Envelope(spec, args, ""))
            await journal.reached(target)
        return len(batches) * _BATCH

    await run(0, 2 * _OBJECTS)  # every object built once (on_start), caches warm
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        ran = await run(0, turns)
        best = min(best, (time.process_time() - started) / ran * 1e6)
    await worker.committer.stop()
    return best


def main() -> None:
    """``python -m tests.bench_turns SCENARIO [--turns N] [--rounds R]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["get", "increment", "cold"])
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    per_turn = asyncio.run(_measure(args.scenario, args.turns, args.rounds))
    print(f"{args.scenario}: {per_turn:.2f} us CPU per turn (best of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
