"""ndo's pytest plugin (registered through the ``pytest11`` entry point): fixtures that test
users' objects against a real worker, and their harness for unit tests.

* ``ndo_classes``: the classes to serve; by default those of the modules listed in the ini option
  ``ndo_modules`` (``module`` or ``module:Class`` per line). Override the fixture to list them
  in code.
* ``ndo_harness``: an ``ndo.testing.ObjectHarness`` of ``ndo_classes`` (in memory).
* ``ndo_nats_server``: an embedded ``nats-server`` with JetStream on a free port of 127.0.0.1.
* ``ndo_worker``: an in-process ndo worker serving ``ndo_classes`` on that server (its data in a
  temporary directory), yielding an ``ActorClient`` connected to it.

pytest imports this module in every run of an environment where ndo is installed, so it imports
nothing heavy itself (the worker, the harness and NATS are imported by the fixtures that need
them) and never fails to import: without pytest-asyncio, the async fixtures fail when used,
saying what to install.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import pytest

if TYPE_CHECKING:
    from ndo.actors import Actor, ActorClient
    from ndo.ops._kit import ObjectHarness
    from ndo.ops._nats_server import EmbeddedNatsServer

__all__ = ["pytest_addoption"]

_F = TypeVar("_F", bound=Callable[..., Any])

_INSTALL: Final = (
    "the ndo fixtures need pytest-asyncio: pip install 'ndo[testing]' "
    "(or pip install pytest-asyncio)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``ndo_modules`` ini option."""
    parser.addini(
        "ndo_modules",
        "modules (module or module:Class, one per line) whose Actor classes the ndo_worker and "
        "ndo_harness fixtures serve",
        type="linelist",
        default=[],
    )


def _async_fixture(name: str) -> Callable[[_F], _F]:
    """``pytest_asyncio.fixture(name=...)``, which works in pytest-asyncio's strict mode too; a
    fixture that fails with the install hint when pytest-asyncio is missing."""
    try:
        import pytest_asyncio
    except ImportError:

        def missing(function: _F) -> _F:
            def fail() -> None:
                pytest.fail(_INSTALL, pytrace=False)

            fail.__doc__ = function.__doc__
            return pytest.fixture(name=name)(fail)  # type: ignore[return-value]

        return missing
    return cast("Callable[[_F], _F]", pytest_asyncio.fixture(name=name))


@pytest.fixture(name="ndo_classes")
def _ndo_classes(request: pytest.FixtureRequest) -> list[type[Actor]]:
    """The Actor classes the ndo fixtures serve: those of the ``ndo_modules`` ini option.
    Override this fixture to list them in code."""
    from ndo.ops._loader import load_actor_classes

    modules: list[str] = request.config.getini("ndo_modules")
    if not modules:
        pytest.fail(
            "the ndo fixtures do not know which Actor classes to serve: set the ini option "
            "ndo_modules (in pytest.ini: `ndo_modules = myapp.objects`; in pyproject.toml: "
            '`ndo_modules = ["myapp.objects"]` under [tool.pytest.ini_options]), or override '
            "the fixture: @pytest.fixture def ndo_classes(): return [Counter, ...]",
            pytrace=False,
        )
    try:
        return load_actor_classes(modules)
    except ValueError as exc:
        pytest.fail(f"ndo_modules: {exc}", pytrace=False)


@_async_fixture("ndo_harness")
async def _ndo_harness(ndo_classes: list[type[Actor]]) -> AsyncIterator[ObjectHarness]:
    """An ``ObjectHarness`` of ``ndo_classes`` on in-memory storage (unit tests, no NATS)."""
    from ndo.ops._kit import ObjectHarness

    async with ObjectHarness(ndo_classes) as harness:
        yield harness


@_async_fixture("ndo_nats_server")
async def _ndo_nats_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[EmbeddedNatsServer]:
    """A ``nats-server`` with JetStream on a free port of 127.0.0.1, stopped after the test."""
    from ndo.ops._nats_server import EmbeddedNatsServer, NatsServerError

    server = EmbeddedNatsServer(store_dir=tmp_path_factory.mktemp("ndo-nats"), port=0)
    try:
        await server.start()
    except NatsServerError as exc:
        pytest.fail(f"ndo_nats_server could not start nats-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        await server.stop()


@_async_fixture("ndo_worker")
async def _ndo_worker(
    ndo_nats_server: EmbeddedNatsServer,
    ndo_classes: list[type[Actor]],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ActorClient]:
    """An ndo worker serving ``ndo_classes`` on ``ndo_nats_server`` (SQLite in a temporary
    directory), stopped after the test; yields an ``ActorClient`` connected to it."""
    import nats

    from ndo.actors import ActorClient, RetryPolicy
    from ndo.service import Worker, WorkerConfig

    config = WorkerConfig(
        nats_url=ndo_nats_server.url,
        data_dir=tmp_path_factory.mktemp("ndo-data"),
        partitions=8,
    )
    worker = Worker(config, ndo_classes)
    await worker.start()
    try:
        nc = await nats.connect(ndo_nats_server.url)
        try:
            yield ActorClient(nc, timeout=5.0, retry=RetryPolicy(attempts=3, initial_backoff=0.05))
        finally:
            await nc.close()
    finally:
        await worker.stop()
