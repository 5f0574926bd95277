"""Class migrations at a worker's start: apply the declared ones, then refuse orphaned classes.

A separate module so the worker's ``start`` stays a list of steps: this one runs right after
storage opens, before anything is served. Storage applies the migrations (all pending ones in
one transaction, each recorded by its tag); this module validates the declaration, logs what was
applied, and raises ``OrphanClassesError`` when storage still holds objects of classes that no
served module defines.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import structlog

from ndo.service._errors import OrphanClassesError
from ndo.storage import AppliedMigration, ClassMigration, Storage, describe_migration
from ndo.subjects import InvalidSubjectError, partition_of, validate_name

__all__ = ["check_migrations", "migrate_at_start"]

_log = structlog.get_logger("ndo.worker")


def check_migrations(migrations: Iterable[ClassMigration]) -> tuple[ClassMigration, ...]:
    """Return ``migrations`` as a tuple after checking their class names and tags.

    Raises:
        ValueError: a class name is not a valid one, or two migrations share a tag.
    """
    checked = tuple(migrations)
    seen: set[str] = set()
    for migration in checked:
        if not isinstance(migration, ClassMigration):
            raise TypeError(f"migrations must be ClassMigration records, got {migration!r}")
        if migration.tag in seen:
            raise ValueError(
                f"migration tag {migration.tag!r} is declared twice; every migration needs a "
                "tag of its own"
            )
        seen.add(migration.tag)
        names = [name for pair in migration.renamed for name in pair] + list(migration.deleted)
        for name in names:
            try:
                validate_name(name, "class")
            except InvalidSubjectError as exc:
                raise ValueError(f"migration {migration.tag!r}: {exc}") from None
    return checked


async def migrate_at_start(
    storage: Storage,
    migrations: Sequence[ClassMigration],
    served: Collection[str],
    *,
    partitions: int,
    worker: str,
) -> list[AppliedMigration]:
    """Apply the pending ``migrations`` and check that every stored class is ``served``.

    Returns:
        Every migration storage has applied (before and now), in order (``ndo status`` shows
        them).

    Raises:
        MigrationError: the migrations cannot be applied (nothing was).
        OrphanClassesError: storage holds objects of classes no served module defines.
    """
    applied = await storage.apply_migrations(
        migrations,
        partition_of=lambda class_name, object_id: partition_of(class_name, object_id, partitions),
        worker=worker,
    )
    for migration in applied:
        _log.info(
            "class migration applied",
            tag=migration.tag,
            changes=describe_migration(migration),
            objects_renamed=migration.objects_renamed,
            objects_deleted=migration.objects_deleted,
        )
    orphans = sorted(set(await storage.stored_classes()) - set(served))
    if orphans:
        raise OrphanClassesError(orphans, served)
    return await storage.applied_migrations()
