"""Progress lines on stderr (stdout carries the table or the JSON document)."""

from __future__ import annotations

import sys
import time

__all__ = ["progress"]


def progress(message: str) -> None:
    """Print ``message`` on stderr with the time of day, flushed at once."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
