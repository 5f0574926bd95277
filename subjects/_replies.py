"""Which reply subjects a worker may answer: only inboxes.

A request's reply subject is the caller's choice, and publishing the answer is a write with the
worker's rights. Without a check, a request naming ``$KV.ndo-leases.leases.3`` as its reply makes
the worker overwrite its own lease record (see ``NATS-NOTES.md``). So a worker answers, forwards
and reports errors only to subjects under the deployment's inbox prefixes: nats-py, nats.js, the
Go client and the ``nats`` CLI all use ``_INBOX.`` by default, and the server uses ``_R_.`` for
replies that cross accounts through a service import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["DEFAULT_REPLY_PREFIXES", "is_reply_subject", "parse_reply_prefixes"]

DEFAULT_REPLY_PREFIXES: Final[tuple[str, ...]] = ("_INBOX.", "_R_.")
"""Reply subjects a worker answers by default: client inboxes and cross-account replies."""


def is_reply_subject(subject: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``subject`` lies under one of the inbox ``prefixes`` and has a token after it."""
    return subject.startswith(prefixes) and not subject.endswith(".") and " " not in subject


def parse_reply_prefixes(text: str | Iterable[str]) -> tuple[str, ...]:
    """Read inbox prefixes from ``"_INBOX.,_R_.,_MYAPP_INBOX."`` (or a list of them).

    Each prefix gets a trailing dot if it has none, so ``_INBOX`` cannot match ``_INBOXES.x``.

    Raises:
        ValueError: no prefix, or one that is empty, has a wildcard or whitespace, or starts
            with ``$`` (the server's API subjects are never inboxes).
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    prefixes: list[str] = []
    for part in parts:
        prefix = part.strip()
        if not prefix:
            continue
        if any(c in prefix for c in "*> \t") or prefix.startswith("$") or ".." in prefix:
            raise ValueError(
                f"reply prefix {prefix!r} is not an inbox prefix: use literal subject tokens "
                "such as _INBOX. (no wildcards, no $-subjects)"
            )
        prefixes.append(prefix if prefix.endswith(".") else prefix + ".")
    if not prefixes:
        raise ValueError("give at least one reply prefix, e.g. _INBOX.,_R_.")
    return tuple(dict.fromkeys(prefixes))
