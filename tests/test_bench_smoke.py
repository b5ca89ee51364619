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
