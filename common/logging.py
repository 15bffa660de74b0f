"""The one logging setup of the mesh (structlog over the standard library).

Every line carries the agent's name, its machine and the current trace id. A
terminal gets readable lines; files get JSON lines, one event per line, so the
supervisor's log collection and any log shipper can parse them.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog
from opentelemetry import trace


def _add_trace_id(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    event.setdefault("trace_id", format(ctx.trace_id, "032x") if ctx.is_valid else None)
    return event


def setup_logging(
    agent: str,
    machine: str,
    *,
    level: str | int = "INFO",
    stream_level: str | int | None = None,
    log_file: Path | None = None,
    stream: TextIO | None = None,
    json_stream: bool | None = None,
) -> None:
    """Configure logging for this process; call once, early, from the entry point.

    `stream` (default stderr) gets readable lines when it is a terminal and JSON
    lines otherwise (override with `json_stream`); `log_file`, when given, always
    gets JSON lines and rotates at 10 MB. `stream_level` (default: `level`) keeps
    a terminal quiet while the file gets everything. Standard-library loggers (grpc, nats,
    asyncio...) go through the same handlers.
    """
    stream = stream or sys.stderr
    if json_stream is None:
        json_stream = not stream.isatty()

    static = {"agent": agent, "machine": machine}

    def _add_static(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in static.items():
            event.setdefault(key, value)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_static,
        _add_trace_id,
        structlog.processors.StackInfoRenderer(),
    ]
    json_formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    console_formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ],
    )

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    stream_handler = logging.StreamHandler(stream)
    stream_handler.setFormatter(json_formatter if json_stream else console_formatter)
    stream_handler.setLevel(stream_level if stream_level is not None else level)
    root.addHandler(stream_handler)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=10 * 1024 * 1024, backupCount=3, encoding="utf-8"
        )
        file_handler.setFormatter(json_formatter)
        root.addHandler(file_handler)
    root.setLevel(level)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structured logger; before `setup_logging` it still works, with structlog's defaults."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
