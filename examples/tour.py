"""A six-step tour of the bundled objects from Python, runnable against ``ndo serve``.

    ndo serve                       # in one terminal
    python -m ndo.examples.tour     # in another (or: --nats-url nats://host:4222)

Each step prints what it did: a durable counter, a rate limiter, a chat room whose posts arrive
as events, a typed error, a retried call that applies once thanks to its idempotency key, and
an account paying another (a call from one object to another).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable

import msgspec
import nats
from nats.aio.client import Client as NatsClient

from ndo import ActorClient, BadRequestError
from ndo.examples.objects import Account, ChatMessage, ChatRoom, Counter, RateLimiter

__all__ = ["main", "tour"]


async def tour(nc: NatsClient, *, say: Callable[[str], None] = print, prefix: str = "ndo") -> None:
    """Walk through the examples on ``nc``, printing one line per result with ``say``."""
    client = ActorClient(nc, prefix=prefix)
    run = uuid.uuid4().hex[:8]  # fresh object ids, so the tour can run again and again

    counter = client.get(Counter, f"tour-{run}")
    values = [await counter.call(Counter.increment, by=by) for by in (1, 2, 3)]
    say(
        f"1. Counter/tour-{run}: increment by 1, 2, 3 -> {values}; get -> "
        f"{await counter.call(Counter.get)} (each reply after a durable commit)"
    )

    limiter = client.get(RateLimiter, f"tour-{run}")
    decisions = [await limiter.call(RateLimiter.check) for _ in range(7)]
    allowed = ["yes" if d.allowed else f"no, retry in {d.retry_after:.2f}s" for d in decisions]
    say(f"2. RateLimiter/tour-{run}: seven checks -> {allowed}")

    room = client.get(ChatRoom, f"tour-{run}")
    events = room.events("message")
    first_event = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.05)  # let the iterator subscribe before the post
    posted = await room.call(ChatRoom.post, user="ann", text="hello from the tour")
    event = msgspec.json.decode((await asyncio.wait_for(first_event, 5)).data, type=ChatMessage)
    await events.aclose()
    say(
        f"3. ChatRoom/tour-{run}: post -> seq {posted.seq}; event on {event.user!r}: "
        f"{event.text!r}; history -> {len(await room.call(ChatRoom.history))} message(s)"
    )

    try:
        await room.call(ChatRoom.post, user="", text="an empty user name")
    except BadRequestError as error:
        say(
            f"4. A bad argument is a typed error, and nothing was written: {error.code} "
            f"{error.type}: {error.message}"
        )

    subject = f"{prefix}.rpc.Counter.tour-{run}.increment"
    headers = {"Idempotency-Key": f"tour-{run}-retry"}
    replies = [
        json.loads((await nc.request(subject, b'{"by": 10}', timeout=5, headers=headers)).data)
        for _ in range(2)
    ]
    say(
        f"5. The same increment sent twice with one Idempotency-Key -> replies {replies}; "
        f"counter -> {await counter.call(Counter.get)} (applied once)"
    )

    ann, bob = client.get(Account, f"ann-{run}"), client.get(Account, f"bob-{run}")
    await ann.deposit(amount=100)
    left = await ann.pay(to=bob.object_id, amount=30)
    say(
        f"6. Account/ann-{run} pays 30 to Account/bob-{run} (a call from one object to "
        f"another) -> ann {left}, bob {await bob.balance()}"
    )


async def _main(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=1)
    try:
        await tour(nc)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def main() -> None:
    """Run the tour against ``--nats-url`` (default nats://127.0.0.1:4222)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    asyncio.run(_main(parser.parse_args().nats_url))


if __name__ == "__main__":
    main()
