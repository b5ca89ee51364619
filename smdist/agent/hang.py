"""Hang detection and step rates, from each rank's step counter (``smdist.steps``).

A rank that made no step for ``--hang-timeout`` seconds (a rank that never counts a step is
judged by its output instead) starts a job-wide check: every host dumps its ranks' Python
stacks and reports each rank's steps, idle time and innermost frames. The rank(s) that
stopped *first* are the cause: the fewest steps, and of those the ones not waiting inside
a collective (the others are their victims). Their hang is the job's failure.

A rank whose work is done (``smdist.steps.FINISHED``) waits for the others at the end: it
starts a check only once every host's ranks are done too (``Coordinator.on_way_out``), and
is named only when no rank still works.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from smdist import contract
from smdist.contract import RunDir
from smdist.records import dataclass, field
from smdist.steps import StepCounter

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

TICK_S = 1.0
STARTUP_S = 120.0
"""A rank that has not counted a step yet is still starting for this long (importing torch,
meeting its peers, perhaps logging while it waits for them): not idle, whatever it wrote.
The default of ``--hang-startup``."""
COUNTED_KEY = "hang/counted/"
"""Under MPI, ``COUNTED_KEY + host``: the ranks of that host that counted a step (published
when that set grows: once or twice a job), read by the master, which has their output."""
OUTPUT_IDLE_KEY = "hang/output-idle"
"""Under MPI, the master's answer to a hang check for the ranks that counted no step: their
seconds without output, which their own hosts cannot know (JSON ``{rank: seconds}``)."""
REPORT_WAIT_S = 5.0
"""How long the host that found a hang waits for every host's stacks before it decides."""
STRAGGLER_RATIO = 0.5
"""A rank below this fraction of the median step rate is named a straggler."""
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>.+)$')
_COLLECTIVE_FILES = ("/torch/distributed/", "/torch/nn/parallel/", "/mpi4py/")


@dataclass
class RankSteps:
    """One local rank's counter as the agent samples it."""

    rank: int
    local_rank: int
    counter: StepCounter
    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    changed_at: float = field(default_factory=time.monotonic)
    first: tuple[float, int] | None = None
    """(when, steps) of the first step seen: the rate leaves start-up out."""
    finished_at: float | None = None
    """When it was first seen finished (``smdist.steps.FINISHED``): from then on it is on its
    way out, which gets the timeout afresh (a rank at the end may wait for slower peers)."""

    def sample(self, now: float) -> None:
        steps, finished = self.counter.read()
        if finished and self.finished_at is None:
            self.finished_at = now
        if steps != self.steps:
            if self.first is None:
                self.first = (now, steps)
            self.steps, self.changed_at = steps, now

    def idle_s(
        self, now: float, last_output: float, startup_s: float = STARTUP_S
    ) -> tuple[float, str]:
        """Seconds without progress, and what says so: its steps, or its output. Once it
        has finished: the time since then, or since its last step if that came later."""
        if self.finished_at is not None:
            return now - max(self.finished_at, self.changed_at), "exit"
        if self.steps:
            return now - self.changed_at, "steps"
        return output_idle_s(now, self.started, last_output, startup_s), "output"

    def hung(
        self, now: float, last_output: float, timeout_s: float, startup_s: float = STARTUP_S
    ) -> bool:
        seconds, _ = self.idle_s(now, last_output, startup_s)
        return seconds >= timeout_s

    def rate(self) -> float | None:
        """Steps per second between its first and its last step seen."""
        if self.first is None or self.changed_at <= self.first[0]:
            return None
        return (self.steps - self.first[1]) / (self.changed_at - self.first[0])


def output_idle_s(now: float, started: float, last_output: float, startup_s: float) -> float:
    """Seconds a rank that counted no step has written nothing (0 while it is still
    starting: a warning printed while it waits for slower peers to start is no sign of a
    hang, and it must not be named the cause of another rank's)."""
    if now - started < startup_s:
        return 0.0
    return now - max(started, last_output)


class OutputTimes:
    """When each rank of an MPI job last wrote, as the launcher on the master stamps it.

    mpirun tags each piece of output with its rank (``--tag-output``); the launcher, which
    splits mpirun's output into ranks' lines anyway, writes the time (``time.monotonic``,
    one clock for every process of the machine) into this rank's 8 bytes of a file in the
    run dir once per read of mpirun's pipe, and the master's agent reads it at its tick: no
    system call either side, nothing on the network."""

    __slots__ = ("_map", "cell", "path")

    def __init__(self, path: Path, ranks: int) -> None:
        import mmap  # the master's under MPI only

        self.path = path
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 8 * ranks)
        finally:
            os.close(fd)
        self.cell = memoryview(self._map).cast("d")

    @classmethod
    def create(cls, path: Path, ranks: int) -> OutputTimes:
        """The agent's side: every rank's time at 0 (never wrote)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * (8 * ranks))
        finally:
            os.close(fd)
        return cls(path, ranks)

    def __len__(self) -> int:
        return len(self.cell)


@dataclass
class RelayedRanks:
    """The master's watch, under MPI, on the ranks that have counted no step yet: their own
    hosts read their step counters but not their output (mpirun's, on the master), so the
    master judges them by their output, as under torch, once it knows they counted none."""

    output: OutputTimes
    hosts: list[str]
    """Each rank's host (index: rank)."""
    started: float = field(default_factory=time.monotonic)
    counted: set[int] = field(default_factory=set)
    """Ranks known to have counted a step: judged by their steps, on their own host."""

    def idle_s(self, rank: int, now: float, startup_s: float) -> float:
        return output_idle_s(now, self.started, self.output.cell[rank], startup_s)

    def quiet(self, now: float, timeout_s: float, startup_s: float) -> list[int]:
        """The ranks not known to have counted a step, silent for ``timeout_s`` or longer."""
        return [
            r
            for r in range(len(self.hosts))
            if r not in self.counted and self.idle_s(r, now, startup_s) >= timeout_s
        ]


def open_counter(run_dir: Path, rank: int, local_rank: int) -> RankSteps:
    return RankSteps(rank, local_rank, StepCounter.create(RunDir(run_dir).steps_file(rank)))


def main_thread_frames(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The main thread's frames (outermost first) from a faulthandler dump of all threads.

    faulthandler lists threads newest first, so the main thread is the last block."""
    headers = [i for i, s in enumerate(lines) if "(most recent call first)" in s]
    if not headers:
        return []
    frames = []
    for line in lines[headers[-1] + 1 :]:
        m = _FRAME.match(line.rstrip())
        if not m:
            break
        frames.append({"file": m["file"], "line": int(m["line"]), "function": m["func"]})
    frames.reverse()
    return frames


def _is_user(frame: Mapping[str, Any]) -> bool:
    return contract.is_user_file(str(frame["file"]))


def rank_report(
    host: str, rs: RankSteps, idle: float, judged_by: str, dump: Sequence[str]
) -> dict[str, Any]:
    """What one host says about one of its ranks when a hang is being checked."""
    frames = main_thread_frames(dump)
    user = [f for f in frames if _is_user(f)]
    return {
        "host": host,
        "rank": rs.rank,
        "local_rank": rs.local_rank,
        "steps": rs.steps,
        "idle_s": round(idle, 1),
        "judged_by": judged_by,
        "finished": rs.finished_at is not None,
        "in_collective": any(p in str(f["file"]) for f in frames[-8:] for p in _COLLECTIVE_FILES),
        "frames": [dict(f, user=_is_user(f)) for f in frames[-20:]],
        "where": _where(user[-1]) if user else (_where(frames[-1]) if frames else None),
    }


def _where(frame: Mapping[str, Any]) -> str:
    return f"{Path(str(frame['file'])).name}:{frame['line']} in {frame['function']}"


def first_stuck(ranks: Sequence[Mapping[str, Any]], timeout_s: float) -> list[Mapping[str, Any]]:
    """The rank(s) that stopped first: of the idle ones, the fewest steps; of those, the
    ones not waiting in a collective (when every one is, all of them).

    A rank that finished its work is no cause while a rank still works: it waits for it (an
    uneven end), and its steps, fewer than a working rank's perhaps, say nothing of who
    stopped first. Finished ranks are judged only when every rank reported has finished."""
    working = [r for r in ranks if not r.get("finished")]
    idle = [r for r in working or ranks if float(r["idle_s"]) >= timeout_s / 2]
    if not idle:
        return []
    least = min(int(r["steps"]) for r in idle)
    first = [r for r in idle if int(r["steps"]) == least]
    outside = [r for r in first if not r["in_collective"]]
    return sorted(outside or first, key=lambda r: int(r["rank"]))


def hang_record(culprits: Sequence[Mapping[str, Any]], timeout_s: float) -> dict[str, Any]:
    """The error record of a hang (classified as ``Hang``), for the root-cause rank."""
    top = culprits[0]
    return {
        "kind": "hang",
        "type": "Hang",
        "message": f"no progress for {top['idle_s']:.0f} s (--hang-timeout {timeout_s:g})",
        "timeout_s": timeout_s,
        "idle_s": top["idle_s"],
        "judged_by": top["judged_by"],
        "where": top["where"],
        "frames": top["frames"],
        "ranks": [{"host": r["host"], "rank": r["rank"], "where": r["where"]} for r in culprits],
        "time": time.time(),
    }


def stragglers(rates: Mapping[int, float]) -> list[tuple[int, float, float]]:
    """(rank, rate, median) for each rank much slower than the median."""
    if len(rates) < 2:
        return []
    import statistics  # at the end of a job, not on the way to its first worker

    median = statistics.median(rates.values())
    return [(r, v, median) for r, v in sorted(rates.items()) if v < STRAGGLER_RATIO * median]
