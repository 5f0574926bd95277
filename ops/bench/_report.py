"""The report: the machine it ran on, the targets of issues 5 and 11, and the table ``ndo bench``
prints (with a comparison of the storage modes when a run measured more than local storage).

Kept apart from the measuring: these functions only read rows and the machine description.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
from collections.abc import Callable
from typing import Any, Final

from ndo.ops._loop import resolve_loop
from ndo.ops._nats_server import find_nats_server_binary
from ndo.ops.bench._plan import BenchPlan
from ndo.ops.bench._rows import row_label

__all__ = ["describe_machine", "evaluate_targets", "render_table"]


_COMPARE: Final[dict[str, Callable[[float, float], bool]]] = {
    ">=": lambda value, limit: value >= limit,
    "<=": lambda value, limit: value <= limit,
    "<": lambda value, limit: value < limit,
}
"""A target's comparison of the measured value with its limit."""


def describe_machine(plan: BenchPlan, load_kind: str) -> dict[str, Any]:
    """The report's ``machine`` section: cores, CPU model, memory, versions, generator, loop."""
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "date": dt.date.today().isoformat(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nats_server": _version([find_nats_server_binary(), "--version"]),
        "node": _version(["node", "--version"]) if load_kind == "node" else None,
        "load_generator": load_kind,
        "clients": plan.clients,
        "loop": resolve_loop(plan.loop),
        "storage": list(plan.storage),
    }


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip() or None


def _storage(row: dict[str, Any]) -> str:
    """A row's storage mode (rows of reports before storage modes existed are local)."""
    return str(row.get("storage") or "local")


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate the targets of issues 5 and 16 (local storage) on the rows that exist, and
    those of issue 11 when the run measured replicated storage."""

    def find(scenario: str, inflight: int | None, storage: str = "local") -> dict[str, Any] | None:
        for row in rows:
            if (
                row["scenario"] == scenario
                and _storage(row) == storage
                and (inflight is None or row["inflight"] == inflight)
            ):
                return row
        return None

    out: list[dict[str, Any]] = []

    def add(name: str, row: dict[str, Any] | None, key: str, op: str, limit: float) -> None:
        value = None if row is None else row.get(key)
        met = None if value is None else bool(_COMPARE[op](value, limit))
        out.append({"target": f"{name}: {key} {op} {limit:,}", "value": value, "met": met})

    # Ratios are against the in-memory counter responder on the same scenario and level.
    read = find("read", 64)
    add("read@64", read, "ratio", ">=", 0.8)
    add("read@64", read, "cpu_ratio", "<=", 1.25)
    add("read@64", read, "p99_ratio", "<=", 2.0)
    spread = find("spread", 64)
    add("spread@64", spread, "ratio", ">=", 0.5)
    add("spread@64", spread, "writes_per_tx", ">=", 8)
    hot = find("hot", 64)
    add("hot@64", hot, "ratio", ">=", 0.7)
    add("hot@64", hot, "rps", ">=", 10_000)
    add("cold@1", find("cold", 1), "p50_ms", "<", 1.0)
    add("idle-memory", find("idle-memory", None), "overhead_bytes_per_object", "<", 2048)
    if any(_storage(row) == "r1" for row in rows):
        add("spread@64 r1", find("spread", 64, "r1"), "local_ratio", ">=", 0.6)
    return out


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _measured(value: float | None) -> str:
    """A target's measured value as the targets block prints it: ``-`` when not measured,
    thousands separated, two decimals below 100."""
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def render_table(report: dict[str, Any]) -> str:
    """Format a report as the human-readable table ``ndo bench`` prints."""
    rows = report["results"]
    modes = _modes(rows)
    show_storage = modes != ["local"]
    lines = []
    header = (
        f"{'scenario':<15} "
        + (f"{'storage':<7} " if show_storage else "")
        + f"{'inflight':>8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'ratio':>6} {'wrk us/req':>10} {'srv us/req':>10} {'cpu ratio':>9} {'tx/s':>7} "
        f"{'writes/s':>9} {'w/tx':>6} {'jrnl/s':>7} {'j.lost':>6} {'other':>5}  check"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for row in rows:
        if row["scenario"] == "idle-memory":
            continue
        storage = f"{row.get('storage') or '-':<7} " if show_storage else ""
        lines.append(
            f"{row_label(row):<15} {storage}{_fmt(row['inflight']):>8} "
            f"{_fmt(row['rps'], ',.0f'):>9} "
            f"{_fmt(row['p50_ms'], '.3f'):>7} {_fmt(row['p99_ms'], '.3f'):>7} "
            f"{_fmt(row['ratio'], '.2f'):>6} {_fmt(row['cpu_us_per_req'], '.1f'):>10} "
            f"{_fmt(row.get('server_cpu_us_per_req'), '.1f'):>10} "
            f"{_fmt(row['cpu_ratio'], '.2f'):>9} {_fmt(row.get('transactions_per_s'), ',.0f'):>7} "
            f"{_fmt(row.get('writes_per_s'), ',.0f'):>9} {_fmt(row.get('writes_per_tx'), '.1f'):>6}"
            f" {_fmt(row.get('journal_per_s'), ',.0f'):>7} {_fmt(row.get('journal_lost'), ',d'):>6}"
            f" {_fmt(row.get('other_cpu_cores'), '.2f'):>5}  {row['check']}"
        )
    for row in rows:
        if row["scenario"] == "idle-memory":
            lines.append("")
            lines.append(
                f"idle-memory: {row['objects']:,} idle active objects: "
                f"{row['bytes_per_object']:,} B RSS each, of which ~{row['data_bytes_per_object']} "
                f"B stored data -> {row['overhead_bytes_per_object']:,} B framework overhead; "
                f"check {row['check']}"
            )
    cold = [r for r in rows if r["scenario"] == "cold"]
    if cold:
        lines.append(
            "cold: "
            + ", ".join(
                f"{r['activations']:,} activations / {r['evictions']:,} evictions "
                f"at {r['inflight']} in flight" + (f" ({_storage(r)})" if show_storage else "")
                for r in cold
            )
        )
    lines += _NOTES
    if show_storage:
        lines.append("")
        lines += _storage_comparison(rows, modes)
    lines.append("")
    lines.append(
        "targets (issues 5 and 16"
        + (", issue 11" if "r1" in modes else "")
        + "; ratios against the baseline of the same scenario and level):"
    )
    for target in report["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"  {mark:<12} {target['target']} (measured {_measured(target['value'])})")
    machine = report["machine"]
    lines.append("")
    lines.append(
        f"machine: {machine['nproc']} cpus ({machine['cpu_model']}), python {machine['python']}, "
        f"{machine['nats_server']}, load: {machine['load_generator']} x{machine['clients']}, "
        f"event loop: {machine['loop']}"
    )
    return "\n".join(lines)


_NOTES: Final = (
    "baseline = in-memory nats-py counter responder (not durable: the practical limit), on the "
    "same scenario, level and load generators; ratio, cpu ratio = req/s and worker CPU per "
    "request over the baseline's (cold: over baseline read)",
    "wrk us/req = CPU per request of the worker (baseline rows: the responder), srv us/req = of "
    "nats-server; other = CPU cores busy outside the benchmark's processes (noise); jrnl/s and "
    "j.lost = journal records stored per second and lost (buffer full, timeouts)",
)
"""The lines under the table that say what its columns mean."""


def _modes(rows: list[dict[str, Any]]) -> list[str]:
    """The storage modes of the report's ndo rows, in the order they ran (``local`` alone for
    a run without ndo rows)."""
    seen: list[str] = []
    for row in rows:
        if row["scenario"] != "baseline" and _storage(row) not in seen:
            seen.append(_storage(row))
    return seen or ["local"]


def _storage_comparison(rows: list[dict[str, Any]], modes: list[str]) -> list[str]:
    """The storage modes side by side: each replicated row under the local row of its scenario
    and level, with the ratios to it, and what its commits cost in log appends."""
    header = (
        f"{'scenario':<11} {'inflight':>8} {'storage':<7} {'req/s':>9} {'x local':>7} "
        f"{'p99 ms':>7} {'x local':>7} {'cpu us/req':>10} {'x local':>7} {'tx/s':>7} "
        f"{'appends/tx':>10} {'append ms':>9}"
    )
    lines = [
        "storage modes: each against local storage at the same scenario and level "
        "(x local = ratio; appends/tx = partition log records per group commit)",
        header,
        "-" * len(header),
    ]
    keyed = {(r["scenario"], r["inflight"], _storage(r)): r for r in rows}
    keys: list[tuple[str, int]] = []
    for r in rows:
        key = (r["scenario"], r["inflight"])
        if r["scenario"] not in ("baseline", "idle-memory") and key not in keys:
            keys.append(key)
    for scenario, inflight in keys:
        for mode in modes:
            row = keyed.get((scenario, inflight, mode))
            if row is None:
                continue
            local = mode == "local"
            lines.append(
                f"{scenario:<11} {_fmt(inflight):>8} {mode:<7} {_fmt(row['rps'], ',.0f'):>9} "
                f"{'' if local else _fmt(row.get('local_ratio'), '.2f'):>7} "
                f"{_fmt(row['p99_ms'], '.1f'):>7} "
                f"{'' if local else _fmt(row.get('p99_local_ratio'), '.2f'):>7} "
                f"{_fmt(row['cpu_us_per_req'], '.1f'):>10} "
                f"{'' if local else _fmt(row.get('cpu_local_ratio'), '.2f'):>7} "
                f"{_fmt(row.get('transactions_per_s'), ',.0f'):>7} "
                f"{_fmt(row.get('appends_per_tx'), '.1f'):>10} "
                f"{_fmt(row.get('append_ms'), '.2f'):>9}"
            )
    return lines
