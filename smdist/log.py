"""The agent's own log lines: ``[smdist algo-1 12:00:01] message`` on stderr."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("smdist")


class _Format(logging.Formatter):
    def __init__(self, host: str) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        stamp = self.formatTime(record, self.datefmt)
        return f"[smdist {self.host} {stamp}] {level}{record.getMessage()}"


def setup(host: str = "-", level: int = logging.INFO) -> logging.Logger:
    """(Re)configure the agent log for ``host``; idempotent."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(host))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return log
