"""The contract between smdist's agent and its ranks: the one place both sides read.

The agent (``smdist/agent/``) and a rank (``smdist/worker/``) are different processes,
often different interpreters; they agree only on what is written here: the variables the
agent sets, the names of the files they share in the run directory, how such a file is
written (never seen half-written), the parent-death signal that keeps no rank orphaned,
the exit code of a signal, which stack frames are the user's code, which hyperparameters
are SageMaker's, and the category names of the failure file.

Standard library only: the worker bootstrap imports it before the user's code runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import site
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

# Every rank imports this module before its first line, and the agent before its first
# rank: only cheap modules here (issue 18). ctypes is loaded where it is needed; secrets,
# sysconfig, dataclasses and typing not at all.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any


class Pattern:
    """A regular expression compiled on its first use (``re`` keeps it compiled): modules on
    every start-up path hold patterns that only a failure reads (issue 18)."""

    __slots__ = ("flags", "pattern")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags

    def search(self, text: str) -> re.Match[str] | None:
        return re.compile(self.pattern, self.flags).search(text)

    def match(self, text: str) -> re.Match[str] | None:
        return re.compile(self.pattern, self.flags).match(text)


# --- the variables the agent sets for every rank ---------------------------------------

AGENT_PID_ENV = "SMDIST_AGENT_PID"
"""Set by smdist's agent for every rank it starts: the decorator does not relaunch."""
OPT_ML_ENV = "SMDIST_OPT_ML"
"""The /opt/ml root (a temporary one in tests and local runs)."""
ERROR_FILE_ENV = "SMDIST_ERROR_FILE"
"""Where the rank's bootstrap records an uncaught exception (``RunDir.error_file``)."""
CONTROL_FILE_ENV = "SMDIST_CONTROL_FILE"
"""Where the agent says why it is about to signal the rank (``RunDir.control_file``)."""
CHECKPOINT_DIR_ENV = "SMDIST_CHECKPOINT_DIR"
STEPS_FILE_ENV = "SMDIST_STEPS_FILE"
STACKS_FILE_ENV = "SMDIST_STACKS_FILE"
"""An MPI rank's: where SIGUSR1 dumps its stacks (``RunDir.stacks_file``), for its own host's
agent to read and log; mpirun would carry its stderr to the master's host only."""
"""The rank's step counter, mapped into its memory (``RunDir.steps_file``, ``smdist.steps``)."""
RESTART_COUNT_ENV = "SMDIST_RESTART_COUNT"
"""Which restart of the job this attempt is (0: the first; torchrun: TORCHELASTIC_RESTART_COUNT)."""
MAX_RESTARTS_ENV = "SMDIST_MAX_RESTARTS"
"""The job's restart budget (also read by the agent, as --max-restarts' default)."""
OUTSIDE_WORLD_ENV = "SMDIST_OUTSIDE_WORLD"
"""Set for the plain process of a host outside the distribution (heterogeneous clusters):
``NUMBER/WORLD_SIZE``, its number after the world's ranks and the world's size."""
MPI_JOB_DIR_ENV = "SMDIST_MPI_JOB_DIR"
"""The MPI job directory: one link per host to that host's ``RunDir`` (``host.json``)."""
MPI_FORWARDED_ENV = "SMDIST_MPI_FORWARDED"
"""Variables the user forwarded with ``-x``: they win over each host's own values."""
MPI_HOSTS_ENV = "SMDIST_MPI_HOSTS"
"""The job's hosts and processes, ``algo-1:2,algo-2:2``, in node-rank order."""
DNS_THREAD_PREFIX = "smdist-dns"
"""The name of the agent's DNS lookup threads: one abandoned when its host's wait ended holds
no one up at exit (``launch._exit_now``)."""
DIE_WITH_ENV = "SMDIST_DIE_WITH"
"""Set only for a rank the agent starts through the bootstrap, to the agent's pid: the rank
asks for the parent-death signal itself (``die_with_agent``), so its start needs no
``preexec_fn`` (a vfork, not a fork of the whole agent). The bootstrap removes it first
thing: the user's code never sees it, and nothing the rank starts inherits it."""


def agent_variables(opt_ml_root: Path) -> dict[str, str]:
    """What every rank this agent starts is told about the agent itself."""
    return {AGENT_PID_ENV: str(os.getpid()), OPT_ML_ENV: str(opt_ml_root)}


def parse_mpi_hosts(text: str) -> list[tuple[str, int]]:
    """``SMDIST_MPI_HOSTS``: ``algo-1:2,algo-2:2`` -> [("algo-1", 2), ("algo-2", 2)]."""
    out = []
    for item in text.split(","):
        host, _, n = item.rpartition(":")
        if not host or not n.isdigit():
            raise ValueError(f"expected HOST:N[,HOST:N...], got {text!r}")
        out.append((host, int(n)))
    return out


def place(hosts: Sequence[tuple[str, int]], rank: int) -> tuple[str, int]:
    """Host and local rank of ``rank`` under ``mpirun --map-by slot``."""
    first = 0
    for host, n in hosts:
        if rank < first + n:
            return host, rank - first
        first += n
    return "?", 0


_RANK_FAILED = Pattern(r"^smdist: rank (\d+) on (\S+) failed \(exit (-?\d+)\)$")


def rank_failed_line(rank: str | int, host: str, code: int) -> str:
    """What a failing MPI rank says on stderr: the launcher's witness when mpirun's own
    report is lost (Open MPI 4.1 sometimes drops it)."""
    return f"smdist: rank {rank} on {host} failed (exit {code})"


def parse_rank_failed_line(line: str) -> tuple[int, str, int] | None:
    """(rank, host, exit code) of a ``rank_failed_line``; None for any other line."""
    m = _RANK_FAILED.match(line)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""torch's variables, set by the agent for every rank whatever the container says."""


# --- the run directory ------------------------------------------------------------------


class RunDir:
    """The files one host's agent shares with its ranks, named once (submitit's ``JobPaths``)."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"RunDir(path={self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    HOST_FILE = "host.json"
    """The MPI backend: this host's rank environment, read by ``smdist.worker.mpi_rank``."""

    def error_file(self, rank: int | str) -> Path:
        return self.path / f"rank-{rank}.error.json"

    def control_file(self, rank: int | str) -> Path:
        return self.path / f"rank-{rank}.control.json"

    def steps_file(self, rank: int | str) -> Path:
        return self.path / f"rank-{rank}.steps"

    def stacks_file(self, rank: int | str) -> Path:
        """An MPI rank's stack dumps (``STACKS_FILE_ENV``)."""
        return self.path / f"rank-{rank}.stacks"

    @property
    def output_times_file(self) -> Path:
        """Under MPI, on the master: each rank's last output time (``hang.OutputTimes``)."""
        return self.path / "output-times"

    def pid_file(self, rank: int | str) -> Path:
        """An MPI rank's pid, written by ``smdist.worker.mpi_rank`` (mpirun started it)."""
        return self.path / f"rank-{rank}.pid"

    @property
    def host_file(self) -> Path:
        return self.path / self.HOST_FILE

    @property
    def launcher_error_file(self) -> Path:
        """The MPI backend's one "worker", mpirun's launcher: the root cause's record."""
        return self.path / "mpirun.error.json"

    @property
    def launcher_control_file(self) -> Path:
        return self.path / "mpirun.control.json"


ABORT = "abort"
"""The control file's action when the job is aborting (a failure elsewhere)."""


def write_control(path: Path, action: str, kind: str, headline: str | None) -> None:
    """Tell a rank why it is about to be signalled (the decorator reads it)."""
    body = {"action": action, "kind": kind, "headline": headline}
    atomic_write(path, json.dumps(body))


def read_control(path: str | None) -> str | None:
    """The action the agent last wrote in a control file; None when there is none."""
    if not path:
        return None
    try:
        action = json.loads(Path(path).read_text(encoding="utf-8")).get("action")
    except (OSError, ValueError, AttributeError):
        return None
    return str(action) if action else None


ERROR_RECORD_VERSION = 1
STACK_DUMP_SIGNAL = signal.SIGUSR1
"""The agent sends it before killing a hung rank: the bootstrap's faulthandler dumps stacks."""


def write_error_record(record: Mapping[str, Any], path: Path) -> bool:
    """Write a rank's error file; the first writer wins (the root exception). Never raises:
    a full disk must not hide the user's own traceback (the agent falls back to stderr)."""
    try:
        return atomic_write(path, json.dumps(record, default=str), exclusive=True)
    except OSError:
        return False


def read_error_record(path: Path | None) -> dict[str, Any] | None:
    """A rank's error file, or None when there is none (or it is not a record)."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_torchelastic_record(data: Mapping[str, Any]) -> bool:
    """Whether an error file is torch elastic's (``@record`` wrote it to
    ``TORCHELASTIC_ERROR_FILE``, the same path), not smdist's bootstrap's."""
    return "version" not in data and isinstance(data.get("message"), Mapping)


# --- the atomic write -------------------------------------------------------------------

TEMP_SUFFIX = ".smdist-tmp"


_TEMP_OWNER = re.compile(r"~(?P<owner>[^~/]+)~\d+-[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")


def temp_path(target: Path, owner: str | None = None) -> Path:
    """A fresh temporary name beside ``target``: hidden, unique, recognisable, and naming
    its ``owner`` (the host writing; default ``SM_CURRENT_HOST``, else the host name). In a
    directory shared between hosts each host's agent removes only its own."""
    owner = owner or os.environ.get("SM_CURRENT_HOST") or os.uname().nodename
    # os.urandom, as secrets.token_hex: nothing to import (a rank may have dropped the
    # privileges to read the interpreter's library by the time it writes its record).
    return target.with_name(
        f".{target.name}~{owner}~{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}"
    )


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an atomic write (in flight or abandoned)."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def temp_owner(path: Path) -> str | None:
    """The host a temp file's write belongs to; None for a name without one."""
    m = _TEMP_OWNER.search(path.name) if is_temp_file(path) else None
    return m["owner"] if m else None


@contextlib.contextmanager
def atomic_open(
    target: Path,
    *,
    binary: bool = False,
    durable: bool = False,
    perms: int = 0o666,
    encoding: str = "utf-8",
    owner: str | None = None,
) -> Iterator[IO[Any]]:
    """Open ``target`` for writing; it appears, complete, only when the block exits cleanly.

    A temporary file in the same directory, then a rename: a reader sees the old file or
    the whole new one. ``durable``: fsync the file and the directory (survives a crash).
    ``owner``: the host writing (see :func:`temp_path`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target, owner)
    # O_EXCL: never share a temp file; 0o666 so the umask decides, as for a plain open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms)
    try:
        f: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)


def atomic_write(
    target: Path, data: str | bytes, *, exclusive: bool = False, perms: int = 0o666
) -> bool:
    """Write ``data`` to ``target`` atomically; raises OSError when the disk refuses.

    ``exclusive``: only if ``target`` does not exist yet (the first writer wins); returns
    whether this call wrote it.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if not exclusive:
        with atomic_open(target, binary=True, perms=perms) as f:
            f.write(raw)
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            os.link(tmp, target)  # atomic, and fails if someone wrote it first
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perms)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the failure file -------------------------------------------------------------------

FAILURE_FILE_LIMIT = 1024
"""SageMaker keeps this much of /opt/ml/output/failure as the job's FailureReason."""


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def clip(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes (so also characters), never half a character."""
    if utf8_size(text) <= limit:
        return text
    return text.encode("utf-8")[: limit - 3].decode("utf-8", errors="ignore") + "..."


def write_failure_file(target: Path, text: str, *, exclusive: bool) -> bool:
    """Write the failure file (clipped to what SageMaker keeps); never raises.

    ``exclusive``: keep a failure file someone (a rank's ``smdist.fail``) wrote first.
    Returns whether this call wrote it.
    """
    try:
        return atomic_write(target, clip(text, FAILURE_FILE_LIMIT), exclusive=exclusive)
    except OSError:
        return False


# --- processes --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None


def _load_prctl() -> Callable[..., int]:
    """libc's prctl, loaded on first need: in the parent before a fork (``exec_dying_with``),
    never between fork and exec (dlopen in a forked child of a threaded process can
    deadlock), or first thing in a rank (``die_with_agent``). Through ``_ctypes`` alone where
    it can: every rank loads it, and ctypes' Python layer doubles the cost (3 ms more)."""
    global _prctl
    if _prctl is None:
        try:
            import _ctypes

            address = _ctypes.dlsym(_ctypes.dlopen(None), "prctl")  # type: ignore[arg-type]
            call = _ctypes.call_function
            _prctl = lambda *args: int(call(address, args))  # noqa: E731
        except (ImportError, AttributeError, OSError):  # another Python's internals
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def die_with_parent(parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies, even by SIGKILL.

    Call it in the child (between fork and exec, or first thing). ``parent``: the pid the
    parent had; False when it is already gone (it died before the request took hold).
    """
    _load_prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return parent is None or os.getppid() == parent


def die_with_agent() -> bool:
    """``die_with_parent`` for a rank whose agent set ``DIE_WITH_ENV`` (removed here): the
    request the agent's ``preexec_fn`` would have made, from the rank's first lines. False
    when the agent is gone already (it died before the request took hold: the rank's parent
    is then another process); True, doing nothing, when the variable is absent or not a pid."""
    value = os.environ.pop(DIE_WITH_ENV, "")
    return not value.isdigit() or die_with_parent(int(value))


def exec_dying_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child dies with ``parent`` (or exits at once, parent gone)."""
    _load_prctl()  # here, in the parent

    def setup() -> None:  # between fork and exec
        if not die_with_parent(parent):
            os._exit(1)

    return setup


def signal_exit_code(signum: int) -> int:
    """The shell's exit code for a process killed by ``signum``: 128+N."""
    return 128 + signum


def exit_code(returncode: int) -> int:
    """A ``Popen.returncode`` (negative for a signal) as the shell reports it."""
    return signal_exit_code(-returncode) if returncode < 0 else returncode


# --- whose code is it -------------------------------------------------------------------

_SMDIST_DIR = os.path.dirname(os.path.abspath(__file__))


def _site_packages() -> list[str]:
    try:
        return list(site.getsitepackages())
    except AttributeError:  # an old virtualenv's site module
        return []


# Computed now, not at failure time: the worker may have dropped privileges or memory since.
# sysconfig's stdlib/platstdlib/purelib/platlib without importing sysconfig: the standard
# library's directory (lib-dynload is inside it), the prefix's (a venv's platstdlib) and
# site's package directories.
_PREFIX_LIB = os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}")
_LIBRARY_DIRS = tuple(
    sorted(
        {os.path.abspath(p) for p in (os.path.dirname(os.__file__), _PREFIX_LIB, *_site_packages())}
    )
)
# Another interpreter's standard library or packages (a frame read back from a log).
_PYTHON_LIB = Pattern(r"/lib(64)?/python\d+(\.\d+)?/")


def is_user_file(filename: str, *, packages: bool = False) -> bool:
    """Whether a stack frame's file is the user's code: not smdist, not Python's library,
    and not an installed package (unless ``packages``: code installed as a package)."""
    if not filename or filename.startswith("<"):
        return False  # <frozen runpy>, <string>
    path = os.path.abspath(filename)
    if path.startswith(_SMDIST_DIR + os.sep):
        return False
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return packages
    if any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS):
        return False
    return not _PYTHON_LIB.search(path)


# --- hyperparameters --------------------------------------------------------------------

FRAMEWORK_PREFIX = "sagemaker_"
FRAMEWORK_HYPERPARAMETERS = (
    "sagemaker_program",
    "sagemaker_submit_directory",
    "sagemaker_enable_cloudwatch_metrics",
    "sagemaker_region",
    "sagemaker_container_log_level",
    "sagemaker_job_name",
    "default_user_module_name",
    "_tuning_objective_metric",
    "sagemaker_s3_output",
)
"""The toolkit's ``params.SAGEMAKER_HYPERPARAMETERS``: two of them without the prefix."""


def is_framework_hyperparameter(name: str) -> bool:
    """Whether a hyperparameter is SageMaker's (the toolkit's rule) rather than the script's."""
    return name in FRAMEWORK_HYPERPARAMETERS or name.startswith(FRAMEWORK_PREFIX)


# --- the failure file's categories ------------------------------------------------------


class Category:
    """The stable first word of the failure file (users grep and alert on these)."""

    # A worker's death, as the agent classifies it.
    MISSING_DEPENDENCY = "MissingDependency"
    OUT_OF_MEMORY = "OutOfMemory"
    DISK_FULL = "DiskFull"
    PERMISSION_DENIED = "PermissionDenied"
    USER_SCRIPT_ERROR = "UserScriptError"
    KILLED = "Killed"
    PEER_FAILURE = "PeerFailure"
    HANG = "Hang"
    """No progress for --hang-timeout (the agent's hang check, not a death)."""
    # smdist's own stages (smdist.errors).
    SMDIST_ERROR = "SmdistError"
    CONFIG_ERROR = "ConfigError"
    ENTRY_POINT_NOT_FOUND = "EntryPointNotFound"
    CODE_DOWNLOAD_FAILED = "CodeDownloadFailed"
    DEPENDENCY_INSTALL_FAILED = "DependencyInstallFailed"
    HOST_RESOLUTION_FAILED = "HostResolutionFailed"
    RENDEZVOUS_FAILED = "RendezvousFailed"
    HOST_LOST = "HostLost"
    JOB_ABORTED = "JobAborted"
    ARTIFACT_ERROR = "ArtifactError"
    MODEL_DIR_CLASH = "ModelDirClash"


# --- a TCP connection to a peer that may not listen yet -----------------------------------

if TYPE_CHECKING:
    import socket


def connect_when_listening(
    host: str,
    port: int,
    budget_s: float,
    pause_s: Callable[[float], float],
    *,
    attempt_timeout_s: float,
    resolve_once: bool = False,
    source: str | None = None,
    on_attempt: Callable[[], object] | None = None,
    on_wait: Callable[[OSError, float], object] | None = None,
) -> socket.socket:
    """A TCP connection to ``host:port``, retried while nothing accepts it there (a peer
    that starts listening a moment later is normal), for at most ``budget_s``.

    Shared by a rank waiting for rank 0's TCPStore and an agent for the master's rendezvous
    store. A try connects to each of the name's addresses in turn (``on_attempt()`` before
    each), for at most ``attempt_timeout_s`` each and never past the budget (but 50 ms at
    least). After a refused try it sleeps ``pause_s(seconds so far)`` (``on_wait(error,
    seconds so far)`` first), unless that sleep would end past the budget: then the last
    error is raised. ``resolve_once``: the name is looked up once, and one that does not
    resolve raises at once; else it is looked up on every try. ``source``: the local
    address to connect from."""
    import socket  # here, not at the top: a rank that never waits pays nothing for it
    import time

    started = time.monotonic()
    deadline = started + budget_s
    kind = socket.SOCK_STREAM
    resolved = socket.getaddrinfo(host, port, type=kind) if resolve_once else None
    while True:
        error: OSError = OSError(f"{host}: getaddrinfo gave no address")
        try:
            addresses = (
                resolved if resolved is not None else socket.getaddrinfo(host, port, type=kind)
            )
        except OSError as exc:
            addresses, error = [], exc
        for family, type_, proto, _name, address in addresses:
            if on_attempt is not None:
                on_attempt()
            sock = None
            try:
                sock = socket.socket(family, type_, proto)
                sock.settimeout(max(0.05, min(attempt_timeout_s, deadline - time.monotonic())))
                if source:
                    sock.bind((source, 0))
                sock.connect(address)
                return sock
            except OSError as exc:
                error = exc
                if sock is not None:
                    sock.close()
        now = time.monotonic()
        pause = pause_s(now - started)
        if now + pause >= deadline:
            raise error
        if on_wait is not None:
            on_wait(error, now - started)
        time.sleep(pause)
