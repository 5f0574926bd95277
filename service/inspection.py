"""The records of ``ndo inspect``'s requests to workers and of their replies (JSON on the wire).

``ndo inspect`` (``ops/_inspect.py``) asks the holder of each partition on
``<prefix>.sys.inspect.<p>.<operation>`` (``subjects.inspect_subject``); the worker's
``Inspector`` (``service/_inspector.py``) answers from its storage (reads) or through the
object's mailbox (``import`` and ``delete``). ``<prefix>.sys.inspect.info`` is answered by any
worker: how many partitions the deployment has. Errors come back as any object call's do
(``Ndo-Error-*`` headers), so ``ActorClient`` reads them.

Values cross as their stored bytes (MessagePack, base64 in JSON): the tool decodes them for
people, and an export holds exactly what was stored.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = [
    "MAX_LIST_LIMIT",
    "DeleteRequest",
    "ImportRequest",
    "InfoReply",
    "ListedObject",
    "ObjectsReply",
    "ObjectsRequest",
    "ShowReply",
    "ShowRequest",
    "WriteReply",
]

MAX_LIST_LIMIT: Final = 1000
"""Most objects one ``objects`` reply lists (one page)."""


class InfoReply(msgspec.Struct, frozen=True, kw_only=True):
    """``info``: what any worker of the deployment says about it."""

    worker: str
    """The answering worker's name."""
    partitions: int
    """The deployment's partition count (every object's partition follows from it)."""
    classes: list[str]
    """Classes the answering worker serves."""
    storage: str
    """``local``, ``replicated`` or ``memory``."""


class ObjectsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``objects``: one page of a partition's stored objects, in ``(class, id)`` order."""

    class_name: str | None = msgspec.field(default=None, name="class")
    """Only this class's objects."""
    prefix: str = ""
    """Only ids that start with this."""
    after: tuple[str, str] | None = None
    """Only objects after this ``(class, id)`` (the previous page's last)."""
    limit: int = 100
    """Most objects in the reply (1 to ``MAX_LIST_LIMIT``)."""


class ListedObject(msgspec.Struct, frozen=True, kw_only=True):
    """One object of an ``objects`` reply."""

    class_name: str = msgspec.field(name="class")
    id: str
    keys: int
    """Stored keys."""
    size: int
    """Bytes of its keys and values."""
    alarm: float | None
    """Its alarm time (epoch seconds), or null."""


class ObjectsReply(msgspec.Struct, frozen=True, kw_only=True):
    """A page of a partition's objects, and how many objects each class has there."""

    partition: int
    worker: str
    """The partition's holder, who answered."""
    objects: list[ListedObject]
    counts: dict[str, int]
    """Objects per class in the partition (with the request's filters, ignoring ``after``)."""


class ShowRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``show``: one object's stored keys, a page at a time."""

    class_name: str = msgspec.field(name="class")
    id: str
    after: str | None = None
    """Only keys after this one (the previous page's last)."""


class ShowReply(msgspec.Struct, frozen=True, kw_only=True):
    """One object as its owner has it stored."""

    partition: int
    worker: str
    """The partition's holder, who answered."""
    epoch: int
    """The holder's fencing epoch of the partition."""
    active: bool
    """The object is in the worker's memory now."""
    entries: list[tuple[str, bytes]]
    """``(key, stored MessagePack value)`` pairs in key order (a page)."""
    more: bool
    """More keys follow: ask again with ``after`` = the last key here."""
    alarm: float | None
    size: int
    """Bytes of all its keys and values."""


class ImportRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``import``: make an object hold exactly these keys and this alarm, in one turn."""

    class_name: str = msgspec.field(name="class")
    id: str
    entries: list[tuple[str, bytes]]
    """``(key, MessagePack value)`` pairs."""
    alarm: float | None = None
    replace: bool = False
    """Overwrite an object that holds anything; without it such an object is refused (409
    ``object_exists``) and left as it is."""


class DeleteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``delete``: remove every key of an object and its alarm, in one turn."""

    class_name: str = msgspec.field(name="class")
    id: str


class WriteReply(msgspec.Struct, frozen=True, kw_only=True):
    """What an ``import`` or ``delete`` did, once durable."""

    partition: int
    worker: str
    existed: bool
    """The object held keys or an alarm before."""
    keys: int
    """Keys it holds now."""
