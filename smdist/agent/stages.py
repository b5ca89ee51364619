"""The agent's stage, and SIGTERM/SIGINT in every stage from its first instruction.

In a container the agent is PID 1, and the kernel drops every signal PID 1 has no handler
for: without one, ``docker stop`` or StopTrainingJob while a host waits for DNS (up to 15
minutes) or for the rendezvous (10) is ignored until SIGKILL. :func:`install` runs first
thing in ``main``; from then on a stop

- before the workers run (config, code, preflight, the DNS wait, the rendezvous wait,
  launch) raises :class:`StopRequested` in the main thread. Python runs signal handlers
  there, so the exception unwinds whatever the stage waits in (a backoff sleep, a socket
  read, a lock, a child process) at once: every wait is interrupted by a stop. The agent
  then tells the other hosts when the store is up, and says in its log and failure file
  at which stage it was stopped;
- while the workers run and at the exit barrier reaches the supervisor, which owns the
  signals then (the workers get ``--grace`` to checkpoint);
- while the report is written is logged; the report (milliseconds) is finished.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from smdist import contract
from smdist.errors import SmdistError
from smdist.log import log
from smdist.records import dataclass, field

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop reached the agent before its workers ran.

    A BaseException, like KeyboardInterrupt: no ``except Exception`` in a wait (a retry
    policy, a DNS library) may swallow it.
    """

    def __init__(self, signum: int, stage: str) -> None:
        self.signum = signum
        self.signame = signal.Signals(signum).name
        self.stage = stage
        super().__init__(f"{self.signame} received during {stage}")

    @property
    def exit_code(self) -> int:
        return contract.signal_exit_code(self.signum)

    def describe(self, host: str) -> str:
        """``SIGTERM received on algo-1 during the DNS wait, before the workers started``."""
        on = f" on {host}" if host and host != "-" else ""
        return f"{self.signame} received{on} during {self.stage}, before the workers started"


class Stopped(SmdistError):
    """The failure-file form of a stop before the workers ran (here or on another host)."""

    category = "Stopped"
    where = ""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _State:
    stage: str = "start-up"
    interruptible: bool = True
    stop: StopRequested | None = None
    pending: list[int] = field(default_factory=list)


_state = _State()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if _state.interruptible and _state.stop is None:
        _state.stop = StopRequested(signum, _state.stage)
        _state.interruptible = False  # telling the others and the report run to their end
        raise _state.stop
    _state.pending.append(signum)
    log.info("%s received during %s: finishing it", signal.Signals(signum).name, _state.stage)


def install() -> None:
    """Handle SIGTERM and SIGINT from now on (the main thread only can: elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def enter(stage: str, *, interruptible: bool = True) -> None:
    """The agent is now in ``stage`` (as the log and failure file name it, e.g. "the DNS
    wait"). ``interruptible=False``: a stop is only logged, the stage runs to its end."""
    _state.stage = stage
    _state.interruptible = interruptible and _state.stop is None


def take_pending() -> list[int]:
    """Stops received while no stage could be interrupted; the supervisor takes over the
    ones that arrive between entering its stage and installing its own handlers."""
    taken, _state.pending[:] = list(_state.pending), []
    return taken


def current() -> str:
    return _state.stage


def stop_received() -> StopRequested | None:
    """The stop that ended the agent's stages early, if one did."""
    return _state.stop
