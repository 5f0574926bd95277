"""Routing: how a request for an object reaches the worker that owns the object's partition.

Two modes, detected when a worker starts (``detect_routing``):

``mapped``
    The NATS server rewrites ``<prefix>.rpc.<Class>.<id>.<method>`` onto
    ``<prefix>.part.<p>.<Class>.<id>.<method>`` with its deterministic ``partition()`` mapping
    function (``server_mapping`` builds it, ``mapping_snippet`` prints it for operators). A worker
    subscribes only to the partitions it holds, each in a queue group named after the partition,
    so no request takes an extra hop and a partition nobody holds answers "no responders".

``forward``
    A stock server without the mapping. Every worker subscribes to ``<prefix>.rpc.*.*.*`` in one
    queue group; a worker that receives a request for a partition it does not serve publishes it
    unchanged (body, headers, the caller's reply subject) to ``<prefix>.sys.fwd.<p>.<Class>.<id>.
    <method>``, where the partition's holder listens in the partition's queue group. One extra
    hop, invisible to the caller.

Detection publishes a few probe requests on RPC subjects and looks where they arrive: on the
RPC subject itself (no mapping) or on a partition subject (mapping present). A mapping whose
partition numbers disagree with the deployment's partition count is refused with the count it
implies, instead of silently mis-delivering.

Subject strings of these internal subjects are built here (next to their only users); the
public RPC subjects still come from ``subjects``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import Final

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ndo.service._errors import RoutingError
from ndo.subjects import (
    fnv1a_32,
    forward_subject,
    forward_wildcard,
    partition_mapping,
    partition_of,
    partition_wildcard,
    rpc_wildcard,
)

__all__ = [
    "PROBE_CLASS",
    "QUEUE_GROUP",
    "Router",
    "RoutingError",
    "RoutingMode",
    "detect_routing",
    "drain_all",
    "mapping_snippet",
    "partition_queue",
    "server_mapping",
]

_log = structlog.get_logger("ndo.routing")

QUEUE_GROUP: Final = "ndo-workers"
"""Queue group of every worker's RPC subscription (each request reaches one worker)."""

PROBE_CLASS: Final = "_ndo_probe"
"""Class name of routing probes (no such class is ever served; probes carry no reply)."""

_PROBES: Final = 16
"""Probe requests per detection: a wrong partition count slips past all of them with odds of at
most 2**-16 for counts that differ by a factor of two, far less otherwise."""

_PENDING_MSGS: Final = 100_000
"""Messages the NATS client may buffer for this worker's request subscriptions, all together."""
_PENDING_BYTES: Final = 256 * 1024 * 1024
"""Bytes the NATS client may buffer for this worker's request subscriptions, all together: the
shared subscriptions get it all, each partition's an equal share (at least the floors below), so
a worker of many partitions cannot buffer partitions x a whole budget. What is dropped beyond it
is answered 503 "overloaded" (``Ingress.answer_dropped``)."""
_PARTITION_MIN_MSGS: Final = 5_000
_PARTITION_MIN_BYTES: Final = 4 * 1024 * 1024

Handler = Callable[[Msg], Awaitable[None]]


class RoutingMode(StrEnum):
    """How requests reach partition holders."""

    MAPPED = "mapped"
    """The server maps RPC subjects onto partition subjects (no extra hop)."""
    FORWARD = "forward"
    """No mapping: workers take RPC requests in one queue group and forward to the holder."""


def server_mapping(prefix: str, partitions: int) -> tuple[str, str]:
    """The server subject mapping (source, destination) for a deployment."""
    return partition_mapping(prefix, partitions)


def mapping_snippet(prefix: str, partitions: int, account: str | None = None) -> str:
    """nats-server configuration text that enables ``mapped`` routing for a deployment."""
    source, destination = server_mapping(prefix, partitions)
    body = f'mappings {{\n  "{source}": "{destination}"\n}}'
    if account is None:
        return body
    indented = "\n".join("    " + line for line in body.splitlines())
    return f"accounts {{\n  {account}: {{\n{indented}\n  }}\n}}"


def partition_queue(prefix: str, partition: int) -> str:
    """Queue group of one partition's subscription (one consumer per message, even during a
    hand-over overlap)."""
    return f"{prefix.replace('.', '-')}-part-{partition}"


def _partition_wildcard(prefix: str, mode: RoutingMode, partition: int | None) -> str:
    if mode is RoutingMode.MAPPED:
        return partition_wildcard(prefix, partition)
    return forward_wildcard(prefix, partition)


async def detect_routing(
    nc: NatsClient, prefix: str, partitions: int, *, timeout: float = 2.0
) -> RoutingMode:
    """Find out whether the server maps RPC subjects onto partitions, and check the mapping.

    Raises:
        RoutingError: the mapping uses another partition count or an unexpected subject shape.
    """
    arrived: asyncio.Queue[str] = asyncio.Queue()

    async def seen(msg: Msg) -> None:
        arrived.put_nowait(msg.subject)

    run = uuid.uuid4().hex[:12]
    ids = [f"{run}{i:02d}" for i in range(_PROBES)]
    subs = [
        await nc.subscribe(f"{prefix}.rpc.{PROBE_CLASS}.*.probe", cb=seen),
        await nc.subscribe(f"{prefix}.part.*.{PROBE_CLASS}.*.probe", cb=seen),
    ]
    try:
        await nc.flush()
        for object_id in ids:
            await nc.publish(f"{prefix}.rpc.{PROBE_CLASS}.{object_id}.probe", b"")
        await nc.flush()
        found: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(ids):
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    subject = await arrived.get()
            except TimeoutError:
                break
            object_id = subject.split(".")[-2]
            if object_id in ids:
                found[object_id] = subject
    finally:
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
    source, destination = server_mapping(prefix, partitions)
    if not found:
        raise RoutingError(
            f"requests published on {source} arrive neither there nor on {prefix}.part.<p>....: "
            f"the server remaps them somewhere else (or denies this connection); remove that "
            f"mapping, or use exactly {source} -> {destination}"
        )
    rpc_head = f"{prefix}.rpc."
    if all(s.startswith(rpc_head) for s in found.values()):
        return RoutingMode.FORWARD
    observed: dict[str, int] = {}
    for object_id, subject in found.items():
        if subject.startswith(rpc_head):
            raise RoutingError(
                f"only some requests on {source} are remapped; check the server's mappings"
            )
        observed[object_id] = int(subject[len(prefix) + 6 :].split(".", 1)[0])
    wrong = {i: p for i, p in observed.items() if p != partition_of(PROBE_CLASS, i, partitions)}
    if wrong:
        hashes = {i: fnv1a_32((PROBE_CLASS + i).encode()) for i in observed}
        implied = [
            n
            for n in range(1, 4097)
            if all(hashes[i] % n == p and p < n for i, p in observed.items())
        ]
        count = f"{implied[0]} partitions" if len(implied) == 1 else "a different partition count"
        raise RoutingError(
            f"the server's mapping of {source} uses {count}, but this deployment has "
            f"{partitions}; fix the server mapping to {source} -> {destination} "
            f"(`ndo mapping --partitions {partitions}` prints it) or start the worker with the "
            "deployment's real partition count"
        )
    return RoutingMode.MAPPED


class Router:
    """A worker's subscriptions: the shared RPC subscription (``forward`` mode) and one queue
    subscription per partition it holds (or one for all partitions when it serves them all)."""

    # Configuration
    _nc: NatsClient
    _prefix: str
    mode: RoutingMode
    _on_rpc: Handler
    _on_routed: Handler
    # State
    _rpc_sub: Subscription | None
    _all_sub: Subscription | None
    _serve_all: bool
    """``start_all`` was called: every partition comes through the shared subscriptions."""
    _subs: dict[int, Subscription]
    forwarded: int
    """Requests this worker forwarded to another partition holder."""

    def __init__(
        self,
        nc: NatsClient,
        prefix: str,
        mode: RoutingMode,
        *,
        partitions: int,
        on_rpc: Handler,
        on_routed: Handler,
    ) -> None:
        """Create the router.

        Args:
            nc: the worker's connection.
            prefix: the deployment's subject prefix.
            mode: the detected routing mode.
            partitions: the deployment's partition count (sizes each subscription's buffer).
            on_rpc: callback for requests on the RPC subjects (``forward`` mode).
            on_routed: callback for requests on partition subjects (mapped or forwarded); use
                ``rpc_subject_of`` to recover the RPC subject.
        """
        self._nc = nc
        self._prefix = prefix
        self.mode = mode
        self._on_rpc = on_rpc
        self._on_routed = on_routed
        self._rpc_sub = None
        self._all_sub = None
        self._serve_all = False
        self._subs = {}
        self.forwarded = 0
        self._partition_limits = (
            max(_PARTITION_MIN_MSGS, _PENDING_MSGS // partitions),
            max(_PARTITION_MIN_BYTES, _PENDING_BYTES // partitions),
        )
        self._part_head = f"{prefix}.part."
        self._fwd_head = f"{prefix}.sys.fwd."
        self._rpc_head = f"{prefix}.rpc."

    @property
    def partitions(self) -> frozenset[int]:
        """Partitions with a subscription of their own."""
        return frozenset(self._subs)

    def rpc_subject_of(self, subject: str) -> tuple[str, int]:
        """``(RPC subject, partition)`` of a request that arrived on a partition subject.

        Raises:
            ValueError: ``subject`` is not a partition subject.
        """
        if subject.startswith(self._part_head):
            rest = subject[len(self._part_head) :]
        elif subject.startswith(self._fwd_head):
            rest = subject[len(self._fwd_head) :]
        else:
            raise ValueError(f"{subject!r} is not a partition subject")
        partition, tail = rest.split(".", 1)
        return self._rpc_head + tail, int(partition)

    async def start_rpc(self) -> None:
        """Subscribe to the RPC subjects in the workers' queue group (``forward`` mode only)."""
        if self.mode is RoutingMode.FORWARD and self._rpc_sub is None:
            self._rpc_sub = await self._subscribe(
                rpc_wildcard(self._prefix), QUEUE_GROUP, self._on_rpc
            )

    async def start_all(self) -> None:
        """Serve every partition through one subscription (a worker that owns everything)."""
        self._serve_all = True
        if self.mode is RoutingMode.FORWARD:
            await self.start_rpc()
        elif self._all_sub is None:
            wildcard = _partition_wildcard(self._prefix, self.mode, None)
            self._all_sub = await self._subscribe(wildcard, QUEUE_GROUP, self._on_routed)

    async def add(self, partition: int) -> None:
        """Subscribe to ``partition``'s subject in its queue group (idempotent)."""
        if partition in self._subs:
            return
        subject = _partition_wildcard(self._prefix, self.mode, partition)
        self._subs[partition] = await self._subscribe(
            subject,
            partition_queue(self._prefix, partition),
            self._on_routed,
            limits=self._partition_limits,
        )

    def detach(self, partitions: Iterable[int]) -> list[Subscription]:
        """Forget the subscriptions of ``partitions`` at once and return them for draining (a
        later ``add`` subscribes anew instead of finding a subscription on its way out)."""
        subs = [self._subs.pop(p, None) for p in list(partitions)]
        return [s for s in subs if s is not None]

    async def remove(self, partitions: Iterable[int]) -> None:
        """Unsubscribe from ``partitions``; requests already received still reach the callback."""
        await drain_all(self.detach(partitions))

    async def forward(self, msg: Msg, partition: int, rpc_tail: str) -> None:
        """Hand a request to ``partition``'s holder, keeping body, headers and reply subject."""
        self.forwarded += 1
        await self._nc.publish(
            forward_subject(self._prefix, partition, rpc_tail),
            msg.data,
            reply=msg.reply,
            headers=msg.headers,
        )

    async def switch(self, mode: RoutingMode) -> None:
        """Move every subscription to ``mode`` (the server's mapping was added or removed):
        subscribe the new way first, then drain the old subscriptions."""
        if mode is self.mode:
            return
        old = [s for s in (self._rpc_sub, self._all_sub, *self._subs.values()) if s is not None]
        partitions = list(self._subs)
        self.mode = mode
        self._rpc_sub = self._all_sub = None
        self._subs = {}
        if self._serve_all:
            await self.start_all()
        else:
            await self.start_rpc()
        for partition in partitions:
            await self.add(partition)
        for sub in old:
            await _drain_quietly(sub)

    async def stop_rpc(self) -> None:
        """Stop taking new requests on the shared subscriptions (RPC and all-partitions)."""
        subs = [s for s in (self._rpc_sub, self._all_sub) if s is not None]
        self._rpc_sub = self._all_sub = None
        for sub in subs:
            await _drain_quietly(sub)

    async def close(self) -> None:
        """Drop every subscription."""
        await self.stop_rpc()
        await self.remove(list(self._subs))

    async def _subscribe(
        self,
        subject: str,
        queue: str,
        cb: Handler,
        *,
        limits: tuple[int, int] | None = None,
    ) -> Subscription:
        msgs, size = limits or (_PENDING_MSGS, _PENDING_BYTES)
        return await self._nc.subscribe(
            subject, queue=queue, cb=cb, pending_msgs_limit=msgs, pending_bytes_limit=size
        )


async def drain_all(subs: Iterable[Subscription]) -> None:
    """Drain subscriptions (see ``_drain_quietly``) one after the other."""
    for sub in subs:
        await _drain_quietly(sub)


async def _drain_quietly(sub: Subscription) -> None:
    """UNSUB, then let the messages already received run through the callback (bounded)."""
    try:
        async with asyncio.timeout(5):
            await sub.drain()  # type: ignore[no-untyped-call]
    except (nats.errors.Error, TimeoutError, OSError):
        with contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()
