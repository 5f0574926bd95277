"""Finding the actor classes to serve from module paths given on the command line."""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from ndo.actors import Actor

__all__ = ["DEFAULT_MODULES", "load_actor_classes"]

DEFAULT_MODULES = ("ndo.examples.objects",)
"""Served when ``ndo serve`` gets no module: the bundled examples (Counter, RateLimiter, ChatRoom,
DrawingBoard, Account, Session)."""


def load_actor_classes(targets: list[str] | tuple[str, ...]) -> list[type[Actor]]:
    """Import each ``module`` or ``module:Class`` and return the ``Actor`` subclasses found.

    A bare module contributes every ``Actor`` subclass defined in it (not ones it imports).

    Raises:
        ValueError: a module cannot be imported, a class is missing, or nothing was found.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # serve modules of the current project, like uvicorn
    found: dict[str, type[Actor]] = {}
    for target in targets:
        module_name, _, class_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r}: {exc}") from exc
        if class_name:
            cls = getattr(module, class_name, None)
            if not (inspect.isclass(cls) and issubclass(cls, Actor)):
                raise ValueError(f"{target!r} is not an Actor subclass")
            found[cls.__name__] = cls
            continue
        classes = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj)
            and issubclass(obj, Actor)
            and obj is not Actor
            and obj.__module__ == module.__name__
        ]
        if not classes:
            raise ValueError(f"module {module_name!r} defines no Actor subclasses")
        for cls in classes:
            found[cls.__name__] = cls
    return list(found.values())
