"""How a rank was started: each launcher for real, and what the rank detects.

smdist's agent, torchrun and Open MPI's mpirun run for real. MPICH / Intel MPI are not
installed here: their rank sees PMI_RANK, PMI_SIZE, MPI_LOCALRANKID and MPI_LOCALNRANKS
(Hydra's variables), which the PMI test sets by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smdist.worker import environment
from smdist.worker.artifacts import Artifacts
from smdist.worker.mpi_rank import world_from_mpi
from tests.helpers import REPO, free_port, make_tree, run, run_mpirun, write_script

REPORT = r"""
import json, os, sys
from pathlib import Path
from smdist.worker import api, environment

e = environment.detect()
out = {
    "class": type(e).__name__,
    "rank": e.rank,
    "world_size": e.world_size,
    "local_rank": e.local_rank,
    "local_world_size": e.local_world_size,
    "node_rank": e.node_rank,
    "master_addr": e.master_addr,
    "master_port": e.master_port,
    "host": e.host,
    "external": e.creates_processes_externally,
    "launched": api.launched(),
    "repr": repr(e),
    "torch_imported": "torch" in sys.modules,
}
Path(os.environ["REPORT_DIR"], f"rank-{e.rank}.json").write_text(json.dumps(out))
"""

# Every variable any launcher sets: the tests start from none of them.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SMDIST_AGENT_PID",
    "SM_CURRENT_HOST",
    "SMDIST_OPT_ML",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
)


def clean_env(report_dir: Path, **extra: str) -> dict[str, str]:
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(("OMPI_", "PMIX_", "TORCHELASTIC_"))
    }
    e["PYTHONPATH"] = str(REPO)
    e["REPORT_DIR"] = str(report_dir)
    e.update(extra)
    return e


def reports(directory: Path) -> dict[int, dict[str, Any]]:
    return {int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in directory.glob("*.json")}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return write_script(tmp_path / "report.py", REPORT)


def test_a_rank_started_by_smdist_agent(tmp_path: Path, script: Path) -> None:
    opt_ml = make_tree(tmp_path / "opt_ml", current_host="algo-1")
    out = tmp_path / "out"
    out.mkdir()
    r = run(["--opt-ml", str(opt_ml), "--nproc-per-host", "2", str(script)], REPORT_DIR=str(out))
    assert r.returncode == 0, r.stderr
    got = reports(out)
    assert sorted(got) == [0, 1]
    for rank, rep in got.items():
        assert rep["class"] == "SmdistAgent"
        assert (rep["rank"], rep["world_size"]) == (rank, 2)
        assert (rep["local_rank"], rep["local_world_size"], rep["node_rank"]) == (rank, 2, 0)
        assert rep["host"] == "algo-1" and rep["master_addr"] and rep["master_port"] > 0
        assert rep["external"] and rep["launched"]
    assert got[1]["repr"].startswith("SmdistAgent(rank=1(2), local_rank=1(2), node_rank=0")


def test_a_rank_started_by_torchrun(tmp_path: Path, script: Path) -> None:
    opt_ml = make_tree(tmp_path / "opt_ml", current_host="algo-3", hosts=["algo-3"])
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(out, SMDIST_OPT_ML=str(opt_ml)),
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    got = reports(out)
    assert sorted(got) == [0, 1]
    for rank, rep in got.items():
        assert rep["class"] == "TorchRun"
        assert (rep["rank"], rep["world_size"], rep["local_rank"]) == (rank, 2, rank)
        assert (rep["local_world_size"], rep["node_rank"]) == (2, 0)
        assert (rep["master_addr"], rep["master_port"]) == ("127.0.0.1", port)
        # No SM_CURRENT_HOST: the host comes from resourceconfig.json.
        assert rep["host"] == "algo-3"
        assert rep["launched"]


def test_a_rank_started_by_open_mpi(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = run_mpirun(script, clean_env(out, SMDIST_OPT_ML=str(make_tree(tmp_path / "opt_ml"))))
    assert r.returncode == 0, r.stdout + r.stderr
    got = reports(out)
    assert sorted(got) == [0, 1]
    for rank, rep in got.items():
        assert rep["class"] == "OpenMPI"
        assert (rep["rank"], rep["world_size"], rep["local_rank"]) == (rank, 2, rank)
        assert (rep["local_world_size"], rep["node_rank"]) == (2, 0)
        assert rep["master_addr"] is None  # the decorator's mpi4py broadcast picks it
        assert rep["launched"], "the decorator would relaunch every rank as its own agent"


HYDRA = {  # what MPICH's / Intel MPI's Hydra gives rank 3 of 4, two per host
    "PMI_RANK": "3",
    "PMI_SIZE": "4",
    "PMI_FD": "7",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "2",
}


def run_plainly(script: Path, tmp_path: Path, opt_ml: Path, **variables: str) -> dict[str, Any]:
    """``python script.py`` with only ``variables`` from a launcher: the rank's report."""
    out = tmp_path / "out"
    out.mkdir()
    e = clean_env(out, SMDIST_OPT_ML=str(opt_ml), **variables)
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=e
    )
    assert r.returncode == 0, r.stderr
    (rep,) = reports(out).values()
    return rep


def test_a_rank_started_by_mpich_or_intel_mpi(tmp_path: Path, script: Path) -> None:
    # Not installed here: the rank gets Hydra's variables by hand (see the module docstring).
    opt_ml = make_tree(tmp_path / "opt_ml", current_host="algo-2", hosts=["algo-1", "algo-2"])
    rep = run_plainly(script, tmp_path, opt_ml, **HYDRA)
    assert rep["class"] == "Pmi"
    assert (rep["rank"], rep["world_size"], rep["local_rank"]) == (3, 4, 1)
    assert (rep["local_world_size"], rep["node_rank"], rep["host"]) == (2, 1, "algo-2")
    # The bug this fixed: launched() was false, so every rank re-executed itself as an agent.
    assert rep["launched"] and rep["external"]
    # Every reader agrees: the artifacts' identity and the MPI world mapping.
    env = {**HYDRA, "SMDIST_OPT_ML": str(opt_ml), "MASTER_ADDR": "algo-1", "MASTER_PORT": "29500"}
    who = Artifacts.from_env(env).worker
    assert (who.rank, who.local_rank, who.host) == (3, 1, "algo-2")
    assert world_from_mpi(env) == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
    }


def test_a_script_run_directly(tmp_path: Path, script: Path) -> None:
    rep = run_plainly(script, tmp_path, make_tree(tmp_path / "opt_ml"))
    assert rep["class"] == "Direct"
    assert (rep["rank"], rep["world_size"], rep["local_rank"], rep["node_rank"]) == (0, 1, 0, 0)
    assert not rep["launched"] and not rep["external"]  # the decorator relaunches itself
    assert not rep["torch_imported"]  # detecting costs no torch


def test_the_first_environment_that_detects_wins() -> None:
    # smdist's own mpirun: Open MPI's variables and the agent's, the agent's win.
    both = {"SMDIST_AGENT_PID": "1", "RANK": "2", "OMPI_COMM_WORLD_RANK": "2"}
    assert type(environment.detect(both)) is environment.SmdistAgent
    # torch's variables set by the user under mpirun win over MPI's, as torch reads them.
    assert type(environment.detect({"RANK": "1", "OMPI_COMM_WORLD_RANK": "0"})).__name__ == (
        "TorchRun"
    )
    assert environment.ENVIRONMENTS[-1] is environment.Direct


def test_a_bad_variable_is_named() -> None:
    with pytest.raises(environment.VariableError, match="environment variable PMI_SIZE: "):
        _ = environment.detect({"PMI_RANK": "0", "PMI_SIZE": "four"}).world_size


def test_the_plain_process_of_a_host_outside_the_world() -> None:
    outside = {"SMDIST_AGENT_PID": "1", "SMDIST_OUTSIDE_WORLD": "3/2", "SM_CURRENT_HOST": "a"}
    env = environment.detect(outside)
    assert type(env) is environment.OutsideWorld and not env.in_world
    assert (env.rank, env.world_size, env.local_rank) == (3, 2, 0)
    assert environment.detect({"SMDIST_AGENT_PID": "1", "RANK": "0"}).in_world
    with pytest.raises(environment.VariableError, match="SMDIST_OUTSIDE_WORLD: expected"):
        _ = environment.detect({"SMDIST_OUTSIDE_WORLD": "three"}).rank
