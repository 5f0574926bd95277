"""The NATS client class a worker connects with: nats-py's, made safe against bytes that are not
UTF-8 in what a publisher controls.

nats-py decodes every message's subject, reply subject and inline status line as strict UTF-8
inside its reader task, and a ``UnicodeDecodeError`` there ends that task: one message published
to ``ndo.rpc.Counter.\\xff.increment`` (nats-server passes such bytes on) would leave the worker
connected but deaf. When the strict decode fails, this client decodes again with every non-ASCII
byte read as ``?`` (one byte for one: nats-py slices the status line by position), so the message
reaches ingress, which answers it like any other invalid subject. Messages that decode cleanly
take nats-py's path unchanged.
"""

from __future__ import annotations

from typing import Any, Final

from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = ["TolerantNatsClient"]


_ASCII_ONLY: Final = bytes.maketrans(bytes(range(128, 256)), b"?" * 128)
"""Every non-ASCII byte to ``?``."""


def _ascii(raw: bytes) -> bytes:
    """``raw`` with every non-ASCII byte replaced by ``?`` (same length)."""
    return raw.translate(_ASCII_ONLY)


class TolerantNatsClient(Client):
    """nats-py's ``Client``, except that a message whose subject, reply subject or header status
    line is not UTF-8 arrives with ``?`` for its non-ASCII bytes instead of stopping the
    connection's reader."""

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        try:
            return super()._build_message(sid, subject, reply, data, headers)  # type: ignore[no-any-return]
        except UnicodeDecodeError:
            return super()._build_message(  # type: ignore[no-any-return]
                sid, _ascii(subject), _ascii(reply), data, headers
            )

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        try:
            return await super()._process_headers(headers)
        except UnicodeDecodeError:
            return await super()._process_headers(_ascii(bytes(headers)))
