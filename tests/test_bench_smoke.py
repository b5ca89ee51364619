"""The benchmark harness (``make bench``) in its quickest mode, so it cannot rot unnoticed.

One measurement (log relay), smdist only, one run: real ``smdist-run``, real workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, env


def test_quick_relay_run_writes_results_and_docs(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nprose kept\n")
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--quick", "--runs", "1", "--only", "relay"),
            *("--launchers", "smdist", "--results", str(results), "--docs", str(docs)),
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    data = json.loads((results / "relay.json").read_text())
    assert data["launchers"] == ["smdist"]
    for lines, per in data["configs"].items():
        (run,) = per["smdist"]
        assert run["codes"] == [0]
        assert run["lines_out"] == int(lines), "smdist lost or duplicated worker lines"
        assert run["wall_s"] > 0
        assert run["peak_mib"] > 0
        assert per["summary"]["smdist"]["wall_s"]["n"] == 1

    text = docs.read_text()
    assert "prose kept" in text  # hand-written text around the tables survives
    assert "### 4. Log relay" in text
    assert "| smdist |" in text


def test_store_load_bench_drives_the_real_store_end_to_end(tmp_path: Path) -> None:
    """bench/store_load.py at a toy size: joins, heartbeats, the barrier and an abort."""
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nprose kept\n")
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.store_load", "--sizes", "8", "--runs", "1"),
            *("--steady", "1", "--results", str(results), "--docs", str(docs)),
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads((results / "store-load.json").read_text())["sizes"]["8"]["runs"]
    assert {r["ending"]: r["outcome"] for r in runs} == {
        "barrier": ["alldone"],
        "abort": ["failure"],
    }
    assert all(r["master_exit"] == 0 and r["plan_s"] > 0 for r in runs)
    text = docs.read_text()
    assert "prose kept" in text and "| 8 |" in text


def test_the_per_pair_ratio_pairs_each_run_with_the_floors_of_its_round() -> None:
    from bench.report import pair_ratio

    per = {
        # Rounds alternate who starts; the runs' order in the lists is not the rounds'.
        "floor": [{"run": 0, "ready_s": 2.0}, {"run": 1, "ready_s": 1.0}, {"run": 2}],
        "smdist": [{"run": 1, "ready_s": 1.1}, {"run": 0, "ready_s": 2.0}, {"run": 2}],
    }
    # Round 0: 1.0x, round 1: 1.1x; round 2 has no time on either side and does not count.
    assert pair_ratio(per, "smdist", "ready_s") == 1.05
    assert pair_ratio({"floor": [], "smdist": []}, "smdist", "ready_s") is None
