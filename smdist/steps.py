"""The step counter a rank bumps and its agent reads: how hang detection and step rates
know a rank is making progress, at no measurable cost per step.

Shared by both sides. The agent creates one 8-byte file per rank in its run dir and names
it in ``SMDIST_STEPS_FILE``; the rank maps it into memory and adds one per step (each read
of ``ctx.should_stop``, or ``smdist.progress()``): no system call, no store round trip. The
agent maps the same file and reads the counter when it looks (about once a second).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from smdist.contract import STEPS_FILE_ENV

SIZE = 8
FINISHED = 1 << 63
"""Set in the counter (beside the count) when the rank's training function or script ended:
what follows is its way out (meeting its peers at the end, freeing the process group, the
interpreter's teardown), which the agent gives ``--hang-timeout`` afresh."""


class StepCounter:
    """One rank's counter, mapped into this process."""

    __slots__ = ("_map", "cell", "path")

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.cell = memoryview(self._map).cast("Q")  # one unsigned 64-bit integer

    @classmethod
    def create(cls, path: Path) -> StepCounter:
        """The agent's side: a fresh counter at 0, readable and writable by the rank only."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * SIZE)
        finally:
            os.close(fd)
        return cls(path)

    def read(self) -> tuple[int, bool]:
        """(steps counted, whether the rank has finished)."""
        value = int(self.cell[0])
        return value & ~FINISHED, bool(value & FINISHED)


_counter: StepCounter | None = None
_looked = False


def _open() -> StepCounter | None:
    global _counter, _looked
    _looked = True
    path = os.environ.get(STEPS_FILE_ENV)
    if path:
        try:
            _counter = StepCounter(path)
        except (OSError, ValueError):
            _counter = None
    return _counter


def progress() -> None:
    """Tell smdist this rank made progress (one step). Well under a microsecond.

    The decorator counts every read of ``ctx.should_stop`` already; scripts without it call
    this once per step so that ``--hang-timeout`` can tell a hang from a long step and the
    job's end can name a straggler. Outside smdist-run it does nothing."""
    counter = _counter if _looked else _open()
    if counter is not None:
        counter.cell[0] += 1


def finished() -> None:
    """Tell smdist this rank's work is done: its training function (the decorator) or its
    script (the bootstrap) ended, and it is on its way out. Outside smdist-run it does
    nothing."""
    counter = _counter if _looked else _open()
    if counter is not None:
        counter.cell[0] |= FINISHED
