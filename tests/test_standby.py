"""The first rank's interpreter, started with the agent (smdist/agent/standby.py, issue 18).

Real processes throughout: ``python -m smdist.agent.launch`` is ``smdist-run``; the
in-process tests start a real standby interpreter and hand it (or refuse it) a real job.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, SMDIST, env, make_tree

from smdist.agent import standby


def _job(tmp_path: Path, script: str, **extra: str) -> subprocess.CompletedProcess[str]:
    root = make_tree(tmp_path / "ml")
    entry = tmp_path / "train.py"
    entry.write_text(script)
    return subprocess.run(
        [*SMDIST, "--opt-ml", str(root), str(entry), "--flag", "value"],
        capture_output=True,
        text=True,
        env=env(SMDIST_TIMELINE="1", **extra),
        cwd=tmp_path,
        timeout=120,
    )


SEES = """\
import ctypes, json, os, sys
getenv = ctypes.CDLL(None).getenv  # what C code (NCCL, gloo) reads
getenv.restype = ctypes.c_char_p
print("sees " + json.dumps({
    "pid": os.getpid(), "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
    "name": __name__, "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
    "launch": os.environ.get("FROM_LAUNCH"), "steps": os.environ.get("SMDIST_STEPS_FILE"),
    "ps": open("/proc/self/cmdline").read().split("\\0"),
    "c_rank": getenv(b"RANK").decode(), "c_launch": (getenv(b"FROM_LAUNCH") or b"").decode(),
}))
"""


def _seen(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    line = next(x for x in r.stdout.splitlines() if x.startswith("[algo-1/0] sees "))
    data: dict[str, object] = json.loads(line.split("sees ", 1)[1])
    return data


def test_the_first_rank_runs_in_the_interpreter_started_at_launch(tmp_path: Path) -> None:
    r = _job(tmp_path, SEES, FROM_LAUNCH="yes")
    assert r.returncode == 0, r.stderr[-3000:]
    seen = _seen(r)
    lines = r.stderr.splitlines()
    said = next(x for x in lines if "runs in the interpreter started at launch" in x)
    assert f"(pid {seen['pid']})" in said  # the very process started first thing
    steps = [x.split(" ms ", 1)[1] for x in lines if x.startswith("smdist timeline")]
    assert steps.index("standby interpreter started") < steps.index("config loaded")
    # ... and the rank cannot tell: as `python train.py --flag value` under the agent.
    entry = str(tmp_path / "train.py")
    assert seen["argv"] == [entry, "--flag", "value"]
    assert seen["path0"] == str(tmp_path) and seen["cwd"] == str(tmp_path)
    assert seen["name"] == "__main__"
    assert (seen["rank"], seen["world"], seen["launch"]) == ("0", "1", "yes")
    assert (seen["c_rank"], seen["c_launch"]) == ("0", "yes")
    assert seen["steps"]  # the agent's per-rank variables reached it
    # `ps` shows it as started: the standby, with the command line it was started for.
    ps = seen["ps"]
    assert isinstance(ps, list) and "smdist.worker.standby" in ps and entry in ps


def test_a_descriptor_the_agent_inherited_does_not_reach_the_rank(tmp_path: Path) -> None:
    # As Popen's close_fds for every other rank: a pipe the agent's parent leaked to it
    # (here on purpose) is not held open by rank 0, whose parent would wait for its EOF.
    r, w = os.pipe()
    try:
        root = make_tree(tmp_path / "ml")
        entry = tmp_path / "train.py"
        entry.write_text(f"import os\ntry:\n    os.fstat({w})\n    print('open')\n"
                         "except OSError:\n    print('closed')\n")  # fmt: skip
        done = subprocess.run(
            [*SMDIST, "--opt-ml", str(root), str(entry)],
            capture_output=True, text=True, env=env(), pass_fds=(w,), timeout=120,
        )  # fmt: skip
    finally:
        os.close(r)
        os.close(w)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "runs in the interpreter started at launch" in done.stderr
    assert "[algo-1/0] closed" in done.stdout


def test_a_failing_rank_in_the_standby_is_reported_as_any_rank(tmp_path: Path) -> None:
    r = _job(tmp_path, "import sys\nraise ValueError('bad value 42')\n")
    assert r.returncode == 1
    assert "runs in the interpreter started at launch" in r.stderr
    failure = (tmp_path / "ml" / "output" / "failure").read_text()
    assert failure.startswith("UserScriptError: ValueError: bad value 42"), failure
    assert "train.py:2" in failure


def test_smdist_standby_0_starts_every_rank_after_the_plan(tmp_path: Path) -> None:
    r = _job(tmp_path, SEES, SMDIST_STANDBY="0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "standby interpreter started" not in r.stderr
    assert "interpreter started at launch" not in r.stderr
    assert _seen(r)["rank"] == "0"


@pytest.mark.parametrize(
    ("args", "environ", "expected"),
    [
        (["train.py"], {}, True),
        (["--nproc-per-host", "2", "train.py", "--lr", "1"], {}, True),
        (["--check", "train.py"], {}, False),
        (["--simulate", "2x2", "train.py"], {}, False),
        (["--simulate=2x2", "train.py"], {}, False),
        (["--help"], {}, False),
        (["--version"], {}, False),
        (["train.py"], {"SMDIST_SIMULATE": "2x1"}, False),
        (["train.py"], {"SMDIST_CHECK": "1"}, False),
        (["train.py"], {"SMDIST_STANDBY": "0"}, False),
    ],
)
def test_a_standby_only_for_a_command_that_runs_ranks(
    args: list[str], environ: dict[str, str], expected: bool
) -> None:
    assert standby.wanted(args, environ) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("PYTHONPATH", True),
        ("PYTHONHASHSEED", True),
        ("LD_PRELOAD", True),
        ("LC_ALL", True),
        ("LANG", True),
        ("HOME", True),
        ("MALLOC_ARENA_MAX", True),
        ("RANK", False),
        ("NCCL_DEBUG", False),
        ("OMP_NUM_THREADS", False),  # read when torch loads its libraries: after the order
    ],
)
def test_variables_read_while_an_interpreter_starts(name: str, expected: bool) -> None:
    assert standby.read_at_start(name) is expected


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[standby.Standby]:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("SMDIST_STANDBY", raising=False)
    standby.start(["train.py"])
    s = standby._standby
    assert s is not None
    try:
        yield s
    finally:
        standby.discard()
        with contextlib.suppress(ProcessLookupError):
            os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(timeout=30)


def _bootstrap(script: Path) -> list[str]:
    return [sys.executable, "-m", "smdist.worker.bootstrap", str(script)]


def test_taken_it_runs_the_job_it_is_handed(started: standby.Standby, tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("import os\nprint('rank', os.environ['RANK'], os.getpid())\n")
    proc = standby.take(_bootstrap(script), {**started.env, "RANK": "0"})
    assert proc is started.proc and proc.stdout is not None
    out = proc.stdout.read()  # to its end: the rank's exit
    assert proc.wait(timeout=60) == 0
    assert out.decode().strip() == f"rank 0 {proc.pid}"
    assert standby.take(_bootstrap(script), started.env) is None  # once only


def test_an_interpreter_variable_changed_for_the_rank_refuses_it(
    started: standby.Standby, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = {**started.env, "PYTHONHASHSEED": "7"}
    assert standby.take(_bootstrap(tmp_path / "t.py"), changed) is None
    said = capsys.readouterr().err
    assert "PYTHONHASHSEED for the rank differ(s) from the agent's at launch" in said
    assert started.proc.wait(timeout=30) is not None  # ended, not left waiting


def test_another_program_refuses_it(started: standby.Standby) -> None:
    assert standby.take(["/bin/true"], started.env) is None
    assert started.proc.wait(timeout=30) is not None


def test_a_standby_nobody_takes_ends_with_the_agent(started: standby.Standby) -> None:
    standby.discard()
    assert started.proc.wait(timeout=30) is not None


def test_a_closed_order_pipe_ends_the_standby_quietly(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.close(w)
    done = subprocess.run(
        [sys.executable, "-m", "smdist.worker.standby", str(r), str(os.getpid())],
        pass_fds=(r,),
        capture_output=True,
        env=env(),
        timeout=60,
    )
    os.close(r)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


AGENT = """\
import sys
from smdist.agent import standby
standby.start(["train.py"])
print(standby._standby.proc.pid, flush=True)
sys.stdin.read()  # until the test kills this 'agent'
"""


def test_a_waiting_standby_dies_with_its_agent() -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env()
    )
    assert agent.stdout is not None
    pid = int(agent.stdout.readline())
    pidfd = os.pidfd_open(pid)
    try:
        agent.kill()  # SIGKILL: nothing of the agent's own runs
        agent.wait(timeout=30)
        # Its death is an event: the pidfd turns readable when the standby is gone.
        ready, _, _ = select.select([pidfd], [], [], 60)
        assert ready, f"the standby {pid} outlived its agent"
    finally:
        os.close(pidfd)


def test_each_simulated_host_has_its_own(tmp_path: Path) -> None:
    # --simulate starts none itself; each forked host agent starts its own, as on a host.
    entry = tmp_path / "train.py"
    entry.write_text("import os\nprint('rank', os.environ['RANK'], 'pid', os.getpid())\n")
    r = subprocess.run(
        [*SMDIST, "--simulate", "2x1", "--work-dir", str(tmp_path / "sim"), str(entry)],
        capture_output=True, text=True, env=env(), timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for host, rank in (("algo-1", 0), ("algo-2", 1)):
        pid = next(
            x.split("pid ")[1] for x in r.stdout.splitlines() if f"[{host}/{rank}] rank" in x
        )
        said = f"[smdist {host} "
        assert any(
            x.startswith(said) and f"interpreter started at launch (pid {pid})" in x
            for x in r.stderr.splitlines()
        ), r.stderr[-3000:]
