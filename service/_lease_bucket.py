"""The lease bucket: its records, its I/O, and the view of it that workers and ``ndo status`` share.

The JetStream KV bucket ``<prefix>-leases`` (``lease_bucket``) holds:

``config``
    ``DeploymentRecord``: ``{"partitions": N, "epoch_base": B}``, written once by the first
    worker. A worker configured with another partition count is refused
    (``DeploymentMismatchError``).
``members.<member id>``
    ``MemberRecord``, one per live worker, with a per-key TTL, renewed every ``lease_ttl / 3``.
``leases.<p>``
    ``LeaseRecord``, the lease of partition ``p``: ``{"owner": <member id>, "epoch": E}``, with a
    per-key TTL, renewed by publishing directly to the key's subject with
    ``Nats-Expected-Last-Subject-Sequence`` (compare-and-set) and ``Nats-TTL``. The bucket has
    ``limit_marker_ttl`` so an expiry is seen by every watcher at once.

A lease acquired at KV revision ``r`` has epoch ``B + r`` (see ``service._leases``).

Values are decoded defensively (the bucket sits on a shared bus, and anyone allowed to publish on
``$KV.<bucket>.>`` can write anything there): a value that is not a record ndo writes is
*unreadable*. ``BucketView`` treats an unreadable lease as free (to be taken over with a
compare-and-set on its revision, which gives the new holder a fresh, higher epoch) and an
unreadable member as absent, and notes each in ``BucketView.unreadable``. An unreadable ``config``
cannot be repaired safely (nothing else knows the partition count): ``open`` refuses to start
with a one-line ``OwnershipError`` that says how to fix it.

``LeaseBucket`` does the I/O (every write is a compare-and-set); ``BucketView`` is what a watch
of the bucket shows (members, leases, deleted leases); ``read_bucket`` takes one snapshot of it
for tools. The state machine that acts on it is ``service._leases``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Final, TypeVar

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from ndo.service._cluster import until_ready
from ndo.service._errors import DeploymentMismatchError, OwnershipError

__all__ = [
    "CONFIG_KEY",
    "BucketView",
    "DeploymentRecord",
    "LeaseBucket",
    "LeaseRecord",
    "LeaseView",
    "MemberRecord",
    "decode_lease",
    "encode_record",
    "entry_value",
    "is_cas_conflict",
    "lease_bucket",
    "lease_key",
    "member_key",
    "read_bucket",
]

CONFIG_KEY: Final = "config"
"""KV key of the deployment record."""
_MEMBER_PREFIX: Final = "members."
_LEASE_PREFIX: Final = "leases."
_MARKER_TTL: Final = 60.0
"""Seconds an expiry or purge marker stays in the bucket (watchers see it at once)."""
_EXPECTED_LAST: Final = "Nats-Expected-Last-Subject-Sequence"
_CAS_CONFLICT: Final = (10071, 10164)
"""JetStream error codes of a failed compare-and-set (wrong last sequence)."""
_REASON_LENGTH: Final = 160
"""Longest reason kept for an unreadable value (a foreign value's error can quote it)."""

_Positive = Annotated[int, msgspec.Meta(ge=1)]
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_Name = Annotated[str, msgspec.Meta(min_length=1)]


class DeploymentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The ``config`` key: facts fixed for the life of a deployment."""

    partitions: _Positive
    epoch_base: _NonNegative
    """Added to a lease's KV revision to form its fencing epoch."""
    created: float = 0.0
    """Epoch seconds when the bucket was set up."""
    storage: str = "local"
    """Where the deployment's partitions are durable (``WorkerConfig.storage``); a worker
    configured otherwise is refused."""


class MemberRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A ``members.<id>`` value: one live worker."""

    id: _Name
    """The member id (the key's last token)."""
    name: str
    host: str = ""
    pid: int = 0
    started: float = 0.0
    routing: str = ""
    """Routing mode the worker detected (``mapped`` or ``forward``)."""
    machine: str = ""
    """The worker's boot and PID namespace (``service._local_peers.this_machine``): a worker of
    the same ``machine`` can tell whether ``pid`` still runs."""


class LeaseRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A ``leases.<p>`` value."""

    owner: _Name
    """Member id of the holder."""
    name: str = ""
    """Worker name of the holder (for people)."""
    epoch: _NonNegative = 0
    """Fencing epoch; 0 in the acquiring write itself, whose epoch is ``epoch_base + revision``."""
    applied: Annotated[int, msgspec.Meta(ge=-1)] = -1
    """With replicated storage: the last log record the holder had applied at its latest
    renewal (-1: not reported)."""


_ENCODER: Final = msgspec.json.Encoder()
_CONFIG_DECODER: Final = msgspec.json.Decoder(DeploymentRecord)
_MEMBER_DECODER: Final = msgspec.json.Decoder(MemberRecord)
_LEASE_DECODER: Final = msgspec.json.Decoder(LeaseRecord)


def encode_record(record: DeploymentRecord | MemberRecord | LeaseRecord) -> bytes:
    """The JSON value of a bucket record."""
    return _ENCODER.encode(record)


def decode_lease(value: bytes) -> LeaseRecord:
    """Read a ``leases.<p>`` value.

    Raises:
        ValueError: it is not a lease record (a foreign or corrupt value); the message is short.
    """
    return _decode(_LEASE_DECODER, value)


def lease_bucket(prefix: str) -> str:
    """Name of the KV bucket holding a deployment's leases and members."""
    return f"{prefix.replace('.', '_')}-leases"


def lease_key(partition: int) -> str:
    """KV key of a partition's lease."""
    return f"{_LEASE_PREFIX}{partition}"


def member_key(member_id: str) -> str:
    """KV key of a member's record."""
    return f"{_MEMBER_PREFIX}{member_id}"


def is_cas_conflict(exc: nats.js.errors.APIError) -> bool:
    """Whether a failed write lost a compare-and-set (the key's revision moved on)."""
    return exc.err_code in _CAS_CONFLICT


@dataclass(slots=True, frozen=True)
class LeaseView:
    """Someone's lease as last seen in the bucket."""

    owner: str
    """Member id of the holder."""
    name: str
    """Worker name of the holder."""
    epoch: int
    """Fencing epoch of the holder's tenure."""
    revision: int
    """KV revision of the lease's latest write."""
    applied: int = -1
    """With replicated storage: the last log record the holder had applied at its latest
    renewal (-1: not reported)."""
    seen: float = field(default=0.0, compare=False)
    """``time.monotonic()`` when this view first saw ``revision`` (how long nobody renewed it)."""


class BucketView:
    """Members and leases as a watch of the bucket shows them (values decoded, deletes applied).

    ``apply`` takes one watch entry. A value that is not a record ndo writes (a foreign client
    wrote it, or it is corrupt) never raises: an unreadable lease is *free* — its revision
    becomes the expected last revision of the next acquisition, exactly like a deleted one, so
    the partition is taken over through the normal compare-and-set — and an unreadable member is
    not a member. Each such key is listed in ``unreadable`` (with a short reason) until a
    readable value or a delete replaces it.
    """

    # Configuration
    epoch_base: int
    """The deployment's epoch base (a lease written without an epoch has ``base + revision``)."""
    # What the bucket holds
    members: dict[str, MemberRecord]
    """Live members by member id."""
    leases: dict[int, LeaseView]
    """Held leases by partition."""
    tombstones: dict[int, int]
    """Free leases (deleted, expired, or unreadable): partition -> revision of the last write
    (the expected last revision of the next acquisition)."""
    unreadable: dict[str, str]
    """Keys whose value is not a record ndo writes -> why (short)."""

    def __init__(self, epoch_base: int) -> None:
        """An empty view of a deployment whose epoch base is ``epoch_base``."""
        self.epoch_base = epoch_base
        self.members = {}
        self.leases = {}
        self.tombstones = {}
        self.unreadable = {}

    def clear(self) -> None:
        """Forget everything (before a new watch replays the bucket)."""
        self.members.clear()
        self.leases.clear()
        self.tombstones.clear()
        self.unreadable.clear()

    def apply(self, key: str, revision: int, value: bytes | None) -> bool:
        """Apply one entry (``value`` None: deleted, purged or expired); keys that are neither
        members nor leases are ignored.

        Returns:
            Whether the member set or a lease's holder changed (the assignment may differ).
        """
        if key.startswith(_MEMBER_PREFIX):
            return self._apply_member(key, revision, value)
        if key.startswith(_LEASE_PREFIX):
            try:
                partition = int(key[len(_LEASE_PREFIX) :])
                if lease_key(partition) != key:  # "leases.03", "leases.+3": not one of ours
                    raise ValueError(key)
            except ValueError:
                if value is None:
                    self.unreadable.pop(key, None)
                else:
                    self._note(key, value, "the key does not name a partition")
                return False
            return self.set_lease(partition, revision, value)
        return False

    def set_lease(self, partition: int, revision: int, value: bytes | None) -> bool:
        """Record what the bucket holds for ``partition`` at ``revision``; True if its holder
        changed. An unreadable value makes the lease free (see the class doc)."""
        key = lease_key(partition)
        record: LeaseRecord | None = None
        if value is not None:
            try:
                record = decode_lease(value)
            except ValueError as exc:
                self._note(key, value, str(exc))
        if record is None:
            if value is None:
                self.unreadable.pop(key, None)
            self.tombstones[partition] = revision
            return self.leases.pop(partition, None) is not None
        self.unreadable.pop(key, None)
        previous = self.leases.get(partition)
        epoch = record.epoch or self.epoch_base + revision
        seen = time.monotonic()
        if previous is not None and previous.revision == revision:
            seen = previous.seen
        self.leases[partition] = LeaseView(
            record.owner, record.name, epoch, revision, record.applied, seen
        )
        return previous is None or previous.owner != record.owner

    def _apply_member(self, key: str, revision: int, value: bytes | None) -> bool:
        member = key[len(_MEMBER_PREFIX) :]
        record: MemberRecord | None = None
        if value is not None:
            try:
                record = _decode(_MEMBER_DECODER, value)
            except ValueError as exc:
                self._note(key, value, str(exc))
            else:
                if record.id != member:
                    self._note(key, value, f"the record names member {record.id!r}")
                    record = None
        if record is None:
            if value is None:
                self.unreadable.pop(key, None)
            return self.members.pop(member, None) is not None
        self.unreadable.pop(key, None)
        fresh = member not in self.members
        self.members[member] = record
        return fresh

    def _note(self, key: str, value: bytes, reason: str) -> None:
        self.unreadable[key] = f"{reason[:_REASON_LENGTH]} ({len(value)} bytes)"


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], value: bytes) -> _T:
    try:
        return decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(str(exc)) from None


class LeaseBucket:
    """I/O on a deployment's lease bucket: open or create it, compare-and-set writes with a
    per-key TTL, reads of one key, and watches."""

    # Configuration
    name: str
    """The bucket's name."""
    _nc: NatsClient
    _prefix: str
    _ttl: int
    _replicas: int
    # State
    _kv: KeyValue | None

    def __init__(self, nc: NatsClient, prefix: str, *, ttl: int, replicas: int = 1) -> None:
        """Describe the bucket of deployment ``prefix``; ``open`` reaches it.

        Args:
            nc: a connection to a server with JetStream.
            prefix: the deployment's subject prefix.
            ttl: seconds a key written with the default TTL lives unrenewed.
            replicas: replicas of the bucket when ``open`` creates it.
        """
        self.name = lease_bucket(prefix)
        self._nc = nc
        self._prefix = prefix
        self._ttl = ttl
        self._replicas = replicas
        self._kv = None

    @property
    def opened(self) -> bool:
        """Whether ``open`` succeeded."""
        return self._kv is not None

    async def attach(self) -> None:
        """Reach the existing bucket (tools: they never create it).

        Raises:
            nats.js.errors.BucketNotFoundError: no worker of this deployment ran with leases.
        """
        self._kv = await self._fast_js().key_value(self.name)

    async def open(self, partitions: int, storage: str = "local") -> DeploymentRecord:
        """Reach the bucket (creating it if needed) and its deployment record (writing it if this
        is the first worker).

        Raises:
            DeploymentMismatchError: the deployment has another partition count or storage mode.
        """
        js = self._nc.jetstream()  # creating a bucket may take a while: the default timeout
        fast = self._fast_js()
        try:
            kv = await until_ready(
                self._nc, lambda: fast.key_value(self.name), what=f"lease bucket {self.name}"
            )
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(
                bucket=self.name,
                description=f"ndo partition leases and members ({self._prefix})",
                history=1,
                storage=StorageType.FILE,
                replicas=self._replicas,
                limit_marker_ttl=_MARKER_TTL,
            )
            try:
                kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # created concurrently by another worker
                kv = await until_ready(
                    self._nc, lambda: fast.key_value(self.name), what=f"lease bucket {self.name}"
                )
        self._kv = kv
        record = await until_ready(
            self._nc,
            lambda: self._deployment(partitions, storage),
            what=f"lease bucket {self.name}",
        )
        if record.storage != storage:
            raise DeploymentMismatchError(
                f"the deployment using lease bucket {self.name!r} keeps its partitions with "
                f"--storage {record.storage}, but this worker was started with --storage "
                f"{storage}; one deployment cannot mix the two: start with --storage "
                f"{record.storage} (or use another --prefix for a new deployment)"
            )
        if record.partitions != partitions:
            raise DeploymentMismatchError(
                f"the deployment using lease bucket {self.name!r} has {record.partitions} "
                f"partitions but this worker was started with {partitions}; the partition "
                f"count is fixed per deployment: start with --partitions {record.partitions}"
            )
        return record

    async def _deployment(self, partitions: int, storage: str) -> DeploymentRecord:
        last, raw = await self.read(CONFIG_KEY)
        if raw is not None:
            return _config(raw, self.name)
        record = DeploymentRecord(
            partitions=partitions,
            epoch_base=int(time.time() * 1_000_000),
            created=time.time(),
            storage=storage,
        )
        try:
            await self.put(CONFIG_KEY, encode_record(record), last, ttl=None)
        except nats.js.errors.APIError as exc:
            if not is_cas_conflict(exc):
                raise
            _, raw = await self.read(CONFIG_KEY)  # another worker wrote it first
            if raw is None:
                raise
            return _config(raw, self.name)
        return record

    async def put(
        self, key: str, value: bytes, last: int, *, ttl: int | None = -1, timeout: float = 5.0
    ) -> int:
        """Write ``key`` if its last revision is ``last`` (0: absent); return the new revision.

        ``ttl`` -1 means the bucket's default TTL, None no TTL.

        Raises:
            nats.js.errors.APIError: the compare-and-set failed (``is_cas_conflict``) or the
                server refused the write.
        """
        headers = {_EXPECTED_LAST: str(last)}
        seconds = self._ttl if ttl == -1 else ttl
        if seconds is not None:
            headers["Nats-TTL"] = f"{seconds}s"
        ack = await self._nc.jetstream().publish(
            self._subject(key), value, headers=headers, timeout=timeout
        )
        return int(ack.seq)

    async def delete(self, key: str, last: int) -> None:
        """Delete ``key`` if its last revision is ``last``; a lost compare-and-set means it is gone
        or someone else's already, and is not an error."""
        headers = {"KV-Operation": "DEL", _EXPECTED_LAST: str(last)}
        try:
            await self._nc.jetstream().publish(
                self._subject(key), b"", headers=headers, timeout=2.0
            )
        except nats.js.errors.APIError as exc:
            if not is_cas_conflict(exc):
                raise

    async def read(self, key: str) -> tuple[int, bytes | None]:
        """The key's last revision (0 if none) and its value (None if absent or deleted)."""
        try:
            msg = await self._fast_js().get_msg(f"KV_{self.name}", subject=self._subject(key))
        except nats.js.errors.NotFoundError:
            return 0, None
        headers = msg.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            return int(msg.seq or 0), None
        return int(msg.seq or 0), msg.data or b""

    async def watch(self) -> KeyValue.KeyWatcher:
        """Watch every key: current values first, then ``None`` (caught up), then changes."""
        if self._kv is None:
            raise OwnershipError("the lease bucket is not open")
        return await self._kv.watch(">")

    def _subject(self, key: str) -> str:
        return f"$KV.{self.name}.{key}"

    def _fast_js(self) -> JetStreamContext:
        """A JetStream context whose requests time out within half a lease TTL, so an ownership
        step stuck on a server that went away (a stream leader being elected) gives up in time
        for the next renewal instead of blocking for nats-py's default 5 s."""
        return self._nc.jetstream(timeout=max(1.0, min(5.0, self._ttl / 2)))


def _config(raw: bytes, bucket: str) -> DeploymentRecord:
    """Decode the deployment record, or refuse with a one-line fix.

    An unreadable record is not repaired: the partition count and storage mode it held are known
    nowhere else (a worker rewriting it with its own flags could silently change the partition
    count, and every object would hash elsewhere). Deleting it is safe when the workers are
    restarted with the deployment's usual flags: the next one writes a fresh record whose epoch
    base is the current time, above the old one, so fencing epochs still only grow.
    """
    try:
        return _CONFIG_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        reason = str(exc)[:_REASON_LENGTH]
        raise OwnershipError(
            f"the deployment record ({CONFIG_KEY!r}) in lease bucket {bucket!r} is unreadable "
            f"({reason}; {len(raw)} bytes): something other than ndo wrote it. Delete it (nats "
            f"kv del {bucket} {CONFIG_KEY}) and restart the workers with the deployment's usual "
            "--partitions and --storage; the first one writes a fresh record"
        ) from None


def entry_value(entry: KeyValue.Entry) -> bytes | None:
    """A watch entry's value, or None when it deletes the key (delete, purge or expiry)."""
    if entry.operation in ("DEL", "PURGE"):
        return None
    return entry.value or b""


async def read_bucket(
    nc: NatsClient, prefix: str
) -> tuple[DeploymentRecord, BucketView, list[str]]:
    """One snapshot of a deployment's bucket, for tools (``ndo status``).

    Returns:
        The deployment record, the view, and a note per entry that could not be read (the
        view's ``unreadable``, as ``key: reason``).

    Raises:
        nats.js.errors.BucketNotFoundError: no worker with this prefix ever ran with leases.
        OwnershipError: the bucket has no deployment record (or an unreadable one).
    """
    bucket = LeaseBucket(nc, prefix, ttl=1)  # read-only: the TTL is never used
    await bucket.attach()
    _, raw = await bucket.read(CONFIG_KEY)
    if raw is None:
        raise OwnershipError(f"lease bucket {bucket.name!r} has no deployment record yet")
    config = _config(raw, bucket.name)
    view = BucketView(config.epoch_base)
    watch = await bucket.watch()
    try:
        async for entry in watch:
            if entry is None:
                break
            view.apply(entry.key, entry.revision or 0, entry_value(entry))
    finally:
        await watch.stop()  # type: ignore[no-untyped-call]
    problems = [f"{key}: {reason}" for key, reason in sorted(view.unreadable.items())]
    return config, view, problems
