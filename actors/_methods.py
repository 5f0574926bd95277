"""Declaring callable methods and turning a class into a dispatch table.

``@method`` marks an ``async def`` as callable over NATS. ``describe_class`` reads the marked
methods once, and for each builds a msgspec Struct from its signature: the request body is
decoded straight into that Struct, so annotations drive validation and a wrong type is a 400
before the handler runs. A body nested deeper than ``MAX_NESTING`` is a 400 too: every later
step (storing the value, the reply, the journal) re-encodes it, and none of them may meet a
value too deep to encode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, get_type_hints

import msgspec

from ndo.actors._actor import Actor
from ndo.actors._errors import BadRequestError, NotFoundError
from ndo.actors._marks import is_method, method
from ndo.subjects import InvalidSubjectError, validate_name

__all__ = [
    "MAX_NESTING",
    "ActorClassInfo",
    "MethodSpec",
    "describe_class",
    "describe_classes",
    "is_method",
    "method",
]

RESERVED_METHODS: Final = frozenset(
    {"on_start", "on_stop", "alarm", "emit", "storage", "id", "call", "now", "caller"}
)
"""Names a ``@method`` may not use: they are hooks or attributes of ``Actor``."""

MAX_NESTING: Final = 128
"""Deepest nesting of arrays and objects (maps) in a request body, the body's own object
counted as level 1; deeper is a 400 ``too_deeply_nested``."""

_NESTING_TYPES: Final = (list, tuple, dict, set, frozenset, msgspec.Struct)
"""What a decoded body nests in (a user type other than a Struct counts as a leaf)."""
_JSON_OPENERS: Final = b"[{"
"""Bytes that open a JSON array or object."""
_PARENS: Final = bytes.maketrans(b"[{]}", b"(())")
"""Both JSON bracket kinds as one kind (a valid body's brackets pair up)."""
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_MSGPACK_OPENERS: Final = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
"""First bytes of MessagePack arrays and maps (fixmap, fixarray, array 16/32, map 16/32)."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One callable method: its name, its function and its argument codec."""

    name: str
    function: Callable[..., Coroutine[Any, Any, Any]]
    args_type: type[msgspec.Struct]
    """Struct with one field per parameter; decoding the body into it validates the call."""
    return_type: Any
    """The annotated return type (``Any`` when absent), used by clients to decode replies."""
    json_decoder: msgspec.json.Decoder[Any]
    msgpack_decoder: msgspec.msgpack.Decoder[Any]

    def decode_args(self, body: bytes, msgpack: bool = False) -> msgspec.Struct:
        """Decode and validate a request body into the argument Struct.

        Raises:
            BadRequestError: the body is not an object of the right fields and types, or it
                nests deeper than ``MAX_NESTING``.
        """
        if not body:
            body = b"\x80" if msgpack else b"{}"
        try:
            if msgpack:
                args: msgspec.Struct = self.msgpack_decoder.decode(body)
            else:
                args = self.json_decoder.decode(body)
        except RecursionError:  # deeper than the interpreter's stack allows
            raise _too_deeply_nested() from None
        except msgspec.ValidationError as exc:
            raise BadRequestError(
                f"invalid arguments for {self.name}: {exc}", type="invalid_arguments"
            ) from None
        except msgspec.DecodeError as exc:
            kind = "MessagePack" if msgpack else "JSON"
            raise BadRequestError(
                f"request body is not valid {kind}: {exc}; send a {kind} object of keyword "
                "arguments (or an empty body)",
                type="malformed_body",
            ) from None
        if _nests_deeper(body, args, msgpack):
            raise _too_deeply_nested()
        return args

    def call(self, instance: Actor, args: msgspec.Struct) -> Coroutine[Any, Any, Any]:
        """Start the handler coroutine on ``instance`` with decoded ``args``."""
        return self.function(instance, **msgspec.structs.asdict(args))


@dataclass(frozen=True, slots=True)
class ActorClassInfo:
    """An actor class and its callable methods, read once at registration."""

    name: str
    cls: type[Actor]
    methods: dict[str, MethodSpec]
    has_alarm: bool
    """Whether the class defines ``async def alarm(self, info)``."""
    has_on_stop: bool = False
    """Whether the class overrides ``Actor.on_stop`` (the runtime runs none otherwise)."""

    def method_spec(self, name: str) -> MethodSpec:
        """The callable method ``name``.

        Raises:
            NotFoundError: the class has no ``@method`` of that name (the message lists them).
        """
        spec = self.methods.get(name)
        if spec is None:
            raise NotFoundError(
                f"{self.name} has no method {name!r}; callable methods: "
                f"{', '.join(sorted(self.methods)) or '(none)'}",
                type="unknown_method",
            )
        return spec


def _too_deeply_nested() -> BadRequestError:
    return BadRequestError(
        f"request body is nested more than {MAX_NESTING} levels deep (arrays and objects "
        "inside each other, the body's own object counted); send a flatter value",
        type="too_deeply_nested",
    )


def _nests_deeper(body: bytes, args: msgspec.Struct, msgpack: bool) -> bool:
    """Whether a decoded body nests arrays and objects deeper than ``MAX_NESTING``.

    Most bodies are cleared by one C-speed count: fewer bytes that could open an array or
    object than the limit. Others are measured: JSON on its bytes (``_json_nests_deeper``),
    MessagePack on the decoded value (``_value_nests_deeper``).
    """
    if len(body) <= MAX_NESTING:
        return False
    openers = _MSGPACK_OPENERS if msgpack else _JSON_OPENERS
    if len(body) - len(body.translate(None, openers)) <= MAX_NESTING:
        return False
    return _value_nests_deeper(args) if msgpack else _json_nests_deeper(body)


def _json_nests_deeper(body: bytes) -> bool:
    """Measure valid JSON's nesting with bytes operations only: drop the strings, keep the
    brackets, then strip innermost pairs once per level."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes: no quote left inside
    outside = b"".join(text.split(b'"')[::2])  # valid JSON: odd parts are string contents
    brackets = outside.translate(_PARENS, _NOT_BRACKETS)
    for _ in range(MAX_NESTING):
        if not brackets:
            return False
        brackets = brackets.replace(b"()", b"")
    return bool(brackets)


def _value_nests_deeper(args: msgspec.Struct) -> bool:
    """Measure a decoded value's nesting (``args`` is level 1), level by level without
    recursion; map keys count (MessagePack keys may be arrays)."""
    level: list[Any] = [args]
    for _ in range(MAX_NESTING):
        children: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                children.extend(node)
                children.extend(node.values())
            elif isinstance(node, msgspec.Struct):
                children.extend(msgspec.structs.astuple(node))
            else:
                children.extend(node)
        kinds = set(map(type, children))  # a long list of scalars is cleared at C speed
        if not any(issubclass(kind, _NESTING_TYPES) for kind in kinds):
            return False
        level = [child for child in children if isinstance(child, _NESTING_TYPES)]
    return True


def _method_spec(cls: type[Any], name: str, fn: Callable[..., Any]) -> MethodSpec:
    try:
        validate_name(name, "method")
    except InvalidSubjectError as exc:
        raise TypeError(f"{cls.__name__}.{name}: {exc}") from None
    if name in RESERVED_METHODS or name.startswith("_"):
        raise TypeError(
            f"{cls.__name__}.{name}: '{name}' cannot be a @method (reserved or private name)"
        )
    hints = get_type_hints(fn, include_extras=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    params = list(inspect.signature(fn).parameters.values())[1:]  # skip self
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(
                f"{cls.__name__}.{name}: parameter {param.name!r} must be a plain or keyword-only "
                "parameter (no *args, **kwargs or positional-only)"
            )
        annotation = hints.get(param.name, Any)
        if param.default is inspect.Parameter.empty:
            fields.append((param.name, annotation))
        else:
            fields.append((param.name, annotation, param.default))
    # Required fields must come first in a Struct; kw_only lifts that ordering rule.
    args_type = msgspec.defstruct(
        f"{cls.__name__}_{name}_args", fields, kw_only=True, forbid_unknown_fields=True
    )
    return MethodSpec(
        name=name,
        function=fn,
        args_type=args_type,
        return_type=hints.get("return", Any),
        json_decoder=msgspec.json.Decoder(args_type),
        msgpack_decoder=msgspec.msgpack.Decoder(args_type),
    )


def describe_class(cls: type[Actor]) -> ActorClassInfo:
    """Read an ``Actor`` subclass's ``@method``s into an ``ActorClassInfo``.

    Raises:
        TypeError: the class name or a method signature cannot be served, with the reason.
    """
    try:
        validate_name(cls.__name__, "class")
    except InvalidSubjectError as exc:
        raise TypeError(str(exc)) from None
    methods: dict[str, MethodSpec] = {}
    for klass in reversed(cls.__mro__):
        for name, fn in vars(klass).items():
            if is_method(fn):
                methods[name] = _method_spec(cls, name, fn)
    alarm = getattr(cls, "alarm", None)
    return ActorClassInfo(
        name=cls.__name__,
        cls=cls,
        methods=methods,
        has_alarm=alarm is not None and inspect.iscoroutinefunction(alarm),
        has_on_stop=_has_on_stop(cls),
    )


def _has_on_stop(cls: type[Actor]) -> bool:
    """Whether ``cls`` overrides ``Actor.on_stop``.

    Raises:
        TypeError: its ``on_stop`` is not an ``async def``.
    """
    on_stop = getattr(cls, "on_stop", Actor.on_stop)
    if on_stop is Actor.on_stop:
        return False
    if not inspect.iscoroutinefunction(on_stop):
        raise TypeError(f"{cls.__name__}.on_stop must be an 'async def'")
    return True


def describe_classes(classes: Iterable[type[Actor]]) -> dict[str, ActorClassInfo]:
    """Describe the classes a worker serves, by name.

    Raises:
        TypeError: a class cannot be served (see ``describe_class``).
        ValueError: two different classes share a name, or there is no class at all.
    """
    described: dict[str, ActorClassInfo] = {}
    for cls in classes:
        info = describe_class(cls)
        known = described.get(info.name)
        if known is not None and known.cls is not cls:
            raise ValueError(f"two actor classes are named {info.name!r}; names must be unique")
        described[info.name] = info
    if not described:
        raise ValueError("no actor classes to serve")
    return described
