"""Errors of the ``ndo`` commands; each message says what to do, and the CLI prints it as is.

    OpsError (RuntimeError)
    ├── NatsServerError      the embedded nats-server cannot be found, started or reached
    ├── CannotConnectError   a one-shot command cannot reach the NATS server
    ├── ConfigFileError      ``--config`` cannot be read or names unknown options (also ValueError)
    ├── StatusError          the deployment's lease bucket cannot be read
    ├── ReplayError          ``ndo replay`` / ``ndo tail`` cannot run
    └── BenchError           the benchmark harness cannot run

Apart from ``NatsServerError`` for a port briefly taken, retrying the same command in the same
environment fails the same way.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "CannotConnectError",
    "ConfigFileError",
    "NatsServerError",
    "OpsError",
    "ReplayError",
    "StatusError",
]


class OpsError(RuntimeError):
    """Base of the ``ndo`` commands' errors."""


class NatsServerError(OpsError):
    """The ``nats-server`` process could not be found, started or reached.

    The message says what to do: install the binary, free the port, or read the attached log
    tail. Retrying helps only when the cause was transient (for example a port briefly taken).
    """


class CannotConnectError(OpsError):
    """The NATS server at the given URL could not be reached."""


class ConfigFileError(OpsError, ValueError):
    """The config file cannot be read, is not TOML, or names options that do not exist.

    The message does not repeat the file's path; callers put it in front."""


class StatusError(OpsError):
    """The deployment's lease bucket cannot be read (no JetStream, no bucket, no server)."""


class ReplayError(OpsError):
    """Replay cannot run (``EXIT_ERROR``); the message says what is missing and what to do."""


class BenchError(OpsError):
    """The harness could not run (a process did not start, a generator failed)."""
