"""ndo's pytest plugin, as a user meets it: pytest run in a directory of their own.

Each test runs ``python -m pytest`` (this interpreter, so the installed ndo and its ``pytest11``
entry point) in an empty temporary directory with no configuration but what the test writes:
the worked example ``examples/test_with_kit.py`` copied there alone passes, its ``ndo_worker``
tests included; ``ndo_modules`` in ``pytest.ini`` is enough for ``ndo_worker``; and with nothing
configured the fixtures fail saying what to set. Few runs: each costs seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import ndo.examples

EXAMPLE = Path(ndo.examples.__file__).parent / "test_with_kit.py"

OWN_MODULE = """
from ndo import Actor, method


class Greeter(Actor):
    @method
    async def hello(self, name: str) -> str:
        return f"hello {name}"
"""

USES_THE_INI = """
import pytest

pytestmark = pytest.mark.asyncio


async def test_worker_serves_the_ini_modules(ndo_worker):
    assert await ndo_worker.get("Greeter", "g1").hello(name="ann") == "hello ann"


async def test_harness_too(ndo_harness):
    assert await ndo_harness.get("Greeter", "g1").hello(name="bob") == "hello bob"
"""


def _run_pytest(directory: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pytest -v`` in ``directory``, with no pytest settings from this run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


class TestInAUsersDirectory:
    """What a user sees running pytest in a directory of their own."""

    def test_the_worked_example_passes_alone(self, tmp_path: Path) -> None:
        """The example copied into an empty directory passes under plain ``pytest`` (strict
        asyncio mode), its integration tests through ``ndo_worker`` run, not skipped."""
        shutil.copy(EXAMPLE, tmp_path / "test_with_kit.py")
        result = _run_pytest(tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "test_with_kit.py::test_counter_over_nats PASSED" in output
        assert "test_with_kit.py::test_same_errors_over_nats PASSED" in output
        assert "test_with_kit.py::test_session_expires_on_the_fake_clock PASSED" in output
        assert "skipped" not in output.lower()

    def test_ndo_modules_in_the_ini(self, tmp_path: Path) -> None:
        """``ndo_modules`` names the modules (here one of the directory's own) that
        ``ndo_worker`` and ``ndo_harness`` serve; no fixture to override."""
        (tmp_path / "pytest.ini").write_text("[pytest]\nndo_modules = greeters\n")
        (tmp_path / "greeters.py").write_text(OWN_MODULE)
        (tmp_path / "test_greeter.py").write_text(USES_THE_INI)
        result = _run_pytest(tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "test_worker_serves_the_ini_modules PASSED" in output
        assert "test_harness_too PASSED" in output

    def test_nothing_configured_says_what_to_set(self, tmp_path: Path) -> None:
        """Without ``ndo_modules`` or an ``ndo_classes`` fixture, the test errors with a
        message naming both."""
        (tmp_path / "test_unconfigured.py").write_text(USES_THE_INI)
        result = _run_pytest(tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert "2 errors" in output
        assert "set the ini option ndo_modules" in output
        assert "override the fixture" in output
