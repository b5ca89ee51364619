"""The agent side never imports torch or a worker-side module.

The agent sits between the job and its first step: torch costs it seconds, and a
worker-side module in the agent means the two sides no longer meet only in the contract.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, SMDIST, env, make_tree, write_script

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import smdist.agent

names = [m.name for m in pkgutil.walk_packages(smdist.agent.__path__, "smdist.agent.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"agent": names, "modules": sorted(sys.modules)}))
"""

_IMPORTTIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def forbidden(modules: list[str] | set[str]) -> list[str]:
    return sorted(
        m
        for m in modules
        if m in ("torch", "smdist.worker") or m.startswith(("torch.", "smdist.worker."))
    )


def test_every_agent_module_imports_without_torch_or_the_worker_side() -> None:
    r = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {"smdist.agent.cli", "smdist.agent.supervisor", "smdist.agent.preflight"} <= set(
        got["agent"]
    )
    assert forbidden(got["modules"]) == []


FAILING = """
import sys
print("training", flush=True)
raise RuntimeError("bad batch")
"""


def test_a_running_agent_imports_no_torch_or_worker_module(tmp_path: Path) -> None:
    # -X importtime makes the agent's interpreter (not its workers) log every module it
    # imports, whenever it does: a failing job takes every path through to the report.
    script = write_script(tmp_path / "train.py", FAILING)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            *SMDIST[1:],
            "--opt-ml",
            str(opt_ml),
            "--nproc-per-host",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
        cwd=REPO,
    )
    assert r.returncode == 1, r.stderr
    assert "UserScriptError: RuntimeError: bad batch" in (opt_ml / "output" / "failure").read_text()
    imported = {m.group(1) for line in r.stderr.splitlines() if (m := _IMPORTTIME.match(line))}
    assert {"smdist.agent.supervisor", "smdist.agent.report.write"} <= imported
    assert forbidden(imported) == []


def test_the_worker_api_imports_nothing_of_the_agent() -> None:
    code = (
        "import json, sys, smdist\n"
        "smdist.fail, smdist.main, smdist.save, smdist.channel\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env()
    )
    assert r.returncode == 0, r.stderr
    modules = json.loads(r.stdout)
    assert "smdist.worker.fail" in modules
    assert [m for m in modules if m.startswith("smdist.agent") or m == "torch"] == []
