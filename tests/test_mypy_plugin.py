"""``ndo.actors.mypy_plugin`` types stub calls by method name (``stub.increment(by=2)``).

mypy runs twice in this module, on snippets written to a temporary folder: a first run with an
empty cache checks every case, and a second run on a new snippet reuses that cache, where mypy
keeps no decorators, so the plugin must find the ``@method``s it recorded.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from mypy import api

CONFIG = "[mypy]\nplugins = ndo.actors.mypy_plugin\n"
"""The configuration users write (here as mypy.ini) to enable the plugin."""

SNIPPET = """
    from ndo import Actor, ActorClient, method
    from ndo.examples import ChatRoom, Counter

    async def caller(client: ActorClient) -> None:
        stub = client.get(Counter, "a1")
        pending = reveal_type(stub.increment(by=2))  # increment
        await pending
        reveal_type(await stub.increment(2))  # positional
        await stub.increment(by="x")  # wrong_type
        await stub.incremnt(by=2)  # misspelled
        await client.get(ChatRoom, "r").post(user="ann")  # missing_arg
        reveal_type(await client.get(ChatRoom, "r").history(limit=5))  # history
        reveal_type(await client.get("Counter", "a1").anything(x=1))  # by_name
        reveal_type(await stub.call(Counter.increment, by=2))  # call
        reveal_type(stub.object_id)  # own_attribute

    class Relay(Actor):
        @method
        async def relay(self) -> int:
            await reveal_type(self.call(Counter, "c1").increment())  # from_actor
            await self.call(Counter, "c1").reset(now=True)  # from_actor_error
            return await self.call(Counter, "c1").get()

    class Tally(Counter):
        @method
        async def double(self) -> int:
            return 2 * await self.get()

    async def tally(client: ActorClient) -> None:
        reveal_type(await client.get(Tally, "t").increment())  # inherited
        await client.get(Tally, "t").dubble()  # subclass_misspelled
"""

CACHED_SNIPPET = """
    from ndo import ActorClient
    from ndo.examples import Counter

    async def caller(client: ActorClient) -> None:
        await reveal_type(client.get(Counter, "a1").get())  # cached
        await client.get(Counter, "a1").rest()  # cached_misspelled
"""

COROUTINE_INT = 'note: Revealed type is "typing.Coroutine[Any, Any, int]"'
COUNTER_METHODS = "callable methods: get, increment, reset  [attr-defined]"


_TAG = re.compile(r"# (\w+)$").search
"""Finds the tag comment that ends a snippet line."""
_MESSAGE = re.compile(r"(?P<file>.+?):(?P<line>\d+): (?P<message>.*)").fullmatch
"""Splits one line of mypy's output."""


@dataclass(frozen=True)
class Checked:
    """mypy's messages about one snippet, by the tag comment ending the line they are about."""

    messages: dict[str, list[str]]
    exit_status: int

    def __getitem__(self, tag: str) -> list[str]:
        """The messages about the line tagged ``tag`` (none: an empty list)."""
        return self.messages.get(tag, [])


def _check(folder: Path, name: str, snippet: str) -> Checked:
    """Run mypy with the plugin on ``snippet`` saved as ``folder/name`` (cache in ``folder``)."""
    source = textwrap.dedent(snippet)
    path = folder / name
    path.write_text(source)
    config = folder / "mypy.ini"
    config.write_text(CONFIG)
    stdout, stderr, status = api.run(
        [
            f"--config-file={config}",
            f"--cache-dir={folder / 'cache'}",
            "--no-error-summary",
            "--hide-error-context",
            str(path),
        ]
    )
    assert not stderr, stderr
    tags = {n: m[1] for n, line in enumerate(source.splitlines(), 1) if (m := _TAG(line))}
    messages: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        match = _MESSAGE(line)
        tag = tags.get(int(match["line"])) if match and match["file"] == str(path) else None
        if tag is None or match is None:
            messages.setdefault(f"untagged: {line}", []).append(line)
        else:
            messages.setdefault(tag, []).append(match["message"])
    return Checked(messages, status)


@pytest.fixture(name="checked", scope="module")
def _checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checked, Checked]:
    """mypy's verdicts on SNIPPET (empty cache), then on CACHED_SNIPPET (warm cache)."""
    folder = tmp_path_factory.mktemp("mypy_plugin")
    return (
        _check(folder, "snippet.py", SNIPPET),
        _check(folder, "cached_snippet.py", CACHED_SNIPPET),
    )


class TestTypedStubs:
    """A stub of a concrete class has that class's ``@method``s, typed."""

    def test_result_is_the_methods_coroutine(self, checked: tuple[Checked, Checked]) -> None:
        """``stub.increment(by=2)`` is ``Coroutine[Any, Any, int]``; positional args work."""
        first, _ = checked
        assert first["increment"] == [COROUTINE_INT]
        assert first["positional"] == ['note: Revealed type is "int"']
        assert first["history"] == [
            'note: Revealed type is "list[ndo.examples.objects.ChatMessage]"'
        ]

    def test_arguments_are_checked(self, checked: tuple[Checked, Checked]) -> None:
        """A wrong argument type or a missing argument is an error, as for a direct call."""
        first, _ = checked
        assert first["wrong_type"] == [
            'error: Argument "by" to "increment" of "Counter" has incompatible type "str"; '
            'expected "int"  [arg-type]'
        ]
        assert first["missing_arg"] == [
            'error: Missing positional argument "text" in call to "post" of "ChatRoom"  [call-arg]'
        ]

    def test_unknown_method_lists_the_callable_ones(self, checked: tuple[Checked, Checked]) -> None:
        """A misspelled method is an error naming the class, the name and the methods."""
        first, _ = checked
        assert first["misspelled"] == [
            f'error: Counter has no @method "incremnt"; {COUNTER_METHODS}'
        ]

    def test_stub_attributes_and_call_are_unchanged(self, checked: tuple[Checked, Checked]) -> None:
        """``stub.call(Counter.increment, ...)`` and the stub's own attributes keep their types."""
        first, _ = checked
        assert first["call"] == ['note: Revealed type is "int"']
        assert first["own_attribute"] == ['note: Revealed type is "str"']

    def test_calls_between_objects_are_typed(self, checked: tuple[Checked, Checked]) -> None:
        """``self.call(Counter, id).increment()`` inside a handler is typed the same way."""
        first, _ = checked
        assert first["from_actor"] == [COROUTINE_INT]
        assert first["from_actor_error"] == [
            'error: Unexpected keyword argument "now" for "reset" of "Counter"  [call-arg]',
            'note: "reset" defined in "ndo.examples.objects"',
        ]

    def test_nothing_else_is_reported(self, checked: tuple[Checked, Checked]) -> None:
        """Only the tagged lines get messages (no error inside ndo, none about the plugin)."""
        for run in checked:
            assert not [key for key in run.messages if key.startswith("untagged")], run.messages
            assert run.exit_status == 1

    def test_subclasses_inherit_methods(self, checked: tuple[Checked, Checked]) -> None:
        """A subclass of an object class has its base's ``@method``s and its own."""
        first, _ = checked
        assert first["inherited"] == ['note: Revealed type is "int"']
        assert first["subclass_misspelled"] == [
            'error: Tally has no @method "dubble"; callable methods: double, get, increment, '
            "reset  [attr-defined]"
        ]


class TestUntypedStubs:
    """A stub made from a class name keeps ``__getattr__``'s untyped result."""

    def test_any_method_is_accepted(self, checked: tuple[Checked, Checked]) -> None:
        """``client.get("Counter", "a1").anything(x=1)`` is accepted and its result is Any."""
        first, _ = checked
        assert first["by_name"] == ['note: Revealed type is "Any"']


class TestCache:
    """The plugin gives the same answers when mypy loads the objects' module from its cache."""

    def test_methods_known_from_the_cache(self, checked: tuple[Checked, Checked]) -> None:
        """A new snippet checked against the warm cache still gets types and the error."""
        _, cached = checked
        assert cached["cached"] == [COROUTINE_INT]
        assert cached["cached_misspelled"] == [
            f'error: Counter has no @method "rest"; {COUNTER_METHODS}'
        ]
