"""What operators touch: the ``ndo`` command line, the embedded nats-server, logging setup."""

from ndo.ops._errors import (
    BenchError,
    CannotConnectError,
    ConfigFileError,
    NatsServerError,
    OpsError,
    ReplayError,
    StatusError,
)
from ndo.ops._loader import DEFAULT_MODULES, load_actor_classes
from ndo.ops._logging import LogFormat, configure_logging
from ndo.ops._nats_server import ClusterSpec, EmbeddedNatsServer, find_nats_server_binary

__all__ = [
    "DEFAULT_MODULES",
    "BenchError",
    "CannotConnectError",
    "ClusterSpec",
    "ConfigFileError",
    "EmbeddedNatsServer",
    "LogFormat",
    "NatsServerError",
    "OpsError",
    "ReplayError",
    "StatusError",
    "configure_logging",
    "find_nats_server_binary",
    "load_actor_classes",
]
