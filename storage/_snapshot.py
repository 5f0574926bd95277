"""The snapshot format of one partition: every row it holds, and the log position it covers.

Replicated storage stores a partition's snapshot (in the JetStream object store) so its log can
be purged below it; a new holder restores the snapshot, then the records after ``seq``. Like
the log record, this module only defines the bytes; ``SqliteStorage.export_partition`` and
``import_partition`` produce and load it.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["PartitionSnapshot", "decode_snapshot", "encode_snapshot"]


class PartitionSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent copy of one partition at one position of its log."""

    partition: int
    seq: int
    """Stream sequence of the last log record the copy includes (0: none)."""
    epoch: int
    """Epoch of the tenure that applied that record."""
    taken: float = 0.0
    """Epoch seconds when the copy was taken."""
    kv: list[tuple[str, str, str, bytes]] = msgspec.field(default_factory=list)
    """``(class, id, key, value)`` rows."""
    alarms: list[tuple[str, str, float]] = msgspec.field(default_factory=list)
    """``(class, id, due)`` rows."""
    idempotency: list[tuple[str, str, str, bytes, float]] = msgspec.field(default_factory=list)
    """``(class, id, key, reply, expires)`` rows."""


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(PartitionSnapshot)


def encode_snapshot(snapshot: PartitionSnapshot) -> bytes:
    """The stored bytes of ``snapshot``."""
    return _ENCODER.encode(snapshot)


def decode_snapshot(data: bytes) -> PartitionSnapshot:
    """Read a stored snapshot.

    Raises:
        ValueError: ``data`` is not a snapshot this version writes.
    """
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not an ndo partition snapshot: {exc}") from None
