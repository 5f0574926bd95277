"""Which worker should hold which partition: a pure function every worker computes alike.

Kept apart from the lease machinery because it has no I/O and no state: given the same live
members, every worker derives the same assignment, so they agree without talking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable

__all__ = ["assign_partitions", "partitions_text"]


def _score(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{member}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_partitions(members: Collection[str], partitions: int) -> dict[int, str]:
    """The partition -> member assignment every worker computes from the same member set.

    Rendezvous hashing with a load cap: pairs (member, partition) are taken in order of their
    hash score, each partition going to the best-scoring member that still has room (every
    member gets ``partitions // members`` or one more). Deterministic, balanced to within one
    partition, and a change of membership moves little more than the share of the member that
    came or went.
    """
    if not members:
        return {}
    ordered = sorted(members)
    floor, extra = divmod(partitions, len(ordered))
    pairs = sorted(((_score(m, p), p, m) for m in ordered for p in range(partitions)), reverse=True)
    load = dict.fromkeys(ordered, 0)
    owner: dict[int, str] = {}
    for _, p, m in pairs:
        if p in owner:
            continue
        if load[m] < floor:
            owner[p] = m
            load[m] += 1
        elif load[m] == floor and extra:
            owner[p] = m
            load[m] += 1
            extra -= 1
    return owner


def partitions_text(partitions: Iterable[int]) -> str:
    """``0-3,7,9-10``: a compact list of partition numbers for people."""
    ordered = sorted(partitions)
    runs: list[str] = []
    start = prev = None
    for p in ordered:
        if start is None:
            start = prev = p
        elif prev is not None and p == prev + 1:
            prev = p
        else:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = p
    if start is not None:
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(runs) or "-"
