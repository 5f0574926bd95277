"""The error hierarchy shared by objects, the runtime and the client.

Every error has an HTTP-like wire ``code`` and a stable ``type`` string; the runtime sends both
in the ``Nats-Service-Error-Code`` / ``Nats-Service-Error`` headers and a JSON body
``{"error": {"code": ..., "type": ..., "message": ...}}``. ``error_from_wire`` turns them back
into these exceptions on the client. A handler may raise any of them on purpose (for example
``ConflictError``) and the caller receives that code.

::

    ActorError                     base; .code, .type, .message, .retryable
    ├── BadRequestError        400 malformed body, wrong argument types, invalid id or key
    ├── PermissionDeniedError  403 NATS permissions refuse the call, or the object refuses
    │                              this caller
    ├── NotFoundError          404 unknown class or method
    ├── ConflictError          409 the object refuses the call in its current state; an
    │                              idempotency key reused for another call
    ├── PayloadTooLargeError   413 request, reply, key, value, turn or object over a limit
    ├── HandlerError           500 the handler raised (its writes were discarded), storage
    │                              refused the write, or a bug in ndo (with a request id)
    ├── UnavailableError       503 no worker, overloaded, object moving, storage busy or failed
    │                              (retry)
    ├── DeadlineExceededError  504 the handler ran past its deadline; writes discarded
    └── CallTimeoutError       no reply in time (client side; also a TimeoutError)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ActorError",
    "BadRequestError",
    "CallTimeoutError",
    "ConflictError",
    "DeadlineExceededError",
    "HandlerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "UnavailableError",
    "error_from_wire",
]


class ActorError(Exception):
    """Base of every ndo call error. ``retryable`` says whether the same call may succeed later."""

    code: ClassVar[int] = 500
    """HTTP-like wire code."""
    default_type: ClassVar[str] = "error"
    """Wire ``type`` used when none is given."""
    retryable: ClassVar[bool] = False
    """True when retrying the same call can succeed (transient failure)."""

    type: str
    """Stable machine-readable error type, e.g. ``unknown_method``."""
    message: str
    """Human-readable description, saying what to do where possible."""

    def __init__(self, message: str, *, type: str | None = None) -> None:
        """Create an error with a message and an optional specific ``type``."""
        self.message = message
        self.type = type or self.default_type
        super().__init__(message)

    def to_wire(self) -> dict[str, object]:
        """Return the ``error`` object of the wire body."""
        return {"code": self.code, "type": self.type, "message": self.message}


class BadRequestError(ActorError):
    """The request is malformed or its arguments have the wrong types. Deterministic."""

    code = 400
    default_type = "bad_request"


class PermissionDeniedError(ActorError):
    """The caller may not make this call: the NATS server's permissions refused the request
    (raised by the client at once, naming the subject), or the object refused this caller
    (a handler raises it after checking ``self.caller``). Deterministic."""

    code = 403
    default_type = "permission_denied"


class NotFoundError(ActorError):
    """The class or method does not exist (or is not a ``@method``). Deterministic."""

    code = 404
    default_type = "not_found"


class ConflictError(ActorError):
    """The object refused the call in its current state. May succeed after the state changes."""

    code = 409
    default_type = "conflict"


class PayloadTooLargeError(ActorError):
    """A request, reply, key or value is over its configured limit. Deterministic."""

    code = 413
    default_type = "payload_too_large"


class HandlerError(ActorError):
    """The handler raised; its writes were discarded and the instance was rebuilt."""

    code = 500
    default_type = "handler_error"


class UnavailableError(ActorError):
    """No worker could take the call right now (none running, overloaded, moving). Transient."""

    code = 503
    default_type = "unavailable"
    retryable = True


class DeadlineExceededError(ActorError):
    """The handler ran past the worker's deadline; its writes were discarded."""

    code = 504
    default_type = "deadline_exceeded"


class CallTimeoutError(ActorError, TimeoutError):
    """No reply arrived in time. The call may or may not have been applied; retry with the same
    idempotency key to find out without applying it twice."""

    code = 408
    default_type = "timeout"
    retryable = True


_BY_CODE: dict[int, type[ActorError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        PayloadTooLargeError,
        HandlerError,
        UnavailableError,
        DeadlineExceededError,
        CallTimeoutError,
    )
}


def error_from_wire(code: int, message: str, type: str | None = None) -> ActorError:
    """Build the exception matching a wire error code (unknown codes give ``ActorError``)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = ActorError(message, type=type)
        err.code = code  # type: ignore[misc]  # keep the unknown code visible to the caller
        return err
    return cls(message, type=type)
