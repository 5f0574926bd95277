"""The runnable examples keep working (``ndo.examples.tour`` against a real worker), and the
bundled objects bound their own inputs."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import ActorClient, BadRequestError, ConflictError
from ndo.examples import Account, ChatRoom, DrawingBoard
from ndo.examples.tour import tour
from ndo.service import Worker


async def test_tour_runs_every_step(worker: Worker, nc: NatsClient) -> None:
    """The tour prints six steps with the results the bundled objects promise."""
    lines: list[str] = []
    await tour(nc, say=lines.append)
    assert [line.split(".")[0] for line in lines] == ["1", "2", "3", "4", "5", "6"]
    assert "-> [1, 3, 6]; get -> 6" in lines[0]
    assert lines[1].count("yes") == 5 and lines[1].count("no, retry in") == 2
    assert "event on 'ann': 'hello from the tour'; history -> 1 message(s)" in lines[2]
    assert "400" in lines[3]
    assert "replies [16, 16]; counter -> 16 (applied once)" in lines[4]
    assert lines[5].endswith("-> ann 70, bob 30")


class TestExamplesBoundTheirInputs:
    """The chat room and the drawing board refuse oversized or malformed input with a 400 that
    says what is allowed, and store nothing of it."""

    @pytest.mark.parametrize(
        ("user", "text", "error_type"),
        [
            ("", "hi", "invalid_user"),
            ("u" * 33, "hi", "invalid_user"),
            ("bad\nname", "hi", "invalid_user"),
            (" ann", "hi", "invalid_user"),
            ("ann<script>", "hi", "invalid_user"),
            ("ann", "", "invalid_text"),
            ("ann", "   ", "invalid_text"),
            ("ann", "x" * 4001, "invalid_text"),
        ],
    )
    async def test_chat_refuses(
        self, worker: Worker, client: ActorClient, user: str, text: str, error_type: str
    ) -> None:
        """Bad user names and message lengths are refused; the room stays empty."""
        room = client.get(ChatRoom, "bounds")
        with pytest.raises(BadRequestError) as refused:
            await room.call(ChatRoom.post, user, text)
        assert refused.value.type == error_type
        assert "1-" in refused.value.message
        assert await room.call(ChatRoom.history) == []

    async def test_chat_accepts_the_limits(self, worker: Worker, client: ActorClient) -> None:
        """Names of letters (any script), digits, spaces, '.', '_', '-' up to 32 characters and
        messages up to 4000 characters go in."""
        room = client.get(ChatRoom, "limits")
        for user in ("u" * 32, "José María", "ann.b-c_1", "名前"):
            await room.call(ChatRoom.post, user, "x" * 4000)
        assert len(await room.call(ChatRoom.history)) == 4

    @pytest.mark.parametrize(
        "body",
        [
            {"points": []},
            {"points": [[1, 1]] * 2001},
            {"points": [[10_001, 0]]},
            {"points": [[0, -10_001]]},
            {"points": [[0, 0]], "color": "red"},
            {"points": [[0, 0]], "width": 0},
            {"points": [[0, 0]], "width": 101},
            {"points": [[0, 0]], "user": "x" * 33},
            {"points": [[0, 0]], "user": "a\u0000b"},
        ],
        ids=[
            "no-points", "too-many-points", "x-too-large", "y-too-small", "color", "zero-width",
            "wide", "long-user", "control-user",
        ],
    )  # fmt: skip
    async def test_stroke_refuses(
        self, worker: Worker, client: ActorClient, body: dict[str, Any]
    ) -> None:
        """Each bad stroke is a 400 and the board stays empty."""
        board = client.get(DrawingBoard, "bounds")
        with pytest.raises(BadRequestError):
            await board.call("stroke", **body)
        assert await board.call(DrawingBoard.strokes) == []

    async def test_non_finite_coordinates(self, worker: Worker, nc: NatsClient) -> None:
        """Infinite and NaN coordinates (JSON 1e999, MessagePack floats) are refused."""
        subject = "ndo.rpc.DrawingBoard.finite.stroke"
        reply = await nc.request(subject, b'{"points": [[1e999, 0]]}', timeout=5)
        assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "400"
        body = msgspec.msgpack.encode({"points": [[float("nan"), 0.0]]})
        headers = {"Content-Type": "application/msgpack"}
        reply = await nc.request(subject, body, timeout=5, headers=headers)
        assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "400"

    async def test_stroke_accepts_the_limits(self, worker: Worker, client: ActorClient) -> None:
        """2000 points at +-10000, width 100 and an anonymous or named user go in."""
        board = client.get(DrawingBoard, "limits")
        points = [(10_000.0, -10_000.0)] * 2000
        assert await board.call(DrawingBoard.stroke, points, "#00ff00", 100, "") == 1
        assert await board.call(DrawingBoard.stroke, [(0, 0)], user="ann") == 2


class TestAccount:
    """The account example: one object paying another through a call between objects."""

    async def test_pay_moves_money_once(self, worker: Worker, client: ActorClient) -> None:
        """A payment lowers one balance and raises the other by the same amount."""
        ann, bob = client.get(Account, "ann"), client.get(Account, "bob")
        await ann.deposit(amount=100)
        assert await ann.pay(to="bob", amount=30) == 70
        assert await bob.balance() == 30

    async def test_refusals_change_nothing(self, worker: Worker, client: ActorClient) -> None:
        """Paying more than the balance, paying itself, or a non-positive amount is refused."""
        ann = client.get(Account, "poor")
        await ann.deposit(amount=10)
        with pytest.raises(ConflictError) as refused:
            await ann.pay(to="rich", amount=11)
        assert refused.value.type == "insufficient_funds"
        with pytest.raises(BadRequestError):
            await ann.pay(to="poor", amount=1)
        with pytest.raises(BadRequestError):
            await ann.pay(to="rich", amount=0)
        assert await ann.balance() == 10
        assert await client.get(Account, "rich").balance() == 0
