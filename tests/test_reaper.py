"""The agent as PID 1 reaps the job's orphans, and never a child it waits for itself.

A rank leaves a process behind (a DataLoader worker whose rank died, a double fork): in a
container that process becomes the agent's child. When it exits, only the agent can take it
out of the process table. These agents run as PID 1 of a fresh PID namespace with their own
/proc (``unshare --pid --fork --mount-proc``, root only), as in ``docker run IMAGE train``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, SMDIST, env, make_tree, write_script

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace with its own /proc (unshare --pid --mount-proc) needs root",
)

ORPHANS = r"""
import os, sys, time

def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None  # gone: reaped

assert os.getppid() == 1, f"the agent is PID 1 here (parent {os.getppid()})"
orphans = []
for _ in range(3):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the middle process: fork the orphan, tell its pid, exit
        grandchild = os.fork()
        if grandchild == 0:
            os._exit(0)  # the orphan exits at once: a zombie of whoever adopts it
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    orphans.append(int(os.read(r, 32)))
    os.waitpid(child, 0)
print("orphans", orphans, flush=True)
deadline = time.monotonic() + 60
while any(state(p) for p in orphans):
    if time.monotonic() > deadline:
        print("never reaped:", [(p, state(p)) for p in orphans], flush=True)
        sys.exit(3)
    time.sleep(0.1)
print("all reaped", flush=True)
"""


def _pid1_job(tmp_path: Path, script: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    """A one-host job whose agent is PID 1 of its own PID namespace and /proc."""
    root = make_tree(tmp_path / "algo-1")
    pid1 = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    args = ["--opt-ml", str(root), "--nproc-per-host", str(nproc), str(script)]
    return subprocess.run(
        [*pid1, *SMDIST, *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=120,
    )


def test_pid1_agent_reaps_orphans_and_keeps_its_workers_exit_codes(tmp_path: Path) -> None:
    proc = _pid1_job(tmp_path, write_script(tmp_path / "orphans.py", ORPHANS), 2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("all reaped") == 2, out
    assert "as PID 1, reaping orphaned processes of the job" in out, out
    assert "Traceback" not in out, out


def test_pid1_agent_still_reports_a_worker_that_fails_at_once(tmp_path: Path) -> None:
    """A worker that exits before the agent has looked at it keeps its exit code: the
    reaper never takes a status that belongs to the supervisor."""
    script = write_script(tmp_path / "fails.py", "import sys; sys.exit(7)\n")
    for _ in range(3):
        proc = _pid1_job(tmp_path, script, 4)
        assert proc.returncode == 7, proc.stdout + proc.stderr
