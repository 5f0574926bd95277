"""The ndo subject scheme: building, parsing and validating subjects and object IDs.

Everything in ndo that needs a subject string gets it from here, so the wire protocol is defined
in exactly one place. Pure functions, no I/O.

Subjects (``<prefix>`` defaults to ``ndo``)::

    <prefix>.rpc.<Class>.<id>.<method>     request an object method (request-reply)
    <prefix>.evt.<Class>.<id>.<topic>      events an object emits after a commit
    <prefix>.sys.<...>                     internal subjects (journal, control)
    <prefix>.sys.inspect.<p>.<op>          ``ndo inspect``'s requests to partition p's holder
"""

from __future__ import annotations

import hashlib
import re
import uuid
from enum import StrEnum
from typing import Final, NamedTuple

__all__ = [
    "DEFAULT_PREFIX",
    "INSPECT_READS",
    "INSPECT_WRITES",
    "MAX_ID_LENGTH",
    "MAX_NAME_LENGTH",
    "MSGPACK_CONTENT_TYPE",
    "Header",
    "InvalidSubjectError",
    "RpcAddress",
    "event_subject",
    "event_wildcard",
    "forward_subject",
    "forward_wildcard",
    "id_from_name",
    "inspect_subject",
    "inspect_wildcard",
    "is_valid_id",
    "journal_subject",
    "journal_wildcard",
    "legacy_journal_subject",
    "log_subject",
    "new_unique_id",
    "parse_rpc_subject",
    "partition_mapping",
    "partition_wildcard",
    "rpc_subject",
    "rpc_wildcard",
    "sys_subject",
    "validate_id",
    "validate_name",
    "validate_prefix",
]

DEFAULT_PREFIX: Final = "ndo"
"""Subject prefix used when none is configured."""

MAX_ID_LENGTH: Final = 128
"""Longest object ID accepted, in characters."""

MAX_NAME_LENGTH: Final = 64
"""Longest class, method or topic name accepted, in characters."""

_ID_RE: Final = re.compile(r"[A-Za-z0-9_\-]+")
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9_\-]+")
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")


class Header(StrEnum):
    """NATS header names that are part of the ndo wire protocol."""

    CONTENT_TYPE = "Content-Type"
    """``application/msgpack`` switches request and reply bodies to MessagePack."""
    IDEMPOTENCY_KEY = "Idempotency-Key"
    """A request key that makes a retried call apply at most once."""
    NATS_MSG_ID = "Nats-Msg-Id"
    """Accepted as an idempotency key when ``Idempotency-Key`` is absent."""
    ERROR_CODE = "Nats-Service-Error-Code"
    """HTTP-like error code on an error reply (400, 404, 409, 413, 500, 503, 504)."""
    ERROR = "Nats-Service-Error"
    """Human-readable error description on an error reply."""
    CALL_CHAIN = "Ndo-Call-Chain"
    """Objects waiting on this request, outermost first (``Class/id,...``): set on calls from
    one object to another, so a call back into one of them is refused instead of deadlocking."""
    TIMEOUT_MS = "Ndo-Timeout-Ms"
    """Milliseconds the caller will still wait for the reply; the worker does not run a request
    after that, and caps its handler's deadline with it."""
    REQUEST_INFO = "Nats-Request-Info"
    """Who sent a request, added by the server on a service import that shares it (JSON with
    ``acc``, ``user``, ``name``, ...); read only with ``WorkerConfig.caller_info``."""


MSGPACK_CONTENT_TYPE: Final = "application/msgpack"
"""Content type that switches a request (and its reply) to MessagePack."""


class InvalidSubjectError(ValueError):
    """A subject, name or ID does not follow the ndo naming rules (not retryable)."""


class RpcAddress(NamedTuple):
    """The three parts of an RPC subject after the prefix."""

    class_name: str
    object_id: str
    method: str


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid subject prefix (dot-separated tokens, no wildcards).

    Raises:
        InvalidSubjectError: with what is wrong and what would be accepted.
    """
    if not _PREFIX_RE.fullmatch(prefix):
        raise InvalidSubjectError(
            f"invalid subject prefix {prefix!r}: use dot-separated tokens of letters, digits, "
            "'-' and '_' (e.g. 'ndo' or 'acme.ndo')"
        )
    return prefix


def validate_name(name: str, kind: str = "name") -> str:
    """Return ``name`` if it is a valid class, method or topic name (a Python identifier).

    Args:
        name: the name to check.
        kind: what the name is, for the error message ("class", "method", ...).

    Raises:
        InvalidSubjectError: the name is empty, too long or not an identifier.
    """
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise InvalidSubjectError(
            f"invalid {kind} name {name!r}: use letters, digits and '_' (not starting with a "
            f"digit), at most {MAX_NAME_LENGTH} characters"
        )
    return name


def is_valid_id(object_id: str) -> bool:
    """Tell whether ``object_id`` can be used as an object ID as it is."""
    return len(object_id) <= MAX_ID_LENGTH and _ID_RE.fullmatch(object_id) is not None


def validate_id(object_id: str) -> str:
    """Return ``object_id`` if it is a valid object ID (one subject token).

    Raises:
        InvalidSubjectError: the ID has dots, spaces, wildcards or other characters, or is too long;
            the message suggests ``id_from_name``.
    """
    if not is_valid_id(object_id):
        raise InvalidSubjectError(
            f"invalid object id {object_id!r}: use 1-{MAX_ID_LENGTH} letters, digits, '-' or '_'; "
            "for arbitrary names use subjects.id_from_name(name)"
        )
    return object_id


def id_from_name(name: str) -> str:
    """Derive a stable object ID from any string (32 hex characters of its SHA-256).

    The same name always maps to the same ID, in every language: ``sha256(utf8(name))[:16]`` hex.
    """
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


def new_unique_id() -> str:
    """Return a new random object ID (32 hex characters)."""
    return uuid.uuid4().hex


def rpc_subject(prefix: str, class_name: str, object_id: str, method: str) -> str:
    """Build the request subject for ``method`` on object ``(class_name, object_id)``."""
    validate_name(class_name, "class")
    validate_id(object_id)
    validate_name(method, "method")
    return f"{prefix}.rpc.{class_name}.{object_id}.{method}"


def rpc_wildcard(prefix: str) -> str:
    """Subject that matches every RPC request under ``prefix``."""
    return f"{prefix}.rpc.*.*.*"


def parse_rpc_subject(prefix: str, subject: str) -> RpcAddress:
    """Split an RPC subject into class, id and method, validating each.

    Raises:
        InvalidSubjectError: the subject is not ``<prefix>.rpc.<Class>.<id>.<method>`` or a part
            is invalid.
    """
    head = f"{prefix}.rpc."
    if not subject.startswith(head):
        raise InvalidSubjectError(f"subject {subject!r} is not under {head}")
    parts = subject[len(head) :].split(".")
    if len(parts) != 3:
        raise InvalidSubjectError(
            f"subject {subject!r} must be {head}<Class>.<id>.<method> "
            "(object ids cannot contain '.')"
        )
    class_name, object_id, method = parts
    validate_name(class_name, "class")
    validate_id(object_id)
    validate_name(method, "method")
    return RpcAddress(class_name, object_id, method)


def event_subject(prefix: str, class_name: str, object_id: str, topic: str) -> str:
    """Build the subject an object's event on ``topic`` is published to."""
    if len(topic) > MAX_NAME_LENGTH or not _TOPIC_RE.fullmatch(topic):
        raise InvalidSubjectError(
            f"invalid event topic {topic!r}: use 1-{MAX_NAME_LENGTH} letters, digits, '-' or '_'"
        )
    return f"{prefix}.evt.{class_name}.{object_id}.{topic}"


def event_wildcard(prefix: str, class_name: str, object_id: str, topic: str = "*") -> str:
    """Subject to subscribe to an object's events; ``topic`` may be ``*`` or ``>``."""
    if topic not in ("*", ">"):
        return event_subject(prefix, class_name, object_id, topic)
    return f"{prefix}.evt.{class_name}.{object_id}.{topic}"


def sys_subject(prefix: str, *tokens: str) -> str:
    """Build an internal subject under ``<prefix>.sys``."""
    return ".".join((prefix, "sys", *tokens))


def partition_wildcard(prefix: str, partition: int | None = None) -> str:
    """Requests the server mapped onto ``partition`` (any partition when None):
    ``<prefix>.part.<p>.<Class>.<id>.<method>``."""
    token = "*" if partition is None else str(partition)
    return f"{prefix}.part.{token}.*.*.*"


def partition_mapping(prefix: str, partitions: int) -> tuple[str, str]:
    """The nats-server subject mapping ``(source, destination)`` that routes RPC subjects onto
    partition subjects with the server's ``partition()`` function (the same FNV-1a hash as
    ``partition_of``)."""
    return (
        rpc_wildcard(prefix),
        f"{prefix}.part.{{{{partition({partitions},1,2)}}}}"
        ".{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}",
    )


def forward_subject(prefix: str, partition: int, rpc_tail: str) -> str:
    """Internal subject a request for ``partition`` is forwarded to by a worker that does not
    hold it (``rpc_tail`` is ``<Class>.<id>.<method>``)."""
    return sys_subject(prefix, "fwd", str(partition), rpc_tail)


def forward_wildcard(prefix: str, partition: int | None = None) -> str:
    """Forwarded requests for ``partition`` (any partition when None)."""
    return sys_subject(prefix, "fwd", "*" if partition is None else str(partition), "*", "*", "*")


INSPECT_READS: Final = ("objects", "show")
"""``ndo inspect``'s read-only operations on a partition (``inspect_subject``)."""
INSPECT_WRITES: Final = ("import", "delete")
"""``ndo inspect``'s operations that change an object, through its owner."""


def inspect_subject(prefix: str, operation: str, partition: int | None = None) -> str:
    """Subject of an ``ndo inspect`` request: ``<prefix>.sys.inspect.<p>.<operation>`` for
    partition ``partition``'s holder, or ``<prefix>.sys.inspect.info`` (``partition`` None) for
    any worker."""
    if partition is None:
        return sys_subject(prefix, "inspect", operation)
    return sys_subject(prefix, "inspect", str(partition), operation)


def inspect_wildcard(prefix: str, partition: int | None = None) -> str:
    """Every ``ndo inspect`` operation on ``partition`` (on any partition when None)."""
    return sys_subject(prefix, "inspect", "*" if partition is None else str(partition), "*")


def log_subject(prefix: str, partition: int | None = None) -> str:
    """Subject of partition ``partition``'s log (``*`` for every partition when None)."""
    return sys_subject(prefix, "log", "*" if partition is None else str(partition))


def journal_subject(prefix: str, shard: int | None = None) -> str:
    """Subject of journal shard ``shard``'s messages (``*`` for every shard when None).

    A journal message holds the records of many turns of the objects of one shard
    (``journal_shard``); ``journal_wildcard`` also matches the per-object subjects that ndo
    before 0.2 wrote one record to each.
    """
    return sys_subject(prefix, "journal", "*" if shard is None else str(shard))


def legacy_journal_subject(prefix: str, class_name: str, object_id: str) -> str:
    """Subject of one object's journal records as ndo wrote them before journal shards (one
    record per message); read back by ``ndo replay`` so older history stays visible."""
    return sys_subject(prefix, "journal", class_name, object_id)


def journal_wildcard(prefix: str) -> str:
    """Subject filter over every journal message (shards, and older per-object subjects)."""
    return sys_subject(prefix, "journal", ">")
