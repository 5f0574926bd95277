"""Text the ``ndo`` commands print for people: aligned tables and numbers."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["count", "table"]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Lines of a table with left-aligned columns two spaces apart (no trailing spaces)."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def count(number: int, noun: str) -> str:
    """``1 object``, ``1,234 objects``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
