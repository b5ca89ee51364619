"""Hang detection (--hang-timeout): the rank that stopped first is named, not its victims.

Real agents (--simulate: one per host, TCP on loopback), real workers, real gloo: rank 1
sleeps in "its data loader" while the other ranks block in an all-reduce waiting for it.
Timings are printed and asserted only as generous hang guards; bench/ measures them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import env, make_tree, run, write_script

HANGS = """
import os, time
import torch, torch.distributed as dist
import smdist

OUT = {out!r}

def next_batch():
    time.sleep(3600)  # a deadlocked data loader

@smdist.main
def train(ctx):
    for step in range(6):
        if ctx.should_stop:
            break
        if step == 3 and ctx.rank == 1 and ctx.restart_count == 0:
            with open(os.path.join(OUT, "hung-at"), "w") as f:
                f.write(repr(time.time()))
            next_batch()
        t = torch.ones(1)
        dist.all_reduce(t)
    open(os.path.join(OUT, f"done-{{ctx.rank}}-{{ctx.restart_count}}"), "w").close()

train()
"""
TIMEOUT_S = 4.0


def test_a_hang_names_the_rank_that_stopped_first_with_its_stack(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(tmp_path / "job.py", HANGS.format(out=str(out)))
    work = tmp_path / "work"
    args = ["--simulate", "2x2", "--work-dir", str(work), "--hang-timeout", str(TIMEOUT_S)]
    r = run([*args, str(script)], timeout=180)
    ended = time.time()
    hung = float((out / "hung-at").read_text())
    print(f"hang -> every agent gone: {ended - hung:.2f} s (timeout {TIMEOUT_S} s)")
    assert ended - hung < TIMEOUT_S + 30, "hang guard"
    assert r.returncode == 1, r.stderr
    for host in ("algo-1", "algo-2"):
        first = (work / host / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("Hang: rank 1 on algo-1 made no progress for"), first
        assert "stuck at job.py:9 in next_batch" in first, first
        assert "(host algo-1, rank 1," in first, first
    report = json.loads((work / "algo-1" / "output" / "data" / "smdist-failure.json").read_text())
    assert report["category"] == "Hang"
    assert (report["root_cause"]["host"], report["root_cause"]["rank"]) == ("algo-1", 1)
    # Every rank's stack went to the log: rank 1 in its data loader, the others waiting.
    lines = r.stderr.splitlines()
    assert any(ln.startswith("[algo-1/1] ") and "in next_batch" in ln for ln in lines)
    for rank, host in ((0, "algo-1"), (2, "algo-2"), (3, "algo-2")):
        assert any(ln.startswith(f"[{host}/{rank}] ") and "all_reduce" in ln for ln in lines)


def test_a_hang_with_a_restart_budget_restarts_and_finishes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(tmp_path / "job.py", HANGS.format(out=str(out)))
    opt_ml = make_tree(tmp_path / "opt_ml")
    # A longer timeout than the first test's: the second attempt's ranks, which import torch
    # and tear it down on a loaded machine, must never be idle that long (a CI run at load 13
    # once saw 4 s between a rank's last step and its exit, before its way out got a fresh
    # timeout: test_a_rank_on_its_way_out_gets_the_timeout_afresh).
    timeout_s = 3 * TIMEOUT_S
    args = ["--opt-ml", str(opt_ml), "--nproc-per-host", "2", "--hang-timeout", str(timeout_s)]
    r = run([*args, "--max-restarts", "1", str(script)], timeout=180)
    assert r.returncode == 0, r.stderr
    assert "attempt 1 failed (Hang: rank 1 on algo-1 made no progress" in r.stderr
    assert sorted(p.name for p in out.glob("done-*")) == ["done-0-1", "done-1-1"]


SLOW_WAY_OUT = """
import atexit, time
import smdist

@smdist.main
def train(ctx):
    for _ in range(3):
        if ctx.should_stop:
            break
    time.sleep(6)  # the last work counts no step (an evaluation): under --hang-timeout 8

atexit.register(time.sleep, 5)  # then a slow way out: 11 s since the last step in all
train()
"""


def test_a_rank_on_its_way_out_gets_the_timeout_afresh(tmp_path: Path) -> None:
    """Its training function returned: meeting its peers, freeing the process group and the
    interpreter's teardown are timed from then, not from its last step (a job that did all
    its work must not end as a Hang because its exit was slow)."""
    script = write_script(tmp_path / "job.py", SLOW_WAY_OUT)
    opt_ml = make_tree(tmp_path / "opt_ml")
    args = ["--opt-ml", str(opt_ml), "--nproc-per-host", "1", "--hang-timeout", "8"]
    r = run([*args, str(script)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "made no progress" not in r.stderr, r.stderr
    assert not (opt_ml / "output" / "failure").exists()


STUCK_ON_THE_WAY_OUT = """
import threading, time
import smdist

@smdist.main
def train(ctx):
    for _ in range(3):
        if ctx.should_stop:
            break
    threading.Thread(target=time.sleep, args=(3600,)).start()  # forgotten, not a daemon

train()  # the interpreter's exit waits for that thread forever
"""


def test_a_rank_stuck_on_its_way_out_is_still_found(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.py", STUCK_ON_THE_WAY_OUT)
    opt_ml = make_tree(tmp_path / "opt_ml")
    args = ["--opt-ml", str(opt_ml), "--nproc-per-host", "1", "--hang-timeout", str(TIMEOUT_S)]
    r = run([*args, str(script)], timeout=120)
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("Hang: rank 0 on algo-1 made no progress for"), first
    assert "after its work ended (on its way out)" in first, first


UNEVEN_END = """
import time
import smdist

@smdist.main
def train(ctx):
    for _ in range(3 if ctx.rank == 0 else 60):  # rank 0's shard is the shorter
        smdist.progress()  # not ctx.should_stop: its all-reduce needs every rank, each time
        if ctx.rank == 1:
            time.sleep(0.2)  # a step: 12 s in all, while rank 0 waits at the end

train()
"""


def test_a_rank_done_first_waits_for_the_others_without_a_hang(tmp_path: Path) -> None:
    """Uneven ends are normal (uneven shards, rank 0's extra evaluation): the rank whose work
    ended first waits at the end longer than --hang-timeout while the other counts steps."""
    script = write_script(tmp_path / "job.py", UNEVEN_END)
    work = tmp_path / "work"
    # 6 s: rank 0 waits twice that; the way out, once both are done, has 6 s on a loaded machine
    args = ["--simulate", "2x1", "--work-dir", str(work), "--hang-timeout", "6"]
    r = run([*args, str(script)], timeout=180)
    assert r.returncode == 0, r.stderr
    assert "made no progress" not in r.stderr, r.stderr
    assert not (work / "algo-1" / "output" / "failure").exists()


UNEVEN_END_MPI = """
import os, time
import smdist

for _ in range(3 if os.environ["RANK"] == "0" else 50):  # rank 0's shard is the shorter
    smdist.progress()
    time.sleep(0.2)  # rank 1: 10 s, while rank 0's script ended and mpirun waits for rank 1
"""


@pytest.mark.mpi
def test_under_mpi_a_rank_done_first_is_no_hang(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.py", UNEVEN_END_MPI)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2",
         "--hang-startup", "15", "--hang-timeout", "4", str(script)],
        timeout=150,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "made no progress" not in r.stderr, r.stderr
    assert (opt_ml / "output" / "success").is_file()


HANG_AFTER_A_RANK_IS_DONE = """
import time
import smdist

def next_batch():
    time.sleep(3600)  # a deadlocked data loader

@smdist.main
def train(ctx):
    for step in range(3 if ctx.rank == 0 else 10):  # rank 0's work ends after 3 steps
        smdist.progress()
        if step == 9:  # rank 1, past every step rank 0 counted
            next_batch()

train()
"""


def test_a_hang_after_a_rank_is_done_names_the_rank_still_working(tmp_path: Path) -> None:
    # Rank 0, done and waiting at the end, has the fewer steps: not the cause of rank 1's hang.
    script = write_script(tmp_path / "job.py", HANG_AFTER_A_RANK_IS_DONE)
    opt_ml = make_tree(tmp_path / "opt_ml")
    args = ["--opt-ml", str(opt_ml), "--nproc-per-host", "2", "--hang-timeout", str(TIMEOUT_S)]
    r = run([*args, str(script)], timeout=180)
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("Hang: rank 1 on algo-1 made no progress for"), first
    assert "stuck at job.py:6 in next_batch" in first, first


STUCK_ON_THE_WAY_OUT_ON_ONE_HOST = """
import threading, time
import smdist

@smdist.main
def train(ctx):
    for _ in range(3):
        if ctx.should_stop:
            break
    if ctx.rank == 0:
        for _ in range(3):
            smdist.progress()  # rank 0's is the longer shard: rank 1 has the fewer steps
    if ctx.rank == 1:
        threading.Thread(target=time.sleep, args=(3600,)).start()  # forgotten, not a daemon

train()  # rank 1's exit waits for that thread forever; rank 0 (the other host) ends well
"""


def test_a_rank_stuck_on_its_way_out_is_found_by_its_host_when_the_other_is_done(
    tmp_path: Path,
) -> None:
    # The other host's rank exited: that host said its ranks were done before it left.
    script = write_script(tmp_path / "job.py", STUCK_ON_THE_WAY_OUT_ON_ONE_HOST)
    work = tmp_path / "work"
    args = ["--simulate", "2x1", "--work-dir", str(work), "--hang-timeout", str(TIMEOUT_S)]
    r = run([*args, str(script)], timeout=180)
    assert r.returncode == 1, r.stderr
    for host in ("algo-1", "algo-2"):
        first = (work / host / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("Hang: rank 1 on algo-2 made no progress for"), first
        assert "after its work ended (on its way out)" in first, first


LATE_DUMP = """
import faulthandler, os, signal
faulthandler.unregister(signal.SIGUSR1)  # as the interpreter's teardown does, at the end
os.kill(os.getpid(), signal.SIGUSR1)  # a hang check's dump asked for just then
print("alive")
"""


def test_a_dump_asked_for_after_faulthandler_is_gone_does_not_kill_the_rank(
    tmp_path: Path,
) -> None:
    # SIGUSR1's default action ends a process: a rank whose work was done, already tearing
    # down its interpreter, would be reported as killed by the agent's own request.
    script = write_script(tmp_path / "late.py", LATE_DUMP)
    boot = [sys.executable, "-m", "smdist.worker.bootstrap", str(script)]
    r = subprocess.run(boot, capture_output=True, text=True, env=env(), timeout=60)
    assert (r.returncode, r.stdout) == (0, "alive\n"), r.stderr


STEPPING = """
import time
import smdist

pause = 0.1 if int(__import__("os").environ["RANK"]) == 1 else 0.01
end = time.monotonic() + 3
while time.monotonic() < end:
    smdist.progress()  # no decorator: the script counts its steps itself
    time.sleep(pause)
"""


def test_step_rates_are_logged_and_a_straggler_named(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.py", STEPPING)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(["--opt-ml", str(opt_ml), "--nproc-per-host", "2", str(script)], timeout=60)
    assert r.returncode == 0, r.stderr
    rates = next(ln for ln in r.stderr.splitlines() if "step rates (steps/s): rank 0 " in ln)
    assert ", rank 1 " in rates
    assert "straggler: rank 1 ran " in r.stderr
    assert "straggler: rank 0" not in r.stderr


def test_the_first_rank_to_stop_outside_a_collective_is_the_cause() -> None:
    # Pure logic: what a hang check decides from the hosts' reports.
    from smdist.agent.hang import first_stuck, main_thread_frames

    dump = [
        "Thread 0x00007f (most recent call first):",
        '  File "/usr/lib/python3.11/threading.py", line 320 in wait',
        "",
        "Current thread 0x00007e (most recent call first):",
        '  File "/x/site-packages/torch/distributed/distributed_c10d.py", line 2 in all_reduce',
        '  File "/job/train.py", line 30 in step',
        '  File "/job/train.py", line 40 in <module>',
    ]
    frames = main_thread_frames(dump)
    assert [f["function"] for f in frames] == ["<module>", "step", "all_reduce"]

    def rank(r: int, steps: int, idle: float, collective: bool) -> dict[str, object]:
        return {"rank": r, "steps": steps, "idle_s": idle, "in_collective": collective}

    victims_wait = [rank(0, 9, 60, True), rank(1, 9, 60, False), rank(2, 9, 60, True)]
    assert [r["rank"] for r in first_stuck(victims_wait, 60)] == [1]
    behind = [rank(0, 10, 60, True), rank(1, 9, 61, True), rank(2, 10, 60, True)]
    assert [r["rank"] for r in first_stuck(behind, 60)] == [1]
    assert first_stuck([rank(0, 3, 1, False)], 60) == []  # progressing again

    def done(r: int, steps: int, idle: float) -> dict[str, object]:
        return dict(rank(r, steps, idle, True), finished=True)

    # A rank done with its work waits for the others: never the cause while one still works.
    assert [r["rank"] for r in first_stuck([done(0, 3, 90), rank(1, 10, 60, False)], 60)] == [1]
    assert first_stuck([done(0, 3, 90), rank(1, 10, 1, False)], 60) == []
    assert [r["rank"] for r in first_stuck([done(0, 3, 90), done(1, 10, 60)], 60)] == [0]
