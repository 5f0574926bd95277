"""Who may use the embedded server's WebSocket listener, and with which rights.

A WebSocket listener on 127.0.0.1 is reachable from every web page the developer opens, so
``ndo serve --websocket-port`` never gives browsers the full access local TCP clients have:

* origins: only pages from the listener's own origin, plus those ``--websocket-allowed-origin``
  lists (``EmbeddedNatsServer`` writes ``same_origin`` / ``allowed_origins``);
* rights: a browser is a *caller* (``ndo permissions caller --events``): it may call every
  class's methods and watch their events, and reach nothing internal (``<prefix>.sys.>``,
  ``$KV.>``, ``$JS.API.>``);
* credentials: with ``--websocket-user``/``--websocket-password`` a browser must log in as that
  user to get those rights; one that sends no credentials gets none at all.

Local TCP clients (the worker itself, ``ndo call``) keep connecting without credentials, as
before: the server's ``no_auth_user`` is an unrestricted local user whose password is random and
never shown.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from ndo.ops._permissions import Permissions, caller_permissions, render_user

__all__ = ["BrowserAccess", "browser_access"]

_LOCAL_USER: Final = "ndo-local"
_BROWSER_USER: Final = "ndo-browser"
_NOBODY_USER: Final = "ndo-nobody"
_NOTHING: Final = Permissions(publish=(), subscribe=())


@dataclass(frozen=True, slots=True)
class BrowserAccess:
    """The embedded server's users (``config``) and the user anonymous WebSocket clients get."""

    config: str
    """``authorization { users = [...] }`` and ``no_auth_user``, as nats-server config text."""
    websocket_no_auth_user: str
    """The user a browser without credentials becomes."""


def browser_access(prefix: str, *, user: str = "", password: str = "") -> BrowserAccess:
    """Users for an embedded server with a WebSocket listener: an unrestricted local user for
    TCP clients, and a caller for browsers (``user``/``password`` when given, else anyone).

    Raises:
        ValueError: only one of ``user`` and ``password`` was given.
    """
    if bool(user) != bool(password):
        raise ValueError("--websocket-user and --websocket-password go together")
    browser = caller_permissions(prefix, events=True)
    entries = [
        _unrestricted(_LOCAL_USER),
        render_user(browser, user=user or _BROWSER_USER, password=password or _random()),
    ]
    anonymous = _BROWSER_USER
    if user:
        entries.append(render_user(_NOTHING, user=_NOBODY_USER, password=_random()))
        anonymous = _NOBODY_USER
    config = "\n".join(
        [
            "authorization {",
            "  users = [",
            *entries,
            "  ]",
            "}",
            f'no_auth_user: "{_LOCAL_USER}"',
        ]
    )
    return BrowserAccess(config=config, websocket_no_auth_user=anonymous)


def _unrestricted(user: str) -> str:
    return f'{{ user: "{user}", password: "{_random()}" }}'


def _random() -> str:
    return secrets.token_hex(16)
