"""Credentials and TLS end to end: workers and the ``ndo`` commands against secured nats-servers.

Everything secret is made here, per test module: a private CA (with the ``openssl`` binary)
signing a server certificate for 127.0.0.1 and a client certificate, an NKey user and an
operator -> account -> user JWT chain (with the ``nkeys`` package). Each test starts its own
``nats-server`` on a random port with a ``tls { ... }``, ``authorization { ... }`` or operator
block, a real ``Worker``, and runs the commands as child processes, the way an operator does.
Failures must be one line naming the option to fix, and no secret may reach any output.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nkeys  # type: ignore[import-untyped]  # nkeys ships no type information
import pytest

from ndo.actors import ActorClient, RetryPolicy
from ndo.examples import Counter
from ndo.ops._connect import connect_once
from ndo.ops._nats_server import EmbeddedNatsServer
from ndo.service import NatsAuth, ServiceError, Worker, WorkerConfig, WorkerState
from tests.conftest import NatsServerFactory
from tests.helpers import ServeProcess, ndo_env, run_ndo
from tests.worker_fixtures import worker_factory

pytestmark = pytest.mark.slow

USER: Final = "alice"
"""The password user of the ``authorization`` servers."""
PASSWORD: Final = "s3cretpw"
"""Her password; no output may ever contain it."""
TOKEN: Final = "t0ken-9f3a1c"
"""The token of the token server; no output may ever contain it."""
SHUTDOWN_TIMEOUT: Final = 10.0
"""Seconds a signalled ``ndo serve`` may take to drain and exit."""

StartWorker = Callable[..., Awaitable[Worker]]

_OPENSSL_CONFIG: Final = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = ndo test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
"""OpenSSL config: the extensions of the CA, the server and the client certificate (our own,
so the system's ``openssl.cnf`` does not matter)."""

_EC_KEY: Final = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
"""A new P-256 key, unencrypted (fast to make, accepted by Go and OpenSSL alike)."""


# Fixtures: a private CA, an NKey user, an operator


@dataclass(frozen=True)
class Pki:
    """A private CA and the certificates it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_config(self, *, verify: bool = False) -> str:
        """The nats-server ``tls`` block: TLS required, clients verified if ``verify``."""
        return "\n".join(
            [
                "tls {",
                f"  cert_file: {json.dumps(str(self.server_cert))}",
                f"  key_file: {json.dumps(str(self.server_key))}",
                f"  ca_file: {json.dumps(str(self.ca))}",
                f"  verify: {str(verify).lower()}",
                "  timeout: 5",
                "}",
            ]
        )

    def client_auth(self) -> NatsAuth:
        """Trusts the CA and presents the client certificate."""
        return NatsAuth(tls_ca=self.ca, tls_cert=self.client_cert, tls_key=self.client_key)


@dataclass(frozen=True)
class NKeyUser:
    """An NKey user: the file with its seed, and the public key the server lists."""

    seed_file: Path
    public_key: str


@dataclass(frozen=True)
class Operator:
    """An operator-mode server config (account JWTs preloaded) and one user's ``.creds``."""

    server_config: str
    creds: Path


def _openssl(binary: str, cwd: Path, *args: str) -> None:
    result = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{result.stderr}", pytrace=False)


@pytest.fixture(name="pki", scope="module")
def _pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("the openssl binary is needed to make the test CA and certificates")
    folder = tmp_path_factory.mktemp("pki")
    (folder / "openssl.cnf").write_text(_OPENSSL_CONFIG)
    config = ("-config", "openssl.cnf")
    _openssl(binary, folder, "req", "-x509", *config, "-extensions", "ca", *_EC_KEY,
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=ndo test CA")  # fmt: skip
    for name in ("server", "client"):
        _openssl(binary, folder, "req", "-new", *config, *_EC_KEY, "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/CN=ndo test {name}")  # fmt: skip
        _openssl(binary, folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                 "-CAkey", "ca.key", "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
                 "-days", "2", "-extfile", "openssl.cnf", "-extensions", name,
                 "-out", f"{name}.pem")  # fmt: skip
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )


def _new_keypair(prefix: int) -> nkeys.KeyPair:
    """A fresh NKey pair of one role (``nkeys.PREFIX_BYTE_USER`` ...)."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def _public(keypair: nkeys.KeyPair) -> str:
    return bytes(keypair.public_key).decode()


def _seed(keypair: nkeys.KeyPair) -> str:
    return bytes(keypair.seed).decode()


@pytest.fixture(name="nkey_user", scope="module")
def _nkey_user(tmp_path_factory: pytest.TempPathFactory) -> NKeyUser:
    """An NKey user with its seed (``SU...``) in a file."""
    keypair = _new_keypair(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path_factory.mktemp("nkey") / "user.nk"
    seed_file.write_text(_seed(keypair) + "\n")
    return NKeyUser(seed_file=seed_file, public_key=_public(keypair))


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (``ed25519-nkey``) about ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": _public(issuer),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    header = _base64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _base64url(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_base64url(signature)}"


_UNLIMITED: Final = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
"""Account limits: none."""
_JETSTREAM_UNLIMITED: Final = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
"""Account limits that enable JetStream for the account, without limits."""


@pytest.fixture(name="operator", scope="module")
def _operator(tmp_path_factory: pytest.TempPathFactory) -> Operator:
    """An operator, a system account, an application account with JetStream, and a user of
    it whose ``.creds`` file ``--nats-creds`` takes (resolver: MEMORY, accounts preloaded)."""
    operator = _new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    system = _new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    account = _new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _new_keypair(nkeys.PREFIX_BYTE_USER)
    operator_jwt = _jwt(operator, _public(operator), "ndo-test", {"type": "operator"})
    system_jwt = _jwt(operator, _public(system), "SYS", {"type": "account", "limits": _UNLIMITED})
    account_jwt = _jwt(
        operator,
        _public(account),
        "ndo",
        {"type": "account", "limits": {**_UNLIMITED, **_JETSTREAM_UNLIMITED}},
    )
    user_jwt = _jwt(
        account,
        _public(user),
        "worker",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = tmp_path_factory.mktemp("operator") / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{_seed(user)}\n"
        "------END USER NKEY SEED------\n"
    )
    config = "\n".join(
        [
            f"operator: {json.dumps(operator_jwt)}",
            f"system_account: {json.dumps(_public(system))}",
            "resolver: MEMORY",
            "resolver_preload: {",
            f"  {_public(system)}: {json.dumps(system_jwt)}",
            f"  {_public(account)}: {json.dumps(account_jwt)}",
            "}",
        ]
    )
    return Operator(server_config=config, creds=creds)


def _users_config(nkey_user: NKeyUser) -> str:
    """An ``authorization`` block with a password user and an NKey user."""
    return "\n".join(
        [
            "authorization {",
            "  users = [",
            f"    {{user: {json.dumps(USER)}, password: {json.dumps(PASSWORD)}}}",
            f"    {{nkey: {json.dumps(nkey_user.public_key)}}}",
            "  ]",
            "}",
        ]
    )


def _with_userinfo(url: str, userinfo: str) -> str:
    """``nats://127.0.0.1:4222`` -> ``nats://<userinfo>@127.0.0.1:4222``."""
    return url.replace("nats://", f"nats://{userinfo}@", 1)


@pytest.fixture(name="start_worker_at")
async def _start_worker_at(tmp_path: Path) -> AsyncIterator[StartWorker]:
    """Factory: ``await start_worker_at(url, auth)`` starts a worker serving ``Counter``."""

    def base(started: int) -> WorkerConfig:
        return WorkerConfig(data_dir=tmp_path / f"data-{started}", partitions=8)

    async with worker_factory(base, [Counter]) as start_worker:

        async def start(url: str, auth: NatsAuth | None = None) -> Worker:
            return await start_worker(nats_url=url, auth=auth or NatsAuth())

        yield start


@pytest.fixture(name="users_server")
async def _users_server(
    make_nats_server: NatsServerFactory, nkey_user: NKeyUser
) -> EmbeddedNatsServer:
    """A server that admits the password user and the NKey user, nobody else."""
    return await make_nats_server(extra_config=_users_config(nkey_user))


# Helpers


async def _increment(url: str, auth: NatsAuth, object_id: str) -> Any:
    """Call ``Counter/<object_id>.increment(by=2)`` over a connection made with ``auth``."""
    nc = await connect_once(url, auth)
    try:
        client = ActorClient(nc, timeout=5.0, retry=RetryPolicy(attempts=3, initial_backoff=0.05))
        return await client.get("Counter", object_id).call("increment", by=2)
    finally:
        await nc.close()


async def _ndo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ndo <args>`` in a thread, so in-process workers keep serving meanwhile."""
    return await asyncio.to_thread(run_ndo, *args, env=env)


async def _call_and_status(url: str, *options: str) -> None:
    """``ndo call`` increments and prints 2, ``ndo status`` lists the one worker, ``ndo tail``
    and ``ndo replay`` read the call's journal record."""
    call, status = await asyncio.gather(
        _ndo("call", "Counter", "cli", "increment", '{"by": 2}', "--nats-url", url, *options),
        _ndo("status", "--brief", "--nats-url", url, *options),
    )
    assert (call.returncode, call.stdout) == (0, "2\n"), call.stderr
    assert status.returncode == 0, status.stderr
    assert "1 worker(s)" in status.stdout
    tail = await _ndo(
        "tail", "Counter", "cli", "--since", "1h", "--count", "1", "--json", "--nats-url", url,
        *options,
    )  # fmt: skip
    assert tail.returncode == 0, tail.stderr
    assert '"increment"' in tail.stdout
    replay = await _ndo("replay", "Counter", "cli", "--json", "--nats-url", url, *options)
    assert replay.returncode == 0, replay.stderr
    assert '"increment"' in replay.stdout
    assert replay.stderr.strip() == "1 of 1 recorded steps of Counter/cli"  # its summary
    for result in (call, status, tail):
        _assert_quiet(result.stderr)


def _assert_quiet(stderr: str) -> None:
    """A command that worked printed nothing on stderr (not even asyncio's warning about
    nats-py's TLS connections closing, nats-io/nats.py issue 574: the commands filter it)."""
    assert not stderr.strip(), stderr


def _assert_refused(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """The command failed with exit code 1 and a one-line error containing ``phrases``."""
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("ndo ")]
    assert len(error) == 1, result.stderr
    for phrase in phrases:
        assert phrase in error[0]


# Tests


class TestServerTls:
    """A server that requires TLS with a certificate from a private CA."""

    @pytest.fixture(name="tls_server")
    async def _tls_server(
        self, make_nats_server: NatsServerFactory, pki: Pki
    ) -> EmbeddedNatsServer:
        return await make_nats_server(extra_config=pki.server_config())

    async def test_worker_with_the_ca_serves(
        self, tls_server: EmbeddedNatsServer, pki: Pki, start_worker_at: StartWorker
    ) -> None:
        """With ``tls_ca`` the worker connects to the plain ``nats://`` URL over TLS and serves."""
        await start_worker_at(tls_server.url, NatsAuth(tls_ca=pki.ca))
        assert await _increment(tls_server.url, NatsAuth(tls_ca=pki.ca), "tls") == 2

    async def test_commands_with_the_ca(
        self, tls_server: EmbeddedNatsServer, pki: Pki, start_worker_at: StartWorker
    ) -> None:
        """``ndo call --tls-ca`` and ``ndo status --tls-ca`` work."""
        await start_worker_at(tls_server.url, NatsAuth(tls_ca=pki.ca))
        await _call_and_status(tls_server.url, "--tls-ca", str(pki.ca))

    async def test_call_without_the_ca_is_refused(self, tls_server: EmbeddedNatsServer) -> None:
        """Without ``--tls-ca`` the certificate cannot be verified: exit 1, a hint, no traceback."""
        result = await _ndo("call", "Counter", "tls", "get", "--nats-url", tls_server.url)
        _assert_refused(result, "certificate verify failed", "--tls-ca")

    async def test_worker_without_the_ca_is_refused(
        self, tls_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        """A worker without the CA fails to start at once, with the error naming ``--tls-ca``."""
        config = WorkerConfig(nats_url=tls_server.url, data_dir=tmp_path / "data", partitions=8)
        worker = Worker(config, [Counter])
        async with asyncio.timeout(20):
            with pytest.raises(ServiceError, match="certificate verify failed") as refused:
                await worker.start()
        assert "--tls-ca" in str(refused.value)
        assert worker.state is WorkerState.STOPPED

    async def test_serve_without_the_ca_exits_1(
        self, tls_server: EmbeddedNatsServer, tmp_path: Path
    ) -> None:
        """``ndo serve`` without ``--tls-ca`` exits 1 with the fix on one line, no traceback."""
        result = await _ndo(
            "serve", "--nats-url", tls_server.url, "--data-dir", str(tmp_path / "data"),
            "--log-format", "json",
        )  # fmt: skip
        _assert_refused(result, "certificate verify failed", "--tls-ca")


class TestClientCertificates:
    """A server that verifies clients (``verify: true``) admits only certified ones."""

    @pytest.fixture(name="verifying_server")
    async def _verifying_server(
        self, make_nats_server: NatsServerFactory, pki: Pki
    ) -> EmbeddedNatsServer:
        return await make_nats_server(extra_config=pki.server_config(verify=True))

    async def test_worker_and_call_with_a_client_certificate(
        self, verifying_server: EmbeddedNatsServer, pki: Pki, start_worker_at: StartWorker
    ) -> None:
        """The worker and ``ndo call`` present ``--tls-cert``/``--tls-key`` and are admitted."""
        await start_worker_at(verifying_server.url, pki.client_auth())
        result = await _ndo(
            "call", "Counter", "mtls", "increment", '{"by": 2}',
            "--nats-url", verifying_server.url, "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, "2\n"), result.stderr
        _assert_quiet(result.stderr)

    async def test_call_without_a_client_certificate_is_refused(
        self, verifying_server: EmbeddedNatsServer, pki: Pki
    ) -> None:
        """Without a client certificate the server drops the connection; the error says to pass
        ``--tls-cert`` and ``--tls-key``."""
        result = await _ndo(
            "call", "Counter", "mtls", "get",
            "--nats-url", verifying_server.url, "--tls-ca", str(pki.ca),
        )  # fmt: skip
        _assert_refused(result, "--tls-cert", "--tls-key")

    async def test_worker_without_a_client_certificate_is_refused(
        self, verifying_server: EmbeddedNatsServer, pki: Pki, tmp_path: Path
    ) -> None:
        """A worker with only the CA fails to start, the error naming ``--tls-cert``.

        An attempt may see only the dropped connection (retried, like a server not yet up)
        before one reads the server's "certificate required" alert, so the wait is generous.
        """
        config = WorkerConfig(
            nats_url=verifying_server.url,
            auth=NatsAuth(tls_ca=pki.ca),
            data_dir=tmp_path / "data",
            partitions=8,
        )
        worker = Worker(config, [Counter])
        async with asyncio.timeout(30):
            with pytest.raises(ServiceError, match="--tls-cert/--tls-key"):
                await worker.start()
        assert worker.state is WorkerState.STOPPED


class TestCredentials:
    """User and password (flags or URL), tokens, NKeys and JWT ``.creds`` files, for a worker
    and for ``ndo call`` and ``ndo status``."""

    @pytest.mark.parametrize("way", ["password-in-url", "user-and-password", "nkey"])
    async def test_worker(
        self,
        users_server: EmbeddedNatsServer,
        nkey_user: NKeyUser,
        start_worker_at: StartWorker,
        way: str,
    ) -> None:
        """A worker authenticates each way and serves a caller who authenticates another way."""
        password = NatsAuth(user=USER, password=PASSWORD)
        nkey = NatsAuth(nkey=nkey_user.seed_file)
        if way == "password-in-url":
            await start_worker_at(_with_userinfo(users_server.url, f"{USER}:{PASSWORD}"))
        else:
            await start_worker_at(
                users_server.url, password if way == "user-and-password" else nkey
            )
        caller = password if way == "nkey" else nkey
        assert await _increment(users_server.url, caller, "creds") == 2

    @pytest.mark.parametrize("way", ["password-in-url", "user-and-password", "nkey"])
    async def test_commands(
        self,
        users_server: EmbeddedNatsServer,
        nkey_user: NKeyUser,
        start_worker_at: StartWorker,
        way: str,
    ) -> None:
        """``ndo call`` and ``ndo status`` authenticate with the URL's user:password,
        ``--nats-user``/``--nats-password`` or ``--nats-nkey``."""
        await start_worker_at(users_server.url, NatsAuth(nkey=nkey_user.seed_file))
        if way == "password-in-url":
            await _call_and_status(_with_userinfo(users_server.url, f"{USER}:{PASSWORD}"))
        elif way == "user-and-password":
            await _call_and_status(
                users_server.url, "--nats-user", USER, "--nats-password", PASSWORD
            )
        else:
            await _call_and_status(users_server.url, "--nats-nkey", str(nkey_user.seed_file))

    async def test_no_credentials_are_refused(self, users_server: EmbeddedNatsServer) -> None:
        """Without credentials the server refuses; the error lists the credential options."""
        result = await _ndo("status", "--nats-url", users_server.url)
        _assert_refused(result, "Authorization Violation", "--nats-user", "--nats-creds")

    async def test_token(
        self, make_nats_server: NatsServerFactory, start_worker_at: StartWorker
    ) -> None:
        """A token server admits a worker with ``token`` and the commands with ``--nats-token``."""
        server = await make_nats_server(
            extra_config=f"authorization {{ token: {json.dumps(TOKEN)} }}"
        )
        await start_worker_at(server.url, NatsAuth(token=TOKEN))
        await _call_and_status(server.url, "--nats-token", TOKEN)

    async def test_jwt_creds(
        self, make_nats_server: NatsServerFactory, operator: Operator, start_worker_at: StartWorker
    ) -> None:
        """An operator-mode server admits a worker and the commands with the user's ``.creds``
        (JetStream, enabled by the account JWT, carries the leases)."""
        server = await make_nats_server(extra_config=operator.server_config)
        await start_worker_at(server.url, NatsAuth(creds=operator.creds))
        await _call_and_status(server.url, "--nats-creds", str(operator.creds))


class TestConfigurationSources:
    """Credentials and TLS files also come from ``NDO_*`` variables and ``--config`` files."""

    async def test_password_from_the_environment_and_user_from_a_file(
        self, users_server: EmbeddedNatsServer, nkey_user: NKeyUser, start_worker_at: StartWorker,
        tmp_path: Path,
    ) -> None:  # fmt: skip
        """``nats-url`` and ``nats-user`` from ``--config``, ``NDO_NATS_PASSWORD`` from the
        environment."""
        await start_worker_at(users_server.url, NatsAuth(nkey=nkey_user.seed_file))
        config = tmp_path / "ndo.toml"
        config.write_text(f'nats-url = "{users_server.url}"\nnats-user = "{USER}"\n')
        result = await _ndo(
            "call", "Counter", "env", "increment", '{"by": 2}', "--config", str(config),
            env=ndo_env(NDO_NATS_PASSWORD=PASSWORD),
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, "2\n"), result.stderr
        _assert_quiet(result.stderr)

    async def test_everything_from_a_file(
        self, make_nats_server: NatsServerFactory, pki: Pki, nkey_user: NKeyUser,
        start_worker_at: StartWorker, tmp_path: Path,
    ) -> None:  # fmt: skip
        """A TLS server with users: ``tls-ca``, ``nats-user`` and ``nats-password`` all come from
        the ``--config`` file."""
        server = await make_nats_server(
            extra_config=pki.server_config() + "\n" + _users_config(nkey_user)
        )
        await start_worker_at(server.url, NatsAuth(nkey=nkey_user.seed_file, tls_ca=pki.ca))
        config = tmp_path / "ndo.toml"
        config.write_text(
            f'nats-url = "{server.url}"\ntls-ca = "{pki.ca}"\n'
            f'nats-user = "{USER}"\nnats-password = "{PASSWORD}"\n'
        )
        result = await _ndo(
            "call", "Counter", "file", "increment", '{"by": 2}', "--config", str(config)
        )
        assert (result.returncode, result.stdout) == (0, "2\n"), result.stderr
        _assert_quiet(result.stderr)


class TestSecretsStayHidden:
    """Passwords and tokens never reach logs, errors or reprs."""

    @pytest.mark.parametrize("where", ["url", "flags"])
    async def test_serve_logs_no_password(
        self, users_server: EmbeddedNatsServer, tmp_path: Path, where: str
    ) -> None:
        """``ndo serve`` with the password in ``--nats-url`` (logged as ``***``) or in
        ``--nats-user``/``--nats-password`` never prints it: debug logs, a call, a SIGINT stop."""
        url = _with_userinfo(users_server.url, f"{USER}:{PASSWORD}")
        credentials: tuple[str, ...]
        if where == "url":
            credentials = ("--nats-url", url)
        else:
            credentials = ("--nats-url", users_server.url, "--nats-user", USER,
                           "--nats-password", PASSWORD)  # fmt: skip
        with ServeProcess(
            *credentials, "--data-dir", str(tmp_path / "data"), "--log-level", "debug"
        ) as process:
            serving = await process.async_wait_serving()
            call = await _ndo("call", "Counter", "quiet", "increment", "--nats-url", url)
            assert (call.returncode, call.stdout) == (0, "1\n"), call.stderr
            process.send_signal(signal.SIGINT)
            assert await process.async_wait(SHUTDOWN_TIMEOUT) == 0
        shown = (
            _with_userinfo(users_server.url, f"{USER}:***") if where == "url" else users_server.url
        )
        assert serving["nats_url"] == shown
        assert PASSWORD not in process.output
        assert PASSWORD not in call.stderr

    async def test_refused_password_is_not_printed(self, users_server: EmbeddedNatsServer) -> None:
        """A wrong password in the URL: the error shows the URL with ``***`` in its place."""
        result = await _ndo(
            "call", "Counter", "x", "get",
            "--nats-url", _with_userinfo(users_server.url, f"{USER}:wr0ng-pa55"),
        )  # fmt: skip
        _assert_refused(result, "Authorization Violation", f"{USER}:***@")
        assert "wr0ng-pa55" not in result.stderr

    def test_reprs_hide_secrets(self) -> None:
        """``repr`` of ``NatsAuth`` and of a ``WorkerConfig`` holding it shows neither a password
        nor a token."""
        with_password = NatsAuth(user=USER, password=PASSWORD)
        with_token = NatsAuth(token=TOKEN)
        for auth in (with_password, with_token):
            shown = repr(WorkerConfig(auth=auth)) + repr(auth) + str(auth)
            assert PASSWORD not in shown
            assert TOKEN not in shown
        assert "password='***'" in repr(with_password)
