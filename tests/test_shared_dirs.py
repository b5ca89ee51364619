"""Directories shared between hosts (local mode mounts one /opt/ml/model into every
container; EFS and FSx volumes do the same)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, env

PROBES = """
import sys
from pathlib import Path
from smdist.agent.preflight import check_writable

sys.stdin.read(1)  # the go signal: both containers probe at the same moment
bad = [c.detail for c in (check_writable(Path(sys.argv[1]), "model dir") for _ in range(500))
       if c.status != "ok"]
print(len(bad), bad[:1])
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="PID namespaces (unshare --pid) need root",
)
def test_two_pid1_agents_probing_one_shared_dir_never_collide(tmp_path: Path) -> None:
    """Two containers whose agents are both PID 1 probe one model dir (the same pid in
    each): 1000 probes, no "File exists"."""
    shared = tmp_path / "model"
    shared.mkdir()
    procs = [
        subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                sys.executable,
                "-c",
                PROBES,
                str(shared),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=REPO,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("g")
        p.stdin.close()
    results = []
    for p in procs:
        assert p.stdout is not None
        results.append(p.stdout.read().strip())
        assert p.wait(timeout=60) == 0
    assert results == ["0 []", "0 []"], results
    assert list(shared.iterdir()) == [], "probes are removed"
