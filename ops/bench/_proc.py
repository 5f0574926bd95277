"""Readings from ``/proc``: CPU seconds of a process and of the whole machine, resident memory.

Kept apart because these are the harness's measuring instruments, read around every run.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["busy_cpu_seconds", "cpu_seconds", "rss_bytes"]

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads); 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, from ``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    busy = sum(int(v) for i, v in enumerate(fields[1:9]) if i not in (3, 4))
    return busy / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
