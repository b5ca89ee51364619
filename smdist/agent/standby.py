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
import subprocess
import sys

from smdist import timeline

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

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
    def __init__(self, proc: subprocess.Popen[bytes], order_fd: int, env: dict[str, str]):
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


def start(args: Sequence[str]) -> None:
    """Start the standby interpreter, unless ``args`` ask for no ranks (first thing, before
    the agent imports anything it does not need for this)."""
    global _standby
    if _standby is not None or not wanted(args, os.environ):
        return
    read_fd, order_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            # The command line's arguments after the two it reads: only for `ps` (which
            # shows rank 0 as the standby it was started as), as the agent's own show them.
            [sys.executable, "-m", MODULE, str(read_fd), str(os.getpid()), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # as every rank: its own group, signalled as one
            pass_fds=(read_fd,),
            # No preexec_fn (it would cost a fork instead of a vfork, and ctypes here): the
            # standby asks for its parent-death signal itself, first thing.
        )
    except OSError:
        os.close(order_fd)
        return  # the ranks start as they always did
    finally:
        os.close(read_fd)
    os.set_inheritable(order_fd, False)
    _standby = Standby(proc, order_fd, dict(os.environ))
    timeline.mark("standby interpreter started")
    from smdist.agent import reaper  # after the start: logging is not on its way

    reaper.adopt(proc.pid)  # ours: a PID-1 agent's reaper never takes its exit status


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


def take(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
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
    with contextlib.suppress(subprocess.TimeoutExpired):
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
