"""Logging setup: the only place that configures structlog (console on a terminal, else JSON)."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ["LogFormat", "configure_logging", "quiet_tls_eof_warning"]

LogFormat = Literal["auto", "console", "json"]


_TLS_EOF_WARNING = "returning true from eof_received() has no effect when using ssl"
"""asyncio's warning whenever a nats-py TLS connection closes (nats-io/nats.py#574): harmless."""


def _not_tls_eof(record: logging.LogRecord) -> bool:
    return _TLS_EOF_WARNING not in record.getMessage()


def quiet_tls_eof_warning() -> None:
    """Drop asyncio's harmless warning about TLS connections closing (once per process)."""
    asyncio_log = logging.getLogger("asyncio")
    if _not_tls_eof not in asyncio_log.filters:
        asyncio_log.addFilter(_not_tls_eof)


def configure_logging(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Configure structlog for the process.

    Args:
        log_format: ``console`` (coloured, for people), ``json`` (one object per line, for
            machines) or ``auto`` (console when stderr is a terminal).
        level: minimum level name (debug, info, warning, error).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
