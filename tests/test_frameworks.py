"""Scripts written for other launchers run under smdist unchanged: real Lightning, accelerate,
transformers and DeepSpeed, each under ``smdist-run --simulate 2x2`` (real processes, gloo),
tiny models built from config, synthetic data, no hub downloads.

Each script (``tests/frameworks/``) writes what the framework itself reports (rank, world
size, node) to its host's output data dir once it finished; the tests read those files.
The packages come from the ``frameworks`` extra (``make test`` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, run

SCRIPTS = REPO / "tests" / "frameworks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

pytestmark = pytest.mark.frameworks


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install -e '.[frameworks]'; make test does)",
    )


def _simulate(
    tmp_path: Path, script: str, *args: str, backend: str = "torch", timeout: float = 240
) -> tuple[Any, Path]:
    work = tmp_path / "work"
    argv = ["--simulate", "2x2", "--work-dir", str(work), "--backend", backend]
    r = run(
        [*argv, str(SCRIPTS / script), *args],
        timeout=timeout,  # only catches a hang: a run takes 15-60 s
        **OFFLINE,
    )
    return r, work


def _reports(work: Path) -> dict[int, dict[str, Any]]:
    return {
        int(f.stem.split("-")[1]): json.loads(f.read_text())
        for f in work.glob("algo-*/output/data/rank-*.json")
    }


def _every_rank_finished(r: Any, work: Path) -> dict[int, dict[str, Any]]:
    assert r.returncode == 0, r.stderr[-4000:]
    reports = _reports(work)
    assert sorted(reports) == [0, 1, 2, 3], r.stderr[-4000:]
    for rank, rep in reports.items():
        assert rep["rank"] == rank  # the framework's own global rank
        assert rep["world_size"] == 4
        assert rep["finished"] is True
        if "local_rank" in rep:
            assert rep["local_rank"] == rank % 2
        if "node_rank" in rep:
            assert rep["node_rank"] == rank // 2
    return reports


@_needs("lightning")
@pytest.mark.timeout(540)
@pytest.mark.parametrize("backend", ["torch", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_lightning_trainer_fit_with_num_nodes(tmp_path: Path, backend: str) -> None:
    if backend == "mpi" and shutil.which("mpirun") is None:
        pytest.skip("Open MPI is not installed")
    # Under MPI on a loaded 2-core machine this run took 207 s once: a wider hang bound.
    r, work = _simulate(
        tmp_path, "lightning_trainer.py", "--num-nodes", "2", backend=backend, timeout=480
    )
    for rep in _every_rank_finished(r, work).values():
        assert rep["environment"] == "TorchElasticEnvironment"  # as under torchrun
        assert rep["steps"] == 3


@_needs("lightning")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "You set `devices=2` and `num_nodes=1` in Lightning, but the product (2 * 1) does "
         "not match the world size (4)."),
        (("--devices", "4", "--num-nodes", "2"), "You set `devices=4` and `num_nodes=2` in "
         "Lightning, but the product (4 * 2) does not match the world size (4)."),
    ],
    ids=["num_nodes-left-out", "devices-4-on-2-processes"],
)  # fmt: skip
def test_lightning_misconfigured_job_ends_with_lightnings_own_error(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    r, work = _simulate(tmp_path, "lightning_trainer.py", *args)
    assert r.returncode == 1, r.stderr[-4000:]
    assert not _reports(work)  # no rank trained in a world of its own
    for host in ("algo-1", "algo-2"):
        failure = (work / host / "output" / "failure").read_text()
        assert failure.startswith(f"UserScriptError: ValueError: {message}"), failure
        assert "gloo" not in failure


@_needs("lightning")
def test_lightning_fabric(tmp_path: Path) -> None:
    r, work = _simulate(tmp_path, "lightning_fabric.py")
    for rep in _every_rank_finished(r, work).values():
        assert rep["environment"] == "TorchElasticEnvironment"
        assert rep["sum"] == 1 + 2 + 3 + 4  # every rank took part in one all-reduce


@_needs("accelerate")
def test_accelerate_on_cpu(tmp_path: Path) -> None:
    r, work = _simulate(tmp_path, "accelerate_cpu.py")
    for rep in _every_rank_finished(r, work).values():
        assert rep["distributed_type"] == "DistributedType.MULTI_CPU"
        assert rep["sum"] == 1 + 2 + 3 + 4
        assert rep["steps"] == 3


@_needs("transformers")
def test_transformers_trainer(tmp_path: Path) -> None:
    r, work = _simulate(tmp_path, "transformers_trainer.py")
    reports = _every_rank_finished(r, work)
    for rep in reports.values():
        assert rep["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert rep["steps"] == 3
    assert len({rep["loss"] for rep in reports.values()}) == 1  # one model, averaged loss


@_needs("deepspeed")
@pytest.mark.timeout(900)
def test_deepspeed_init_distributed_and_initialize_on_cpu(tmp_path: Path) -> None:
    # DeepSpeed's CPU accelerator compiles its shared-memory comm op on first use (about a
    # minute; cached in ~/.cache/torch_extensions); `make test` builds it at install time.
    r, work = _simulate(tmp_path, "deepspeed_cpu.py", timeout=840)
    for rep in _every_rank_finished(r, work).values():
        assert rep["engine_world_size"] == 4
        assert rep["steps"] == 3
