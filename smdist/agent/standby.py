"""The first rank's interpreter, started with the agent and handed its job later (issue 18).

A one-host job's time-to-ready is the agent's start-up followed by its first rank's: an
interpreter, the bootstrap's imports, then the script's own ``import torch``. The rank's
start-up needs no plan, only the interpreter. So ``smdist-run`` and ``train`` start one
first thing, ``python -m smdist.worker.standby FD AGENT_PID``, which imports the bootstrap and then
waits on a pipe while the agent reads the config, resolves hosts and builds environments.
The supervisor hands it the first rank's arguments, environment and working directory
(:func:`take`) instead of starting another interpreter: on two cores the two start-ups run
side by side.

It is used only where that changes nothing the rank can see: the rank runs the bootstrap in
this interpreter (``sys.executable``), and no variable read while an interpreter starts
(:func:`read_at_start`: ``PYTHON*``, ``LD_*``, the locale's, ``HOME``, ``MALLOC_*``,
``GLIBC_TUNABLES``, ``TZ``) differs between the agent's environment at launch and the
rank's. Otherwise it is ended and the rank starts in a new interpreter, as every other rank
does; ``--check``, ``--simulate`` and ``SMDIST_STANDBY=0`` start none. Its wait is bounded by
the agent's life: the pipe's end closes with the agent (no other process holds it), and it
asks for the parent-death signal (PR_SET_PDEATHSIG) itself while it waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from smdist import timeline

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import IO

DISABLE_ENV = "SMDIST_STANDBY"
"""``0``: start no standby interpreter (every rank starts its own, after the plan)."""
MODULE = "smdist.worker.standby"
BOOTSTRAP = ("-m", "smdist.worker.bootstrap")
_NO_JOB = ("--check", "--simulate", "-h", "--help", "--version")
_NO_JOB_ENV = ("SMDIST_CHECK", "SMDIST_SIMULATE")
_AT_START_PREFIXES = ("PYTHON", "LD_", "LC_", "MALLOC_")
_AT_START_NAMES = frozenset({"LANG", "LANGUAGE", "HOME", "TZ", "GLIBC_TUNABLES"})


def read_at_start(name: str) -> bool:
    """Whether an interpreter or the dynamic loader reads ``name`` before a script's first
    line (sys.path, flags, locale, user site, allocator, time zone): a standby started with
    another value would not be the interpreter the rank would have had."""
    return name.startswith(_AT_START_PREFIXES) or name in _AT_START_NAMES


class Standby:
    def __init__(self, proc: Spawned, order_fd: int, env: dict[str, str]):
        self.proc = proc
        self.order_fd = order_fd
        self.env = env
        """The environment it started with (the agent's at launch)."""


_standby: Standby | None = None


def wanted(args: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this command will run ranks (as far as the command line says, unparsed)."""
    if environ.get(DISABLE_ENV, "").strip() == "0":
        return False
    if any(environ.get(name) for name in _NO_JOB_ENV):
        return False
    return not any(a.split("=", 1)[0] in _NO_JOB for a in args)


class Spawned:
    """What the supervisor uses of ``subprocess.Popen`` (pid, the two pipes, ``wait``,
    ``poll``), for a process started with ``os.posix_spawn``: the standby starts before
    the agent imports subprocess, which costs more than the spawn itself."""

    def __init__(self, pid: int, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = os.fdopen(stdout, "rb")
        self.stderr: IO[bytes] | None = os.fdopen(stderr, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code (as Popen's: -N for signal N); None if ``timeout`` passed first."""
        if self.returncode is None and timeout is not None:
            import select

            pidfd = os.pidfd_open(self.pid)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    return None
            finally:
                os.close(pidfd)
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def start(args: Sequence[str]) -> None:
    """Start the standby interpreter, unless ``args`` ask for no ranks (first thing, before
    the agent imports anything it does not need for this)."""
    global _standby
    if _standby is not None or not wanted(args, os.environ):
        return
    read_fd, order_fd = os.pipe()  # both close-on-exec, as every fd Python opens
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ours = (read_fd, order_fd, out_r, out_w, err_r, err_w)
    try:
        if min(ours) < 3:  # started with a standard stream closed: not worth the care
            raise OSError("a standard stream is closed")
        os.set_inheritable(read_fd, True)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
            # As Popen's close_fds: nothing else the agent inherited reaches the rank.
            *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd != read_fd),
        ]
        pid = os.posix_spawn(
            sys.executable,
            # The command line's arguments after the two it reads: only for `ps` (which
            # shows rank 0 as the standby it was started as), as the agent's own show them.
            [sys.executable, "-m", MODULE, str(read_fd), str(os.getpid()), *args],
            os.environ,
            file_actions=actions,
            setsid=True,  # as every rank: its own session and group, signalled as one
        )
    except OSError:
        for fd in ours:
            os.close(fd)
        return  # the ranks start as they always did
    for fd in (read_fd, out_w, err_w):
        os.close(fd)
    _standby = Standby(Spawned(pid, out_r, err_r), order_fd, dict(os.environ))
    timeline.mark("standby interpreter started")
    from smdist.agent import reaper  # after the start: its imports are not on its way

    reaper.adopt(pid)  # ours: a PID-1 agent's reaper never takes its exit status


def _inheritable_fds() -> list[int]:
    """This process's descriptors above 2 that a spawned process would inherit."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    fds.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
    return fds


def unusable(standby: Standby, argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why the standby cannot run ``argv`` with ``env``, or None when it can."""
    if list(argv[:3]) != [sys.executable, *BOOTSTRAP]:
        return "the first rank does not run in this interpreter's bootstrap"
    code = standby.proc.poll()
    if code is not None:
        return f"it ended (exit {code}) before the agent had a job for it"
    changed = sorted(
        k for k in {*standby.env, *env} if read_at_start(k) and standby.env.get(k) != env.get(k)
    )
    if changed:
        return f"{', '.join(changed)} for the rank differ(s) from the agent's at launch"
    return None


def take(argv: Sequence[str], env: Mapping[str, str]) -> Spawned | None:
    """The standby, now running ``argv`` (``python -m smdist.worker.bootstrap ...``) with
    ``env`` in this process's working directory; None when there is none or it cannot
    (then it is ended, and the caller starts the rank as usual). Called once, for the first
    rank of the first attempt: later calls return None."""
    global _standby
    standby, _standby = _standby, None
    if standby is None:
        return None
    from smdist.log import log

    why = unusable(standby, argv, env)
    if why is None:
        import json

        order = json.dumps({"args": list(argv[3:]), "env": dict(env), "cwd": os.getcwd()})
        rank = env.get("RANK", "0")
        # Said before the order goes: the rank's first line may follow at once.
        log.info(
            "rank %s runs in the interpreter started at launch (pid %d)", rank, standby.proc.pid
        )
        timeline.mark(f"rank {rank} spawned")
        try:
            _write_all(standby.order_fd, order.encode())
        except OSError as exc:  # it ended between the check and the order
            why = f"its order could not be written ({exc.strerror or exc})"
        finally:
            os.close(standby.order_fd)
    if why is not None:
        log.info("the interpreter started at launch was not used: %s", why)
        _end(standby)
        return None
    return standby.proc


def discard() -> None:
    """End the standby if nothing took it (no ranks here, the job failed before them)."""
    global _standby
    standby, _standby = _standby, None
    if standby is not None:
        os.close(standby.order_fd)
        _end(standby)


def _end(standby: Standby) -> None:
    proc = standby.proc
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # it runs nothing of the user's yet
    proc.wait(timeout=5.0)  # a SIGKILL: at once, unless the kernel is stuck
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    from smdist.agent import reaper

    reaper.forget(proc.pid)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
