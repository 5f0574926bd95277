"""Permission violations as errors of the requests they concern.

When the server refuses a publish (or a subscription) for lack of permission, it sends
``-ERR 'Permissions Violation for Publish to "<subject>"'`` and keeps the connection open.
nats-py hands that only to the connection's error callback: the request itself waits for its
full timeout, and a client with retries waits several times over (see ``NATS-NOTES.md``).

``PermissionWatch`` chains itself in front of a connection's error callback (one watch per
connection, shared by every ``ActorClient`` on it). A request registers its subject and task
for the time it waits; a violation naming that subject (or the inbox subscription every request
needs) cancels the task, and the request raises ``PermissionDeniedError`` naming the subject,
within the round trip to the server. nats-py lowercases the server's error text, so subjects
are matched without regard to case; and since the server checks permissions after its subject
mapping, a violation for ``<prefix>.part.<n>.<rest>`` concerns the request to
``<prefix>.rpc.<rest>``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Final

from nats.aio.client import Client as NatsClient

__all__ = ["Denial", "PermissionWatch"]

_VIOLATION: Final = re.compile(
    r'permissions violation for (publish|subscription|publish with reply of)(?: to)? "([^"]*)"',
    re.IGNORECASE,
)
"""The server's text for a refused publish, subscription or reply subject (a client may not
name ``_R_.`` replies); group 2 is the subject."""

_PARTITION_SUBJECT: Final = re.compile(r"^(.+)\.part\.\d+\.(.+)$")
"""A request as the server's partition mapping rewrote it (``ndo.part.6.Counter.a.get``): the
server checks publish permissions on the mapped subject, so that is the one a violation names."""

_ATTRIBUTE: Final = "_ndo_permission_watch"
"""Where a connection keeps its watch."""

ErrorCallback = Callable[[Exception], Awaitable[None]]


class Denial:
    """One refused operation: ``publish``, ``subscribe`` or ``reply`` (the request's reply
    subject was refused), and the subject (lowercased)."""

    __slots__ = ("action", "subject")

    action: str
    subject: str

    def __init__(self, action: str, subject: str) -> None:
        """Record that the server refused to let us ``action`` on ``subject``."""
        self.action = action
        self.subject = subject

    def describe(self) -> str:
        """``publish to "x"`` / ``subscribe to "x"`` / ``use "x" as a reply subject``."""
        if self.action == "reply":
            return f'use "{self.subject}" as a reply subject'
        return f'{self.action} to "{self.subject}"'


class PermissionWatch:
    """Fails the requests of one connection that the server's permissions refuse."""

    # Configuration
    _inbox_prefix: str
    """The connection's inbox prefix, lowercased (``_inbox.``): a refused subscription under it
    is the reply subscription every request needs."""
    # State
    _waiting: dict[int, tuple[str, asyncio.Task[object]]]
    """By token: the (lowercased) subject a request published to, and its task."""
    _denied: dict[int, Denial]
    """By token: why a cancelled request was cancelled."""
    _next: int

    def __init__(self, inbox_prefix: str = "_INBOX") -> None:
        """A watch that is not attached to a connection yet (use ``PermissionWatch.of``)."""
        self._inbox_prefix = inbox_prefix.lower().rstrip(".") + "."
        self._waiting = {}
        self._denied = {}
        self._next = 0

    @classmethod
    def of(cls, nc: NatsClient) -> PermissionWatch:
        """The watch of ``nc``, attached in front of its error callback on first use."""
        watch: PermissionWatch | None = getattr(nc, _ATTRIBUTE, None)
        if watch is None:
            prefix = getattr(nc, "_inbox_prefix", b"_INBOX")
            watch = cls(bytes(prefix).decode(errors="replace"))
            previous: ErrorCallback | None = getattr(nc, "_error_cb", None)

            async def on_error(error: Exception) -> None:
                watch.observe(error)
                if previous is not None:
                    await previous(error)

            nc._error_cb = on_error
            setattr(nc, _ATTRIBUTE, watch)
        return watch

    def expect(self, subject: str) -> int:
        """Register the current task as publishing a request to ``subject``; returns the token
        for ``denial`` and ``forget``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("PermissionWatch.expect must run inside a task")
        self._next += 1
        self._waiting[self._next] = (_canonical(subject), task)
        return self._next

    def denial(self, token: int) -> Denial | None:
        """Why the request of ``token`` was cancelled (None: not by this watch)."""
        return self._denied.get(token)

    def forget(self, token: int) -> None:
        """The request of ``token`` is over."""
        self._waiting.pop(token, None)
        self._denied.pop(token, None)

    def observe(self, error: Exception) -> None:
        """Cancel the waiting requests a permission violation in ``error`` concerns: those
        published to its subject, or all of them when the inbox subscription was refused
        (requests need it for their replies)."""
        match = _VIOLATION.search(str(error))
        if match is None:
            return
        kind = match.group(1).lower()
        publish = kind == "publish"
        subject = match.group(2).lower()
        canonical = _canonical(subject)
        if not publish and not subject.startswith(self._inbox_prefix):
            return  # some other subscription of the application: not a request's concern
        action = {"publish": "publish", "subscription": "subscribe"}.get(kind, "reply")
        denial = Denial(action, subject)
        for token, (waiting_subject, task) in list(self._waiting.items()):
            if token in self._denied or (publish and waiting_subject != canonical):
                continue
            self._denied[token] = denial
            task.cancel()


def _canonical(subject: str) -> str:
    """``subject`` lowercased, a partition subject as the RPC subject it was mapped from."""
    lowered = subject.lower()
    mapped = _PARTITION_SUBJECT.match(lowered)
    return lowered if mapped is None else f"{mapped.group(1)}.rpc.{mapped.group(2)}"
