"""Structured log lines: the message followed by the record's `extra=` fields as key=value pairs."""

from __future__ import annotations

import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
PROGRESS_LOGGER = "sstmerge.progress"


class KeyValueFormatter(logging.Formatter):
    """`2026-11-28 10:00:00 INFO sstmerge_core.fisher fisher pass done estimator=sampled examples=64 …`"""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        return line + "".join(f" {k}={v}" for k, v in fields.items())


class StdoutHandler(logging.StreamHandler):
    """A handler that writes to whatever `sys.stdout` is when the record is emitted."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    requested = root.level
    progress_logger().setLevel(logging.INFO if requested <= logging.WARNING else requested)


def progress_logger() -> logging.Logger:
    """The logger of the CLI's progress lines: key=value lines on stdout (where the bar would be), kept off the
    root handlers so that stderr carries only warnings and errors. INFO unless the CLI asked for ERROR or less."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    if not logger.handlers:
        handler = StdoutHandler()
        handler.setFormatter(KeyValueFormatter(FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
