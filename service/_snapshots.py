"""Partition snapshots in the JetStream object store ``<prefix>-snapshots``.

One object per partition (``partition-<p>``), replaced by each newer snapshot; its
``Ndo-Log-Seq`` header says which log record it covers, so ``ndo status`` can show it without
downloading it. A snapshot is written by the partition's holder only, and only over an older
one.

Objects are read defensively (the store is JetStream streams on a shared bus): an object whose
metadata, digest or contents are not a snapshot ndo wrote is *unreadable*. ``get`` logs it and
treats it as absent (a restore that needs it then fails, saying there is no snapshot, rather
than serving a partition with holes); ``info`` reports it (``SnapshotInfo.readable``), so the
holder replaces it with a real snapshot at its next one and ``ndo status`` shows it.
"""

from __future__ import annotations

import base64
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
_UNREADABLE: Final = (
    nats.js.errors.BadObjectMetaError,
    nats.js.errors.DigestMismatchError,
    nats.js.errors.LinkIsABucketError,
)
"""What nats-py raises for an object whose metadata or chunks are not what it wrote."""
_MALFORMED_META: Final = (AttributeError, TypeError, ValueError, KeyError)
"""What nats-py's object reader raises on metadata with missing or mistyped fields."""
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
    readable: bool = True
    """False: the object is not a snapshot ndo wrote (``seq`` is then 0)."""


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
        """Store ``snapshot`` as its partition's latest (replacing an unreadable object there);
        return the bytes stored.

        Raises:
            StorageError: it could not be stored.
        """
        data = encode_snapshot(snapshot)
        name = _object_name(snapshot.partition)
        for attempt in range(2):
            meta = js_api.ObjectMeta(name=name, headers={_SEQ_HEADER: str(snapshot.seq)})
            try:
                await self._obs().put(name, data, meta=meta)
                return len(data)
            except (*_UNREADABLE, *_MALFORMED_META) as exc:
                # nats-py reads the old metadata first, and refuses to go on when it is not
                # its own: drop that metadata (the holder's to replace), then store again.
                if attempt:
                    raise StorageError(
                        f"storing the snapshot of partition {snapshot.partition} failed: {exc!r}"
                    ) from None
                self._unreadable(snapshot.partition, f"replacing it: {exc!r}")
                await self._drop_metadata(name)
            except _TRANSIENT as exc:
                raise StorageError(
                    f"storing the snapshot of partition {snapshot.partition} failed: {exc!r}"
                ) from None
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def _drop_metadata(self, name: str) -> None:
        """Purge object ``name``'s metadata message (its chunks, unknown, stay orphaned)."""
        encoded = base64.urlsafe_b64encode(name.encode()).decode()
        try:
            await self._nc.jetstream().purge_stream(
                f"OBJ_{self.bucket}", subject=f"$O.{self.bucket}.M.{encoded}"
            )
        except _TRANSIENT as exc:
            raise StorageError(f"cannot replace unreadable object {name!r}: {exc!r}") from None

    async def get(self, partition: int) -> PartitionSnapshot | None:
        """The latest snapshot of ``partition``, or None (none stored, or unreadable).

        Raises:
            StorageError: the store did not answer.
        """
        obs = self._obs()
        name = _object_name(partition)
        try:
            if (await obs.get_info(name)).is_link():
                self._unreadable(partition, "a link, not a snapshot")
                return None
            result = await obs.get(name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        except (*_UNREADABLE, *_MALFORMED_META) as exc:
            self._unreadable(partition, repr(exc))
            return None
        except _TRANSIENT as exc:
            raise StorageError(
                f"reading partition {partition}'s snapshot failed: {exc!r}"
            ) from None
        try:
            snapshot = decode_snapshot(result.data or b"")
        except ValueError as exc:
            self._unreadable(partition, str(exc))
            return None
        if snapshot.partition != partition:
            _log.warning("ignoring a snapshot of another partition", partition=partition)
            return None
        return snapshot

    def _unreadable(self, partition: int, reason: str) -> None:
        _log.warning(
            "ignoring an unreadable snapshot (not written by ndo?)",
            partition=partition,
            bucket=self.bucket,
            reason=reason[:160],
        )

    async def info(self, partition: int) -> SnapshotInfo | None:
        """What is stored for ``partition`` (None: nothing).

        Raises:
            StorageError: the store did not answer.
        """
        try:
            info = await self._obs().get_info(_object_name(partition))
        except nats.js.errors.ObjectNotFoundError:
            return None
        except (*_UNREADABLE, *_MALFORMED_META):
            return SnapshotInfo(partition=partition, seq=0, size=0, readable=False)
        except _TRANSIENT as exc:
            raise StorageError(
                f"reading partition {partition}'s snapshot failed: {exc!r}"
            ) from None
        headers = info.headers if isinstance(info.headers, dict) else {}
        try:
            seq = int(headers.get(_SEQ_HEADER, ""))
            size = int(info.size or 0)
        except (TypeError, ValueError):
            return SnapshotInfo(partition=partition, seq=0, size=0, readable=False)
        return SnapshotInfo(
            partition=partition, seq=seq, size=size, readable=seq > 0 and not info.is_link()
        )
