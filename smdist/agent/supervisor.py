"""Start the workers, relay their output, watch them, stop them: one host's processes.

The agent's main thread sleeps in ``select`` on one wake-up pipe; worker exits (a waiter
thread each), signals (``signal.set_wakeup_fd``) and job-wide events (the coordinator's
watcher) all write to it, so the agent costs nothing while the job trains.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from smdist.agent.rendezvous import Coordinator, JobEvent
from smdist.agent.report.failure import WorkerFailure, looks_like_peer_error
from smdist.agent.report.failure import headline as failure_headline
from smdist.log import log
from smdist.worker.bootstrap import STACK_DUMP_SIGNAL

PR_SET_PDEATHSIG = 1
TAIL_LINES = 50
MAX_LINE = 1 << 20  # a line longer than this is relayed in pieces rather than held
STACK_DUMP_WAIT_S = 0.2
BARRIER_LOG_EVERY_S = 60.0
PEER_ERROR_GRACE_S = 2.0
"""How long a worker's broken-collective error waits for the root cause from elsewhere."""

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_output_lock = threading.Lock()


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    local_rank: int
    argv: list[str]
    env: dict[str, str]
    python: bool
    """Started through smdist.worker.bootstrap, so SIGUSR1 dumps its stacks."""
    error_file: Path
    control_file: Path
    prefix: bool = True
    """Prefix its lines with ``[host/rank]`` (the MPI launcher prefixes each rank itself)."""


@dataclass
class Worker:
    spec: WorkerSpec
    proc: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    relays: list[threading.Thread] = field(default_factory=list)
    returncode: int | None = None
    exited_at: float = 0.0
    signalled: bool = False


@dataclass(frozen=True)
class Outcome:
    """What happened on this host."""

    exit_code: int
    event: JobEvent | None
    """The job-wide event that ended the job early (root cause), if any."""
    failures: tuple[WorkerFailure, ...]
    stopped: bool
    """Ended by a stop request (SIGTERM here or on another host)."""


def _relay(
    src: IO[bytes], dst: IO[bytes], prefix: bytes, tail: collections.deque[str] | None
) -> None:
    """Copy whole lines from a worker pipe to ours, each with the host/rank prefix.

    Works a chunk at a time (one replace per read, not a loop per line): the relay must
    cost the job next to nothing even at hundreds of thousands of lines a second.
    """
    fd = src.fileno()
    pending = b""
    glue = b"\n" + prefix
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            if not pending:
                break
            block, pending = pending + b"\n", b""  # a last line without its newline
        else:
            pending += chunk
            cut = pending.rfind(b"\n")
            if cut < 0:
                if len(pending) < MAX_LINE:
                    continue
                pending += b"\n"  # an endless line goes out in pieces, not held forever
                cut = len(pending) - 1
            block, pending = pending[: cut + 1], pending[cut + 1 :]
        out = prefix + block[:-1].replace(b"\n", glue) + b"\n" if prefix else block
        with _output_lock:
            try:
                dst.write(out)
                dst.flush()
            except (OSError, ValueError):
                pass
        if tail is not None:
            last = block[:-1].rsplit(b"\n", TAIL_LINES)[-TAIL_LINES:]
            tail.extend(line.decode("utf-8", "replace")[:1000] for line in last)
    src.close()


def _child_setup(parent: int) -> None:
    # Runs in the child between fork and exec: die with the agent, even on SIGKILL.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _signal_worker(w: Worker, sig: int) -> None:
    if w.returncode is not None and sig != signal.SIGKILL:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(w.proc.pid, sig)


class Supervisor:
    def __init__(
        self,
        host: str,
        specs: Sequence[WorkerSpec],
        coordinator: Coordinator,
        *,
        grace_s: float,
        abort_grace_s: float,
        on_finished: Callable[[], str] | None = None,
    ) -> None:
        self.host = host
        self.specs = list(specs)
        self.coordinator = coordinator
        self.grace_s = grace_s
        self.abort_grace_s = abort_grace_s
        self.on_finished = on_finished
        self.workers: list[Worker] = []
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- plumbing ---------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _wait_worker(self, w: Worker) -> None:
        code = w.proc.wait()
        w.exited_at = time.time()
        w.returncode = code
        self._wake()

    def start(self) -> None:
        me = os.getpid()
        for spec in self.specs:
            proc = subprocess.Popen(
                spec.argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(me),
            )
            w = Worker(spec, proc)
            prefix = f"[{self.host}/{spec.rank}] ".encode() if spec.prefix else b""
            assert proc.stdout is not None and proc.stderr is not None
            for src, dst, tail in (
                (proc.stdout, sys.stdout.buffer, None),
                (proc.stderr, sys.stderr.buffer, w.tail),
            ):
                t = threading.Thread(target=_relay, args=(src, dst, prefix, tail), daemon=True)
                t.start()
                w.relays.append(t)
            self.workers.append(w)
        for w in self.workers:
            threading.Thread(target=self._wait_worker, args=(w,), daemon=True).start()

    def _control(self, action: str, event: JobEvent) -> None:
        """Tell the workers (the decorator) why they are being signalled."""
        body = json.dumps({"action": action, "kind": event.kind, "headline": event.headline})
        for w in self.workers:
            path = w.spec.control_file
            with contextlib.suppress(OSError):
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(body, encoding="utf-8")
                os.replace(tmp, path)

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.returncode is None]

    def _dump_stacks(self, workers: Sequence[Worker]) -> None:
        targets = [w for w in workers if w.spec.python and w.returncode is None]
        for w in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.proc.pid, STACK_DUMP_SIGNAL)
        if targets:
            time.sleep(STACK_DUMP_WAIT_S)  # faulthandler writes from its signal handler

    def _terminate(self, *, dump: bool) -> None:
        live = self._live()
        if dump:
            self._dump_stacks(live)
        for w in live:
            w.signalled = True
            _signal_worker(w, signal.SIGTERM)

    def _kill(self) -> None:
        live = self._live()
        if live:
            log.info(
                "grace over: killing ranks %s with SIGKILL",
                ", ".join(str(w.spec.rank) for w in live),
            )
            self._dump_stacks(live)
        for w in live:
            w.signalled = True
            _signal_worker(w, signal.SIGKILL)

    # -- the loop ---------------------------------------------------------------
    def run(self) -> Outcome:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            self.start()
            self.coordinator.start_watch(self._wake)
            if not self.workers:
                self._wake()  # nothing of its own to wait for: straight to the barrier
            return self._loop()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            for w in self.workers:
                _signal_worker(w, signal.SIGKILL)
            for w in self.workers:
                for t in w.relays:
                    t.join(timeout=5)

    def _loop(self) -> Outcome:
        state = "running"  # -> stopping | aborting | barrier
        deadline: float | None = None
        seen: set[int] = set()
        failures: list[WorkerFailure] = []
        event: JobEvent | None = None
        killed = False
        deferred: list[WorkerFailure] = []
        deferred_until: float | None = None
        while True:
            wake_at = min(
                (t for t in (deadline, deferred_until if deferred else None) if t), default=None
            )
            timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
            select.select([self._wake_r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass

            while self._signals:
                name = signal.Signals(self._signals.pop(0)).name
                if state in ("running", "barrier"):
                    log.info("%s received: stopping the job on every host", name)
                    event = self.coordinator.report(
                        JobEvent(
                            kind="stop",
                            host=self.host,
                            headline=f"Stopped: {name} received on {self.host}",
                            exit_code=0,
                            time=time.time(),
                        )
                    )
                    if state == "barrier":  # nothing left to stop here; the others stop
                        return Outcome(0, event, (), stopped=True)
                    state, deadline = self._begin_stop(event)
                elif state in ("stopping", "aborting") and not killed and name == "SIGINT":
                    log.info("second SIGINT: killing the workers now")
                    self._kill()
                    killed = True

            for w in self.workers:
                if w.returncode is None or id(w) in seen:
                    continue
                seen.add(id(w))
                code = w.returncode
                if code == 0:
                    continue
                failure = WorkerFailure(
                    host=self.host,
                    rank=w.spec.rank,
                    local_rank=w.spec.local_rank,
                    returncode=code,
                    time=w.exited_at,
                    error_file=w.spec.error_file if w.spec.error_file.exists() else None,
                    stderr_tail=tuple(w.tail),
                    peer_stopped=w.signalled and state == "aborting",
                )
                rec = failure.error_record()
                if rec is not None and rec.get("reported_by") == "mpirun":
                    # The MPI launcher's error file names the rank that failed first.
                    failure = dataclasses.replace(
                        failure,
                        host=str(rec.get("host") or self.host),
                        rank=int(rec.get("rank") or 0),
                        local_rank=int(rec.get("local_rank") or 0),
                    )
                failures.append(failure)
                if state in ("running", "barrier") and not w.signalled:
                    if looks_like_peer_error(failure) and self.coordinator.event() is None:
                        # A collective broke: usually a victim of a failure elsewhere whose
                        # news is on its way. Give the root cause a moment to arrive.
                        if not deferred:
                            log.info(
                                "rank %d failed in a collective; waiting up to %.0f s for "
                                "the root cause elsewhere",
                                failure.rank,
                                PEER_ERROR_GRACE_S,
                            )
                            deferred_until = time.monotonic() + PEER_ERROR_GRACE_S
                        deferred.append(failure)
                        continue
                    event = self._publish_failure(failure)
                    state, deadline = "aborting", time.monotonic() + self.abort_grace_s

            overdue = deferred_until is not None and time.monotonic() >= deferred_until
            if deferred and overdue and state == "running" and self.coordinator.event() is None:
                event = self._publish_failure(min(deferred, key=lambda f: f.time))
                state, deadline = "aborting", time.monotonic() + self.abort_grace_s
                deferred = []

            if state in ("running", "barrier"):
                remote = self.coordinator.event()
                if remote is not None:
                    event = remote
                    if remote.kind == "stop":
                        log.info("stop requested by %s: stopping workers", remote.host)
                        state, deadline = self._begin_stop(remote)
                    else:
                        log.info("job aborted: %s", remote.headline)
                        if self._live():
                            self._control("abort", remote)
                            self._terminate(dump=True)
                        state = "aborting"
                        deadline = time.monotonic() + self.abort_grace_s

            if not self._live() and not (deferred and state == "running"):
                if state == "running":
                    self.coordinator.finished(self.on_finished() if self.on_finished else "{}")
                    state = "barrier"
                    deadline = time.monotonic() + BARRIER_LOG_EVERY_S
                if state == "barrier":
                    if self.coordinator.all_done():
                        return Outcome(0, None, (), stopped=False)
                    late = self.coordinator.event()
                    if late is not None:  # e.g. a model-dir clash found at the barrier
                        return self._outcome("aborting", late, failures)
                    if deadline is not None and time.monotonic() >= deadline:
                        # Not a time limit: the others may train longer than this host. A
                        # host that dies or hangs is caught by the heartbeats instead.
                        log.info(
                            "exit barrier: waiting for %s to finish (heartbeats watch them)",
                            ", ".join(self.coordinator.unfinished()) or "the master's verdict",
                        )
                        deadline = time.monotonic() + BARRIER_LOG_EVERY_S
                    continue
                return self._outcome(state, event, failures)

            expired = deadline is not None and time.monotonic() >= deadline
            if expired and not killed and state in ("stopping", "aborting"):
                self._kill()
                killed = True
                deadline = None

    def _publish_failure(self, failure: WorkerFailure) -> JobEvent:
        """Make ``failure`` the job's event (unless another came first) and stop our workers."""
        log.info("rank %d %s: stopping the job", failure.rank, failure.describe())
        event = self.coordinator.report(
            JobEvent(
                kind="failure",
                host=failure.host,
                rank=failure.rank,
                headline=failure_headline(failure),
                exit_code=failure.exit_code,
                time=failure.time,
                failure=failure.to_dict(),
            )
        )
        self._control("abort", event)
        self._terminate(dump=True)
        return event

    def _begin_stop(self, event: JobEvent) -> tuple[str, float]:
        if event.kind != "stop":
            self._control("abort", event)
            self._terminate(dump=True)
            return "aborting", time.monotonic() + self.abort_grace_s
        self._control("stop", event)
        self._terminate(dump=False)
        log.info("workers have %.0f s to finish (--grace)", self.grace_s)
        return "stopping", time.monotonic() + self.grace_s

    def _outcome(
        self, state: str, event: JobEvent | None, failures: list[WorkerFailure]
    ) -> Outcome:
        if state == "stopping":
            code = failures[0].exit_code if failures else 0
            return Outcome(code, event, tuple(failures), stopped=True)
        code = event.exit_code if event is not None and event.exit_code else 1
        if failures and event is not None and event.host == self.host and event.rank is not None:
            code = event.exit_code or 1
        return Outcome(code, event, tuple(failures), stopped=False)
