"""``ndo status``: the deployment as its lease bucket shows it — members, holders, epochs.

A separate module because it is read-only tooling: it reads the bucket the workers maintain
with one snapshot (``ndo.service.read_bucket``, the same view the workers keep) and never
writes. Tests use ``fetch_status`` to
wait for hand-overs the way an operator would watch them.

A value in the bucket that ndo did not write (another client on the bus) never stops the
report: its partition's row says ``(unreadable)`` and a note under the members says why.

The class migrations storage has applied are not in the bucket: each worker reports them in its
NATS service API metadata (``service._discovery``), read here with ``discover_workers``; a
worker of an ndo that does not report them is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from ndo.ops._errors import StatusError
from ndo.ops._text import table
from ndo.service import (
    MIGRATIONS_METADATA,
    SERVICE_NAME,
    OwnershipError,
    PartitionLog,
    SnapshotStore,
    lease_bucket,
    lease_key,
    partitions_text,
    read_bucket,
)
from ndo.storage import StorageError

__all__ = [
    "ClassRename",
    "DeploymentStatus",
    "DiscoveredWorker",
    "MemberStatus",
    "MigrationStatus",
    "PartitionStatus",
    "StatusError",
    "discover_workers",
    "fetch_status",
    "format_discovered",
    "format_status",
    "merged_migrations",
]


class ClassRename(msgspec.Struct, frozen=True, kw_only=True):
    """One class renamed by a migration (``{"from": ..., "to": ...}`` in JSON)."""

    from_: str = msgspec.field(name="from")
    to: str


class MigrationStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A class migration as the workers report it (applied once, by ``worker``)."""

    tag: str
    applied_at: float
    """Epoch seconds it was applied."""
    worker: str
    """The worker that applied it."""
    renamed: list[ClassRename] = []
    deleted: list[str] = []
    objects_renamed: int = 0
    objects_deleted: int = 0


class MemberStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One live worker."""

    id: str
    name: str
    host: str
    pid: int
    started: float
    routing: str
    partitions: list[int]
    """Partitions whose lease it holds."""


class PartitionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One partition's lease (``owner`` None: nobody holds it right now)."""

    partition: int
    owner: str | None = None
    """Member id of the holder."""
    name: str = ""
    """Worker name of the holder."""
    epoch: int = 0
    """Fencing epoch of the holder's tenure."""
    revision: int = 0
    """KV revision of the lease's latest renewal."""
    live_owner: bool = False
    """Whether the holder is a live member (False: a dead worker's lease, about to expire)."""
    log_seq: int | None = None
    """With replicated storage: the partition log's last record (0: empty; None: not read)."""
    applied: int | None = None
    """With replicated storage: the last log record the holder reported applied."""
    snapshot_seq: int | None = None
    """With replicated storage: the log record the latest snapshot covers (None: none)."""
    unreadable: str | None = None
    """Why the lease's value cannot be read (not written by ndo); the workers treat such a
    lease as free and take it over. None: readable or absent."""

    @property
    def behind(self) -> int | None:
        """Log records the holder had not applied at its latest report (None: unknown)."""
        if self.log_seq is None or self.applied is None or self.owner is None:
            return None
        return max(0, self.log_seq - self.applied)


class DeploymentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a deployment."""

    prefix: str
    bucket: str
    partitions: int
    epoch_base: int
    members: list[MemberStatus]
    leases: list[PartitionStatus]
    """One entry per partition, in order."""
    taken_at: float
    storage: str = "local"
    """Where the deployment's partitions are durable: ``local`` or ``replicated``."""
    problems: list[str] = []
    """What could not be read, one note each: bucket entries (``key: why``; foreign or corrupt
    values) and, with replicated storage, partition logs and snapshots (``partition p: why``)."""
    migrations: list[MigrationStatus] | None = None
    """The class migrations the live workers report, oldest first (None: not asked, or no
    worker reported them)."""

    def holders(self) -> dict[int, str]:
        """Partition -> member id of every held partition."""
        return {p.partition: p.owner for p in self.leases if p.owner is not None}

    @property
    def unheld(self) -> list[int]:
        """Partitions nobody holds."""
        return [p.partition for p in self.leases if p.owner is None]


class DiscoveredWorker(msgspec.Struct, frozen=True, kw_only=True):
    """A worker that answered the NATS service API (``$SRV.INFO.ndo``)."""

    name: str
    """The worker's name (``--worker-name``)."""
    classes: list[str]
    """Classes it serves."""
    version: str
    """ndo version it runs."""
    migrations: list[MigrationStatus] | None = None
    """The class migrations its storage has applied (None: it does not report them)."""


async def discover_workers(
    nc: NatsClient, prefix: str, *, wait: float = 0.5, expect: int | None = None
) -> list[DiscoveredWorker]:
    """Workers of deployment ``prefix`` that answer ``$SRV.INFO.ndo`` within ``wait`` seconds
    (any worker, with or without JetStream), sorted by name; ``expect``: stop waiting once that
    many answered."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: dict[str, DiscoveredWorker] = {}
    try:
        await nc.publish(f"$SRV.INFO.{SERVICE_NAME}", b"", reply=inbox)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and (expect is None or len(found) < expect):
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            with contextlib.suppress(msgspec.DecodeError, KeyError, TypeError, AttributeError):
                info = msgspec.json.decode(msg.data)
                metadata = info["metadata"]
                if metadata.get("prefix") != prefix:
                    continue
                name = metadata["worker"]
                classes = [c for c in metadata.get("classes", "").split(",") if c]
                found[name] = DiscoveredWorker(
                    name=name,
                    classes=classes,
                    version=str(info.get("version", "")),
                    migrations=_reported_migrations(metadata.get(MIGRATIONS_METADATA)),
                )
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return sorted(found.values(), key=lambda w: w.name)


def _reported_migrations(value: object) -> list[MigrationStatus] | None:
    """A worker's migrations metadata, decoded (None: absent or not readable)."""
    if not isinstance(value, str):
        return None
    try:
        return msgspec.json.decode(value, type=list[MigrationStatus])
    except msgspec.DecodeError:
        return None


def merged_migrations(workers: Sequence[DiscoveredWorker]) -> list[MigrationStatus] | None:
    """The migrations the ``workers`` report, each tag once, oldest first (None: none of them
    reports migrations)."""
    reports = [w.migrations for w in workers if w.migrations is not None]
    if not reports:
        return None
    by_tag: dict[str, MigrationStatus] = {}
    for report in reports:
        for migration in report:
            by_tag.setdefault(migration.tag, migration)
    return sorted(by_tag.values(), key=lambda m: m.applied_at)


def format_discovered(workers: Sequence[DiscoveredWorker], reason: str) -> str:
    """Text table of workers found through discovery when there is no lease bucket."""
    lines = [f"{reason}; workers answering the NATS service API:", ""]
    lines += table(
        ("WORKER", "VERSION", "CLASSES"),
        [(w.name, w.version, ",".join(w.classes)) for w in workers],
    )
    lines += ["", "each serves every partition alone (no leases): run only one per deployment"]
    lines += _migrations_lines(merged_migrations(workers))
    return "\n".join(lines)


def _migrations_lines(migrations: list[MigrationStatus] | None) -> list[str]:
    """The "Class migrations" section of the text status."""
    if migrations is None:
        return []
    if not migrations:
        return ["", "class migrations: none applied"]
    return [
        "",
        "class migrations (applied once each, in this order):",
        *table(
            ("TAG", "APPLIED (UTC)", "BY", "CHANGES", "OBJECTS"),
            [
                (
                    m.tag,
                    datetime.datetime.fromtimestamp(m.applied_at, datetime.UTC).strftime(
                        "%Y-%m-%d %H:%M:%S"
                    ),
                    m.worker,
                    ", ".join(
                        [f"renamed {r.from_} -> {r.to}" for r in m.renamed]
                        + [f"deleted {c}" for c in m.deleted]
                    ),
                    f"{m.objects_renamed} renamed, {m.objects_deleted} deleted",
                )
                for m in migrations
            ],
        ),
    ]


async def fetch_status(
    nc: NatsClient, prefix: str, *, replication: bool = True, migrations: bool = False
) -> DeploymentStatus:
    """Read a deployment's members and leases (and, with replicated storage and
    ``replication``, each partition's log position and snapshot; with ``migrations``, the class
    migrations the live workers report, asked through the NATS service API).

    Raises:
        StatusError: no JetStream, or no lease bucket (no worker ever ran with leases).
    """
    bucket = lease_bucket(prefix)
    try:
        config, view, problems = await read_bucket(nc, prefix)
    except nats.js.errors.BucketNotFoundError:
        raise StatusError(
            f"no lease bucket {bucket!r}: no worker with prefix {prefix!r} has run with leases "
            "(a worker without JetStream serves alone and keeps no status)"
        ) from None
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise StatusError("the NATS server has no JetStream: there is no lease bucket") from None
    except OwnershipError as exc:
        raise StatusError(str(exc)) from None
    held: dict[str, list[int]] = {m: [] for m in view.members}
    rows: list[PartitionStatus] = []
    for partition in range(config.partitions):
        lease = view.leases.get(partition)
        if lease is None:
            unreadable = view.unreadable.get(lease_key(partition))
            rows.append(PartitionStatus(partition=partition, unreadable=unreadable))
            continue
        if lease.owner in held:
            held[lease.owner].append(partition)
        rows.append(
            PartitionStatus(
                partition=partition,
                owner=lease.owner,
                name=lease.name,
                epoch=lease.epoch,
                revision=lease.revision,
                live_owner=lease.owner in view.members,
                applied=None if lease.applied < 0 else lease.applied,
            )
        )
    if replication and config.storage == "replicated":
        rows = await _with_replication(nc, prefix, rows, problems)
    applied = None
    if migrations and view.members:
        found = await discover_workers(nc, prefix, expect=len(view.members))
        applied = merged_migrations(found)
    return DeploymentStatus(
        prefix=prefix,
        bucket=bucket,
        partitions=config.partitions,
        epoch_base=config.epoch_base,
        members=[
            MemberStatus(
                id=member_id,
                name=m.name,
                host=m.host,
                pid=m.pid,
                started=m.started,
                routing=m.routing,
                partitions=held[member_id],
            )
            for member_id, m in sorted(view.members.items(), key=lambda item: item[1].started)
        ],
        leases=rows,
        taken_at=time.time(),
        storage=config.storage,
        problems=problems,
        migrations=applied,
    )


async def _with_replication(
    nc: NatsClient, prefix: str, rows: list[PartitionStatus], problems: list[str]
) -> list[PartitionStatus]:
    """``rows`` with each partition's log position and snapshot filled in."""
    log = PartitionLog(nc, prefix, replicas=1, append_timeout=1.0)
    snapshots = SnapshotStore(nc, prefix, replicas=1)
    try:
        await snapshots.open(create=False)
    except StorageError:
        snapshots_open = False
    else:
        snapshots_open = True

    async def one(row: PartitionStatus) -> PartitionStatus:
        try:
            log_seq = await log.last(row.partition)
            info = await snapshots.info(row.partition) if snapshots_open else None
        except StorageError as exc:
            problems.append(f"partition {row.partition}: {exc}")
            return row
        if info is not None and not info.readable:
            problems.append(
                f"partition {row.partition}: the snapshot object is not one ndo wrote (its "
                "holder replaces it at its next snapshot)"
            )
        snapshot_seq = None if info is None or not info.readable else info.seq
        return msgspec.structs.replace(row, log_seq=log_seq, snapshot_seq=snapshot_seq)

    return list(await asyncio.gather(*(one(row) for row in rows)))


def format_status(status: DeploymentStatus, *, partitions: bool = True) -> str:
    """The status as text tables: members, then (``partitions``) one row per partition."""
    now = status.taken_at
    lines = [
        f"deployment {status.prefix!r}: {status.partitions} partitions, "
        f"{len(status.members)} worker(s), lease bucket {status.bucket}, "
        f"storage {status.storage}",
        "",
    ]
    lines += table(
        ("WORKER", "HOST", "PID", "ROUTING", "UP", "HELD", "PARTITIONS"),
        [
            (
                m.id,
                m.host,
                str(m.pid),
                m.routing or "-",
                f"{max(0.0, now - m.started):.0f}s",
                str(len(m.partitions)),
                partitions_text(m.partitions),
            )
            for m in status.members
        ]
        or [("(none)", "", "", "", "", "", "")],
    )
    dead = [p for p in status.leases if p.owner is not None and not p.live_owner]
    lines += ["", f"unheld partitions: {partitions_text(status.unheld)}"]
    if dead:
        lines.append(
            "held by workers that left (expiring): " + partitions_text(p.partition for p in dead)
        )
    lines += [f"unreadable: {problem}" for problem in status.problems]
    if any(problem.startswith(("leases.", "members.")) for problem in status.problems):
        lines.append(
            "  (values in the lease bucket that ndo did not write: the workers take such a "
            "lease over at a new epoch, and do not count such a member)"
        )
    lines += _migrations_lines(status.migrations)
    if partitions and status.storage == "replicated":
        lines.append("")
        lines += table(
            ("PARTITION", "HOLDER", "EPOCH", "LOG", "APPLIED", "BEHIND", "SNAPSHOT"),
            [
                (
                    str(p.partition),
                    _holder(p),
                    str(p.epoch) if p.owner else "-",
                    _number(p.log_seq),
                    _number(p.applied),
                    _number(p.behind),
                    _number(p.snapshot_seq),
                )
                for p in status.leases
            ],
        )
    elif partitions:
        lines.append("")
        lines += table(
            ("PARTITION", "HOLDER", "EPOCH", "REVISION"),
            [
                (
                    str(p.partition),
                    _holder(p),
                    str(p.epoch) if p.owner else "-",
                    str(p.revision) if p.owner else "-",
                )
                for p in status.leases
            ],
        )
    return "\n".join(lines)


def _holder(row: PartitionStatus) -> str:
    if row.owner is not None:
        return row.owner
    return "(unreadable)" if row.unreadable is not None else "-"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)
