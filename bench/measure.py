"""The six measurements of issue 10. Each returns a JSON-able dict of raw runs.

Launchers are interleaved run by run (the order rotates each round), so load from anything
else on the machine spreads over all of them instead of landing on one.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.launchers import SCRIPT_MODE, Launch, alive, start

TICK = os.sysconf("SC_CLK_TCK")
STANDBY = b"smdist.worker.standby"
"""In the command line of smdist's first rank (``python -m smdist.worker.standby``)."""
PF_FORKNOEXEC = 0x40
"""``/proc/PID/stat``'s flags: forked, not exec'd yet."""
READY_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Plan:
    work: Path
    runs: int
    launchers: tuple[str, ...]
    quick: bool


def rounds(
    plan: Plan, launchers: tuple[str, ...] | None = None, runs: int | None = None
) -> Iterator[tuple[int, str]]:
    names = [n for n in (launchers or plan.launchers) if n in plan.launchers]
    for r in range(plan.runs if runs is None else runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            yield r, name


def _ready_s(launch: Launch) -> float | None:
    got = launch.wait_records("ready", launch.world, READY_TIMEOUT_S)
    if len(got) < launch.world:
        return None
    return max(float(r["t"]) for r in got.values()) - launch.t0


PHASES = ("first_line_s", "torch_s", "init_s", "meet_s")
"""Where a time-to-ready goes, from the ranks' ``ready`` records, in seconds since the
launch, each the last rank's: its first line, ``import torch`` done, past
``init_process_group``; ``meet_s`` is the last two apart (the ranks meeting at rank 0's
store: a rank that got there first and was refused waits out torch's connect backoff)."""


def _ready_phases(launch: Launch) -> dict[str, float]:
    got = launch.records("ready").values()
    if len(got) < launch.world or not all("phases" in r and "started" in r for r in got):
        return {}
    t0 = launch.t0
    torch_s = max(r["phases"]["torch"] for r in got) - t0
    init_s = max(r["phases"]["init"] for r in got) - t0
    return {
        "first_line_s": max(r["started"] for r in got) - t0,
        "torch_s": torch_s,
        "init_s": init_s,
        "meet_s": init_s - torch_s,
    }


def _exit_s(launch: Launch, since: float) -> float | None:
    if len(launch.exits) < len(launch.procs):
        return None
    return max(t for _, t in launch.exits.values()) - since


def _codes(launch: Launch) -> list[int | None]:
    return [launch.exits.get(i, (None, 0.0))[0] for i in range(len(launch.procs))]


def _left_behind(launch: Launch) -> int:
    return sum(1 for pid in launch.worker_pids() if alive(pid))


def _stderr_tail(launch: Launch) -> str:
    with contextlib.suppress(OSError):
        return (launch.run_dir / "stderr").read_text(errors="replace")[-600:]
    return ""


# -- process-tree sampling (the launcher's own processes, not the workers) ----------


def _run_time(pid: int) -> float:
    """CPU seconds of a process's live threads at nanosecond resolution (schedstat):
    the clock ticks of /proc/PID/stat (10 ms) cannot see an idle agent."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


class TreeSampler:
    """Polls /proc every ``period`` s for the launcher processes under the top-level ones.

    A process whose environment has ``RANK`` is a worker (every launcher sets it, the
    launchers themselves never have it), and so is smdist's standby (the first rank's
    interpreter, started with the agent: its environment comes after its ``exec``, so
    ``/proc`` never shows its ``RANK``); everything else in the tree is launcher. A process
    forked and not yet exec'd (the kernel's ``PF_FORKNOEXEC``) counts from its second sample
    on: a rank caught between its fork and its exec still has the launcher's environment and
    a copy of the launcher's memory, and counting it doubled the launcher's peak now and then
    (smdist's 18 -> 31 MiB "growth" between two relay sizes was one such sample).
    """

    def __init__(self, launch: Launch, period: float = 0.1) -> None:
        self.launch = launch
        self.period = period
        self.cpu: dict[int, float] = {}  # pid -> last seen utime+stime, seconds
        self.hwm: dict[int, int] = {}  # pid -> peak resident KiB (VmHWM)
        self.samples: list[tuple[float, float, int]] = []  # (time, launcher cpu s, rss KiB)
        self._workers: set[int] = set()
        self._unexeced: set[int] = set()  # seen once, forked and not exec'd
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self, pid: int) -> list[int]:
        kids: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        return kids

    def _is_worker(self, pid: int) -> bool:
        if pid in self._workers:
            return True
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            return True
        if any(e.startswith(b"RANK=") for e in env):
            self._workers.add(pid)
            return True
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if STANDBY in f.read():  # smdist's first rank, its environment given after exec
                self._workers.add(pid)
                return True
        return False

    def _sample(self) -> None:
        todo = [p.pid for p in self.launch.procs]
        rss_total = 0
        while todo:
            pid = todo.pop()
            todo += self._children(pid)
            if self._is_worker(pid):
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/status") as f:
                    status = dict(
                        line.split(":", 1) for line in f.read().splitlines() if ":" in line
                    )
            except OSError:
                continue
            if int(fields[6]) & PF_FORKNOEXEC and pid not in self._unexeced:
                self._unexeced.add(pid)
                continue
            ticks = (int(fields[11]) + int(fields[12])) / TICK
            self.cpu[pid] = _run_time(pid) or ticks
            hwm = int(status.get("VmHWM", "0 kB").split()[0])
            self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
            rss_total += int(status.get("VmRSS", "0 kB").split()[0])
        self.samples.append((time.time(), sum(self.cpu.values()), rss_total))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_kib(self) -> int:
        return sum(self.hwm.values())


# -- 1. time-to-ready -----------------------------------------------------------------


ONE_RANK_RUNS = 4
"""The 1x1 cell runs this many times ``--runs``: its target (1.05x, 85 ms on a 1.7 s floor)
is smaller than one run's noise (a single ``import torch`` spans 1.4-2.0 s on this machine,
in two modes), and five runs' median can land in either mode. It is also the cheapest cell."""


def time_to_ready(plan: Plan, configs: list[tuple[int, int]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for hosts, nproc in configs:
        key = f"{hosts}x{nproc}"
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in plan.launchers}
        runs = plan.runs * (ONE_RANK_RUNS if hosts * nproc == 1 else 1)
        for r, name in rounds(plan, runs=runs):
            launch = start(name, hosts, nproc, ["--mode", "ready"], plan.work)
            try:
                ready = _ready_s(launch)
                # Killed once ready: the teardown is not what this measures, and it halves
                # the time the benchmark takes.
                run: dict[str, Any] = {"run": r, "ready_s": ready, **_ready_phases(launch)}
                if ready is None:
                    run["error"] = _stderr_tail(launch)
            finally:
                launch.cleanup()
            per[name].append(run)
            _progress("time-to-ready", key, name, r, run.get("ready_s"))
        results[key] = per
    return {"configs": results}


# -- 2. failure propagation -------------------------------------------------------------


def failure(
    plan: Plan, configs: list[tuple[int, int]], cap_s: float, cap_hosts_s: float
) -> dict[str, Any]:
    """The last rank (on the last host) raises after the all-reduce; the others hang.

    ``cap_s`` bounds the wait on one host, ``cap_hosts_s`` across hosts (where peers' other
    hosts never hear of the failure: a longer cap would only cost time)."""
    results: dict[str, Any] = {}
    for hosts, nproc in configs:
        key = f"{hosts}x{nproc}"
        fail_rank = hosts * nproc - 1
        cap = cap_s if hosts == 1 else cap_hosts_s
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in plan.launchers}
        for r, name in rounds(plan):
            args = ["--mode", "fail", "--fail-rank", str(fail_rank)]
            launch = start(name, hosts, nproc, args, plan.work)
            run: dict[str, Any] = {"run": r}
            try:
                run["ready_s"] = _ready_s(launch)
                run.update(_ready_phases(launch))
                raised = launch.wait_records("raise", 1, 60).get(fail_rank)
                if raised is None:
                    run["error"] = "the failing rank never raised: " + _stderr_tail(launch)
                else:
                    if name == "floor":
                        # No launcher: the floor is the failing process's own exit; nothing
                        # ends the others.
                        proc = launch.procs[fail_rank]
                        with contextlib.suppress(Exception):
                            proc.wait(cap)
                        code, t = launch.exits.get(fail_rank, (None, 0.0))
                        run["latency_s"] = t - raised["t"] if code is not None else None
                        run["codes"] = [code]
                        run["others_ended"] = False
                    else:
                        ended = launch.wait(cap)
                        run["codes"] = _codes(launch)
                        run["latency_s"] = _exit_s(launch, raised["t"]) if ended else None
                        firsts = [t for _, t in launch.exits.values()]
                        run["first_exit_s"] = min(firsts) - raised["t"] if firsts else None
                        run["others_ended"] = ended
                        run["left_behind"] = _left_behind(launch) if ended else None
            finally:
                launch.cleanup()
            per[name].append(run)
            _progress("failure", key, name, r, run.get("latency_s"))
        results[key] = per
    return {"configs": results, "cap_s": cap_s, "cap_hosts_s": cap_hosts_s}


# -- 3. SIGTERM to exit -----------------------------------------------------------------


def sigterm(plan: Plan, configs: list[tuple[int, int]], handler_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for hosts, nproc in configs:
        key = f"{hosts}x{nproc}"
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in plan.launchers}
        for r, name in rounds(plan):
            args = ["--mode", "sigterm", "--handler-s", str(handler_s)]
            launch = start(name, hosts, nproc, args, plan.work)
            run: dict[str, Any] = {"run": r}
            try:
                run["ready_s"] = _ready_s(launch)
                run.update(_ready_phases(launch))
                if run["ready_s"] is None:
                    run["error"] = _stderr_tail(launch)
                else:
                    sent = launch.signal(signal.SIGTERM)
                    ended = launch.wait(handler_s + 30)
                    run["latency_s"] = _exit_s(launch, sent) if ended else None
                    run["codes"] = _codes(launch)
                    run["left_at_exit"] = _left_behind(launch)
                    if run["left_at_exit"]:
                        # Orphans may still be checkpointing: give them what a handler needs.
                        time.sleep(handler_s + 1.0)
                    run["left_after_1s"] = _left_behind(launch)
                    ckpts = launch.records("ckpt")
                    run["handlers_ran"] = len(ckpts)
                    run["handlers_done_before_exit"] = sum(
                        1
                        for c in ckpts.values()
                        if ended and c["t"] <= max(t for _, t in launch.exits.values())
                    )
                    if ended and len(ckpts) == launch.world:
                        slowest = max(c["t"] for c in ckpts.values())
                        run["overhead_s"] = _exit_s(launch, slowest)
            finally:
                launch.cleanup()
            per[name].append(run)
            _progress("sigterm", key, name, r, run.get("latency_s"))
        results[key] = per
    return {"configs": results, "handler_s": handler_s}


# -- 4. log relay -----------------------------------------------------------------------


def log_relay(
    plan: Plan, sizes: list[int], nproc: int, error_class: bool, cap_s: float = 120.0
) -> dict[str, Any]:
    """``sizes`` lines of 100 bytes, split over ``nproc`` ranks, through each launcher.

    Timed from the last rank's start (the ranks wait for each other before their first
    line) to the launcher's exit, so the launcher's own start-up (torch's import in
    torchrun, the toolkit's; smdist's first rank starting before the others) is not counted
    as relay cost. With ``error_class`` every line names ``ValueError`` and goes to stderr.
    """
    marker = b"ValueError" if error_class else b"loss 0.1234 x"
    results: dict[str, Any] = {}
    for lines in sizes:
        key = f"{lines}"
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in plan.launchers}
        for r, name in rounds(plan):
            sink = plan.work / f"relay-{os.getpid()}.log"
            sink.unlink(missing_ok=True)
            args = ["--mode", "log", "--lines", str(lines // nproc)]
            args += ["--error-class", "1" if error_class else "0"]
            launch = start(name, 1, nproc, args, plan.work, stdout=sink)
            sampler = TreeSampler(launch)
            run: dict[str, Any] = {"run": r}
            try:
                ended = launch.wait(cap_s)
                sampler.stop()
                pids = launch.records("pid")
                if ended and pids:
                    run["wall_s"] = _exit_s(launch, max(p["t"] for p in pids.values()))
                run["codes"] = _codes(launch)
                run["lines_out"] = _intact_lines([sink, launch.run_dir / "stderr"], marker)
                run["peak_mib"] = round(sampler.peak_kib / 1024, 1) if name != "floor" else None
            finally:
                sampler.stop()
                launch.cleanup()
                sink.unlink(missing_ok=True)
            per[name].append(run)
            _progress("log-relay", key, name, r, run.get("wall_s"))
        results[key] = per
    return {
        "configs": results,
        "nproc": nproc,
        "line_bytes": 100,
        "error_class": error_class,
        "cap_s": cap_s,
    }


def _intact_lines(paths: list[Path], marker: bytes) -> int:
    """Worker lines that arrived whole: one line, one rank, the full 100 bytes' tail.

    Writes over 4 KiB into a shared pipe are not atomic, so a launcher that hands its
    ranks one pipe can splice two ranks' lines into each other.
    """
    tail = b"x" * 40 + b"\n"
    count = 0
    for path in paths:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            for line in f:
                if line.endswith(tail) and line.count(b"rank ") == 1 and marker in line:
                    count += 1
    return count


# -- 5. agent overhead while training ---------------------------------------------------


def overhead(plan: Plan, nproc: int, seconds: float) -> dict[str, Any]:
    per: dict[str, list[dict[str, Any]]] = {n: [] for n in plan.launchers if n != "floor"}
    for r, name in rounds(plan, tuple(per)):
        args = ["--mode", "train", "--seconds", str(seconds)]
        launch = start(name, 1, nproc, args, plan.work)
        sampler = TreeSampler(launch, period=0.25)
        run: dict[str, Any] = {"run": r}
        try:
            ready = _ready_s(launch)
            ended = launch.wait(seconds + 120)
            sampler.stop()
            run["codes"] = _codes(launch)
            if ready is None or not ended:
                run["error"] = _stderr_tail(launch)
            else:
                lo, hi = launch.t0 + ready + 0.5, launch.t0 + ready + seconds - 0.5
                window = [s for s in sampler.samples if lo <= s[0] <= hi]
                if len(window) >= 2:
                    (t1, c1, _), (t2, c2, _) = window[0], window[-1]
                    run["cpu_pct_of_core"] = 100.0 * (c2 - c1) / (t2 - t1)
                    run["cpu_s_per_min"] = 60.0 * (c2 - c1) / (t2 - t1)
                    run["rss_mib"] = round(max(s[2] for s in window) / 1024, 1)
                    run["window_s"] = t2 - t1
        finally:
            sampler.stop()
            launch.cleanup()
        per[name].append(run)
        _progress("overhead", f"1x{nproc}", name, r, run.get("cpu_pct_of_core"))
    return {"configs": {f"1x{nproc}": per}, "train_s": seconds}


# -- 6. bring-up scale ------------------------------------------------------------------


def scale(plan: Plan, host_counts: list[int]) -> dict[str, Any]:
    """smdist only: H simulated hosts x 1 trivial worker (no torch import)."""
    results: dict[str, Any] = {}
    for hosts in host_counts:
        runs = []
        for r in range(plan.runs):
            launch = start(
                "smdist", hosts, 1, ["--mode", "trivial"], plan.work, mark=rb"\] job: \d+ host"
            )
            run: dict[str, Any] = {"run": r}
            try:
                ended = launch.wait(300)
                run["codes"] = _codes(launch)
                if ended and len(launch.marks) == hosts:
                    run["rendezvous_s"] = max(t for t, _ in launch.marks) - launch.t0
                    ready = launch.records("ready")
                    run["ready_s"] = max(v["t"] for v in ready.values()) - launch.t0
                    run["exit_s"] = _exit_s(launch, launch.t0)
                else:
                    run["error"] = f"{len(launch.marks)} of {hosts} hosts rendezvoused"
            finally:
                launch.cleanup()
            runs.append(run)
            _progress("scale", f"{hosts}x1", "smdist", r, run.get("rendezvous_s"))
        results[f"{hosts}x1"] = {"smdist": runs}
    return {"configs": results}


# -- 7. start-up ------------------------------------------------------------------------

TIMELINE = "smdist timeline:"


def _timeline(launch: Launch) -> dict[str, float]:
    """The agent's start-up steps (``SMDIST_TIMELINE=1``), in seconds since the launch."""
    steps: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in (launch.run_dir / "stderr").read_text(errors="replace").splitlines():
            if line.startswith(TIMELINE):
                parts = line[len(TIMELINE) :].split(maxsplit=3)  # clock, +ms, "ms", step
                if len(parts) == 4:
                    steps.setdefault(parts[3], float(parts[0]) - launch.t0)
    return steps


def startup(plan: Plan, launchers: tuple[str, ...]) -> dict[str, Any]:
    """1 host x 1 trivial worker (no torch): launch -> the worker's first line, and -> the
    launcher's exit. smdist's runs log its timeline, so each step's share is known; smdist
    in script mode (code present, nothing to install) beside it."""
    names = tuple(n for n in launchers if n in (*plan.launchers, SCRIPT_MODE))
    per: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(plan.runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            smdist = name.startswith("smdist")
            launch = start(
                name,
                1,
                1,
                ["--mode", "trivial"],
                plan.work,
                extra_env={"SMDIST_TIMELINE": "1"} if smdist else None,
            )
            run: dict[str, Any] = {"run": r}
            try:
                ended = launch.wait(120)
                run["codes"] = _codes(launch)
                first = launch.records("pid")
                if ended and first:
                    run["first_line_s"] = min(v["started"] for v in first.values()) - launch.t0
                    run["exit_s"] = _exit_s(launch, launch.t0)
                    if smdist:
                        run["steps"] = _timeline(launch)
                else:
                    run["error"] = _stderr_tail(launch)
            finally:
                launch.cleanup()
            per[name].append(run)
            _progress("start-up", "1x1", name, r, run.get("first_line_s"))
    return {"configs": {"1x1": per}}


_reporter: Callable[[str], None] = print


def _progress(what: str, key: str, name: str, r: int, value: float | None) -> None:
    shown = "-" if value is None else f"{value:.3f}"
    _reporter(f"  {what:13} {key:>8} run {r + 1}  {name:9} {shown}")


def machine_info() -> dict[str, Any]:
    """The machine a run was taken on, with its load: every results file records it."""
    from importlib.metadata import version

    load = os.getloadavg()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(load[0], 2),
        "python": platform.python_version(),
        "torch": version("torch"),
        "platform": platform.platform(),
    }
