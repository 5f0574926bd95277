"""Pre-populating the worker's SQLite file with the read, cold and idle-memory objects.

Written straight through ``SqliteStorage.commit`` in big batches before any worker starts: far
faster than creating the objects with requests, and not part of what is measured.
"""

from __future__ import annotations

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

__all__ = ["prepopulate"]

_LOADER_BATCH: Final = 10_000


async def prepopulate(data_dir: Path, plan: BenchPlan) -> None:
    """Write the read, cold and idle-memory objects straight into the worker's SQLite file."""
    groups: list[tuple[str, int]] = []
    if "read" in plan.scenarios:
        groups.append((READ_IDS, plan.objects))
    if "cold" in plan.scenarios:
        groups.append((COLD_IDS, plan.cold_objects))
    if "idle-memory" in plan.scenarios:
        groups.append((IDLE_IDS, 2 * plan.idle_objects + IDLE_WARM_OBJECTS))
    storage = SqliteStorage(data_dir / "ndo.sqlite3", partitions=plan.partitions)
    await storage.open()
    try:
        epochs = await storage.claim_partitions(range(plan.partitions), "ndo-bench-loader")
        encode = msgspec.msgpack.Encoder().encode
        for prefix, count in groups:
            for start in range(0, count, _LOADER_BATCH):
                batch = []
                for number in range(start, min(count, start + _LOADER_BATCH)):
                    object_id = f"{prefix}{number}"
                    part = partition_of(CLASS, object_id, plan.partitions)
                    batch.append(
                        ObjectWrite(
                            class_name=CLASS,
                            object_id=object_id,
                            partition=part,
                            epoch=epochs[part],
                            writes={VALUE_KEY: encode(stored_value(number))},
                        )
                    )
                fenced = await storage.commit(batch)
                if fenced:
                    raise BenchError(f"pre-populating storage was fenced on {sorted(fenced)}")
    finally:
        await storage.close()
