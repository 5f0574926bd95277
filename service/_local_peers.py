"""Is a worker that registered from this machine still running? (For a fast restart after a crash.)

A member record carries the worker's host, pid, start time and ``machine`` — this machine's boot
id and PID namespace (``this_machine``). A worker that finds the record of another member with
the same ``machine`` can ask the kernel whether that process still exists, instead of waiting a
lease TTL for its records to expire: a crashed worker restarted by systemd then serves within a
second.

The answer errs on the safe side. "Gone" only when the process provably is: no process with that
pid, a zombie, or a process with that pid that started after the record was written (the pid was
reused). Anything unclear (another machine or container, no ``/proc``, a start time too close to
call) is "alive", and the records expire as usual. Being wrong about "gone" would cost
availability only, never safety: a lease taken over gets a new, higher fencing epoch.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Final

__all__ = ["process_gone", "this_machine"]

_START_SLACK: Final = 2.0
"""Seconds of doubt in a process's start time (``btime`` is whole seconds; clock ticks round)."""


@functools.cache
def this_machine() -> str:
    """An id of this kernel boot and PID namespace ("" where it cannot be told: no ``/proc``).

    Two processes with the same id see the same pids, so one can check the other's.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_gone(pid: int, started: float, machine: str) -> bool:
    """Whether the process ``pid`` of ``machine``, which was running at ``started`` (epoch
    seconds), has provably ended. False whenever in doubt (see the module doc)."""
    if not machine or machine != this_machine() or pid <= 0:
        return False
    try:
        fields = _stat_fields(pid)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if fields and fields[0] in ("Z", "X"):  # a zombie (or dead): killed, not yet reaped
        return True
    # A live process with this pid: the same one (several workers may share a process), or a
    # later one that reused the pid after the record's writer died.
    start = _start_from_fields(fields)
    return start is not None and start > started + _START_SLACK


def _stat_fields(pid: int) -> list[str]:
    """The fields after the process name in ``/proc/<pid>/stat`` (its state first)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    return stat[stat.rfind(")") + 2 :].split()


def _start_from_fields(fields: list[str]) -> float | None:
    """Epoch seconds a process started, from the fields after its name in ``/proc/<pid>/stat``
    (``starttime`` is field 22 of the whole line, in clock ticks since boot)."""
    boot = _boot_time()
    if boot is None or len(fields) < 20:
        return None
    try:
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return None


@functools.cache
def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
