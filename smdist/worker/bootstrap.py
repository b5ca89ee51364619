"""Worker bootstrap: ``python -m smdist.worker.bootstrap SCRIPT|-m MODULE [ARGS...]``.

Runs the user's entry exactly as ``python SCRIPT ARGS`` would, with three additions:
faulthandler is on (a crash prints the Python stack; SIGUSR1 dumps every thread's stack,
which the agent uses before it kills a hung worker); an uncaught exception is
recorded as a structured error file at ``$SMDIST_ERROR_FILE`` before the interpreter
prints it and exits 1 (the agent turns that file into the failure report); and a script
that ends well with torch.distributed's process group still up has it destroyed before the
interpreter's teardown (see ``release_process_groups``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import pwd
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

from smdist import contract
from smdist.worker import store_wait

# Everything above is what every rank imports before its first line (issue 18), and what an
# error record needs after the script has dropped the privileges to read the interpreter's
# library: nothing else (no socket, typing or dataclasses; the launcher's environment is read
# when there is an error, with the variables themselves as the fallback).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType
    from typing import IO, Any

ERROR_FILE_ENV = contract.ERROR_FILE_ENV
STACK_DUMP_SIGNAL = contract.STACK_DUMP_SIGNAL
RECORD_VERSION = contract.ERROR_RECORD_VERSION

_MAX_FRAMES = 60
_MAX_TRACEBACK_CHARS = 64_000
_MAX_MESSAGE_CHARS = 4_000


def frame_dicts(frames: Sequence[traceback.FrameSummary]) -> list[dict[str, Any]]:
    """Frames as error records hold them (whether each is the user's code included)."""
    return [
        {
            "file": f.filename,
            "line": f.lineno,
            "function": f.name,
            "code": (f.line or "").strip(),
            "user": contract.is_user_file(f.filename),
        }
        for f in frames
    ]


def _frames(tb: TracebackType | None) -> list[dict[str, Any]]:
    summary = traceback.extract_tb(tb)
    if len(summary) > _MAX_FRAMES:  # a RecursionError: keep both ends
        summary = traceback.StackSummary.from_list([*summary[:10], *summary[-(_MAX_FRAMES - 10) :]])
    return frame_dicts(summary)


def _open_file_in_frames(tb: TracebackType | None) -> str | None:
    """The file being written when a write failed: ``f.write`` errors carry no filename."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, str) and not name.startswith("<"):  # not <stdout>
                return name
    return None


def _filesystem(path: str) -> dict[str, Any] | None:
    """The mount holding ``path`` and its size, to say which disk filled up."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and probe != os.sep:
        probe = os.path.dirname(probe)
    mount = probe
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return {"mount": mount, "total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def _describe(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc)[:_MAX_MESSAGE_CHARS],
        "errno": getattr(exc, "errno", None) if isinstance(exc, OSError) else None,
        "filename": _str_or_none(getattr(exc, "filename", None)),
        "filename2": _str_or_none(getattr(exc, "filename2", None)),
        "name": _str_or_none(getattr(exc, "name", None)),
        # ImportError.path: the module that lacked a name (user code or a package?)
        "import_path": _str_or_none(getattr(exc, "path", None))
        if isinstance(exc, ImportError)
        else None,
    }


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    return os.fsdecode(value) if isinstance(value, (str, bytes)) else str(value)


def _chain(exc: BaseException) -> list[dict[str, Any]]:
    """The exceptions behind ``exc`` (``raise from``, or raised while handling it), outer first."""
    out: list[dict[str, Any]] = []
    seen = {id(exc)}
    cur = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    while cur is not None and id(cur) not in seen and len(out) < 8:
        seen.add(id(cur))
        out.append({**_describe(cur), "frames": _frames(cur.__traceback__)[-5:]})
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return out


def _user() -> dict[str, Any]:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"uid": uid, "name": name}


def build_record(exc: BaseException, *, kind: str = "exception") -> dict[str, Any]:
    """The error file's content for ``exc``: what, where, who, when."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if len(text) > _MAX_TRACEBACK_CHARS:
        text = text[:2000] + "\n...\n" + text[-(_MAX_TRACEBACK_CHARS - 2000) :]
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "kind": kind,
        **_describe(exc),
        "traceback": text,
        "frames": _frames(exc.__traceback__),
        "chain": _chain(exc),
        **_who(),
        "pid": os.getpid(),
        "user": _user(),
        "cwd": _cwd(),
        "argv": list(sys.argv),
        "time": time.time(),
    }
    errno_ = record["errno"]
    if errno_ in (28, 122):  # ENOSPC, EDQUOT: say which file and which disk
        path = record["filename"] or _open_file_in_frames(exc.__traceback__)
        record["path"] = path
        if path:
            record["filesystem"] = _filesystem(path)
    return record


def _who() -> dict[str, Any]:
    """Host, rank and local rank, as the launcher told them (never fails: a record must be
    written even when the variables are broken)."""
    try:
        from smdist.worker import environment

        started = environment.detect()
        return {"host": started.host, "rank": started.rank, "local_rank": started.local_rank or 0}
    except Exception:
        host = os.environ.get("SM_CURRENT_HOST") or os.uname().nodename
        return {"host": host, "rank": _int_env("RANK"), "local_rank": _int_env("LOCAL_RANK")}


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def write_record(record: dict[str, Any], path: str | None = None) -> bool:
    """Write an error file atomically; the first writer wins (the root exception)."""
    path = path or os.environ.get(ERROR_FILE_ENV)
    return contract.write_error_record(record, Path(path)) if path else False


def _torchelastic_record(path: str) -> dict[str, Any] | None:
    """The error file torch elastic's ``@record`` wrote (``TORCHELASTIC_ERROR_FILE`` points
    here) for the exception now leaving the script, if it is one."""
    data = contract.read_error_record(Path(path))
    return data if data is not None and contract.is_torchelastic_record(data) else None


def record_exception(exc: BaseException, path: str | None = None) -> None:
    """Write the error file for ``exc`` (first writer wins: the root exception).

    A file from ``@record`` is for the same exception (it re-raises): it is replaced by the
    fuller record, which keeps it under ``torchelastic``."""
    path = path or os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    elastic = _torchelastic_record(path) if os.path.exists(path) else None
    if os.path.exists(path) and elastic is None:
        return
    try:
        record = build_record(exc)
    except Exception as inner:  # never let the recorder replace the user's exception
        record = {"version": RECORD_VERSION, "kind": "exception", **_describe(exc)}
        record["recorder_error"] = repr(inner)
    if elastic is not None:
        record["torchelastic"] = elastic
        with contextlib.suppress(OSError):
            os.unlink(path)
    write_record(record, path)


def _exit_message(exc: SystemExit) -> str | None:
    """``sys.exit("text")`` or ``sys.exit(3)``: worth recording; ``sys.exit(0)`` is not."""
    code = exc.code
    if code is None or code == 0:
        return None
    return code if isinstance(code, str) else f"sys.exit({code!r})"


def _run_script(script: str) -> None:
    """``runpy.run_path(script, run_name="__main__")`` for a plain ``.py`` file, the same
    globals and the same temporary ``__main__``, without runpy's import of pkgutil and typing
    on every rank's way to the script's first line. Anything else goes to runpy."""
    if not (script.endswith(".py") and os.path.isfile(script)):
        runpy.run_path(script, run_name="__main__")
        return
    with io.open_code(os.path.abspath(script)) as f:
        # dont_inherit: this module's __future__ imports are not the script's.
        code = compile(f.read(), script, "exec", dont_inherit=True)
    module = type(sys)("__main__")
    module.__dict__.update(
        __file__=script, __cached__=None, __loader__=None, __package__="", __spec__=None
    )
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


_stacks: IO[str] | None = None


def _stacks_file() -> IO[str]:
    """Where SIGUSR1 dumps the stacks: stderr, or (an MPI rank) the file its own host's agent
    reads. Kept open for the process's life: faulthandler writes to its descriptor."""
    global _stacks
    path = os.environ.get(contract.STACKS_FILE_ENV)
    if path and _stacks is None:
        try:
            _stacks = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError:
            _stacks = None
    return _stacks or sys.stderr


def release_process_groups() -> None:
    """Destroy torch.distributed's process groups after a script that ended well left them.

    Most scripts (Lightning's, Fabric's, many hand-written ones) never call
    ``destroy_process_group``; the interpreter then destroys gloo's process group while it
    is being torn down, and gloo's threads still holding work abort the process
    (``terminate called without an active exception``, SIGABRT, exit 134) about one run in
    six: a finished job reported as a crash. Destroying it here, with the interpreter whole,
    is what the script would have done. Only after success: destroying a group while other
    ranks may still be in a collective can block (a failed rank just exits). torch is never
    imported for this; a script that did not use torch.distributed costs nothing."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # the script's work is done: say so, never fail it here
        sys.stderr.write(f"smdist: destroying the process group at exit failed: {exc}\n")
    # A DDP model kept alive by a reference cycle (a Trainer and its callbacks) still holds
    # the group's backend: collected now, with the interpreter whole, not in its teardown
    # (seen once in a transformers Trainer run under load: the same abort).
    import gc

    gc.collect()


def main(argv: list[str] | None = None) -> None:
    # First: the agent started this rank without a preexec_fn (a vfork); the rank dies with
    # it from here on, and exits at once if the agent died before this took hold.
    if not contract.die_with_agent():
        os._exit(1)
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] == "-m" and len(args) < 2):
        sys.stderr.write("usage: python -m smdist.worker.bootstrap SCRIPT|-m MODULE [ARGS...]\n")
        raise SystemExit(2)
    faulthandler.enable()
    # Ignored underneath: the interpreter's teardown unregisters faulthandler, which puts
    # back what it found, and a dump the agent asks for then must not kill a rank whose work
    # is done (SIGUSR1's default action; seen under load as "worker died of SIGUSR1").
    signal.signal(STACK_DUMP_SIGNAL, signal.SIG_IGN)
    faulthandler.register(STACK_DUMP_SIGNAL, file=_stacks_file(), all_threads=True, chain=False)
    if not os.environ.get("PYTHONUNBUFFERED"):
        # The agent relays output live (CloudWatch reads it as it comes): flush every line
        # instead of every 8 KiB, which on a pipe is what Python would do.
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(line_buffering=True)
    store_wait.install()  # ranks other than 0 meet rank 0's store without torch's backoff
    try:
        if args[0] == "-m":
            module, rest = args[1], args[2:]
            sys.argv = [module, *rest]
            sys.path[0] = os.getcwd()  # as `python -m` does
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script, rest = args[0], args[1:]
            sys.argv = [script, *rest]
            # As `python script.py` does: the script's directory comes first on sys.path.
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            _run_script(script)
    except SystemExit as exc:
        message = _exit_message(exc)
        if message is not None:
            record = build_record(exc, kind="exit")
            record["message"] = message
            write_record(record)
        else:
            _finished()
            release_process_groups()
        raise
    except BaseException as exc:
        record_exception(exc)
        raise
    _finished()
    release_process_groups()


def _finished() -> None:
    """The script ended well: the agent gives its way out --hang-timeout afresh (once: the
    decorator may have said so already, when the training function returned)."""
    if os.environ.get(contract.STEPS_FILE_ENV):
        from smdist.steps import finished

        finished()


if __name__ == "__main__":
    main()
