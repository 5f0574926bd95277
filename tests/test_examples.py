"""The runnable examples keep working: ``ndo.examples.tour`` against a real worker."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from ndo.examples.tour import tour
from ndo.service import Worker


async def test_tour_runs_every_step(worker: Worker, nc: NatsClient) -> None:
    """The tour prints five steps with the results the bundled objects promise."""
    lines: list[str] = []
    await tour(nc, say=lines.append)
    assert [line.split(".")[0] for line in lines] == ["1", "2", "3", "4", "5"]
    assert "-> [1, 3, 6]; get -> 6" in lines[0]
    assert lines[1].count("yes") == 5 and lines[1].count("no, retry in") == 2
    assert "event on 'ann': 'hello from the tour'; history -> 1 message(s)" in lines[2]
    assert "400" in lines[3]
    assert "replies [16, 16]; counter -> 16 (applied once)" in lines[4]
