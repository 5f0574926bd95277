"""One-shot NATS connections for commands (``call``, ``status``, ``replay``, ``tail``)."""

from __future__ import annotations

import ssl
from typing import Final

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._errors import CannotConnectError
from ndo.service import NatsAuth, redact_url, split_servers

__all__ = ["DEFAULT_NATS_URL", "CannotConnectError", "connect_once"]

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
"""Where commands look for NATS without ``--nats-url`` (``ndo serve``'s embedded server)."""

_AUTH_HINT: Final = (
    "the server refused these credentials: check --nats-creds, --nats-nkey, --nats-token or "
    "--nats-user/--nats-password (or the user:password in the URL)"
)
_TLS_HINT: Final = (
    "the TLS handshake failed: pass --tls-ca with the CA that signed the server's certificate, "
    "and --tls-cert/--tls-key if the server verifies clients"
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

    try:
        options = (auth or NatsAuth()).connect_options()
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
            f"cannot connect to {redact_url(url)}: {exc}; {_hint_for(exc, hint)}"
        ) from None


def _hint_for(exc: BaseException, default: str) -> str:
    """What to do about a failed connect: fix credentials, fix TLS, or ``default``."""
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization" in text:
        return _AUTH_HINT
    if isinstance(exc, ssl.SSLError) or "tls" in text or "certificate" in text:
        return _TLS_HINT
    return default
