"""structlog setup: JSON lines when not on a terminal, readable lines on one; a line written during a job's
span carries its job_id, tenant, trace_id and span_id."""

from __future__ import annotations

import logging
import sys

import structlog

from shared.telemetry import add_trace_ids


def configure_logging(level: str = "info", fmt: str = "auto", service: str | None = None) -> None:
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # it warns of every TLS connection closed: noise
    json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    processors: list = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    if service:  # on every line, also those of tasks that start from an empty context (a job's run)
        processors.insert(0, lambda _logger, _method, event: {**event, "service": service})
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # FastStream's own per-message lines are noise next to ours; keep its warnings and errors.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
