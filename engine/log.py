"""Structured logs (structlog): JSON lines, one event name per fact.

Callers pass ids, types, channels and peers only; never message bodies or field
values. ``safe_error`` reduces an exception to its class name and errno so that a
library error that quotes data cannot carry patient data into a log.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str | None = None, *, stream=None, json: bool | None = None) -> None:
    level_name = (level or os.environ.get("KOPPEL_LOG_LEVEL") or "info").lower()
    if level_name not in LEVELS:
        raise ValueError(f"unknown log level {level_name!r}; use one of {', '.join(LEVELS)}")
    stream = stream or sys.stdout
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level_name]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context):
    return structlog.get_logger("koppel").bind(**context)


def safe_error(error: BaseException) -> str:
    """An exception as ``ClassName`` or ``ClassName(errno)``: no message text."""
    errno = getattr(error, "errno", None)
    name = type(error).__name__
    return f"{name}({errno})" if errno is not None else name


class Repeats:
    """Summarise an event that repeats (a destination down, a scanner knocking).

    ``count(key)`` returns how many times ``key`` was seen when this occurrence should be
    logged (the first three, then the 4th, 8th, 16th, ...), else None. Keys are bounded:
    past ``limit`` distinct keys the table starts afresh rather than grow.
    """

    def __init__(self, *, first: int = 3, limit: int = 1024) -> None:
        self._first = first
        self._limit = limit
        self._seen: dict[object, int] = {}

    def count(self, key: object) -> int | None:
        if key not in self._seen and len(self._seen) >= self._limit:
            self._seen.clear()
        seen = self._seen.get(key, 0) + 1
        self._seen[key] = seen
        if seen <= self._first or seen & (seen - 1) == 0:
            return seen
        return None

    def reset(self) -> None:
        self._seen.clear()
