"""``TaskSet``: the background tasks a worker owns, cancelled and awaited at shutdown.

``start_eagerly`` starts an eager task where Python has them (3.12+): the coroutine runs at once,
inside its caller, until it first waits, so a turn that never waits (a read of a cached value)
costs no trip through the event loop. On 3.11 it is ``spawn``: 3.11 cannot run a coroutine
before its task exists without ``asyncio.current_task()`` naming the caller's task meanwhile,
and a handler that enters ``asyncio.timeout()`` there would arm it against the wrong task.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
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

    def start_eagerly(
        self, coro: Coroutine[Any, Any, None], name: str
    ) -> asyncio.Task[None] | None:
        """Start ``coro`` as a task owned by this set, eagerly where Python can (3.12+).

        Returns None when it finished without ever waiting (a failure is logged, as a failed
        task's is), else its task. On Python 3.11 it is ``spawn``.
        """
        if sys.version_info >= (3, 12):
            task = asyncio.Task(coro, loop=asyncio.get_running_loop(), name=name, eager_start=True)
            if task.done():
                self._done(task)
                return None
            self._tasks.add(task)
            task.add_done_callback(self._done)
            return task
        return self.spawn(coro, name)

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
