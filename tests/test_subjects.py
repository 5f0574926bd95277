"""The subject scheme: builders, parsing, validation, object ids and partitions.

The partition test runs a real nats-server with a ``partition()`` subject mapping, because
``partition_of`` is only useful if it agrees with the server bit for bit.
"""

from __future__ import annotations

import asyncio
import random
import re

import nats
import pytest

from ndo.subjects import (
    DEFAULT_PREFIX,
    JOURNAL_SHARDS,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    InvalidSubjectError,
    RpcAddress,
    event_subject,
    event_wildcard,
    fnv1a_32,
    forward_subject,
    forward_wildcard,
    id_from_name,
    is_valid_id,
    journal_shard,
    journal_shard_of_partition,
    journal_subject,
    journal_wildcard,
    legacy_journal_subject,
    new_unique_id,
    parse_rpc_subject,
    partition_mapping,
    partition_of,
    partition_wildcard,
    rpc_subject,
    rpc_wildcard,
    sys_subject,
    validate_id,
    validate_name,
    validate_prefix,
)
from tests.conftest import NatsServerFactory

BAD_IDS = [
    "",
    "a.b",
    "a b",
    "*",
    ">",
    "a*",
    "a>b",
    "tab\t",
    "new\nline",
    "é",
    "$sys",
    "x" * (MAX_ID_LENGTH + 1),
]
"""Object ids that cannot be one subject token (or break the length limit)."""

BAD_NAMES = ["", "9lives", "has.dot", "has space", "*", ">", "dash-ed", "é", "x" * 65]
"""Class and method names that are not identifiers of at most MAX_NAME_LENGTH characters."""


class TestRpcSubjects:
    """RPC subjects are built and parsed by one pair of functions that agree."""

    @pytest.mark.parametrize("prefix", [DEFAULT_PREFIX, "acme", "acme.ndo", "a-b_c.d1"])
    @pytest.mark.parametrize(
        ("class_name", "object_id", "method"),
        [
            ("Counter", "a1", "increment"),
            ("_Private", "-", "_m"),
            ("C" * MAX_NAME_LENGTH, "x" * MAX_ID_LENGTH, "m" * MAX_NAME_LENGTH),
            ("ChatRoom", "0f" * 16, "post"),
            ("X", "A-Z_a-z_0-9", "get_many"),
        ],
    )
    def test_round_trip(self, prefix: str, class_name: str, object_id: str, method: str) -> None:
        """parse_rpc_subject(rpc_subject(...)) gives back exactly the parts it was built from."""
        subject = rpc_subject(prefix, class_name, object_id, method)
        assert subject == f"{prefix}.rpc.{class_name}.{object_id}.{method}"
        assert parse_rpc_subject(prefix, subject) == RpcAddress(class_name, object_id, method)

    def test_wildcard_covers_built_subjects(self) -> None:
        """rpc_wildcard has one '*' per token that rpc_subject fills in."""
        wildcard = rpc_wildcard("acme.ndo")
        subject = rpc_subject("acme.ndo", "Counter", "a1", "get")
        assert wildcard == "acme.ndo.rpc.*.*.*"
        assert len(wildcard.split(".")) == len(subject.split("."))

    @pytest.mark.parametrize("object_id", BAD_IDS)
    def test_build_refuses_bad_ids(self, object_id: str) -> None:
        """An id that is not one valid token is refused, pointing at id_from_name."""
        with pytest.raises(InvalidSubjectError, match="id_from_name"):
            rpc_subject("ndo", "Counter", object_id, "get")

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_build_refuses_bad_names(self, name: str) -> None:
        """Class and method names must be identifiers; the error names the kind of name."""
        with pytest.raises(InvalidSubjectError, match="class name"):
            rpc_subject("ndo", name, "a1", "get")
        with pytest.raises(InvalidSubjectError, match="method name"):
            rpc_subject("ndo", "Counter", "a1", name)

    @pytest.mark.parametrize(
        "subject",
        [
            "ndo.rpc.Counter.a1",
            "ndo.rpc.Counter.a.1.get",
            "ndo.rpc.Counter..get",
            "ndo.rpc.Counter.a1.get.extra",
            "ndo.evt.Counter.a1.get",
            "other.rpc.Counter.a1.get",
            "ndo.rpc.9C.a1.get",
            "ndo.rpc.Counter.a$1.get",
            "ndo.rpc.Counter.a1.9get",
            "ndo.rpc.Counter." + "x" * (MAX_ID_LENGTH + 1) + ".get",
            "",
        ],
    )
    def test_parse_refuses_malformed(self, subject: str) -> None:
        """Wrong prefix, wrong token count and invalid parts are all InvalidSubjectError."""
        with pytest.raises(InvalidSubjectError):
            parse_rpc_subject("ndo", subject)

    def test_parse_is_prefix_exact(self) -> None:
        """A prefix that merely starts another prefix does not match it."""
        with pytest.raises(InvalidSubjectError):
            parse_rpc_subject("nd", "ndo.rpc.Counter.a1.get")
        assert parse_rpc_subject("a.b", "a.b.rpc.C.i.m") == RpcAddress("C", "i", "m")

    def test_invalid_subject_error_is_a_value_error(self) -> None:
        """Callers that already catch ValueError keep working."""
        assert issubclass(InvalidSubjectError, ValueError)


class TestValidation:
    """Validators return their input when valid and explain what is wrong when not."""

    @pytest.mark.parametrize("object_id", ["a", "A-1_b", "x" * MAX_ID_LENGTH, "-", "_", "007"])
    def test_valid_ids(self, object_id: str) -> None:
        """Letters, digits, '-' and '_' up to MAX_ID_LENGTH characters are valid ids."""
        assert is_valid_id(object_id)
        assert validate_id(object_id) == object_id

    @pytest.mark.parametrize("object_id", BAD_IDS)
    def test_invalid_ids(self, object_id: str) -> None:
        """Dots, spaces, wildcards, other characters, empty and too long ids are refused."""
        assert not is_valid_id(object_id)
        with pytest.raises(InvalidSubjectError, match=re.escape(repr(object_id))):
            validate_id(object_id)

    @pytest.mark.parametrize("name", BAD_NAMES)
    def test_invalid_names(self, name: str) -> None:
        """Names that are not short identifiers are refused with the kind in the message."""
        with pytest.raises(InvalidSubjectError, match="topic name"):
            validate_name(name, "topic")

    def test_name_length_limit(self) -> None:
        """MAX_NAME_LENGTH characters pass, one more fails."""
        assert validate_name("n" * MAX_NAME_LENGTH) == "n" * MAX_NAME_LENGTH
        with pytest.raises(InvalidSubjectError, match=str(MAX_NAME_LENGTH)):
            validate_name("n" * (MAX_NAME_LENGTH + 1))

    @pytest.mark.parametrize("prefix", ["ndo", "acme.ndo", "a-b.c_d.e1"])
    def test_valid_prefixes(self, prefix: str) -> None:
        """Dot-separated tokens make a valid prefix."""
        assert validate_prefix(prefix) == prefix

    @pytest.mark.parametrize("prefix", ["", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "é"])
    def test_invalid_prefixes(self, prefix: str) -> None:
        """Empty tokens, wildcards and spaces are refused with an example of a good prefix."""
        with pytest.raises(InvalidSubjectError, match=re.escape("acme.ndo")):
            validate_prefix(prefix)


class TestOtherSubjects:
    """Event, journal and internal subjects."""

    def test_event_subject(self) -> None:
        """Events go to <prefix>.evt.<Class>.<id>.<topic>; topics may contain '-'."""
        assert event_subject("ndo", "ChatRoom", "r1", "message") == "ndo.evt.ChatRoom.r1.message"
        assert event_subject("a.b", "C", "i", "on-change") == "a.b.evt.C.i.on-change"

    @pytest.mark.parametrize("topic", ["", "a.b", "*", ">", "a b", "t" * (MAX_NAME_LENGTH + 1)])
    def test_event_subject_refuses_bad_topics(self, topic: str) -> None:
        """A topic must be one short token without wildcards."""
        with pytest.raises(InvalidSubjectError, match="topic"):
            event_subject("ndo", "C", "i", topic)

    def test_event_wildcards(self) -> None:
        """'*' and '>' pass through as wildcards; any other topic is validated."""
        assert event_wildcard("ndo", "C", "i") == "ndo.evt.C.i.*"
        assert event_wildcard("ndo", "C", "i", ">") == "ndo.evt.C.i.>"
        assert event_wildcard("ndo", "C", "i", "stroke") == "ndo.evt.C.i.stroke"
        with pytest.raises(InvalidSubjectError):
            event_wildcard("ndo", "C", "i", "a.*")

    def test_sys_and_journal_subjects(self) -> None:
        """Internal subjects live under <prefix>.sys."""
        assert sys_subject("ndo", "ctl", "ping") == "ndo.sys.ctl.ping"
        assert sys_subject("a.b") == "a.b.sys"
        assert journal_subject("ndo", 3) == "ndo.sys.journal.3"
        assert journal_subject("a.b", 15) == "a.b.sys.journal.15"
        assert journal_subject("ndo") == "ndo.sys.journal.*"
        assert legacy_journal_subject("ndo", "C", "i") == "ndo.sys.journal.C.i"
        assert journal_wildcard("ndo") == "ndo.sys.journal.>"

    def test_journal_shards(self) -> None:
        """Every object has one of JOURNAL_SHARDS shards (its partition among 16); a worker can
        take it from the object's partition when its partition count is a multiple of 16."""
        assert JOURNAL_SHARDS == 16
        objects = [(cls, f"id{i}") for cls in ("Counter", "Store", "C") for i in range(500)]
        shards = {journal_shard(cls, oid) for cls, oid in objects}
        assert shards == set(range(JOURNAL_SHARDS))  # in range, and all of them used
        for cls, oid in objects:
            assert journal_shard(cls, oid) == partition_of(cls, oid, JOURNAL_SHARDS)
        for partitions in (16, 32, 64, 256, 1024):
            for cls, oid in objects:
                partition = partition_of(cls, oid, partitions)
                shard = journal_shard_of_partition(partition, partitions)
                assert shard == journal_shard(cls, oid), (cls, oid, partitions)
        for partitions in (1, 8, 10, 24, 40, 100):
            for partition in range(partitions):
                assert journal_shard_of_partition(partition, partitions) is None

    def test_partition_and_forward_subjects(self) -> None:
        """Mapped requests arrive on <prefix>.part.<p>.<Class>.<id>.<method>; forwarded ones on
        <prefix>.sys.fwd.<p>.<Class>.<id>.<method>."""
        assert partition_wildcard("ndo") == "ndo.part.*.*.*.*"
        assert partition_wildcard("ndo", 7) == "ndo.part.7.*.*.*"
        assert forward_subject("ndo", 7, "C.i.m") == "ndo.sys.fwd.7.C.i.m"
        assert forward_wildcard("ndo") == "ndo.sys.fwd.*.*.*.*"
        assert forward_wildcard("a.b", 3) == "a.b.sys.fwd.3.*.*.*"

    def test_partition_mapping(self) -> None:
        """The server mapping takes every RPC subject to its partition subject."""
        source, destination = partition_mapping("ndo", 64)
        assert source == "ndo.rpc.*.*.*"
        assert destination == (
            "ndo.part.{{partition(64,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
        )


class TestObjectIds:
    """Ids derived from names are stable; random ids are valid and unique."""

    @pytest.mark.parametrize(
        "name", ["", "alice@example.com", "a.b c*>", "日本語", "\U0001f600", "x" * 10_000]
    )
    def test_id_from_name_is_valid_and_stable(self, name: str) -> None:
        """Any string maps to the same valid 32-hex-character id every time."""
        derived = id_from_name(name)
        assert derived == id_from_name(name)
        assert re.fullmatch(r"[0-9a-f]{32}", derived)
        assert validate_id(derived) == derived

    def test_id_from_name_known_value(self) -> None:
        """The id is sha256(utf8(name)) cut to 32 hex digits (other languages rely on it)."""
        # sha256(b"alice") = 2bd806c97f0e00af1a1fc3328fa763a9269723c8db8fac4f93af71db186d6e90
        assert id_from_name("alice") == "2bd806c97f0e00af1a1fc3328fa763a9"

    def test_id_from_name_distinguishes_names(self) -> None:
        """Different names give different ids (no collisions among many near-identical names)."""
        names = [f"user-{i}" for i in range(2000)] + ["User-1", "user-1 ", "user_1"]
        assert len({id_from_name(n) for n in names}) == len(names)

    def test_new_unique_id(self) -> None:
        """Random ids are valid subject tokens and never repeat."""
        ids = [new_unique_id() for _ in range(1000)]
        assert all(is_valid_id(i) and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        assert len(set(ids)) == len(ids)


class TestPartitions:
    """partition_of is FNV-1a over class+id, exactly like nats-server's partition()."""

    def test_fnv1a_reference_values(self) -> None:
        """The hash matches the published FNV-1a 32-bit test vectors."""
        assert fnv1a_32(b"") == 0x811C9DC5
        assert fnv1a_32(b"a") == 0xE40C292C
        assert fnv1a_32(b"foobar") == 0xBF9CF968

    def test_range_and_stability(self) -> None:
        """Every partition is in 0..N-1, the same on every call, and N=1 means partition 0."""
        for i in range(200):
            p = partition_of("Counter", f"id{i}", 64)
            assert 0 <= p < 64
            assert p == partition_of("Counter", f"id{i}", 64)
            assert partition_of("Counter", f"id{i}", 1) == 0

    def test_spreads_objects(self) -> None:
        """1000 ids of one class land in every one of 8 partitions."""
        assert {partition_of("Counter", f"c{i}", 8) for i in range(1000)} == set(range(8))

    @pytest.mark.parametrize("partitions", [0, -1])
    def test_refuses_non_positive_counts(self, partitions: int) -> None:
        """A partition count below 1 is a ValueError naming the value."""
        with pytest.raises(ValueError, match=str(partitions)):
            partition_of("C", "i", partitions)

    async def test_matches_nats_server_mapping(self, make_nats_server: NatsServerFactory) -> None:
        """For ~60 varied (class, id) pairs the server's partition(8,1,2) token equals ours."""
        server = await make_nats_server(
            mappings={
                "ndo.rpc.*.*.*": (
                    "ndo.part.{{partition(8,1,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}"
                )
            }
        )
        rng = random.Random(20240611)
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
        pairs = [("Counter", "a1"), ("ChatRoom", "lobby"), ("C", "-"), ("X_y", "0")]
        pairs += [("Counter", id_from_name(f"user-{i}")) for i in range(10)]
        pairs += [("Counter", new_unique_id()) for _ in range(6)]
        for _ in range(40):
            class_name = rng.choice("ABCXYZ_") + "".join(
                rng.choices(alphabet.replace("-", ""), k=rng.randint(0, 20))
            )
            pairs.append((class_name, "".join(rng.choices(alphabet, k=rng.randint(1, 60)))))
        nc = await nats.connect(server.url)
        try:
            sub = await nc.subscribe("ndo.part.>")
            for class_name, object_id in pairs:
                await nc.publish(rpc_subject("ndo", class_name, object_id, "m"), b"")
            await nc.flush()
            seen: dict[tuple[str, str], int] = {}
            async with asyncio.timeout(5):
                while len(seen) < len(pairs):
                    msg = await sub.next_msg(timeout=5)
                    _, _, partition, class_name, object_id, method = msg.subject.split(".")
                    assert method == "m"
                    seen[(class_name, object_id)] = int(partition)
        finally:
            await nc.close()
        expected = {pair: partition_of(*pair, 8) for pair in pairs}
        assert seen == expected
        assert len(set(expected.values())) > 4  # the sample really spans partitions
