"""structlog, configured once per process: console on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import structlog


def configure_logging(
    level: str = "info",
    *,
    json_file: Path | None = None,
    observers: Sequence[structlog.types.Processor] = (),
) -> None:
    """Configure structlog and stdlib logging. JSON when not on a terminal or when writing a file.

    ``observers`` see every event that passes the level filter (a worker's error tally)."""
    stream: TextIO = open(json_file, "a", buffering=1) if json_file else sys.stderr
    as_json = json_file is not None or not stream.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *observers,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=stream)
