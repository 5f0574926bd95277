"""The pure parts of the security features: which reply subjects are inboxes, how URLs and
settings hide secrets, how connection settings are checked, how permission violations are
matched to requests, and the permission blocks ``ndo permissions`` prints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ndo.actors._permissions import PermissionWatch
from ndo.ops._permissions import Permissions, caller_permissions, render_user
from ndo.service import NatsAuth, WorkerConfig, redact_url
from ndo.subjects import DEFAULT_REPLY_PREFIXES, is_reply_subject, parse_reply_prefixes


class TestReplySubjects:
    """Only subjects under the inbox prefixes are answered."""

    @pytest.mark.parametrize("subject", ["_INBOX.abc", "_INBOX.abc.1", "_R_.xyz.k"])
    def test_inboxes_are_answered(self, subject: str) -> None:
        assert is_reply_subject(subject, DEFAULT_REPLY_PREFIXES)

    @pytest.mark.parametrize(
        "subject",
        [
            "$KV.ndo-leases.leases.3",
            "$KV.ndo-leases.config",
            "ndo.sys.journal.3",
            "ndo.evt.Counter.x.hacked",
            "$JS.API.STREAM.DELETE.NDO_JOURNAL",
            "_INBOXES.x",
            "_INBOX.",
            "_INBOX",
            "",
        ],
    )
    def test_anything_else_is_not(self, subject: str) -> None:
        assert not is_reply_subject(subject, DEFAULT_REPLY_PREFIXES)

    def test_custom_prefixes_get_their_dot(self) -> None:
        assert parse_reply_prefixes("_INBOX, _MYAPP.") == ("_INBOX.", "_MYAPP.")

    @pytest.mark.parametrize("text", ["", " , ", "$KV.", "_INBOX.*", "a b.", "_IN..BOX"])
    def test_bad_prefixes_are_refused(self, text: str) -> None:
        with pytest.raises(ValueError, match="prefix"):
            parse_reply_prefixes(text)

    def test_a_prefix_under_the_subject_prefix_is_refused(self) -> None:
        """Answers must never reach the workers' own subjects."""
        with pytest.raises(ValueError, match="must not lie under"):
            WorkerConfig(reply_prefixes=("ndo.inbox.",))


class TestSecrets:
    """Passwords and tokens never show."""

    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("nats://alice:s3cret@h:4222", "nats://alice:***@h:4222"),
            ("nats://t0ken@h:4222", "nats://***@h:4222"),
            ("nats://h:4222", "nats://h:4222"),
            ("tls://a:b@h1:4222, nats://h2:4222", "tls://a:***@h1:4222,nats://h2:4222"),
        ],
    )
    def test_urls_are_redacted(self, url: str, shown: str) -> None:
        assert redact_url(url) == shown

    def test_repr_hides_token_and_password(self) -> None:
        config = WorkerConfig(auth=NatsAuth(user="u", password="pw-123", token=""))
        assert "pw-123" not in repr(config)
        assert "pw-123" not in repr(NatsAuth(token="pw-123"))
        assert "***" in repr(NatsAuth(token="pw-123"))


class TestConnectionSettings:
    """Contradictions and missing files are one-line errors naming the option."""

    def test_one_identity_per_connection(self) -> None:
        with pytest.raises(ValueError, match="--nats-token and --nats-user are alternatives"):
            NatsAuth(token="t", user="u").check()

    def test_password_needs_user(self) -> None:
        with pytest.raises(ValueError, match="--nats-password needs --nats-user"):
            NatsAuth(password="p").check()

    def test_cert_and_key_go_together(self, tmp_path: Path) -> None:
        cert = tmp_path / "c.pem"
        cert.write_text("x")
        with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
            NatsAuth(tls_cert=cert).check()

    def test_missing_file_names_the_option(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"--tls-ca .*: no such file"):
            NatsAuth(tls_ca=tmp_path / "nope.pem").check()

    def test_a_file_that_is_not_pem_is_refused(self, tmp_path: Path) -> None:
        ca = tmp_path / "ca.pem"
        ca.write_text("not a certificate")
        with pytest.raises(ValueError, match="--tls-ca"):
            NatsAuth(tls_ca=ca).connect_options()

    def test_options_for_nats_connect(self) -> None:
        assert NatsAuth(user="u", password="p").connect_options() == {
            "user": "u",
            "password": "p",
        }
        assert NatsAuth(token="t").connect_options() == {"token": "t"}


class TestPermissionWatch:
    """A violation cancels exactly the requests it concerns."""

    async def _waiter(self, watch: PermissionWatch, subject: str) -> str:
        token = watch.expect(subject)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            denial = watch.denial(token)
            assert denial is not None
            return denial.describe()
        finally:
            watch.forget(token)
        return "not cancelled"

    async def test_matches_the_mapped_subject_and_ignores_others(self) -> None:
        """The server names the mapped subject, lowercased; other requests go on."""
        watch = PermissionWatch()
        denied = asyncio.create_task(self._waiter(watch, "ndo.rpc.Counter.a1.inc"))
        other = asyncio.create_task(self._waiter(watch, "ndo.rpc.Counter.a1.get"))
        await asyncio.sleep(0)
        watch.observe(
            Exception('nats: permissions violation for publish to "ndo.part.6.counter.a1.inc"')
        )
        assert await denied == 'publish to "ndo.part.6.counter.a1.inc"'
        assert not other.done()
        other.cancel()

    async def test_a_refused_reply_subject_fails_every_request(self) -> None:
        """The server refuses an inbox under ``_R_`` as a reply subject."""
        watch = PermissionWatch("_R_")
        waiting = asyncio.create_task(self._waiter(watch, "ndo.rpc.Counter.a1.get"))
        await asyncio.sleep(0)
        watch.observe(Exception('nats: permissions violation for publish with reply of "_r_.x.1"'))
        assert await waiting == 'use "_r_.x.1" as a reply subject'

    async def test_a_refused_inbox_subscription_fails_every_request(self) -> None:
        watch = PermissionWatch()
        waiting = asyncio.create_task(self._waiter(watch, "ndo.rpc.Counter.a1.get"))
        await asyncio.sleep(0)
        watch.observe(Exception('nats: permissions violation for subscription to "ducks.>"'))
        await asyncio.sleep(0)
        assert not waiting.done()  # not the inbox: the application's own business
        watch.observe(Exception('nats: permissions violation for subscription to "_inbox.x.*"'))
        assert (await waiting).startswith("subscribe to")


class TestPermissionBlocks:
    """``ndo permissions`` output."""

    def test_caller_lists_both_request_forms(self) -> None:
        granted = caller_permissions("ndo", ["Counter"], ["get"])
        assert granted.publish == ("ndo.rpc.Counter.*.get", "ndo.part.*.Counter.*.get")
        assert granted.subscribe == ("_INBOX.>",)

    def test_an_empty_list_denies_everything(self) -> None:
        """nats-server reads an empty allow list as no restriction: render a deny instead."""
        rendered = render_user(Permissions((), ()), user="nobody")
        assert 'publish: { deny: [">"] }' in rendered
        assert "allow" not in rendered
