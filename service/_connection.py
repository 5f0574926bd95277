"""How ndo authenticates to NATS: ``NatsAuth`` (credentials and TLS files) and ``redact_url``.

One record serves every connection ndo opens — the worker's and those of ``ndo call``,
``status``, ``replay`` and ``tail`` — so a secured cluster (a private CA, client certificates,
JWT ``.creds`` files, NKeys, tokens, user and password) works the same everywhere.
``NatsAuth.connect_options`` turns the record into ``nats.connect`` keyword arguments and checks
the files up front, so a typo is a one-line error naming the option, not a handshake failure.

Secrets never leave this module in clear: ``repr(NatsAuth(...))`` hides the token and password,
and ``redact_url`` hides the password (or token) a NATS URL carries before it is logged.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import nats.errors

__all__ = ["NatsAuth", "is_refusal", "redact_url", "refusal_hint"]

_HIDDEN: Final = "***"
"""What a secret is shown as."""


class NatsAuth(msgspec.Struct, frozen=True, kw_only=True):
    """Credentials and TLS settings for a NATS connection; every field is optional.

    At most one of ``creds``, ``nkey``, ``token`` and ``user`` may be set (the server takes one
    identity per connection). A user and password may also come in the URL
    (``nats://alice:secret@host:4222``).
    """

    creds: Path | None = None
    """JWT credentials file (``.creds``: the user JWT and its NKey seed; operator mode)."""
    nkey: Path | None = None
    """File holding an NKey seed (``SU...``) whose public key the server knows."""
    token: str = ""
    """Authentication token."""
    user: str = ""
    """User name (with ``password``)."""
    password: str = ""
    """Password of ``user``."""
    tls_ca: Path | None = None
    """PEM file of the CA(s) that signed the server's certificate (a private CA)."""
    tls_cert: Path | None = None
    """PEM client certificate, for servers that verify clients (``verify: true``)."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""

    def __repr__(self) -> str:
        """Show which settings are present, never a secret."""
        shown = [
            f"{name}={value!r}"
            for name, value in (
                ("creds", self.creds),
                ("nkey", self.nkey),
                ("user", self.user),
                ("tls_ca", self.tls_ca),
                ("tls_cert", self.tls_cert),
                ("tls_key", self.tls_key),
            )
            if value
        ]
        shown += [f"{name}={_HIDDEN!r}" for name in ("token", "password") if getattr(self, name)]
        return f"NatsAuth({', '.join(shown)})"

    __str__ = __repr__

    @property
    def uses_tls(self) -> bool:
        """Whether a CA or a client certificate was given."""
        return any((self.tls_ca, self.tls_cert, self.tls_key))

    def check(self) -> None:
        """Refuse contradictory settings and unreadable files.

        Raises:
            ValueError: the message names the option (``--tls-ca``) and what to do.
        """
        identities = [
            flag
            for flag, value in (
                ("--nats-creds", self.creds),
                ("--nats-nkey", self.nkey),
                ("--nats-token", self.token),
                ("--nats-user", self.user),
            )
            if value
        ]
        if len(identities) > 1:
            raise ValueError(
                f"{' and '.join(identities)} are alternatives: a connection authenticates one "
                "way; keep one of them"
            )
        if self.password and not self.user:
            raise ValueError("--nats-password needs --nats-user")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
        for flag, path in (
            ("--nats-creds", self.creds),
            ("--nats-nkey", self.nkey),
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (after ``check``).

        Raises:
            ValueError: a setting is contradictory, a file is missing, or the TLS files cannot be
                loaded (not PEM, key not matching the certificate).
        """
        self.check()
        options: dict[str, Any] = {}
        if self.creds is not None:
            options["user_credentials"] = str(self.creds)
        if self.nkey is not None:
            options["nkeys_seed"] = str(self.nkey)
        if self.token:
            options["token"] = self.token
        if self.user:
            options["user"] = self.user
            options["password"] = self.password
        if self.uses_tls:
            options["tls"] = self.tls_context()
        return options

    def tls_context(self) -> ssl.SSLContext:
        """A client TLS context trusting ``tls_ca`` (else the system CAs), presenting
        ``tls_cert`` when given.

        Raises:
            ValueError: a file cannot be loaded; the message names it.
        """
        try:
            context = ssl.create_default_context(
                cafile=None if self.tls_ca is None else str(self.tls_ca)
            )
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--tls-ca {self.tls_ca}: not a PEM CA certificate ({exc})") from None
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"--tls-cert {self.tls_cert} / --tls-key {self.tls_key}: cannot load the "
                    f"client certificate ({exc}); both must be PEM and the key must match"
                ) from None
        return context


def is_refusal(error: BaseException) -> bool:
    """Whether a connect ``error`` is a server refusing us (credentials, TLS), which no retry
    can fix, rather than a server that is not there."""
    text = str(error).lower()
    return (
        isinstance(error, nats.errors.AuthorizationError | ssl.SSLError)
        or "authorization violation" in text
        or "authentication" in text
        or "tls" in text
        or "certificate" in text
    )


def refusal_hint(error: BaseException) -> str:
    """What to do about a refusal: fix the credentials, or the TLS files."""
    text = str(error).lower()
    if isinstance(error, ssl.SSLError) or "tls" in text or "certificate" in text:
        return (
            "the TLS handshake failed: pass --tls-ca with the CA that signed the server's "
            "certificate, and --tls-cert/--tls-key if the server verifies clients"
        )
    return (
        "the server refused these credentials: check --nats-creds, --nats-nkey, --nats-token "
        "or --nats-user/--nats-password (or the user:password in the URL)"
    )


def redact_url(url: str) -> str:
    """``url`` (one server or several, comma-separated) with passwords and tokens hidden:
    ``nats://alice:secret@h:4222`` -> ``nats://alice:***@h:4222``, ``nats://tok@h`` ->
    ``nats://***@h``."""
    return ",".join(_redact_one(part.strip()) for part in url.split(",") if part.strip())


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
    except ValueError:
        return _HIDDEN  # not a URL we can read: show nothing of it
    if "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:{_HIDDEN}" if colon else _HIDDEN
    return parts._replace(netloc=f"{hidden}@{host}").geturl()
