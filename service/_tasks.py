"""``TaskSet``: the background tasks a worker owns, cancelled and awaited at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog

__all__ = ["TaskSet"]

_log = structlog.get_logger("ndo.worker")


class TaskSet:
    """Tasks started for the worker: a failure is logged, and ``cancel_all`` ends them all."""

    _tasks: set[asyncio.Task[None]]

    def __init__(self) -> None:
        """An empty set."""
        self._tasks = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start ``coro`` as a task owned by this set."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def cancel_all(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("worker task failed", task=task.get_name(), error=repr(task.exception()))
