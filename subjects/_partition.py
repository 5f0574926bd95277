"""Which partition an object belongs to.

Matches nats-server's subject-mapping ``partition(N, class, id)`` function exactly (FNV-1a 32-bit
over the class and id tokens concatenated without a separator, modulo N), so a client, a worker
and the server all agree on an object's partition. Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_PARTITIONS",
    "JOURNAL_SHARDS",
    "fnv1a_32",
    "journal_shard",
    "journal_shard_of_partition",
    "partition_of",
]

DEFAULT_PARTITIONS: Final = 64
"""Partition count of a deployment when none is configured."""

JOURNAL_SHARDS: Final = 16
"""Subjects the journal is spread over (fixed, whatever a deployment's partition count): a
journal message holds records of one shard's objects, and replay reads one shard."""

_FNV_OFFSET: Final = 0x811C9DC5
_FNV_PRIME: Final = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """FNV-1a 32-bit hash of ``data`` (the hash nats-server's ``partition()`` uses)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(class_name: str, object_id: str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """Return the partition (``0..partitions-1``) of object ``(class_name, object_id)``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return fnv1a_32((class_name + object_id).encode("utf-8")) % partitions


def journal_shard(class_name: str, object_id: str) -> int:
    """Return the journal shard (``0..JOURNAL_SHARDS-1``) of object ``(class_name, object_id)``."""
    return partition_of(class_name, object_id, JOURNAL_SHARDS)


def journal_shard_of_partition(partition: int, partitions: int) -> int | None:
    """The journal shard of every object of ``partition``, or None when the partition count is
    not a positive multiple of ``JOURNAL_SHARDS`` (then objects of one partition may differ).

    ``hash % partitions % SHARDS == hash % SHARDS`` whenever SHARDS divides ``partitions``, so a
    worker can find an object's shard from its partition without hashing again.
    """
    if partitions <= 0 or partitions % JOURNAL_SHARDS:
        return None
    return partition % JOURNAL_SHARDS
