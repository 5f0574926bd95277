"""Reply encoding for the wire protocol: JSON or MessagePack bodies, NATS-service error headers."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ndo.actors import ActorError
from ndo.subjects import MSGPACK_CONTENT_TYPE, Header

__all__ = ["MSGPACK_HEADERS", "encode_error", "encode_result"]

_JSON: Final = msgspec.json.Encoder()
_MSGPACK: Final = msgspec.msgpack.Encoder()
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
