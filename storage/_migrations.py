"""Class migrations, the part every backend shares: which migrations are still to apply, and
the error of one that cannot be.

A backend records each migration it applies (``AppliedMigration``) in the same transaction as
the renames and deletions themselves; ``pending_migrations`` compares what a worker declares with
that record, inside the backend's transaction, so two workers starting at once apply each tag
once.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from ndo.storage._errors import MigrationError
from ndo.storage._records import AppliedMigration, ClassMigration

__all__ = ["MigrationError", "describe_migration", "pending_migrations", "rename_target_error"]


def pending_migrations(
    declared: Sequence[ClassMigration], applied: Iterable[AppliedMigration]
) -> list[ClassMigration]:
    """The declared migrations not yet applied, in declared order.

    Raises:
        MigrationError: a declared tag was applied with other renames or deletions.
    """
    recorded = {m.tag: m for m in applied}
    pending: list[ClassMigration] = []
    for migration in declared:
        done = recorded.get(migration.tag)
        if done is None:
            pending.append(migration)
        elif not migration.same_as(done):
            raise MigrationError(
                f"class migration {migration.tag!r} was applied on {_when(done.applied_at)} by "
                f"{done.worker} as {describe_migration(done)}, but is now declared as "
                f"{describe_migration(migration)}; an applied migration cannot change: restore its "
                "declaration and put the new changes in a migration with a new tag"
            )
    return pending


def rename_target_error(migration: ClassMigration, old: str, new: str) -> MigrationError:
    """The error of renaming ``old`` onto ``new`` while ``new`` already has stored objects."""
    return MigrationError(
        f"class migration {migration.tag!r} renames {old} to {new}, but storage already holds "
        f"objects of {new}; nothing was applied. Rename to a class name with no stored "
        f"objects, or delete {new}'s objects first (deleted_classes in an earlier migration)"
    )


def describe_migration(migration: ClassMigration | AppliedMigration) -> str:
    """``renamed A -> B, deleted C`` (for messages)."""
    parts = [f"renamed {a} -> {b}" for a, b in migration.renamed]
    parts += [f"deleted {c}" for c in migration.deleted]
    return ", ".join(parts) or "nothing"


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
