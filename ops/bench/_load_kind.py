"""Which load generator a run uses: Node.js when ``node`` and the ``nats`` npm package exist.

A module of its own because the choice decides which processes the driver starts, and the
Node.js one needs a ``node_modules`` folder found outside the installed package.
"""

from __future__ import annotations

import shutil
from typing import Literal

from ndo.ops._errors import BenchError
from ndo.ops.bench._plan import BenchPlan

__all__ = ["pick_load_kind"]


def pick_load_kind(plan: BenchPlan) -> Literal["node", "python"]:
    """The generator ``plan`` runs with: ``plan.load``, or for ``auto`` Node.js when it can.

    Raises:
        BenchError: ``--load node`` without ``node`` or the ``nats`` npm package.
    """
    has_node = shutil.which("node") is not None and (plan.node_modules / "nats").is_dir()
    if plan.load == "node" and not has_node:
        raise BenchError(
            f"--load node needs `node` on PATH and the nats npm package in {plan.node_modules} "
            "(npm install at the repository root); or use --load python"
        )
    if plan.load == "python" or not has_node:
        return "python"
    return "node"
