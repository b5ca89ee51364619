"""The console scripts ``smdist-run`` and ``train``: the first rank's interpreter is started
before the agent imports anything else (``smdist/agent/standby.py``), then the agent runs.

``python -m smdist.agent.launch`` is ``smdist-run``; ``python -m smdist.agent.cli`` is the same
agent without the standby interpreter.
"""

from __future__ import annotations

import os
import sys

from smdist import timeline
from smdist.agent import standby

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``smdist-run [OPTIONS] SCRIPT.py|-m MODULE|PROGRAM [ARGS...]``."""
    return _with_standby(argv, train=False)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train``: SageMaker's ``docker run IMAGE train``."""
    return _with_standby(argv, train=True)


def _with_standby(argv: Sequence[str] | None, *, train: bool) -> int:
    standby.start(sys.argv[1:] if argv is None else argv)
    try:
        from smdist.agent import cli  # after the start: the agent's imports run beside it

        code = cli.train_main(argv) if train else cli.main(argv)
    finally:
        standby.discard()
    timeline.mark("agent done")
    if argv is None:  # the command itself (smdist-run, train, python -m smdist.agent.launch)
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown (its modules'
    cleanup and collection: 12-15 ms after the last rank, issue 18), once what that
    teardown would still do that anyone can see is done: every ``atexit`` function (smdist
    registers none; a library may), then the standard streams flushed. The failure file,
    the model directory and the run directory are the agent's own work, done before it
    returned; every thread it started is a daemon. A non-daemon thread still running (not
    one of the DNS lookups the agent abandoned: their answer is read by no one), or a
    stream that cannot be flushed: returns, and the interpreter's exit does what it always
    did (waits for the thread; exit status 120 for the stream). Nor under a profiler or a
    tracer (``python -m cProfile -o F -m smdist.agent.launch``): it writes its output after
    the program returns, which an ``os._exit`` would cut off."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    import atexit
    import threading

    from smdist.contract import DNS_THREAD_PREFIX  # loaded long ago: the agent's own

    main = threading.main_thread()
    for thread in threading.enumerate():
        if (
            thread is not main
            and not thread.daemon
            and not thread.name.startswith(DNS_THREAD_PREFIX)
        ):
            return
    atexit._run_exitfuncs()  # (run once: the interpreter's exit would find none left)
    try:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe, a closed stream
        return
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
