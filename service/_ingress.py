"""Ingress: how messages get into objects' mailboxes — requests from NATS, and due alarms.

Ingress never runs user code. The NATS callback parses the subject, validates the class, method,
body size and arguments, finds (or creates) the object's activation and enqueues; bad input is
answered right there and never reaches an object. Parsed subjects are remembered (bounded), so a
subject seen before skips the parse and the name checks.

A request for a partition this worker does not serve is forwarded to its holder when the routing
is ``forward`` and another worker holds it, and answered 503 "moving" otherwise (the client
retries). A request for a partition this worker is taking up right now (its lease being written,
its fence claimed) is *held* instead: it waits, in arrival order, up to ``_HOLD_FOR`` seconds
for the partition to be served, so a worker that has just started, or taken a partition over,
answers the requests that arrive meanwhile instead of refusing them. Held requests are bounded
in count and bytes; beyond that, or past the wait, they get the usual 503.

Nothing a request can carry lets an exception escape without an answer: an error that is not an
``ActorError`` is a bug, answered 500 ``internal_error`` with a request id that the one log line
about it (with the traceback) also carries. Requests the NATS client dropped because this worker
fell behind (a slow consumer) are answered 503 ``overloaded`` from the error callback.

The subscriptions themselves are the ``Router``'s (``service._routing``); ingress subscribes and
unsubscribes partitions when the ownership asks (``subscribe``, ``unsubscribe``) and follows the
server when an operator adds or removes the partition mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Collection
from typing import Final, NamedTuple

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ndo.actors import (
    ActorError,
    ActorId,
    BadRequestError,
    HandlerError,
    NotFoundError,
    UnavailableError,
)
from ndo.actors.runtime import ActorClassInfo, MethodSpec
from ndo.service._catalog import Catalog
from ndo.service._codec import encode_error
from ndo.service._envelope import AlarmDelivery, Envelope, partition_moving, request_envelope
from ndo.service._errors import RoutingError
from ndo.service._metrics import WorkerMetrics
from ndo.service._outbox import Outbox
from ndo.service._ownership import NOT_SERVING, Ownership
from ndo.service._routing import Router, RoutingMode, detect_routing, drain_all
from ndo.storage import StoredAlarm
from ndo.subjects import (
    MSGPACK_CONTENT_TYPE,
    Header,
    InvalidSubjectError,
    parse_rpc_subject,
    partition_of,
)

__all__ = ["Ingress"]

_log = structlog.get_logger("ndo.worker")

_ROUTING_CHECK: Final = 15.0
"""Seconds between checks of the server's routing (a mapping added or removed at runtime)."""

_MAX_ROUTES: Final = 8192
"""Parsed request subjects remembered; the cache is emptied when it is full."""

"""Longest idempotency key accepted, in characters."""

_HOLD_FOR: Final = 1.0
"""Seconds a request for a partition being taken up waits for it (then: 503 "moving")."""
_HOLD_POLL: Final = 0.02
"""Seconds between checks of the partitions held requests wait for."""
_MAX_HELD: Final = 10_000
"""Most requests held at once (beyond: 503 "moving" at once)."""
_MAX_HELD_BYTES: Final = 64 * 1024 * 1024
"""Most request bytes held at once."""


class _Held(NamedTuple):
    """A request waiting for its partition to be served here."""

    msg: Msg
    routed: bool
    until: float
    """``time.monotonic()`` after which it is answered 503 "moving"."""


class _Route(NamedTuple):
    """What a request subject resolves to (everything in it is fixed for the worker's life)."""

    info: ActorClassInfo
    object_id: str
    spec: MethodSpec
    partition: int
    rpc_subject: str
    """The ``<prefix>.rpc.<Class>.<id>.<method>`` subject (for forwarding)."""
    address: ActorId
    """The object's class name and id."""


class Ingress:
    """Takes requests off NATS and due alarms off the scheduler, into objects' mailboxes."""

    # Configuration
    _prefix: str
    _partitions: int
    _max_payload: int
    _caller_info: bool
    _classes: dict[str, ActorClassInfo]
    # Collaborators
    _nc: NatsClient
    _router: Router
    _catalog: Catalog
    _outbox: Outbox
    _metrics: WorkerMetrics
    _ownership: Ownership
    # State
    _accepting: bool
    """Between ``open`` and ``stop``: requests are taken (afterwards they get 503)."""
    _routes: dict[str, _Route]
    """Parsed request subjects (the subject as received: RPC, mapped or forwarded)."""
    _unsubscribing: set[asyncio.Task[None]]
    """Background drains of subscriptions that were dropped."""
    _recheck: asyncio.Event
    """Set to check the server's routing now (after a reconnect)."""
    _held: dict[int, deque[_Held]]
    """Requests waiting for their partition, by partition, in arrival order."""
    _held_count: int
    _held_bytes: int
    _releaser: asyncio.Task[None] | None
    """Hands held requests on as their partitions are served (runs while any are held)."""
    _kick: asyncio.Event
    """Set when the served partitions changed (held requests may go now)."""

    def __init__(
        self,
        nc: NatsClient,
        mode: RoutingMode,
        *,
        prefix: str,
        partitions: int,
        max_payload: int,
        caller_info: bool = False,
        classes: dict[str, ActorClassInfo],
        catalog: Catalog,
        outbox: Outbox,
        metrics: WorkerMetrics,
    ) -> None:
        """Create the ingress of a worker whose server routes requests as ``mode``.

        Args:
            nc: the worker's connection.
            mode: the routing the server offers (``detect_routing``).
            prefix: the deployment's subject prefix.
            partitions: the deployment's partition count.
            max_payload: largest request body accepted.
            caller_info: pass the server's ``Nats-Request-Info`` on to handlers.
            classes: the served classes by name.
            catalog: the worker's activations.
            outbox: where error replies go.
            metrics: where rejected requests are counted.
        """
        self._prefix = prefix
        self._partitions = partitions
        self._max_payload = max_payload
        self._caller_info = caller_info
        self._classes = classes
        self._nc = nc
        self._router = Router(
            nc,
            prefix,
            mode,
            partitions=partitions,
            on_rpc=self._handle_request,
            on_routed=self._handle_routed,
        )
        self._catalog = catalog
        self._outbox = outbox
        self._metrics = metrics
        self._ownership = NOT_SERVING
        self._accepting = False
        self._routes = {}
        self._unsubscribing = set()
        self._recheck = asyncio.Event()
        self._held = {}
        self._held_count = 0
        self._held_bytes = 0
        self._releaser = None
        self._kick = asyncio.Event()

    @property
    def mode(self) -> RoutingMode:
        """How requests reach this worker."""
        return self._router.mode

    @property
    def forwarded(self) -> int:
        """Requests handed to another partition holder so far."""
        return self._router.forwarded

    # Lifecycle

    async def open(self, ownership: Ownership) -> None:
        """Start taking requests for the partitions ``ownership`` serves (and, with ``forward``
        routing, every request on the RPC subjects)."""
        self._ownership = ownership
        self._accepting = True
        await self._router.start_rpc()

    async def stop(self) -> None:
        """Stop taking new requests: what still arrives (or is held) gets 503 "shutting down";
        the shared RPC subscription is drained (partition subscriptions go when the ownership
        closes)."""
        self._accepting = False
        self._kick.set()
        await self._router.stop_rpc()

    async def close(self) -> None:
        """Drop every subscription, answer what is held, and wait (bounded) for the
        subscriptions being drained."""
        self._accepting = False
        self._kick.set()
        await self._router.close()
        if self._unsubscribing:
            await asyncio.wait(set(self._unsubscribing), timeout=10)
        releaser, self._releaser = self._releaser, None
        if releaser is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(releaser), timeout=5)
            releaser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await releaser

    def partitions_changed(self) -> None:
        """The served partitions changed: requests held for them may go now."""
        self._kick.set()

    async def answer_dropped(self, subject: str, reply: str) -> None:
        """The NATS client dropped a request on ``subject`` because this worker fell behind
        (slow consumer): tell its caller to back off, if it may be answered at all."""
        self._outbox.reject("slow_consumer", subject=subject)
        if reply and self._outbox.may_answer(reply, request=subject):
            error = UnavailableError(
                "this worker is overloaded and dropped the request unread; retry with backoff",
                type="overloaded",
            )
            await self._refuse(reply, error, msgpack=False)

    def on_reconnect(self) -> None:
        """The connection came back: check the server's routing again now."""
        self._recheck.set()

    async def follow_routing(self) -> None:
        """Probe the routing every ``_ROUTING_CHECK`` seconds and after a reconnect, and follow
        the server when an operator adds (or removes) the partition mapping. Runs until
        cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ROUTING_CHECK):
                    await self._recheck.wait()
            self._recheck.clear()
            if not self._accepting:
                continue
            try:
                mode = await detect_routing(self._nc, self._prefix, self._partitions)
            except RoutingError as exc:
                _log.error(
                    "the server's subject mapping is wrong; keeping the old routing", error=str(exc)
                )
                continue
            except (nats.errors.Error, OSError, TimeoutError):
                continue
            if mode is not self._router.mode:
                _log.warning(
                    "the server's routing changed", old=self._router.mode.value, new=mode.value
                )
                await self._router.switch(mode)
                self._ownership.set_routing(mode.value)

    # Subscriptions (asked for by the ownership)

    async def subscribe(self, partition: int) -> None:
        """Receive ``partition``'s requests (answered "moving" until it is served)."""
        await self._router.add(partition)

    async def subscribe_all(self) -> None:
        """Receive every partition's requests through one subscription."""
        await self._router.start_all()

    def unsubscribe(self, partitions: Collection[int]) -> None:
        """Stop receiving the requests of ``partitions`` (drained in the background)."""
        subs = self._router.detach(partitions)
        if subs:
            # Not a worker task: close() awaits these instead of cancelling them, because
            # nats-py's read loop dies if a PONG arrives for a flush that was cancelled.
            task = asyncio.create_task(drain_all(subs), name="ndo-unsubscribe")
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    # Alarms

    def deliver_alarm(self, alarm: StoredAlarm, delivery: AlarmDelivery) -> bool:
        """Queue an alarm delivery on its object; False when it cannot be delivered here now."""
        info = self._classes.get(alarm.class_name)
        if info is None or not info.has_alarm:
            _log.warning(
                "alarm for a class this worker does not serve (or without alarm()); parked",
                class_name=alarm.class_name,
                object_id=alarm.object_id,
            )
            return False
        if not self._accepting:
            return False
        partition = partition_of(alarm.class_name, alarm.object_id, self._partitions)
        if not self._ownership.accepts(partition):
            return False  # moved away: its new owner delivers it
        try:
            activation = self._catalog.activate(info, alarm.object_id, partition)
        except UnavailableError:
            return False  # every object in memory is busy: delivered again later
        return activation.enqueue(Envelope(None, None, "", alarm=delivery))

    # Requests

    async def _handle_request(self, msg: Msg) -> None:
        """A request on an RPC subject (``forward`` routing, or serving every partition)."""
        await self._take(msg, routed=False)

    async def _handle_routed(self, msg: Msg) -> None:
        """A request on a partition subject: mapped there by the server, or forwarded."""
        await self._take(msg, routed=True)

    async def _take(self, msg: Msg, *, routed: bool, held: bool = False) -> None:
        """Route one request into its object's mailbox, or answer why not (``held``: it was
        held for its partition and must not be held again)."""
        if not held and msg.reply and not self._outbox.may_answer(msg.reply, request=msg.subject):
            return  # not run, not forwarded: its answer would be written somewhere not an inbox
        headers = msg.headers
        msgpack = bool(headers) and headers.get(Header.CONTENT_TYPE.value) == MSGPACK_CONTENT_TYPE  # type: ignore[union-attr]
        try:
            if not self._accepting:
                raise UnavailableError("worker is shutting down; retry", type="shutting_down")
            route = self._routes.get(msg.subject)
            if route is None:
                route = self._route(msg.subject, routed)
            info, object_id, spec, partition, _, _ = route
            if not held and partition in self._held:
                # Earlier requests of this partition wait: this one queues behind them.
                if self._hold(msg, routed, partition):
                    return
                raise partition_moving(route.partition, route.address)
            if not self._ownership.accepts(partition):
                if not routed and await self._forward(msg, route):
                    return
                if (
                    not held
                    and self._ownership.acquiring(partition)
                    and self._hold(msg, routed, partition)
                ):
                    return
                raise partition_moving(route.partition, route.address)
            envelope = self._envelope(msg, spec, msgpack, route)
            activation = self._catalog.activate(info, object_id, partition)
            if not activation.enqueue(envelope):
                raise UnavailableError(
                    f"{info.name}/{object_id} has {activation.queued} messages "
                    "waiting; retry with backoff",
                    type="overloaded",
                )
        except ActorError as error:
            await self._refuse(msg.reply, error, msgpack)
        except Exception:  # a bug: the caller still gets an answer, and it is logged once
            request_id = uuid.uuid4().hex[:16]
            _log.exception("request crashed in ingress", request_id=request_id, subject=msg.subject)
            await self._refuse(
                msg.reply,
                HandlerError(
                    f"internal error in the ndo worker (request id {request_id}); nothing was "
                    "applied; report it with the worker's log",
                    type="internal_error",
                ),
                msgpack,
            )

    async def _refuse(self, reply: str, error: ActorError, msgpack: bool) -> None:
        """Count a request ingress did not take and answer ``error`` to ``reply`` (if any)."""
        self._metrics.requests.inc(("-", "-", error.type))
        if reply:
            body, headers = encode_error(error, msgpack)
            await self._outbox.reply(reply, body, headers)

    # Requests held for a partition being taken up

    def _hold(self, msg: Msg, routed: bool, partition: int) -> bool:
        """Hold a request until ``partition`` is served here; False when the bounds are full."""
        size = len(msg.data)
        if self._held_count >= _MAX_HELD or self._held_bytes + size > _MAX_HELD_BYTES:
            return False
        queue = self._held.get(partition)
        if queue is None:
            queue = self._held[partition] = deque()
        queue.append(_Held(msg, routed, time.monotonic() + _HOLD_FOR))
        self._held_count += 1
        self._held_bytes += size
        if self._releaser is None:
            self._releaser = asyncio.create_task(self._release_held(), name="ndo-held-requests")
        return True

    async def _release_held(self) -> None:
        """Hand held requests on, in arrival order, once their partition is served here (or
        answer them once it will not be soon); runs while any are held."""
        try:
            while self._held:
                now = time.monotonic()
                for partition in list(self._held):
                    queue = self._held[partition]
                    while queue:
                        first = queue[0]
                        ready = self._ownership.accepts(partition)
                        waits = self._accepting and self._ownership.acquiring(partition)
                        if not ready and waits and first.until > now:
                            break
                        queue.popleft()
                        self._held_count -= 1
                        self._held_bytes -= len(first.msg.data)
                        await self._take(first.msg, routed=first.routed, held=True)
                    if not queue:
                        del self._held[partition]
                if self._held:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_HOLD_POLL):
                            await self._kick.wait()
                    self._kick.clear()
        finally:
            self._releaser = None

    async def _forward(self, msg: Msg, route: _Route) -> bool:
        """Forward a request to the holder of its partition; False when there is none now."""
        router = self._router
        if router.mode is not RoutingMode.FORWARD:
            return False
        if not self._ownership.held_elsewhere(route.partition):
            return False
        rpc_tail = route.rpc_subject[len(self._prefix) + len(".rpc.") :]
        await router.forward(msg, route.partition, rpc_tail)
        return True

    def _route(self, received: str, routed: bool) -> _Route:
        """Parse and check a subject not seen before, and remember it (raises ``ActorError``
        subclasses, which are not remembered)."""
        subject = received
        if routed:
            with contextlib.suppress(ValueError):  # not a partition subject: reported as invalid
                subject, _ = self._router.rpc_subject_of(received)
        try:
            address = parse_rpc_subject(self._prefix, subject)
        except InvalidSubjectError as exc:
            raise BadRequestError(str(exc), type="invalid_subject") from None
        info = self._classes.get(address.class_name)
        if info is None:
            raise NotFoundError(
                f"unknown class {address.class_name!r}; this worker serves "
                f"{', '.join(sorted(self._classes))}",
                type="unknown_class",
            )
        spec = info.method_spec(address.method)
        partition = partition_of(address.class_name, address.object_id, self._partitions)
        route = _Route(
            info,
            address.object_id,
            spec,
            partition,
            subject,
            ActorId(address.class_name, address.object_id),
        )
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        self._routes[received] = route
        return route

    def _envelope(self, msg: Msg, spec: MethodSpec, msgpack: bool, route: _Route) -> Envelope:
        """Check the body and headers of a request for ``route``'s object and decode its
        arguments."""
        return request_envelope(
            spec,
            msg.data,
            msg.headers,
            msg.reply,
            target=route.address,
            msgpack=msgpack,
            max_payload=self._max_payload,
            caller_info=self._caller_info,
        )
