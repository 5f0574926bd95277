"""Calls from one object to another: the rules both ends of such a call follow.

A handler calls another object with ``await self.call(Room, "r1").join(user="a")``. The call is
an ordinary request on the target's subject, sent by the host (the worker, or the test kit)
through its ``CallSender``; what makes it a call *between objects* is three headers, built and
checked here so every host agrees on them:

* ``Ndo-Call-Chain``: the objects waiting on this call, outermost first (``Class/id,...``). An
  object runs one turn at a time, so a call back into any of them would wait for itself until
  the deadline: the target refuses it at once with 409 ``call_cycle`` (and a chain deeper than
  ``MAX_CALL_DEPTH`` with 409 ``call_too_deep``). A call to the object itself never leaves.
* ``Ndo-Timeout-Ms``: the milliseconds the caller will still wait. The target runs the handler
  under the shorter of that and its own handler deadline, and does not run a request whose
  caller has stopped waiting (504). Deadlines so propagate down a chain of calls.
* ``Idempotency-Key``: derived from the calling turn's own identity (its request's
  Idempotency-Key, or its alarm's due time) and the call's position in the turn. If the calling
  worker dies after the target applied the call but before the caller's turn committed, the
  retried turn makes the same call with the same key and the target answers it from memory
  instead of applying it twice. Exactly-once therefore holds for handlers that make the same
  calls in the same order when re-run (deterministic in their inputs and state), and for as long
  as the target remembers keys (the idempotency window, 24 h by default).

The host also holds each call until the calling object's earlier turns are durable (the output
gate, as for replies): a target never acts on state of the caller that could still be lost.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Mapping
from typing import Final

from ndo.actors._context import ActorContext
from ndo.actors._errors import BadRequestError, ConflictError, DeadlineExceededError
from ndo.subjects import Header

__all__ = [
    "MAX_CALL_DEPTH",
    "check_chain",
    "incoming_call",
    "outgoing_headers",
]

MAX_CALL_DEPTH: Final = 16
"""Most objects one chain of calls may hold waiting (the caller of a deeper call gets 409)."""
_CHAIN: Final = Header.CALL_CHAIN.value
_TIMEOUT: Final = Header.TIMEOUT_MS.value
_KEY: Final = Header.IDEMPOTENCY_KEY.value
_MAX_CHAIN_CHARS: Final = MAX_CALL_DEPTH * 256
"""Longest ``Ndo-Call-Chain`` header read (a class name and an id per entry)."""


def outgoing_headers(context: ActorContext, target: str) -> dict[str, str]:
    """The headers of the next call the turn running in ``context`` makes to ``target``
    (``Class/id``), counting the call.

    Raises:
        ConflictError: ``call_cycle`` when ``target`` is the calling object or already waits in
            the chain; ``call_too_deep`` when the chain is full.
        DeadlineExceededError: the turn has no time left for the call.
    """
    turn = context.turn
    upstream = turn.chain if turn is not None else ""
    chain = f"{upstream},{context.id}" if upstream else str(context.id)
    check_chain(chain, target)
    remaining = context.deadline - time.monotonic() if context.deadline else 0.0
    if context.deadline and remaining <= 0.0:
        raise DeadlineExceededError(
            f"{context.id} has no time left to call {target} before its own deadline",
            type="deadline_exceeded",
        )
    identity = turn.identity if turn is not None else None
    context.calls += 1
    seed = f"{context.id}|{identity or uuid.uuid4().hex}|{context.calls}"
    headers = {_CHAIN: chain, _KEY: hashlib.blake2b(seed.encode(), digest_size=16).hexdigest()}
    if remaining:
        headers[_TIMEOUT] = str(max(1, int(remaining * 1000)))
    return headers


def check_chain(chain: str, target: str) -> None:
    """Refuse a call to ``target`` (``Class/id``) whose chain of waiting callers is ``chain``.

    Raises:
        ConflictError: ``call_cycle`` or ``call_too_deep``.
    """
    waiting = chain.split(",")
    if target in waiting:
        path = " -> ".join([*waiting, target])
        raise ConflictError(
            f"call cycle {path}: {target} is already handling a call that waits for this one, "
            "and an object runs one call at a time, so it would wait for itself. Restructure "
            "the calls (return data to the caller instead of calling back)",
            type="call_cycle",
        )
    if len(waiting) >= MAX_CALL_DEPTH:
        raise ConflictError(
            f"a chain of {len(waiting)} objects calling one another reached {target}; at most "
            f"{MAX_CALL_DEPTH} may wait on each other",
            type="call_too_deep",
        )


def incoming_call(headers: Mapping[str, str] | None, target: str) -> tuple[str, float]:
    """Read the call headers of a request for ``target`` (``Class/id``): return its chain of
    waiting callers ("" when none) and the ``time.monotonic()`` by which its caller stops
    waiting (0.0 when not said).

    Raises:
        BadRequestError: ``invalid_call_header``: a malformed chain or timeout.
        ConflictError: ``call_cycle`` or ``call_too_deep`` (see ``check_chain``).
        DeadlineExceededError: the caller already stopped waiting.
    """
    if not headers:
        return "", 0.0
    chain = headers.get(_CHAIN, "")
    if chain:
        if len(chain) > _MAX_CHAIN_CHARS:
            raise BadRequestError(
                f"{_CHAIN} is over {_MAX_CHAIN_CHARS} characters", type="invalid_call_header"
            )
        check_chain(chain, target)
    timeout = headers.get(_TIMEOUT)
    if timeout is None:
        return chain, 0.0
    try:
        milliseconds = float(timeout)
    except ValueError:
        milliseconds = math.nan
    if not math.isfinite(milliseconds):
        raise BadRequestError(
            f"{_TIMEOUT} must be a number of milliseconds, got {timeout[:32]!r}",
            type="invalid_call_header",
        )
    if milliseconds <= 0:
        raise DeadlineExceededError(
            f"the caller of {target} had no time left ({_TIMEOUT}: {timeout[:32]})",
            type="deadline_exceeded",
        )
    return chain, time.monotonic() + milliseconds / 1000.0
