"""Class migrations: the orphan-class refusal at start, renames and deletions applied once and
atomically (SQLite, memory), the config file's ``[[migrations]]``, and ``ndo status``.

Real SQLite files and a real nats-server; ``ndo serve`` and ``ndo status`` run as processes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from ndo.actors import ActorClient
from ndo.examples import Counter
from ndo.ops import ConfigFileError
from ndo.ops._config_file import load_config_file
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops.cli import main
from ndo.service import OrphanClassesError, ServiceError, Worker, WorkerConfig
from ndo.storage import (
    ClassMigration,
    IdempotentReply,
    InMemoryStorage,
    MigrationError,
    ObjectWrite,
    SqliteStorage,
    Storage,
)
from ndo.subjects import partition_of
from tests.helpers import ServeProcess, free_port, run_ndo
from tests.objects import Reminder

PARTITIONS = 8


class Tally(Counter):
    """``Counter`` under its new name."""


class Chime(Reminder):
    """``Reminder`` under its new name (it has an alarm handler)."""


RENAME = ClassMigration(tag="v2", renamed=(("Counter", "Tally"), ("Reminder", "Chime")))


def _partition(class_name: str, object_id: str) -> int:
    return partition_of(class_name, object_id, PARTITIONS)


async def _put(
    storage: Storage,
    class_name: str,
    object_id: str,
    value: object = 1,
    *,
    alarm: float | None = None,
    reply_key: str | None = None,
) -> None:
    """Commit one object's key (and alarm, idempotent reply) the way a worker would."""
    partition = _partition(class_name, object_id)
    (epoch,) = (await storage.claim_partitions([partition], "test", None)).values()
    write = ObjectWrite(
        class_name,
        object_id,
        partition,
        epoch,
        writes={"value": msgspec.msgpack.encode(value)},
        idempotent_reply=None
        if reply_key is None
        else IdempotentReply(reply_key, b"reply", time.time() + 300),
    )
    if alarm is not None:
        write.alarm = alarm
    assert await storage.commit([write]) == frozenset()


@pytest.fixture(name="sqlite")
async def _sqlite(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    storage = SqliteStorage(tmp_path / "data" / "ndo.sqlite3", partitions=PARTITIONS)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return list(conn.execute(sql).fetchall())


class TestStorageMigrations:
    """Both backends apply pending migrations in one transaction, each tag once."""

    @pytest.fixture(name="storage", params=["sqlite", "memory"])
    async def _storage(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[Storage]:
        storage: Storage = (
            SqliteStorage(tmp_path / "ndo.sqlite3", partitions=PARTITIONS)
            if request.param == "sqlite"
            else InMemoryStorage()
        )
        await storage.open()
        try:
            yield storage
        finally:
            await storage.close()

    async def test_stored_classes(self, storage: Storage) -> None:
        """Classes with a key or only an alarm are listed, sorted, each once."""
        assert await storage.stored_classes() == []
        await _put(storage, "Counter", "a")
        await _put(storage, "Counter", "b")
        await _put(storage, "Reminder", "r", alarm=time.time() + 60)
        await _put(storage, "Account", "x")
        assert await storage.stored_classes() == ["Account", "Counter", "Reminder"]

    async def test_rename_and_delete_once(self, storage: Storage) -> None:
        """Keys, alarms and idempotency records move to the new class (at its partition);
        deleted classes lose theirs; the tag is recorded and not applied again."""
        due = time.time() + 60
        await _put(storage, "Counter", "c1", 5, reply_key="k1")
        await _put(storage, "Reminder", "r1", alarm=due)
        await _put(storage, "OldRoom", "o1", alarm=due, reply_key="k2")
        migration = ClassMigration(
            tag="v2", renamed=(("Counter", "Tally"), ("Reminder", "Chime")), deleted=("OldRoom",)
        )
        applied = await storage.apply_migrations([migration], partition_of=_partition, worker="w1")
        assert [(m.tag, m.worker, m.objects_renamed, m.objects_deleted) for m in applied] == [
            ("v2", "w1", 2, 1)
        ]
        assert await storage.stored_classes() == ["Chime", "Tally"]
        assert await storage.read("Tally", "c1", "value") == msgspec.msgpack.encode(5)
        assert await storage.read("Counter", "c1", "value") is None
        assert await storage.read_idempotent("Tally", "c1", "k1", time.time()) == b"reply"
        assert await storage.read_idempotent("OldRoom", "o1", "k2", time.time()) is None
        assert await storage.read_alarm("Chime", "r1") == due
        assert await storage.read_alarm("OldRoom", "o1") is None
        alarms = await storage.due_alarms(None, due + 1, 10)
        assert [(a.class_name, a.object_id, a.partition) for a in alarms] == [
            ("Chime", "r1", _partition("Chime", "r1"))
        ]
        again = await storage.apply_migrations([migration], partition_of=_partition, worker="w2")
        assert again == []
        assert await storage.applied_migrations() == applied

    async def test_failed_migration_changes_nothing(self, storage: Storage) -> None:
        """A rename onto a class that has objects fails every pending migration of the call,
        including the earlier ones: nothing is renamed, deleted or recorded."""
        await _put(storage, "Counter", "c1")
        await _put(storage, "Tally", "t1")
        await _put(storage, "OldRoom", "o1")
        migrations = [
            ClassMigration(tag="v2", deleted=("OldRoom",)),
            ClassMigration(tag="v3", renamed=(("Counter", "Tally"),)),
        ]
        with pytest.raises(MigrationError, match="already holds objects of Tally"):
            await storage.apply_migrations(migrations, partition_of=_partition, worker="w")
        assert await storage.stored_classes() == ["Counter", "OldRoom", "Tally"]
        assert await storage.applied_migrations() == []

    async def test_changed_tag_is_refused(self, storage: Storage) -> None:
        """A recorded tag declared with other content is refused; the record keeps what was
        applied."""
        await _put(storage, "Counter", "c1")
        first = ClassMigration(tag="v2", renamed=(("Counter", "Tally"),))
        await storage.apply_migrations([first], partition_of=_partition, worker="w")
        changed = ClassMigration(tag="v2", renamed=(("Counter", "Score"),))
        with pytest.raises(MigrationError, match="cannot change"):
            await storage.apply_migrations([changed], partition_of=_partition, worker="w")
        [record] = await storage.applied_migrations()
        assert record.renamed == (("Counter", "Tally"),)

    async def test_chained_renames_across_tags(self, storage: Storage) -> None:
        """Tags apply in order: A -> B in one, B -> C in the next, in one call."""
        await _put(storage, "A", "x")
        migrations = [
            ClassMigration(tag="v2", renamed=(("A", "B"),)),
            ClassMigration(tag="v3", renamed=(("B", "C"),)),
        ]
        applied = await storage.apply_migrations(migrations, partition_of=_partition, worker="w")
        assert [m.tag for m in applied] == ["v2", "v3"]
        assert await storage.stored_classes() == ["C"]


class TestSqliteMigrations:
    """SQLite specifics: the partition column, the shared data directory."""

    async def test_partitions_recomputed(self, sqlite: SqliteStorage) -> None:
        """Every moved row carries the new class's partition of its object."""
        ids = [f"c{i}" for i in range(20)]
        for oid in ids:
            await _put(sqlite, "Counter", oid, alarm=time.time() + 60, reply_key="k")
        await sqlite.apply_migrations(
            [ClassMigration(tag="v2", renamed=(("Counter", "Tally"),))],
            partition_of=_partition,
            worker="w",
        )
        expected = {(oid, _partition("Tally", oid)) for oid in ids}
        assert expected != {(oid, _partition("Counter", oid)) for oid in ids}
        for table in ("kv", "alarms", "idempotency"):
            rows = _rows(sqlite.path, f"SELECT cls, oid, part FROM {table}")
            assert {(o, p) for c, o, p in rows if c == "Tally"} == expected, table
            assert all(c == "Tally" for c, _, _ in rows), table

    async def test_concurrent_workers_apply_once(self, tmp_path: Path) -> None:
        """Two stores of one file applying the same migration at once: one applies it, the
        other finds it recorded."""
        path = tmp_path / "ndo.sqlite3"
        first, second = (SqliteStorage(path, partitions=PARTITIONS) for _ in range(2))
        await first.open()
        await second.open()
        try:
            await _put(first, "Counter", "c1")
            migration = [ClassMigration(tag="v2", renamed=(("Counter", "Tally"),))]
            results = await asyncio.gather(
                first.apply_migrations(migration, partition_of=_partition, worker="one"),
                second.apply_migrations(migration, partition_of=_partition, worker="two"),
            )
            assert sorted(len(r) for r in results) == [0, 1]
            assert [m.tag for m in await second.applied_migrations()] == ["v2"]
        finally:
            await first.close()
            await second.close()

    async def test_refused_while_another_worker_uses_the_file(self, tmp_path: Path) -> None:
        """A worker still on the file (it applied migrations, so it holds the workers lock)
        keeps another from applying new ones; once it closes, they apply."""
        path = tmp_path / "ndo.sqlite3"
        old = SqliteStorage(path, partitions=PARTITIONS)
        new = SqliteStorage(path, partitions=PARTITIONS, write_lock_timeout=0.3)
        await old.open()
        await new.open()
        try:
            await _put(old, "Counter", "c1")
            assert await old.apply_migrations([], partition_of=_partition, worker="old") == []
            migration = [ClassMigration(tag="v2", renamed=(("Counter", "Tally"),))]
            with pytest.raises(MigrationError, match="stop-and-start") as caught:
                await new.apply_migrations(migration, partition_of=_partition, worker="new")
            assert f"fuser {path}.workers" in str(caught.value)
            assert await new.stored_classes() == ["Counter"]
            await old.close()
            applied = await new.apply_migrations(migration, partition_of=_partition, worker="new")
            assert [m.tag for m in applied] == ["v2"]
        finally:
            await old.close()
            await new.close()

    async def test_old_file_gets_the_table(self, tmp_path: Path) -> None:
        """A database made before migrations existed opens and records them."""
        path = tmp_path / "ndo.sqlite3"
        storage = SqliteStorage(path, partitions=PARTITIONS)
        await storage.open()
        await _put(storage, "Counter", "c1")
        await storage.close()
        with sqlite3.connect(path) as conn:
            conn.execute("DROP TABLE migrations")
        reopened = SqliteStorage(path, partitions=PARTITIONS)
        await reopened.open()
        try:
            assert await reopened.applied_migrations() == []
            await reopened.apply_migrations(
                [ClassMigration(tag="v2", deleted=("Counter",))],
                partition_of=_partition,
                worker="w",
            )
            assert await reopened.stored_classes() == []
        finally:
            await reopened.close()


class TestClassMigrationRecord:
    """``ClassMigration`` refuses declarations that conflict within one tag."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"tag": ""}, "tag"),
            ({"tag": "v2"}, "renames and deletes nothing"),
            ({"tag": "v2", "renamed": (("A", "B"), ("A", "C"))}, "A renamed from more than once"),
            ({"tag": "v2", "renamed": (("A", "C"), ("B", "C"))}, "C renamed to more than once"),
            ({"tag": "v2", "renamed": (("A", "A"),)}, "renamed to itself"),
            ({"tag": "v2", "renamed": (("A", "B"), ("B", "C"))}, "tag of its own"),
            ({"tag": "v2", "renamed": (("A", "B"),), "deleted": ("A",)}, "both deleted and"),
            ({"tag": "v2", "renamed": (("A", "B"),), "deleted": ("B",)}, "both deleted and"),
            ({"tag": "v2", "deleted": ("A", "A")}, "A deleted more than once"),
        ],
    )
    def test_conflicts(self, kwargs: dict[str, object], message: str) -> None:
        """Each conflict is a ValueError that says what is wrong."""
        with pytest.raises(ValueError, match=message):
            ClassMigration(**kwargs)  # type: ignore[arg-type]


class TestConfigFile:
    """``[[migrations]]`` in the ``ndo serve --config`` file, checked strictly."""

    def test_parsed(self, tmp_path: Path) -> None:
        """Tables become ``ClassMigration`` records, in file order, next to other options."""
        path = tmp_path / "ndo.toml"
        path.write_text(
            'data-dir = "/srv/ndo"\n'
            "[[migrations]]\n"
            'tag = "v2"\n'
            'renamed_classes = [{ from = "Counter", to = "Tally" }]\n'
            'deleted_classes = ["OldRoom"]\n'
            "[[migrations]]\n"
            'tag = "v3"\n'
            'deleted_classes = ["Tally"]\n'
        )
        values = load_config_file(path)
        assert values["data_dir"] == "/srv/ndo"
        assert values["migrations"] == (
            ClassMigration(tag="v2", renamed=(("Counter", "Tally"),), deleted=("OldRoom",)),
            ClassMigration(tag="v3", deleted=("Tally",)),
        )

    @pytest.mark.parametrize(
        ("toml", "message"),
        [
            ('migrations = ["v2"]', "array of tables"),
            ('[migrations]\ntag = "v2"', "array of tables"),
            ('[[migrations]]\ndeleted_classes = ["A"]', "needs a tag"),
            ('[[migrations]]\ntag = "v2"\ndeleted = ["A"]', "unknown key 'deleted'"),
            ('[[migrations]]\ntag = "v2"\nnew_classes = ["A"]', "needs no migration"),
            ('[[migrations]]\ntag = "v2"\ndeleted_classes = "A"', "list of class names"),
            (
                '[[migrations]]\ntag = "v2"\nrenamed_classes = [{ from = "A" }]',
                "renamed_classes must be a list",
            ),
            ('[[migrations]]\ntag = "v2"\ndeleted_classes = ["9lives"]', "invalid class name"),
            (
                '[[migrations]]\ntag = "v2"\ndeleted_classes = ["A"]\n'
                '[[migrations]]\ntag = "v2"\ndeleted_classes = ["B"]',
                "declared twice",
            ),
            (
                '[[migrations]]\ntag = "v2"\n'
                'renamed_classes = [{ from = "A", to = "B" }, { from = "B", to = "C" }]',
                "tag of its own",
            ),
            (
                '[[migrations]]\ntag = "v2"\n'
                'renamed_classes = [{ from = "A", to = "B" }]\ndeleted_classes = ["A"]',
                "both deleted and renamed",
            ),
            ('[[migrations]]\ntag = "v2"', "renames and deletes nothing"),
        ],
    )
    def test_invalid(self, tmp_path: Path, toml: str, message: str) -> None:
        """Each mistake is refused with a message that names it."""
        path = tmp_path / "ndo.toml"
        path.write_text(toml + "\n")
        with pytest.raises(ConfigFileError, match=message):
            load_config_file(path)

    def test_serve_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``ndo serve`` with an invalid migration stops before starting anything."""
        path = tmp_path / "ndo.toml"
        path.write_text('[[migrations]]\ntag = "v2"\ndeleted_classes = ["not-a-class"]\n')
        assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "d")]) == 2
        assert "invalid class name 'not-a-class'" in capsys.readouterr().err


def _config(nats_server: EmbeddedNatsServer, data_dir: Path, **kwargs: object) -> WorkerConfig:
    return WorkerConfig(
        nats_url=nats_server.url,
        data_dir=data_dir,
        partitions=PARTITIONS,
        **kwargs,  # type: ignore[arg-type]
    )


class TestWorkerStart:
    """``Worker.start`` applies migrations right after storage opens, then refuses orphans."""

    async def test_orphans_refused(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, client: ActorClient
    ) -> None:
        """Stored objects of a class nobody serves stop the start; the message names the
        classes and both ways out."""
        async with Worker(_config(nats_server, data_dir), [Counter, Reminder]):
            await client.get(Counter, "c1").increment(by=5)
            await client.get(Reminder, "r1").schedule(at=time.time() + 600)
        worker = Worker(_config(nats_server, data_dir), [Tally])
        with pytest.raises(OrphanClassesError) as caught:
            await worker.start()
        assert caught.value.classes == ("Counter", "Reminder")
        message = str(caught.value)
        assert "Counter, Reminder" in message
        assert "serve the module that defines them" in message
        assert "[[migrations]]" in message and 'from = "Counter"' in message
        assert isinstance(caught.value, ServiceError)

    async def test_rename_through_real_calls(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, client: ActorClient
    ) -> None:
        """After a rename the objects answer under the new class, their alarm fires there, and
        a restart (and a second worker) does not apply it again."""
        async with Worker(_config(nats_server, data_dir), [Counter, Reminder]):
            assert await client.get(Counter, "c1").increment(by=5) == 5
            await client.get(Reminder, "r1").schedule(at=time.time() + 1.5)
        with capture_logs() as logs:
            async with Worker(
                _config(nats_server, data_dir), [Tally, Chime], migrations=[RENAME]
            ) as worker:
                [applied] = worker.applied_migrations
                assert (applied.tag, applied.objects_renamed, applied.objects_deleted) == (
                    "v2",
                    2,
                    0,
                )
                assert await client.get(Tally, "c1").get() == 5
                assert await client.get(Tally, "c1").increment(by=1) == 6
                fired: list[list[float]] = []

                async def chime_fired() -> bool:
                    fired[:] = await client.get(Chime, "r1").fired()
                    return bool(fired)

                async with asyncio.timeout(15):
                    while not await chime_fired():  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
                assert fired[0][1] == 1
        events = [e for e in logs if e["event"] == "class migration applied"]
        assert [(e["tag"], e["objects_renamed"]) for e in events] == [("v2", 2)]
        with capture_logs() as logs:
            async with (
                Worker(_config(nats_server, data_dir), [Tally, Chime], migrations=[RENAME]) as one,
                Worker(_config(nats_server, data_dir), [Tally, Chime], migrations=[RENAME]) as two,
            ):
                assert one.applied_migrations == two.applied_migrations == [applied]
                assert await client.get(Tally, "c1").get() == 6
        assert not [e for e in logs if e["event"] == "class migration applied"]

    async def test_delete_removes_data_and_alarms(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, client: ActorClient
    ) -> None:
        """A deleted class's keys and alarms are gone; the served classes keep theirs."""
        async with Worker(_config(nats_server, data_dir), [Counter, Reminder]):
            await client.get(Counter, "c1").increment(by=2)
            await client.get(Reminder, "r1").schedule(at=time.time() + 600)
        delete = ClassMigration(tag="v2", deleted=("Reminder",))
        async with Worker(_config(nats_server, data_dir), [Counter], migrations=[delete]) as w:
            assert [m.objects_deleted for m in w.applied_migrations] == [1]
            assert await w.storage.stored_classes() == ["Counter"]
            assert await w.storage.read_alarm("Reminder", "r1") is None
            assert await client.get(Counter, "c1").get() == 2

    async def test_refused_while_old_worker_runs(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, client: ActorClient
    ) -> None:
        """A worker of the old code on the same data directory keeps a migration from being
        applied (it would write the old class back): the new one refuses to start."""
        async with Worker(_config(nats_server, data_dir), [Counter, Reminder]):
            await client.get(Counter, "c1").increment()
            storage = SqliteStorage(
                data_dir / "ndo.sqlite3", partitions=PARTITIONS, write_lock_timeout=0.5
            )
            worker = Worker(
                _config(nats_server, data_dir), [Tally, Chime], storage=storage, migrations=[RENAME]
            )
            with pytest.raises(MigrationError, match="stop every worker of this data directory"):
                await worker.start()
            assert await client.get(Counter, "c1").get() == 1

    async def test_replicated_storage_refuses_pending(
        self, nats_server: EmbeddedNatsServer, data_dir: Path
    ) -> None:
        """With replicated storage a pending migration is refused, saying why."""
        worker = Worker(
            _config(nats_server, data_dir, storage="replicated"), [Tally], migrations=[RENAME]
        )
        with pytest.raises(MigrationError, match="cannot be applied with --storage replicated"):
            await worker.start()

    def test_invalid_declaration(self, nats_server: EmbeddedNatsServer, data_dir: Path) -> None:
        """In-process users get the config file's checks as a ValueError."""
        bad = ClassMigration(tag="v2", deleted=("no-such name",))
        with pytest.raises(ValueError, match="invalid class name"):
            Worker(_config(nats_server, data_dir), [Counter], migrations=[bad])
        twice = [ClassMigration(tag="v2", deleted=("A",)), ClassMigration(tag="v2", deleted=("B",))]
        with pytest.raises(ValueError, match="declared twice"):
            Worker(_config(nats_server, data_dir), [Counter], migrations=twice)


async def _status(nats_url: str, *args: str) -> str:
    result = await asyncio.to_thread(run_ndo, "status", "--nats-url", nats_url, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


class TestStatus:
    """``ndo status`` shows the applied migrations, with and without a lease bucket."""

    async def _migrated(
        self, nats_server: EmbeddedNatsServer, data_dir: Path, client: ActorClient, **kwargs: object
    ) -> Worker:
        async with Worker(_config(nats_server, data_dir, **kwargs), [Counter, Reminder]):
            await client.get(Counter, "c1").increment()
        return Worker(_config(nats_server, data_dir, **kwargs), [Tally, Chime], migrations=[RENAME])

    @pytest.mark.parametrize("ownership", ["leases", "standalone"])
    async def test_shown(
        self,
        nats_server: EmbeddedNatsServer,
        data_dir: Path,
        client: ActorClient,
        ownership: str,
    ) -> None:
        """The text form has a class migrations table; ``--json`` the records."""
        worker = await self._migrated(nats_server, data_dir, client, ownership=ownership)
        async with worker:
            text = await _status(nats_server.url)
            assert "class migrations (applied once each, in this order):" in text
            [row] = [line for line in text.splitlines() if line.startswith("v2 ")]
            assert worker.name in row
            assert "renamed Counter -> Tally, renamed Reminder -> Chime" in row
            assert "1 renamed, 0 deleted" in row
            data = json.loads(await _status(nats_server.url, "--json"))
            migrations = (
                data["migrations"] if ownership == "leases" else data["workers"][0]["migrations"]
            )
            assert [
                (m["tag"], m["worker"], m["renamed"], m["objects_renamed"]) for m in migrations
            ] == [
                (
                    "v2",
                    worker.name,
                    [{"from": "Counter", "to": "Tally"}, {"from": "Reminder", "to": "Chime"}],
                    1,
                )
            ]

    async def test_none_applied(self, nats_server: EmbeddedNatsServer, data_dir: Path) -> None:
        """Workers that applied nothing say so."""
        async with Worker(_config(nats_server, data_dir), [Counter]):
            assert "class migrations: none applied" in await _status(nats_server.url)


class TestServeCommand:
    """``ndo serve`` refuses orphaned classes (exit 1) and applies the config file's
    migrations."""

    async def _ghost(self, data_dir: Path) -> None:
        storage = SqliteStorage(data_dir / "ndo.sqlite3", partitions=PARTITIONS)
        await storage.open()
        try:
            await _put(storage, "Ghost", "g1", alarm=time.time() + 600)
        finally:
            await storage.close()

    async def test_refuses_then_migrates(self, tmp_path: Path) -> None:
        """An orphaned class stops ``ndo serve`` with its name; a config file that deletes it
        lets the worker start, and ``ndo status`` shows the migration."""
        data_dir = tmp_path / "data"
        await self._ghost(data_dir)
        port = free_port()
        args = ("--port", str(port), "--data-dir", str(data_dir), "--partitions", str(PARTITIONS))
        refused = await asyncio.to_thread(run_ndo, "serve", *args, "--log-format", "json")
        assert refused.returncode == 1
        assert "Ghost" in refused.stderr and "[[migrations]]" in refused.stderr
        config = tmp_path / "ndo.toml"
        config.write_text('[[migrations]]\ntag = "drop-ghost"\ndeleted_classes = ["Ghost"]\n')
        with ServeProcess(*args, "--config", str(config)) as serve:
            await serve.async_wait_serving()
            [event] = serve.events("class migration applied")
            assert (event["tag"], event["objects_deleted"]) == ("drop-ghost", 1)
            text = await _status(f"nats://127.0.0.1:{port}")
            assert "drop-ghost" in text and "deleted Ghost" in text
            serve.send_signal(signal.SIGTERM)
            assert await serve.async_wait(20) == 0
