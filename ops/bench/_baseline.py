"""The baseline responder: raw nats-py that decodes the JSON body and encodes a reply, nothing else.

The practical limit of one Python worker on this machine, which every ndo figure is relative to.
Runs in its own process: ``python -m ndo.ops.bench._baseline NATS_URL SUBJECT``; prints ``ready``
once subscribed and stops on SIGTERM.
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

__all__ = ["BASELINE_QUEUE_GROUP", "main"]

BASELINE_QUEUE_GROUP: Final = "ndo-bench-baseline"
"""Queue group of the baseline responder (mirrors the worker's queue subscription)."""

_PENDING_MSGS_LIMIT: Final = 1_000_000
_PENDING_BYTES_LIMIT: Final = 512 * 1024 * 1024


class _BaselineArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    by: int = 1


async def _baseline_main(url: str, subject: str) -> int:
    """Answer every request on ``subject`` with its decoded ``by`` re-encoded; nothing else."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(url, connect_timeout=10, allow_reconnect=False)
    decoder = msgspec.json.Decoder(_BaselineArgs)
    encoder = msgspec.json.Encoder()

    async def _handle_request(msg: Msg) -> None:
        args = decoder.decode(msg.data or b"{}")
        await nc.publish(msg.reply, encoder.encode(args.by))

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
