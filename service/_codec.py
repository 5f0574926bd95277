"""Reply encoding for the wire protocol: JSON or MessagePack bodies, NATS-service error headers,
and the form a reply is remembered in under an idempotency key."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ndo.actors import ActorError, BadRequestError, HandlerError
from ndo.subjects import MSGPACK_CONTENT_TYPE, Header

__all__ = [
    "FINGERPRINT_BYTES",
    "MSGPACK_HEADERS",
    "encode_error",
    "encode_result",
    "replay_reply",
    "stored_fingerprint",
    "stored_reply",
]

_JSON: Final = msgspec.json.Encoder()
_MSGPACK: Final = msgspec.msgpack.Encoder()
_JSON_DECODER: Final = msgspec.json.Decoder()
_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder()
MSGPACK_HEADERS: Final = {Header.CONTENT_TYPE.value: MSGPACK_CONTENT_TYPE}
"""Headers on a successful MessagePack reply."""

FINGERPRINT_BYTES: Final = 16
"""Length of the call fingerprint a remembered reply starts with (``stored_reply``)."""

# The first byte of a remembered reply: its encoding, and whether a fingerprint follows.
_JSON_TAG: Final = 0
"""JSON body, no fingerprint (rows written before fingerprints: they match any call)."""
_MSGPACK_TAG: Final = 1
"""MessagePack body, no fingerprint."""
_JSON_CALL_TAG: Final = 2
"""Fingerprint, then a JSON body."""
_MSGPACK_CALL_TAG: Final = 3
"""Fingerprint, then a MessagePack body."""


def encode_result(result: Any, msgpack: bool) -> bytes:
    """Encode a handler's return value.

    Raises:
        TypeError: a value msgspec cannot encode (or ``EncodeError``, ``OverflowError``).
        HandlerError: the value nests too deeply to encode.
    """
    try:
        return _MSGPACK.encode(result) if msgpack else _JSON.encode(result)
    except RecursionError:
        raise HandlerError(
            "the handler returned a value nested too deeply to encode (arrays or objects "
            "inside each other hundreds of levels deep); return a flatter value"
        ) from None


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


def stored_reply(body: bytes, msgpack: bool, fingerprint: bytes | None = None) -> bytes:
    """A reply body as an idempotency record keeps it.

    One byte says the encoding and whether the call's ``fingerprint`` (``FINGERPRINT_BYTES``)
    follows: 0 JSON, 1 MessagePack (as written before fingerprints), 2 and 3 the same with the
    fingerprint; then the body. Storage keeps the bytes as they are, so the format needs no
    schema change and rows of either form replay.
    """
    if fingerprint is None:
        return bytes((_MSGPACK_TAG if msgpack else _JSON_TAG,)) + body
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(
            f"a call fingerprint has {FINGERPRINT_BYTES} bytes, not {len(fingerprint)}"
        )
    return bytes((_MSGPACK_CALL_TAG if msgpack else _JSON_CALL_TAG,)) + fingerprint + body


def stored_fingerprint(stored: bytes) -> bytes | None:
    """The fingerprint of the call a remembered reply answered; ``None`` for a row written
    without one (treat it as the same call)."""
    if stored and stored[0] in (_JSON_CALL_TAG, _MSGPACK_CALL_TAG):
        return stored[1 : 1 + FINGERPRINT_BYTES]
    return None


def replay_reply(stored: bytes, msgpack: bool) -> tuple[bytes, dict[str, str] | None]:
    """``(body, headers)`` of a remembered reply, re-encoded in the encoding the retried request
    asked for.

    Raises:
        BadRequestError: the reply cannot be expressed in the other encoding (an integer
            MessagePack cannot hold, a map key JSON cannot); the first call's encoding can.
    """
    tag = stored[0] if stored else _JSON_TAG
    stored_msgpack = tag in (_MSGPACK_TAG, _MSGPACK_CALL_TAG)
    body = (
        stored[1 + FINGERPRINT_BYTES :]
        if tag in (_JSON_CALL_TAG, _MSGPACK_CALL_TAG)
        else stored[1:]
    )
    if stored_msgpack != msgpack:
        value = _MSGPACK_DECODER.decode(body) if stored_msgpack else _JSON_DECODER.decode(body)
        try:
            body = encode_result(value, msgpack)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            first, retry = ("MessagePack", "JSON") if stored_msgpack else ("JSON", "MessagePack")
            raise BadRequestError(
                f"the reply remembered for this Idempotency-Key cannot be sent as {retry} "
                f"({exc}); retry in {first}, as the first call was sent",
                type="unencodable_reply",
            ) from None
    return body, (MSGPACK_HEADERS if msgpack else None)
