"""``Inspector``: a worker's answers to ``ndo inspect`` for the partitions it holds.

The tool asks each partition's holder on ``<prefix>.sys.inspect.<p>.<operation>``; the holder
subscribes there (in the partition's queue group) while it holds the partition, next to the
partition's requests, so every answer comes from the one worker whose storage is current for
it — with replicated storage too, where other workers' copies of the partition may lag.
``<prefix>.sys.inspect.info`` is answered by any worker.

* ``objects`` and ``show`` read committed state from storage (SQLite: a read-only connection of
  their own, so a long scan queues neither the worker's reads nor its commits); they never touch
  the objects in memory.
* ``import`` and ``delete`` go into the object's mailbox (``InspectEnvelope``): ordered with its
  turns, committed under the partition's fencing epoch, journaled, and answered once durable.

The records on the wire are in ``service/inspection.py``. Errors are answered as any call's
(``Ndo-Error-*`` headers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping
from typing import Final, TypeVar

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ndo.actors import (
    ActorError,
    ActorId,
    BadRequestError,
    HandlerError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from ndo.actors.runtime import WRITE_FRAMING, ActorClassInfo
from ndo.service._activation import ActivationServices
from ndo.service._catalog import Catalog
from ndo.service._codec import encode_error
from ndo.service._envelope import MAX_KEY_LENGTH, InspectEnvelope, partition_moving
from ndo.service._routing import QUEUE_GROUP, drain_all, partition_queue
from ndo.service.inspection import (
    MAX_LIST_LIMIT,
    DeleteRequest,
    ImportRequest,
    InfoReply,
    ListedObject,
    ObjectsReply,
    ObjectsRequest,
    ShowReply,
    ShowRequest,
)
from ndo.storage import StorageError
from ndo.subjects import (
    Header,
    inspect_subject,
    inspect_wildcard,
    is_valid_id,
    partition_of,
    validate_name,
)

__all__ = ["Inspector"]

_log = structlog.get_logger("ndo.inspect")

_T = TypeVar("_T")

_PAGE_KEYS: Final = 1000
"""Most keys one ``show`` reply carries."""
_PAGE_BYTES: Final = 256 * 1024
"""Stored bytes after which a ``show`` reply ends its page (one value may pass it: values are at
most ``max_value_bytes``, 128 KiB by default, and base64 grows them by a third)."""


class Inspector:
    """Answers ``ndo inspect`` for this worker's partitions (see the module doc)."""

    # Configuration
    _nc: NatsClient
    _prefix: str
    _partitions: int
    _storage_kind: str
    _classes: Mapping[str, ActorClassInfo]
    # Collaborators
    _services: ActivationServices
    _catalog: Catalog
    # State
    _info_sub: Subscription | None
    _all_sub: Subscription | None
    _subs: dict[int, Subscription]
    _draining: set[asyncio.Task[None]]

    def __init__(
        self,
        nc: NatsClient,
        services: ActivationServices,
        catalog: Catalog,
        *,
        classes: Mapping[str, ActorClassInfo],
        partitions: int,
        storage_kind: str,
    ) -> None:
        """Describe the inspector of a worker; ``start`` subscribes to ``info``."""
        self._nc = nc
        self._prefix = services.prefix
        self._partitions = partitions
        self._storage_kind = storage_kind
        self._classes = classes
        self._services = services
        self._catalog = catalog
        self._info_sub = None
        self._all_sub = None
        self._subs = {}
        self._draining = set()

    async def start(self) -> None:
        """Answer ``info`` (in the workers' queue group: one worker answers)."""
        self._info_sub = await self._nc.subscribe(
            inspect_subject(self._prefix, "info"), queue=QUEUE_GROUP, cb=self._on_info
        )

    async def subscribe(self, partition: int) -> None:
        """Answer for ``partition`` (idempotent)."""
        if partition not in self._subs:
            self._subs[partition] = await self._nc.subscribe(
                inspect_wildcard(self._prefix, partition),
                queue=partition_queue(self._prefix, partition),
                cb=self._on_request,
            )

    async def subscribe_all(self) -> None:
        """Answer for every partition through one subscription (a worker that serves all)."""
        if self._all_sub is None:
            self._all_sub = await self._nc.subscribe(
                inspect_wildcard(self._prefix), queue=QUEUE_GROUP, cb=self._on_request
            )

    def unsubscribe(self, partitions: Collection[int]) -> None:
        """Stop answering for ``partitions`` (drained in the background)."""
        subs = [sub for p in partitions if (sub := self._subs.pop(p, None)) is not None]
        if subs:
            task = asyncio.create_task(drain_all(subs), name="ndo-inspect-unsubscribe")
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def close(self) -> None:
        """Drop every subscription (requests already received are still answered)."""
        subs = [s for s in (self._info_sub, self._all_sub, *self._subs.values()) if s]
        self._info_sub = self._all_sub = None
        self._subs = {}
        await drain_all(subs)
        for task in list(self._draining):
            with contextlib.suppress(Exception):
                await task

    # Requests

    async def _on_info(self, msg: Msg) -> None:
        if not msg.reply or not self._services.outbox.may_answer(msg.reply, request=msg.subject):
            return
        info = InfoReply(
            worker=self._services.worker,
            partitions=self._partitions,
            classes=sorted(self._classes),
            storage=self._storage_kind,
        )
        await self._services.outbox.reply(msg.reply, msgspec.json.encode(info), None)

    async def _on_request(self, msg: Msg) -> None:
        outbox = self._services.outbox
        if not msg.reply or not outbox.may_answer(msg.reply, request=msg.subject):
            return
        try:
            body = await self._answer(msg)
        except ActorError as error:
            await self._refuse(msg.reply, error)
            return
        except StorageError as exc:
            await self._refuse(
                msg.reply,
                UnavailableError(
                    f"storage could not be read ({exc}); retry", type="storage_failure"
                ),
            )
            return
        except Exception:  # a bug: answer and keep serving
            _log.exception("ndo inspect request crashed", subject=msg.subject)
            await self._refuse(msg.reply, HandlerError("internal error in the ndo inspector"))
            return
        if body is not None:
            await outbox.reply(msg.reply, body, None)

    async def _refuse(self, reply: str, error: ActorError) -> None:
        body, headers = encode_error(error, False)
        with contextlib.suppress(nats.errors.Error):
            await self._services.outbox.reply(reply, body, headers)

    async def _answer(self, msg: Msg) -> bytes | None:
        """The reply to one request, or ``None`` when the object's mailbox will answer."""
        tokens = msg.subject.split(".")
        partition_token, operation = tokens[-2], tokens[-1]
        if not partition_token.isdigit() or int(partition_token) >= self._partitions:
            raise BadRequestError(f"no partition {partition_token!r}", type="invalid_partition")
        partition = int(partition_token)
        if self._services.ownership.epoch_of(partition) < 0:
            raise partition_moving(partition)
        if operation == "objects":
            return await self._objects(partition, _decode(msg.data, ObjectsRequest))
        if operation == "show":
            return await self._show(partition, _decode(msg.data, ShowRequest))
        if operation == "import":
            request = _decode(msg.data, ImportRequest)
            self._check_import(request)
            self._enqueue(partition, msg, request.class_name, request.id, request)
            return None
        if operation == "delete":
            delete = _decode(msg.data, DeleteRequest)
            self._enqueue(partition, msg, delete.class_name, delete.id, delete)
            return None
        raise NotFoundError(
            f"no inspect operation {operation!r} (objects, show, import, delete)",
            type="unknown_operation",
        )

    async def _objects(self, partition: int, request: ObjectsRequest) -> bytes:
        if not 1 <= request.limit <= MAX_LIST_LIMIT:
            raise BadRequestError(
                f"limit must be 1-{MAX_LIST_LIMIT}, got {request.limit}", type="invalid_limit"
            )
        storage = self._services.storage
        after = None if request.after is None else (request.after[0], request.after[1])
        found = await storage.list_objects(
            partition,
            class_name=request.class_name,
            id_prefix=request.prefix,
            after=after,
            limit=request.limit,
        )
        counts = await storage.count_objects(
            partition, class_name=request.class_name, id_prefix=request.prefix
        )
        reply = ObjectsReply(
            partition=partition,
            worker=self._services.worker,
            objects=[
                ListedObject(
                    class_name=o.class_name, id=o.object_id, keys=o.keys, size=o.size, alarm=o.alarm
                )
                for o in found
            ],
            counts=counts,
        )
        return msgspec.json.encode(reply)

    async def _show(self, partition: int, request: ShowRequest) -> bytes:
        self._check_address(partition, request.class_name, request.id)
        storage = self._services.storage
        cls, oid = request.class_name, request.id
        start = None if request.after is None else request.after + "\x00"
        rows = await storage.read_range(
            cls, oid, start=start, end=None, limit=_PAGE_KEYS + 1, reverse=False
        )
        entries: list[tuple[str, bytes]] = []
        size = 0
        for key, value in rows[:_PAGE_KEYS]:
            entries.append((key, value))
            size += len(key) + len(value)
            if size >= _PAGE_BYTES:
                break
        reply = ShowReply(
            partition=partition,
            worker=self._services.worker,
            epoch=self._services.ownership.epoch_of(partition),
            active=self._catalog.get(ActorId(cls, oid)) is not None,
            entries=entries,
            more=len(entries) < len(rows),
            alarm=await storage.read_alarm(cls, oid),
            size=await storage.object_size(cls, oid),
        )
        return msgspec.json.encode(reply)

    def _check_address(self, partition: int, class_name: str, object_id: str) -> None:
        """Refuse an object that is not valid or not of ``partition``."""
        try:
            validate_name(class_name, "class name")
        except ValueError as exc:
            raise BadRequestError(str(exc), type="invalid_class") from None
        if not is_valid_id(object_id):
            raise BadRequestError(f"invalid object id {object_id!r}", type="invalid_id")
        expected = partition_of(class_name, object_id, self._partitions)
        if expected != partition:
            raise BadRequestError(
                f"{class_name}/{object_id} is in partition {expected}, not {partition}",
                type="wrong_partition",
            )

    def _check_import(self, request: ImportRequest) -> None:
        """Refuse an import the object's own turns could not have written (storage limits)."""
        limits = self._services.limits
        alarm = request.alarm
        if alarm is not None and not 0 <= alarm < float("inf"):
            raise BadRequestError(
                f"alarm must be epoch seconds >= 0, got {alarm!r}", type="invalid_alarm_time"
            )
        total = 0
        keys = set()
        for key, value in request.entries:
            if key in keys:
                raise BadRequestError(f"key {key!r} is given twice", type="invalid_import")
            keys.add(key)
            key_bytes = len(key.encode("utf-8", "surrogatepass"))
            if not 0 < key_bytes <= limits.max_key_bytes:
                raise BadRequestError(
                    f"key {key[:40]!r} must be 1-{limits.max_key_bytes} bytes", type="invalid_key"
                )
            if len(value) > limits.max_value_bytes:
                raise PayloadTooLargeError(
                    f"value of key {key[:40]!r} is {len(value)} bytes, over the worker's "
                    f"max_value_bytes ({limits.max_value_bytes})",
                    type="value_too_large",
                )
            try:
                msgspec.msgpack.decode(value)
            except msgspec.DecodeError:
                raise BadRequestError(
                    f"value of key {key[:40]!r} is not MessagePack", type="invalid_import"
                ) from None
            total += key_bytes + len(value) + WRITE_FRAMING
        if limits.max_turn_bytes and total > limits.max_turn_bytes:
            raise PayloadTooLargeError(
                f"the object's state is {total} bytes, over the worker's max_turn_bytes "
                f"({limits.max_turn_bytes})",
                type="turn_too_large",
            )
        if limits.max_object_bytes and total > limits.max_object_bytes:
            raise PayloadTooLargeError(
                f"the object's state is {total} bytes, over the worker's max_object_bytes "
                f"({limits.max_object_bytes})",
                type="object_too_large",
            )

    def _enqueue(
        self,
        partition: int,
        msg: Msg,
        class_name: str,
        object_id: str,
        request: ImportRequest | DeleteRequest,
    ) -> None:
        """Queue an import or delete in the object's mailbox (it answers once durable)."""
        self._check_address(partition, class_name, object_id)
        info = self._classes.get(class_name)
        if info is None:
            raise NotFoundError(
                f"class {class_name!r} is not served here (served: "
                f"{', '.join(sorted(self._classes)) or 'none'}); objects of a class no module "
                "defines any more are removed with a class migration (docs/migrations.md)",
                type="unknown_class",
            )
        key = None
        if msg.headers:
            key = msg.headers.get(Header.IDEMPOTENCY_KEY.value)
            if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
                raise BadRequestError(
                    f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters",
                    type="invalid_idempotency_key",
                )
        if isinstance(request, ImportRequest):
            envelope = InspectEnvelope(
                "import",
                msg.data,
                msg.reply,
                entries=dict(request.entries),
                alarm=request.alarm,
                replace=request.replace,
                idempotency_key=key,
            )
        else:
            envelope = InspectEnvelope(
                "delete",
                msg.data,
                msg.reply,
                entries={},
                alarm=None,
                replace=True,
                idempotency_key=key,
            )
        activation = self._catalog.activate(info, object_id, partition)  # may raise 503
        if not activation.enqueue(envelope):
            raise UnavailableError(
                f"{class_name}/{object_id}'s mailbox is full; retry with backoff",
                type="overloaded",
            )


def _decode(body: bytes, kind: type[_T]) -> _T:
    """The request record in ``body``, or a 400 that says what is wrong with it."""
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.DecodeError as exc:
        raise BadRequestError(f"invalid request: {exc}", type="invalid_request") from None
