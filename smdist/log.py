"""The agent's own log lines: ``[smdist algo-1 12:00:01] message`` on stderr.

Not the logging module: with what it imports (traceback, string, weakref, ...) it was 31 M of
the agent's instructions before its first rank, about a quarter of its own (issue 18,
cachegrind). The agent needs one format, one stream, a level, and whole lines from several
threads; ``log.info("%s ready", host)`` reads as it did with logging. A test (or a tool)
watches the lines with :meth:`Log.add_listener`.
"""

from __future__ import annotations

import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_PREFIX = {DEBUG: "DEBUG: ", WARNING: "WARNING: ", ERROR: "ERROR: "}


class Log:
    """One line per call on ``sys.stderr`` (the stream of the moment), at ``level`` or above."""

    def __init__(self) -> None:
        self.host = "-"
        self.level = INFO
        # Reentrant: a signal handler that logs runs on the thread that may hold it.
        self._lock = threading.RLock()
        self._listeners: list[Callable[[int, str], None]] = []

    def debug(self, msg: str, *args: object, exc_info: object = None) -> None:
        """``exc_info`` is accepted as logging's is, and not printed (nor was it before)."""
        if self.level <= DEBUG:
            self._emit(DEBUG, msg, args)

    def info(self, msg: str, *args: object) -> None:
        if self.level <= INFO:
            self._emit(INFO, msg, args)

    def warning(self, msg: str, *args: object) -> None:
        if self.level <= WARNING:
            self._emit(WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(ERROR, msg, args)

    def exception(self, msg: str, *args: object) -> None:
        """An error line (the exception's traceback is not the log's: the failure file and
        the error record carry what a user needs)."""
        self._emit(ERROR, msg, args)

    def add_listener(self, listener: Callable[[int, str], None]) -> None:
        """Call ``listener(level, message)`` for every line written from now on."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int, str], None]) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def _emit(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):  # a bad format string loses nothing of the line
            text = f"{msg} {args!r}"
        line = f"[smdist {self.host} {time.strftime('%H:%M:%S')}] {_PREFIX.get(level, '')}{text}\n"
        with self._lock:
            for listener in self._listeners:
                listener(level, text)
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed or gone: the job goes on
                pass


log = Log()


def setup(host: str = "-", level: int = INFO) -> Log:
    """(Re)configure the agent log for ``host``; idempotent."""
    log.host = host
    log.level = level
    return log
