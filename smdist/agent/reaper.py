"""PID 1's other duty: reap the orphans the job leaves behind.

In a container (``docker run IMAGE train``) the agent is PID 1, and every process whose
parent dies is handed to it: a DataLoader worker whose rank crashed, a compiler's helper,
sshd's daemon. Nobody else will ``wait()`` for them, so each one that exits stays a zombie
(a process-table slot, a pid) for the rest of a job that may run for a week and restart its
ranks many times.

Only zombies the agent did not start itself are reaped: a child the agent waits for (a
worker, a pip install, ssh-keygen) must keep its exit status, or ``Popen.wait()`` would see
ECHILD and report success. The agent's own children are told apart by their session: the
workers (each in a session of its own) are registered here under :data:`spawning` while
they start, and everything else the agent runs stays in the agent's session. An orphan is
a zombie child of this process in another session that is not a registered worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from smdist.log import log

REAP_INTERVAL_S = 2.0
"""How often PID 1 looks for exited orphans (they cost a pid each, not CPU)."""

_lock = threading.Lock()
_own: set[int] = set()
_started = False


@contextmanager
def spawning() -> Iterator[set[int]]:
    """Hold while starting a worker and add its pid to the yielded set before leaving:
    the reaper never sees a worker between its exit and its registration."""
    with _lock:
        yield _own


def adopt(pid: int) -> None:
    """``pid`` is a worker started outside :func:`spawning` (before any reaping began)."""
    with _lock:
        _own.add(pid)


def forget(pid: int) -> None:
    """The worker ``pid`` has been waited for: its number may be reused by an orphan."""
    with _lock:
        _own.discard(pid)


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(name, state, ppid, session) of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    name_end = raw.rfind(")")
    fields = raw[name_end + 2 :].split()
    if len(fields) < 4:
        return None
    name = raw[raw.find("(") + 1 : name_end]
    return name, fields[0], int(fields[1]), int(fields[3])


def reap_orphans() -> list[tuple[int, str, int]]:
    """Reap every exited orphan now: [(pid, name, wait status)]."""
    me = os.getpid()
    my_session = os.getsid(0)
    reaped: list[tuple[int, str, int]] = []
    with _lock:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            st = _stat(pid)
            if st is None or st[1] != "Z" or st[2] != me or st[3] == my_session:
                continue
            if pid in _own:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                reaped.append((pid, st[0], status))
    return reaped


def _loop(stop: threading.Event) -> None:
    told = False
    while not stop.wait(REAP_INTERVAL_S):
        try:
            reaped = reap_orphans()
        except OSError as e:  # /proc not mounted: nothing to do for the rest of the job
            log.warning("cannot look for orphaned processes to reap (%s): leaving them", e)
            return
        for pid, name, status in reaped:
            how = f"exit code {os.waitstatus_to_exitcode(status)}"
            if not told:
                log.info(
                    "as PID 1, reaping orphaned processes of the job (first: pid %d %s, %s)",
                    pid,
                    name,
                    how,
                )
                told = True
            else:
                log.debug("reaped orphan pid %d %s, %s", pid, name, how)


def start_if_pid1() -> threading.Event | None:
    """Start reaping when this process is PID 1 (once); return the event that stops it."""
    global _started
    if os.getpid() != 1 or _started:
        return None
    _started = True
    stop = threading.Event()
    threading.Thread(target=_loop, args=(stop,), name="smdist-reaper", daemon=True).start()
    return stop
