"""A mypy plugin that types stub calls by name: ``client.get(Counter, "a1").increment(by=2)``.

``ActorStub`` answers any attribute through ``__getattr__``, so without help mypy sees every
``stub.<name>`` as ``Callable[..., Coroutine[Any, Any, Any]]``. With this plugin, a stub of a
concrete ``Actor`` subclass (``ActorStub[Counter]``, from ``ActorClient.get(Counter, ...)`` or
``Actor.call(Counter, ...)``) has exactly that class's ``@method``s, with their signatures
(``self`` dropped) and their ``Coroutine[Any, Any, R]`` results; any other name is an error that
lists the callable methods. Stubs made from a class name (``client.get("Counter", "a1")``) stay
untyped. Enable it where mypy runs with ``ndo`` installed, in ``pyproject.toml``::

    [tool.mypy]
    plugins = ["ndo.actors.mypy_plugin"]

or in ``mypy.ini`` / ``setup.cfg``: ``plugins = ndo.actors.mypy_plugin`` under ``[mypy]``.

It is a separate module because only mypy imports it (``mypy`` is not a dependency of ``ndo``).
While mypy analyzes a class, the plugin records its ``@method`` names in the class's metadata,
which mypy's cache keeps (the cache drops decorators), then reads them at each stub access.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

from mypy.errorcodes import ATTR_DEFINED
from mypy.nodes import Decorator, RefExpr, TypeInfo
from mypy.plugin import AttributeContext, ClassDefContext, Plugin
from mypy.typeops import bind_self
from mypy.types import AnyType, CallableType, Instance, Type, TypeOfAny, get_proper_type

__all__ = ["ActorStubPlugin", "plugin"]

_ACTOR: Final = "ndo.actors._actor.Actor"
_STUB: Final = "ndo.actors._stub.ActorStub"
_METHOD: Final = "ndo.actors._marks.method"
_KEY: Final = "ndo"
"""Key of the plugin's entry in ``TypeInfo.metadata``: ``{"methods": [names]}``."""


class ActorStubPlugin(Plugin):
    """Types ``ActorStub[C].<name>`` as the ``@method`` ``C.<name>`` without ``self``."""

    def get_base_class_hook(self, fullname: str) -> Callable[[ClassDefContext], None] | None:
        """Record the ``@method``s of classes based on ``Actor`` or on a subclass of it."""
        base = self.lookup_fully_qualified(fullname)
        if base and isinstance(base.node, TypeInfo) and base.node.has_base(_ACTOR):
            return _record_methods
        return None  # other plugins may hook this base

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        """Type the attributes ``ActorStub.__getattr__`` answers."""
        if not fullname.startswith(_STUB + "."):
            return None
        return partial(_stub_attribute, name=fullname[len(_STUB) + 1 :])


def _record_methods(ctx: ClassDefContext) -> None:
    """Keep the names of the class's own ``async def``s decorated with ``@method``."""
    info = ctx.cls.info
    info.metadata[_KEY] = {"methods": [n for n, s in info.names.items() if _is_method(s.node)]}


def _is_method(node: object) -> bool:
    """Whether ``node`` is an ``async def`` decorated with ``@method`` (fresh, not cached)."""
    return (
        isinstance(node, Decorator)
        and node.func.is_coroutine
        and any(isinstance(d, RefExpr) and d.fullname == _METHOD for d in node.decorators)
    )


def _methods(info: TypeInfo) -> list[str]:
    """The ``@method`` names of ``info`` and its bases, sorted."""
    return sorted({n for base in info.mro for n in base.metadata.get(_KEY, {}).get("methods", [])})


def _stub_attribute(ctx: AttributeContext, *, name: str) -> Type:
    """The type of ``stub.<name>``: the method's signature without ``self``, or an error."""
    stub = get_proper_type(ctx.type)
    if not isinstance(stub, Instance) or stub.type.fullname != _STUB:
        return ctx.default_attr_type  # a union, or a subclass of ActorStub: left as it is
    if stub.type.get(name) is not None:
        return ctx.default_attr_type  # the stub's own attributes win over methods
    actor = get_proper_type(stub.args[0])
    if not isinstance(actor, Instance) or actor.type.fullname == _ACTOR:
        return ctx.default_attr_type  # Any (a class name) or Actor itself: untyped calls
    methods = _methods(actor.type)
    if name not in methods:
        listed = ", ".join(methods) or "(none)"
        ctx.api.fail(
            f'{actor.type.name} has no @method "{name}"; callable methods: {listed}',
            ctx.context,
            code=ATTR_DEFINED,
        )
        return AnyType(TypeOfAny.from_error)
    node = actor.type.get(name)
    signature = node.node.func.type if node and isinstance(node.node, Decorator) else None
    if not isinstance(signature, CallableType):
        return ctx.default_attr_type  # an unannotated method
    return bind_self(signature, actor)


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point: the plugin class, whatever the mypy ``version``."""
    return ActorStubPlugin
