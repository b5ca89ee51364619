"""Why a worker died, in the words of the failure file: a category, a reason, a hint.

From its error record (the exception, its chain, the user's frames), else its stderr tail,
else its signal and the memory cgroup. A broken collective is a victim's error: the root
cause is the earliest failure that is not one.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smdist import contract
from smdist.agent.report.failure import WorkerFailure
from smdist.agent.report.memory import MemoryStats, format_bytes
from smdist.agent.report.stderr import parse_faulthandler, parse_stderr_traceback
from smdist.contract import Category
from smdist.records import dataclass


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

_OOM_TEXT = contract.Pattern(
    r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"
    r"|HIP out of memory|out of memory on device|Cannot allocate memory",
    re.IGNORECASE,
)
_SO_TEXT = contract.Pattern(r"([\w.+-]+\.so[\w.]*): cannot open shared object file")
_ENOSPC_TEXT = contract.Pattern(r"No space left on device|Disk quota exceeded", re.IGNORECASE)
# Collective errors a worker sees when a *peer* died first: a victim, not a cause.
_COMM_TEXT = contract.Pattern(
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


def one_line(text: str, limit: int = 300) -> str:
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
        text += f": {one_line(frame['code'], 120)}"
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
    if rec is not None and rec.get("kind") == "hang":
        return _classify_hang(rec)
    if rec is not None and rec.get("kind") != "signal":
        return _classify_record(rec, memory)
    if failure.signal_name:
        return _classify_signal(failure, oom_kills, memory)
    details = tuple(one_line(s, 200) for s in failure.stderr_tail if s.strip())[-5:]
    last = f": {details[-1]}" if details else ""
    return Classification(
        Category.USER_SCRIPT_ERROR,
        f"worker exited with code {failure.exit_code} without an uncaught exception{last}",
        details=tuple(f"stderr: {d}" for d in details[:-1]),
        hint="The script called sys.exit/os._exit, or a native program failed; its last "
        "output is in the job log.",
    )


def _classify_hang(rec: Mapping[str, Any]) -> Classification:
    """``--hang-timeout``: the rank(s) that stopped making progress first (the agent's record)."""
    ranks = list(rec.get("ranks") or ())
    top = ranks[0] if ranks else {}
    where = f", stuck at {rec['where']}" if rec.get("where") else ""
    by = ""
    if rec.get("judged_by") == "output":
        by = " (judged by its output: it never counted a step)"
    elif rec.get("judged_by") == "exit":
        by = " after its work ended (on its way out)"
    reason = (
        f"rank {top.get('rank')} on {top.get('host')} made no progress for "
        f"{float(rec.get('idle_s') or 0):.0f} s{where}{by}"
    )
    also = [f"rank {r.get('rank')} on {r.get('host')} at {r.get('where')}" for r in ranks[1:4]]
    return Classification(
        Category.HANG,
        reason,
        where=_where(rec),
        details=(f"Also stuck first: {'; '.join(also)}",) if also else (),
        hint="Every rank's stack was dumped into the job log when the hang was found; the "
        "other ranks were waiting for this one. Raise --hang-timeout if a step can take longer.",
    )


def _classify_record(rec: Mapping[str, Any], memory: MemoryStats | None) -> Classification:
    chain = _exceptions(rec)
    where = _where(rec)
    at = _at(rec)
    top = f"{rec.get('type')}: {one_line(str(rec.get('message', '')), 200)}"
    if rec.get("kind") == "fail":
        return Classification(
            Category.USER_SCRIPT_ERROR,
            f"smdist.fail(): {one_line(str(rec.get('message', '')), 200)}{at}",
            where=where,
        )
    if rec.get("kind") == "exit":
        return Classification(
            Category.USER_SCRIPT_ERROR,
            f"{one_line(str(rec.get('message', '')), 200)}{at}",
            where=where,
        )
    if any(_is_oom(e) for e in chain):
        cause = next(e for e in chain if _is_oom(e))
        cuda = "CUDA" in str(cause.get("message", "")) or cause.get("type") == "OutOfMemoryError"
        reason = f"{cause.get('type')}: {one_line(str(cause.get('message', '')), 160)}"
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
    message = one_line(str(rec.get("message", "")), 200)
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


def headline(failure: WorkerFailure) -> str:
    """The first line of the failure file for a worker's death."""
    c = classify(failure)
    return f"{c.category}: {c.reason} ({failure.suffix()})"


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
