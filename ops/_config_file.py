"""``ndo serve --config FILE``: options from a TOML file.

The file holds ``ndo serve`` options by their flag names (``data-dir`` or ``data_dir``), plus
``modules``, a list of modules to serve, and ``[[migrations]]``, the class migrations to apply
at start (docs/migrations.md; the syntax of Cloudflare's wrangler). Precedence: command-line
flag, then ``NDO_*`` environment variable, then the file, then the built-in default.

    # ndo.toml
    nats-url = "nats://127.0.0.1:4222"
    data-dir = "/srv/ndo"
    modules = ["myapp.objects"]
    max-active = 50000
    journal-max-age = "3d"

    [[migrations]]
    tag = "v2"
    renamed_classes = [{ from = "Counter", to = "Tally" }]
    deleted_classes = ["OldRoom"]
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Final

from ndo.ops._errors import ConfigFileError
from ndo.service import check_migrations
from ndo.storage import ClassMigration

__all__ = ["ConfigFileError", "load_config_file", "parse_migrations"]

_MIGRATION_KEYS: Final = frozenset({"tag", "renamed_classes", "deleted_classes"})
_WRANGLER_ONLY: Final = {
    "new_classes": "a new class needs no migration in ndo: remove it",
    "new_sqlite_classes": "a new class needs no migration in ndo: remove it",
    "transferred_classes": "ndo has no scripts to transfer classes between: remove it",
}
"""Keys of wrangler's migrations that ndo has no use for, with what to do."""
_EXAMPLE: Final = """[[migrations]]
tag = "v2"
renamed_classes = [{ from = "Counter", to = "Tally" }]
deleted_classes = ["OldRoom"]"""


def load_config_file(path: Path) -> dict[str, Any]:
    """Read ``path`` and return its options keyed by argparse ``dest`` (``data_dir``).

    ``migrations`` (an array of tables) becomes a tuple of ``ClassMigration``.

    Raises:
        ConfigFileError: unreadable file, invalid TOML, a nested table, or invalid migrations.
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
        if dest == "migrations":
            options[dest] = parse_migrations(value)
            continue
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


def parse_migrations(value: Any) -> tuple[ClassMigration, ...]:
    """The ``[[migrations]]`` array of tables of a config file as checked ``ClassMigration``s.

    Raises:
        ConfigFileError: not an array of tables, a missing tag, an unknown key, a value of the
            wrong type, an invalid class name, a duplicate tag, or names that conflict.
    """
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ConfigFileError(f"migrations must be an array of tables, like:\n{_EXAMPLE}")
    migrations: list[ClassMigration] = []
    for number, entry in enumerate(value, 1):
        tag = entry.get("tag")
        where = f"[[migrations]] number {number}" + (f" (tag {tag!r})" if tag else "")
        for key in entry:
            if key in _WRANGLER_ONLY:
                raise ConfigFileError(f"{where}: {key}: {_WRANGLER_ONLY[key]}")
            if key not in _MIGRATION_KEYS:
                raise ConfigFileError(
                    f"{where}: unknown key {key!r}; a migration has tag, renamed_classes and "
                    "deleted_classes"
                )
        if not isinstance(tag, str) or not tag:
            raise ConfigFileError(f'{where}: every migration needs a tag, e.g. tag = "v2"')
        renamed = entry.get("renamed_classes", [])
        if not isinstance(renamed, list) or not all(
            isinstance(r, dict)
            and set(r) == {"from", "to"}
            and all(isinstance(n, str) for n in r.values())
            for r in renamed
        ):
            raise ConfigFileError(
                f"{where}: renamed_classes must be a list of "
                '{ from = "OldName", to = "NewName" } tables'
            )
        deleted = entry.get("deleted_classes", [])
        if not isinstance(deleted, list) or not all(isinstance(c, str) for c in deleted):
            raise ConfigFileError(
                f'{where}: deleted_classes must be a list of class names, e.g. ["OldRoom"]'
            )
        try:
            migrations.append(
                ClassMigration(
                    tag=tag,
                    renamed=tuple((r["from"], r["to"]) for r in renamed),
                    deleted=tuple(deleted),
                )
            )
        except ValueError as exc:  # its message names the tag
            raise ConfigFileError(f"[[migrations]] number {number}: {exc}") from None
    try:
        return check_migrations(migrations)
    except ValueError as exc:
        raise ConfigFileError(str(exc)) from None
