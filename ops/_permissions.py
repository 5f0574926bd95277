"""Least-privilege NATS permissions for each role of a deployment, as nats-server config text.

``ndo permissions worker|caller|tools`` prints them; ``docs/security.md`` explains them; the
security tests run workers, callers and tools under exactly these blocks against a real
nats-server, so the printed permissions are the tested ones.

Roles:

* **worker** (``ndo serve``): its request subjects, its own JetStream assets (the lease bucket,
  the journal stream, the partition log stream and the snapshot bucket of its prefix) and
  nothing else: no other stream, no other KV bucket, no ``$SYS``.
* **caller**: the RPC subjects of the classes and methods it may call, in both forms the server
  may check (the subject as published, ``<prefix>.rpc.<Class>.<id>.<method>``, and as the
  partition mapping rewrites it, ``<prefix>.part.<n>.<Class>.<id>.<method>``: nats-server checks
  publish permissions after mapping), its inbox, and optionally the classes' events.
* **tools** (``ndo status``, ``replay``, ``tail``, ``inspect objects|show|export``): read-only
  access to the lease bucket, the journal stream, the partition log stream and the snapshot
  bucket, and ``ndo inspect``'s read requests.
* **admin**: the tools' rights, and ``ndo inspect import`` and ``delete``, which change objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ndo.service import lease_bucket, log_stream_name, snapshot_bucket
from ndo.service.journal import journal_stream_name
from ndo.subjects import (
    DEFAULT_REPLY_PREFIXES,
    INSPECT_READS,
    INSPECT_WRITES,
    inspect_subject,
    validate_name,
    validate_prefix,
)

__all__ = [
    "ROLES",
    "Permissions",
    "admin_permissions",
    "caller_permissions",
    "render_user",
    "tools_permissions",
    "worker_permissions",
]

ROLES: Final = ("worker", "caller", "tools", "admin")
"""The roles ``ndo permissions`` prints."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects one NATS user may publish to and subscribe to (nats-server ``allow`` lists)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _inboxes(reply_prefixes: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{prefix}>" for prefix in reply_prefixes)


def _message_reads(stream: str) -> tuple[str, ...]:
    """Read single messages of one stream (by sequence or last per subject)."""
    return (
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    )


def _stream_admin(stream: str) -> tuple[str, ...]:
    """Create, update, inspect and read one stream (and make consumers on it)."""
    return (
        f"$JS.API.STREAM.*.{stream}",
        *_message_reads(stream),
        f"$JS.API.CONSUMER.*.{stream}",
        f"$JS.API.CONSUMER.*.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
    )


def _stream_reader(stream: str) -> tuple[str, ...]:
    """Inspect and read one stream (no create, update, purge or delete)."""
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        *_message_reads(stream),
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
    )


def worker_permissions(
    prefix: str, *, reply_prefixes: Sequence[str] = DEFAULT_REPLY_PREFIXES
) -> Permissions:
    """What ``ndo serve --prefix prefix`` needs: its subjects and its own JetStream assets."""
    validate_prefix(prefix)
    leases = f"KV_{lease_bucket(prefix)}"
    snapshots = snapshot_bucket(prefix)
    publish = (
        f"{prefix}.>",
        *_inboxes(reply_prefixes),
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        *_stream_admin(leases),
        f"$KV.{lease_bucket(prefix)}.>",
        *_stream_admin(journal_stream_name(prefix)),
        *_stream_admin(log_stream_name(prefix)),
        *_stream_admin(f"OBJ_{snapshots}"),
        f"$O.{snapshots}.>",
        "$JS.FC.>",
    )
    subscribe = (
        f"{prefix}.rpc.>",
        f"{prefix}.part.>",
        f"{prefix}.sys.>",
        "$SRV.>",
        *_inboxes(reply_prefixes[:1]),
    )
    return Permissions(publish, subscribe)


def caller_permissions(
    prefix: str,
    classes: Iterable[str] = (),
    methods: Iterable[str] = (),
    *,
    events: bool = False,
    inbox_prefix: str = DEFAULT_REPLY_PREFIXES[0],
) -> Permissions:
    """What a client needs to call ``methods`` (all: none given) of ``classes`` (all: none
    given), and with ``events`` to watch those classes' events."""
    validate_prefix(prefix)
    class_tokens = [validate_name(name, "class") for name in classes] or ["*"]
    method_tokens = [validate_name(name, "method") for name in methods] or ["*"]
    publish: list[str] = []
    for cls in class_tokens:
        for name in method_tokens:
            publish += [f"{prefix}.rpc.{cls}.*.{name}", f"{prefix}.part.*.{cls}.*.{name}"]
    subscribe = [f"{inbox_prefix}>"]
    if events:
        subscribe += [f"{prefix}.evt.{cls}.>" for cls in class_tokens]
    return Permissions(tuple(publish), tuple(subscribe))


def tools_permissions(prefix: str) -> Permissions:
    """What ``ndo status``, ``replay``, ``tail`` and ``inspect``'s reads need: read the lease
    bucket, the journal and, for ``status`` of replicated storage, the partition logs and
    snapshots; ask partition holders for ``ndo inspect objects``, ``show`` and ``export``."""
    validate_prefix(prefix)
    publish = (
        "$JS.API.INFO",
        *_stream_reader(f"KV_{lease_bucket(prefix)}"),
        *_stream_reader(journal_stream_name(prefix)),
        *_stream_reader(log_stream_name(prefix)),
        *_stream_reader(f"OBJ_{snapshot_bucket(prefix)}"),
        "$JS.FC.>",
        "$SRV.INFO.ndo",
        inspect_subject(prefix, "info"),
        *(f"{prefix}.sys.inspect.*.{op}" for op in INSPECT_READS),
    )
    return Permissions(publish, (f"{DEFAULT_REPLY_PREFIXES[0]}>",))


def admin_permissions(prefix: str) -> Permissions:
    """The tools' rights, and ``ndo inspect import`` and ``delete`` (they change objects,
    through their owners)."""
    tools = tools_permissions(prefix)
    writes = tuple(f"{prefix}.sys.inspect.*.{op}" for op in INSPECT_WRITES)
    return Permissions(tools.publish + writes, tools.subscribe)


def render_user(permissions: Permissions, *, user: str, password: str = "") -> str:
    """One entry of a nats-server ``users = [...]`` list, with ``permissions``, one subject per
    line (an empty list becomes ``deny: [">"]``: nats-server reads an empty ``allow`` as no
    restriction)."""

    def rule(kind: str, subjects: Sequence[str]) -> list[str]:
        if not subjects:
            return [f'    {kind}: {{ deny: [">"] }}']
        listed = [f"        {json.dumps(subject)}" for subject in subjects]
        return [f"    {kind}: {{ allow: [", *listed, "    ] }"]

    lines = [
        "{",
        f"  user: {json.dumps(user)}",
        f"  password: {json.dumps(password or 'CHANGE-ME')}",
        "  permissions: {",
        *rule("publish", permissions.publish),
        *rule("subscribe", permissions.subscribe),
        "  }",
        "}",
    ]
    return "\n".join(lines)
