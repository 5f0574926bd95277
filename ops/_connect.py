"""One-shot NATS connections for commands (``call``, ``status``, ``replay``, ``tail``)."""

from __future__ import annotations

from typing import Final

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._errors import CannotConnectError
from ndo.service import NatsAuth, is_refusal, redact_url, refusal_hint, split_servers

__all__ = ["DEFAULT_NATS_URL", "CannotConnectError", "connect_once"]

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
"""Where commands look for NATS without ``--nats-url`` (``ndo serve``'s embedded server)."""

_CLIENT_CERT_HINT: Final = (
    "the server closed the connection: if it verifies client certificates (tls { verify: true "
    "}), pass --tls-cert and --tls-key"
)


async def connect_once(
    url: str,
    auth: NatsAuth | None = None,
    *,
    hint: str = "pass --nats-url (or NDO_NATS_URL)",
    name: str = "ndo",
) -> NatsClient:
    """Connect without reconnects, failing within a few seconds when nothing answers.

    ``url`` may list several servers of one cluster, separated by commas; ``auth`` carries the
    credentials and TLS files.

    Raises:
        CannotConnectError: the server cannot be reached or refused us; the message (with the
            URL's password hidden) ends with what to do: ``hint``, or how to fix the credentials
            or TLS files.
    """

    async def quiet(error: Exception) -> None:
        """The failure is reported once, by the caller, not as a traceback per attempt."""

    auth = auth or NatsAuth()
    try:
        options = auth.connect_options()
    except ValueError as exc:
        raise CannotConnectError(str(exc)) from None
    try:
        # nats-py treats max_reconnect_attempts=0 as "no limit" for the first connect, so it
        # would retry forever; 1 gives two quick attempts and then NoServersError.
        return await nats.connect(
            servers=split_servers(url),
            name=name,
            connect_timeout=3,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            allow_reconnect=False,
            error_cb=quiet,
            **options,
        )
    except (OSError, nats.errors.Error) as exc:
        raise CannotConnectError(
            f"cannot connect to {redact_url(url)}: {exc}; {_hint_for(exc, hint, auth)}"
        ) from None


def _hint_for(exc: BaseException, default: str, auth: NatsAuth) -> str:
    """What to do about a failed connect: fix credentials, fix TLS, or ``default``.

    A server that verifies clients drops one without a certificate right after the TLS
    handshake, which the client sees only as a lost connection.
    """
    if is_refusal(exc):
        return refusal_hint(exc)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) and auth.tls_cert is None:
        return f"{_CLIENT_CERT_HINT}; else {default}"
    return default
