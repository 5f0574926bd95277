"""Testing durable objects with ndo's test kit: a worked example on the bundled objects.

Copy this file into an empty directory and run ``pytest`` there (after
``pip install 'ndo[testing]'``). Two kinds of tests:

* unit tests through ``ndo.testing.ObjectHarness``: the objects run in this process on the
  worker's own turn engine (same checks, same errors, same commit rules), with a fake clock
  and direct access to their storage, events and alarms. No NATS, milliseconds per test.
* integration tests through the ``ndo_worker`` fixture of ndo's pytest plugin: a real
  nats-server and an ndo worker start for the test, and the test calls them as any client
  would, over NATS.

The guide is ``docs/testing.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ndo import Actor, ActorClient, BadRequestError, ConflictError
from ndo.examples import Account, ChatRoom, Counter, Session
from ndo.testing import ObjectHarness

__all__: list[str] = []  # a test module: pytest finds the tests, nothing here to import

# No pytest configuration is needed: the async tests are marked for pytest-asyncio here.
pytestmark = pytest.mark.asyncio


@pytest.fixture
def ndo_classes() -> list[type[Actor]]:
    """The classes the ``ndo_harness`` and ``ndo_worker`` fixtures serve. (Without this
    fixture they serve the modules named by the ini option ``ndo_modules``.)"""
    return [Account, ChatRoom, Counter, Session]


# Unit tests: ObjectHarness


async def test_counter_counts_and_stores() -> None:
    """A stub from the harness is called like one from ActorClient; storage can be read."""
    async with ObjectHarness([Counter]) as harness:
        counter = harness.get(Counter, "c1")
        assert await counter.increment(by=2) == 2
        assert await counter.increment() == 3
        assert await harness.state(Counter, "c1") == {"value": 3}


async def test_seeded_state(ndo_harness: ObjectHarness) -> None:
    """``seed`` writes state as if earlier turns had (the ``ndo_harness`` fixture is a harness
    of ``ndo_classes``)."""
    await ndo_harness.seed(Account, "alice", {"balance": 100})
    assert await ndo_harness.get(Account, "alice").pay(to="bob", amount=30) == 70
    # Account.pay called Account "bob" (a call between objects, inside the harness):
    assert await ndo_harness.state(Account, "bob") == {"balance": 30}


async def test_errors_reach_the_caller(ndo_harness: ObjectHarness) -> None:
    """A refused call raises what a client would get; a failed turn writes nothing."""
    with pytest.raises(ConflictError) as refused:
        await ndo_harness.get(Account, "carol").pay(to="bob", amount=5)
    assert refused.value.type == "insufficient_funds"
    with pytest.raises(BadRequestError) as invalid:
        await ndo_harness.get(ChatRoom, "lobby").post(user=" spaces ", text="hi")
    assert invalid.value.type == "invalid_user"
    assert await ndo_harness.state(ChatRoom, "lobby") == {}


async def test_events_of_committed_turns(ndo_harness: ObjectHarness) -> None:
    """What a turn emits is recorded once the turn commits, decoded from JSON."""
    room = ndo_harness.get(ChatRoom, "lobby")
    await room.post(user="ann", text="hello")
    await room.post(user="bob", text="hi ann")
    posted = ndo_harness.events(ChatRoom, "lobby", topic="message")
    assert [(e.data["user"], e.data["text"]) for e in posted] == [
        ("ann", "hello"),
        ("bob", "hi ann"),
    ]


async def test_session_expires_on_the_fake_clock(ndo_harness: ObjectHarness) -> None:
    """Alarms fire when the test moves the clock: ``advance`` delivers those that fall due."""
    session = ndo_harness.get(Session, "s1")
    expires = await session.save(data={"user": "ann"})
    assert expires == ndo_harness.clock() + Session.IDLE  # Session uses self.now()

    await ndo_harness.advance(Session.IDLE - 1)  # not yet: nothing fires
    assert await session.load() == {"user": "ann"}  # ... and this call moves the expiry back

    runs = await ndo_harness.advance(Session.IDLE)
    assert [run.ok for run in runs] == [True]
    assert await session.load() == {}
    assert [e.topic for e in ndo_harness.events(Session, "s1")] == ["expired"]


async def test_fire_an_alarm_now(ndo_harness: ObjectHarness) -> None:
    """``fire_alarm`` runs an object's alarm at once, whatever time it is set for."""
    await ndo_harness.get(Session, "s2").save(data={"cart": "3 items"})
    await ndo_harness.fire_alarm(Session, "s2")
    assert await ndo_harness.state(Session, "s2") == {}
    assert await ndo_harness.alarm(Session, "s2") is None


async def test_state_survives_in_a_sqlite_file(tmp_path: Path) -> None:
    """With ``storage=<file>``, a second harness on the same file sees what the first wrote."""
    async with ObjectHarness([Counter], storage=tmp_path / "objects.sqlite3") as harness:
        await harness.get(Counter, "c1").increment(by=5)
    async with ObjectHarness([Counter], storage=tmp_path / "objects.sqlite3") as harness:
        assert await harness.get(Counter, "c1").get() == 5


# Integration tests: a real worker over NATS


async def test_counter_over_nats(ndo_worker: ActorClient) -> None:
    """``ndo_worker`` is an ActorClient of a worker serving ``ndo_classes``."""
    counter = ndo_worker.get(Counter, "c1")
    assert await counter.increment(by=2) == 2
    assert await counter.get() == 2


async def test_same_errors_over_nats(ndo_worker: ActorClient) -> None:
    """The errors are the same as in the harness: same class, same ``type``."""
    with pytest.raises(ConflictError) as refused:
        await ndo_worker.get(Account, "carol").pay(to="bob", amount=5)
    assert refused.value.type == "insufficient_funds"
