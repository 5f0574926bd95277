"""Calls from one object to another (``self.call(Cls, id).method(...)``), and the typed stub.

In-process workers on the test's nats-server: calls leave as ordinary NATS requests, so every
rule is checked where users meet it. The crash test runs ``ndo serve`` as a child process and
kills it between an object's outgoing call and its own commit.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from ndo import (
    ActorClient,
    ActorError,
    ConflictError,
    DeadlineExceededError,
    RetryPolicy,
    id_from_name,
)
from ndo.actors.runtime import MAX_CALL_DEPTH, check_chain, incoming_call
from ndo.examples import Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.subjects import Header
from tests.helpers import LockHolder, ServeProcess
from tests.objects import Probe, Relay, Slow
from tests.worker_fixtures import WorkerFactory


class TestTypedStub:
    """``client.get(Counter, id).increment(by=2)``: the object's methods on its stub."""

    async def test_methods_of_the_class_are_methods_of_the_stub(
        self, worker: object, client: ActorClient
    ) -> None:
        """Positional and keyword arguments, typed results; ``call`` still works."""
        stub = client.get(Counter, "typed")
        assert await stub.increment(by=2) == 2
        assert await stub.increment(3) == 5
        assert await stub.call(Counter.increment, by=1) == 6
        assert await stub.call("get") == 6

    async def test_stub_of_a_class_name_calls_by_name(
        self, worker: object, client: ActorClient
    ) -> None:
        """A stub made from a class name sends any method name with keyword arguments."""
        stub = client.get("Counter", "by-name")
        assert await stub.increment(by=4) == 4

    async def test_unknown_method_is_an_attribute_error(self, client: ActorClient) -> None:
        """A misspelled method fails at once, naming the class."""
        with pytest.raises(AttributeError, match="Counter has no @method 'incremnt'"):
            client.get(Counter, "x").incremnt  # noqa: B018

    def test_id_from_name_on_the_client(self, client: ActorClient) -> None:
        """``client.id_from_name`` is ``ndo.id_from_name``."""
        assert client.id_from_name("alice@example.com") == id_from_name("alice@example.com")


class TestCallsBetweenObjects:
    """A handler calls another object; cycles fail fast; deadlines propagate."""

    async def test_a_handler_calls_another_object(
        self, worker: object, client: ActorClient
    ) -> None:
        """The call applies once and the caller's own write commits with its turn."""
        relay = client.get(Relay, "r1")
        assert await relay.forward(to="target", by=5) == 5
        assert await relay.forward(to="target") == 6
        assert await relay.sent() == 2
        assert await client.get(Counter, "target").get() == 6

    async def test_a_chain_of_calls_is_answered(self, worker: object, client: ActorClient) -> None:
        """a -> b -> c, each waiting for the next, all answer."""
        assert await client.get(Relay, "a").chain(path=["b", "c"]) == ["a", "b", "c"]

    async def test_calling_itself_is_refused_at_once(
        self, worker: object, client: ActorClient
    ) -> None:
        """An object calling itself gets 409 call_cycle, not a deadlock until the deadline."""
        with pytest.raises(ConflictError, match="called itself") as caught:
            await client.get(Relay, "narcissus").call_self()
        assert caught.value.type == "call_cycle"

    async def test_a_cycle_is_refused_at_once(self, worker: object, client: ActorClient) -> None:
        """a -> b -> a: the call back into a is refused with 409, naming the cycle."""
        started = time.monotonic()
        with pytest.raises(ConflictError, match="Relay/a -> Relay/b -> Relay/a") as caught:
            await client.get(Relay, "a").chain(path=["b", "a"])
        assert caught.value.type == "call_cycle"
        assert time.monotonic() - started < 10, "the cycle waited for a deadline"
        # Both objects serve again at once.
        assert await client.get(Relay, "a").chain(path=["b"]) == ["a", "b"]

    async def test_a_chain_too_deep_is_refused(self, worker: object, client: ActorClient) -> None:
        """Sixteen objects waiting on each other is the limit: 409 call_too_deep."""
        path = [f"hop{i}" for i in range(16)]
        with pytest.raises(ConflictError) as caught:
            await client.get(Relay, "start").chain(path=path)
        assert caught.value.type == "call_too_deep"

    async def test_the_deadline_propagates_to_the_called_object(
        self, start_worker: WorkerFactory, client: ActorClient
    ) -> None:
        """The caller has 1.5 s; it spends 0.9 s, then asks Slow to sleep 1.0 s. Slow's own
        deadline would allow that, but the caller's remaining ~0.6 s cuts it: Slow's turn fails
        and its write is discarded."""
        await start_worker(handler_timeout=1.5)
        with pytest.raises(DeadlineExceededError):
            await client.get(Relay, "hurried").wait_then_sleep(to="sleeper", wait=0.9, seconds=1.0)
        await asyncio.sleep(0.3)  # let Slow's cancelled turn finish
        assert await client.get("Slow", "sleeper").call("read") == 0
        # With time left, the same call completes.
        assert (
            await client.get(Relay, "hurried").wait_then_sleep(to="sleeper", wait=0.0, seconds=0.1)
            == "done"
        )

    async def test_a_call_waits_for_the_callers_earlier_writes(
        self, start_worker: WorkerFactory, client: ActorClient, data_dir: Path
    ) -> None:
        """Output gate: while an earlier write of the caller is not durable (its commit stalled
        behind another process's write lock), the caller's call does not leave."""
        await start_worker()
        relay = client.get(Relay, "gated")
        await relay.note(value=0)  # the object is active and its storage open
        Probe.touched.clear()
        holder = LockHolder.write_lock(data_dir)
        try:
            noted = asyncio.create_task(relay.note(value=1))
            touched = asyncio.create_task(relay.touch(to="p1"))
            await asyncio.sleep(0.5)
            assert Probe.touched == [], "the call left before the caller's write was durable"
        finally:
            holder.release()
        assert await noted is None
        assert await touched == 1
        assert Probe.touched == ["p1"]

    async def test_calls_are_counted(self, worker: object, client: ActorClient) -> None:
        """``ndo_object_calls_total`` counts calls by both classes and outcome."""
        await client.get(Relay, "counted").forward(to="c")
        with pytest.raises(ConflictError):  # counted -> other -> counted: both calls fail
            await client.get(Relay, "counted").chain(path=["other", "counted"])
        metrics = worker.metrics  # type: ignore[attr-defined]
        sample = metrics.registry.get_sample_value
        labels = {"class_name": "Relay", "target_class": "Counter", "outcome": "ok"}
        assert sample("ndo_object_calls_total", labels) == 1
        labels = {"class_name": "Relay", "target_class": "Relay", "outcome": "call_cycle"}
        assert sample("ndo_object_calls_total", labels) == 2


class TestCallHeadersFromOutside:
    """The call headers are part of the wire protocol: any client may send them."""

    async def test_a_forged_chain_only_refuses_that_request(
        self, worker: object, nc: NatsClient
    ) -> None:
        """A request claiming its target already waits upstream gets 409; others are fine."""
        subject = "ndo.rpc.Counter.forged.increment"
        reply = await nc.request(
            subject, b"", timeout=5, headers={Header.CALL_CHAIN.value: "Counter/forged"}
        )
        assert reply.headers is not None
        assert reply.headers[Header.ERROR_CODE.value] == "409"
        reply = await nc.request(subject, b"", timeout=5)
        assert reply.data == b"1"

    @pytest.mark.parametrize("value", ["soon", "nan", "inf"])
    async def test_a_malformed_timeout_is_a_400(
        self, worker: object, nc: NatsClient, value: str
    ) -> None:
        """``Ndo-Timeout-Ms`` must be a finite number of milliseconds."""
        reply = await nc.request(
            "ndo.rpc.Counter.t.increment", b"", timeout=5, headers={Header.TIMEOUT_MS.value: value}
        )
        assert reply.headers is not None
        assert reply.headers[Header.ERROR_CODE.value] == "400"

    async def test_a_request_whose_caller_gave_up_is_not_run(
        self, worker: object, nc: NatsClient, client: ActorClient
    ) -> None:
        """Queued behind a slow turn past its caller's timeout, a request is skipped (504)."""
        slow = client.get(Slow, "queue")
        blocker = asyncio.create_task(slow.sleep(seconds=0.6))
        await asyncio.sleep(0.1)
        reply = await nc.request(
            "ndo.rpc.Slow.queue.bump",
            b"",
            timeout=5,
            headers={Header.TIMEOUT_MS.value: "200"},
        )
        await blocker
        assert reply.headers is not None
        assert reply.headers[Header.ERROR_CODE.value] == "504"
        assert await slow.read() == 0, "the skipped bump was applied"


class TestCrashBetweenCallAndCommit:
    """kill -9 after the called object applied the call, before the caller's turn committed."""

    @pytest.mark.slow
    async def test_the_retried_turn_does_not_apply_the_call_twice(
        self, nats_server: EmbeddedNatsServer, nc: NatsClient, tmp_path: Path
    ) -> None:
        """The client retries with its key; the re-run turn derives the same key for its call,
        so the counter is incremented once and the relay's own write lands once."""
        marker = tmp_path / "called"
        args = [
            "ndo.examples.objects",
            "tests.objects",
            "--nats-url",
            nats_server.url,
            "--data-dir",
            str(tmp_path),
        ]
        with ServeProcess(*args) as first:
            await first.async_wait_serving()
            patient = ActorClient(
                nc, timeout=2.0, retry=RetryPolicy(attempts=12, initial_backoff=0.1)
            )
            call = asyncio.create_task(
                patient.get(Relay, "crashy").forward_then_pause(to="once", marker=str(marker))
            )
            for _ in range(200):
                if marker.exists() or call.done():
                    break
                await asyncio.sleep(0.05)
            assert marker.read_text() == "1", "the relay never made its call"
            first.send_signal(signal.SIGKILL)
            await first.async_wait(10)
            with ServeProcess(*args) as second:
                await second.async_wait_serving()
                assert await call == 1
                assert await patient.get(Counter, "once").get() == 1, "the call applied twice"
                assert await patient.get(Relay, "crashy").sent() == 1


class TestCallHeadersFuzz:
    """Any text in the call headers is read or refused with a 4xx/504, never a crash."""

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(chain=st.text(max_size=300), timeout=st.one_of(st.none(), st.text(max_size=40)))
    def test_incoming_call_never_crashes(self, chain: str, timeout: str | None) -> None:
        """A chain and a timeout are accepted, or an ``ActorError`` of code 400, 409 or 504."""
        headers = {Header.CALL_CHAIN.value: chain}
        if timeout is not None:
            headers[Header.TIMEOUT_MS.value] = timeout
        refusal: ActorError | None = None
        try:
            found_chain, deadline = incoming_call(headers, "Counter/x")
        except ActorError as error:
            refusal = error
        if refusal is not None:
            assert refusal.code in (400, 409, 504), refusal
        else:
            assert found_chain == chain
            assert deadline >= 0.0

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(path=st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True), max_size=20))
    def test_a_chain_is_refused_exactly_when_it_holds_the_target_or_is_full(
        self, path: list[str]
    ) -> None:
        """``check_chain`` refuses a cycle (the target waits in the chain) and a full chain."""
        chain = ",".join(f"Relay/{i}" for i in path)
        target = "Relay/t"
        refusal = ""
        try:
            check_chain(chain, target)
        except ConflictError as error:
            refusal = error.type
        if "t" in path:
            assert refusal == "call_cycle"
        elif len(path) >= MAX_CALL_DEPTH:
            assert refusal == "call_too_deep"
        else:
            assert refusal == ""
