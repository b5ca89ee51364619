"""Job-wide in-place restarts (--max-restarts): every host stops, meets again with a fresh
plan and MASTER_PORT, and starts its workers again, which resume from their checkpoint.

Real agents (--simulate, or one process per host on loopback), real workers, real gloo.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_tree, run, start, start_hosts, wait_for, write_script

RESUMING = """
import json, os, signal
import torch, torch.distributed as dist
import smdist

OUT = {out!r}

@smdist.main
def train(ctx):
    start = 0
    if (latest := ctx.latest_checkpoint(scope="host")) is not None:
        start = torch.load(latest)["step"] + 1
    for step in range(start, 4):
        if ctx.should_stop:
            break
        t = torch.ones(1)
        dist.all_reduce(t)
        if step == 1:
            ctx.save_checkpoint({{"step": step}}, step=step, scope="host")
            ctx.barrier()
        if step == 2 and ctx.restart_count == 0 and ctx.rank == 2:
            {fail}
    seen = {{k: os.environ.get(k) for k in ("SMDIST_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT",
                                          "TORCHELASTIC_MAX_RESTARTS", "MASTER_PORT")}}
    with open(os.path.join(OUT, f"rank-{{ctx.rank}}.json"), "w") as f:
        json.dump({{"restart_count": ctx.restart_count, "resumed_at": start, "env": seen}}, f)

train()
"""

RAISE = 'raise RuntimeError("bad batch on rank 2")'
# Killed half way through writing step 3's checkpoint: a temp file, never a checkpoint.
KILLED_MID_WRITE = """with smdist.open_checkpoint_file("checkpoint.pt", step=3, scope="host") as f:
                f.write(b"half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)"""


def _results(out: Path) -> dict[int, dict[str, Any]]:
    return {r: json.loads((out / f"rank-{r}.json").read_text()) for r in range(4)}


def _check_resumed(out: Path, log: str) -> None:
    results = _results(out)
    for rank, res in results.items():
        assert res["restart_count"] == 1, (rank, res)
        assert res["resumed_at"] == 2, (rank, res)  # from step 1's checkpoint, not step 3's
        assert res["env"]["SMDIST_RESTART_COUNT"] == "1"
        assert res["env"]["TORCHELASTIC_RESTART_COUNT"] == "1"
        assert res["env"]["TORCHELASTIC_MAX_RESTARTS"] == "1"
    assert "restart 1 of 1 on every host" in log


def test_simulated_hosts_restart_and_resume_from_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(tmp_path / "job.py", RESUMING.format(out=str(out), fail=RAISE))
    work = tmp_path / "work"
    r = run(
        ["--simulate", "2x2", "--work-dir", str(work), "--max-restarts", "1", str(script)],
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    _check_resumed(out, r.stderr)
    assert "attempt 1 failed (UserScriptError: RuntimeError: bad batch on rank 2" in r.stderr
    for host in ("algo-1", "algo-2"):
        assert not (work / host / "output" / "failure").exists()


def test_separate_agents_restart_after_a_rank_killed_mid_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(tmp_path / "job.py", RESUMING.format(out=str(out), fail=KILLED_MID_WRITE))
    agents = start_hosts(
        tmp_path, ["algo-1", "algo-2"], script, "--nproc-per-host", "2", "--max-restarts", "1"
    )
    logs = {h: a.communicate(timeout=180)[1] for h, a in agents.items()}
    for h, a in agents.items():
        assert a.returncode == 0, logs[h]
    _check_resumed(out, logs["algo-2"])
    assert "SIGKILL" in logs["algo-2"] and "removed" in logs["algo-2"], logs["algo-2"]
    ckpts = sorted(p.name for p in (tmp_path / "algo-2" / "checkpoints" / "algo-2").iterdir())
    assert not any("step-3" in n or "-3." in n for n in ckpts), ckpts


ALWAYS_FAILS = """
import os, time
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 1:
    raise ValueError("rank 1 fails every time, attempt " + os.environ["SMDIST_RESTART_COUNT"])
dist.barrier()
"""


def test_a_rank_that_always_fails_ends_the_job_after_every_attempt(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.py", ALWAYS_FAILS)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--nproc-per-host", "2", "--max-restarts", "2", str(script)],
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("UserScriptError: ValueError: rank 1 fails every time, attempt 2")
    assert "3 attempt(s) made, --max-restarts 2" in first, first
    assert "the restart budget is spent" in r.stderr
    report = json.loads((opt_ml / "output" / "data" / "smdist-failure.json").read_text())
    attempts = report["extra"]["attempts"]
    assert [a["attempt"] for a in attempts] == [0, 1, 2]
    for i, a in enumerate(attempts):
        assert (a["category"], a["host"], a["rank"]) == ("UserScriptError", "algo-1", 1)
        assert f"attempt {i}" in a["headline"] and a["time"] > 0


def test_a_missing_module_is_not_restarted(tmp_path: Path) -> None:
    # Imported at run time (preflight would catch a plain import before any worker starts).
    script = write_script(
        tmp_path / "job.py", "import importlib\nimportlib.import_module('no_such_module_smdist')\n"
    )
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(["--opt-ml", str(opt_ml), "--max-restarts", "3", str(script)], timeout=60)
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("MissingDependency"), first
    assert "1 attempt(s) made" in first
    assert "not restarting: MissingDependency would fail the same way again" in r.stderr
    assert "restart 1 of" not in r.stderr


FAILS_ONCE = """
import os, sys
if os.environ["SMDIST_RESTART_COUNT"] == "0":
    open(os.path.join({out!r}, "failed"), "w").close()
    sys.exit(3)
open(os.path.join({out!r}, "second-attempt-started"), "w").close()
"""


def test_sigterm_during_the_pause_between_attempts_stops_cleanly(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.py", FAILS_ONCE.format(out=str(tmp_path)))
    opt_ml = make_tree(tmp_path / "opt_ml")
    # A pause long enough to be inside it when the signal lands, however loaded the machine.
    agent = start(
        ["--opt-ml", str(opt_ml), "--max-restarts", "5", "--restart-pause", "60", str(script)]
    )
    assert agent.stderr is not None
    # The pause is announced before it starts: stop the agent inside it.
    for line in agent.stderr:
        if "on every host in" in line:
            break
    sent = time.monotonic()
    os.kill(agent.pid, signal.SIGTERM)
    rest = agent.communicate(timeout=30)[1]  # well before the 60 s pause would end
    print(f"SIGTERM in the pause -> agent gone: {time.monotonic() - sent:.2f} s")
    # A stop before an attempt's workers ran, as at any stage before the workers: the exit
    # code of the signal, the stage named in the log and the failure file.
    assert agent.returncode == 128 + signal.SIGTERM, rest
    assert not (tmp_path / "second-attempt-started").exists()
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("Stopped: SIGTERM received on algo-1 during the pause before attempt 2")


def test_a_lost_host_is_not_restarted(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "job.py",
        "import os, threading\n"
        f"open(os.path.join({str(tmp_path)!r}, 'up-' + os.environ['RANK']), 'w').close()\n"
        "threading.Event().wait()\n",
    )
    agents = start_hosts(tmp_path, ["algo-1", "algo-2"], script, "--max-restarts", "2")
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in range(2)), 60, "workers up")
    agents["algo-2"].kill()
    err = agents["algo-1"].communicate(timeout=60)[1]
    assert agents["algo-1"].returncode == 1, err
    assert "not restarting: host algo-2 is gone" in err
    first = (tmp_path / "algo-1" / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("HostLost: host algo-2"), first
    agents["algo-2"].communicate(timeout=10)


def test_the_pause_between_attempts_is_short_then_doubles_to_a_bound() -> None:
    from smdist.agent.restart import backoff_s

    assert [backoff_s(k) for k in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_s(10) == 30.0 and backoff_s(10_000) == 30.0  # bounded, never overflowing
    assert [backoff_s(k, 2.0) for k in (1, 2, 5, 6)] == [2.0, 4.0, 30.0, 30.0]
    assert backoff_s(3, 60.0) == 60.0  # a longer pause asked for is kept, never doubled


# Rank 1 (algo-2) fails on the first attempt; rank 0 waits to be stopped. The second attempt
# would succeed, but a host dies in the (long) pause before it.
FAILS_FIRST_ON_ALGO_2 = """
import os, sys, threading
if os.environ["SMDIST_RESTART_COUNT"] == "0":
    if os.environ["RANK"] == "1":
        sys.exit(3)
    threading.Event().wait()
"""


def _both_in_the_pause(tmp_path: Path) -> dict[str, Any]:
    script = write_script(tmp_path / "job.py", FAILS_FIRST_ON_ALGO_2)
    agents = start_hosts(
        tmp_path, ["algo-1", "algo-2"], script, "--max-restarts", "1", "--restart-pause", "120"
    )
    for a in agents.values():
        assert a.stderr is not None
        for line in a.stderr:  # the pause is announced as it starts
            if "restart 1 of 1 on every host in" in line:
                break
        else:
            raise AssertionError(a.communicate(timeout=30)[1])
    return agents


@pytest.mark.parametrize(("killed", "survivor"), [("algo-2", "algo-1"), ("algo-1", "algo-2")])
def test_a_host_killed_in_the_pause_ends_the_job_as_host_lost_at_once(
    tmp_path: Path, killed: str, survivor: str
) -> None:
    """The heartbeats go on between attempts: a host SIGKILLed in a 120 s pause ends the
    job as HostLost long before the pause (or a rendezvous timeout) would."""
    agents = _both_in_the_pause(tmp_path)
    agents[killed].kill()
    agents[killed].communicate(timeout=10)
    err = agents[survivor].communicate(timeout=60)[1]  # well inside the 120 s pause
    assert agents[survivor].returncode == 1, err
    first = (tmp_path / survivor / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith(f"HostLost: host {killed} stopped responding"), first
    assert first.endswith("; 1 attempt(s) made, --max-restarts 1"), first
    data = tmp_path / survivor / "output" / "data" / f"smdist-failure-{survivor}.json"
    attempts = json.loads(data.read_text())["extra"]["attempts"]
    assert [(a["attempt"], a["rank"]) for a in attempts] == [(0, 1)], attempts
