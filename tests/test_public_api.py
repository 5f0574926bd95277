"""The public API of every package is exactly its ``__all__``, kept in the order ruff enforces."""

from __future__ import annotations
import __future__

import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import types

import pytest

PACKAGES = [
    "ndo",
    "ndo.actors",
    "ndo.examples",
    "ndo.ops",
    "ndo.ops.bench",
    "ndo.service",
    "ndo.storage",
    "ndo.subjects",
]


def _natural(text: str) -> list[str | int]:
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text))]


def _ruff_order(name: str) -> tuple[int, list[str | int], list[str | int]]:
    """Sort key of ruff's RUF022 (isort style): CONSTANTS, then Classes, then the rest, each
    in natural order (the rest compared case-insensitively first; ruff puts CallTimeoutError
    before Caller, so classes are compared as written)."""
    kind = 0 if len(name) > 1 and name.isupper() else 1 if name[:1].isupper() else 2
    return kind, _natural(name.lower()) if kind == 2 else [], _natural(name)


def _public_names(package: types.ModuleType) -> set[str]:
    """Names the package binds that do not start with '_', submodules and __future__ excluded."""
    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, __future__._Feature)
    }


def _submodules(package: types.ModuleType) -> list[types.ModuleType]:
    return [
        importlib.import_module(f"{package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
    ]


class TestOrderKey:
    """The sort key agrees with ruff on the cases that differ from plain sorted()."""

    def test_matches_ruff(self) -> None:
        """Constants first, then classes, then functions; digits compared as numbers."""
        ruff_sorted = ["A1", "AB_C", "B_2", "B_10", "A", "Ab", "B", "HTTP2Error", "HTTPError"]
        ruff_sorted += ["X", "Zeta", "_p", "a", "aB", "b2", "b10", "hTTP"]
        assert sorted(reversed(ruff_sorted), key=_ruff_order) == ruff_sorted


@pytest.mark.parametrize("name", PACKAGES)
class TestPackageAll:
    """Each package re-exports its public names through one sorted ``__all__``."""

    def test_all_is_sorted_without_duplicates(self, name: str) -> None:
        """__all__ is in ruff's order and lists each name once."""
        exported = list(importlib.import_module(name).__all__)
        assert exported == sorted(exported, key=_ruff_order)
        assert len(set(exported)) == len(exported)

    def test_all_equals_public_names(self, name: str) -> None:
        """__all__ is exactly the public names the package binds: no leak, nothing missing."""
        package = importlib.import_module(name)
        assert set(package.__all__) == _public_names(package)

    def test_modules_declare_all(self, name: str) -> None:
        """Every module of the package has an __all__ whose names exist, in ruff's order."""
        for module in _submodules(importlib.import_module(name)):
            exported = getattr(module, "__all__", None)
            assert exported is not None, f"{module.__name__} has no __all__"
            assert exported == sorted(exported, key=_ruff_order), module.__name__
            missing = [n for n in exported if not hasattr(module, n)]
            assert not missing, (module.__name__, missing)

    def test_reexports_come_from_module_all(self, name: str) -> None:
        """Every name the package exports is in the __all__ of the module that defines it."""
        package = importlib.import_module(name)
        declared = {n for m in _submodules(package) for n in m.__all__}
        assert set(package.__all__) <= declared, set(package.__all__) - declared


class TestDistribution:
    """The installed distribution puts one package, ``ndo``, at the top of site-packages."""

    def test_one_top_level_package(self) -> None:
        """top_level.txt names only ``ndo`` (a user's own ``storage`` or ``ops`` never collides)."""
        top_level = importlib.metadata.distribution("ndo").read_text("top_level.txt") or ""
        assert top_level.split() == ["ndo"]


class TestStorageCallShapes:
    """``self.storage`` follows one rule: buffered writes are plain calls, reads and alarm calls
    are awaited (README, "Storage")."""

    def test_awaited_calls_are_exactly_reads_and_alarms(self) -> None:
        """The coroutine methods of ActorStorage are the reads and the alarm calls, no more."""
        from ndo import ActorStorage

        public = {
            name: member
            for name, member in vars(ActorStorage).items()
            if not name.startswith("_") and callable(member)
        }
        awaited = {name for name, fn in public.items() if inspect.iscoroutinefunction(fn)}
        assert awaited == {"get", "get_many", "list", "get_alarm", "set_alarm", "delete_alarm"}
        plain = set(public) - awaited
        assert {"put", "put_many", "delete", "delete_many", "delete_all"} <= plain
