"""``ndo bench``: the harness runs end to end in its smallest mode, and its checks catch wrong
counters. No speed is asserted anywhere: this machine's numbers are not a test."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

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
from ndo.ops.bench._cli import add_bench_options, plan_from_args
from ndo.ops.bench._load_kind import choose_load

ROOT_NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"
"""Where ``npm install`` at the repository root puts the ``nats`` npm package (if it ran)."""

ROW_KEYS = {"scenario", "inflight", "rps", "p50_ms", "p99_ms", "ratio", "cpu_us_per_req"}


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
        if (ROOT_NODE_MODULES / "nats").is_dir():
            argv.append(f"--node-modules={ROOT_NODE_MODULES}")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", NODE_MODULES_ENV)}
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=55, check=False
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
        assert list(tmp_path.iterdir()) == []  # the run directory is removed, nothing else left

    @pytest.mark.slow
    @pytest.mark.timeout(120)
    def test_every_storage_mode_in_one_run(self, tmp_path: Path) -> None:
        """``--storage all``: each scenario runs on local storage, replicated R1 and replicated
        R3 (the harness starts and stops the cluster), every check passes, and the replicated
        rows carry their ratio to local, which the table prints side by side."""
        argv = [
            sys.executable,
            "-m",
            "ndo.ops.bench",
            "--quick",
            "--json",
            "--storage=all",
            "--scenarios=read,spread",
            "--levels=4",
            "--duration=0.2",
            "--warmup=0",
            "--objects=20",
            "--partitions=4",
            f"--work-dir={tmp_path}",
        ]
        if (ROOT_NODE_MODULES / "nats").is_dir():
            argv.append(f"--node-modules={ROOT_NODE_MODULES}")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", NODE_MODULES_ENV)}
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
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
