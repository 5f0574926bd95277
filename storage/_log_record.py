"""The record format of a partition's log: what replicated storage appends, and reads back.

A partition's log is the sequence of its records in one JetStream stream subject; ``storage``
only defines the bytes (NATS lives in ``service``). Each record says which record it follows
(``prev``, the stream sequence the append expected as the subject's last), so a reader can prove
it has every record and none twice. Two kinds:

* a **commit** record: the write-sets of one group commit for this partition, in turn order
  (writes, cleared objects, alarm changes and idempotency records travel together);
* a **claim** record (``claim=True``, no writes): a holder begins its tenure at ``epoch``. It is
  appended after the new holder has read the log to its end, so any append of an earlier holder
  that has not landed by then is refused (its expected last sequence is stale).

Records are MessagePack. ``decode_log_record`` is defensive: anything that is not a record this
version writes raises ``ValueError`` and is never applied.
"""

from __future__ import annotations

from typing import Final

import msgspec

from ndo.storage._records import ObjectWrite

__all__ = ["LogRecord", "decode_log_record", "encode_log_record"]


class LogRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a partition's log."""

    prev: int
    """Stream sequence of the partition's previous record (0: the log was empty)."""
    epoch: int
    """Fencing epoch of the writer's tenure."""
    writer: str
    """Name of the worker that appended it (for people)."""
    claim: bool = False
    """A claim record: a tenure begins; ``writes`` is empty."""
    writes: list[ObjectWrite] = msgspec.field(default_factory=list)
    """The write-sets of one group commit, in the order their turns ran."""


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(LogRecord)


def encode_log_record(record: LogRecord) -> bytes:
    """The bytes appended to the log for ``record``."""
    return _ENCODER.encode(record)


def decode_log_record(data: bytes) -> LogRecord:
    """Read a log record.

    Raises:
        ValueError: ``data`` is not a log record (a foreign message on the log's subject).
    """
    try:
        record = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not an ndo partition log record: {exc}") from None
    if record.prev < 0 or (record.claim and record.writes):
        raise ValueError("not an ndo partition log record: inconsistent fields")
    return record
