"""ndo's test kit: unit-test your objects in-process, on the worker's own rules, without NATS.

``ObjectHarness`` runs your objects' turns through the same turn engine as a worker (same
argument checks, same errors, same write-set and output-gate rules) on in-memory or SQLite
storage, with a ``FakeClock`` for time and alarms::

    import pytest
    from ndo import ConflictError
    from ndo.testing import ObjectHarness

    @pytest.mark.asyncio
    async def test_counter() -> None:
        async with ObjectHarness([Counter]) as harness:
            counter = harness.get(Counter, "c1")
            assert await counter.increment(by=2) == 2
            assert await harness.state(Counter, "c1") == {"value": 2}
            await harness.seed(Counter, "c2", {"value": 41})
            assert await harness.get(Counter, "c2").increment() == 42
            runs = await harness.advance(3600)  # fires the alarms due within the hour

For tests against a real worker over NATS, the pytest plugin installed with ndo gives the
``ndo_worker`` fixture (``pip install 'ndo[testing]'``). Guide: ``docs/testing.md``.
"""

from ndo.ops._kit import MAX_ALARM_RUNS, ObjectHarness, StorageSpec
from ndo.ops._kit_types import AlarmRun, EmittedEvent, FakeClock

__all__ = [
    "MAX_ALARM_RUNS",
    "AlarmRun",
    "EmittedEvent",
    "FakeClock",
    "ObjectHarness",
    "StorageSpec",
]
