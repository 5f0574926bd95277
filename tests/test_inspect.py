"""``ndo inspect`` against running workers over a real nats-server and real SQLite: listing,
showing, export and import between deployments, deletion through the owner, replicated
storage, reads while a commit holds the write lock, and hostile requests."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from ndo.actors import (
    ActorClient,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RetryPolicy,
)
from ndo.examples import Counter
from ndo.ops._inspect import InspectOptions, run_inspect
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._replay import ReplayOptions, run_replay
from ndo.service import Worker
from ndo.subjects import inspect_subject, partition_of
from tests.objects import Reminder, Store
from tests.worker_fixtures import WorkerFactory

PARTITIONS = 8  # the worker fixtures' partition count


async def inspect(server: EmbeddedNatsServer, command: str, **options: Any) -> tuple[int, str, str]:
    """Run ``ndo inspect COMMAND`` in-process; its exit code, standard output and error."""
    out, err = io.StringIO(), io.StringIO()
    code = await run_inspect(
        InspectOptions(command=command, nats_url=server.url, auth=None, prefix="ndo", **options),
        out=out,
        err=err,
    )
    return code, out.getvalue(), err.getvalue()


async def inspect_json(server: EmbeddedNatsServer, command: str, **options: Any) -> Any:
    code, out, err = await inspect(server, command, as_json=True, **options)
    assert code == 0, err
    return json.loads(out)


async def put_bytes(nc: NatsClient, object_id: str, key: str, value: bytes) -> None:
    """Store raw bytes in a ``Store`` object (a MessagePack call: JSON has no bytes)."""
    reply = await nc.request(
        f"ndo.rpc.Store.{object_id}.put",
        msgspec.msgpack.encode({"key": key, "value": value}),
        headers={"Content-Type": "application/msgpack"},
        timeout=5,
    )
    assert not reply.headers or "Nats-Service-Error-Code" not in reply.headers, reply.headers


@pytest.fixture(name="seeded")
async def _seeded(worker: Worker, client: ActorClient, nc: NatsClient) -> Worker:
    """A worker holding 12 counters, a reminder with an alarm in an hour and a store."""
    for i in range(12):
        await client.get(Counter, f"c{i}").call(Counter.increment, by=i + 1)
    await client.get(Reminder, "r1").call(Reminder.schedule, at=time.time() + 3600)
    await client.get(Store, "s1").call(Store.put, key="name", value="ann")
    await put_bytes(nc, "s1", "blob", b"\x00\xffraw")
    return worker


class TestObjectsAndShow:
    async def test_lists_every_object_with_counts(
        self, seeded: Worker, nats_server: EmbeddedNatsServer
    ) -> None:
        listed = await inspect_json(nats_server, "objects", limit=100)
        assert listed["counts"] == {"Counter": 12, "Reminder": 1, "Store": 1}
        assert listed["total"] == 14 and listed["next"] is None
        assert listed["missing_partitions"] == []
        names = [(o["class"], o["id"]) for o in listed["objects"]]
        assert names == sorted(names) and len(names) == 14
        for o in listed["objects"]:
            assert o["partition"] == partition_of(o["class"], o["id"], PARTITIONS)
        reminder = next(o for o in listed["objects"] if o["class"] == "Reminder")
        assert reminder["alarm"] > time.time() + 3000 and reminder["keys"] == 1

    async def test_pages_follow_one_another(
        self, seeded: Worker, nats_server: EmbeddedNatsServer
    ) -> None:
        seen: list[tuple[str, str]] = []
        after = None
        for _ in range(10):
            page = await inspect_json(nats_server, "objects", limit=4, after=after)
            seen += [(o["class"], o["id"]) for o in page["objects"]]
            after = page["next"]
            if after is None:
                break
        assert len(seen) == 14 and seen == sorted(set(seen))

    async def test_filters_by_class_and_id_prefix(
        self, seeded: Worker, nats_server: EmbeddedNatsServer
    ) -> None:
        listed = await inspect_json(nats_server, "objects", class_name="Counter", id_prefix="c1")
        assert [o["id"] for o in listed["objects"]] == ["c1", "c10", "c11"]
        assert listed["counts"] == {"Counter": 3}

    async def test_tables_for_people(self, seeded: Worker, nats_server: EmbeddedNatsServer) -> None:
        code, out, _ = await inspect(nats_server, "objects", limit=3)
        assert code == 0
        assert "CLASS     OBJECTS" in out and "Counter   12" in out and "(all)     14" in out
        assert "next page: ndo inspect objects --after Counter/c10 --limit 3" in out
        code, out, _ = await inspect(nats_server, "show", class_name="Store", object_id="s1")
        assert code == 0
        assert "object:    Store/s1" in out
        assert f"held by {seeded.name}" in out
        assert '"ann"' in out and "KEY" in out and "VALUE" in out

    async def test_show_decodes_values_and_tells_alarm_and_holder(
        self, seeded: Worker, nats_server: EmbeddedNatsServer
    ) -> None:
        shown = await inspect_json(nats_server, "show", class_name="Reminder", object_id="r1")
        assert shown["exists"] and shown["keys"] == {"fail_times": 0}
        assert shown["alarm"] > time.time() + 3000
        assert shown["worker"] == seeded.name and shown["active"] is True
        assert shown["partition"] == partition_of("Reminder", "r1", PARTITIONS)
        store = await inspect_json(nats_server, "show", class_name="Store", object_id="s1")
        assert store["keys"]["name"] == "ann"
        assert store["keys"]["blob"] == "AP9yYXc="  # bytes, shown as base64

    async def test_an_object_that_stores_nothing(
        self, seeded: Worker, nats_server: EmbeddedNatsServer
    ) -> None:
        shown = await inspect_json(nats_server, "show", class_name="Counter", object_id="nobody")
        assert shown["exists"] is False and shown["keys"] == {} and shown["alarm"] is None
        code, out, _ = await inspect(nats_server, "show", class_name="Counter", object_id="nobody")
        assert code == 0 and "(stores nothing)" in out

    async def test_many_keys_come_in_pages(
        self, worker: Worker, client: ActorClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """An object larger than one reply page is shown whole (1,200 keys of 1 KiB)."""
        stub = client.get(Store, "big")
        for start in range(0, 1200, 100):
            await stub.call(
                Store.put_many, entries={f"k{i:05d}": "x" * 1024 for i in range(start, start + 100)}
            )
        shown = await inspect_json(nats_server, "show", class_name="Store", object_id="big")
        assert len(shown["keys"]) == 1200 and shown["size"] > 1200 * 1024


class TestExportImport:
    async def test_an_export_loads_into_another_deployment_exactly(
        self,
        seeded: Worker,
        start_worker: WorkerFactory,
        nats_server: EmbeddedNatsServer,
        nc: NatsClient,
        tmp_path: Path,
    ) -> None:
        code, exported, err = await inspect(nats_server, "export")
        assert code == 0 and "exported 14 objects" in err
        lines = [json.loads(line) for line in exported.splitlines()]
        store = next(line for line in lines if line["class"] == "Store")
        assert store["state"] == {"name": "ann"} and set(store["binary"]) == {"blob"}
        other = await start_worker(prefix="other", data_dir=tmp_path / "other")
        file = tmp_path / "export.jsonl"
        file.write_text(exported)
        out, err_io = io.StringIO(), io.StringIO()
        options = InspectOptions(
            command="import", nats_url=nats_server.url, auth=None, prefix="other", file=str(file)
        )
        assert await run_inspect(options, out=out, err=err_io) == 0, err_io.getvalue()
        assert "imported 14 new objects, replaced 0, failed 0" in out.getvalue()
        for line in lines:
            cls, oid = line["class"], line["id"]
            want = await seeded.storage.read_range(
                cls, oid, start=None, end=None, limit=None, reverse=False
            )
            got = await other.storage.read_range(
                cls, oid, start=None, end=None, limit=None, reverse=False
            )
            assert got == want  # the stored bytes, binary values included
            assert await other.storage.read_alarm(cls, oid) == await seeded.storage.read_alarm(
                cls, oid
            )
        other_client = ActorClient(nc, prefix="other", retry=RetryPolicy(attempts=3))
        assert await other_client.get(Counter, "c5").call(Counter.get) == 6

    async def test_existing_objects_are_refused_and_nothing_is_imported(
        self, seeded: Worker, client: ActorClient, nats_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        file = tmp_path / "in.jsonl"
        file.write_text(
            '{"class": "Counter", "id": "c0", "state": {"value": 100}}\n'
            '{"class": "Counter", "id": "fresh", "state": {"value": 7}}\n'
        )
        code, _, err = await inspect(nats_server, "import", file=str(file))
        assert code == 1
        assert "1 object already hold state (Counter/c0)" in err
        assert "Pass --replace" in err
        assert await client.get(Counter, "fresh").call(Counter.get) == 0  # not imported
        assert await client.get(Counter, "c0").call(Counter.get) == 1

    async def test_replace_overwrites_an_object_in_memory(
        self, seeded: Worker, client: ActorClient, nats_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        """The object is active (its value cached): after the import its next call sees the
        imported state, not the cache."""
        stub = client.get(Counter, "c0")
        assert await stub.call(Counter.increment, by=1) == 2
        file = tmp_path / "in.jsonl"
        file.write_text('{"class": "Counter", "id": "c0", "state": {"value": 100}}\n')
        code, out, err = await inspect(nats_server, "import", file=str(file), replace=True)
        assert code == 0, err
        assert "imported 0 new objects, replaced 1" in out
        assert await stub.call(Counter.increment, by=1) == 101

    async def test_a_bad_file_imports_nothing(
        self, seeded: Worker, client: ActorClient, nats_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        file = tmp_path / "bad.jsonl"
        file.write_text(
            '{"class": "Counter", "id": "good", "state": {"value": 1}}\n'
            '{"class": "Counter", "id": "bad id"}\n'
            "not json\n"
            '{"class": "Counter", "id": "good"}\n'
            '{"class": "Store", "id": "x", "binary": {"k": "!!"}}\n'
            '{"class": "Counter", "id": "y", "unknown": 1}\n'
        )
        code, _, err = await inspect(nats_server, "import", file=str(file))
        assert code == 2
        assert "5 bad lines; nothing was imported" in err
        for said in (
            "line 2: invalid object id",
            "line 3:",
            "also on line 1",
            "line 5:",
            "line 6:",
        ):
            assert said in err
        assert await client.get(Counter, "good").call(Counter.get) == 0

    async def test_import_refuses_what_a_turn_could_not_write(
        self, worker: Worker, nats_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        file = tmp_path / "big.jsonl"
        file.write_text(
            json.dumps({"class": "Store", "id": "x", "state": {"v": "x" * 200_000}}) + "\n"
        )
        code, out, _ = await inspect(nats_server, "import", file=str(file))
        assert code == 1 and "max_value_bytes" in out and "failed 1" in out


class TestDelete:
    async def test_deletes_keys_and_alarm_through_the_owner(
        self, worker: Worker, client: ActorClient, nats_server: EmbeddedNatsServer
    ) -> None:
        reminder = client.get(Reminder, "soon")
        await reminder.call(Reminder.schedule, at=time.time() + 1.0)
        deleted = await inspect_json(nats_server, "delete", class_name="Reminder", object_id="soon")
        assert deleted["existed"] is True and deleted["worker"] == worker.name
        assert await worker.storage.read_alarm("Reminder", "soon") is None
        await asyncio.sleep(1.5)  # past the deleted alarm's time: it must not fire
        assert await reminder.call(Reminder.fired) == []
        assert await reminder.call(Reminder.alarm_time) is None
        again = await inspect_json(nats_server, "delete", class_name="Reminder", object_id="soon")
        assert again["existed"] is False

    async def test_an_active_object_starts_empty(
        self, worker: Worker, client: ActorClient, nats_server: EmbeddedNatsServer
    ) -> None:
        stub = client.get(Counter, "gone")
        assert await stub.call(Counter.increment, by=5) == 5
        code, out, _ = await inspect(nats_server, "delete", class_name="Counter", object_id="gone")
        assert code == 0 and "deleted Counter/gone" in out
        assert await stub.call(Counter.get) == 0
        listed = await inspect_json(nats_server, "objects", class_name="Counter")
        assert listed["total"] == 0

    async def test_the_journal_records_it_and_replay_applies_it(
        self, worker: Worker, client: ActorClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """``ndo replay`` shows the delete as a step of the object (kind ``inspect``), and
        ``--execute`` applies it: today's code then agrees with every recorded reply."""
        stub = client.get(Counter, "kept")
        await stub.call(Counter.increment, by=2)
        await inspect_json(nats_server, "delete", class_name="Counter", object_id="kept")
        assert await stub.call(Counter.increment, by=1) == 1
        for execute in (False, True):
            steps: list[dict[str, Any]] = []
            for _ in range(100):  # the journal publishes in the background
                out = io.StringIO()
                options = ReplayOptions(
                    nats_url=nats_server.url,
                    class_name="Counter",
                    object_id="kept",
                    as_json=True,
                    execute=execute,
                )
                code = await run_replay(options, classes=[Counter], out=out, err=io.StringIO())
                steps = [json.loads(line) for line in out.getvalue().splitlines()]
                if len(steps) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert code == 0
            assert [s["method"] for s in steps] == ["increment", "inspect.delete", "increment"]
            assert steps[1]["kind"] == "inspect" and steps[1]["state"] == {}
            assert steps[2]["state"] == {"value": 1}


class TestReplicated:
    async def test_every_holder_answers_for_its_partitions(
        self,
        start_worker: WorkerFactory,
        client: ActorClient,
        nats_server: EmbeddedNatsServer,
        tmp_path: Path,
    ) -> None:
        first = await start_worker(storage="replicated", journal=False)
        second = await start_worker(
            storage="replicated", journal=False, data_dir=tmp_path / "second"
        )
        for _ in range(100):  # wait for the partitions to spread over both workers
            if first.partitions and second.partitions:
                break
            await asyncio.sleep(0.1)
        assert first.partitions and second.partitions
        for i in range(16):
            await client.get(Counter, f"n{i}").call(Counter.increment, by=i + 1)
        listed = await inspect_json(nats_server, "objects", class_name="Counter", limit=100)
        assert listed["total"] == 16 and listed["missing_partitions"] == []
        holders = set()
        for i in range(16):
            shown = await inspect_json(nats_server, "show", class_name="Counter", object_id=f"n{i}")
            assert shown["keys"] == {"value": i + 1}
            owner = first if shown["partition"] in first.partitions else second
            assert shown["worker"] == owner.name
            holders.add(shown["worker"])
        assert holders == {first.name, second.name}
        victim = next(
            f"n{i}"
            for i in range(16)
            if partition_of("Counter", f"n{i}", PARTITIONS) in second.partitions
        )
        await inspect_json(nats_server, "delete", class_name="Counter", object_id=victim)
        assert await client.get(Counter, victim).call(Counter.get) == 0


class TestNeverBlocksTheWorker:
    async def test_reads_answer_while_a_commit_waits_for_the_write_lock(
        self, seeded: Worker, client: ActorClient, nats_server: EmbeddedNatsServer
    ) -> None:
        """Another process holds the database's write lock, so commits wait: inspect still
        answers (its reads never queue behind a commit)."""
        assert isinstance(seeded.config.data_dir, Path)
        path = next(seeded.config.data_dir.rglob("*.sqlite3"))
        holder = sqlite3.connect(path, isolation_level=None, timeout=0.1)
        holder.execute("BEGIN IMMEDIATE")
        try:
            write = asyncio.create_task(client.get(Counter, "c1").call(Counter.increment, by=1))
            await asyncio.sleep(0.3)
            assert not write.done()  # the commit is stuck behind the lock
            listed = await inspect_json(nats_server, "objects", limit=100)
            assert listed["total"] == 14
            shown = await inspect_json(nats_server, "show", class_name="Counter", object_id="c1")
            assert shown["keys"] == {"value": 2}  # the committed value, not the pending one
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await write == 3


class TestHostileRequests:
    async def test_bad_requests_get_structured_errors(
        self, seeded: Worker, client: ActorClient
    ) -> None:
        p = partition_of("Counter", "c1", PARTITIONS)
        wrong = (p + 1) % PARTITIONS
        cases: list[tuple[str, bytes, type[Exception], str]] = [
            (inspect_subject("ndo", "objects", p), b"not json", BadRequestError, "invalid_request"),
            (
                inspect_subject("ndo", "objects", p),
                b'{"limit": 0}',
                BadRequestError,
                "invalid_limit",
            ),
            (
                inspect_subject("ndo", "objects", p),
                b'{"evil": 1}',
                BadRequestError,
                "invalid_request",
            ),
            (
                inspect_subject("ndo", "show", wrong),
                b'{"class": "Counter", "id": "c1"}',
                BadRequestError,
                "wrong_partition",
            ),
            (
                inspect_subject("ndo", "show", p),
                b'{"class": "Counter", "id": "c.1"}',
                BadRequestError,
                "invalid_id",
            ),
            (inspect_subject("ndo", "explode", p), b"{}", NotFoundError, "unknown_operation"),
            (
                inspect_subject("ndo", "delete", partition_of("Nope", "x", PARTITIONS)),
                b'{"class": "Nope", "id": "x"}',
                NotFoundError,
                "unknown_class",
            ),
            (
                inspect_subject("ndo", "import", partition_of("Store", "x", PARTITIONS)),
                json.dumps(
                    {"class": "Store", "id": "x", "entries": [["k", "bm90IG1zZ3BhY2vB"]]}
                ).encode(),
                BadRequestError,
                "invalid_import",
            ),
            (
                inspect_subject("ndo", "import", partition_of("Store", "x", PARTITIONS)),
                msgspec.json.encode(
                    {
                        "class": "Store",
                        "id": "x",
                        "entries": [["k", msgspec.msgpack.encode("x" * 140_000)]],
                    }
                ),
                PayloadTooLargeError,
                "value_too_large",
            ),
        ]
        for subject, body, error, kind in cases:
            with pytest.raises(error) as caught:
                await client.request(subject, body)
            assert caught.value.type == kind, (subject, body[:40])
        assert await client.get(Counter, "c1").call(Counter.get) == 2  # still serving
        assert await seeded.storage.read("Store", "x", "k") is None

    async def test_a_partition_token_that_is_not_a_partition(
        self, start_worker: WorkerFactory, nc: NatsClient
    ) -> None:
        """A worker serving every partition alone takes ``<prefix>.sys.inspect.*.*``: tokens
        that are no partition of the deployment are refused."""
        await start_worker(ownership="standalone")
        for token in ("99", "x"):
            reply = await nc.request(f"ndo.sys.inspect.{token}.objects", b"{}", timeout=5)
            assert reply.headers is not None
            assert reply.headers["Nats-Service-Error-Code"] == "400"


class TestCommandLine:
    async def test_the_ndo_command(self, seeded: Worker, nats_server: EmbeddedNatsServer) -> None:
        """``ndo inspect`` as users run it: parsed options, exit codes, output."""

        async def ndo(*args: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "ndo", "inspect", *args, "--nats-url", nats_server.url),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        code, out, err = await ndo("objects", "--class", "Counter", "--json")
        assert code == 0, err
        assert json.loads(out)["total"] == 12
        code, out, _ = await ndo("show", "Counter", "c3")
        assert code == 0 and "value" in out
        code, _, err = await ndo("show", "Counter", "no.such")
        assert code == 2 and "invalid object id" in err
        code, out, _ = await ndo("export", "Counter", "c3")
        assert json.loads(out) == {"class": "Counter", "id": "c3", "state": {"value": 4}}
