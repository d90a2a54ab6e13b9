"""Logging: what a nightly log needs, through the standard ``logging`` module.

Every module logs to a logger under ``labelmill`` (``labelmill.run``, ``labelmill.openai``, ...):
the start of a run, the resume point, each chunk done, retries, and the summary. The command line
sets them up with :func:`setup`: timestamped text lines on stderr, or one JSON object per line
(``--log-format json``) for log collectors, with the event's fields (chunk, rows, seconds, ...) as
keys. Code using labelmill as a library configures logging as it likes; nothing is set up on import.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

ROOT = "labelmill"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def get(name: str) -> logging.Logger:
    """The logger ``labelmill.<name>``."""
    return logging.getLogger(f"{ROOT}.{name}")


def setup(
    fmt: Literal["text", "json"] = "text", level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send labelmill's log records to ``stream`` (stderr) as text lines or JSON lines. Called
    again, it replaces the handler it installed before."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if getattr(handler, "_labelmill", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._labelmill = True  # type: ignore[attr-defined]
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                datefmt=DATE_FORMAT,
                json_ensure_ascii=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, datefmt=DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event's name and its values, keys of the JSON line."""
    return {"event": event, **values}
