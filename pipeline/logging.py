"""structlog set-up: contextvars first, JSON in production, pretty on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from pipeline.config import LogFormat

_SECRET_KEYS = ("password", "secret", "token", "sasl_plain_password")


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in event:
        if any(s in key.lower() for s in _SECRET_KEYS):
            event[key] = "***"
    return event


#: Longest text a log field keeps: fields can carry what a client sent (names, ids, errors).
MAX_FIELD_CHARS = 1000


def _truncate(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            event[key] = f"{value[:MAX_FIELD_CHARS]}... ({len(value)} characters)"
    return event


def configure_logging(
    *,
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    dependencies: str = "warning",
) -> None:
    """Configure structlog, and the stdlib loggers of our dependencies at ``dependencies``.

    One-shot commands pass ``dependencies="critical"``: they report failures themselves in
    one line, so aiokafka's own error lines would only repeat them.
    """
    out = stream or sys.stderr
    pretty = fmt == "console" or (fmt == "auto" and out.isatty())
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        _truncate,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.getLevelName(dependencies.upper())))
