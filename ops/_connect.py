"""One-shot NATS connections for commands (``call``, ``status``, ``replay``, ``tail``)."""

from __future__ import annotations

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._errors import CannotConnectError
from ndo.service import split_servers

__all__ = ["DEFAULT_NATS_URL", "CannotConnectError", "connect_once"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
"""Where commands look for NATS without ``--nats-url`` (``ndo serve``'s embedded server)."""


async def connect_once(url: str, *, hint: str = "pass --nats-url (or NDO_NATS_URL)") -> NatsClient:
    """Connect without reconnects, failing within a few seconds when nothing answers.

    ``url`` may list several servers of one cluster, separated by commas.

    Raises:
        CannotConnectError: the server cannot be reached; the message ends with ``hint``.
    """

    async def quiet(error: Exception) -> None:
        """The failure is reported once, by the caller, not as a traceback per attempt."""

    try:
        # nats-py treats max_reconnect_attempts=0 as "no limit" for the first connect, so it
        # would retry forever; 1 gives two quick attempts and then NoServersError.
        return await nats.connect(
            servers=split_servers(url),
            connect_timeout=3,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            allow_reconnect=False,
            error_cb=quiet,
        )
    except (OSError, nats.errors.Error) as exc:
        raise CannotConnectError(f"cannot connect to {url}: {exc}; {hint}") from None
