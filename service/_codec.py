"""Reply encoding for the wire protocol: JSON or MessagePack bodies, NATS-service error headers,
and the form a reply is remembered in under an idempotency key."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ndo.actors import ActorError
from ndo.subjects import MSGPACK_CONTENT_TYPE, Header

__all__ = ["MSGPACK_HEADERS", "encode_error", "encode_result", "replay_reply", "stored_reply"]

_JSON: Final = msgspec.json.Encoder()
_MSGPACK: Final = msgspec.msgpack.Encoder()
_JSON_DECODER: Final = msgspec.json.Decoder()
_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder()
MSGPACK_HEADERS: Final = {Header.CONTENT_TYPE.value: MSGPACK_CONTENT_TYPE}
"""Headers on a successful MessagePack reply."""


def encode_result(result: Any, msgpack: bool) -> bytes:
    """Encode a handler's return value (raises ``TypeError``/``EncodeError`` if unencodable)."""
    return _MSGPACK.encode(result) if msgpack else _JSON.encode(result)


def encode_error(error: ActorError, msgpack: bool = False) -> tuple[bytes, dict[str, str]]:
    """Return ``(body, headers)`` of an error reply."""
    headers = {
        Header.ERROR_CODE.value: str(error.code),
        # Header values must be one line.
        Header.ERROR.value: error.message.replace("\r", " ").replace("\n", " ")[:1024],
    }
    body = {"error": error.to_wire()}
    if msgpack:
        headers[Header.CONTENT_TYPE.value] = MSGPACK_CONTENT_TYPE
        return _MSGPACK.encode(body), headers
    return _JSON.encode(body), headers


def stored_reply(body: bytes, msgpack: bool) -> bytes:
    """A reply body as an idempotency record keeps it: one byte that says whether it is
    MessagePack (1) or JSON (0), then the body."""
    return (b"\x01" if msgpack else b"\x00") + body


def replay_reply(stored: bytes, msgpack: bool) -> tuple[bytes, dict[str, str] | None]:
    """``(body, headers)`` of a remembered reply, re-encoded in the encoding the retried request
    asked for."""
    stored_msgpack, body = stored[:1] == b"\x01", stored[1:]
    if stored_msgpack != msgpack:
        value = _MSGPACK_DECODER.decode(body) if stored_msgpack else _JSON_DECODER.decode(body)
        body = encode_result(value, msgpack)
    return body, (MSGPACK_HEADERS if msgpack else None)
