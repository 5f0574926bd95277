"""NATS service discovery: each worker answers ``$SRV.PING|INFO|STATS`` in the micro protocol.

This makes workers visible to standard tooling (``nats micro ls``, ``nats micro info ndo``,
``ndo status`` without JetStream). The answers are the micro protocol's own records
(``nats.micro.service``), but the responder is ndo's: nats-py's ``add_service`` answers whatever
reply subject a request names, and on a shared bus that lets anyone make the worker write into
its own lease bucket; here every answer goes through the ``Outbox``, which answers inboxes only.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from ndo.service._outbox import Outbox
from ndo.storage import AppliedMigration

__all__ = [
    "MIGRATIONS_METADATA",
    "SERVICE_NAME",
    "SERVICE_VERSION",
    "Discovery",
    "migrations_metadata",
    "start_discovery",
]

SERVICE_NAME: Final = "ndo"
"""Name workers register under (``nats micro info ndo``)."""
SERVICE_VERSION: Final = "0.1.0"
"""Version reported to the service API."""

MIGRATIONS_METADATA: Final = "migrations"
"""Metadata key of the class migrations storage has applied (``migrations_metadata``)."""

_DESCRIPTION: Final = "NATS Durable Objects worker"


class Discovery:
    """One worker's answers to the service API; ``stop`` leaves it."""

    # Configuration
    id: str
    """The worker's service instance id (``nats micro info`` lists it)."""
    _metadata: dict[str, str]
    _started: datetime
    # Collaborators
    _outbox: Outbox
    # State
    _subs: list[Subscription]

    def __init__(self, outbox: Outbox, metadata: dict[str, str]) -> None:
        """Describe the worker; nothing is subscribed until ``start``."""
        self.id = uuid.uuid4().hex
        self._metadata = metadata
        self._started = datetime.now(UTC).replace(tzinfo=None)
        self._outbox = outbox
        self._subs = []

    async def start(self, nc: NatsClient) -> None:
        """Answer ``$SRV.<VERB>``, ``$SRV.<VERB>.ndo`` and ``$SRV.<VERB>.ndo.<id>``."""
        answers: dict[str, Callable[[], bytes]] = {
            "PING": self._ping,
            "INFO": self._info,
            "STATS": self._stats,
        }
        for verb, answer in answers.items():
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{SERVICE_NAME}",
                f"$SRV.{verb}.{SERVICE_NAME}.{self.id}",
            ):
                self._subs.append(await nc.subscribe(subject, cb=self._responder(answer)))
        await nc.flush()

    async def stop(self) -> None:
        """Stop answering."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def _responder(self, answer: Callable[[], bytes]) -> Callable[[Msg], Awaitable[None]]:
        async def respond(msg: Msg) -> None:
            if msg.reply and self._outbox.may_answer(msg.reply, request=msg.subject):
                await self._outbox.reply(msg.reply, answer(), None)

        return respond

    def _ping(self) -> bytes:
        ping = ServicePing(
            id=self.id, name=SERVICE_NAME, version=SERVICE_VERSION, metadata=self._metadata
        )
        return json.dumps(ping.to_dict()).encode()

    def _info(self) -> bytes:
        info = ServiceInfo(
            id=self.id,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description=_DESCRIPTION,
            metadata=self._metadata,
        )
        return json.dumps(info.to_dict()).encode()

    def _stats(self) -> bytes:
        stats = ServiceStats(
            id=self.id,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            started=self._started,
            metadata=self._metadata,
        )
        return json.dumps(stats.to_dict()).encode()


def migrations_metadata(migrations: Sequence[AppliedMigration]) -> str:
    """The applied class migrations as one compact JSON array (a metadata value is a string):
    ``[{"tag", "applied_at", "worker", "renamed": [{"from", "to"}], "deleted",
    "objects_renamed", "objects_deleted"}, ...]``."""
    return json.dumps(
        [
            {
                "tag": m.tag,
                "applied_at": m.applied_at,
                "worker": m.worker,
                "renamed": [{"from": old, "to": new} for old, new in m.renamed],
                "deleted": list(m.deleted),
                "objects_renamed": m.objects_renamed,
                "objects_deleted": m.objects_deleted,
            }
            for m in migrations
        ],
        separators=(",", ":"),
    )


async def start_discovery(
    nc: NatsClient,
    outbox: Outbox,
    *,
    worker: str,
    prefix: str,
    classes: Iterable[str],
    migrations: Sequence[AppliedMigration] = (),
) -> Discovery:
    """Register this worker with the NATS service API; ``await discovery.stop()`` to leave.

    ``migrations``: the class migrations its storage has applied, shown by ``ndo status``.
    """
    discovery = Discovery(
        outbox,
        {
            "worker": worker,
            "prefix": prefix,
            "classes": ",".join(sorted(classes)),
            "rpc_subject": f"{prefix}.rpc.<Class>.<id>.<method>",
            MIGRATIONS_METADATA: migrations_metadata(migrations),
        },
    )
    await discovery.start(nc)
    return discovery
