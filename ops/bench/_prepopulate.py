"""Pre-populating storage with the read, cold and idle-memory objects, before any worker starts.

Written straight through ``SqliteStorage.commit`` in big batches (local storage) or appended
straight to the partition logs (replicated storage, ``_log_loader``): far faster than creating
the objects with requests, and not part of what is measured. ``stored_objects`` is the one list
both write, so every storage mode serves the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

from ndo.ops._errors import BenchError
from ndo.ops.bench._objects import (
    CLASS,
    COLD_IDS,
    IDLE_IDS,
    IDLE_WARM_OBJECTS,
    READ_IDS,
    VALUE_KEY,
    stored_value,
)
from ndo.ops.bench._plan import BenchPlan
from ndo.storage import ObjectWrite, SqliteStorage
from ndo.subjects import partition_of

__all__ = ["prepopulate", "stored_objects"]

_LOADER_BATCH: Final = 10_000


def stored_objects(plan: BenchPlan, epochs: dict[int, int] | None = None) -> Iterator[ObjectWrite]:
    """The write-set of every pre-populated object the plan's scenarios read, at the epoch of its
    partition in ``epochs`` (0 for all without it)."""
    groups: list[tuple[str, int]] = []
    if "read" in plan.scenarios:
        groups.append((READ_IDS, plan.objects))
    if "cold" in plan.scenarios:
        groups.append((COLD_IDS, plan.cold_objects))
    if "idle-memory" in plan.scenarios:
        groups.append((IDLE_IDS, 2 * plan.idle_objects + IDLE_WARM_OBJECTS))
    encode = msgspec.msgpack.Encoder().encode
    for prefix, count in groups:
        for number in range(count):
            object_id = f"{prefix}{number}"
            part = partition_of(CLASS, object_id, plan.partitions)
            yield ObjectWrite(
                class_name=CLASS,
                object_id=object_id,
                partition=part,
                epoch=epochs[part] if epochs is not None else 0,
                writes={VALUE_KEY: encode(stored_value(number))},
            )


async def prepopulate(data_dir: Path, plan: BenchPlan) -> None:
    """Write the read, cold and idle-memory objects straight into the worker's SQLite file."""
    storage = SqliteStorage(data_dir / "ndo.sqlite3", partitions=plan.partitions)
    await storage.open()
    try:
        epochs = await storage.claim_partitions(range(plan.partitions), "ndo-bench-loader")
        batch: list[ObjectWrite] = []
        for write in stored_objects(plan, epochs):
            batch.append(write)
            if len(batch) >= _LOADER_BATCH:
                await _commit(storage, batch)
                batch = []
        await _commit(storage, batch)
    finally:
        await storage.close()


async def _commit(storage: SqliteStorage, batch: list[ObjectWrite]) -> None:
    if not batch:
        return
    fenced = await storage.commit(batch)
    if fenced:
        raise BenchError(f"pre-populating storage was fenced on {sorted(fenced)}")
