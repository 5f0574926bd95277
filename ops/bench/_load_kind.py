"""Which load generator a run uses: Node.js when ``node`` and the ``nats`` npm package exist.

A module of its own because the choice decides which processes the driver starts, and the
Node.js one needs a ``node_modules`` folder from outside the installed package. It is looked
for, in order, in ``--node-modules DIR``, in ``$NDO_NODE_MODULES`` and in ``./node_modules`` of
the working directory (where ``npm install nats@2`` puts it). Without it, ``--load auto`` falls
back to the Python generators and says how to get the Node.js one; ``--load node`` is an error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final, Literal

import msgspec

from ndo.ops._errors import BenchError
from ndo.ops.bench._plan import BenchPlan

__all__ = ["NODE_MODULES_ENV", "LoadChoice", "choose_load", "find_node_modules"]

NODE_MODULES_ENV: Final = "NDO_NODE_MODULES"
"""Environment variable naming a ``node_modules`` folder, tried after ``--node-modules``."""

_HOW_TO_GET_NODE: Final = (
    "run `npm install nats@2` in the working directory, or pass --node-modules DIR "
    f"(or set {NODE_MODULES_ENV})"
)


class LoadChoice(msgspec.Struct, frozen=True, kw_only=True):
    """The generator a run uses, and why when it is not the one asked for."""

    kind: Literal["node", "python"]
    """The generator the driver starts."""
    node_modules: Path | None = None
    """The ``node_modules`` holding the ``nats`` npm package (``kind="node"`` only)."""
    fallback: str | None = None
    """Set when ``--load auto`` fell back to Python: the progress line saying why and how to
    get the Node.js generator."""


def _candidates(node_modules: Path | None) -> list[tuple[str, Path]]:
    """Where to look, in order, each with how the user named it.

    Relative paths are taken against the working directory and made absolute, since the Node.js
    processes run in the run directory.
    """
    places: list[tuple[str, Path]] = []
    if node_modules is not None:
        places.append(("--node-modules", node_modules.resolve()))
    from_env = os.environ.get(NODE_MODULES_ENV)
    if from_env:
        places.append((f"${NODE_MODULES_ENV}", Path(from_env).resolve()))
    places.append(("./node_modules", Path("node_modules").resolve()))
    return places


def find_node_modules(node_modules: Path | None = None) -> Path | None:
    """The first ``node_modules`` folder holding the ``nats`` npm package, as an absolute path.

    Args:
        node_modules: the ``--node-modules`` folder, tried first when given; then
            ``$NDO_NODE_MODULES``, then ``./node_modules`` of the working directory.

    Returns:
        The folder, or ``None`` when none of them has ``nats`` in it.
    """
    for _, place in _candidates(node_modules):
        if (place / "nats").is_dir():
            return place
    return None


def choose_load(plan: BenchPlan) -> LoadChoice:
    """The generator ``plan`` runs with: ``plan.load``, or for ``auto`` Node.js when it can.

    Raises:
        BenchError: ``--load node`` without ``node`` on PATH or the ``nats`` npm package.
    """
    if plan.load == "python":
        return LoadChoice(kind="python")
    found = find_node_modules(plan.node_modules)
    if shutil.which("node") is None:
        missing = "`node` is not on PATH (install Node.js >= 18)"
    elif found is None:
        places = [f"{name} ({path})" for name, path in _candidates(plan.node_modules)]
        looked = " or ".join([", ".join(places[:-1]), places[-1]] if len(places) > 1 else places)
        missing = f"the nats npm package is not in {looked}"
    else:
        return LoadChoice(kind="node", node_modules=found)
    if plan.load == "node":
        raise BenchError(
            f"--load node needs the Node.js load generator, but {missing}; "
            f"{_HOW_TO_GET_NODE}; or use --load python"
        )
    return LoadChoice(
        kind="python",
        fallback=f"no Node.js load generator: {missing}; using the Python generators instead "
        f"(several times more CPU per request); for the Node.js one, {_HOW_TO_GET_NODE}",
    )
