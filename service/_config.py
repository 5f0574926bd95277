"""``WorkerConfig``: every knob of one worker, validated in one place, and how each knob reaches
an operator (``ndo serve`` flag, ``NDO_*`` variable, ``--config`` key).

The operator's side is one table of plain ``WorkerOption`` records right under the class, not
``Annotated`` metadata on each field: the fields stay as readable as before (type, default,
docstring; the runtime reads them by name), the table reads top to bottom in the order
``ndo serve --help`` lists the options, and each record holds only what the field's type and
default cannot say (the help sentence, a text parser such as ``parse_duration``, a flag name).
Every field is either in ``WORKER_OPTIONS`` or in ``HIDDEN_WORKER_FIELDS``; a test keeps it so,
so a new field cannot be forgotten silently. ``ndo.ops`` turns the table into argparse options;
nothing here knows argparse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from ndo.actors.runtime import StorageLimits
from ndo.service._connection import NatsAuth, redact_url
from ndo.service._units import parse_duration, parse_size
from ndo.subjects import (
    DEFAULT_PARTITIONS,
    DEFAULT_PREFIX,
    DEFAULT_REPLY_PREFIXES,
    InvalidSubjectError,
    parse_reply_prefixes,
    validate_prefix,
)

__all__ = [
    "HIDDEN_WORKER_FIELDS",
    "WORKER_OPTIONS",
    "WorkerConfig",
    "WorkerOption",
    "split_servers",
]


def split_servers(url: str) -> list[str]:
    """The servers of a comma-separated NATS URL list: ``"nats://a:4222, nats://b:4222"`` ->
    ``["nats://a:4222", "nats://b:4222"]`` (nats-py refuses the joined string)."""
    return [part.strip() for part in url.split(",") if part.strip()]


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Configuration of one ndo worker (``ndo serve`` builds it from flags and ``NDO_*``)."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server(s) to connect to; several servers of one cluster are separated by commas."""
    auth: NatsAuth = NatsAuth()
    """Credentials and TLS files for the connection (set by the connection options every
    command shares, ``--nats-creds`` ... ``--tls-key``)."""
    prefix: str = DEFAULT_PREFIX
    """Subject prefix: requests arrive on ``<prefix>.rpc.<Class>.<id>.<method>``."""
    caller_info: bool = False
    """Tell handlers who called (``Actor.caller``) from the ``Nats-Request-Info`` header the
    server adds on service imports that share it. Any client can put that header on a request
    it publishes directly, so turn this on only where every request reaches the workers
    through such an import (workers in an account of their own: ``docs/security.md``)."""
    reply_prefixes: tuple[str, ...] = DEFAULT_REPLY_PREFIXES
    """The only subjects answers, forwards and errors are published to: inboxes. A request whose
    reply subject lies elsewhere is dropped and counted (``ndo_rejected_total``)."""
    data_dir: Path = Path("ndo-data")
    """Directory of the SQLite database."""
    partitions: int = DEFAULT_PARTITIONS
    """Partition count of the deployment (fixed once data exists)."""
    worker_name: str = ""
    """Name shown in logs, metrics and status; defaults to host-pid."""
    max_active: int = 10_000
    """Most objects kept in memory; beyond it the least recently used idle ones are evicted, and
    when every one is busy a new object is refused with 503 "overloaded"."""
    idle_timeout: float = 300.0
    """Seconds without messages after which an object is evicted."""
    scan_interval: float = 1.0
    """Seconds between idle-eviction scans."""
    max_mailbox: int = 1_000
    """Messages that may wait for one object; beyond it callers get 503 overloaded."""
    handler_timeout: float = 30.0
    """Seconds a handler may run before it is cancelled with 504 and its writes discarded."""
    max_payload: int = 1024 * 1024
    """Largest request body accepted, in bytes (also capped by the server's max_payload)."""
    max_key_bytes: int = 2048
    """Longest storage key, in UTF-8 bytes."""
    max_value_bytes: int = 128 * 1024
    """Largest encoded storage value, in bytes."""
    max_keys_per_call: int = 128
    """Most keys in one ``get_many`` / ``put_many`` / ``delete_many``."""
    max_turn_bytes: int = 32 * 1024 * 1024
    """Most bytes one call may write (keys, values and 10 bytes per key; with
    ``storage="replicated"`` also at most what one partition log record holds); 0: no limit."""
    max_object_bytes: int = 1024 * 1024 * 1024
    """Most bytes one object may store (its keys and values); a call that would grow it past
    this fails with 413 ``object_too_large``, one that shrinks it always succeeds; 0: no limit."""
    drain_timeout: float = 30.0
    """Seconds shutdown waits for queued messages to finish."""
    idempotency_window: float = 300.0
    """Seconds a committed idempotency key keeps its stored reply."""
    alarm_max_attempts: int = 6
    """Deliveries of a failing alarm before it is dropped."""
    alarm_initial_backoff: float = 1.0
    """Seconds before the first alarm retry; doubles each time."""
    ownership: Literal["auto", "leases", "standalone"] = "auto"
    """How partitions are owned: ``leases`` (JetStream KV leases shared with other workers),
    ``standalone`` (this worker owns every partition; run one worker only) or ``auto`` (leases
    when the server has JetStream, else standalone with a warning)."""
    lease_ttl: int = 3
    """Whole seconds a partition lease lives without renewal (renewed every third of it): the
    bound on taking over from a worker that died. Clients should retry for longer than this."""
    storage: Literal["local", "replicated"] = "local"
    """Where partitions are durable: ``local`` (SQLite files in ``data_dir``, fsynced; workers
    share that directory, so one machine) or ``replicated`` (a JetStream log per partition,
    replicated by the NATS cluster; each worker keeps its own copy in its own ``data_dir``)."""
    replicas: int = 0
    """Replicas of every JetStream asset this worker creates (lease bucket, journal, partition
    logs, snapshots); 0: the cluster's size, up to 3."""
    snapshot_every: int = 1_000
    """Log records of a partition between two snapshots (``storage="replicated"``); the log is
    purged below each snapshot."""
    append_timeout: float = 30.0
    """Seconds a partition log append keeps retrying without an acknowledgement (a stream
    leader election takes several) before its turns fail and the partition is re-read."""
    journal: bool = True
    """Record turns to the JetStream journal stream (skipped, with a warning, when the server has
    no JetStream)."""
    journal_reads: bool = False
    """Also record read-only turns that succeeded (by default the journal records every turn that
    changed state, every alarm delivery and every failure, not successful reads)."""
    journal_max_age: float = 7 * 24 * 3600.0
    """Seconds the journal keeps a record (stream ``max_age``)."""
    journal_max_bytes: int = 1024 * 1024 * 1024
    """Bytes the journal stream may hold before the oldest records go (stream ``max_bytes``)."""
    journal_max_pending: int = 10_000
    """Journal records buffered or awaiting acknowledgement before new ones are dropped."""

    def __repr__(self) -> str:
        """Every field, with the URL's password (or token) hidden (``NatsAuth`` hides its own)."""
        shown = (
            f"{name}={redact_url(self.nats_url)!r}"
            if name == "nats_url"
            else f"{name}={getattr(self, name)!r}"
            for name in self.__struct_fields__
        )
        return f"WorkerConfig({', '.join(shown)})"

    __str__ = __repr__

    def storage_limits(self) -> StorageLimits:
        """The limits every ``self.storage`` call of an object checks."""
        return StorageLimits(
            max_key_bytes=self.max_key_bytes,
            max_value_bytes=self.max_value_bytes,
            max_keys_per_call=self.max_keys_per_call,
            max_turn_bytes=self.max_turn_bytes,
            max_object_bytes=self.max_object_bytes,
        )

    def __post_init__(self) -> None:
        """Validate values and say how to fix a bad one."""
        try:
            validate_prefix(self.prefix)
        except InvalidSubjectError as exc:
            raise ValueError(str(exc)) from None
        positive = {
            "partitions": self.partitions,
            "max_active": self.max_active,
            "idle_timeout": self.idle_timeout,
            "scan_interval": self.scan_interval,
            "max_mailbox": self.max_mailbox,
            "handler_timeout": self.handler_timeout,
            "max_payload": self.max_payload,
            "max_key_bytes": self.max_key_bytes,
            "max_value_bytes": self.max_value_bytes,
            "max_keys_per_call": self.max_keys_per_call,
            "drain_timeout": self.drain_timeout,
            "idempotency_window": self.idempotency_window,
            "alarm_max_attempts": self.alarm_max_attempts,
            "alarm_initial_backoff": self.alarm_initial_backoff,
            "lease_ttl": self.lease_ttl,
            "snapshot_every": self.snapshot_every,
            "append_timeout": self.append_timeout,
            "journal_max_age": self.journal_max_age,
            "journal_max_bytes": self.journal_max_bytes,
            "journal_max_pending": self.journal_max_pending,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in ("max_turn_bytes", "max_object_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if self.partitions > 4096:
            raise ValueError(f"partitions must be <= 4096, got {self.partitions}")
        if self.ownership not in ("auto", "leases", "standalone"):
            raise ValueError(
                f"ownership must be 'auto', 'leases' or 'standalone', got {self.ownership!r}"
            )
        if self.storage not in ("local", "replicated"):
            raise ValueError(f"storage must be 'local' or 'replicated', got {self.storage!r}")
        if not 0 <= self.replicas <= 5:
            raise ValueError(
                f"replicas must be 0 (the cluster's size, up to 3) or 1-5, got {self.replicas}"
            )
        if self.storage == "replicated" and self.ownership == "standalone":
            raise ValueError(
                "storage='replicated' shares partitions through JetStream leases: drop "
                "ownership='standalone' (--ownership standalone)"
            )
        if parse_reply_prefixes(self.reply_prefixes) != self.reply_prefixes:
            raise ValueError(
                "reply_prefixes must be inbox prefixes ending with '.', e.g. "
                f"('_INBOX.', '_R_.'), got {self.reply_prefixes!r}"
            )
        if any(p.startswith(self.prefix + ".") for p in self.reply_prefixes):
            raise ValueError(
                f"reply prefixes must not lie under the subject prefix {self.prefix!r}: "
                "answers would reach the workers' own subjects"
            )
        self.auth.check()
        if not self.nats_servers():
            raise ValueError("nats_url must name at least one server, e.g. nats://127.0.0.1:4222")

    def nats_servers(self) -> list[str]:
        """The servers of ``nats_url`` (comma-separated), as ``nats.connect(servers=...)``
        takes them."""
        return split_servers(self.nats_url)


class WorkerOption(msgspec.Struct, frozen=True, kw_only=True):
    """How one ``WorkerConfig`` field is set from outside: ``ndo serve --<field>``,
    ``NDO_<FIELD>`` and the ``<field>`` key of a ``--config`` file.

    The value's type, default and choices come from the field itself (``int``, ``float``,
    ``str``, ``Path``; a ``Literal`` gives the choices; a ``bool`` is an on/off switch).
    """

    field: str
    """The ``WorkerConfig`` field the option sets."""
    help: str
    """The sentence ``ndo serve --help`` shows (the env variable and default are appended)."""
    parse: Callable[[str], Any] | None = None
    """Reads the value from text (a flag, a variable, a file); ``None``: the field's type."""
    flag: str = ""
    """The flag when it is not ``--<field-with-dashes>``, e.g. ``--no-journal``."""
    default_text: str = ""
    """The default as an operator would write it, where ``str(default)`` is not that."""


WORKER_OPTIONS: Final[tuple[WorkerOption, ...]] = (
    WorkerOption(
        field="nats_url", help="NATS server URL; several servers of one cluster separated by commas"
    ),
    WorkerOption(field="prefix", help="subject prefix"),
    WorkerOption(
        field="caller_info",
        help="give handlers the caller's account and user (self.caller) from the header the "
        "server adds on shared service imports; only where all requests arrive through one",
    ),
    WorkerOption(
        field="reply_prefixes",
        help="inbox prefixes answers may go to (comma-separated); requests naming any other "
        "reply subject are dropped",
        parse=parse_reply_prefixes,
        default_text=",".join(DEFAULT_REPLY_PREFIXES),
    ),
    WorkerOption(
        field="data_dir",
        help="directory for SQLite and JetStream data",
        default_text="./ndo-data",
    ),
    WorkerOption(field="partitions", help="partition count, fixed per deployment"),
    WorkerOption(
        field="max_active",
        help="most objects in memory: idle ones are evicted LRU, and when all are busy new "
        "ones get 503 overloaded",
    ),
    WorkerOption(field="idle_timeout", help="seconds before an idle object is evicted"),
    WorkerOption(
        field="handler_timeout", help="seconds a handler may run before it fails with 504"
    ),
    WorkerOption(field="max_payload", help="largest request body in bytes"),
    WorkerOption(field="max_mailbox", help="messages that may queue for one object before 503"),
    WorkerOption(field="drain_timeout", help="seconds shutdown waits for queued messages"),
    WorkerOption(
        field="idempotency_window", help="seconds a committed Idempotency-Key is remembered"
    ),
    WorkerOption(field="max_value_bytes", help="largest stored value in bytes"),
    WorkerOption(field="max_key_bytes", help="longest storage key in bytes"),
    WorkerOption(
        field="max_turn_bytes",
        help="most bytes one call may write (keys and values), e.g. 8M; 0: no limit",
        parse=parse_size,
        default_text="32M",
    ),
    WorkerOption(
        field="max_object_bytes",
        help="most bytes one object may store (keys and values), e.g. 100M; 0: no limit",
        parse=parse_size,
        default_text="1G",
    ),
    WorkerOption(
        field="journal",
        help="do not record turns to the JetStream journal",
        flag="--no-journal",
    ),
    WorkerOption(
        field="journal_reads",
        help="also journal read-only calls that succeeded (off: the journal keeps every call "
        "that changed state or failed, and alarms)",
    ),
    WorkerOption(
        field="journal_max_age",
        help="how long the journal keeps records, e.g. 12h, 7d",
        parse=parse_duration,
        default_text="7d",
    ),
    WorkerOption(
        field="journal_max_bytes",
        help="size the journal stream may reach before the oldest records go, e.g. 512M, 10G",
        parse=parse_size,
        default_text="1G",
    ),
    WorkerOption(
        field="worker_name", help="name in logs and `ndo status`", default_text="host-pid"
    ),
    WorkerOption(
        field="lease_ttl",
        help="whole seconds a partition lease lives without renewal: the takeover bound when "
        "a worker dies",
    ),
    WorkerOption(
        field="storage",
        help="local: SQLite in --data-dir, shared by the workers of one machine; replicated: "
        "a JetStream log per partition, each worker with its own --data-dir (many machines)",
    ),
    WorkerOption(
        field="replicas",
        help="replicas of the JetStream assets ndo creates (leases, journal, logs, snapshots)",
        default_text="cluster size, up to 3",
    ),
    WorkerOption(
        field="snapshot_every",
        help="with --storage replicated: log records of a partition between snapshots",
    ),
    WorkerOption(
        field="ownership",
        help="share partitions with other workers through JetStream leases, or serve them all "
        "alone; auto: leases when the server has JetStream",
    ),
)
"""The worker settings an operator can set, in the order ``ndo serve --help`` lists them."""

HIDDEN_WORKER_FIELDS: Final = frozenset(
    {
        "alarm_initial_backoff",
        "alarm_max_attempts",
        "journal_max_pending",
        "append_timeout",
        "auth",
        "max_keys_per_call",
        "scan_interval",
    }
)
"""Fields with no option of their own: internal tuning knobs set by code (``WorkerConfig(...)``),
and ``auth``, which the connection options every command shares set (``ops/_options.py``)."""
