"""Thousands of hostile raw NATS requests against a real worker.

Garbage and deeply nested bodies, wrong types, odd headers, invalid subjects and bytes that are
not UTF-8, interleaved with well-formed calls on the same objects. Every request that names an
inbox gets an answer within a bound, no answer is a 5xx, nothing crashes in the runtime, the
objects hold exactly what the well-formed calls wrote, and the worker still serves afterwards.

The requests are built from a fixed seed (the run is the same every time) and sent in batches:
each batch's answers are awaited (bounded) before the next is sent, so the mailboxes never fill
and a 503 "overloaded" cannot hide among the answers.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from ndo.actors import ActorClient
from ndo.actors._methods import MAX_NESTING
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import Worker
from tests.objects import Store
from tests.worker_fixtures import WorkerFactory

SEED = 1313
"""Seed of the hostile requests (fixed: every run sends the same ones)."""
HOSTILE = 3000
"""Hostile requests sent through the client (raw-socket ones come on top)."""
GOOD_EVERY = 5
"""One well-formed call after every this many hostile ones."""
BATCH = 150
"""Requests in flight at once."""
BATCH_TIMEOUT = 30.0
"""Seconds a batch may take to be answered in full (a bound, not a speed check)."""
INBOX = "_INBOX.hostile"
"""Reply subjects of the test: ``<INBOX>.<index>``."""
COUNTER = "ndo.rpc.Counter.wire.increment"
STORE = "ndo.rpc.Store.wire"
MAX_PAYLOAD = 256 * 1024
"""The worker's request body limit in these tests (under the server's, so it can be passed)."""
MSGPACK = {"Content-Type": "application/msgpack"}

Expect = Literal["ok", "4xx", "no_responders", "any"]


@dataclass
class Probe:
    """One request and the answer it must get."""

    subject: str
    body: bytes
    headers: dict[str, str] | None = None
    expect: Expect = "4xx"
    error_type: str | None = None
    """The exact error ``type`` expected, when it is certain."""
    increments: bool = False
    """A well-formed Counter increment (counted for the final state)."""
    put: tuple[str, int] | None = None
    """A well-formed Store put of ``(key, value)``."""


def _nested_json(depth: int, rng: random.Random) -> bytes:
    kind = rng.choice(["list", "object", "mixed"])
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    opens = [rng.choice([b"[", b'{"k":']) for _ in range(depth)]
    closes = [b"]" if o == b"[" else b"}" for o in reversed(opens)]
    return b"".join(opens) + b"0" + b"".join(closes)


def _nested_msgpack(depth: int, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return b"\x91" * depth + b"\x90"  # arrays of one array
    return b"\x81\xa1a" * depth + b"\x01"  # maps of one map


def _hostile(rng: random.Random, index: int) -> Probe:
    """One hostile request, chosen by ``rng`` (never a call that may succeed and write)."""
    kind = rng.randrange(16)
    depth = rng.choice([MAX_NESTING + 1, 500, 2_000, 20_000])
    if kind == 0:  # garbage bodies
        body = rng.randbytes(rng.randrange(1, 300))
        return Probe(rng.choice([COUNTER, f"{STORE}.put"]), body, rng.choice([None, MSGPACK]))
    if kind == 1:  # deeply nested JSON for Any, dict and list parameters
        nested = _nested_json(depth, rng)
        subject, body, error_type = rng.choice(
            [
                (f"{STORE}.put", b'{"key": "deep", "value": ' + nested + b"}", "too_deeply_nested"),
                (
                    f"{STORE}.put_many",
                    b'{"entries": {"deep": ' + nested + b"}}",
                    "too_deeply_nested",
                ),
                (f"{STORE}.get_many", b'{"keys": [' + nested + b"]}", "invalid_arguments"),
            ]
        )
        return Probe(subject, body, error_type=error_type)
    if kind == 2:  # deeply nested MessagePack
        nested = _nested_msgpack(depth, rng)
        body = b"\x82\xa3key\xa4deep\xa5value" + nested
        return Probe(f"{STORE}.put", body, MSGPACK, error_type="too_deeply_nested")
    if kind == 3:  # wrong types and shapes
        body = rng.choice(
            [
                b'{"by": "x"}',
                b'{"by": 1.5}',
                b'{"by": null}',
                b'{"by": true}',
                b'{"by": [1]}',
                b"[1, 2]",
                b'"by"',
                b"1",
                b"null",
                b'{"nope": 1}',
                b'{"by": 1, "by2": 2}',
                b'{"by": 1e400}',
                b'{"by": -1e400}',
                b'{"by": NaN}',
                b'{"by": Infinity}',
            ]
        )
        return Probe(COUNTER, body, error_type=None)
    if kind == 4:  # MessagePack flag on a JSON body, and the reverse
        if rng.random() < 0.5:
            return Probe(COUNTER, b'{"by": 1}', MSGPACK)  # read as the integer 123, then junk
        return Probe(COUNTER, msgspec.msgpack.encode({"by": 1}), error_type="malformed_body")
    if kind == 5:  # odd Content-Type: the body is read as JSON, and this one is not
        content_type = rng.choice(["application/json", "", "x" * 2000, "application/msgpack; x"])
        return Probe(COUNTER, b"\x81\xa2by\x01", {"Content-Type": content_type})
    if kind == 6:  # over-long idempotency keys
        header = rng.choice(["Idempotency-Key", "Nats-Msg-Id"])
        return Probe(
            COUNTER,
            b"",
            {header: "k" * rng.randrange(257, 4_000)},
            error_type="invalid_idempotency_key",
        )
    if kind == 7:  # huge and many headers on an invalid call
        headers = {f"X-Junk-{i}": "v" * rng.randrange(0, 200) for i in range(rng.randrange(50))}
        headers["X-Huge"] = "h" * rng.randrange(1, 50_000)
        return Probe(f"{STORE}.put", b'{"key": ""}', headers)
    if kind == 8:  # wrong token counts under the rpc prefix: no worker subscribes to them
        subject = rng.choice(
            [
                "ndo.rpc.Counter.wire",
                "ndo.rpc.Counter",
                "ndo.rpc.Counter.wire.increment.x",
                "ndo.rpc.Counter.wire.increment.x.y",
                "ndo.rpc",
            ]
        )
        return Probe(subject, b"{}", expect="no_responders")
    if kind == 9:  # unknown class or method
        subject = rng.choice(
            [
                "ndo.rpc.Nope.wire.increment",
                "ndo.rpc.Counter.wire.nope",
                "ndo.rpc.Counter.wire.on_start",
                "ndo.rpc.Counter.wire.alarm",
                "ndo.rpc.Counter.wire._private",
                "ndo.rpc.counter.wire.increment",
            ]
        )
        return Probe(subject, b"{}")
    if kind == 10:  # invalid ids and names
        bad_id = rng.choice(["x" * rng.randrange(129, 3_000), "a~b", "é", "a+b", "a=b"])
        bad_name = rng.choice(["1bad", "bad-name", "x" * 65, "ünï"])
        subject = rng.choice(
            [
                f"ndo.rpc.Counter.{bad_id}.increment",
                f"ndo.rpc.Counter.wire.{bad_name}",
                f"ndo.rpc.{bad_name}.wire.increment",
            ]
        )
        return Probe(subject, b"{}")
    if kind == 11:  # empty bodies where arguments are required
        return Probe(rng.choice([f"{STORE}.put", f"{STORE}.get", f"{STORE}.put_many"]), b"")
    if kind == 12:  # invalid UTF-8 inside a JSON string
        return Probe(
            f"{STORE}.put", b'{"key": "\xff\xfe", "value": 1}', error_type="malformed_body"
        )
    if kind == 13:  # storage keys and values over their limits
        if rng.random() < 0.5:
            body = json.dumps({"key": "k" * rng.randrange(2_049, 5_000), "value": 1}).encode()
            return Probe(f"{STORE}.put", body, error_type="key_too_large")
        body = json.dumps({"key": "big", "value": "x" * 140_000}).encode()
        return Probe(f"{STORE}.put", body, error_type="value_too_large")
    if kind == 14:  # a body over the worker's max_payload is refused before decoding
        return Probe(f"{STORE}.put", b" " * (MAX_PAYLOAD + 1), error_type="payload_too_large")
    # A well-formed body cut short.
    whole = json.dumps({"key": f"k{index}", "value": [index]}).encode()
    cut = rng.randrange(1, len(whole) - 1)
    return Probe(f"{STORE}.put", whole[:cut], rng.choice([None, MSGPACK]))


def _probes() -> list[Probe]:
    """The hostile requests with well-formed ones interleaved, and an idempotency story."""
    rng = random.Random(SEED)
    probes: list[Probe] = []
    good = 0
    for index in range(HOSTILE):
        probes.append(_hostile(rng, index))
        if index % GOOD_EVERY == 0:
            good += 1
            if good % 2:
                probes.append(Probe(COUNTER, b'{"by": 1}', expect="ok", increments=True))
            else:
                body = json.dumps({"key": f"good-{good}", "value": good}).encode()
                probes.append(Probe(f"{STORE}.put", body, expect="ok", put=(f"good-{good}", good)))
    # A key used for one call is refused for another, and replays its reply for the same one.
    keyed = {"Idempotency-Key": "wire-key"}
    probes.insert(10, Probe(COUNTER, b'{"by": 1}', keyed, expect="ok", increments=True))
    probes.insert(500, Probe(COUNTER, b'{"by": 2}', keyed, error_type="idempotency_key_reused"))
    probes.insert(
        900, Probe(COUNTER, msgspec.msgpack.encode({"by": 1}), {**keyed, **MSGPACK}, "ok")
    )
    return probes


def _classify(msg: Msg) -> tuple[str, int, str]:
    """``(kind, code, error type)`` of an answer: ok, error, or the server's no-responders."""
    headers = msg.headers or {}
    if "Nats-Service-Error-Code" in headers:
        code = int(headers["Nats-Service-Error-Code"])
        if headers.get("Content-Type") == MSGPACK["Content-Type"]:
            error = msgspec.msgpack.decode(msg.data)["error"]
        else:
            error = json.loads(msg.data)["error"]
        return "error", code, error["type"]
    if headers.get("Status") == "503" and not msg.data:
        return "no_responders", 503, ""
    return "ok", 0, ""


class _Answers:
    """Answers arriving on ``<INBOX>.<index>``, by index."""

    def __init__(self) -> None:
        self.by_index: dict[int, Msg] = {}
        self.arrived = asyncio.Event()

    async def collect(self, msg: Msg) -> None:
        self.by_index[int(msg.subject.rsplit(".", 1)[1])] = msg
        self.arrived.set()

    async def wait_for(self, indexes: range) -> None:
        """Wait (bounded by ``BATCH_TIMEOUT``) until every index in ``indexes`` is answered."""
        try:
            async with asyncio.timeout(BATCH_TIMEOUT):
                while any(i not in self.by_index for i in indexes):
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            missing = [i for i in indexes if i not in self.by_index]
            raise AssertionError(f"no answer in {BATCH_TIMEOUT} s to {missing[:20]}") from None


async def _raw_publish(url: str, lines: list[bytes]) -> None:
    """Publish protocol lines over a raw TCP connection (bytes nats-py will not send), and wait
    for the server's PONG so that they were all processed."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        writer.writelines(lines)
        writer.write(b"PING\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            while (line := await reader.readline()) and line != b"PONG\r\n":
                assert not line.startswith(b"-ERR"), line
    finally:
        writer.close()
        await writer.wait_closed()


def _pub(subject: bytes, reply: bytes, body: bytes) -> bytes:
    return b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(body), body)


def _hpub(subject: bytes, reply: bytes, header_block: bytes, body: bytes = b"") -> bytes:
    total = len(header_block) + len(body)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject,
        reply,
        len(header_block),
        total,
        header_block,
        body,
    )


class TestHostileWire:
    """A worker under thousands of hostile requests answers each one and keeps its state."""

    async def test_every_request_answered_none_5xx_state_intact(
        self, start_worker: WorkerFactory, nc: NatsClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """Every hostile request with an inbox gets a 4xx (or the server's no-responders for
        subjects no worker serves), every well-formed one succeeds, and the objects end up
        exactly as the well-formed calls left them."""
        await start_worker(max_payload=MAX_PAYLOAD)
        probes = _probes()
        answers = _Answers()
        await nc.subscribe(f"{INBOX}.>", cb=answers.collect)
        with capture_logs() as logs:
            for start in range(0, len(probes), BATCH):
                batch = range(start, min(start + BATCH, len(probes)))
                for index in batch:
                    probe = probes[index]
                    await nc.publish(
                        probe.subject, probe.body, reply=f"{INBOX}.{index}", headers=probe.headers
                    )
                await nc.flush()
                await answers.wait_for(batch)
            raw_first = len(probes)
            await _raw_publish(nats_server.url, _raw_lines(raw_first))
            await answers.wait_for(range(raw_first, raw_first + len(_RAW_EXPECT)))
        crashes = [log for log in logs if "crashed" in str(log.get("event", ""))]
        assert not crashes, crashes

        increments, puts = 0, {}
        for index, probe in enumerate(probes):
            kind, code, error_type = _classify(answers.by_index[index])
            context = (index, probe.subject[:80], probe.body[:80], kind, code, error_type)
            if probe.expect == "ok":
                assert kind == "ok", context
            elif probe.expect == "no_responders":
                assert kind == "no_responders", context
            else:
                assert kind == "error" and 400 <= code < 500, context
                if probe.error_type is not None:
                    assert error_type == probe.error_type, context
            increments += probe.increments
            if probe.put is not None:
                puts[probe.put[0]] = probe.put[1]
        for offset, expected in enumerate(_RAW_EXPECT):
            kind, code, error_type = _classify(answers.by_index[raw_first + offset])
            assert (kind, code, error_type) == expected, offset

        # State: exactly what the well-formed calls did (the keyed retry replays, no increment;
        # one raw well-formed increment with a key that is not UTF-8 counts).
        client = ActorClient(nc, timeout=10)
        assert await client.get(Counter, "wire").call(Counter.get) == increments + 1
        listed = await client.get(Store, "wire").call(Store.list)
        assert dict((key, value) for key, value in listed) == puts
        # And it still serves.
        assert await client.get(Counter, "after").call(Counter.increment) == 1


class TestValuesStorageCannotHold:
    """Arguments that decode but cannot be stored are the caller's error (400), not a 500."""

    async def test_integer_over_64_bits_stored(self, worker: Worker, nc: NatsClient) -> None:
        """Storing an integer MessagePack cannot hold is a 400, not a handler error."""
        huge = b'{"key": "huge", "value": 123456789012345678901234567890}'
        answer = await nc.request(f"{STORE}.put", huge, timeout=10)
        assert _classify(answer)[:2] == ("error", 400)


_RAW_EXPECT: list[tuple[str, int, str]] = [
    ("error", 400, "invalid_subject"),  # an id that is not UTF-8
    ("error", 400, "invalid_subject"),  # a class name that is not UTF-8
    ("error", 400, "invalid_subject"),  # a method name that is not UTF-8
    ("ok", 0, ""),  # a status line that is not UTF-8, on a read
    ("ok", 0, ""),  # a status description that is not UTF-8, on a read
    ("ok", 0, ""),  # a well-formed increment whose Idempotency-Key is not UTF-8
    ("error", 400, "invalid_arguments"),  # a body that is not UTF-8 (a str where an int goes)
]
"""What each raw-socket request of ``_raw_lines`` must get, in order."""


def _raw_lines(first: int) -> list[bytes]:
    """Requests with bytes that are not UTF-8 where nats-py decodes strictly (subjects, the
    header status line), answered on ``<INBOX>.<first + i>``; plus one with a reply subject that
    is not UTF-8 (no answer can be asked for; the worker must only survive it)."""

    def reply(offset: int) -> bytes:
        return f"{INBOX}.{first + offset}".encode()

    get = b"ndo.rpc.Counter.wire.get"
    lines = [
        _pub(b"ndo.rpc.Counter.\xff\xfe.increment", reply(0), b"{}"),
        _pub(b"ndo.rpc.C\xffunter.wire.increment", reply(1), b"{}"),
        _pub(b"ndo.rpc.Counter.wire.incr\xffment", reply(2), b"{}"),
        _hpub(get, reply(3), b"NATS/1.0 \xff\xfe\xfd\r\n\r\n"),
        _hpub(get, reply(4), b"NATS/1.0 503 \xff\xfe\r\n\r\n"),
        _hpub(COUNTER.encode(), reply(5), b"NATS/1.0\r\nIdempotency-Key: \xff\xfe\r\n\r\n"),
        _pub(COUNTER.encode(), reply(6), b'{"by": "\xff\xfe"}'),
        _pub(get, b"_INBOX.\xff\xfe", b"{}"),
    ]
    assert len(lines) == len(_RAW_EXPECT) + 1
    return lines
