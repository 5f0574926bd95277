"""``ndo serve --config FILE``: options from a TOML file.

The file holds ``ndo serve`` options by their flag names (``data-dir`` or ``data_dir``), plus
``modules``, a list of modules to serve. Precedence: command-line flag, then ``NDO_*``
environment variable, then the file, then the built-in default.

    # ndo.toml
    nats-url = "nats://127.0.0.1:4222"
    data-dir = "/srv/ndo"
    modules = ["myapp.objects"]
    max-active = 50000
    journal-max-age = "3d"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ndo.ops._errors import ConfigFileError

__all__ = ["ConfigFileError", "load_config_file"]


def load_config_file(path: Path) -> dict[str, Any]:
    """Read ``path`` and return its options keyed by argparse ``dest`` (``data_dir``).

    Raises:
        ConfigFileError: unreadable file, invalid TOML, or a nested table.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigFileError(f"cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"not valid TOML: {exc}") from None
    options: dict[str, Any] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigFileError(f"option {key!r} must be a value, not a table")
        if dest == "modules":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                raise ConfigFileError(
                    'modules must be a list of module names, e.g. modules = ["myapp.objects"]'
                )
        elif isinstance(value, list):
            raise ConfigFileError(f"option {key!r} takes one value, not a list")
        options[dest] = value
    return options
