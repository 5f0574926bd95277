"""What hosts of objects need beyond the user API: ndo's worker, ``ndo replay`` and the tools.

Object authors never import this module. It gives a host the description of a class (its
callable methods and their argument codecs), the context an instance is bound to, the per-turn
storage view and the write-set a turn leaves behind, and the wire-error factory the client uses.
"""

from ndo.actors._calls import MAX_CALL_DEPTH, check_chain, incoming_call, outgoing_headers
from ndo.actors._context import ActorContext, CallSender, TurnInfo
from ndo.actors._errors import error_from_wire
from ndo.actors._methods import (
    ActorClassInfo,
    MethodSpec,
    describe_class,
    describe_classes,
    is_method,
)
from ndo.actors._storage import (
    ALARM_REARM_DELAY,
    ALARM_UNCHANGED,
    WRITE_FRAMING,
    StateReader,
    StorageLimits,
    TurnWrites,
    check_quota,
    prefix_range,
)
from ndo.actors._stub import EventSource, Transport, TurnTransport

__all__ = [
    "ALARM_REARM_DELAY",
    "ALARM_UNCHANGED",
    "MAX_CALL_DEPTH",
    "WRITE_FRAMING",
    "ActorClassInfo",
    "ActorContext",
    "CallSender",
    "EventSource",
    "MethodSpec",
    "StateReader",
    "StorageLimits",
    "Transport",
    "TurnInfo",
    "TurnTransport",
    "TurnWrites",
    "check_chain",
    "check_quota",
    "describe_class",
    "describe_classes",
    "error_from_wire",
    "incoming_call",
    "is_method",
    "outgoing_headers",
    "prefix_range",
]
