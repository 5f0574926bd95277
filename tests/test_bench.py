"""``ndo bench``: the harness runs end to end in its smallest mode, and its checks catch wrong
counters. No speed is asserted anywhere: this machine's numbers are not a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ndo.ops.bench import SCENARIOS, check_increments, check_reads

ROOT = Path(__file__).resolve().parents[1]

ROW_KEYS = {"scenario", "inflight", "rps", "p50_ms", "p99_ms", "ratio", "cpu_us_per_req"}


class TestCorrectnessChecks:
    """The per-object checks accept right results and name what is wrong in bad ones."""

    def test_increments_accept_a_permutation_of_the_expected_replies(self) -> None:
        """Three increments from 5 reply 6, 7, 8 in any order and leave the counter at 8."""
        assert check_increments([5, 0], [3, 0], [6 + 7 + 8, 0], [8, 0]) == []

    def test_increments_catch_lost_updates_and_wrong_totals(self) -> None:
        """Two increments that both replied 6 (a lost update) fail, and so does a bad total."""
        problems = check_increments([5], [2], [6 + 6], [6])
        assert len(problems) == 2
        assert "lost or duplicated" in problems[0]
        assert "expected 7" in problems[1]

    def test_reads_must_return_the_stored_value(self) -> None:
        """Every get() of an object must return the same stored value."""
        assert check_reads([10, 3], [2, 1], [20, 3]) == []
        assert len(check_reads([10, 3], [2, 1], [21, 3])) == 1


class TestSmoke:
    """`python -m ndo.ops.bench --quick --json` with tiny counts runs every scenario."""

    @pytest.mark.slow
    @pytest.mark.timeout(60)
    def test_smallest_run_reports_every_scenario_and_passes_its_checks(
        self, tmp_path: Path
    ) -> None:
        """The JSON document has a row per scenario and level, each with a passing check."""
        argv = [
            sys.executable,
            "-m",
            "ndo.ops.bench",
            "--quick",
            "--json",
            "--levels=4",
            "--duration=0.2",
            "--warmup=0",
            "--objects=20",
            "--cold-objects=100",
            "--cold-max-active=20",
            "--idle-objects=100",
            "--partitions=4",
            "--no-jetstream",
            f"--work-dir={tmp_path}",
        ]
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=55, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        assert set(report) >= {"results", "machine", "targets", "ok"}
        assert report["ok"] is True
        rows = report["results"]
        for row in rows:
            assert set(row) >= ROW_KEYS
            assert row["check"] == "ok", row
        seen = {(row["scenario"], row["inflight"]) for row in rows}
        for scenario in ("baseline", *SCENARIOS):
            assert (scenario, None if scenario == "idle-memory" else 4) in seen
        spread = next(r for r in rows if r["scenario"] == "spread" and r["inflight"] == 4)
        assert spread["requests"] > 0 and spread["writes_per_tx"] >= 1
        assert report["machine"]["nproc"] >= 1
        assert list(tmp_path.iterdir()) == []  # the run directory is removed
