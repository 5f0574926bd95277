"""Security against real nats-servers: hostile reply subjects, least-privilege users, accounts.

Three layouts, each on servers of its own:

* **Hostile replies** — a stock server (no auth) with the partition mapping: a client names
  JetStream, journal, event and API subjects as reply subjects and the worker must write nothing
  there, run nothing, keep serving, and count each refusal.
* **One account, least privilege** — ``authorization { users = [...] }`` built from
  ``ops._permissions``: the worker serves under ``worker_permissions`` (local and replicated
  storage) without a single violation, a get-only caller is refused everything else at once, and
  the tools user reads ``ndo status``.
* **Accounts** — workers in a ``WORKERS`` account that holds the partition mapping and exports
  ``ndo.rpc.>``; callers in ``APP1`` / ``APP2`` import it with ``share: true``. The server applies
  the exporting account's mapping to imported requests, keeps the accounts apart, and writes the
  ``Nats-Request-Info`` header that ``Actor.caller`` reads (over any forged copy).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from ndo.actors import (
    Actor,
    ActorClient,
    PermissionDeniedError,
    RetryPolicy,
    method,
)
from ndo.examples import ChatMessage, ChatRoom, Counter
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.ops._permissions import (
    Permissions,
    admin_permissions,
    caller_permissions,
    render_user,
    tools_permissions,
    worker_permissions,
)
from ndo.service import (
    CONFIG_KEY,
    NatsAuth,
    RoutingMode,
    Worker,
    WorkerConfig,
    lease_bucket,
    lease_key,
    server_mapping,
)
from ndo.service.journal import journal_stream_name
from ndo.subjects import journal_subject, partition_of, rpc_subject
from tests.helpers import eventually, run_ndo
from tests.worker_fixtures import worker_factory

PREFIX = "ndo"
PARTITIONS = 8
LEASES = lease_bucket(PREFIX)
JOURNAL = journal_stream_name(PREFIX)
MAPPING = dict([server_mapping(PREFIX, PARTITIONS)])

WORKER_PASSWORD = "worker-secret"
CALLER_PASSWORD = "caller-secret"
APP_PASSWORD = "app-secret"
TOOLS_PASSWORD = "tools-secret"
ADMIN_PASSWORD = "admin-secret"

REFUSED_AT_ONCE = 5.0
"""Seconds within which a refused call must fail; its timeout (10 s) and retries would take far
longer, so this separates "refused by the server" from "timed out after retries"."""

NatsServerFactory = Callable[..., Awaitable[EmbeddedNatsServer]]
WorkerStarter = Callable[..., Awaitable[Worker]]
Connector = Callable[..., Awaitable[NatsClient]]


class Whoami(Actor):
    """Tells who called it, as ``Actor.caller`` has it."""

    @method
    async def who(self) -> dict[str, str] | None:
        caller = self.caller
        if caller is None:
            return None
        return {"account": caller.account, "user": caller.user, "name": caller.name}


CLASSES: list[type[Actor]] = [Counter, ChatRoom, Whoami]


def object_in(partition: int, class_name: str = "Counter", stem: str = "obj") -> str:
    """An object id of ``class_name`` that lives in ``partition``."""
    for n in range(10_000):
        candidate = f"{stem}{n}"
        if partition_of(class_name, candidate, PARTITIONS) == partition:
            return candidate
    raise AssertionError(f"no id found for partition {partition}")


def rejected(worker: Worker) -> float:
    """``ndo_rejected_total{reason="reply_subject"}`` of ``worker`` (0 before the first)."""
    value = worker.metrics.registry.get_sample_value(
        "ndo_rejected_total", {"reason": "reply_subject"}
    )
    return value or 0.0


class Recorder:
    """A core subscription's messages, collected for later checks."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def handle(self, msg: Msg) -> None:
        self.messages.append(msg)

    @property
    def subjects(self) -> list[str]:
        return [msg.subject for msg in self.messages]


class Violations:
    """An ``error_cb`` that keeps the subjects of refused publishes (lowercased, as nats-py
    reports them) and the text of every other error."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.others: list[str] = []

    async def handle(self, error: Exception) -> None:
        text = str(error)
        marker = 'permissions violation for publish to "'
        if marker in text.lower():
            self.subjects.append(text.lower().split(marker, 1)[1].rstrip('"'))
        else:
            self.others.append(text)


@pytest.fixture(name="start_worker_on")
async def _start_worker_on(tmp_path: Path) -> AsyncIterator[WorkerStarter]:
    """Factory: ``await start_worker_on(url, **config)`` starts a worker serving ``CLASSES``
    and waits until it serves every partition; all are stopped at the end."""

    def base(started: int) -> WorkerConfig:
        return WorkerConfig(
            data_dir=tmp_path / "data", partitions=PARTITIONS, worker_name=f"w{started}"
        )

    async with worker_factory(base, CLASSES) as start_worker:

        async def start(url: str, **overrides: Any) -> Worker:
            worker = await start_worker(nats_url=url, **overrides)
            await eventually(lambda: worker.partitions == frozenset(range(PARTITIONS)), timeout=10)
            return worker

        yield start


@pytest.fixture(name="connect")
async def _connect() -> AsyncIterator[Connector]:
    """Factory: ``await connect(url, **nats_connect_kwargs)``; connections close at the end."""
    connections: list[NatsClient] = []

    async def open_connection(url: str, **kwargs: Any) -> NatsClient:
        kwargs.setdefault("allow_reconnect", False)
        nc = await nats.connect(url, **kwargs)
        connections.append(nc)
        return nc

    try:
        yield open_connection
    finally:
        for nc in reversed(connections):
            await nc.close()


def client_of(nc: NatsClient, *, timeout: float = 5.0) -> ActorClient:
    """An ``ActorClient`` on ``nc`` with short retries (a fresh worker answers "moving")."""
    return ActorClient(nc, timeout=timeout, retry=RetryPolicy(attempts=5, initial_backoff=0.05))


# Hostile reply subjects


HOSTILE_REPLIES = (
    f"$KV.{LEASES}.{lease_key(3)}",
    f"$KV.{LEASES}.{CONFIG_KEY}",
    journal_subject(PREFIX, 3),
    f"{PREFIX}.evt.Counter.x.hacked",
    f"$JS.API.STREAM.DELETE.{JOURNAL}",
)
"""Reply subjects an attacker would like the worker to write to with its own rights."""


@pytest.fixture(name="mapped_server")
async def _mapped_server(make_nats_server: NatsServerFactory) -> EmbeddedNatsServer:
    """A stock server (no auth) with the partition mapping."""
    return await make_nats_server(mappings=MAPPING)


class TestHostileReplySubjects:
    """A worker answers inboxes only: a request naming any other reply subject is dropped
    unrun and counted, whatever the subject, and the worker keeps serving."""

    @pytest.fixture(name="worker")
    async def _worker(
        self, mapped_server: EmbeddedNatsServer, start_worker_on: WorkerStarter
    ) -> Worker:
        # Leases renewed every 20 s: their revisions stay put for the length of a test.
        worker = await start_worker_on(mapped_server.url, lease_ttl=60)
        assert worker.routing_mode is RoutingMode.MAPPED
        return worker

    async def _send_hostile(self, nc: NatsClient, target: str) -> int:
        """Publish a bad-method and a good-method request to ``target`` (a Counter id) for each
        hostile reply, and two discovery requests; returns how many were sent."""
        sent = 0
        for reply in HOSTILE_REPLIES:
            await nc.publish(rpc_subject(PREFIX, "Counter", target, "nope"), b"", reply=reply)
            await nc.publish(
                rpc_subject(PREFIX, "Counter", target, "increment"), b'{"by": 5}', reply=reply
            )
            sent += 2
        await nc.publish("$SRV.PING", b"", reply=HOSTILE_REPLIES[0])
        await nc.publish("$SRV.INFO.ndo", b"", reply=HOSTILE_REPLIES[1])
        await nc.flush()
        return sent + 2

    async def test_nothing_is_written_where_a_hostile_reply_points(
        self, worker: Worker, mapped_server: EmbeddedNatsServer, connect: Connector
    ) -> None:
        """No lease, config, journal or event write and no stream deletion follows a request
        whose reply subject names them."""
        target = object_in(3)
        spy = await connect(mapped_server.url)
        js = spy.jetstream()
        kv = await js.key_value(LEASES)
        client = client_of(spy)
        assert await client.get(Counter, target).call(Counter.get) == 0  # reads: not journaled
        lease_before = await kv.get(lease_key(3))
        config_before = await kv.get(CONFIG_KEY)
        journal_before = (await js.stream_info(JOURNAL)).state.messages
        recorder = Recorder()
        for subject in (
            f"$KV.{LEASES}.>",
            journal_subject(PREFIX),
            f"{PREFIX}.evt.>",
            "$JS.API.STREAM.DELETE.>",
        ):
            await spy.subscribe(subject, cb=recorder.handle)
        await spy.flush()

        attacker = await connect(mapped_server.url)
        sent = await self._send_hostile(attacker, target)
        await eventually(lambda: rejected(worker) == sent, timeout=5)
        # A round trip through the worker after the last hostile request.
        assert await client.get(Counter, target).call(Counter.get) == 0
        await spy.flush()

        assert recorder.subjects == []
        assert (await kv.get(lease_key(3))).revision == lease_before.revision
        assert (await kv.get(CONFIG_KEY)).revision == config_before.revision
        info = await js.stream_info(JOURNAL)  # raises NotFoundError if it had been deleted
        assert info.state.messages == journal_before
        # The journal still records legitimate turns.
        assert await client.get(Counter, target).call(Counter.increment) == 1
        for _ in range(100):
            if (await js.stream_info(JOURNAL)).state.messages > journal_before:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("a legitimate increment was never journaled")

    async def test_hostile_requests_are_not_run_and_are_counted(
        self, worker: Worker, mapped_server: EmbeddedNatsServer, connect: Connector
    ) -> None:
        """A hostile-reply ``increment`` is not applied, each refusal is counted in
        ``ndo_rejected_total{reason="reply_subject"}``, and every partition is still served."""
        target = object_in(3)
        nc = await connect(mapped_server.url)
        client = client_of(nc)
        assert await client.get(Counter, target).call(Counter.increment, by=7) == 7
        before = rejected(worker)

        sent = await self._send_hostile(nc, target)
        await eventually(lambda: rejected(worker) == before + sent, timeout=5)

        assert sent == 12
        assert await client.get(Counter, target).call(Counter.get) == 7
        assert worker.partitions == frozenset(range(PARTITIONS))
        for partition in range(PARTITIONS):
            other = object_in(partition, stem="after")
            assert await client.get(Counter, other).call(Counter.increment) == 1
        assert rejected(worker) == before + sent

    async def test_inbox_replies_are_answered(
        self, worker: Worker, mapped_server: EmbeddedNatsServer, connect: Connector
    ) -> None:
        """Requests replying to ``_INBOX.`` subjects are answered: nats-py's own requests, a
        reply subject the client subscribed to itself, and discovery requests."""
        target = object_in(3)
        nc = await connect(mapped_server.url)
        subject = rpc_subject(PREFIX, "Counter", target, "increment")

        answer = await nc.request(subject, b"", timeout=5)
        assert answer.data == b"1"

        replies = await nc.subscribe("_INBOX.mine.1")
        await nc.publish(subject, b"", reply="_INBOX.mine.1")
        reply = await replies.next_msg(timeout=5)
        assert reply.data == b"2"

        ping = await nc.request("$SRV.PING.ndo", b"", timeout=5)
        assert json.loads(ping.data)["name"] == "ndo"
        assert rejected(worker) == 0

    async def test_clients_cannot_name_service_import_replies(
        self, worker: Worker, mapped_server: EmbeddedNatsServer, connect: Connector
    ) -> None:
        """The server itself refuses a client's request whose reply subject starts with
        ``_R_.`` (its own prefix for replies across a service import), so the worker's
        allowance of ``_R_.`` opens nothing to a client; the request never reaches the worker."""
        violations = Violations()
        nc = await connect(mapped_server.url, error_cb=violations.handle)
        target = object_in(3)
        replies = await nc.subscribe("_R_.x")

        await nc.publish(rpc_subject(PREFIX, "Counter", target, "increment"), b"", reply="_R_.x")
        await nc.flush()

        await eventually(lambda: bool(violations.others), timeout=5)
        assert violations.others == [
            'nats: permissions violation for publish with reply of "_r_.x"'
        ]
        assert await client_of(nc).get(Counter, target).call(Counter.get) == 0
        assert replies.pending_msgs == 0
        assert rejected(worker) == 0


# One account, least privilege


def authorization(*users: tuple[Permissions, str, str]) -> str:
    """An ``authorization`` block with one user per ``(permissions, user, password)``."""
    entries = ",\n".join(render_user(p, user=user, password=pw) for p, user, pw in users)
    return f"authorization {{\n  users = [\n{entries}\n  ]\n}}"


SECURED_USERS = (
    (worker_permissions(PREFIX), "worker", WORKER_PASSWORD),
    (caller_permissions(PREFIX, ["Counter"], ["get"]), "caller", CALLER_PASSWORD),
    (caller_permissions(PREFIX), "app", APP_PASSWORD),
    (tools_permissions(PREFIX), "tools", TOOLS_PASSWORD),
    (admin_permissions(PREFIX), "admin", ADMIN_PASSWORD),
)
"""The deployment's users: the worker, a get-only caller, a caller of everything, the tools,
an operator who may change objects with ``ndo inspect``."""

WORKER_AUTH = NatsAuth(user="worker", password=WORKER_PASSWORD)


@pytest.fixture(name="secured_server")
async def _secured_server(make_nats_server: NatsServerFactory) -> EmbeddedNatsServer:
    """One account, a user per role with exactly ``ops._permissions``' rights, and the
    partition mapping."""
    return await make_nats_server(mappings=MAPPING, extra_config=authorization(*SECURED_USERS))


class TestLeastPrivilege:
    """Each role works with exactly the permissions ``ndo permissions`` prints, and a caller
    is refused at once whatever lies outside them."""

    async def test_worker_serves_with_local_storage(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter, connect: Connector
    ) -> None:
        """A worker under ``worker_permissions`` starts, serves and journals with local storage
        without a single permission violation."""
        worker = await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        assert worker.routing_mode is RoutingMode.MAPPED
        client = client_of(await connect(secured_server.url, user="app", password=APP_PASSWORD))

        for n in range(1, 4):
            for partition in range(PARTITIONS):
                stub = client.get(Counter, object_in(partition))
                assert await stub.call(Counter.increment) == n
        await eventually(
            lambda: worker.metrics.registry.get_sample_value("ndo_journal_records_total") == 24
        )
        assert worker.nc.last_error is None

    async def test_worker_serves_with_replicated_storage(
        self,
        secured_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
        tmp_path: Path,
    ) -> None:
        """With replicated storage the worker appends, snapshots and purges its logs, and a
        second worker with an empty data directory restores from them, all without a
        permission violation."""
        options: dict[str, Any] = {
            "auth": WORKER_AUTH,
            "storage": "replicated",
            "snapshot_every": 3,
            "lease_ttl": 2,
        }
        first = await start_worker_on(secured_server.url, data_dir=tmp_path / "one", **options)
        client = client_of(await connect(secured_server.url, user="app", password=APP_PASSWORD))
        ids = [object_in(p) for p in (0, 3, 5)]
        for _ in range(4):
            for object_id in ids:
                await client.get(Counter, object_id).call(Counter.increment)
        await eventually(
            lambda: (first.metrics.registry.get_sample_value("ndo_snapshots_total") or 0) >= 3,
            timeout=10,
        )
        assert first.nc.last_error is None
        await first.stop()

        second = await start_worker_on(secured_server.url, data_dir=tmp_path / "two", **options)
        for object_id in ids:
            assert await client.get(Counter, object_id).call(Counter.get) == 4
        assert await client.get(Counter, ids[0]).call(Counter.increment) == 5
        assert second.nc.last_error is None

    async def test_caller_may_get(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter, connect: Connector
    ) -> None:
        """The get-only caller reads objects in every partition."""
        await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        nc = await connect(secured_server.url, user="caller", password=CALLER_PASSWORD)
        client = client_of(nc)
        for partition in range(PARTITIONS):
            assert await client.get(Counter, object_in(partition)).call(Counter.get) == 0
        assert nc.last_error is None

    async def test_refused_call_fails_at_once(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter, connect: Connector
    ) -> None:
        """``increment`` from the get-only caller raises ``PermissionDeniedError`` naming the
        subject, in one round trip instead of a 10 s timeout times the retries."""
        await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        nc = await connect(secured_server.url, user="caller", password=CALLER_PASSWORD)
        client = ActorClient(nc, timeout=10)
        target = object_in(3)

        started = time.monotonic()
        with pytest.raises(PermissionDeniedError) as caught:
            await client.get(Counter, target).call(Counter.increment)
        elapsed = time.monotonic() - started

        assert elapsed < REFUSED_AT_ONCE
        assert caught.value.code == 403
        assert f"ndo.rpc.Counter.{target}.increment" in str(caught.value)
        assert await client.get(Counter, target).call(Counter.get) == 0

    async def test_ndo_call_refused_exits_1_at_once(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter
    ) -> None:
        """``ndo call ... increment --nats-user caller`` prints the refusal and exits 1."""
        await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        target = object_in(3)
        args = (
            "--nats-url",
            secured_server.url,
            "--nats-user",
            "caller",
            "--nats-password",
            CALLER_PASSWORD,
            "--timeout",
            "10",
        )

        started = time.monotonic()
        result = await asyncio.to_thread(run_ndo, "call", "Counter", target, "increment", *args)
        elapsed = time.monotonic() - started

        assert result.returncode == 1, result.stderr
        assert "permission" in result.stderr.lower()
        assert f"ndo.rpc.Counter.{target}.increment" in result.stderr
        assert elapsed < REFUSED_AT_ONCE
        allowed = await asyncio.to_thread(run_ndo, "call", "Counter", target, "get", *args)
        assert (allowed.returncode, allowed.stdout.strip()) == (0, "0"), allowed.stderr

    async def test_caller_cannot_reach_internal_subjects(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter, connect: Connector
    ) -> None:
        """Partition, forward, journal, KV and JetStream API subjects are refused to a caller."""
        await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        violations = Violations()
        nc = await connect(
            secured_server.url, user="caller", password=CALLER_PASSWORD, error_cb=violations.handle
        )
        forbidden = [
            f"{PREFIX}.part.3.Counter.x.increment",
            f"{PREFIX}.sys.fwd.3.Counter.x.get",
            journal_subject(PREFIX, 1),
            f"$KV.{LEASES}.{lease_key(3)}",
            f"$JS.API.STREAM.INFO.{JOURNAL}",
        ]
        for subject in forbidden:
            await nc.publish(subject, b"x", reply="_INBOX.caller.1")
        await nc.flush()

        await eventually(lambda: len(violations.subjects) == len(forbidden), timeout=5)
        assert violations.subjects == [s.lower() for s in forbidden]
        assert violations.others == []
        assert not nc.is_closed

    async def test_tools_user_reads_status_and_writes_nothing(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter, connect: Connector
    ) -> None:
        """``ndo status`` as the tools user prints the partitions table; the same user may
        not write a lease or delete the journal."""
        worker = await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        result = await asyncio.to_thread(
            run_ndo,
            "status",
            "--nats-url",
            secured_server.url,
            "--nats-user",
            "tools",
            "--nats-password",
            TOOLS_PASSWORD,
        )
        assert result.returncode == 0, result.stderr
        assert "PARTITION" in result.stdout and "HOLDER" in result.stdout
        assert worker.member_id is not None
        table = [line.split() for line in result.stdout.splitlines()]
        held = {
            int(row[0]) for row in table if row and row[0].isdigit() and worker.member_id in row
        }
        assert held == set(range(PARTITIONS))

        violations = Violations()
        nc = await connect(
            secured_server.url, user="tools", password=TOOLS_PASSWORD, error_cb=violations.handle
        )
        for subject in (f"$KV.{LEASES}.{lease_key(3)}", f"$JS.API.STREAM.DELETE.{JOURNAL}"):
            await nc.publish(subject, b"{}")
        await nc.flush()
        await eventually(lambda: len(violations.subjects) == 2, timeout=5)

    async def test_tools_inspect_and_only_admins_change_objects(
        self, secured_server: EmbeddedNatsServer, start_worker_on: WorkerStarter, connect: Connector
    ) -> None:
        """The tools user lists and shows objects with ``ndo inspect`` but is refused a delete
        at once; the admin user deletes."""
        await start_worker_on(secured_server.url, auth=WORKER_AUTH)
        client = client_of(await connect(secured_server.url, user="app", password=APP_PASSWORD))
        target = object_in(2)
        await client.get(Counter, target).call(Counter.increment, by=3)

        def inspect(user: str, password: str, *args: str) -> subprocess.CompletedProcess[str]:
            return run_ndo(
                "inspect",
                *args,
                "--nats-url",
                secured_server.url,
                "--nats-user",
                user,
                "--nats-password",
                password,
            )

        listed = await asyncio.to_thread(inspect, "tools", TOOLS_PASSWORD, "objects", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["total"] == 1
        shown = await asyncio.to_thread(inspect, "tools", TOOLS_PASSWORD, "show", "Counter", target)
        assert shown.returncode == 0 and "value" in shown.stdout
        refused = await asyncio.to_thread(
            inspect, "tools", TOOLS_PASSWORD, "delete", "Counter", target
        )
        assert refused.returncode == 1 and "ermission" in refused.stderr
        assert await client.get(Counter, target).call(Counter.get) == 3
        deleted = await asyncio.to_thread(
            inspect, "admin", ADMIN_PASSWORD, "delete", "Counter", target
        )
        assert deleted.returncode == 0, deleted.stderr
        assert await client.get(Counter, target).call(Counter.get) == 0

    async def test_worker_without_a_permission_says_so(
        self,
        make_nats_server: NatsServerFactory,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """A worker whose user may not publish events logs an error that names the missing
        permission and where the needed ones are listed."""
        full = worker_permissions(PREFIX)
        publish = [s for s in full.publish if s != f"{PREFIX}.>"]
        publish += [f"{PREFIX}.rpc.>", f"{PREFIX}.part.>", f"{PREFIX}.sys.>"]
        no_events = Permissions(tuple(publish), full.subscribe)
        server = await make_nats_server(
            mappings=MAPPING,
            extra_config=authorization((no_events, "worker", WORKER_PASSWORD), SECURED_USERS[2]),
        )
        worker = await start_worker_on(server.url, auth=WORKER_AUTH)
        client = client_of(await connect(server.url, user="app", password=APP_PASSWORD))

        with capture_logs() as logs:
            posted = await client.get(ChatRoom, "room").call(ChatRoom.post, "ann", "hi")
            assert isinstance(posted, ChatMessage)
            await eventually(lambda: worker.nc.last_error is not None, timeout=5)

        errors = [entry for entry in logs if entry["log_level"] == "error"]
        assert len(errors) == 1, logs
        assert "ndo permissions worker" in errors[0]["event"]
        assert "ndo.evt.chatroom.room.message" in errors[0]["error"]


# Accounts


def accounts_config(share: bool = True) -> str:
    """Workers in ``WORKERS`` (JetStream, the partition mapping, the exports), callers in
    ``APP1`` (RPC and events) and ``APP2`` (RPC only)."""
    source, destination = server_mapping(PREFIX, PARTITIONS)
    worker = render_user(worker_permissions(PREFIX), user="worker", password=WORKER_PASSWORD)
    insider = render_user(caller_permissions(PREFIX), user="insider", password=APP_PASSWORD)
    app1 = render_user(caller_permissions(PREFIX, events=True), user="app1", password=APP_PASSWORD)
    shared = "true" if share else "false"
    return f"""
accounts {{
  WORKERS: {{
    jetstream: enabled
    users: [
{worker},
{insider}
    ]
    mappings {{
      "{source}": "{destination}"
    }}
    exports: [
      {{ service: "{PREFIX}.rpc.>" }}
      {{ stream: "{PREFIX}.evt.>" }}
    ]
  }}
  APP1: {{
    users: [
{app1}
    ]
    imports: [
      {{ service: {{ account: WORKERS, subject: "{PREFIX}.rpc.>" }}, share: {shared} }}
      {{ stream: {{ account: WORKERS, subject: "{PREFIX}.evt.>" }} }}
    ]
  }}
  APP2: {{
    users: [ {{ user: app2, password: "{APP_PASSWORD}" }} ]
    imports: [
      {{ service: {{ account: WORKERS, subject: "{PREFIX}.rpc.>" }}, share: {shared} }}
    ]
  }}
}}
"""


FORGED_INFO = json.dumps({"acc": "WORKERS", "user": "admin"})
"""A ``Nats-Request-Info`` header a client writes itself, claiming to be the workers' admin."""


class TestAccounts:
    """Workers in an account of their own serve callers in other accounts through a service
    import; the server keeps the accounts apart and vouches for who is calling."""

    @pytest.fixture(name="accounts_server")
    async def _accounts_server(self, make_nats_server: NatsServerFactory) -> EmbeddedNatsServer:
        return await make_nats_server(extra_config=accounts_config())

    async def _app1(self, server: EmbeddedNatsServer, connect: Connector) -> NatsClient:
        return await connect(server.url, user="app1", password=APP_PASSWORD, name="app-one")

    async def test_imported_calls_are_answered(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """The WORKERS account's mapping applies to imported requests: the worker routes
        ``mapped`` and answers APP1's calls to objects in every partition, without violations."""
        worker = await start_worker_on(accounts_server.url, auth=WORKER_AUTH)
        assert worker.routing_mode is RoutingMode.MAPPED
        spy = await connect(accounts_server.url, user="worker", password=WORKER_PASSWORD)
        arrived = Recorder()
        await spy.subscribe(f"{PREFIX}.part.>", cb=arrived.handle)
        await spy.flush()
        nc = await self._app1(accounts_server, connect)
        client = client_of(nc)

        for partition in range(PARTITIONS):
            stub = client.get(Counter, object_in(partition))
            assert await stub.call(Counter.increment, by=partition + 1) == partition + 1
            assert await stub.call(Counter.get) == partition + 1
        assert worker.nc.last_error is None
        assert nc.last_error is None
        # Mapped in WORKERS, and answered through the server's _R_. reply subjects.
        assert len(arrived.messages) == 2 * PARTITIONS
        assert {int(msg.subject.split(".")[2]) for msg in arrived.messages} == set(
            range(PARTITIONS)
        )
        assert all(msg.reply.startswith("_R_.") for msg in arrived.messages)

    async def test_only_the_exported_subjects_are_reachable(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """APP1's partition subjects are its own: a request there reaches no worker."""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH)
        nc = await self._app1(accounts_server, connect)
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(f"{PREFIX}.part.3.Counter.{object_in(3)}.increment", b"", timeout=5)

    async def test_events_reach_the_importing_account(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """APP1 receives its objects' events through the stream import."""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH)
        nc = await self._app1(accounts_server, connect)
        events = await nc.subscribe(f"{PREFIX}.evt.ChatRoom.lobby.>")
        await nc.flush()

        await client_of(nc).get(ChatRoom, "lobby").call(ChatRoom.post, "ann", "hello")

        event = await events.next_msg(timeout=5)
        assert event.subject == f"{PREFIX}.evt.ChatRoom.lobby.message"
        assert json.loads(event.data)["text"] == "hello"

    async def test_other_account_sees_no_traffic(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """APP2, subscribed to ``>``, sees none of APP1's requests, replies or events."""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH)
        app2 = await connect(accounts_server.url, user="app2", password=APP_PASSWORD)
        seen = Recorder()
        await app2.subscribe(">", cb=seen.handle)
        await app2.flush()

        client = client_of(await self._app1(accounts_server, connect))
        for n in range(5):
            await client.get(Counter, f"secret{n}").call(Counter.increment)
        await client.get(ChatRoom, "secret").call(ChatRoom.post, "ann", "psst")
        await app2.publish("app2.sentinel", b"")
        await eventually(lambda: "app2.sentinel" in seen.subjects, timeout=5)

        assert seen.subjects == ["app2.sentinel"]
        # APP2 calls the same objects through its own import.
        assert await client_of(app2).get(Counter, "secret0").call(Counter.get) == 1

    async def test_caller_names_the_importing_account(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """With ``caller_info=True`` the handler sees APP1's account, user and connection name."""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH, caller_info=True)
        client = client_of(await self._app1(accounts_server, connect))
        app2 = client_of(await connect(accounts_server.url, user="app2", password=APP_PASSWORD))

        who = await client.get(Whoami, "me").call(Whoami.who)
        assert who == {"account": "APP1", "user": "app1", "name": "app-one"}
        other = await app2.get(Whoami, "me").call(Whoami.who)
        assert other == {"account": "APP2", "user": "app2", "name": ""}

    async def test_caller_is_none_by_default(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """Without ``caller_info`` the handler sees no caller, though the server sent one."""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH)
        client = client_of(await self._app1(accounts_server, connect))
        assert await client.get(Whoami, "me").call(Whoami.who) is None

    async def test_forged_request_info_is_overwritten(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """A ``Nats-Request-Info`` header APP1 writes itself claiming WORKERS/admin is replaced
        by the server on the way through the import: the handler sees APP1."""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH, caller_info=True)
        nc = await self._app1(accounts_server, connect)

        assert await _who_with_forged_header(nc) == {
            "account": "APP1",
            "user": "app1",
            "name": "app-one",
        }

    async def test_forged_request_info_inside_the_workers_account_is_believed(
        self,
        accounts_server: EmbeddedNatsServer,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """A client of the WORKERS account itself publishes straight to the RPC subjects, with
        no import to rewrite the header: the handler believes whatever it says. (Why
        ``caller_info`` is for deployments where only the workers live in that account.)"""
        await start_worker_on(accounts_server.url, auth=WORKER_AUTH, caller_info=True)
        nc = await connect(accounts_server.url, user="insider", password=APP_PASSWORD)

        assert await _who_with_forged_header(nc) == {
            "account": "WORKERS",
            "user": "admin",
            "name": "",
        }

    async def test_unshared_import_still_names_the_account(
        self,
        make_nats_server: NatsServerFactory,
        start_worker_on: WorkerStarter,
        connect: Connector,
    ) -> None:
        """With ``share: false`` the server still replaces the header, with the account only
        (a forged one included): the handler sees APP1 and no user."""
        server = await make_nats_server(extra_config=accounts_config(share=False))
        await start_worker_on(server.url, auth=WORKER_AUTH, caller_info=True)
        nc = await self._app1(server, connect)

        assert await _who_with_forged_header(nc) == {"account": "APP1", "user": "", "name": ""}


async def _who_with_forged_header(nc: NatsClient) -> Any:
    """What ``Whoami.who`` answers to a request carrying ``FORGED_INFO`` as its
    ``Nats-Request-Info`` header."""
    reply = await nc.request(
        rpc_subject(PREFIX, "Whoami", "me", "who"),
        b"",
        timeout=5,
        headers={"Nats-Request-Info": FORGED_INFO},
    )
    return json.loads(reply.data)
