"""Result rows: one per measured run (derived figures, the check's text, a one-line
description), compared with each other (each ndo row against the baseline row of its scenario
and level, each replicated row against the local row of its scenario and level), and the order
they are reported in.

Kept apart from the scenarios so every scenario (and the baseline) computes its row the same way.
The comparisons are pure functions over rows, so the harness applies them after every row (the
progress line shows the ratio so far) and once more at the end, and tests can feed them rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from ndo.ops.bench._driver import Outcome
from ndo.ops.bench._plan import BASELINE_OF, SCENARIOS

__all__ = [
    "AVERAGED_KEYS",
    "PROBLEMS_SHOWN",
    "BaselineKey",
    "apply_baseline_ratios",
    "apply_local_ratios",
    "as_baseline_row",
    "describe",
    "make_row",
    "merge_baseline_runs",
    "row_label",
    "sort_rows",
]

PROBLEMS_SHOWN: Final = 5
"""Problems a row's ``check`` quotes at most."""


def make_row(
    scenario: str,
    inflight: int,
    outcome: Outcome,
    problems: list[str],
) -> dict[str, Any]:
    """The result row of one measured run; ``problems`` (and failed requests) make its check."""
    ok = max(outcome.ok, 1)
    tx = outcome.metric_delta("ndo_commits_total")
    writes = outcome.metric_delta("ndo_commit_write_sets_sum")
    if outcome.errors:
        problems = [f"{sum(outcome.errors.values())} requests failed: {outcome.errors}", *problems]
    if outcome.violations:
        problems = [f"{outcome.violations} replies arrived out of order", *problems]
    row: dict[str, Any] = {
        "scenario": scenario,
        "storage": None,  # the harness sets the storage mode of an ndo row
        "inflight": inflight,
        "rps": round(outcome.rps, 1),
        "p50_ms": _round(outcome.percentile_ms(0.50), 3),
        "p99_ms": _round(outcome.percentile_ms(0.99), 3),
        "ratio": None,
        "cpu_us_per_req": round(outcome.worker_cpu / ok * 1e6, 1),
        "cpu_ratio": None,
        "requests": outcome.ok,
        "errors": sum(outcome.errors.values()),
        "seconds": round(outcome.elapsed, 3),
        "transactions_per_s": round(tx / outcome.elapsed, 1) if outcome.elapsed else 0.0,
        "writes_per_s": round(writes / outcome.elapsed, 1) if outcome.elapsed else 0.0,
        "writes_per_tx": round(writes / tx, 2) if tx else None,
        "server_cpu_us_per_req": round(outcome.server_cpu / ok * 1e6, 1),
        "load_cpu_us_per_req": round(outcome.load_cpu / ok * 1e6, 1),
        # Cores busy outside the benchmark's processes: other work on the machine (noise).
        "other_cpu_cores": round(
            max(
                0.0,
                outcome.machine_cpu - outcome.worker_cpu - outcome.server_cpu - outcome.load_cpu,
            )
            / outcome.elapsed,
            2,
        )
        if outcome.elapsed
        else None,
        "clients": outcome.clients,
        "check": "ok" if not problems else "; ".join(problems[:PROBLEMS_SHOWN]),
    }
    # Journal records stored vs lost (a full buffer drops records rather than slowing requests).
    journaled = outcome.metric_delta("ndo_journal_records_total")
    journal_lost = outcome.metric_delta("ndo_journal_failures_total")
    row["journal_per_s"] = round(journaled / outcome.elapsed, 1) if outcome.elapsed else 0.0
    row["journal_lost"] = int(journal_lost)
    # Replicated storage: partition log appends (one per partition touched by a group commit)
    # and how long JetStream took to acknowledge them.
    appends = outcome.metric_delta("ndo_log_appends_total")
    acked = outcome.metric_delta("ndo_log_append_seconds_count")
    row["log_appends_per_s"] = round(appends / outcome.elapsed, 1) if appends else None
    row["appends_per_tx"] = round(appends / tx, 2) if appends and tx else None
    row["append_ms"] = (
        round(outcome.metric_delta("ndo_log_append_seconds_sum") / acked * 1000, 3)
        if acked
        else None
    )
    activations = outcome.metric_delta("ndo_activations_total")
    if scenario == "cold":
        row["activations"] = int(activations)
        row["evictions"] = int(outcome.metric_delta("ndo_evictions_total"))
    return row


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def describe(row: dict[str, Any]) -> str:
    """One progress line for a row."""
    storage = row.get("storage")
    if storage not in (None, "local"):
        local = f", {row['local_ratio']:.2f}x local" if row.get("local_ratio") is not None else ""
        return f"[{storage}] " + _describe(row) + local
    return _describe(row)


def row_label(row: dict[str, Any]) -> str:
    """A row's name in the table and progress lines: its scenario, ``baseline <workload>`` for
    the baseline responder's rows."""
    if row["scenario"] == "baseline" and row.get("workload"):
        return f"baseline {row['workload']}"
    return str(row["scenario"])


def _describe(row: dict[str, Any]) -> str:
    if row["scenario"] == "idle-memory":
        return (
            f"idle-memory: {row['objects']} objects, {row['bytes_per_object']} B/object "
            f"({row['overhead_bytes_per_object']} B overhead); check {row['check']}"
        )
    ratio = f", ratio {row['ratio']:.2f}" if row.get("ratio") is not None else ""
    return (
        f"{row_label(row)} inflight={row['inflight']}: {row['rps']:,.0f} req/s, "
        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms{ratio}, "
        f"worker {row['cpu_us_per_req']} us/req, nats-server {row['server_cpu_us_per_req']} "
        f"us/req; check {row['check']}"
    )


BaselineKey = tuple[str, int]
"""A baseline row's workload (``read``, ``spread``, ``hot``) and in-flight level."""

AVERAGED_KEYS: Final = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "server_cpu_us_per_req")
"""Figures averaged over the baseline's runs of one workload and level (``baseline_twice``)."""

_NOT_A_WORKER: Final = (
    "transactions_per_s",
    "writes_per_s",
    "writes_per_tx",
    "journal_per_s",
    "journal_lost",
)
"""Worker metrics a baseline row has no value for (the responder has no metrics endpoint)."""

_RATIOS: Final = (
    ("rps", "ratio"),
    ("cpu_us_per_req", "cpu_ratio"),
    ("p99_ms", "p99_ratio"),
)
"""Row figure and the key of its ratio to the baseline."""

_LOCAL_RATIOS: Final = (
    ("rps", "local_ratio"),
    ("p99_ms", "p99_local_ratio"),
    ("cpu_us_per_req", "cpu_local_ratio"),
)
"""Row figure and the key of a replicated row's ratio to the local row."""


def as_baseline_row(workload: str, row: dict[str, Any]) -> dict[str, Any]:
    """Mark ``row`` (made by ``make_row`` for scenario ``workload``) as a baseline row.

    Its ``scenario`` becomes ``baseline`` and ``workload`` says which scenario it ran; the worker
    metrics it cannot have are ``None``.
    """
    row = {**row, "scenario": "baseline", "workload": workload, "storage": None}
    for key in _NOT_A_WORKER:
        row[key] = None
    return row


def merge_baseline_runs(
    runs: Mapping[BaselineKey, Sequence[dict[str, Any]]],
) -> dict[BaselineKey, dict[str, Any]]:
    """One baseline row per workload and level: the average of its runs, ratios 1.0.

    With several runs (``baseline_twice``) the row keeps each run's ``rps`` and worker CPU in
    ``rps_runs`` and ``cpu_us_per_req_runs``, and its check fails when any run's did.
    """
    merged: dict[BaselineKey, dict[str, Any]] = {}
    for key, key_runs in runs.items():
        row = dict(key_runs[0])
        if len(key_runs) > 1:
            for name in AVERAGED_KEYS:
                values = [r[name] for r in key_runs if r.get(name) is not None]
                row[name] = round(sum(values) / len(values), 3) if values else None
            row["rps_runs"] = [r["rps"] for r in key_runs]
            row["cpu_us_per_req_runs"] = [r["cpu_us_per_req"] for r in key_runs]
            bad = [r["check"] for r in key_runs if r["check"] != "ok"]
            row["check"] = "; ".join(bad) if bad else "ok"
        row["ratio"] = 1.0
        row["cpu_ratio"] = 1.0
        row["p99_ratio"] = 1.0
        merged[key] = row
    return merged


def apply_baseline_ratios(
    rows: Sequence[dict[str, Any]], baseline: Mapping[BaselineKey, dict[str, Any]]
) -> None:
    """Set each ndo row's ``ratio``, ``cpu_ratio`` and ``p99_ratio`` against the baseline row
    of its scenario (``BASELINE_OF``: ``cold`` against ``read``) and level, and name that
    workload in ``baseline_workload``; rows without one (``idle-memory``) keep ``None``."""
    for row in rows:
        workload = BASELINE_OF.get(row["scenario"])
        base = None if workload is None else baseline.get((workload, row["inflight"]))
        if base is None:
            continue
        row["baseline_workload"] = workload
        for key, ratio_key in _RATIOS:
            row[ratio_key] = _ratio(row.get(key), base.get(key))


def apply_local_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Set each replicated row's ratios to the local row of its scenario and level."""
    local = {
        (row["scenario"], row["inflight"]): row for row in rows if row.get("storage") == "local"
    }
    for row in rows:
        if row.get("storage") in (None, "local") or row["scenario"] == "idle-memory":
            continue
        ref = local.get((row["scenario"], row["inflight"]))
        if ref is None:
            continue
        for key, ratio_key in _LOCAL_RATIOS:
            if ref.get(key) and row.get(key) is not None:
                row[ratio_key] = round(row[key] / ref[key], 3)


def _ratio(value: float | None, base: float | None) -> float | None:
    """``value / base`` rounded, or ``None`` when either is missing or ``base`` is zero."""
    if value is None or not base:
        return None
    return round(value / base, 3)


def sort_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows in report order: by scenario (``SCENARIOS`` order), each scenario's baseline
    rows (by level) before its ndo rows (in the order they ran)."""

    def key(row: dict[str, Any]) -> tuple[int, int, int]:
        name = str(row.get("workload") or row["scenario"]).removesuffix("-warmup")
        rank = SCENARIOS.index(name) if name in SCENARIOS else len(SCENARIOS)
        if row["scenario"] == "baseline":
            return rank, 0, row["inflight"]
        return rank, 1, 0

    return sorted(rows, key=key)
