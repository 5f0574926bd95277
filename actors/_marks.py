"""``@method``: the mark that makes an ``async def`` of an object callable over NATS.

A leaf module of its own so that the stub (which checks the mark to offer an object's methods)
and the class description (which reads the marked methods) both import it, and neither imports
the other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

__all__ = ["is_method", "method"]

_MARK: Final = "__ndo_method__"
_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, Any]])


def method(fn: _F) -> _F:
    """Mark an ``async def`` of an ``Actor`` subclass as callable over NATS.

    Its parameters (after ``self``) become the JSON object keys of the request body; their
    annotations validate the values; defaults make them optional.
    """
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@method {fn.__qualname__} must be an 'async def'")
    setattr(fn, _MARK, True)
    return fn


def is_method(obj: object) -> bool:
    """Tell whether ``obj`` is a function marked with ``@method``."""
    return bool(getattr(obj, _MARK, False))
