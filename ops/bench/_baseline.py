"""The baseline responder: an in-memory nats-py counter, not durable — the practical limit.

What one Python worker on this machine can do at best with the same requests ndo serves: a
plain nats-py subscription callback that takes the object id and the method from the subject
(``<prefix>.rpc.Counter.<id>.<method>``), keeps every counter in a ``dict[str, int]`` and
answers ``get`` with the value and ``increment`` with the value after adding ``by`` (msgspec
decodes the body; no body means ``by=1``). Nothing is stored, journaled or leased; there is no
per-object task, deadline or output gate. An unknown method, or a body that does not decode, gets
an error reply (``Nats-Service-Error-Code`` 404 or 400) that the load generators count as an
error. Every ndo row's ratio is against this responder on the same scenario and level.

Runs in its own process: ``python -m ndo.ops.bench._baseline NATS_URL SUBJECT`` where
``SUBJECT`` is ``<prefix>.rpc.Counter.*.*``; prints ``ready`` once subscribed and stops on
SIGTERM. Counters start at 0 (the harness sets the ``read`` objects' values with increments).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Final

import msgspec
import nats
import nats.errors
from nats.aio.msg import Msg

from ndo.ops._loop import run as run_on_loop
from ndo.ops.bench._protocol import ERROR_CODE_HEADER

__all__ = ["BASELINE_QUEUE_GROUP", "ERROR_TEXT_HEADER", "CounterResponder", "main"]

BASELINE_QUEUE_GROUP: Final = "ndo-bench-baseline"
"""Queue group of the baseline responder (mirrors the worker's queue subscription)."""

ERROR_TEXT_HEADER: Final = "Nats-Service-Error"
"""Reply header with an error reply's description (next to ``ERROR_CODE_HEADER``)."""

_PENDING_MSGS_LIMIT: Final = 1_000_000
_PENDING_BYTES_LIMIT: Final = 512 * 1024 * 1024


class _IncrementArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    by: int = 1


class CounterResponder:
    """In-memory counters answering ``get`` and ``increment`` requests by subject."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        """Value of each counter incremented so far, by object id (absent: 0)."""
        self._decode = msgspec.json.Decoder(_IncrementArgs).decode
        self._encode = msgspec.json.Encoder().encode

    def answer(self, subject: str, data: bytes) -> tuple[bytes, dict[str, str] | None]:
        """The reply body and headers (``None``, or an error's) to a request on ``subject``.

        The subject's last two tokens are the object id and the method.
        """
        _, object_id, method = subject.rsplit(".", 2)
        if method == "get":
            return self._encode(self.counters.get(object_id, 0)), None
        if method != "increment":
            return _error("404", f"unknown method {method!r} (get, increment)")
        try:
            by = self._decode(data or b"{}").by
        except msgspec.DecodeError as exc:
            return _error("400", f"bad arguments: {exc}")
        value = self.counters.get(object_id, 0) + by
        self.counters[object_id] = value
        return self._encode(value), None


def _error(code: str, text: str) -> tuple[bytes, dict[str, str]]:
    """An error reply: a JSON body and the headers the load generators count as an error."""
    body = msgspec.json.encode({"error": text, "code": int(code)})
    return body, {ERROR_CODE_HEADER: code, ERROR_TEXT_HEADER: text}


async def _baseline_main(url: str, subject: str) -> int:
    """Answer every request on ``subject`` from in-memory counters until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(url, connect_timeout=10, allow_reconnect=False)
    answer = CounterResponder().answer

    async def _handle_request(msg: Msg) -> None:
        body, headers = answer(msg.subject, msg.data)
        await nc.publish(msg.reply, body, headers=headers)

    await nc.subscribe(
        subject,
        queue=BASELINE_QUEUE_GROUP,
        cb=_handle_request,
        pending_msgs_limit=_PENDING_MSGS_LIMIT,
        pending_bytes_limit=_PENDING_BYTES_LIMIT,
    )
    await nc.flush()
    print("ready", flush=True)
    await stop.wait()
    with contextlib.suppress(nats.errors.Error, OSError):
        await nc.drain()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m ndo.ops.bench._baseline NATS_URL SUBJECT``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2:
        # The same event loop as `ndo serve` picks in this environment (NDO_LOOP, default auto),
        # so the baseline and the worker are compared on equal terms.
        return run_on_loop(_baseline_main(args[0], args[1]), os.environ.get("NDO_LOOP", "auto"))
    print("usage: python -m ndo.ops.bench._baseline NATS_URL SUBJECT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
