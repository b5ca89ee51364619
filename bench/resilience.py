"""``python -m bench.resilience``: restarts, hang detection and the cost of a step (issue 16).

- Restart latency: from the failing rank's exit to every rank past ``init_process_group``
  again, as a ratio to the cold time-to-ready of the same run; smdist on 1 host (1x2) and
  across 2 simulated hosts (2x1), beside ``torchrun --max-restarts 1`` on 1 host (1x2).
- Hang detection latency: from the hung rank's last step to the failure report, minus
  ``--hang-timeout`` (smdist 1x2 and 2x1).
- The per-step cost of ``smdist.progress()`` in a tight loop (one rank under smdist-run).

Writes ``bench/results/resilience.json`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("resilience_worker.py").resolve()
BIN = Path(sys.executable).parent
HANG_TIMEOUT_S = 5.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(argv: list[str], timeout_s: float) -> tuple[int, float]:
    """Run to the end (killed at ``timeout_s``); return the exit code and when it ended."""
    proc = subprocess.Popen(
        argv,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # The whole tree: torchrun starts its ranks in sessions of their own, so killing
        # its group left a run that never came back running for the rest of the benchmark.
        tree = _tree(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        code = proc.wait()
    return code, time.time()


def _tree(pid: int) -> list[int]:
    """``pid``'s descendants, from /proc (every thread's children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                found += kids
                todo += kids
    return found


def _t(path: Path) -> float:
    return float(json.loads(path.read_text())["t"])


def _smdist(hosts: int, nproc: int, work: Path, *flags: str) -> list[str]:
    cli = [sys.executable, "-m", "smdist.agent.launch"]  # smdist-run
    if hosts == 1:
        tree = work / "opt_ml"
        (tree / "input" / "config").mkdir(parents=True, exist_ok=True)
        return [*cli, "--opt-ml", str(tree), "--nproc-per-host", str(nproc), *flags]
    return [*cli, "--simulate", f"{hosts}x{nproc}", "--work-dir", str(work / "sim"), *flags]


def restart_run(launcher: str, hosts: int, nproc: int, work: Path) -> dict[str, Any]:
    out = work / "out"
    out.mkdir(parents=True)
    if launcher == "torchrun":
        argv = [
            str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", "1", str(WORKER), "restart", str(out),
        ]  # fmt: skip
    else:
        argv = [*_smdist(hosts, nproc, work, "--max-restarts", "1"), str(WORKER), "restart"]
        argv.append(str(out))
    t0 = time.time()
    code, _ = _run(argv, 300)
    world = hosts * nproc
    missing = [
        f"ready-{a}-{r}"
        for a in (0, 1)
        for r in range(world)
        if not (out / f"ready-{a}-{r}").exists()
    ]
    if missing or not (out / "fail").exists():
        # The launcher did not bring every rank back (torchrun 2.13's restart on gloo: the
        # new attempt's ranks meet at the old attempt's addresses): a result, not a crash.
        return {"code": code, "restarted": False, "missing": missing}
    ready = [[_t(out / f"ready-{a}-{r}") for r in range(world)] for a in (0, 1)]
    cold = max(ready[0]) - t0
    again = max(ready[1]) - _t(out / "fail")
    return {
        "code": code,
        "restarted": True,
        "cold_s": cold,
        "restart_s": again,
        "ratio": again / cold,
    }


def hang_run(hosts: int, nproc: int, work: Path) -> dict[str, Any]:
    out = work / "out"
    out.mkdir(parents=True)
    flags = ("--hang-timeout", str(HANG_TIMEOUT_S))
    argv = [*_smdist(hosts, nproc, work, *flags), str(WORKER), "hang", str(out)]
    code, _ = _run(argv, 300)
    report = next(work.rglob("smdist-failure.json"))
    data = json.loads(report.read_text())
    found = float(data["written_at"]) - _t(out / "stopped")
    return {
        "code": code,
        "category": data["category"],
        "rank": data["root_cause"]["rank"] if data["root_cause"] else None,
        "detected_after_s": found,
        "over_timeout_s": found - HANG_TIMEOUT_S,
    }


def progress_run(work: Path) -> dict[str, Any]:
    out = work / "out"
    out.mkdir(parents=True)
    code, _ = _run([*_smdist(1, 1, work), str(WORKER), "progress", str(out)], 300)
    t = json.loads((out / "progress.json").read_text())
    return {"code": code, "empty_ns": t["empty"] * 1e9, "progress_ns": t["progress"] * 1e9}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resilience", description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ns = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="smdist-bench-resilience-"))
    results: dict[str, Any] = {"load_avg_1m_at_start": os.getloadavg()[0], "runs": ns.runs}
    cases = [("smdist", 1, 2), ("smdist", 2, 1)]
    if (BIN / "torchrun").exists():
        cases.append(("torchrun", 1, 2))
    try:
        n = 0
        for launcher, hosts, nproc in cases:
            key = f"restart {launcher} {hosts}x{nproc}"
            results[key] = []
            for _ in range(ns.runs):
                n += 1
                results[key].append(restart_run(launcher, hosts, nproc, base / str(n)))
                print(f"{key}: {results[key][-1]}", file=sys.stderr)
        for hosts, nproc in ((1, 2), (2, 1)):
            key = f"hang smdist {hosts}x{nproc}"
            results[key] = []
            for _ in range(ns.runs):
                n += 1
                results[key].append(hang_run(hosts, nproc, base / str(n)))
                print(f"{key}: {results[key][-1]}", file=sys.stderr)
        n += 1
        results["progress"] = progress_run(base / str(n))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["load_avg_1m_at_end"] = os.getloadavg()[0]
    ns.results.mkdir(parents=True, exist_ok=True)
    (ns.results / "resilience.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| measurement | median | target |\n|---|---|---|")
    for key, all_runs in results.items():
        if key.startswith("restart"):
            runs = [r for r in all_runs if r["restarted"]]
            if not runs:
                print(f"| {key}: restart / cold time-to-ready | never back (0 of "
                      f"{len(all_runs)} runs) | <= 1.2x |")  # fmt: skip
                continue
            print(
                f"| {key}: restart / cold time-to-ready | {_median(runs, 'restart_s'):.2f} s / "
                f"{_median(runs, 'cold_s'):.2f} s = {_median(runs, 'ratio'):.2f}x | <= 1.2x |"
            )
        elif key.startswith("hang"):
            print(
                f"| {key}: detected after the timeout | "
                f"{_median(all_runs, 'over_timeout_s'):.2f} s | <= 5 s |"
            )
    prog = results["progress"]
    cost = prog["progress_ns"] - prog["empty_ns"]
    print(f"| smdist.progress() per step (over an empty call) | {cost:.0f} ns | < 1000 ns |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
