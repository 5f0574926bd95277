"""Filling partition logs directly: pre-populated objects for replicated storage, and long logs
for the restore measurements.

A worker appends one record at a time and waits for each acknowledgement (the next record's
``prev`` is the last one's sequence). The loader knows every sequence in advance instead: it
runs while *no worker* appends to the deployment's log stream, so records it publishes in order
get consecutive stream sequences. It publishes a window of records without waiting and then
checks every acknowledgement against the predicted sequence: a record that landed elsewhere, or
was refused, stops the load with ``BenchError``. The first record of each call carries the fence
a worker uses (``Nats-Expected-Last-Subject-Sequence``: the partition's last record); the ones
after it cannot, because a clustered stream checks that header against what it has *applied*,
and refuses a record whose predecessor is still in flight (``wrong last sequence``).

Records are the format a worker writes (``LogRecord`` at epoch 0, below any lease's epoch), so
a worker that claims the partition later catches up through them exactly as after a crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck

from ndo.ops._errors import BenchError
from ndo.service import PartitionLog, log_stream_name
from ndo.storage import LogRecord, ObjectWrite, StorageError, encode_log_record
from ndo.subjects import log_subject

__all__ = ["LOADER_WRITER", "LogLoader", "chunked"]

LOADER_WRITER: Final = "ndo-bench-loader"
"""The ``writer`` of the records the loader appends."""
_WINDOW: Final = 1_000
"""Records published before their acknowledgements are awaited."""
_ACK_TIMEOUT: Final = 60.0
"""Seconds a window's acknowledgements may take (R3 on a busy two-core machine is slow)."""
_CHUNK: Final = 512
"""Write-sets per record when loading pre-populated objects (a few tens of KiB)."""


def chunked(
    writes: Iterable[ObjectWrite], size: int = _CHUNK
) -> dict[int, list[list[ObjectWrite]]]:
    """Group write-sets by partition and cut each partition's into records of ``size``."""
    records: dict[int, list[list[ObjectWrite]]] = {}
    for write in writes:
        chain = records.setdefault(write.partition, [])
        if not chain or len(chain[-1]) >= size:
            chain.append([])
        chain[-1].append(write)
    return records


class LogLoader:
    """Appends records to one deployment's partition logs, pipelined (no worker may run)."""

    # Configuration
    _nc: NatsClient
    _prefix: str
    _replicas: int
    stream: str
    """The partition log stream's name (``NDO_LOG`` for prefix ``ndo``)."""
    # State
    appended: int
    """Records appended so far."""

    def __init__(self, nc: NatsClient, prefix: str, *, replicas: int) -> None:
        """Describe the logs of deployment ``prefix``; ``open`` creates the stream if needed
        (with ``replicas``, as a worker would)."""
        self._nc = nc
        self._prefix = prefix
        self._replicas = replicas
        self.stream = log_stream_name(prefix)
        self.appended = 0

    async def open(self) -> None:
        """Create the log stream (or find it).

        Raises:
            BenchError: it cannot be created.
        """
        try:
            await PartitionLog(
                self._nc, self._prefix, replicas=self._replicas, append_timeout=10.0
            ).open()
        except (StorageError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise BenchError(
                f"cannot create the partition log stream {self.stream}: {exc}"
            ) from None

    async def append(self, partition: int, records: Iterable[Sequence[ObjectWrite]]) -> int:
        """Append one record per item of ``records`` to ``partition``'s log, in order.

        Returns:
            The sequence of the partition's last record afterwards.

        Raises:
            BenchError: a record was refused or landed at another sequence than predicted
                (something else appended meanwhile), or acknowledgements did not come.
        """
        js = self._nc.jetstream()
        subject = log_subject(self._prefix, partition)
        prev = await self._last_of(partition)
        next_seq = await self._stream_last() + 1
        pending: list[tuple[int, asyncio.Future[PubAck]]] = []
        fence: dict[str, str] | None = {"Nats-Expected-Last-Subject-Sequence": str(prev)}
        for writes in records:
            record = LogRecord(prev=prev, epoch=0, writer=LOADER_WRITER, writes=list(writes))
            future = await js.publish_async(subject, encode_log_record(record), headers=fence)
            fence = None  # the rest: checked by their acknowledged sequence (module doc)
            pending.append((next_seq, future))
            prev, next_seq = next_seq, next_seq + 1
            if len(pending) >= _WINDOW:
                await self._settle(partition, pending)
                pending = []
        await self._settle(partition, pending)
        return prev

    async def _settle(
        self, partition: int, pending: list[tuple[int, asyncio.Future[PubAck]]]
    ) -> None:
        if not pending:
            return
        try:
            async with asyncio.timeout(_ACK_TIMEOUT):
                acks = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        except TimeoutError:
            raise BenchError(
                f"the partition log did not acknowledge {len(pending)} records of partition "
                f"{partition} within {_ACK_TIMEOUT:g}s"
            ) from None
        for (expected, _), ack in zip(pending, acks, strict=True):
            if isinstance(ack, BaseException):
                raise BenchError(
                    f"appending record {expected} of partition {partition} failed: {ack!r} "
                    "(does a worker append to this log while the loader runs?)"
                )
            if ack.seq != expected:
                raise BenchError(
                    f"a record of partition {partition} landed at {ack.seq}, expected {expected}"
                )
        self.appended += len(pending)

    async def _last_of(self, partition: int) -> int:
        try:
            msg = await self._nc.jetstream().get_msg(
                self.stream, subject=log_subject(self._prefix, partition)
            )
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def _stream_last(self) -> int:
        info = await self._nc.jetstream().stream_info(self.stream)
        return int(info.state.last_seq or 0)
