"""Reports that survive SageMaker's merge of the hosts' output dirs, root cause named once.

SageMaker (and its local mode) puts every host's /opt/ml/output into one output.tar.gz, a
later host's file replacing an earlier one of the same name. A real 2-host job (one rank
per host, rank 1 on algo-2 raises); the merge is done here the way local mode does it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import run, write_script

RAISES = """
import os, time
if os.environ["RANK"] == "1":
    raise ValueError("bad shard on rank 1")
time.sleep(60)  # rank 0 is stopped as a victim
"""


def test_every_hosts_report_and_the_masters_whole_job_report_survive_the_merge(
    tmp_path: Path,
) -> None:
    script = write_script(tmp_path / "job.py", RAISES)
    work = tmp_path / "work"
    r = run(["--simulate", "2x1", "--work-dir", str(work), str(script)], timeout=120)
    assert r.returncode == 1, r.stderr
    data = {h: work / h / "output" / "data" for h in ("algo-1", "algo-2")}
    assert sorted(p.name for p in data["algo-1"].glob("smdist-failure*.json")) == [
        "smdist-failure-algo-1.json",
        "smdist-failure.json",
    ]
    assert [p.name for p in data["algo-2"].glob("smdist-failure*.json")] == [
        "smdist-failure-algo-2.json"
    ]

    merged = tmp_path / "merged"  # local mode: hosts in order, the last one wins a name
    for h in ("algo-1", "algo-2"):
        shutil.copytree(work / h / "output", merged, dirs_exist_ok=True)
    whole = json.loads((merged / "data" / "smdist-failure.json").read_text())
    assert whole["current_host"] == "algo-1"
    assert {(f["host"], f["rank"]) for f in whole["failures"]} == {("algo-1", 0), ("algo-2", 1)}
    theirs = json.loads((merged / "data" / "smdist-failure-algo-2.json").read_text())
    assert theirs["current_host"] == "algo-2"
    assert theirs["headline"] == whole["headline"]

    # The root cause heads the master's failure file once; "Also" lists only the others.
    text = (work / "algo-1" / "output" / "failure").read_text()
    first, *rest = text.splitlines()
    assert first.startswith("UserScriptError: ValueError: bad shard on rank 1"), text
    assert "(host algo-2, rank 1" in first
    also = [line for line in rest if line.startswith("Also:")]
    assert also and "rank 1 on algo-2" not in also[0], text
    assert "Full report: " + str(data["algo-1"] / "smdist-failure.json") in text


SLOW_VICTIM = """
import os, signal, sys, time
ready = os.path.join(os.path.dirname(os.path.abspath(__file__)), "victim-ready")
if os.environ["RANK"] == "0":
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):  # fail only once the victim's handler is in
        assert time.monotonic() < deadline, "rank 1 never got ready"
        time.sleep(0.05)
    raise ValueError("bad shard on rank 0")
def slow_stop(*_):  # a victim that takes its time to stop (a checkpoint on the way out)
    time.sleep(7)
    sys.exit(143)
signal.signal(signal.SIGTERM, slow_stop)
open(ready, "w").close()
time.sleep(60)
"""


def test_the_masters_report_waits_for_a_host_whose_ranks_stop_slowly(tmp_path: Path) -> None:
    """The root cause is on the master; algo-2's rank takes 7 s to stop (within the abort
    grace): the master's whole-job report still lists it, it does not leave after 5 s."""
    script = write_script(tmp_path / "job.py", SLOW_VICTIM)
    work = tmp_path / "work"
    argv = ["--simulate", "2x1", "--work-dir", str(work), "--abort-grace", "20", str(script)]
    r = run(argv, timeout=120)
    assert r.returncode == 1, r.stderr
    whole = json.loads((work / "algo-1/output/data/smdist-failure.json").read_text())
    assert {(f["host"], f["rank"]) for f in whole["failures"]} == {("algo-1", 0), ("algo-2", 1)}
    assert "had not left" not in r.stderr, r.stderr
