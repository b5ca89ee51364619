"""Worker bootstrap: ``python -m smdist.bootstrap SCRIPT|-m MODULE [ARGS...]``.

Runs the user's entry exactly as ``python SCRIPT ARGS`` would, with two additions:
faulthandler is on (SIGUSR1 dumps every thread's stack, which the agent uses before
it kills a hung worker), and an uncaught exception is recorded as a structured
error file at ``$SMDIST_ERROR_FILE`` before the interpreter prints it and exits 1.
"""

from __future__ import annotations

import faulthandler
import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback
from typing import Any

ERROR_FILE_ENV = "SMDIST_ERROR_FILE"
STACK_DUMP_SIGNAL = signal.SIGUSR1


def _frames(exc: BaseException) -> list[dict[str, Any]]:
    return [
        {"file": f.filename, "line": f.lineno, "function": f.name, "code": f.line or ""}
        for f in traceback.extract_tb(exc.__traceback__)
    ]


def record_exception(exc: BaseException, path: str | None = None) -> None:
    """Write the error file for ``exc`` (first writer wins: the root exception)."""
    path = path or os.environ.get(ERROR_FILE_ENV)
    if not path or os.path.exists(path):
        return
    record = {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "frames": _frames(exc),
        "errno": getattr(exc, "errno", None),
        "filename": getattr(exc, "filename", None),
        "name": getattr(exc, "name", None),
        "host": os.environ.get("SM_CURRENT_HOST", socket.gethostname()),
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "pid": os.getpid(),
        "time": time.time(),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk must not hide the user's own traceback


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write("usage: python -m smdist.bootstrap SCRIPT|-m MODULE [ARGS...]\n")
        raise SystemExit(2)
    faulthandler.enable()
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True, chain=False)
    try:
        if args[0] == "-m":
            module, rest = args[1], args[2:]
            sys.argv = [module, *rest]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script, rest = args[0], args[1:]
            sys.argv = [script, *rest]
            # As `python script.py` does: the script's directory comes first on sys.path.
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        record_exception(exc)
        raise


if __name__ == "__main__":
    main()
