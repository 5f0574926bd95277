"""Durations and sizes written by people (``7d``, ``512M``) read as seconds and bytes.

A module of its own because two sides read them: ``WorkerConfig``'s option declaration says
which settings take a duration or a size (``ndo serve --journal-max-age 7d``), and ``ndo replay``
/ ``ndo tail`` read ages (``--since 10m``). Pure functions, no imports from the rest of ndo.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["parse_duration", "parse_size"]

_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?", re.IGNORECASE)
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNIT_BYTES: Final = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(text: str) -> float:
    """Read ``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``500ms`` as seconds.

    Raises:
        ValueError: not a duration.
    """
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot read {text!r} as a duration: use e.g. 90, 15m, 12h, 7d")
    return float(match[1]) * _UNIT_SECONDS[(match[2] or "s").lower()]


def parse_size(text: str) -> int:
    """Read ``1048576``, ``512M``, ``512MiB``, ``1G`` or ``1GB`` as bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 1073741824, 512M, 1G")
    unit = (match[2] or "b").lower()[0]
    return int(float(match[1]) * _UNIT_BYTES[unit])
