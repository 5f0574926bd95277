"""Which event loop a long-running ndo process runs on: uvloop when installed, else asyncio.

A module of its own so that ``ndo serve`` and the benchmark's baseline responder choose by the
same rule (``--loop`` / ``NDO_LOOP``), which keeps the benchmark's ratios fair. uvloop is an
optional extra (``pip install 'ndo[fast]'``); it takes ~20% off the worker's CPU per request.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

__all__ = ["LOOP_CHOICES", "LoopUnavailableError", "loop_factory", "resolve_loop", "run"]

LOOP_CHOICES: Final = ("auto", "asyncio", "uvloop")
"""Values of ``--loop``: ``auto`` is uvloop when it is importable, else asyncio."""

_T = TypeVar("_T")


class LoopUnavailableError(ValueError):
    """``--loop uvloop`` without uvloop installed (deterministic: install it or pick another)."""


def resolve_loop(choice: str) -> str:
    """The loop ``choice`` means on this machine: ``"asyncio"`` or ``"uvloop"``.

    Raises:
        LoopUnavailableError: ``choice`` is ``uvloop`` and uvloop is not installed.
        ValueError: ``choice`` is not one of ``LOOP_CHOICES``.
    """
    if choice not in LOOP_CHOICES:
        raise ValueError(f"unknown event loop {choice!r}; use one of {', '.join(LOOP_CHOICES)}")
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise LoopUnavailableError(
            "uvloop is not installed; pip install 'ndo[fast]' (or uvloop), or use --loop asyncio"
        )
    if choice == "auto":
        return "uvloop" if installed else "asyncio"
    return choice


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The ``asyncio.Runner`` loop factory for ``choice`` (None: asyncio's default loop).

    Raises:
        LoopUnavailableError: see ``resolve_loop``.
        ValueError: see ``resolve_loop``.
    """
    if resolve_loop(choice) == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None


def run(main: Coroutine[Any, Any, _T], choice: str) -> _T:
    """``asyncio.run(main)`` on the loop ``choice`` selects.

    Raises:
        LoopUnavailableError: see ``resolve_loop`` (``main`` is closed unstarted).
        ValueError: see ``resolve_loop``.
    """
    try:
        factory = loop_factory(choice)
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
