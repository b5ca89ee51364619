"""Start the workers, relay their output, watch them, stop them: one host's processes.

The agent's main thread sleeps in ``select`` on one wake-up pipe; worker exits (a waiter
thread each), signals (``signal.set_wakeup_fd``) and job-wide events (the coordinator's
watcher) all write to it, so the agent costs nothing while the job trains (besides a
once-a-second look at the ranks' step counters, for hang detection and step rates).
"""

from __future__ import annotations

import collections
import contextlib
import enum
import fcntl
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from smdist import contract, records, timeline
from smdist.agent import hang, reaper, stages, standby
from smdist.agent.rendezvous import Coordinator, JobEvent
from smdist.contract import STACK_DUMP_SIGNAL
from smdist.errors import RendezvousFailed
from smdist.log import log
from smdist.records import dataclass, field

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:  # the report's code is imported when a worker fails (issue 18)
    import subprocess
    from typing import IO, Any

    from smdist.agent.report.failure import WorkerFailure

TAIL_LINES = 50
MAX_LINE = 1 << 20  # a line longer than this is relayed in pieces rather than held
STACK_DUMP_WAIT_S = 1.0
"""At most this long for the survivors' stack dumps before an abort's SIGTERM. The wait ends as
soon as they are in (within 35 ms even with four busy loops on one core), so the bound only
matters on a machine slower than that: a rank not dumping yet when SIGTERM comes dies
without its dump, which is what the bound is for."""
BARRIER_LOG_EVERY_S = 60.0
STACK_READ_S = 2.0
"""How long a hang check waits for the ranks' stack dumps to arrive in their output."""
PEER_ERROR_GRACE_S = 2.0
"""How long a worker's broken-collective error waits for the root cause from elsewhere."""

_output_lock = threading.Lock()
_dump_lines = threading.Condition()
"""Notified by a relay when it kept lines for a stack dump being awaited."""


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
class Activity:
    """What a worker's output says about it: the relays write, the supervisor reads."""

    last_output: float = 0.0
    """When it last wrote a line (monotonic; 0: never)."""
    capture: list[str] | None = None
    """While not None, every stderr line is also kept here (a stack dump being read)."""


@dataclass
class Worker:
    spec: WorkerSpec
    proc: subprocess.Popen[bytes] | standby.Spawned
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    returncode: int | None = None
    exited_at: float = 0.0
    signalled: bool = False
    activity: Activity = field(default_factory=Activity)
    steps: hang.RankSteps | None = None


@dataclass(frozen=True)
class Outcome:
    """What happened on this host."""

    exit_code: int
    event: JobEvent | None
    """The job-wide event that ended the job early (root cause), if any."""
    failures: tuple[WorkerFailure, ...]
    stopped: bool
    """Ended by a stop request (SIGTERM here or on another host)."""
    step_rates: Mapping[int, float] = field(default_factory=dict)
    """Steps per second of each local rank that counted steps."""


PIPE_BYTES = 1 << 20
"""Each worker pipe's kernel buffer (``F_SETPIPE_SZ``; Linux's default is 64 KiB, and 1 MiB
is its default ceiling for an unprivileged process): a rank that logs in bursts writes on
instead of waiting for the relay, and the relay reads fewer, bigger chunks."""
READ_BYTES = 1 << 20
"""At most this much is read from a pipe at once (what is there: a read never waits for more)."""
_HEAP_KEPT_BYTES = 8 << 20
"""Freed memory glibc keeps for reuse instead of handing it back at once (its default is
128 KiB, and blocks from 128 KiB on are mapped afresh each time): a relayed chunk's buffers
are then the same memory every time, not pages the kernel zeroes again for every chunk."""


BIG_CHUNK = 1 << 16
"""A read this big means a fast log: the relay then asks glibc to keep what it frees."""


def _reuse_freed_memory() -> None:
    """Let glibc keep a few MiB it freed (``mallopt``): the relay's chunk-sized buffers are
    allocated and freed a few thousand times a second under a fast log. Called by the relay
    on its first big chunk, never at the agent's start (ctypes costs milliseconds there)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator's way
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_KEPT_BYTES // 2)
        libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_KEPT_BYTES)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class _Stream:
    """One worker pipe: where it goes, and the part of a line not yet ended."""

    __slots__ = ("activity", "dst", "glue", "pending", "prefix", "src", "tail")

    def __init__(
        self,
        src: IO[bytes],
        dst: IO[bytes],
        prefix: bytes,
        tail: collections.deque[str] | None,
        activity: Activity,
    ) -> None:
        self.src, self.dst, self.prefix, self.tail, self.activity = src, dst, prefix, tail, activity
        self.glue = b"\n" + prefix
        self.pending = b""


class Relay:
    """Copies whole lines from every worker pipe of this host to the agent's own output,
    each with its ``[host/rank]`` prefix: one thread for all of them, asleep in ``poll``
    until a pipe has something.

    A chunk goes out as soon as it is read (only the part of a line not yet ended waits for
    the rest of it), in one write: one rank's lines are never spliced into another's. It
    works a chunk at a time (one ``replace`` per read, not a loop per line) and copies a
    chunk twice (the prefixes put in, then the pieces joined), so the relay costs the job
    next to nothing even at hundreds of thousands of lines a second, and its memory is one
    chunk whatever the rate. One thread, not one per pipe: no contention between relays for
    the interpreter, and one wake-up per chunk.
    """

    def __init__(self) -> None:
        self._streams: dict[int, _Stream] = {}
        self._poll = select.poll()
        self._thread: threading.Thread | None = None
        self._sealed = False
        self._fast = False
        """A big chunk came: glibc was asked to keep freed memory."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poll.register(self._wake_r, select.POLLIN)

    def start(self) -> None:
        """Start relaying (streams may be added until ``seal``)."""
        self._thread = threading.Thread(target=self._run, name="smdist-relay", daemon=True)
        self._thread.start()

    def add(
        self,
        src: IO[bytes],
        dst: IO[bytes],
        prefix: bytes,
        tail: collections.deque[str] | None = None,
        activity: Activity | None = None,
    ) -> None:
        """Relay ``src`` to ``dst``; ``tail`` keeps its last lines (the failure report's),
        ``activity`` when it last wrote and a stack dump's lines."""
        fd = src.fileno()
        with contextlib.suppress(OSError):  # a smaller buffer only costs wake-ups
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._streams[fd] = _Stream(src, dst, prefix, tail, activity or Activity())
        self._poll.register(fd, select.POLLIN)
        self._wake()

    def seal(self) -> None:
        """No more streams: the relay ends once every one has."""
        self._sealed = True
        self._wake()

    def join(self, timeout: float) -> None:
        """Until every pipe has ended (each worker and whatever it left holding its output
        gone), at most ``timeout`` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # a pipe still held open (its wake-up pipe stays with it)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while self._streams or not self._sealed:
            for fd, _event in self._poll.poll():
                if fd == self._wake_r:  # a stream added (seen from the next poll on)
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    continue
                self._read(fd)

    def _read(self, fd: int) -> None:
        stream = self._streams[fd]
        try:
            chunk = os.read(fd, READ_BYTES)
        except OSError:
            chunk = b""
        if chunk:
            if len(chunk) >= BIG_CHUNK and not self._fast:
                self._fast = True
                _reuse_freed_memory()
            self._feed(stream, chunk)
            return
        if stream.pending:  # a last line without its newline
            self._emit(stream, stream.pending, b"\n")
            stream.pending = b""
        self._poll.unregister(fd)
        del self._streams[fd]
        stream.src.close()

    def _feed(self, stream: _Stream, chunk: bytes) -> None:
        if chunk.rfind(b"\n") < 0:
            stream.pending += chunk
            if len(stream.pending) >= MAX_LINE:  # an endless line goes out in pieces
                self._emit(stream, stream.pending, b"\n")
                stream.pending = b""
            return
        cut = self._emit(stream, stream.pending, chunk)
        stream.pending = chunk[cut + 1 :]

    def _emit(self, stream: _Stream, head: bytes, chunk: bytes) -> int:
        """Write the lines ``head + chunk`` ends up to ``chunk``'s last newline (``head``: the
        start of the first, read before); return where that newline is."""
        cut = chunk.rfind(b"\n")
        if stream.prefix:
            body = chunk.replace(b"\n", stream.glue)  # each line after a newline: its prefix
            end = body.rfind(b"\n") + 1  # the prefix put after the last one is not sent
            out = b"".join((stream.prefix, head, memoryview(body)[:end]))
        elif head or cut + 1 < len(chunk):
            out = b"".join((head, memoryview(chunk)[: cut + 1]))
        else:
            out = chunk
        with _output_lock:
            try:
                stream.dst.write(out)
                stream.dst.flush()
            except (OSError, ValueError):
                pass
        activity = stream.activity
        activity.last_output = time.monotonic()
        if stream.tail is not None:
            stream.tail.extend(
                line.decode("utf-8", "replace")[:1000]
                for line in _last_lines(head, chunk, cut, TAIL_LINES)
            )
            if activity.capture is not None:
                text = (head + chunk[:cut]).decode("utf-8", "replace")
                with _dump_lines:
                    activity.capture.extend(text.split("\n"))
                    _dump_lines.notify_all()
        return cut


def _last_lines(head: bytes, chunk: bytes, cut: int, count: int) -> list[bytes]:
    """The last ``count`` lines of ``head + chunk[:cut]``, without copying the rest."""
    lines: list[bytes] = []
    end = cut
    while len(lines) < count:
        start = chunk.rfind(b"\n", 0, end)
        if start < 0:
            lines.append(head + chunk[:end])
            break
        lines.append(chunk[start + 1 : end])
        end = start
    lines.reverse()
    return lines


DUMP_QUIET_S = 0.05
"""A dump has arrived once its header is in and the output has then been quiet this long
(faulthandler writes it in one go, from its signal handler)."""


def _await_dumps(workers: Sequence[Worker], timeout_s: float) -> None:
    """Until every worker's stack dump has arrived (its header in, then its output quiet for
    DUMP_QUIET_S), or ``timeout_s``: woken by the relays as lines come, so a dump costs its
    own time, not a fixed wait."""
    deadline = time.monotonic() + timeout_s
    with _dump_lines:
        while True:
            now = time.monotonic()
            live = [w for w in workers if w.returncode is None]
            headers = all(
                any("(most recent call first)" in line for line in w.activity.capture or ())
                for w in live
            )
            quiet_at = max((w.activity.last_output for w in live), default=0.0) + DUMP_QUIET_S
            if headers and now >= quiet_at:
                return
            if now >= deadline:
                return
            # Headers missing: until a line comes. All in: until the output has been quiet.
            _dump_lines.wait(min(deadline, quiet_at if headers else deadline) - now)


def _dump_watched(host: str, ranks: Sequence[hang.RankSteps]) -> dict[int, list[str]]:
    """SIGUSR1 to each rank mpirun started on this host (its pid file; only a process that is
    still smdist's MPI rank), its dump read back from its stacks file once it stopped growing
    (at most STACK_READ_S), and written into the job log as ``[host/rank]`` lines."""
    sent: dict[int, tuple[Path, int]] = {}
    for rs in ranks:
        run_dir = contract.RunDir(rs.counter.path.parent)
        stacks = run_dir.stacks_file(rs.rank)
        try:
            pid = int(run_dir.pid_file(rs.rank).read_text(encoding="utf-8"))
            if b"smdist.worker.mpi_rank" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue  # gone, and its pid taken by another process
            size = stacks.stat().st_size if stacks.exists() else 0
            os.kill(pid, STACK_DUMP_SIGNAL)
        except (OSError, ValueError):
            continue
        sent[rs.rank] = (stacks, size)
    sizes = {r: -1 for r in sent}
    deadline = time.monotonic() + STACK_READ_S
    while sent and time.monotonic() < deadline:
        time.sleep(DUMP_QUIET_S)
        grown = {r: _size(p) for r, (p, _) in sent.items()}
        if all(grown[r] > sent[r][1] and grown[r] == sizes[r] for r in sent):
            break  # every dump in, and none grew for DUMP_QUIET_S
        sizes = grown
    dumps: dict[int, list[str]] = {}
    for rank, (path, start) in sent.items():
        try:
            with path.open("rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        dumps[rank] = text.splitlines()
        prefix = f"[{host}/{rank}] "
        with _output_lock, contextlib.suppress(OSError, ValueError):
            sys.stderr.write("".join(prefix + line + "\n" for line in dumps[rank]))
            sys.stderr.flush()
    return dumps


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _signal_worker(w: Worker, sig: int) -> None:
    if w.returncode is not None and sig != signal.SIGKILL:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(w.proc.pid, sig)


class State(enum.Enum):
    """Where one host's supervisor is; the arrows are the only transitions.

    RUNNING  -> STOPPING (a stop request, here or anywhere), ABORTING (a failure, here or
                anywhere, or a lost host), BARRIER (every worker here exited 0)
    BARRIER  -> done (every host finished), ABORTING (a late event, e.g. a model-dir clash),
                STOPPING (a stop request elsewhere)
    STOPPING -> done when the workers exit (killed after --grace)
    ABORTING -> done when the workers exit (killed after --abort-grace)
    """

    RUNNING = "running"
    STOPPING = "stopping"
    ABORTING = "aborting"
    BARRIER = "barrier"


class Supervisor:
    def __init__(
        self,
        host: str,
        specs: Sequence[WorkerSpec],
        coordinator: Coordinator,
        *,
        grace_s: float,
        abort_grace_s: float,
        identify: Callable[[WorkerFailure], WorkerFailure] = lambda failure: failure,
        hang_timeout_s: float | None = None,
        hang_startup_s: float = hang.STARTUP_S,
        watched: Sequence[hang.RankSteps] = (),
        relayed: hang.RelayedRanks | None = None,
    ) -> None:
        """``identify``: the backend's say on who failed (a launcher names its rank).
        ``hang_timeout_s``: a rank without progress for this long is a hang (None: off).
        ``hang_startup_s``: a rank that counted no step is still starting this long.
        ``watched``: the step counters of this host's ranks that mpirun starts (not these
        workers): judged by their steps once they counted one; their stacks come from their
        stacks files. ``relayed`` (the master under MPI): every rank's last output time,
        for judging the ranks that counted no step (their hosts publish which did)."""
        self.host = host
        self.specs = list(specs)
        self.coordinator = coordinator
        self.grace_s = grace_s
        self.abort_grace_s = abort_grace_s
        self.identify = identify
        self.workers: list[Worker] = []
        self.state = State.RUNNING
        self.deadline: float | None = None
        """The next timed step: the kill (STOPPING, ABORTING), a progress line (BARRIER)."""
        self.event: JobEvent | None = None
        self.failures: list[WorkerFailure] = []
        self.killed = False
        self.deferred: list[WorkerFailure] = []
        """Broken-collective failures waiting (until ``deferred_until``) for a root cause."""
        self.deferred_until: float | None = None
        self._seen: set[int] = set()
        self.hang_timeout_s = hang_timeout_s
        self.watched = list(watched)
        self.hang_startup_s = hang_startup_s
        self.relayed = relayed
        self.counted: set[int] = set()
        """Ranks of ``watched`` that counted a step, as last published."""
        self.tick_at: float | None = None
        """When to sample the step counters next (None: no worker counts steps)."""
        self.stacks_sent = False
        """This host has reported its ranks' stacks for a hang check."""
        self.verdict_at: float | None = None
        """This host asked for a hang check: decide by then at the latest."""
        self.way_out_said = False
        """This host said every rank of its own finished its work (``on_way_out``)."""
        self.job_out_at: float | None = None
        """When this host learnt every host's ranks finished their work: a rank on its way
        out is timed from then at the earliest (before, it may wait for a slower peer)."""
        self._signals: list[int] = []
        self.relay = Relay()
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
        reaper.forget(w.proc.pid)
        w.exited_at = time.time()
        w.returncode = code
        self._wake()
        with _dump_lines:  # a dump awaited from it will not come
            _dump_lines.notify_all()

    def start(self) -> None:
        self.relay.start()
        try:
            self._spawn()
        finally:
            self.relay.seal()
        for w in self.workers:
            threading.Thread(target=self._wait_worker, args=(w,), daemon=True).start()
        if self.watched or self.relayed is not None:
            self.tick_at = time.monotonic() + self._tick_s()

    def _spawn(self) -> None:
        me = os.getpid()
        if not self.specs:
            standby.discard()  # no rank here (an MPI host whose ranks mpirun starts)
        for spec in self.specs:
            counter = None
            env = spec.env
            if spec.python:  # started by the bootstrap: it can count steps
                counter = hang.open_counter(spec.error_file.parent, spec.rank, spec.local_rank)
                env = dict(env, **{contract.STEPS_FILE_ENV: str(counter.counter.path)})
                self.tick_at = time.monotonic() + self._tick_s()
            # A rank that runs the bootstrap asks for the parent-death signal itself (first
            # thing, checking it was not orphaned already): started without a preexec_fn, it
            # is a vfork of the agent, not a fork copying its memory and running Python code.
            # Any other program cannot ask: the preexec_fn asks for it between fork and exec.
            # (The first rank may already have its interpreter, started with the agent: it
            # asked for the signal while it waited.)
            bootstrap = spec.python and tuple(spec.argv[1:3]) == standby.BOOTSTRAP
            proc: subprocess.Popen[bytes] | standby.Spawned | None = (
                standby.take(spec.argv, env) if not self.workers else None
            )
            if proc is None:
                import subprocess  # here: a one-rank host hands its rank over without it

                if bootstrap:
                    env = dict(env, **{contract.DIE_WITH_ENV: str(me)})

                with reaper.spawning() as own:  # its own session: registered before it exits
                    proc = subprocess.Popen(
                        spec.argv,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                        preexec_fn=None if bootstrap else contract.exec_dying_with(me),
                    )
                    own.add(proc.pid)
                timeline.mark(f"rank {spec.rank} spawned")  # (the standby's: as it is handed)
            w = Worker(spec, proc, steps=counter)
            prefix = f"[{self.host}/{spec.rank}] ".encode() if spec.prefix else b""
            assert proc.stdout is not None and proc.stderr is not None
            self.relay.add(proc.stdout, sys.stdout.buffer, prefix, None, w.activity)
            self.relay.add(proc.stderr, sys.stderr.buffer, prefix, w.tail, w.activity)
            self.workers.append(w)

    def _control(self, action: str, event: JobEvent) -> None:
        """Tell the workers (the decorator) why they are being signalled."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                contract.write_control(w.spec.control_file, action, event.kind, event.headline)

    def _live(self) -> list[Worker]:
        return [w for w in self.workers if w.returncode is None]

    def _dump_stacks(self, workers: Sequence[Worker], wait_s: float = STACK_DUMP_WAIT_S) -> None:
        """SIGUSR1 to each live Python worker, then wait until every dump has arrived in its
        output (at most ``wait_s``): faulthandler writes from its signal handler, and the
        SIGTERM that usually follows would cut it off."""
        targets = [w for w in workers if w.spec.python and w.returncode is None]
        mine = [w for w in targets if w.activity.capture is None]  # a hang check keeps its own
        for w in mine:
            w.activity.capture = []
        for w in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.proc.pid, STACK_DUMP_SIGNAL)
        if targets:
            _await_dumps(targets, wait_s)
        for w in mine:
            w.activity.capture = None

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
        self.killed = True

    # -- the state machine -----------------------------------------------------
    def run(self) -> Outcome:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._signals += stages.take_pending()  # a stop just before these handlers were in
        reaper.start_if_pid1()  # a container's init: the job's orphans are ours
        try:
            self.start()
            self.coordinator.start_watch(self._wake)
            if not self.workers or self._signals:
                self._wake()  # none to wait for (straight to the barrier), or a stop to act on
            while True:
                self._sleep()
                outcome = self._step()
                if outcome is not None:
                    return records.replace(outcome, step_rates=self.step_rates())
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            for w in self.workers:
                _signal_worker(w, signal.SIGKILL)
            self.relay.join(timeout=5)

    def _sleep(self) -> None:
        """Until something is written to the wake-up pipe or the next deadline passes."""
        timers = (
            self.deadline,
            self.deferred_until if self.deferred else None,
            self.tick_at if self._watching() else None,
            self.verdict_at,
        )
        wake_at = min((t for t in timers if t), default=None)
        timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
        select.select([self._wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _step(self) -> Outcome | None:
        """One wake-up: hand each event that happened to its method, in a fixed order."""
        while self._signals:
            outcome = self._on_signal_received(signal.Signals(self._signals.pop(0)).name)
            if outcome is not None:
                return outcome
        for w in self.workers:
            if w.returncode is not None and id(w) not in self._seen:
                self._seen.add(id(w))
                self._on_worker_exited(w)
        due = self.deferred_until is not None and time.monotonic() >= self.deferred_until
        if self.deferred and due:
            self._on_peer_grace_over()
        if self.state in (State.RUNNING, State.BARRIER):
            remote = self.coordinator.event()
            if remote is not None:
                self._on_job_event(remote)
        if self._watching():
            self._hang_events()
        # Gone means every exit was handled above, not that none is live now: a waiter thread
        # can set a returncode after that loop, and that rank's failure must not be lost.
        handled = all(id(w) in self._seen for w in self.workers)
        if handled and not (self.deferred and self.state is State.RUNNING):
            return self._on_workers_gone()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._on_grace_over()
        return None

    def _on_signal_received(self, name: str) -> Outcome | None:
        """SIGTERM/SIGINT here: stop every host (a second SIGINT kills the workers now)."""
        if self.state in (State.STOPPING, State.ABORTING):
            if not self.killed and name == "SIGINT":
                log.info("second SIGINT: killing the workers now")
                self._kill()
            return None
        log.info("%s received: stopping the job on every host", name)
        self.event = self.coordinator.report(
            JobEvent(
                kind="stop",
                host=self.host,
                headline=f"Stopped: {name} received on {self.host}",
                exit_code=0,
                time=time.time(),
            )
        )
        if self.state is State.BARRIER:  # nothing left to stop here; the others stop
            return Outcome(0, self.event, (), stopped=True)
        self._begin_stop(self.event)
        return None

    def _on_worker_exited(self, w: Worker) -> None:
        """A worker exited: a failure unless 0; the first one stops the job everywhere."""
        if w.returncode == 0 or w.returncode is None:
            return
        from smdist.agent.report.classify import looks_like_peer_error
        from smdist.agent.report.failure import WorkerFailure

        failure = self.identify(
            WorkerFailure(
                host=self.host,
                rank=w.spec.rank,
                local_rank=w.spec.local_rank,
                returncode=w.returncode,
                time=w.exited_at,
                error_file=w.spec.error_file if w.spec.error_file.exists() else None,
                stderr_tail=tuple(w.tail),
                peer_stopped=w.signalled and self.state is State.ABORTING,
            )
        )
        self.failures.append(failure)
        if self.state not in (State.RUNNING, State.BARRIER) or w.signalled:
            return  # stopped by us: a consequence, not a cause
        if looks_like_peer_error(failure) and self.coordinator.event() is None:
            # A collective broke: usually a victim of a failure elsewhere whose news is on
            # its way. Give the root cause a moment to arrive.
            if not self.deferred:
                log.info(
                    "rank %d failed in a collective; waiting up to %.0f s for the root cause "
                    "elsewhere",
                    failure.rank,
                    PEER_ERROR_GRACE_S,
                )
                self.deferred_until = time.monotonic() + PEER_ERROR_GRACE_S
            self.deferred.append(failure)
            return
        self._publish_failure(failure)

    def _on_peer_grace_over(self) -> None:
        """No root cause arrived from elsewhere: the first broken collective is the cause."""
        first = min(self.deferred, key=lambda f: f.time)
        self.deferred = []  # already among self.failures; the timer is done
        if self.state is State.RUNNING and self.coordinator.event() is None:
            self._publish_failure(first)

    def _on_job_event(self, remote: JobEvent) -> None:
        """Another host (or the store) ended the job: a stop request, a failure, a lost host."""
        self.event = remote
        if remote.kind == "stop":
            log.info("stop requested by %s: stopping workers", remote.host)
            self._begin_stop(remote)
            return
        log.info("job aborted: %s", remote.headline)
        if self._live():
            self._control("abort", remote)
            self._terminate(dump=True)
        self._enter(State.ABORTING, self.abort_grace_s)

    def _on_workers_gone(self) -> Outcome | None:
        """Every worker here has exited: enter the exit barrier, or end with the outcome."""
        if self.state is State.RUNNING:
            if self.hang_timeout_s:
                self._say_way_out(time.monotonic())  # the others may wait on this host's say
            self.coordinator.finished()
            self._enter(State.BARRIER, BARRIER_LOG_EVERY_S)
        if self.state is State.BARRIER:
            return self._on_barrier()
        return self._outcome()

    def _on_barrier(self) -> Outcome | None:
        """At the exit barrier: done when every host is; a late event still fails the job."""
        if self.coordinator.all_done():
            return Outcome(0, None, (), stopped=False)
        late = self.coordinator.event()
        if late is not None:  # e.g. a model-dir clash found at the barrier
            self.state, self.event = State.ABORTING, late
            return self._outcome()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            # Not a time limit: the others may train longer than this host. A host that
            # dies or hangs is caught by the heartbeats instead.
            log.info(
                "exit barrier: waiting for %s to finish (heartbeats watch them)",
                ", ".join(self.coordinator.unfinished()) or "the master's verdict",
            )
            self.deadline = time.monotonic() + BARRIER_LOG_EVERY_S
        return None

    def _on_grace_over(self) -> None:
        """Workers told to stop did not exit within their grace: kill them."""
        if self.state in (State.STOPPING, State.ABORTING) and not self.killed:
            self._kill()
            self.deadline = None

    # -- hangs ---------------------------------------------------------------------
    def _watching(self) -> bool:
        """Whether the ranks' progress is watched now: while this host's workers run, and,
        for ranks mpirun started, while this host waits at the barrier (the master's mpirun
        runs them; this host has no worker of its own)."""
        mpi = bool(self.watched) or self.relayed is not None
        return self.state is State.RUNNING or (self.state is State.BARRIER and mpi)

    def _tick_s(self) -> float:
        return min(hang.TICK_S, self.hang_timeout_s / 4) if self.hang_timeout_s else hang.TICK_S

    def _hang_events(self) -> None:
        """While RUNNING: a hang check asked by any host, the counters' tick, the verdict."""
        if not self.stacks_sent and self.coordinator.stacks_requested():
            self._on_stacks_requested()
        now = time.monotonic()
        if self.tick_at is not None and now >= self.tick_at:
            self._on_tick(now)
        if self.verdict_at is not None:
            self._on_stack_reports()

    def _on_tick(self, now: float) -> None:
        """Sample the step counters; a rank idle past --hang-timeout starts a hang check (a
        rank whose work is done only once every host's is, and timed from then)."""
        self.tick_at = now + self._tick_s()
        timeout_s = self.hang_timeout_s
        idle: list[int] = []
        out: list[int] = []  # done with their work, idle since: waiting for a peer, or stuck
        for w in self._live():
            if w.steps is not None:
                w.steps.sample(now)
                last = w.activity.last_output
                if timeout_s and w.steps.hung(now, last, timeout_s, self.hang_startup_s):
                    (idle if w.steps.finished_at is None else out).append(w.spec.rank)
        for rs in self.watched:
            rs.sample(now)
            if timeout_s and rs.steps and rs.hung(now, 0.0, timeout_s):
                (idle if rs.finished_at is None else out).append(rs.rank)
        if timeout_s:
            self._say_way_out(now)
        if self.hang_timeout_s and self.watched:
            self._publish_counted()
        # The master's relay judges while mpirun runs (once it ended, so did every rank).
        relaying = self.relayed is not None and self.state is State.RUNNING
        if self.hang_timeout_s and relaying and not self.stacks_sent:
            idle += self._quiet_relayed(now, self.hang_timeout_s)
        why = ""
        if timeout_s and out and not idle and not self.stacks_sent:
            idle = self._stuck_on_way_out(now, out, timeout_s)
            why = " on its way out, every host's ranks done with their work"
        if idle and not self.stacks_sent:
            log.info(
                "rank(s) %s made no progress for %.0f s%s (--hang-timeout): reading every "
                "rank's stack on every host",
                ", ".join(map(str, idle)),
                self.hang_timeout_s,
                why,
            )
            self.coordinator.request_stacks()
            self.verdict_at = now + hang.REPORT_WAIT_S
            self._on_stacks_requested()

    def _mine_done(self) -> bool:
        """Whether every rank of this host finished its work (true of none). Under MPI the
        ranks are the watched ones (the worker is mpirun); a rank without a counter never
        says it finished."""
        if self.watched or self.relayed is not None:
            return all(rs.finished_at is not None for rs in self.watched)
        live = self._live()
        return all(w.steps is not None and w.steps.finished_at is not None for w in live)

    def _say_way_out(self, now: float) -> None:
        """Once every rank of this host finished its work: say so job-wide, once (one store
        write per host and attempt, never one per tick)."""
        if self.way_out_said or not self._mine_done():
            return
        self.way_out_said = True
        if self.coordinator.on_way_out() and self.job_out_at is None:
            self.job_out_at = now  # this host was the last: the job's way out begins now

    def _stuck_on_way_out(self, now: float, out: Sequence[int], timeout_s: float) -> list[int]:
        """Of the ranks idle past the timeout since their work ended, those stuck on the way
        out: every host's ranks are done too, and have been for the timeout. One store read
        per tick, only while such a rank waits here and until every host is done."""
        if self.job_out_at is None:
            if not self.coordinator.all_on_way_out():
                return []  # a slower rank still works: this one waits for it, as it should
            self.job_out_at = now
        return list(out) if now - self.job_out_at >= timeout_s else []

    def _publish_counted(self) -> None:
        """Under MPI: tell the master which of this host's ranks counted a step, when that
        set grows (once or twice a job: the ranks' first steps come together). A rank that
        finished counts too: silent in MPI_Finalize while a slower peer works on, it is not
        to be judged by its output (its way out is timed by its steps, when it has any)."""
        counted = {rs.rank for rs in self.watched if rs.steps or rs.finished_at is not None}
        if counted == self.counted:
            return
        if self.relayed is not None:
            self.relayed.counted |= counted  # the master's own: no need to ask
        else:
            try:
                value = ",".join(map(str, sorted(counted)))
                self.coordinator.publish(hang.COUNTED_KEY + self.host, value)
            except RendezvousFailed:
                return  # the next tick tries again (a store gone is the heartbeat's news)
        self.counted = counted

    def _counted_elsewhere(self) -> set[int]:
        """The ranks every host said counted a step (one read of the store)."""
        counted: set[int] = set()
        for value in self.coordinator.published(hang.COUNTED_KEY).values():
            counted.update(int(r) for r in value.split(",") if r)
        return counted

    def _quiet_relayed(self, now: float, timeout_s: float) -> list[int]:
        """The master under MPI: ranks silent for ``timeout_s`` (past start-up) that counted
        no step. Their hosts are asked (one store read) only when one is silent that long:
        a rank that counts steps is known from then on, so this reads at most once or twice
        a job, and a silent rank that counted none starts the hang check."""
        assert self.relayed is not None
        quiet = self.relayed.quiet(now, timeout_s, self.hang_startup_s)
        mine = {rs.rank for rs in self.watched}
        if any(r not in mine for r in quiet):
            try:
                self.relayed.counted |= self._counted_elsewhere()
            except RendezvousFailed as exc:  # the store's trouble: the heartbeat reports it
                log.info("hang watch: cannot read which ranks counted a step: %s", exc)
                return []
        return [r for r in quiet if r not in self.relayed.counted]

    def _on_stacks_requested(self) -> None:
        """A hang check (asked here or elsewhere): dump this host's stacks and report them
        with each rank's steps and idle time."""
        self.stacks_sent = True
        now = time.monotonic()
        watched = [w for w in self._live() if w.steps is not None]
        idle = {}
        for w in watched:
            assert w.steps is not None
            w.steps.sample(now)
            last = w.activity.last_output
            idle[w.spec.rank] = w.steps.idle_s(now, last, self.hang_startup_s)  # before the dump
            w.activity.capture = []
        self._dump_stacks(watched)
        _await_dumps(watched, STACK_READ_S)
        reports = []
        for w in watched:
            assert w.steps is not None
            dump, w.activity.capture = w.activity.capture or [], None
            seconds, judged_by = idle[w.spec.rank]
            reports.append(hang.rank_report(self.host, w.steps, seconds, judged_by, dump))
        output_idle = self._publish_output_idle(now)
        dumps = _dump_watched(self.host, self.watched)
        for rs in self.watched:
            rs.sample(now)
            # Without a step counted, its output says (the master's mpirun has it: 0 here
            # on another host, and the verdict takes the master's word, OUTPUT_IDLE_KEY).
            seconds, judged_by = (
                rs.idle_s(now, 0.0) if rs.steps else (output_idle.get(rs.rank, 0.0), "output")
            )
            dump = dumps.get(rs.rank, [])
            reports.append(hang.rank_report(self.host, rs, seconds, judged_by, dump))
        self.coordinator.put_stacks(reports)

    def _publish_output_idle(self, now: float) -> dict[int, float]:
        """The master under MPI, on a hang check: publish (before its report, so a verdict
        that has the master's report has this too) each rank's seconds without output,
        for the ranks not known to have counted a step."""
        if self.relayed is None:
            return {}
        with contextlib.suppress(RendezvousFailed):  # at worst: judged by output, as before
            self.relayed.counted |= self._counted_elsewhere()
        idle = {
            r: self.relayed.idle_s(r, now, self.hang_startup_s)
            for r in range(len(self.relayed.hosts))
            if r not in self.relayed.counted
        }
        with contextlib.suppress(RendezvousFailed):
            self.coordinator.publish(hang.OUTPUT_IDLE_KEY, json.dumps(idle))
        return idle

    def _on_stack_reports(self) -> None:
        """This host found the hang: once every host reported (or time is up), the rank(s)
        that stopped first are the job's failure."""
        assert self.verdict_at is not None and self.hang_timeout_s is not None
        reports, missing = self.coordinator.stacks()
        if missing and time.monotonic() < self.verdict_at:
            return
        self.verdict_at = None
        if missing:
            log.info("hang check: no stacks from %s; deciding without them", ", ".join(missing))
        ranks = [r for host in reports.values() for r in host]
        self._merge_output_idle(ranks)
        culprits = hang.first_stuck(ranks, self.hang_timeout_s)
        if not culprits:
            return
        top = culprits[0]
        from smdist.agent.report.failure import WorkerFailure

        log.info(
            "hang check: rank %s on %s stopped first, at %s", top["rank"], top["host"], top["where"]
        )
        self._publish_failure(
            WorkerFailure(
                host=str(top["host"]),
                rank=int(top["rank"]),
                local_rank=int(top["local_rank"]),
                returncode=1,
                time=time.time(),
                record=hang.hang_record(culprits, self.hang_timeout_s),
            )
        )

    def _merge_output_idle(self, ranks: Sequence[dict[str, Any]]) -> None:
        """Under MPI: a rank that counted no step is as idle as the master's relay says."""
        try:
            value = self.coordinator.published(hang.OUTPUT_IDLE_KEY).get(hang.OUTPUT_IDLE_KEY)
            idle = {int(r): float(s) for r, s in json.loads(value or "{}").items()}
        except (RendezvousFailed, ValueError):
            return
        for r in ranks:
            if not r["steps"] and int(r["rank"]) in idle:
                r["idle_s"] = round(max(float(r["idle_s"]), idle[int(r["rank"])]), 1)
                r["judged_by"] = "output"

    def step_rates(self) -> dict[int, float]:
        rates = {}
        counters = [w.steps for w in self.workers if w.steps is not None] + self.watched
        for rs in counters:
            rs.sample(time.monotonic())
            if (rate := rs.rate()) is not None:
                rates[rs.rank] = rate
        return rates

    # -- transitions -------------------------------------------------------------
    def _enter(self, state: State, deadline_in_s: float | None) -> None:
        self.state = state
        self.deadline = None if deadline_in_s is None else time.monotonic() + deadline_in_s

    def _publish_failure(self, failure: WorkerFailure) -> None:
        """Make ``failure`` the job's event (unless another came first) and stop our workers."""
        from smdist.agent.report.classify import headline as failure_headline

        headline = failure_headline(failure)
        log.info("rank %d %s: stopping the job", failure.rank, failure.describe())
        self.event = self.coordinator.report(
            JobEvent(
                kind="failure",
                host=failure.host,
                rank=failure.rank,
                headline=headline,
                exit_code=failure.exit_code,
                time=failure.time,
                failure=failure.to_dict(),
            )
        )
        self._control("abort", self.event)
        self._terminate(dump=True)
        self._enter(State.ABORTING, self.abort_grace_s)

    def _begin_stop(self, event: JobEvent) -> None:
        if event.kind != "stop":
            self._control("abort", event)
            self._terminate(dump=True)
            self._enter(State.ABORTING, self.abort_grace_s)
            return
        self._control("stop", event)
        self._terminate(dump=False)
        log.info("workers have %.0f s to finish (--grace)", self.grace_s)
        self._enter(State.STOPPING, self.grace_s)

    def _outcome(self) -> Outcome:
        failures, event = tuple(self.failures), self.event
        if self.state is State.STOPPING:
            code = failures[0].exit_code if failures else 0
            return Outcome(code, event, failures, stopped=True)
        code = event.exit_code if event is not None and event.exit_code else 1
        if failures and event is not None and event.host == self.host and event.rank is not None:
            code = event.exit_code or 1
        return Outcome(code, event, failures, stopped=False)
