"""The correctness checks every scenario ends with.

Pure functions over per-object reply counts and sums, so tests can feed them wrong results.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_increments", "check_reads"]


def check_increments(
    base: Sequence[int], counts: Sequence[int], sums: Sequence[int], final: Sequence[int] | None
) -> list[str]:
    """Check one run of ``increment(by=1)`` calls, object by object.

    With every request acknowledged, the replies to an object starting at ``base`` must be
    exactly ``base+1 .. base+n`` in some order (each increment saw the previous one), so their
    sum is ``n*base + n*(n+1)/2``; and the stored value afterwards is ``base + n``.

    Args:
        base: each object's value before the run.
        counts: acknowledged increments per object.
        sums: sum of the replies per object.
        final: each object's value read after the run, or ``None`` to skip that part.

    Returns:
        A description of each object that fails (empty when all pass).
    """
    problems: list[str] = []
    for i, (b, n, s) in enumerate(zip(base, counts, sums, strict=True)):
        expected = n * b + n * (n + 1) // 2
        if s != expected:
            problems.append(
                f"object #{i}: {n} increments from {b} replied values summing to {s}, "
                f"expected {expected} (lost or duplicated updates)"
            )
        if final is not None and final[i] != b + n:
            problems.append(
                f"object #{i}: value is {final[i]} after {n} acknowledged increments from {b}, "
                f"expected {b + n}"
            )
    return problems


def check_reads(expected: Sequence[int], counts: Sequence[int], sums: Sequence[int]) -> list[str]:
    """Check a run of ``get()`` calls: every reply of object ``i`` equals ``expected[i]``.

    Returns:
        A description of each object that fails (empty when all pass).
    """
    return [
        f"object #{i}: {n} reads summed to {s}, expected {n} x {e} = {n * e}"
        for i, (e, n, s) in enumerate(zip(expected, counts, sums, strict=True))
        if s != n * e
    ]
