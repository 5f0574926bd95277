"""``ndo bench``: measure one ndo worker against an in-memory nats-py counter, on one machine.

A subpackage of its own because it is a tool, not the runtime: it starts a whole process tree
and reports numbers. Everything is relative to a baseline measured in the same run, never a
fixed speed, because this machine is small and noisy.

The process tree (all on 127.0.0.1):

* an embedded ``nats-server`` (random port, its own temporary directory);
* a **baseline** responder: an in-memory nats-py counter (``ndo.ops.bench._baseline``: one
  subscription callback, a ``dict`` of counters, ``get`` and ``increment`` like the example
  ``Counter``, not durable) — the practical limit of one Python worker. It runs the ``read``,
  ``spread`` and ``hot`` scenarios with the same load and checks as the worker, and each ndo
  row's ratios are against the baseline row of its scenario and level (``cold`` against
  ``read``);
* an **ndo worker** (``python -m ndo.ops.cli serve``, the bundled example objects), one fresh
  process per scenario, on a SQLite file the harness pre-populates directly (fast, big batches);
* **load generators** (Node.js, or nats-py processes as a fallback), the same ones for the
  baseline and for ndo, keeping a fixed total number of requests in flight.

Every child is a module of the installed package (``python -m ndo.ops.cli serve``, ...) or
``node`` with a script the harness writes, started in the run's temporary directory: the harness
needs no source tree, only the ``nats`` npm package for the Node.js generator (``--node-modules``,
``$NDO_NODE_MODULES`` or ``./node_modules``; see ``find_node_modules``).

For every run the harness samples the CPU time of the worker (``/proc/<pid>/stat``: its own
and its SQLite threads'), of the nats-server and of the generators, and scrapes the worker's
Prometheus endpoint for commit counts. CPU per request is the stable figure to optimise; requests
per second shows what the machine as a whole achieves while the generators share its two cores.

Storage modes (``--storage``, default ``local``): every scenario can run on local SQLite
storage, on replicated storage with one replica (``r1``: ``ndo serve --storage replicated`` on a
second single server) and with three (``r3``: on a 3-server cluster on loopback the harness
starts and stops). Each mode gets its own servers and data directory (``_deployment``); the
replicated modes' objects are appended to their partition logs before any worker starts
(``_log_loader``), so a worker's start-up includes restoring them. Their rows carry their ratio
to the local row of the same scenario and level.

Scenarios: ``read`` (``get()`` over 1,000 active objects), ``spread`` (``increment()`` over 1,000
objects), ``hot`` (``increment()`` on one object), ``cold`` (each object touched once: activation
from storage, LRU eviction under a small ``--max-active``) and ``idle-memory`` (resident memory per
active idle object). Each ends with a correctness check — counters equal the acknowledged
increments, every increment's reply is distinct and arrives in order, reads return the stored
values — and a failed check makes the whole run exit 1.

Modules, one job each: ``_plan`` (what a run measures), ``_cli`` (options, exit code),
``_harness`` (one run end to end), ``_storage_modes`` (local, r1, r3), ``_deployment`` (one
mode's servers, connection, driver and data), ``_servers`` (one nats-server or a loopback
cluster), ``_driver`` (load over generator processes), ``_processes`` (starting and stopping
workers and the baseline), ``_proc`` (CPU and memory readings), ``_load_kind`` (which
generator), ``_objects``, ``_prepopulate`` and ``_log_loader`` (the objects and their stored
values, in SQLite or in partition logs), ``_checks``, ``_rows`` (rows and their ratios),
``_report``, ``_progress``; and what runs in other processes: ``_protocol``,
``_node_generator``, ``_python_generator``, ``_baseline``. ``python -m tests.bench_replicated``
reuses ``_servers``, ``_log_loader`` and ``_processes`` to time restore, hand-over and failover.
"""

from ndo.ops.bench._checks import check_increments, check_reads
from ndo.ops.bench._cli import add_bench_parser, main, run_bench
from ndo.ops.bench._load_kind import NODE_MODULES_ENV, find_node_modules
from ndo.ops.bench._plan import FULL_PLAN, QUICK_PLAN, SCENARIOS, BenchPlan, LoadKind
from ndo.ops.bench._report import render_table
from ndo.ops.bench._storage_modes import STORAGE_MODES

__all__ = [
    "FULL_PLAN",
    "NODE_MODULES_ENV",
    "QUICK_PLAN",
    "SCENARIOS",
    "STORAGE_MODES",
    "BenchPlan",
    "LoadKind",
    "add_bench_parser",
    "check_increments",
    "check_reads",
    "find_node_modules",
    "main",
    "render_table",
    "run_bench",
]
