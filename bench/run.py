"""``python -m bench.run``: run the launcher benchmarks of issue 10 and write the results.

Writes ``bench/results/<measurement>.json`` (raw runs and summaries), the tables of
``docs/benchmarks.md`` (between its ``bench:begin``/``bench:end`` markers; the prose
around them is kept) and the chart ``bench/results/time-to-ready.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import launchers, measure, report

ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = (
    "startup",
    "ready",
    "failure",
    "sigterm",
    "relay",
    "relay-errors",
    "overhead",
    "scale",
)
# relay-errors (the toolkit's error-class scan) only on request: it adds minutes.
DEFAULT = tuple(m for m in MEASUREMENTS if m != "relay-errors")
# Measurements another issue wrote as a module of its own (``python -m bench.NAME``, its own
# JSON): run after the others when the module is there, each with its own table.
EXTERNAL = {"resilience": "bench.resilience", "store-load": "bench.store_load"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 runs, small sizes: to check the harness")
    p.add_argument("--runs", type=int, help="runs per launcher and configuration (default 5)")
    p.add_argument(
        "--only",
        action="append",
        choices=MEASUREMENTS,
        help="run only this measurement (repeatable)",
    )
    p.add_argument(
        "--launchers",
        default=",".join(launchers.LAUNCHERS),
        help="comma-separated subset of " + ",".join(launchers.LAUNCHERS),
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results", metavar="DIR")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", metavar="FILE")
    p.add_argument("--no-docs", action="store_true", help="write the JSON results only")
    p.add_argument(
        "--no-external",
        action="store_true",
        help="skip " + ", ".join(f"python -m {m}" for m in EXTERNAL.values()),
    )
    return p


def _external(runs: int, results: Path) -> None:
    import importlib.util
    import subprocess

    for name, module in EXTERNAL.items():
        if importlib.util.find_spec(module) is None:
            print(f"bench: {name}: no {module} here: not measured", file=sys.stderr)
            (results / f"{name}.json").unlink(missing_ok=True)  # no stale table
            continue
        began = time.monotonic()
        print(f"bench: {name} (python -m {module})", file=sys.stderr)
        argv = [sys.executable, "-m", module, "--runs", str(runs), "--results", str(results)]
        done = subprocess.run(argv, cwd=ROOT, check=False)
        took = time.monotonic() - began
        print(f"bench: {name} took {took:.0f} s (exit {done.returncode})", file=sys.stderr)
        path = results / f"{name}.json"
        if done.returncode == 0 and path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            data["duration_s"] = round(took, 1)
            path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    chosen = tuple(n.strip() for n in ns.launchers.split(",") if n.strip())
    unknown = [n for n in chosen if n not in launchers.LAUNCHERS]
    if unknown:
        _parser().error(f"--launchers: unknown {', '.join(unknown)}")
    usable = []
    for name in chosen:
        why = launchers.missing(name)
        if why:
            print(f"bench: skipping {name}: {why}", file=sys.stderr)
        else:
            usable.append(name)
    if not usable:
        _parser().error("no launcher left to measure")
    if "floor" not in usable:
        print("bench: no floor among --launchers: no ratios to the floor", file=sys.stderr)
    # As pip install does: no launcher pays for compiling its own source on every start (an
    # editable install under PYTHONDONTWRITEBYTECODE=1 would, every run).
    import compileall

    compileall.compile_dir(ROOT / "smdist", quiet=1)
    runs = ns.runs or (2 if ns.quick else 5)
    quick = ns.quick
    work = Path(tempfile.mkdtemp(prefix="smdist-bench-"))
    plan = measure.Plan(work=work, runs=runs, launchers=tuple(usable), quick=quick)
    selected = ns.only or list(DEFAULT)
    # Every failure and SIGTERM run starts with the same launch -> ready phase, so their
    # ready times are the time-to-ready samples of 1x4 and 2x2 when those run too.
    borrowed = {"1x4": "sigterm", "2x2": "failure"}
    ready_configs = [(1, 1), (1, 2), (1, 4), (2, 2), (4, 1)]
    ready_configs = [c for c in ready_configs if borrowed.get(f"{c[0]}x{c[1]}") not in selected]
    script_mode = () if launchers.missing(launchers.SCRIPT_MODE) else (launchers.SCRIPT_MODE,)
    # The toolkit's start-up is its time-to-ready's; five more runs of it here add a minute.
    startup_launchers = (
        *(n for n in ("floor", "smdist") if n in usable),
        *script_mode,
        *(n for n in ("torchrun",) if n in usable),
    )
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "startup": lambda: measure.startup(plan, startup_launchers),
        "ready": lambda: measure.time_to_ready(plan, ready_configs),
        "failure": lambda: measure.failure(plan, [(1, 4), (2, 2)], cap_s=10.0, cap_hosts_s=3.0),
        "sigterm": lambda: measure.sigterm(plan, [(1, 4)], handler_s=0.3),
        "relay": lambda: measure.log_relay(
            plan, [20_000, 200_000] if quick else [200_000, 2_000_000], 4, error_class=False
        ),
        "relay-errors": lambda: measure.log_relay(
            plan, [5_000, 20_000] if quick else [10_000, 40_000], 4, error_class=True, cap_s=30
        ),
        "overhead": lambda: measure.overhead(plan, 4, 4.0),
        "scale": lambda: measure.scale(plan, [1, 4, 16] if quick else [1, 4, 16, 64]),
    }
    ns.results.mkdir(parents=True, exist_ok=True)
    machine = measure.machine_info()
    print(
        f"bench: {runs} run(s) each, launchers {', '.join(usable)}, "
        f"{machine['cpus']} CPUs, load {machine['load_avg_1m_at_start']}",
        file=sys.stderr,
    )
    done: dict[str, dict[str, Any]] = {}
    try:
        for name in selected:
            began = time.monotonic()
            print(f"bench: {name}", file=sys.stderr)
            data = steps[name]()
            data.update(
                measurement=name,
                runs=runs,
                quick=quick,
                machine=machine,
                load_avg_1m_at_end=round(os.getloadavg()[0], 2),
                duration_s=round(time.monotonic() - began, 1),
                launchers=list(usable),
            )
            done[name] = data
            print(f"bench: {name} took {data['duration_s']:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not ns.no_external and not ns.only:
        _external(runs, ns.results)
    if "ready" in done:
        for key, source in borrowed.items():
            if source in done and key in done[source]["configs"]:
                per = done[source]["configs"][key]
                done["ready"]["configs"][key] = {
                    n: [
                        {
                            "run": r["run"],
                            "ready_s": r.get("ready_s"),
                            **{k: r[k] for k in measure.PHASES if k in r},
                            "from": source,
                        }
                        for r in runs
                    ]
                    for n, runs in per.items()
                }
        order = [f"{h}x{p}" for h, p in [(1, 1), (1, 2), (1, 4), (2, 2), (4, 1)]]
        cfg = done["ready"]["configs"]
        done["ready"]["configs"] = {k: cfg[k] for k in order if k in cfg}
    for name, data in done.items():
        report.summarize(name, data)
        path = ns.results / f"{name}.json"
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"bench: -> {path}", file=sys.stderr)
    if not ns.no_docs:
        report.write_docs(ns.results, ns.docs)
        if (ns.results / "store-load.json").exists():
            from bench import store_load  # its own section, table and chart

            store_load.write_docs(ns.results, ns.docs)
        print(f"bench: tables -> {ns.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
