"""Failures as values: what died, where, why, and the text SageMaker shows.

``/opt/ml/output/failure``'s first 1024 characters become the job's FailureReason, so
``report`` writes a whole file that fits: the root cause's category, reason, host, rank
and exit code on the first line, then the innermost user frames and a hint. The full
story (every rank, tracebacks, stderr tails, timings) goes to
``/opt/ml/output/data/smdist-failure.json``, which SageMaker uploads with the output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from smdist import contract
from smdist.config import Paths, resolve_root
from smdist.contract import Category
from smdist.errors import SmdistError

FAILURE_FILE_LIMIT = 1024
REPORT_NAME = "smdist-failure.json"
OUTPUT_DIR_ENV = "SM_OUTPUT_DIR"


@dataclass(frozen=True)
class WorkerFailure:
    """One worker that did not exit 0."""

    host: str
    rank: int
    local_rank: int
    returncode: int
    """As Popen gives it: negative for a signal."""
    time: float
    error_file: Path | None = None
    stderr_tail: tuple[str, ...] = field(default=(), repr=False)
    peer_stopped: bool = False
    """Stopped by smdist because of another failure (a victim, never the root cause)."""
    record: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """The error file's content, when it travelled (from another host) instead of the path."""

    @property
    def exit_code(self) -> int:
        """The shell convention: 128+N for signal N."""
        return contract.exit_code(self.returncode)

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def error_record(self) -> dict[str, Any] | None:
        """The bootstrap's error file, if the worker died of a recorded exception."""
        if self.record is not None:
            return dict(self.record)
        data = contract.read_error_record(self.error_file)
        if data is not None and contract.is_torchelastic_record(data):
            return from_torchelastic(data)  # @record wrote it; the bootstrap did not run
        return data

    def describe(self) -> str:
        where = f"host {self.host}, rank {self.rank}"
        if self.signal_name:
            return f"{where}, killed by {self.signal_name}"
        return f"{where}, exit {self.exit_code}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, with the error record inlined, to send to another host's agent."""
        return {
            "host": self.host,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "returncode": self.returncode,
            "time": self.time,
            "stderr_tail": list(self.stderr_tail),
            "peer_stopped": self.peer_stopped,
            "record": self.error_record(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerFailure:
        return cls(
            host=str(data["host"]),
            rank=int(data["rank"]),
            local_rank=int(data.get("local_rank", 0)),
            returncode=int(data["returncode"]),
            time=float(data["time"]),
            stderr_tail=tuple(str(s) for s in data.get("stderr_tail") or ()),
            peer_stopped=bool(data.get("peer_stopped", False)),
            record=data.get("record"),
        )


# --- memory cgroup --------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryStats:
    """The container's memory cgroup counters at one moment (None: not known here)."""

    cgroup_dir: Path | None
    oom_kill: int | None = None
    limit: int | None = None
    peak: int | None = None
    version: int | None = None

    def describe(self) -> str | None:
        parts = []
        if self.limit is not None:
            parts.append(f"limit {format_bytes(self.limit)}")
        if self.peak is not None:
            parts.append(f"peak {format_bytes(self.peak)}")
        return ", ".join(parts) if parts else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max": no limit


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _cgroup_candidates() -> list[Path]:
    """This process's memory cgroup directories, most specific first (v2, then v1)."""
    v2: list[Path] = []
    v1: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            v2.append(CGROUP_ROOT / rel.lstrip("/"))
        elif "memory" in controllers.split(","):
            v1.append(CGROUP_ROOT / "memory" / rel.lstrip("/"))
    # Inside a container the cgroup namespace often shows the path of the host: use the root.
    return [*v2, CGROUP_ROOT, *v1, CGROUP_ROOT / "memory"]


def memory_snapshot(cgroup_dir: Path | None = None) -> MemoryStats:
    """Read the memory cgroup's OOM-kill counter, limit and peak (cgroup v2 or v1).

    The agent takes one at start and passes it to ``report``: a worker killed by SIGKILL
    while ``oom_kill`` grew is classified OutOfMemory.
    """
    candidates = [cgroup_dir] if cgroup_dir is not None else _cgroup_candidates()
    for d in candidates:
        events = d / "memory.events"
        if events.is_file():
            limit = _read_int(d / "memory.max")
            return MemoryStats(
                cgroup_dir=d,
                oom_kill=_read_keyed(events).get("oom_kill"),
                limit=limit,
                peak=_read_int(d / "memory.peak"),
                version=2,
            )
        control = d / "memory.oom_control"
        if control.is_file():
            limit = _read_int(d / "memory.limit_in_bytes")
            return MemoryStats(
                cgroup_dir=d,
                oom_kill=_read_keyed(control).get("oom_kill"),
                # v1 writes "no limit" as a page-rounded 2**63-1.
                limit=limit if limit is not None and limit < 2**62 else None,
                peak=_read_int(d / "memory.max_usage_in_bytes"),
                version=1,
            )
    return MemoryStats(cgroup_dir=None)


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


# --- classification -------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """Why one worker failed, in the words of the failure file."""

    category: str
    reason: str
    """One line, without the host/rank suffix."""
    where: tuple[str, ...] = ()
    """The innermost user frames, outermost first: ``train.py:9 in load_data: code``."""
    hint: str | None = None
    details: tuple[str, ...] = ()
    """Extra lines worth the space: memory limit, filesystem size, last stderr lines."""


_PIP_NAMES = {
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "PIL": "Pillow",
    "yaml": "PyYAML",
    "skimage": "scikit-image",
    "bs4": "beautifulsoup4",
    "Crypto": "pycryptodome",
    "dateutil": "python-dateutil",
    "google.protobuf": "protobuf",
    "attr": "attrs",
}

_OOM_TEXT = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"
    r"|HIP out of memory|out of memory on device|Cannot allocate memory",
    re.IGNORECASE,
)
_SO_TEXT = re.compile(r"([\w.+-]+\.so[\w.]*): cannot open shared object file")
_ENOSPC_TEXT = re.compile(r"No space left on device|Disk quota exceeded", re.IGNORECASE)
# Collective errors a worker sees when a *peer* died first: a victim, not a cause.
_COMM_TEXT = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL (communicator|error)"
    r"|DistBackendError|ProcessGroup\w* .*(abort|timed? ?out|watchdog)|Socket Timeout"
    r"|recvBytes|sendBytes|TCPStore|ncclRemoteError|ncclSystemError",
    re.IGNORECASE,
)

_SIGNAL_HINTS = {
    "SIGSEGV": (
        "a segmentation fault in native code",
        "A crash in a C/C++/CUDA extension. faulthandler's Python stack is in the job log "
        "and the JSON report; check the versions of the native libraries the script uses.",
    ),
    "SIGBUS": (
        "a bus error",
        "Usually shared memory ran out: /dev/shm is {shm} here and DataLoader workers pass "
        "batches through it. Give the container a larger shm size or lower num_workers.",
    ),
    "SIGABRT": (
        "abort() in native code",
        "A library aborted (a failed C++ assertion, an uncaught C++ exception, NCCL/CUDA). "
        "The reason is usually in the last lines of the worker's log.",
    ),
    "SIGKILL": (
        "killed from outside",
        "The memory cgroup recorded no OOM kill: the host's OOM killer, a kill -9, or the "
        "platform stopping the job. Check the instance's memory metrics.",
    ),
    "SIGTERM": (
        "stopped",
        "The job was stopped (StopTrainingJob, MaxRuntimeInSeconds) or the container is "
        "shutting down.",
    ),
    "SIGILL": (
        "an illegal instruction",
        "A native library was built for another CPU (e.g. AVX-512 on an instance without it).",
    ),
    "SIGFPE": ("an arithmetic fault in native code", None),
}


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _short_path(path: str, cwd: str | None) -> str:
    if cwd and path.startswith(cwd.rstrip(os.sep) + os.sep):
        return path[len(cwd.rstrip(os.sep)) + 1 :]
    return path


def _frame_text(frame: Mapping[str, Any], cwd: str | None) -> str:
    text = f"{_short_path(str(frame.get('file')), cwd)}:{frame.get('line')}"
    if frame.get("function"):
        text += f" in {frame['function']}"
    if frame.get("code"):
        text += f": {_one_line(frame['code'], 120)}"
    return text


def _user_frames(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    frames = [f for f in record.get("frames") or () if isinstance(f, Mapping)]
    user = [f for f in frames if f.get("user")]
    if user:
        return user
    # Records without the flag (stderr fallback) or code installed as a package.
    return [f for f in frames if contract.is_user_file(str(f.get("file", "")), packages=True)]


def _at(record: Mapping[str, Any]) -> str:
    frames = _user_frames(record)
    if not frames:
        return ""
    f = frames[-1]
    return f" at {_short_path(str(f.get('file')), record.get('cwd'))}:{f.get('line')}"


def _where(record: Mapping[str, Any], n: int = 3) -> tuple[str, ...]:
    cwd = record.get("cwd")
    frames = _user_frames(record)
    out = [_frame_text(f, cwd) for f in frames[-n:]]
    all_frames = [f for f in record.get("frames") or () if isinstance(f, Mapping)]
    if frames and all_frames and all_frames[-1] is not frames[-1]:
        inner = all_frames[-1]
        out.append(f"(raised in {_short_path(str(inner.get('file')), cwd)}:{inner.get('line')})")
    return tuple(out)


def _exceptions(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The exception and the ones behind it, outermost first."""
    return [record, *[c for c in record.get("chain") or () if isinstance(c, Mapping)]]


def _is_oom(exc: Mapping[str, Any]) -> bool:
    if exc.get("type") in ("MemoryError", "OutOfMemoryError") or exc.get("errno") == errno.ENOMEM:
        return True
    return bool(_OOM_TEXT.search(str(exc.get("message", ""))))


def _is_enospc(exc: Mapping[str, Any]) -> bool:
    if exc.get("errno") in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(_ENOSPC_TEXT.search(str(exc.get("message", ""))))


def _is_eperm(exc: Mapping[str, Any]) -> bool:
    return exc.get("errno") in (errno.EACCES, errno.EPERM, errno.EROFS)


def _is_import(exc: Mapping[str, Any]) -> bool:
    return exc.get("type") in ("ModuleNotFoundError", "ImportError")


def looks_like_peer_error(failure: WorkerFailure) -> bool:
    """A collective error (connection closed by peer, NCCL abort): usually a victim's."""
    rec = failure.error_record()
    if rec is None:
        return False
    return any(_COMM_TEXT.search(str(e.get("message", ""))) for e in _exceptions(rec))


def classify(
    failure: WorkerFailure,
    *,
    oom_kills: int = 0,
    memory: MemoryStats | None = None,
) -> Classification:
    """Classify one worker's death.

    ``oom_kills``: how many OOM kills the memory cgroup recorded since the job started.
    """
    if failure.peer_stopped:
        how = f"by {failure.signal_name}" if failure.signal_name else f"exit {failure.exit_code}"
        return Classification(
            Category.PEER_FAILURE, f"stopped by smdist ({how}) after another worker failed"
        )
    rec = failure.error_record()
    if rec is None and failure.returncode > 0:
        rec = parse_stderr_traceback(failure.stderr_tail)
    if rec is not None and rec.get("kind") != "signal":
        return _classify_record(rec, memory)
    if failure.signal_name:
        return _classify_signal(failure, oom_kills, memory)
    details = tuple(_one_line(s, 200) for s in failure.stderr_tail if s.strip())[-5:]
    last = f": {details[-1]}" if details else ""
    return Classification(
        Category.USER_SCRIPT_ERROR,
        f"worker exited with code {failure.exit_code} without an uncaught exception{last}",
        details=tuple(f"stderr: {d}" for d in details[:-1]),
        hint="The script called sys.exit/os._exit, or a native program failed; its last "
        "output is in the job log.",
    )


def _classify_record(rec: Mapping[str, Any], memory: MemoryStats | None) -> Classification:
    chain = _exceptions(rec)
    where = _where(rec)
    at = _at(rec)
    top = f"{rec.get('type')}: {_one_line(str(rec.get('message', '')), 200)}"
    if rec.get("kind") == "fail":
        return Classification(
            Category.USER_SCRIPT_ERROR,
            f"smdist.fail(): {_one_line(str(rec.get('message', '')), 200)}{at}",
            where=where,
        )
    if rec.get("kind") == "exit":
        return Classification(
            Category.USER_SCRIPT_ERROR,
            f"{_one_line(str(rec.get('message', '')), 200)}{at}",
            where=where,
        )
    if any(_is_oom(e) for e in chain):
        cause = next(e for e in chain if _is_oom(e))
        cuda = "CUDA" in str(cause.get("message", "")) or cause.get("type") == "OutOfMemoryError"
        reason = f"{cause.get('type')}: {_one_line(str(cause.get('message', '')), 160)}"
        if not cause.get("message"):
            reason = f"{cause.get('type')}: an allocation failed"
        hint = (
            "Lower the per-GPU batch size, use mixed precision, gradient accumulation or "
            "activation checkpointing, or pick an instance with more GPU memory."
            if cuda
            else "Load data in chunks or stream it (Pipe/FastFile input mode), lower the batch "
            "size, or pick an instance type with more memory."
        )
        # A peak without a limit says little about a MemoryError (often a ulimit).
        mem = memory.describe() if memory and memory.limit and not cuda else None
        return Classification(
            Category.OUT_OF_MEMORY,
            reason + at,
            where=where,
            hint=hint,
            details=(f"Memory (container cgroup): {mem}",) if mem else (),
        )
    if _is_enospc(rec) or any(_is_enospc(e) for e in chain):
        path = rec.get("path") or next((e.get("filename") for e in chain if _is_enospc(e)), None)
        reason = "no space left on device" + (f" writing {path}" if path else "")
        details: tuple[str, ...] = ()
        fs = rec.get("filesystem")
        if isinstance(fs, Mapping) and fs.get("total") is not None:
            details = (
                f"Filesystem {fs.get('mount')}: {format_bytes(int(fs['total']))} total, "
                f"{format_bytes(int(fs.get('free') or 0))} free",
            )
        return Classification(
            Category.DISK_FULL,
            reason + at,
            where=where,
            details=details,
            hint="Raise the training job's volume size (VolumeSizeInGB), delete intermediate "
            "files, or write large outputs to /opt/ml/model or /opt/ml/checkpoints.",
        )
    if _is_import(rec) or _SO_TEXT.search(str(rec.get("message", ""))):
        return _classify_import(rec, where, at)
    if any(_is_eperm(e) for e in chain):
        cause = next(e for e in chain if _is_eperm(e))
        path = cause.get("filename")
        user = rec.get("user") if isinstance(rec.get("user"), Mapping) else {}
        who = f" as user {user.get('name')} (uid {user.get('uid')})" if user else ""
        what = "read-only file system" if cause.get("errno") == errno.EROFS else "permission denied"
        reason = f"{what}" + (f": {path}" if path else f" ({cause.get('type')})") + who
        hint = (
            "The file system is mounted read-only; write under /opt/ml/model, /opt/ml/output, "
            "/opt/ml/checkpoints or /tmp."
            if cause.get("errno") == errno.EROFS
            else "Check the path's owner and mode (ls -ld), or write under /opt/ml/model, "
            "/opt/ml/output, /opt/ml/checkpoints or /tmp."
        )
        return Classification(Category.PERMISSION_DENIED, reason + at, where=where, hint=hint)
    return Classification(Category.USER_SCRIPT_ERROR, top + at, where=where)


def _classify_import(rec: Mapping[str, Any], where: tuple[str, ...], at: str) -> Classification:
    name = rec.get("name")
    message = _one_line(str(rec.get("message", "")), 200)
    so = _SO_TEXT.search(message)
    import_path = rec.get("import_path")
    if rec.get("type") == "ImportError" and import_path and contract.is_user_file(str(import_path)):
        # `from model import Nett`: a typo or a circular import in the user's own code.
        return Classification(Category.USER_SCRIPT_ERROR, f"ImportError: {message}{at}", where)
    if so:
        inner = [f for f in rec.get("frames") or () if isinstance(f, Mapping)]
        via = next((f.get("code") for f in reversed(inner) if f.get("user")), None)
        reason = f"native library {so.group(1)} is missing{at}"
        hint = (
            "Install the system package that provides it in the image (apt-get/yum), or use "
            "a build of the Python package that bundles it (e.g. opencv-python-headless)."
        )
        details = (f"Import: {via}",) if via else ()
        return Classification(Category.MISSING_DEPENDENCY, reason, where, hint, details)
    if rec.get("type") == "ModuleNotFoundError" and name:
        top = str(name).split(".")[0]
        pip = _PIP_NAMES.get(str(name), _PIP_NAMES.get(top, top))
        reason = f"module '{name}' is not installed, imported{at or ''}"
        listed = _listed_in_requirements(rec, {str(pip), top})
        if listed is not None:
            hint = (
                f"{listed} lists {pip} and was installed before the job started, but the "
                f"install did not provide module '{top}': check the package name (the project "
                "name can differ from the module's) and pip's output in the log."
            )
        else:
            hint = (
                f"Add {pip} to requirements.txt next to the entry script, or install it in "
                "the training image."
            )
    else:
        reason = f"{message}{at}"
        hint = (
            "An installed package has the wrong version or a missing native library: pin "
            "compatible versions in requirements.txt or the image."
        )
    return Classification(Category.MISSING_DEPENDENCY, reason, where=where, hint=hint)


def _listed_in_requirements(rec: Mapping[str, Any], names: set[str]) -> str | None:
    """The requirements.txt next to the entry script (the first user frame), if it lists
    one of ``names`` (normalised project names)."""
    from smdist.agent.code import REQUIREMENTS, requirement_names

    frames = [f for f in rec.get("frames") or () if isinstance(f, Mapping) and f.get("user")]
    if not frames or not frames[0].get("file"):
        return None
    path = Path(str(frames[0]["file"])).parent / REQUIREMENTS
    wanted = {re.sub(r"[-_.]+", "-", n).lower() for n in names}
    return path.name if wanted & requirement_names(path) else None


def _shm_size() -> str:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return "unknown"
    return format_bytes(st.f_blocks * st.f_frsize)


def _classify_signal(
    failure: WorkerFailure, oom_kills: int, memory: MemoryStats | None
) -> Classification:
    name = failure.signal_name or "a signal"
    faulted = parse_faulthandler(failure.stderr_tail)
    where = tuple(_frame_text(f, None) for f in faulted[-3:])
    at = f" at {faulted[-1]['file']}:{faulted[-1]['line']}" if faulted else ""
    if name == "SIGKILL" and oom_kills > 0:
        mem = memory.describe() if memory else None
        return Classification(
            Category.OUT_OF_MEMORY,
            "worker killed by SIGKILL after the container's memory cgroup recorded "
            f"{'an OOM kill' if oom_kills == 1 else f'{oom_kills} OOM kills'}",
            details=(f"Memory (container cgroup): {mem}",) if mem else (),
            hint="Load data in chunks or stream it (Pipe/FastFile input mode), lower the batch "
            "size or the number of DataLoader workers, or pick an instance with more memory.",
        )
    what, hint = _SIGNAL_HINTS.get(name, (None, None))
    reason = f"worker died of {name}" + (f", {what}" if what else "") + at
    if hint and "{shm}" in hint:
        hint = hint.format(shm=_shm_size())
    return Classification(Category.KILLED, reason, where=where, hint=hint)


_TB_FILE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<func>.+))?$')
_FH_FILE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>.+)$')
_TB_LAST = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)?)"
    r"(?:: (?P<message>.*))?$"
)
_ERRNO = re.compile(r"^\[Errno (\d+)\] [^:]*(?:: '(.*)')?")


def parse_stderr_traceback(lines: Sequence[str]) -> dict[str, Any] | None:
    """A record from the last Python traceback in a worker's stderr tail.

    The fallback when no error file exists: the disk was full, or a worker was started
    without the bootstrap.
    """
    start = max(
        (i for i, s in enumerate(lines) if s.startswith("Traceback (most recent")), default=-1
    )
    if start < 0:
        return None
    frames: list[dict[str, Any]] = []
    last: re.Match[str] | None = None
    for i, line in enumerate(lines[start + 1 :], start + 1):
        m = _TB_FILE.match(line.rstrip())
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append(
                {
                    "file": m["file"],
                    "line": int(m["line"]),
                    "function": m["func"] or "",
                    "code": code,
                }
            )
            continue
        if not line.startswith((" ", "\t")) and line.strip():
            last = _TB_LAST.match(line.rstrip())
            if last:
                break
    if last is None:
        return None
    typ = last["type"].rsplit(".", 1)[-1]
    message = last["message"] or ""
    rec: dict[str, Any] = {"kind": "stderr", "type": typ, "message": message, "frames": frames}
    m = _ERRNO.match(message)
    if m:
        rec["errno"] = int(m.group(1))
        rec["filename"] = m.group(2)
    nm = re.match(r"No module named '([^']+)'", message)
    if nm:
        rec["name"] = nm.group(1)
    return rec


def from_torchelastic(data: Mapping[str, Any]) -> dict[str, Any]:
    """An error record from the file torch elastic's ``@record`` writes to
    ``TORCHELASTIC_ERROR_FILE``: ``{"message": {"message": "Type: text", "extraInfo":
    {"py_callstack": traceback, "timestamp": ...}}}``."""
    message = data["message"]
    extra = message.get("extraInfo") if isinstance(message.get("extraInfo"), Mapping) else {}
    callstack = str(extra.get("py_callstack") or "")
    rec = parse_stderr_traceback(callstack.splitlines())
    if rec is None:
        typ, _, text = str(message.get("message", "")).partition(": ")
        rec = {"type": typ or "Exception", "message": text, "frames": []}
    for frame in rec["frames"]:
        frame["user"] = contract.is_user_file(str(frame["file"]))
    rec["kind"] = "torchelastic"
    rec["traceback"] = callstack
    return rec


def parse_faulthandler(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The frames of faulthandler's crash dump in a stderr tail, outermost first."""
    headers = [i for i, s in enumerate(lines) if "(most recent call first)" in s]
    current = [i for i in headers if lines[i].startswith("Current thread")]
    # The crashing thread is "Current thread"; other threads' stacks are dumped beside it.
    start = (current or headers or [-1])[-1]
    if start < 0:
        return []
    frames: list[dict[str, Any]] = []
    for line in lines[start + 1 :]:
        m = _FH_FILE.match(line.rstrip())
        if not m:
            break
        frames.append({"file": m["file"], "line": int(m["line"]), "function": m["func"]})
    frames.reverse()
    return [f for f in frames if contract.is_user_file(f["file"])] or frames


def headline(failure: WorkerFailure) -> str:
    """The first line of the failure file for a worker's death."""
    c = classify(failure)
    return f"{c.category}: {c.reason} ({_suffix(failure)})"


def _suffix(failure: WorkerFailure) -> str:
    return f"host {failure.host}, rank {failure.rank}, exit {failure.exit_code}"


# --- the report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnosis:
    """What ``report`` decided and wrote."""

    category: str
    headline: str
    """The first line of the failure file."""
    text: str
    """The failure file smdist composed (at most 1024 characters)."""
    exit_code: int
    host: str | None = None
    rank: int | None = None
    root_cause: WorkerFailure | None = field(default=None, repr=False)
    failure_file_written: bool = False
    """False when the user's own failure file was kept (or the disk refused)."""
    user_failure_text: str | None = field(default=None, repr=False)
    report_path: Path | None = None


def choose_root_cause(failures: Sequence[WorkerFailure]) -> WorkerFailure | None:
    """The earliest failure that is not a victim (peer-stopped, or a collective error)."""
    real = [f for f in failures if not f.peer_stopped]
    if not real:
        return None

    def key(f: WorkerFailure) -> tuple[bool, float, int]:
        rec = f.error_record()
        t = float(rec["time"]) if rec and isinstance(rec.get("time"), (int, float)) else f.time
        return (looks_like_peer_error(f), min(t, f.time), f.rank)

    return min(real, key=key)


def _compose(
    headline_: str,
    c: Classification | None,
    others: Sequence[str],
    report_path: Path | None,
) -> str:
    """Fit the failure file in 1024 characters, the most useful lines first."""
    lines: list[str] = []
    if c is not None:
        lines += [f"  at {w}" if not w.startswith("(") else f"  {w}" for w in c.where]
        lines += list(c.details)
        lines += [f"Hint: {c.hint}"] if c.hint else []
    if others:
        lines.append(f"Also: {'; '.join(others)}")
    if report_path is not None:
        lines.append(f"Full report: {report_path}")
    text = _clip(headline_, FAILURE_FILE_LIMIT)
    for line in lines:
        room = FAILURE_FILE_LIMIT - _size(text) - 1
        if room >= min(_size(line), 40):
            text += "\n" + _clip(line, room)
    return text


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes (so also characters), never half a character."""
    if _size(text) <= limit:
        return text
    return text.encode("utf-8")[: limit - 3].decode("utf-8", errors="ignore") + "..."


def _other_lines(failures: Sequence[WorkerFailure], root: WorkerFailure | None) -> list[str]:
    others = [f for f in failures if f is not root and not f.peer_stopped]
    peers = [f for f in failures if f is not root and f.peer_stopped]
    out = []
    for f in sorted(others, key=lambda f: f.time)[:3]:
        c = classify(f)
        out.append(f"rank {f.rank} on {f.host} {c.category}: {_one_line(c.reason, 80)}")
    if len(others) > 3:
        out.append(f"{len(others) - 3} more failed")
    if peers:
        n = len(peers)
        out.append(f"{n} other rank{'s' if n > 1 else ''} stopped after it (PeerFailure)")
    return out


def report(
    paths: Paths,
    failures: Sequence[WorkerFailure],
    *,
    current_host: str,
    root_cause: WorkerFailure | None = None,
    smdist_error: SmdistError | None = None,
    extra: Mapping[str, Any] | None = None,
    memory_at_start: MemoryStats | None = None,
) -> Diagnosis:
    """Classify the root cause, write the failure file and the JSON report.

    The root cause is ``smdist_error`` (one of smdist's own stages failed), else
    ``root_cause``, else the earliest failure that is not a victim. A failure file the
    user wrote (``smdist.fail``) is kept. ``memory_at_start`` is ``memory_snapshot()``
    taken before the workers started; without it any recorded OOM kill counts.
    """
    memory = memory_snapshot(memory_at_start.cgroup_dir if memory_at_start else None)
    base = memory_at_start.oom_kill if memory_at_start and memory_at_start.oom_kill else 0
    oom_kills = max(0, (memory.oom_kill or 0) - base)
    report_path = paths.output_data_dir / REPORT_NAME
    classified = [(f, classify(f, oom_kills=oom_kills, memory=memory)) for f in failures]

    root: WorkerFailure | None = None
    c: Classification | None = None
    if smdist_error is not None:
        category = smdist_error.category
        where = smdist_error.where
        suffix = f" (host {current_host})" if where is None else (f" ({where})" if where else "")
        head = f"{category}: {_clip(_one_line(str(smdist_error), 700), 700)}{suffix}"
        exit_code = smdist_error.exit_code
    else:
        root = root_cause or choose_root_cause(failures)
        if root is None and failures:
            root = min(failures, key=lambda f: f.time)
        if root is None:
            raise ValueError("report() needs at least one failure or an smdist_error")
        c = next((cl for f, cl in classified if f is root), None) or classify(
            root, oom_kills=oom_kills, memory=memory
        )
        category = c.category
        head = f"{category}: {_clip(_one_line(c.reason, 700), 700)} ({_suffix(root)})"
        exit_code = root.exit_code or 1
    text = _compose(head, c, _other_lines(failures, root), report_path)

    user_text = _read_user_failure(paths)
    written = False if user_text is not None else write_failure_file(paths, text)
    saved = _write_json(
        report_path,
        {
            "version": 1,
            "category": category,
            "headline": head,
            "failure_file": text,
            "user_failure_file": user_text,
            "exit_code": exit_code,
            "current_host": current_host,
            "root_cause": _failure_json(root, c) if root is not None and c is not None else None,
            "smdist_error": (
                {
                    "category": smdist_error.category,
                    "type": type(smdist_error).__qualname__,
                    "message": str(smdist_error),
                    "exit_code": smdist_error.exit_code,
                }
                if smdist_error is not None
                else None
            ),
            "failures": [_failure_json(f, cl) for f, cl in sorted(classified, key=_rank_key)],
            "memory": {
                "cgroup": str(memory.cgroup_dir) if memory.cgroup_dir else None,
                "cgroup_version": memory.version,
                "limit_bytes": memory.limit,
                "peak_bytes": memory.peak,
                "oom_kills_during_job": oom_kills,
            },
            "timings": _timings(failures),
            "extra": dict(extra or {}),
            "written_at": time.time(),
        },
    )
    return Diagnosis(
        category=category,
        headline=head,
        text=text,
        exit_code=exit_code,
        host=root.host if root is not None else current_host,
        rank=root.rank if root is not None else None,
        root_cause=root,
        failure_file_written=written,
        user_failure_text=user_text,
        report_path=report_path if saved else None,
    )


def _rank_key(item: tuple[WorkerFailure, Classification]) -> tuple[int, str]:
    return (item[0].rank, item[0].host)


def _failure_json(f: WorkerFailure, c: Classification) -> dict[str, Any]:
    return {
        "host": f.host,
        "rank": f.rank,
        "local_rank": f.local_rank,
        "returncode": f.returncode,
        "exit_code": f.exit_code,
        "signal": f.signal_name,
        "time": f.time,
        "peer_stopped": f.peer_stopped,
        "category": c.category,
        "reason": c.reason,
        "where": list(c.where),
        "hint": c.hint,
        "error": f.error_record(),
        "stderr_tail": list(f.stderr_tail),
    }


def _timings(failures: Sequence[WorkerFailure]) -> dict[str, Any]:
    if not failures:
        return {}
    first = min(f.time for f in failures)
    return {
        "first_failure_at": first,
        "seconds_after_first": {
            f"{f.host}/{f.rank}": round(f.time - first, 3)
            for f in sorted(failures, key=lambda f: f.time)
        },
    }


def clear_failure_files(paths: Paths) -> None:
    """Remove a previous run's failure file and report (the agent, before workers start).

    After this, a failure file that exists at ``report`` time is the user's own.
    """
    for path in (paths.failure_file, paths.output_data_dir / REPORT_NAME):
        path.unlink(missing_ok=True)


def _read_user_failure(paths: Paths) -> str | None:
    try:
        return paths.failure_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> bool:
    try:
        contract.atomic_write(path, json.dumps(data, indent=2, default=str))
    except OSError:
        return False
    return True


def write_failure_file(paths: Paths, text: str, *, overwrite_user: bool = False) -> bool:
    """Write the failure file, at most 1024 characters; keep one the user wrote.

    Returns whether the file was written.
    """
    return _write_failure_at(paths.failure_file, text, exclusive=not overwrite_user)


def _write_failure_at(target: Path, text: str, *, exclusive: bool) -> bool:
    try:
        return contract.atomic_write(target, _clip(text, FAILURE_FILE_LIMIT), exclusive=exclusive)
    except OSError:
        return False


# --- smdist.fail ----------------------------------------------------------------------


def failure_file_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where a worker writes the failure file: ``$SM_OUTPUT_DIR/failure``, else under /opt/ml."""
    env = os.environ if environ is None else environ
    out = env.get(OUTPUT_DIR_ENV)
    return Path(out) / "failure" if out else resolve_root(environ=env).failure_file


def fail(reason: str, exit_code: int = 1) -> NoReturn:
    """Stop this worker with ``reason`` as the job's FailureReason (kept verbatim by the agent).

    Under smdist the first rank to call it wins; outside smdist it overwrites the file.
    """
    from smdist.worker import bootstrap

    target = failure_file_path()
    under_agent = bool(os.environ.get(bootstrap.ERROR_FILE_ENV))
    _write_failure_at(target, str(reason), exclusive=under_agent)
    try:
        raise RuntimeError(reason)
    except RuntimeError as exc:
        record = bootstrap.build_record(exc, kind="fail")
    # The caller's frames, not this function's.
    record["frames"] = _caller_frames()
    record["type"] = "smdist.fail"
    record["exit_code"] = exit_code
    bootstrap.write_record(record)
    sys.stderr.write(f"smdist.fail: {reason}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code)


def _caller_frames() -> list[dict[str, Any]]:
    import traceback

    from smdist.worker.bootstrap import frame_dicts

    return frame_dicts(traceback.extract_stack()[:-2][-20:])
