"""Start-up (issue 18): what a one-host job's agent imports before its first worker runs,
what the worker's bootstrap imports before the user's first line, and the timeline that
shows where the time goes. Start-up time is what a user notices; the modules are how it is
spent, asserted through the interpreter's own record (``-X importtime``), not a mock."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import SMDIST, env, make_tree

# Imported only by a job that needs them, never by a one-host job's agent: the store and
# its retry and security code (several hosts) and DNS (several hosts).
NOT_FOR_ONE_HOST = (
    "smdist.agent.store",
    "smdist.agent.access",
    "smdist.agent.discovery",
    "tenacity",
    "dns",
    "asyncio",
)
# Nor before its first worker starts: the worker's side (bootstrap, artifacts: they run in
# ranks), hashing and tempfile (nothing to hash or randomise before the first worker),
# typing (annotations are for mypy), dataclasses and inspect (smdist.records makes the
# agent's records: the decorators were half its start-up), statistics (step rates, at the
# end), socket (a free port needs only _socket), and the failure report's classifier
# (imported when something failed), subprocess (a one-rank host hands its rank to the
# interpreter started at launch: nothing to Popen). ctypes is not asserted (the
# kill-with-parent hook needs libc's prctl).
NOT_BEFORE_THE_FIRST_WORKER = (
    *NOT_FOR_ONE_HOST,
    "hashlib",
    "tempfile",
    "smdist.worker",
    "typing",
    "dataclasses",
    "inspect",
    "statistics",
    "socket",
    "smdist.agent.report.classify",
    "smdist.agent.report.failure",
    "subprocess",
)


def imported_modules(stderr: str, until: str | None = None) -> set[str]:
    """Every module an interpreter run with ``-X importtime`` imported, from its stderr;
    with ``until``, those imported before the first line that ends with it (the
    interpreter and the agent's timeline write to the same stderr, in order)."""
    names = set()
    for line in stderr.splitlines():
        if until is not None and line.endswith(until):
            break
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def _matching(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def _one_host_job(tmp_path: Path, script: str, *extra: str) -> subprocess.CompletedProcess[str]:
    root = make_tree(tmp_path / "ml")
    entry = tmp_path / "train.py"
    entry.write_text(script)
    return subprocess.run(
        [SMDIST[0], "-X", "importtime", *SMDIST[1:], "--opt-ml", str(root), str(entry), *extra],
        capture_output=True,
        text=True,
        env=env(SMDIST_TIMELINE="1"),
        timeout=120,
    )


def test_a_one_host_agent_imports_only_what_the_job_needs(tmp_path: Path) -> None:
    r = _one_host_job(tmp_path, "print('trained')\n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[algo-1/0] trained" in r.stdout
    # -X is the agent's alone (the workers' interpreters do not inherit it).
    agent = imported_modules(r.stderr)
    assert "smdist.agent.run" in agent and "smdist.agent.supervisor" in agent  # it did parse
    assert _matching(agent, NOT_FOR_ONE_HOST) == []
    before = imported_modules(r.stderr, until="rank 0 spawned")
    assert any(line.endswith("rank 0 spawned") for line in r.stderr.splitlines())
    assert "smdist.agent.supervisor" in before
    assert _matching(before, NOT_BEFORE_THE_FIRST_WORKER) == []


def test_script_mode_with_its_code_present_and_nothing_to_install_adds_no_work(
    tmp_path: Path,
) -> None:
    # SageMaker's script mode: the code is already in /opt/ml/code, requirements.txt is
    # empty. Nothing to fetch or install: no pip run, no archive or hashing code imported.
    code = tmp_path / "ml" / "code"
    code.mkdir(parents=True)
    (code / "train.py").write_text("print('trained')\n")
    (code / "requirements.txt").write_text("# nothing yet\n\n")
    hps = {"sagemaker_submit_directory": '"s3://bucket/never-fetched.tar.gz"',
           "sagemaker_program": '"train.py"'}  # fmt: skip
    root = make_tree(tmp_path / "ml", hyperparameters=hps)
    r = subprocess.run(
        [SMDIST[0], "-X", "importtime", "-c", "from smdist.agent.launch import train_main; "
         "raise SystemExit(train_main())", "--opt-ml", str(root)],
        capture_output=True, text=True, env=env(SMDIST_TIMELINE="1"), timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[algo-1/0] trained" in r.stdout
    assert "lists nothing to install: pip is not run" in r.stderr
    before = imported_modules(r.stderr, until="rank 0 spawned")
    assert "smdist.agent.code" in before  # script mode was on
    assert _matching(before, (*NOT_BEFORE_THE_FIRST_WORKER, "tarfile", "boto3", "pip")) == []


def test_the_bootstrap_imports_nothing_extra_before_the_users_first_line(tmp_path: Path) -> None:
    # What the user's script finds already imported is what its start waited for.
    script = (
        "import sys\n"
        "late = {'socket', 'sysconfig', 'typing', 'pkgutil', 'ctypes', 'smdist.config'}\n"
        "print('early:', sorted(late & set(sys.modules)))\n"
    )
    # Without the standby interpreter (ranks 1.. start so; rank 0's start-up is then on
    # the job's path)...
    root = make_tree(tmp_path / "ml")
    entry = tmp_path / "train.py"
    entry.write_text(script)
    r = subprocess.run(
        [*SMDIST, "--opt-ml", str(root), "--nproc-per-host", "2", str(entry)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # ... and in it: each rank's parent-death request (rank 1's from its bootstrap, rank 0's
    # while it waited) loads _ctypes alone, not ctypes' Python layer.
    assert "[algo-1/1] early: []" in r.stdout
    assert "[algo-1/0] early: []" in r.stdout


def test_a_failure_record_still_has_everything_after_the_lazy_imports(tmp_path: Path) -> None:
    r = _one_host_job(tmp_path, "import json\nraise ValueError('bad value 42')\n")
    assert r.returncode == 1
    failure = (tmp_path / "ml" / "output" / "failure").read_text()
    assert failure.startswith("UserScriptError: ValueError: bad value 42"), failure
    assert "train.py:2" in failure


def test_the_timeline_shows_each_step_before_the_first_worker(tmp_path: Path) -> None:
    r = _one_host_job(tmp_path, "import time\nprint('first line at', time.time())\n")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [
        line.split(" ms ", 1)[1]
        for line in r.stderr.splitlines()
        if line.startswith("smdist timeline:")
    ]
    # The first rank's interpreter starts before the agent imports anything else.
    assert steps[:2] == ["standby interpreter started", "agent modules imported"], steps
    assert "config loaded" in steps and steps.index("config loaded") < steps.index("rank 0 spawned")
    spawned = next(
        float(line.split()[2])
        for line in r.stderr.splitlines()
        if line.startswith("smdist timeline:") and line.endswith("rank 0 spawned")
    )
    first = float(r.stdout.split("first line at ")[1].split()[0])
    assert spawned <= first  # the clock is the wall clock: a harness can line them up


def test_the_timeline_is_silent_unless_asked(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ml")
    entry = tmp_path / "train.py"
    entry.write_text("print('ok')\n")
    r = subprocess.run(
        [*SMDIST, "--opt-ml", str(root), str(entry)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert r.returncode == 0 and "smdist timeline:" not in r.stderr


def test_the_stack_dump_signal_is_the_one_the_bootstrap_registers() -> None:
    from smdist.agent.supervisor import STACK_DUMP_SIGNAL
    from smdist.worker.bootstrap import STACK_DUMP_SIGNAL as registered

    assert STACK_DUMP_SIGNAL == registered == signal.SIGUSR1


def test_imported_modules_reads_importtime_lines() -> None:
    err = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   json.decoder\n"
        "import time:       200 |        300 | json\n"
        "some other line\n"
    )
    assert imported_modules(err) == {"json.decoder", "json"}
    assert sys.flags.dev_mode in (0, 1)
