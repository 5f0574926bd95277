"""The report: the machine it ran on, the targets of issue 5, and the table ``ndo bench`` prints.

Kept apart from the measuring: these functions only read rows and the machine description.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
from typing import Any

from ndo.ops._loop import resolve_loop
from ndo.ops._nats_server import find_nats_server_binary
from ndo.ops.bench._plan import BenchPlan

__all__ = ["describe_machine", "evaluate_targets", "render_table"]


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
    }


def _version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).strip() or None


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluate the targets of issue 5 on the rows that exist."""

    def find(scenario: str, inflight: int | None) -> dict[str, Any] | None:
        for row in rows:
            if row["scenario"] == scenario and (inflight is None or row["inflight"] == inflight):
                return row
        return None

    out: list[dict[str, Any]] = []

    def add(name: str, row: dict[str, Any] | None, key: str, op: str, limit: float) -> None:
        value = None if row is None else row.get(key)
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        if op == "<":
            met = None if value is None else value < limit
        out.append({"target": f"{name}: {key} {op} {limit}", "value": value, "met": met})

    read = find("read", 64)
    add("read@64", read, "ratio", ">=", 0.8)
    add("read@64", read, "cpu_ratio", "<=", 1.25)
    add("read@64", read, "p99_ratio", "<=", 2.0)
    spread = find("spread", 64)
    add("spread@64", spread, "ratio", ">=", 0.5)
    add("spread@64", spread, "writes_per_tx", ">=", 8)
    hot = find("hot", 64)
    add("hot@64", hot, "ratio", ">=", 0.3)
    add("hot@64", hot, "rps", ">=", 5000)
    add("cold@1", find("cold", 1), "p50_ms", "<", 1.0)
    add("idle-memory", find("idle-memory", None), "overhead_bytes_per_object", "<", 2048)
    return out


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def render_table(report: dict[str, Any]) -> str:
    """Format a report as the human-readable table ``ndo bench`` prints."""
    lines = []
    header = (
        f"{'scenario':<11} {'inflight':>8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'ratio':>6} {'cpu us/req':>10} {'cpu ratio':>9} {'tx/s':>7} {'writes/s':>9} "
        f"{'w/tx':>6} {'jrnl/s':>7} {'j.lost':>6} {'other':>5}  check"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for row in report["results"]:
        if row["scenario"] == "idle-memory":
            continue
        lines.append(
            f"{row['scenario']:<11} {_fmt(row['inflight']):>8} {_fmt(row['rps'], ',.0f'):>9} "
            f"{_fmt(row['p50_ms'], '.3f'):>7} {_fmt(row['p99_ms'], '.3f'):>7} "
            f"{_fmt(row['ratio'], '.2f'):>6} {_fmt(row['cpu_us_per_req'], '.1f'):>10} "
            f"{_fmt(row['cpu_ratio'], '.2f'):>9} {_fmt(row.get('transactions_per_s'), ',.0f'):>7} "
            f"{_fmt(row.get('writes_per_s'), ',.0f'):>9} {_fmt(row.get('writes_per_tx'), '.1f'):>6}"
            f" {_fmt(row.get('journal_per_s'), ',.0f'):>7} {_fmt(row.get('journal_lost'), ',d'):>6}"
            f" {_fmt(row.get('other_cpu_cores'), '.2f'):>5}  {row['check']}"
        )
    for row in report["results"]:
        if row["scenario"] == "idle-memory":
            lines.append("")
            lines.append(
                f"idle-memory: {row['objects']:,} idle active objects: "
                f"{row['bytes_per_object']:,} B RSS each, of which ~{row['data_bytes_per_object']} "
                f"B stored data -> {row['overhead_bytes_per_object']:,} B framework overhead; "
                f"check {row['check']}"
            )
    cold = [r for r in report["results"] if r["scenario"] == "cold"]
    if cold:
        lines.append(
            "cold: "
            + ", ".join(
                f"{r['activations']:,} activations / {r['evictions']:,} evictions "
                f"at {r['inflight']} in flight"
                for r in cold
            )
        )
    lines.append(
        "other = CPU cores busy outside the benchmark's processes during the run (noise); "
        "ratio and cpu ratio are against the baseline at the same in-flight level; "
        "jrnl/s and j.lost = journal records stored per second and lost (buffer full, timeouts)"
    )
    lines.append("")
    lines.append("targets (issue 5):")
    for target in report["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        lines.append(f"  {mark:<12} {target['target']} (measured {_fmt(target['value'])})")
    machine = report["machine"]
    lines.append("")
    lines.append(
        f"machine: {machine['nproc']} cpus ({machine['cpu_model']}), python {machine['python']}, "
        f"{machine['nats_server']}, load: {machine['load_generator']} x{machine['clients']}, "
        f"event loop: {machine['loop']}"
    )
    return "\n".join(lines)
