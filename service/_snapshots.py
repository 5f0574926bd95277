"""Partition snapshots in the JetStream object store ``<prefix>-snapshots``.

One object per partition (``partition-<p>``), replaced by each newer snapshot; its
``Ndo-Log-Seq`` header says which log record it covers, so ``ndo status`` can show it without
downloading it. A snapshot is written by the partition's holder only, and only over an older
one. A stored object that is not a snapshot is logged and treated as absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import nats.errors
import nats.js.api as js_api
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.object_store import ObjectStore

from ndo.service._cluster import until_ready
from ndo.storage import PartitionSnapshot, StorageError, decode_snapshot, encode_snapshot

__all__ = ["SnapshotInfo", "SnapshotStore", "snapshot_bucket"]

_log = structlog.get_logger("ndo.storage")

_SEQ_HEADER: Final = "Ndo-Log-Seq"
_TRANSIENT: Final = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)


def snapshot_bucket(prefix: str) -> str:
    """Name of a deployment's snapshot object store: ``ndo`` -> ``ndo-snapshots``."""
    return f"{prefix.replace('.', '_')}-snapshots"


def _object_name(partition: int) -> str:
    return f"partition-{partition}"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """What the store says about a partition's snapshot, without its rows."""

    partition: int
    seq: int
    """The log record the snapshot covers."""
    size: int
    """Bytes stored."""


class SnapshotStore:
    """Reads and writes a deployment's partition snapshots."""

    # Configuration
    bucket: str
    """The object store's name."""
    _nc: NatsClient
    _replicas: int
    # State
    _store: ObjectStore | None

    def __init__(self, nc: NatsClient, prefix: str, *, replicas: int) -> None:
        """Describe the snapshots of deployment ``prefix``; ``open`` reaches the store."""
        self.bucket = snapshot_bucket(prefix)
        self._nc = nc
        self._replicas = replicas
        self._store = None

    async def open(self, *, create: bool = True) -> None:
        """Reach the object store, creating it (with the configured replicas) if needed.

        Raises:
            StorageError: it cannot be reached or created.
        """
        js = self._nc.jetstream()
        what = f"snapshot store {self.bucket}"
        try:
            self._store = await until_ready(
                self._nc, lambda: js.object_store(self.bucket), what=what
            )
            return
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise StorageError(f"no snapshot store {self.bucket!r}") from None
        except _TRANSIENT as exc:
            raise StorageError(f"cannot reach snapshot store {self.bucket!r}: {exc!r}") from None
        config = js_api.ObjectStoreConfig(
            bucket=self.bucket,
            description="ndo partition snapshots",
            replicas=self._replicas,
            storage=js_api.StorageType.FILE,
        )
        try:
            self._store = await js.create_object_store(self.bucket, config=config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:
                raise StorageError(
                    f"cannot create snapshot store {self.bucket!r} with {self._replicas} "
                    f"replica(s): {exc.description}"
                ) from None
            self._store = await until_ready(
                self._nc, lambda: js.object_store(self.bucket), what=what
            )
        except _TRANSIENT as exc:
            raise StorageError(f"cannot create snapshot store {self.bucket!r}: {exc!r}") from None

    def _obs(self) -> ObjectStore:
        if self._store is None:
            raise StorageError("the snapshot store is not open")
        return self._store

    async def put(self, snapshot: PartitionSnapshot) -> int:
        """Store ``snapshot`` as its partition's latest; return the bytes stored.

        Raises:
            StorageError: it could not be stored.
        """
        data = encode_snapshot(snapshot)
        meta = js_api.ObjectMeta(
            name=_object_name(snapshot.partition),
            headers={_SEQ_HEADER: str(snapshot.seq)},
        )
        try:
            await self._obs().put(meta.name or "", data, meta=meta)
        except _TRANSIENT as exc:
            raise StorageError(
                f"storing the snapshot of partition {snapshot.partition} failed: {exc!r}"
            ) from None
        return len(data)

    async def get(self, partition: int) -> PartitionSnapshot | None:
        """The latest snapshot of ``partition``, or None (none stored, or unreadable).

        Raises:
            StorageError: the store did not answer.
        """
        try:
            result = await self._obs().get(_object_name(partition))
        except nats.js.errors.ObjectNotFoundError:
            return None
        except _TRANSIENT as exc:
            raise StorageError(
                f"reading partition {partition}'s snapshot failed: {exc!r}"
            ) from None
        try:
            snapshot = decode_snapshot(result.data or b"")
        except ValueError as exc:
            _log.warning("ignoring an unreadable snapshot", partition=partition, error=str(exc))
            return None
        if snapshot.partition != partition:
            _log.warning("ignoring a snapshot of another partition", partition=partition)
            return None
        return snapshot

    async def info(self, partition: int) -> SnapshotInfo | None:
        """What is stored for ``partition`` (None: nothing)."""
        try:
            info = await self._obs().get_info(_object_name(partition))
        except nats.js.errors.ObjectNotFoundError:
            return None
        except _TRANSIENT as exc:
            raise StorageError(
                f"reading partition {partition}'s snapshot failed: {exc!r}"
            ) from None
        headers = info.headers or {}
        try:
            seq = int(headers.get(_SEQ_HEADER, "0"))
        except ValueError:
            seq = 0
        return SnapshotInfo(partition=partition, seq=seq, size=int(info.size or 0))
