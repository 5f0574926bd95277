"""``ndo bench``: the harness runs end to end in its smallest mode, and its checks catch wrong
counters. No speed is asserted anywhere: this machine's numbers are not a test."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

import ndo.ops.bench
from ndo.ops import BenchError
from ndo.ops.bench import (
    NODE_MODULES_ENV,
    SCENARIOS,
    BenchPlan,
    check_increments,
    check_reads,
    find_node_modules,
    render_table,
)
from ndo.ops.bench._baseline import CounterResponder
from ndo.ops.bench._cli import add_bench_options, plan_from_args
from ndo.ops.bench._load_kind import choose_load
from ndo.ops.bench._objects import BASELINE_PREFIX
from ndo.ops.bench._processes import start_baseline
from ndo.ops.bench._protocol import ERROR_CODE_HEADER
from ndo.ops.bench._report import evaluate_targets
from ndo.ops.bench._rows import (
    apply_baseline_ratios,
    as_baseline_row,
    merge_baseline_runs,
    sort_rows,
)

ROOT_NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"
"""Where ``npm install`` at the repository root puts the ``nats`` npm package (if it ran)."""

ROW_KEYS = {
    "scenario",
    "inflight",
    "rps",
    "p50_ms",
    "p99_ms",
    "ratio",
    "cpu_us_per_req",
    "server_cpu_us_per_req",
}


def _node_modules_with_nats(parent: Path) -> Path:
    """A fake ``node_modules`` in ``parent`` that has a ``nats`` package folder."""
    folder = parent / "node_modules"
    (folder / "nats").mkdir(parents=True)
    return folder


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


def _counter_subject(object_id: str, method: str) -> str:
    return f"{BASELINE_PREFIX}.rpc.Counter.{object_id}.{method}"


class TestBaselineResponder:
    """The baseline is an in-memory counter per object id: ``get`` answers the value,
    ``increment`` the value after adding ``by``, anything else an error reply."""

    def test_counters_per_object(self) -> None:
        """Counters start at 0, an empty body increments by 1, objects are independent."""
        responder = CounterResponder()
        assert responder.answer(_counter_subject("a", "get"), b"") == (b"0", None)
        assert responder.answer(_counter_subject("a", "increment"), b"") == (b"1", None)
        assert responder.answer(_counter_subject("a", "increment"), b'{"by":5}') == (b"6", None)
        assert responder.answer(_counter_subject("b", "increment"), b'{"by":2}') == (b"2", None)
        assert responder.answer(_counter_subject("a", "get"), b"") == (b"6", None)
        assert responder.counters == {"a": 6, "b": 2}

    def test_unknown_methods_and_bad_bodies_are_error_replies(self) -> None:
        """The generators count a reply with the error code header as an error, not a value."""
        responder = CounterResponder()
        body, headers = responder.answer(_counter_subject("a", "reset"), b"")
        assert headers is not None and headers[ERROR_CODE_HEADER] == "404"
        assert b"reset" in body
        _, headers = responder.answer(_counter_subject("a", "increment"), b'{"by":"x"}')
        assert headers is not None and headers[ERROR_CODE_HEADER] == "400"
        assert responder.counters == {}

    async def test_the_process_answers_over_nats(self, nats_url: str, tmp_path: Path) -> None:
        """``python -m ndo.ops.bench._baseline`` serves every object and method of the baseline
        prefix with one subscription."""
        child = await start_baseline(nats_url, tmp_path, "asyncio")
        nc = await nats.connect(nats_url)
        try:
            for expected in (4, 8):
                msg = await nc.request(_counter_subject("x1", "increment"), b'{"by":4}', timeout=5)
                assert msgspec.json.decode(msg.data) == expected
            msg = await nc.request(_counter_subject("x1", "get"), b"", timeout=5)
            assert msgspec.json.decode(msg.data) == 8
            msg = await nc.request(_counter_subject("x2", "get"), b"", timeout=5)
            assert msgspec.json.decode(msg.data) == 0
            msg = await nc.request(_counter_subject("x1", "nope"), b"", timeout=5)
            assert msg.headers is not None and msg.headers[ERROR_CODE_HEADER] == "404"
        finally:
            await nc.close()
            await child.stop()


def _row(scenario: str, inflight: int | None, **figures: float | None) -> dict[str, object]:
    """A result row with the figures the comparisons read (others ``None``)."""
    row: dict[str, object] = {
        "scenario": scenario,
        "storage": "local",
        "inflight": inflight,
        "rps": None,
        "p50_ms": None,
        "p99_ms": None,
        "ratio": None,
        "cpu_us_per_req": None,
        "server_cpu_us_per_req": None,
        "cpu_ratio": None,
        "check": "ok",
    }
    row.update(figures)
    return row


def _baseline(workload: str, inflight: int, **figures: float | None) -> dict[str, object]:
    return as_baseline_row(workload, _row(workload, inflight, **figures))


class TestBaselineComparison:
    """Each ndo row is compared with the baseline row of its own scenario and level (cold with
    the baseline's read); the baseline runs the scenarios the plan asks for."""

    def test_the_baseline_runs_the_plans_scenarios_and_read_for_cold(self) -> None:
        """read, spread and hot have a baseline; cold uses read's; idle-memory none."""
        assert BenchPlan().baseline_workloads() == ("read", "spread", "hot")
        assert BenchPlan(scenarios=("cold",)).baseline_workloads() == ("read",)
        assert BenchPlan(scenarios=("hot", "cold")).baseline_workloads() == ("read", "hot")
        assert BenchPlan(scenarios=("idle-memory",)).baseline_workloads() == ()

    def test_ratios_against_the_same_scenario_and_level(self) -> None:
        """Ratios divide by the matching baseline row; no matching row, no ratio."""
        baseline = merge_baseline_runs(
            {
                ("read", 64): [_baseline("read", 64, rps=1000.0, cpu_us_per_req=10.0, p99_ms=2.0)],
                ("spread", 64): [_baseline("spread", 64, rps=2000.0, cpu_us_per_req=20.0)],
            }
        )
        read = _row("read", 64, rps=500.0, cpu_us_per_req=30.0, p99_ms=3.0)
        spread = _row("spread", 64, rps=500.0, cpu_us_per_req=30.0)
        cold = _row("cold", 64, rps=100.0, cpu_us_per_req=50.0)
        hot = _row("hot", 64, rps=100.0)
        read_at_1 = _row("read", 1, rps=100.0)
        idle = _row("idle-memory", None)
        apply_baseline_ratios([read, spread, cold, hot, read_at_1, idle], baseline)
        assert (read["ratio"], read["cpu_ratio"], read["p99_ratio"]) == (0.5, 3.0, 1.5)
        assert (spread["ratio"], spread["cpu_ratio"]) == (0.25, 1.5)
        assert (cold["ratio"], cold["cpu_ratio"], cold["baseline_workload"]) == (0.1, 5.0, "read")
        for row in (hot, read_at_1, idle):
            assert row["ratio"] is None and "baseline_workload" not in row

    def test_two_baseline_runs_are_averaged(self) -> None:
        """baseline_twice: figures (the nats-server's CPU too) averaged, a failed check kept."""
        runs = {
            ("hot", 1): [
                _baseline("hot", 1, rps=100.0, cpu_us_per_req=10.0, server_cpu_us_per_req=4.0),
                {
                    **_baseline(
                        "hot", 1, rps=300.0, cpu_us_per_req=20.0, server_cpu_us_per_req=6.0
                    ),
                    "check": "bad",
                },
            ]
        }
        row = merge_baseline_runs(runs)[("hot", 1)]
        assert (row["rps"], row["cpu_us_per_req"], row["server_cpu_us_per_req"]) == (
            200.0,
            15.0,
            5.0,
        )
        assert row["rps_runs"] == [100.0, 300.0]
        assert (row["ratio"], row["check"], row["workload"]) == (1.0, "bad", "hot")
        assert row["scenario"] == "baseline" and row["writes_per_tx"] is None

    def test_each_scenarios_baseline_rows_come_first(self) -> None:
        """Report order: scenario by scenario, its baseline rows (by level) before ndo's."""
        rows = [
            _row("read", 1),
            _row("cold", 1),
            _row("spread", 1),
            _baseline("spread", 64),
            _baseline("read", 64),
            _baseline("read", 1),
        ]
        order = [(r["scenario"], r.get("workload"), r["inflight"]) for r in sort_rows(rows)]
        assert order == [
            ("baseline", "read", 1),
            ("baseline", "read", 64),
            ("read", None, 1),
            ("baseline", "spread", 64),
            ("spread", None, 1),
            ("cold", None, 1),
        ]


class TestReport:
    """The table shows worker and nats-server CPU per request, and the targets block says which
    target is met with the measured value."""

    @staticmethod
    def _report() -> dict[str, Any]:
        rows: list[dict[str, object]] = [
            _baseline("read", 64, rps=1000.0, cpu_us_per_req=10.0, server_cpu_us_per_req=7.5),
            _row("read", 64, rps=900.0, cpu_us_per_req=12.0, server_cpu_us_per_req=8.25),
            _row("hot", 64, rps=12_000.0, ratio=0.75),
            {**_row("cold", 1, p50_ms=1.5), "activations": 10, "evictions": 0},
        ]
        rows[1]["ratio"] = 0.9
        return {
            "results": rows,
            "targets": evaluate_targets(rows),
            "machine": {
                "nproc": 2,
                "cpu_model": "x",
                "python": "3",
                "nats_server": "v2",
                "load_generator": "node",
                "clients": 2,
                "loop": "asyncio",
            },
        }

    def test_table_has_worker_and_server_cpu_columns(self) -> None:
        """``wrk us/req`` and ``srv us/req`` side by side; baseline rows name their scenario."""
        table = render_table(self._report())
        header = table.splitlines()[0]
        assert "wrk us/req srv us/req" in header
        baseline_line = next(line for line in table.splitlines() if line.startswith("baseline"))
        assert baseline_line.startswith("baseline read")
        assert "10.0" in baseline_line and "7.5" in baseline_line

    def test_targets_met_not_met_and_not_measured(self) -> None:
        """The issue's targets, each with its verdict and measured value."""
        report = self._report()
        targets = {t["target"]: t for t in report["targets"]}
        assert targets["read@64: ratio >= 0.8"]["met"] is True
        assert targets["hot@64: ratio >= 0.7"]["met"] is True
        assert targets["hot@64: rps >= 10,000"]["met"] is True
        assert targets["cold@1: p50_ms < 1.0"]["met"] is False
        assert targets["spread@64: ratio >= 0.5"]["met"] is None
        table = render_table(report)
        assert "met          hot@64: rps >= 10,000 (measured 12,000)" in table
        assert "NOT met      cold@1: p50_ms < 1.0 (measured 1.50)" in table
        assert "not measured spread@64: ratio >= 0.5 (measured -)" in table
        assert table.count("targets (") == 1


class TestNodeModulesLookup:
    """The nats npm package is found via --node-modules, then $NDO_NODE_MODULES, then
    ./node_modules of the working directory; never in the source tree."""

    @pytest.fixture(autouse=True)
    def _isolated(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(NODE_MODULES_ENV, raising=False)
        work = tmp_path / "work"
        work.mkdir()
        monkeypatch.chdir(work)

    def test_flag_then_environment_then_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each place is used when the ones before it lack nats; paths come back absolute."""
        local = _node_modules_with_nats(tmp_path / "work")
        assert find_node_modules() == local.resolve()
        from_env = _node_modules_with_nats(tmp_path / "env")
        monkeypatch.setenv(NODE_MODULES_ENV, str(from_env))
        assert find_node_modules() == from_env.resolve()
        flag = _node_modules_with_nats(tmp_path / "flag")
        assert find_node_modules(Path("..") / "flag" / "node_modules") == flag.resolve()
        assert find_node_modules(tmp_path / "empty") == from_env.resolve()

    def test_nothing_found(self, tmp_path: Path) -> None:
        """No folder with nats in any place: None."""
        assert find_node_modules(tmp_path) is None

    def test_auto_falls_back_to_python_and_says_how_to_get_node(self) -> None:
        """--load auto without the package picks Python and explains how to get Node.js."""
        choice = choose_load(BenchPlan(load="auto"))
        assert choice.kind == "python"
        assert choice.fallback is not None
        assert "npm install nats@2" in choice.fallback
        assert "--node-modules" in choice.fallback

    def test_load_node_without_the_package_is_a_clear_error(self) -> None:
        """--load node without the package fails, naming the fix."""
        with pytest.raises(BenchError) as caught:
            choose_load(BenchPlan(load="node"))
        assert "npm install nats@2" in str(caught.value)
        assert "--load python" in str(caught.value)

    def test_load_python_needs_nothing(self) -> None:
        """--load python never looks for Node.js."""
        choice = choose_load(BenchPlan(load="python"))
        assert (choice.kind, choice.fallback) == ("python", None)

    @pytest.mark.skipif(not ROOT_NODE_MODULES.joinpath("nats").is_dir(), reason="no npm install")
    def test_node_found_through_the_flag(self) -> None:
        """With node on PATH and --node-modules holding nats, auto picks Node.js."""
        choice = choose_load(BenchPlan(node_modules=ROOT_NODE_MODULES))
        if choice.fallback is not None and "not on PATH" in choice.fallback:
            pytest.skip("node is not installed")
        assert (choice.kind, choice.node_modules) == ("node", ROOT_NODE_MODULES)


class TestStorageModes:
    """``--storage`` names the storage modes every scenario runs in: local SQLite, replicated on
    one server (r1) or on a 3-server loopback cluster (r3)."""

    @staticmethod
    def _plan(*argv: str) -> BenchPlan:
        parser = argparse.ArgumentParser()
        add_bench_options(parser)
        return plan_from_args(parser.parse_args(list(argv)))

    def test_local_by_default_all_and_lists_in_a_fixed_order(self) -> None:
        """Without the flag only local storage runs (as before); ``all`` and any list run in
        the order local, r1, r3."""
        assert self._plan().storage == ("local",)
        assert self._plan("--quick").storage == ("local",)
        assert self._plan("--storage", "all").storage == ("local", "r1", "r3")
        assert self._plan("--storage", "r3, local").storage == ("local", "r3")

    def test_bad_modes_are_refused_saying_what_to_do(self) -> None:
        """An unknown mode, a repeated one, or replication without JetStream."""
        with pytest.raises(ValueError, match="choose from local, r1, r3"):
            self._plan("--storage", "r2")
        with pytest.raises(ValueError, match="distinct"):
            BenchPlan(storage=("r1", "r1"))
        with pytest.raises(ValueError, match="needs JetStream"):
            self._plan("--storage", "r1", "--no-jetstream")

    def test_idle_memory_runs_with_local_storage_only(self) -> None:
        """Memory per idle object does not depend on where partitions are durable."""
        plan = BenchPlan(storage=("local", "r1"))
        assert plan.scenarios_for("local") == SCENARIOS
        assert plan.scenarios_for("r1") == tuple(s for s in SCENARIOS if s != "idle-memory")


class TestNoSourceTree:
    """The harness runs from an installed wheel: it never points into the repository."""

    def test_no_paths_into_the_repository(self) -> None:
        """No module of ndo.ops.bench names tests/, walks up from its own file or sets
        PYTHONPATH."""
        package_dir = Path(ndo.ops.bench.__file__).parent
        modules = sorted(package_dir.glob("*.py"))
        assert len(modules) > 10
        for module in modules:
            source = module.read_text(encoding="utf-8")
            for needle in ('"tests"', "tests/", "parents[", "__file__", "PYTHONPATH"):
                assert needle not in source, f"{module.name} contains {needle!r}"


def _run_bench(tmp_path: Path, flags: list[str], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m ndo.ops.bench --quick --json`` with tiny counts and ``flags`` in the
    empty ``tmp_path``, without PYTHONPATH (no source tree needed); its JSON report."""
    argv = [
        sys.executable,
        "-m",
        "ndo.ops.bench",
        "--quick",
        "--json",
        "--duration=0.2",
        "--warmup=0",
        "--objects=20",
        "--partitions=4",
        *flags,
        f"--work-dir={tmp_path}",
    ]
    if "--load=python" not in flags and (ROOT_NODE_MODULES / "nats").is_dir():
        argv.append(f"--node-modules={ROOT_NODE_MODULES}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", NODE_MODULES_ENV)}
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


class TestSmoke:
    """`python -m ndo.ops.bench --quick --json` with tiny counts runs every scenario."""

    @pytest.mark.slow
    @pytest.mark.timeout(60)
    def test_smallest_run_reports_every_scenario_and_passes_its_checks(
        self, tmp_path: Path
    ) -> None:
        """The JSON document has a row per scenario and level, each with a passing check.

        It runs in an empty working directory without PYTHONPATH (no source tree needed) and
        leaves that directory empty."""
        report = _run_bench(
            tmp_path,
            [
                "--levels=4",
                "--cold-objects=100",
                "--cold-max-active=20",
                "--idle-objects=100",
                "--no-jetstream",
            ],
            timeout=55,
        )
        assert set(report) >= {"results", "machine", "targets", "ok"}
        assert report["ok"] is True
        rows = report["results"]
        for row in rows:
            assert set(row) >= ROW_KEYS
            assert row["check"] == "ok", row
        seen = {(row["scenario"], row.get("workload"), row["inflight"]) for row in rows}
        for scenario in SCENARIOS:
            assert (scenario, None, None if scenario == "idle-memory" else 4) in seen
        for workload in ("read", "spread", "hot"):  # the baseline runs them too, checked
            assert ("baseline", workload, 4) in seen
        assert len(rows) == len(SCENARIOS) + 3
        for row in rows:  # each against the baseline of its scenario (cold: of read)
            if row["scenario"] in ("read", "spread", "hot", "cold"):
                assert row["ratio"] is not None and row["cpu_ratio"] is not None
                assert row["baseline_workload"] == row["scenario"].replace("cold", "read")
        spread = next(r for r in rows if r["scenario"] == "spread" and r["inflight"] == 4)
        assert spread["requests"] > 0 and spread["writes_per_tx"] >= 1
        assert report["machine"]["nproc"] >= 1
        assert list(tmp_path.iterdir()) == []  # the run directory is removed, nothing else left

    @pytest.mark.slow
    @pytest.mark.timeout(60)
    def test_cold_alone_is_compared_with_the_baseline_read(self, tmp_path: Path) -> None:
        """``--scenarios=cold`` measures the baseline's read (whose objects the harness seeds
        itself) and nothing else of it, and the cold row's ratio is against that."""
        flags = [
            "--scenarios=cold",
            "--levels=1,4",
            "--cold-objects=100",
            "--cold-max-active=20",
            "--no-jetstream",
            "--load=python",
        ]
        rows = _run_bench(tmp_path, flags, timeout=55)["results"]
        labels = [(r["scenario"], r.get("workload"), r["inflight"]) for r in rows]
        assert labels == [
            ("baseline", "read", 1),
            ("baseline", "read", 4),
            ("cold", None, 1),
            ("cold", None, 4),
        ]
        for baseline, cold in zip(rows[:2], rows[2:], strict=True):
            assert baseline["check"] == "ok" and cold["check"] == "ok"
            assert cold["ratio"] == round(cold["rps"] / baseline["rps"], 3)

    @pytest.mark.slow
    @pytest.mark.timeout(120)
    def test_every_storage_mode_in_one_run(self, tmp_path: Path) -> None:
        """``--storage all``: each scenario runs on local storage, replicated R1 and replicated
        R3 (the harness starts and stops the cluster), every check passes, and the replicated
        rows carry their ratio to local, which the table prints side by side."""
        flags = ["--storage=all", "--scenarios=read,spread", "--levels=4"]
        report = _run_bench(tmp_path, flags, timeout=110)
        rows = {(r["scenario"], r["storage"]): r for r in report["results"]}
        for scenario in ("read", "spread"):
            for storage in ("local", "r1", "r3"):
                row = rows[(scenario, storage)]
                assert row["check"] == "ok", row
                if storage != "local":
                    assert row["local_ratio"] is not None
        assert report["machine"]["storage"] == ["local", "r1", "r3"]
        table = render_table(report)
        assert "storage modes:" in table and "appends/tx" in table
        assert "spread@64 r1: local_ratio >= 0.6" in table
        assert list(tmp_path.iterdir()) == []
