"""One result row per measured run: derived figures, the check's text, a one-line description.

Kept apart from the scenarios so every scenario (and the baseline) computes its row the same way.
"""

from __future__ import annotations

from typing import Any, Final

from ndo.ops.bench._driver import Outcome

__all__ = ["PROBLEMS_SHOWN", "describe", "make_row"]

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


def _describe(row: dict[str, Any]) -> str:
    if row["scenario"] == "idle-memory":
        return (
            f"idle-memory: {row['objects']} objects, {row['bytes_per_object']} B/object "
            f"({row['overhead_bytes_per_object']} B overhead); check {row['check']}"
        )
    ratio = f", ratio {row['ratio']:.2f}" if row.get("ratio") is not None else ""
    return (
        f"{row['scenario']} inflight={row['inflight']}: {row['rps']:,.0f} req/s, "
        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms{ratio}, "
        f"worker {row['cpu_us_per_req']} us/req; check {row['check']}"
    )
