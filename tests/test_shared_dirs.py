"""Directories shared between hosts (local mode mounts one /opt/ml/model into every
container; EFS and FSx volumes do the same): a supported case."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, env, start_hosts, write_script

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


SLOW_SAVES = """
import os, time
import smdist

rank = int(os.environ["RANK"])
chunk = bytes(range(256)) * 4096  # 1 MiB
if rank == 0:  # the other host's rank is long done (and its agent at the barrier) meanwhile
    with smdist.open_model_file("model.bin") as f:  # through the API: atomic
        for _ in range(4):
            f.write(chunk)
            f.flush()
            time.sleep(0.75)
    smdist.save({"step": 7}, "state.pt")
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "direct.bin"), "wb") as f:  # directly
        for _ in range(4):
            f.write(chunk)
            f.flush()
            time.sleep(0.75)
print(f"rank {rank} done", flush=True)
"""


def _start_sharing(
    tmp_path: Path, hosts: list[str], model_dirs: dict[str, Path], script: Path
) -> dict[str, subprocess.Popen[str]]:
    """One agent per host, each with its own /opt/ml tree; ``model_dirs[host]`` is where
    its /opt/ml/model really is (one directory for several hosts: a shared mount)."""

    def mount(host: str, root: Path) -> None:
        model_dirs[host].mkdir(parents=True, exist_ok=True)
        (root / "model").symlink_to(model_dirs[host], target_is_directory=True)

    return start_hosts(tmp_path, hosts, script, prepare=mount)


def test_a_model_dir_shared_by_two_hosts_keeps_a_slow_save_whole_and_warns_of_nothing(
    tmp_path: Path,
) -> None:
    script = write_script(tmp_path / "save.py", SLOW_SAVES)
    shared = tmp_path / "shared-model"
    agents = _start_sharing(
        tmp_path, ["algo-1", "algo-2"], {"algo-1": shared, "algo-2": shared}, script
    )
    out = {h: a.communicate(timeout=120) for h, a in agents.items()}
    logs = "\n".join(f"--- {h}\n{o}{e}" for h, (o, e) in out.items())
    assert {h: a.returncode for h, a in agents.items()} == {"algo-1": 0, "algo-2": 0}, logs
    chunk = bytes(range(256)) * 4096
    assert (shared / "model.bin").read_bytes() == chunk * 4
    assert (shared / "direct.bin").read_bytes() == chunk * 4
    assert sorted(p.name for p in shared.iterdir()) == ["direct.bin", "model.bin", "state.pt"]
    assert "model dir" in out["algo-1"][1] and "is shared with algo-2" in out["algo-1"][1]
    for unwanted in ("ModelDirClash", "same content", "left by a write that never finished"):
        assert unwanted not in logs, logs
    assert not (tmp_path / "algo-1" / "output" / "failure").exists()


CLASH_ACROSS_DIRS = """
import os
rank = int(os.environ["RANK"])
if rank in (0, 2):  # algo-1 (sharing its dir with algo-2) and algo-3 (a dir of its own)
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "model.pt"), "w") as f:
        f.write(f"weights from rank {rank}")
"""


def test_a_clash_between_separate_model_dirs_is_still_caught_when_two_hosts_share_one(
    tmp_path: Path,
) -> None:
    script = write_script(tmp_path / "clash.py", CLASH_ACROSS_DIRS)
    shared = tmp_path / "shared-model"
    dirs = {"algo-1": shared, "algo-2": shared, "algo-3": tmp_path / "own-model"}
    agents = _start_sharing(tmp_path, ["algo-1", "algo-2", "algo-3"], dirs, script)
    out = {h: a.communicate(timeout=120) for h, a in agents.items()}
    logs = "\n".join(f"--- {h}\n{o}{e}" for h, (o, e) in out.items())
    assert {h: a.returncode for h, a in agents.items()} == {h: 1 for h in dirs}, logs
    for h in dirs:
        first = (tmp_path / h / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("ModelDirClash:"), first
        assert "model.pt on hosts algo-1, algo-3 (different content)" in first, first


def test_a_hosts_clean_up_removes_only_its_own_abandoned_temp_files(tmp_path: Path) -> None:
    from smdist import contract
    from smdist.agent.model_dir import remove_temp_files

    mine = contract.temp_path(tmp_path / "model.pt", owner="algo-2")
    theirs = contract.temp_path(tmp_path / "model.pt", owner="algo-1")  # a save in flight
    for p in (mine, theirs):
        p.write_bytes(b"x")
    assert (contract.temp_owner(mine), contract.temp_owner(theirs)) == ("algo-2", "algo-1")
    assert remove_temp_files(tmp_path, owner="algo-2") == [mine]
    assert theirs.exists()


def test_a_killed_agents_marker_is_removed_by_the_next_job_on_that_host(tmp_path: Path) -> None:
    """An agent killed with SIGKILL leaves its marker; the next job's agent on the same host
    removes it (it would be archived with the model), never another host's."""
    from smdist.agent.model_dir import MARKER_PREFIX, ModelDir
    from smdist.config import Paths

    paths = Paths(tmp_path)
    model = paths.model_dir
    model.mkdir(parents=True)
    stale = model / f"{MARKER_PREFIX}algo-1-{'0' * 16}"
    others = [model / f"{MARKER_PREFIX}algo-2-{'1' * 16}", model / f"{MARKER_PREFIX}algo-1-x"]
    for p in (stale, *others):
        p.write_text("old")
    (model / "model.pt").write_bytes(b"weights")

    md = ModelDir(paths, "algo-1", ["algo-1", "algo-2"])
    md.mark()
    assert not stale.exists()
    assert all(p.exists() for p in others), "other hosts' markers (and unlike names) stay"
    assert md.marker.is_file() and (model / "model.pt").read_bytes() == b"weights"
    md.unmark()
    assert sorted(p.name for p in model.iterdir()) == sorted(
        ["model.pt", *(p.name for p in others)]
    )
