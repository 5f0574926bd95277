"""The command line: ``ndo bench`` options, the plan they build, and the run's exit code.

``ndo.ops.cli`` adds the ``bench`` sub-command with ``add_bench_parser`` and calls ``run_bench``;
``python -m ndo.ops.bench`` runs ``main``, the same options without the ``ndo`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from ndo.ops._errors import BenchError
from ndo.ops._loop import LOOP_CHOICES
from ndo.ops.bench._harness import run_harness
from ndo.ops.bench._plan import FULL_PLAN, QUICK_PLAN, SCENARIOS, BenchPlan
from ndo.ops.bench._progress import progress
from ndo.ops.bench._report import render_table
from ndo.ops.bench._storage_modes import STORAGE_MODES
from ndo.subjects import DEFAULT_PARTITIONS

__all__ = ["add_bench_options", "add_bench_parser", "main", "plan_from_args", "run_bench"]

_DESCRIPTION: Final = (
    "``ndo bench``: measure one ndo worker against an in-memory nats-py counter (the practical "
    "limit) on the same machine."
)
"""The ``python -m ndo.ops.bench`` parser's description."""


def add_bench_parser(commands: Any) -> None:
    """Add the ``bench`` sub-command to the ``ndo`` parser's sub-parsers."""
    parser = commands.add_parser(
        "bench",
        help="measure a worker against an in-memory nats-py counter on this machine",
        description="Start nats-server, an in-memory nats-py counter responder (the baseline: "
        "not durable, the practical limit) and ndo workers, drive "
        "both with the same load generators on the same scenarios and report throughput, "
        "latency and the worker's and nats-server's CPU per request, with ratios to the "
        "baseline of the same scenario and level. Exits 1 when a correctness check fails.",
    )
    add_bench_options(parser)


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """Add every ``ndo bench`` option to ``parser``."""
    parser.add_argument("--quick", action="store_true", help="small counts, two levels (<1 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--storage",
        default="local",
        metavar="MODES",
        help=f"comma-separated storage modes to measure every scenario in, from "
        f"{','.join(STORAGE_MODES)}, or all: local SQLite; r1 = --storage replicated on one "
        "server; r3 = replicated on a 3-server loopback cluster the bench starts (default: local)",
    )
    parser.add_argument("--levels", help="comma-separated in-flight levels, e.g. 1,16,64,256")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each run")
    parser.add_argument("--objects", type=int, help="objects in read and spread (1000)")
    parser.add_argument("--cold-objects", type=int, help="objects touched once in cold")
    parser.add_argument("--cold-max-active", type=int, help="worker --max-active in cold")
    parser.add_argument("--idle-objects", type=int, help="objects per idle-memory batch")
    parser.add_argument("--partitions", type=int, help=f"partitions ({DEFAULT_PARTITIONS})")
    parser.add_argument("--clients", type=int, help="load generator processes (2)")
    parser.add_argument("--load", choices=["auto", "node", "python"], help="load generator")
    parser.add_argument(
        "--node-modules",
        type=Path,
        help="node_modules with the nats npm package (else $NDO_NODE_MODULES, ./node_modules)",
    )
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        help="event loop of the worker and the baseline responder alike (auto: uvloop when "
        "installed)",
    )
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `ndo serve` argument (repeatable), e.g. --worker-arg=--max-mailbox=2000",
    )
    parser.add_argument(
        "--no-jetstream",
        dest="jetstream",
        action="store_false",
        help="start nats-server without JetStream (workers then run without leases or journal)",
    )
    parser.add_argument("--work-dir", type=Path, help="where the run directory is created")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, db)")


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """The plan the parsed options ask for: ``QUICK_PLAN`` or ``FULL_PLAN`` with overrides.

    Raises:
        ValueError: a value the plan refuses (the message says how to fix it).
    """
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    changes: dict[str, Any] = {
        "scenarios": tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
        "storage": _storage_modes(args.storage),
    }
    if args.levels:
        changes["levels"] = tuple(int(x) for x in args.levels.split(",") if x.strip())
    for name in (
        "duration",
        "warmup",
        "objects",
        "cold_objects",
        "cold_max_active",
        "idle_objects",
        "partitions",
        "clients",
        "load",
        "node_modules",
        "loop",
        "work_dir",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.worker_arg:
        changes["worker_args"] = tuple(args.worker_arg)
    if args.keep:
        changes["keep"] = True
    if not args.jetstream:
        changes["jetstream"] = False
    return msgspec.structs.replace(plan, **changes)


def _storage_modes(text: str) -> tuple[str, ...]:
    """``--storage``: ``all``, or comma-separated mode names (measured in ``STORAGE_MODES``
    order, local first, whatever order they are given in)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return STORAGE_MODES
    known = [m for m in STORAGE_MODES if m in names]
    return tuple(known + [n for n in names if n not in STORAGE_MODES])  # the plan names those


def run_bench(args: argparse.Namespace) -> int:
    """Run ``ndo bench`` with parsed arguments; return the exit code.

    Returns:
        0 when every correctness check passed, 1 when one failed or the harness could not run,
        2 for bad arguments.
    """
    try:
        plan = plan_from_args(args)
    except ValueError as exc:
        print(f"ndo bench: {exc}", file=sys.stderr)
        return 2
    progress("command: " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    try:
        report = asyncio.run(run_harness(plan))
    except BenchError as exc:
        print(f"ndo bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_table(report))
    if not report["ok"]:
        bad = [r for r in report["results"] if r["check"] != "ok"]
        print(f"ndo bench: correctness check FAILED in {len(bad)} row(s)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ndo.ops.bench``: the same as ``ndo bench`` without the ``ndo`` command."""
    parser = argparse.ArgumentParser(prog="ndo bench", description=_DESCRIPTION)
    add_bench_options(parser)
    return run_bench(parser.parse_args(argv))
