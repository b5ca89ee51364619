"""Hang detection under --backend mpi for ranks that count no step: judged by their output.

Real Open MPI: mpirun on the master starts every rank (one host, and two simulated hosts),
its launcher stamps each rank's last output time, the master judges the silent ranks that
counted no step (their own hosts say which counted, through the store). ``--hang-startup``
is shortened from 120 s, still long enough for a loaded machine to start every rank.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from smdist.agent import hang
from smdist.agent.backends import mpi
from tests.helpers import make_tree, run, write_script

pytestmark = pytest.mark.mpi

SCRIPT = """
import os, time

RANK = int(os.environ["RANK"])
END = time.monotonic() + {seconds}  # without a hang watch the job ends here, exit 0

def load_data():
    while time.monotonic() < END:
        time.sleep(0.5)  # stuck before its first step, printing nothing

if RANK == {stuck}:
    load_data()
elif RANK in {stepping}:
    import smdist

    while time.monotonic() < END:
        smdist.progress()  # steps counted, nothing printed
        time.sleep(0.05)
else:
    while time.monotonic() < END:
        print(f"rank {{RANK}} waits for its data", flush=True)  # output, no step counted
        time.sleep(0.1)
"""
STARTUP = ["--hang-startup", "15", "--hang-timeout", "3"]
"""Every rank starts printing or stepping well within 15 s even on a loaded machine."""


def _hang_report(opt_ml: Path) -> tuple[str, dict[str, object]]:
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    report = json.loads((opt_ml / "output" / "data" / "smdist-failure.json").read_text())
    return first, report


def test_a_silent_rank_that_counted_no_step_is_the_hang_not_the_printing_one(
    tmp_path: Path,
) -> None:
    # Rank 1 is stuck before its first step and prints nothing; rank 0 prints and counts no
    # step. Before the master judged output under MPI, this job ran to its end (exit 0).
    script = write_script(tmp_path / "job.py", SCRIPT.format(seconds=90, stuck=1, stepping=()))
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2", *STARTUP,
         str(script)],
        timeout=150,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "hang-startup=15.0 (--hang-startup)" in r.stderr  # the setting, with its source
    assert "rank(s) 1 made no progress for 3 s" in r.stderr, r.stderr
    first, report = _hang_report(opt_ml)
    assert first.startswith("Hang: rank 1 on algo-1 made no progress for"), first
    assert "stuck at job.py:9 in load_data" in first, first
    assert report["category"] == "Hang"
    root = report["root_cause"]
    assert isinstance(root, dict) and (root["host"], root["rank"]) == ("algo-1", 1), root
    assert "(judged by its output: it never counted a step)" in first, first


def test_simulated_two_hosts_a_silent_rank_on_the_other_host_is_the_hang(tmp_path: Path) -> None:
    # Rank 3 (algo-2) is stuck before its first step; ranks 1 and 2 count steps silently
    # (rank 2's host tells the master it counted, so its silence is no hang); rank 0 prints.
    script = write_script(tmp_path / "job.py", SCRIPT.format(seconds=90, stuck=3, stepping=(1, 2)))
    work = tmp_path / "work"
    r = run(
        ["--simulate", "2x2", "--backend", "mpi", "--work-dir", str(work), *STARTUP,
         str(script)],
        timeout=180,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "rank(s) 3 made no progress for 3 s" in r.stderr, r.stderr
    first, report = _hang_report(work / "algo-1")
    assert first.startswith("Hang: rank 3 on algo-2 made no progress for"), first
    assert "stuck at job.py:9 in load_data" in first, first
    assert "(judged by its output: it never counted a step)" in first, first
    assert report["category"] == "Hang"
    root = report["root_cause"]
    assert isinstance(root, dict) and (root["host"], root["rank"]) == ("algo-2", 3), root


def test_ranks_that_keep_printing_without_counting_a_step_are_not_hung(tmp_path: Path) -> None:
    # Both ranks print for 18 s and count no step: past the start-up grace (12 s, for a
    # loaded machine to start them) and three timeouts, judged by their output, never idle.
    script = write_script(tmp_path / "job.py", SCRIPT.format(seconds=18, stuck=-1, stepping=()))
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2",
         "--hang-startup", "12", "--hang-timeout", "2", str(script)],
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "made no progress" not in r.stderr
    assert (opt_ml / "output" / "success").is_file()


def test_the_launchers_relay_stamps_each_rank_that_wrote_a_line(tmp_path: Path) -> None:
    output = hang.OutputTimes.create(tmp_path / "output-times", 3)
    relay = mpi._Relay([("algo-1", 3)], output)
    r, w = os.pipe()
    before = time.monotonic()
    with os.fdopen(r, "rb") as src, open(os.devnull, "wb") as dst:
        t = threading.Thread(target=relay.run, args=(src, dst))
        t.start()
        os.write(w, b"[1,0]<stdout>:zero\n[1,2]<stderr>:two\nmpirun: its own words\n")
        os.close(w)
        t.join(timeout=10)
    stamps = list(hang.OutputTimes(output.path, 3).cell)  # as the agent maps it
    assert stamps[0] >= before and stamps[2] >= before, stamps
    assert stamps[1] == 0.0  # rank 1 wrote nothing: never
