"""Property tests (hypothesis) over everything that reads hostile input before a handler does.

* the subject parser and the name rules (``ndo.subjects``): a subject either parses into parts
  that build it back, or is an ``InvalidSubjectError``;
* the body decoder (``MethodSpec.decode_args``): random bytes, random JSON and MessagePack trees,
  deep nesting, huge integers, NaN and infinities, bytes that are not UTF-8 — a ``Struct`` whose
  every later encoding works, or a 400;
* the turn engine (``TurnRunner``), through the test kit (``ndo.testing``): random calls give a
  reply or an ``ActorError`` under 500, and only the calls that succeeded change the object.

Every test is bounded (``max_examples``) and derandomized, so CI runs the same examples each time
and the file stays within seconds; no example database is written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import string
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ndo.actors import Actor, ActorError, BadRequestError, HandlerError, method
from ndo.actors._methods import MAX_NESTING
from ndo.actors.runtime import ActorClassInfo, describe_class
from ndo.service import Envelope
from ndo.service._codec import encode_error, replay_reply, stored_fingerprint, stored_reply
from ndo.service._idempotency import call_fingerprint
from ndo.subjects import (
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MSGPACK_CONTENT_TYPE,
    Header,
    InvalidSubjectError,
    id_from_name,
    is_reply_subject,
    is_valid_id,
    parse_reply_prefixes,
    parse_rpc_subject,
    partition_of,
    rpc_subject,
    validate_id,
    validate_name,
    validate_prefix,
)
from ndo.testing import ObjectHarness

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""Bounded and reproducible: the same examples on every run, nothing stored between runs."""
FUZZ_LONG = settings(FUZZ, max_examples=100)
"""For examples that each run several turns."""

INT64 = st.integers(-(2**63), 2**64 - 1)
"""Integers MessagePack (and so storage) can hold."""


class Point(msgspec.Struct):
    """A typed argument."""

    x: int
    y: int


class Target(Actor):
    """Methods of every argument shape, some reading and some writing."""

    @method
    async def echo(self, value: Any = None) -> Any:
        return value

    @method
    async def keep(self, key: str, value: Any = None) -> None:
        self.storage.put(key, value)

    @method
    async def bump(self, by: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 1) -> int:
        total: int = await self.storage.get("n", 0) + by
        self.storage.put("n", total)
        return total

    @method
    async def typed(
        self,
        n: int,
        ratio: float = 0.0,
        name: str = "",
        flag: bool = False,
        items: list[int] | None = None,
        tags: dict[str, str] | None = None,
        point: Point | None = None,
    ) -> int:
        return n

    @method
    async def shapes(
        self,
        d: dict[str, Any] | None = None,
        items: list[Any] | None = None,
        pair: tuple[int, str] | None = None,
        raw: bytes = b"",
    ) -> int:
        return len(d or {}) + len(items or [])


INFO: ActorClassInfo = describe_class(Target)
METHODS = [*sorted(INFO.methods) * 3, "nope", "on_start", "alarm", "_private"]
"""Names a caller may send: the real methods (mostly) and some that must be a 404."""


# Strategies

_TRICKY_TEXT = st.text(alphabet='[]{}"\\:, ab\x00\u00e9\U0001f600', max_size=8)
"""Text with brackets, quotes and backslashes: what the JSON nesting check must see through."""


def _trees(leaves: st.SearchStrategy[Any], *, any_keys: bool = False) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.text(max_size=6), st.integers(-5, 5)) if any_keys else st.text(max_size=6)
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=24,
    )


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: JSON can carry 100-digit integers
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    _TRICKY_TEXT,
)
MSGPACK_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(),  # NaN and infinities too
    st.text(max_size=10),
    _TRICKY_TEXT,
    st.binary(max_size=10),
)


def _nested(depth: int, leaf: Any, kinds: list[bool]) -> Any:
    """A value ``depth`` levels deep: lists (True) or one-key maps (False), outermost first."""
    value = leaf
    for as_list in reversed(kinds[:depth]):
        value = [value] if as_list else {"k": value}
    return value


@st.composite
def deep_values(draw: st.DrawFn) -> tuple[int, Any]:
    """``(depth, value)``: a value nested exactly ``depth`` levels, around the limit."""
    depth = draw(
        st.one_of(st.integers(0, 8), st.integers(MAX_NESTING - 4, MAX_NESTING + 4), st.just(900))
    )
    kinds = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    leaf = draw(st.one_of(_TRICKY_TEXT, INT64, st.none()))
    return depth, _nested(depth, leaf, kinds)


def _deep_raw(depth: int, msgpack: bool) -> bytes:
    """A body for ``echo`` nested ``depth`` levels inside its value, built as bytes (deeper
    than any encoder would go)."""
    if msgpack:
        return b"\x81\xa5value" + b"\x91" * depth + b"\xc0"
    return b'{"value":' + b"[" * depth + b"null" + b"]" * depth + b"}"


def _valid_fields(name: str, msgpack: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Arguments of the right types for ``name`` (so that turns run, and some write)."""
    tree = _trees(MSGPACK_LEAVES if msgpack else JSON_LEAVES)
    raw = st.binary(max_size=8)
    strategies: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "echo": st.fixed_dictionaries({}, optional={"value": tree}),
        "keep": st.fixed_dictionaries({"key": st.text(max_size=12)}, optional={"value": tree}),
        "bump": st.fixed_dictionaries({}, optional={"by": st.integers(-1000, 1000)}),
        "typed": st.fixed_dictionaries(
            {"n": INT64},
            optional={
                "ratio": st.floats(allow_nan=msgpack, allow_infinity=msgpack),
                "name": st.text(max_size=8),
                "flag": st.booleans(),
                "items": st.lists(INT64, max_size=4),
                "tags": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
                "point": st.fixed_dictionaries({"x": INT64, "y": INT64}),
            },
        ),
        "shapes": st.fixed_dictionaries(
            {},
            optional={
                "d": st.dictionaries(st.text(max_size=4), tree, max_size=3),
                "items": st.lists(tree, max_size=3),
                "pair": st.tuples(INT64, st.text(max_size=4)).map(list),
                "raw": raw if msgpack else raw.map(lambda b: base64.b64encode(b).decode()),
            },
        ),
    }
    return strategies[name]


@st.composite
def bodies(draw: st.DrawFn, spec_name: str) -> tuple[bytes, bool]:
    """``(body, msgpack)`` for a call of ``spec_name``: random bytes, a body of the right types,
    one of the right fields with random values, a mutated one, or a deeply nested one."""
    msgpack = draw(st.booleans())
    params = (
        list(INFO.methods[spec_name].args_type.__struct_fields__)
        if spec_name in INFO.methods
        else []
    )
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.binary(max_size=80)), msgpack
    if choice == 5 and spec_name in INFO.methods:
        fields = draw(_valid_fields(spec_name, msgpack))
        encoded = msgspec.msgpack.encode(fields) if msgpack else msgspec.json.encode(fields)
        return encoded, msgpack
    if choice == 4:
        return _deep_raw(draw(st.sampled_from([MAX_NESTING, 3_000, 50_000])), msgpack), msgpack
    names = st.sampled_from([*params, "extra"]) if params else st.just("extra")
    leaves = MSGPACK_LEAVES if msgpack else JSON_LEAVES
    fields = draw(st.dictionaries(names, _trees(leaves), max_size=len(params) + 1))
    body = msgspec.msgpack.encode(fields) if msgpack else msgspec.json.encode(fields)
    if choice == 3 and body:  # flip, cut or splice
        data = bytearray(body)
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.integers(0, 2))
        if action == 0:
            data[at] ^= draw(st.integers(1, 255))
        elif action == 1:
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        body = bytes(data)
    return body, msgpack


# Subjects


class TestSubjectParser:
    """Any subject either parses into parts that build it back, or is InvalidSubjectError."""

    @FUZZ
    @given(st.text(max_size=200))
    def test_arbitrary_text(self, subject: str) -> None:
        """Random text never raises anything but InvalidSubjectError."""
        _parse_or_refuse(subject)

    @FUZZ
    @given(
        st.lists(
            st.one_of(
                st.text(max_size=12),
                st.text(alphabet=string.ascii_letters + "_-*>$ .\t\u00e9", max_size=12),
                st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,70}", fullmatch=True),
                st.text(alphabet="ab-_", min_size=MAX_ID_LENGTH - 1, max_size=MAX_ID_LENGTH + 2),
            ),
            max_size=6,
        )
    )
    def test_tokens_under_the_prefix(self, tokens: list[str]) -> None:
        """Any number of any tokens under ``ndo.rpc.``: parts that build it back, or refused."""
        _parse_or_refuse("ndo.rpc." + ".".join(tokens))

    @FUZZ
    @given(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_\-]{1,128}", fullmatch=True),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True),
    )
    def test_valid_parts_always_parse(self, class_name: str, object_id: str, name: str) -> None:
        """A subject built from valid parts parses back into them."""
        address = parse_rpc_subject("ndo", rpc_subject("ndo", class_name, object_id, name))
        assert address == (class_name, object_id, name)

    @FUZZ
    @given(st.text(max_size=MAX_ID_LENGTH + 10))
    def test_id_rules_agree(self, text: str) -> None:
        """is_valid_id and validate_id agree; any name maps to a valid id; partitions are in
        range."""
        if is_valid_id(text):
            assert validate_id(text) == text
            assert 0 <= partition_of("Counter", text, 64) < 64
        else:
            with pytest.raises(InvalidSubjectError):
                validate_id(text)
        assert is_valid_id(id_from_name(text))
        try:
            validate_name(text)
        except InvalidSubjectError:
            pass
        else:
            assert 0 < len(text) <= MAX_NAME_LENGTH and text.isascii()

    @FUZZ
    @given(st.text(max_size=60), st.text(max_size=60))
    def test_prefixes_and_reply_subjects(self, text: str, subject: str) -> None:
        """Prefixes and inbox prefixes parse or are refused with ValueError; checking a reply
        subject never raises."""
        with contextlib.suppress(InvalidSubjectError):
            validate_prefix(text)
        try:
            prefixes = parse_reply_prefixes(text)
        except ValueError:
            prefixes = ("_INBOX.",)
        else:
            assert prefixes and all(p.endswith(".") and "*" not in p for p in prefixes)
        assert isinstance(is_reply_subject(subject, prefixes), bool)


def _parse_or_refuse(subject: str) -> None:
    try:
        address = parse_rpc_subject("ndo", subject)
    except InvalidSubjectError:
        return
    assert rpc_subject("ndo", *address) == subject


# Bodies


class TestBodyDecoder:
    """Any body decodes into arguments every later step can encode, or is a 400."""

    @FUZZ
    @given(st.sampled_from(sorted(INFO.methods)), st.data())
    def test_any_body(self, name: str, data: st.DataObject) -> None:
        """Random, well-shaped, mutated and deep bodies: a Struct or a BadRequestError."""
        body, msgpack = data.draw(bodies(name))
        spec = INFO.methods[name]
        try:
            args = spec.decode_args(body, msgpack)
        except BadRequestError as error:
            encode_error(error, msgpack)  # the answer itself always encodes
            return
        _assert_reencodable(args)
        assert len(call_fingerprint(name, args)) == 16
        Envelope(spec, args, "_INBOX.x", msgpack=msgpack, idempotency_key="k")

    @FUZZ
    @given(deep_values(), st.booleans())
    def test_nesting_limit_is_exact(self, case: tuple[int, Any], msgpack: bool) -> None:
        """A value nested d levels (the body's own object makes d + 1) is accepted exactly when
        d + 1 <= MAX_NESTING, whatever its strings hold, in JSON and in MessagePack."""
        depth, value = case
        spec = INFO.methods["echo"]
        encoder = msgspec.msgpack.encode if msgpack else msgspec.json.encode
        try:
            body = encoder({"value": value})
        except RecursionError:  # deeper than the encoder goes: build the bytes instead
            body = _deep_raw(depth, msgpack)
        if depth + 1 <= MAX_NESTING:
            assert spec.decode_args(body, msgpack).value == value  # type: ignore[attr-defined]
        else:
            with pytest.raises(BadRequestError) as refused:
                spec.decode_args(body, msgpack)
            assert refused.value.type == "too_deeply_nested"
            assert str(MAX_NESTING) in refused.value.message

    @FUZZ
    @given(_trees(JSON_LEAVES))
    def test_json_values_round_trip(self, value: Any) -> None:
        """Any JSON value within the nesting limit reaches the handler as sent (huge integers
        included)."""
        args = INFO.methods["echo"].decode_args(msgspec.json.encode({"value": value}))
        assert args.value == value  # type: ignore[attr-defined]

    @FUZZ
    @given(_trees(MSGPACK_LEAVES, any_keys=True))
    def test_msgpack_values_round_trip(self, value: Any) -> None:
        """Any MessagePack value (NaN, infinities, binary, integer keys) reaches the handler as
        sent."""
        body = msgspec.msgpack.encode({"value": value})
        args = INFO.methods["echo"].decode_args(body, msgpack=True)
        assert msgspec.msgpack.encode(args.value) == msgspec.msgpack.encode(value)  # type: ignore[attr-defined]

    @FUZZ
    @given(st.binary(max_size=40), st.booleans())
    def test_not_utf8_in_strings(self, junk: bytes, msgpack: bool) -> None:
        """Bytes that are not UTF-8 inside a string are a 400 or decode to valid text."""
        if msgpack:
            body = b"\x82\xa3key" + b"\xd9" + bytes([len(junk)]) + junk + b"\xa5value\xc0"
        else:
            body = b'{"key": "' + junk.replace(b'"', b"").replace(b"\\", b"") + b'"}'
        try:
            args = INFO.methods["keep"].decode_args(body, msgpack)
        except BadRequestError:
            return
        args.key.encode("utf-8")  # type: ignore[attr-defined]  # never a lone surrogate

    @FUZZ
    @given(_trees(JSON_LEAVES), st.booleans(), st.booleans(), st.binary(min_size=16, max_size=16))
    def test_stored_replies_replay(
        self, value: Any, first_msgpack: bool, retry_msgpack: bool, fingerprint: bytes
    ) -> None:
        """A remembered reply gives back its fingerprint and replays in either encoding, or is
        a 400 naming the encoding to retry in."""
        try:
            body = msgspec.msgpack.encode(value) if first_msgpack else msgspec.json.encode(value)
        except OverflowError:
            return  # no handler can return it as MessagePack either
        stored = stored_reply(body, first_msgpack, fingerprint)
        assert stored_fingerprint(stored) == fingerprint
        try:
            replayed, _ = replay_reply(stored, retry_msgpack)
        except BadRequestError as error:
            refused: BadRequestError | None = error
        else:
            refused = None
        if refused is not None:
            assert refused.type == "unencodable_reply"
            return
        decoded = msgspec.msgpack.decode(replayed) if retry_msgpack else json.loads(replayed)
        assert _same(decoded, value)


def _assert_reencodable(args: msgspec.Struct) -> None:
    """Storing, replying and journaling re-encode the arguments: never too deep for that."""
    for encode in (msgspec.msgpack.encode, msgspec.json.encode):
        # Not every value is expressible in both (a 100-digit integer, a map key); none is too
        # deep for either.
        with contextlib.suppress(TypeError, OverflowError, msgspec.EncodeError):
            encode(args)


def _same(left: Any, right: Any) -> bool:
    """Equal as JSON data: floats compared by value (NaN equal to itself)."""
    if isinstance(left, float) and isinstance(right, float):
        return left == right or (math.isnan(left) and math.isnan(right))
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(
            _same(a, b) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    return bool(left == right)


# The turn engine


class Builder(Actor):
    """Returns a value it nests itself, deeper than any encoder goes."""

    @method
    async def nest(self, depth: int) -> Any:
        value: Any = None
        for _ in range(depth):
            value = [value]
        return value


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """One call as ingress receives it: a method name (maybe unknown) and a body."""
    name = draw(st.sampled_from(METHODS))
    body, msgpack = draw(bodies(name))
    return name, body, msgpack


_MSGPACK = {Header.CONTENT_TYPE.value: MSGPACK_CONTENT_TYPE}


class TestTurnEngine:
    """Random calls through the test kit (ingress's checks, then the worker's turn engine and a
    commit): a reply or an ActorError under 500, and only the calls that succeeded change the
    object."""

    @FUZZ_LONG
    @given(st.lists(calls(), min_size=1, max_size=8))
    def test_random_calls(self, sequence: list[tuple[str, bytes, bool]]) -> None:
        """Each call is refused (4xx) before or by its turn, or succeeds; the stored state is
        exactly what the successful writes made it."""
        asyncio.run(_drive(sequence))

    def test_reply_too_deep_to_encode(self) -> None:
        """A handler returning a value nested too deeply to encode fails its turn with a clean
        500 that says so; nothing escapes the engine."""

        async def nest(depth: int) -> Any:
            msgpack = depth % 2 == 1  # the reply is encoded as the request was
            encode = msgspec.msgpack.encode if msgpack else msgspec.json.encode
            async with ObjectHarness([Builder]) as harness:
                return await harness.request(
                    "ndo.rpc.Builder.b.nest",
                    encode({"depth": depth}),
                    headers=_MSGPACK if msgpack else None,
                )

        for depth in (100_000, 100_001):
            with pytest.raises(HandlerError, match="nested too deeply"):
                asyncio.run(nest(depth))
        assert asyncio.run(nest(50))


async def _drive(sequence: list[tuple[str, bytes, bool]]) -> None:
    model: dict[str, bytes] = {}
    async with ObjectHarness([Target]) as harness:
        for name, body, msgpack in sequence:
            refused: ActorError | None = None
            try:
                await harness.request(
                    f"ndo.rpc.Target.fuzz.{name}", body, headers=_MSGPACK if msgpack else None
                )
            except ActorError as error:
                refused = error
            if refused is not None:
                assert refused.code < 500, (name, body, refused, refused.__cause__)
                event(f"refused: {refused.type}")
                continue
            event(f"{name} succeeded")
            _apply(model, name, INFO.methods[name].decode_args(body, msgpack))
        stored = await harness.storage.read_range(
            "Target", "fuzz", start=None, end=None, limit=None, reverse=False
        )
    assert dict(stored) == model


def _apply(model: dict[str, bytes], name: str, args: Any) -> None:
    """What a successful call of ``name`` does to the object, by the model."""
    if name == "keep":
        model[args.key] = msgspec.msgpack.encode(args.value)
    elif name == "bump":
        previous = msgspec.msgpack.decode(model["n"]) if "n" in model else 0
        model["n"] = msgspec.msgpack.encode(previous + args.by)
