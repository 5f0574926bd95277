"""Any language can call objects: a Node.js client with nothing but a subject and a JSON body,
and raw NATS requests carrying bytes no Python client would send."""

from __future__ import annotations

import json

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from ndo.service import Worker
from tests.conftest import NodeRequest

pytestmark = pytest.mark.slow


class TestNodeClient:
    """The official Node.js NATS client talks to ndo over plain request-reply."""

    async def test_increment(
        self, worker: Worker, nats_url: str, node_request: NodeRequest
    ) -> None:
        """A JSON body on ndo.rpc.Counter.n1.increment gets the JSON result, no error headers."""
        reply = await node_request(nats_url, "ndo.rpc.Counter.n1.increment", '{"by": 2}')
        assert reply["data"] == "2"
        assert not reply["headers"] or "Nats-Service-Error-Code" not in reply["headers"]
        again = await node_request(nats_url, "ndo.rpc.Counter.n1.increment", '{"by": 2}')
        assert again["data"] == "4"

    async def test_error_headers(
        self, worker: Worker, nats_url: str, node_request: NodeRequest
    ) -> None:
        """An unknown method answers with NATS service error headers and a JSON error body."""
        reply = await node_request(nats_url, "ndo.rpc.Counter.n1.nope", "")
        assert reply["headers"]["Nats-Service-Error-Code"] == "404"
        assert "increment" in reply["headers"]["Nats-Service-Error"]
        assert json.loads(reply["data"])["error"] == {
            "code": 404,
            "type": "unknown_method",
            "message": reply["headers"]["Nats-Service-Error"],
        }


class TestForeignBytes:
    """Bodies that are not valid UTF-8 get a 400 reply, never silence."""

    @pytest.mark.parametrize(
        ("body", "headers"),
        [
            (b'{"key": "\xff", "value": 1}', None),
            (b"\x82\xa3key\xa1\xff\xa5value\x01", {"Content-Type": "application/msgpack"}),
        ],
        ids=["json", "msgpack"],
    )
    async def test_invalid_utf8_in_a_string(
        self, worker: Worker, nc: NatsClient, body: bytes, headers: dict[str, str] | None
    ) -> None:
        """A string field with invalid UTF-8 is a malformed body (400), like any decode error."""
        msg = await nc.request("ndo.rpc.Store.s.put", body, timeout=1.5, headers=headers)
        assert msg.headers is not None
        assert msg.headers["Nats-Service-Error-Code"] == "400"
        error = (msgspec.msgpack.decode(msg.data) if headers else json.loads(msg.data))["error"]
        assert error["type"] == "malformed_body"
        assert (await nc.request("ndo.rpc.Store.s.get", b'{"key": "k"}', timeout=3)).data == b"null"
