"""structlog, configured once per process: console on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import structlog


def configure_logging(level: str = "info", *, json_file: Path | None = None) -> None:
    """Configure structlog and stdlib logging. JSON when not on a terminal or when writing a file."""
    stream: TextIO = open(json_file, "a", buffering=1) if json_file else sys.stderr
    as_json = json_file is not None or not stream.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=stream)
