"""torchrun's environment contract: what every worker gets, under both backends, and where
torch elastic's ``@record`` writes (real agents, real workers, real torch)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from smdist.agent.report.classify import classify
from smdist.agent.report.failure import WorkerFailure
from smdist.torchrun_env import run_id, worker_variables
from tests.helpers import make_tree, run, write_script

CONTRACT = [
    "TORCHELASTIC_RUN_ID",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_NAME",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_USE_AGENT_STORE",
]


def _vars(user_env: dict[str, str] | None = None) -> dict[str, str]:
    return worker_variables(
        user_env or {},
        run_id="job-1",
        rank=5,
        world_size=8,
        node_rank=2,
        num_hosts=4,
        error_file="/run/rank-5.error.json",
    )


def test_every_variable_torchrun_gives_a_worker() -> None:
    v = _vars()
    assert v == {
        "TORCHELASTIC_RUN_ID": "job-1",
        "GROUP_RANK": "2",
        "GROUP_WORLD_SIZE": "4",
        "ROLE_NAME": "default",
        "ROLE_RANK": "5",
        "ROLE_WORLD_SIZE": "8",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_ERROR_FILE": "/run/rank-5.error.json",
        "TORCHELASTIC_USE_AGENT_STORE": "False",  # the agent hosts no store for the workers
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }


def test_a_setting_the_user_made_wins_but_the_workers_place_is_smdists() -> None:
    user = {
        "TORCHELASTIC_RUN_ID": "mine",
        "ROLE_NAME": "trainer",
        "TORCHELASTIC_ERROR_FILE": "/tmp/mine.json",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "GROUP_RANK": "9",  # stale, from some outer launcher: would contradict RANK
        "ROLE_RANK": "9",
    }
    v = _vars(user)
    for name in ("TORCHELASTIC_RUN_ID", "ROLE_NAME", "TORCHELASTIC_ERROR_FILE"):
        assert name not in v  # not set: the container's own value reaches the worker
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in v
    assert (v["GROUP_RANK"], v["ROLE_RANK"]) == ("2", "5")


def test_restart_counters_come_from_the_caller() -> None:
    v = worker_variables(
        {},
        run_id="j",
        rank=0,
        world_size=1,
        node_rank=0,
        num_hosts=1,
        error_file="/e",
        restart_count=2,
        max_restarts=3,
    )
    assert (v["TORCHELASTIC_RESTART_COUNT"], v["TORCHELASTIC_MAX_RESTARTS"]) == ("2", "3")


def test_run_id_is_the_job_name_else_the_same_derived_id_on_every_host() -> None:
    hosts = ["algo-1", "algo-2"]
    hp = {"sagemaker_job_name": "from-sdk"}
    assert run_id({"TRAINING_JOB_NAME": "tj"}, hp, "10.0.0.1", hosts) == ("tj", "TRAINING_JOB_NAME")
    assert run_id({}, hp, "10.0.0.1", hosts)[0] == "from-sdk"
    derived, source = run_id({}, {}, "10.0.0.1", hosts)
    assert derived.startswith("smdist-") and "no job name" in source
    assert run_id({}, {}, "10.0.0.1", list(hosts))[0] == derived  # another host, same id
    assert run_id({}, {}, "10.0.0.2", hosts)[0] != derived  # another job


# What a worker sees, including torch's own verdict on who launched it.
REPORT = """
import json, os
import torch.distributed as dist
names = {names!r}
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{{os.environ['RANK']}}.json")
with open(out, "w") as f:
    json.dump({{"env": {{n: os.environ.get(n) for n in names + ["SMDIST_ERROR_FILE", "RANK"]}},
               "elastic": dist.is_torchelastic_launched()}}, f)
"""


def _reports(work: Path) -> dict[int, dict]:
    return {
        int(f.stem.split("-")[1]): json.loads(f.read_text())
        for f in work.glob("algo-*/output/data/rank-*.json")
    }


def _check_contract(reports: dict[int, dict]) -> None:
    assert sorted(reports) == [0, 1, 2, 3]
    for rank, rep in reports.items():
        e = rep["env"]
        assert rep["elastic"] is True  # torch.distributed.is_torchelastic_launched()
        assert e["TORCHELASTIC_RUN_ID"] == "my-training-job"
        assert (e["GROUP_RANK"], e["GROUP_WORLD_SIZE"]) == (str(rank // 2), "2")
        assert (e["ROLE_RANK"], e["ROLE_WORLD_SIZE"]) == (str(rank), "4")
        assert e["ROLE_NAME"] == "default"
        assert (e["TORCHELASTIC_RESTART_COUNT"], e["TORCHELASTIC_MAX_RESTARTS"]) == ("0", "0")
        assert e["TORCHELASTIC_ERROR_FILE"] == e["SMDIST_ERROR_FILE"]
        assert e["TORCHELASTIC_USE_AGENT_STORE"] == "False"


def test_simulated_2x2_workers_see_torchruns_variables(tmp_path: Path) -> None:
    script = write_script(tmp_path / "report.py", REPORT.format(names=CONTRACT))
    work = tmp_path / "work"
    r = run(
        ["--simulate", "2x2", "--work-dir", str(work), str(script)],
        TRAINING_JOB_NAME="my-training-job",
    )
    assert r.returncode == 0, r.stderr
    _check_contract(_reports(work))
    assert "TORCHELASTIC_RUN_ID from TRAINING_JOB_NAME" in r.stderr


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed")
def test_simulated_2x2_under_mpi_every_rank_sees_the_same_variables(tmp_path: Path) -> None:
    script = write_script(tmp_path / "report.py", REPORT.format(names=CONTRACT))
    work = tmp_path / "work"
    r = run(
        ["--simulate", "2x2", "--backend", "mpi", "--work-dir", str(work), str(script)],
        TRAINING_JOB_NAME="my-training-job",
    )
    assert r.returncode == 0, r.stderr
    _check_contract(_reports(work))


# A torchrun-style script: torch elastic's @record around main.
RECORDED = """
import os
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    dist.init_process_group("gloo")
    if dist.get_rank() == 3:
        raise ValueError("label column missing in shard 3")
    dist.barrier()  # the others wait here until smdist stops them

if __name__ == "__main__":
    main()
"""


def test_record_error_lands_in_every_hosts_failure_file(tmp_path: Path) -> None:
    script = write_script(tmp_path / "train.py", RECORDED)
    work = tmp_path / "work"
    r = run(["--simulate", "2x2", "--work-dir", str(work), str(script)])
    assert r.returncode == 1, r.stderr
    for host in ("algo-1", "algo-2"):
        failure = (work / host / "output" / "failure").read_text()
        first = failure.splitlines()[0]
        assert first.startswith("UserScriptError: ValueError: label column missing in shard 3")
        assert "host algo-2, rank 3" in first
        assert "train.py:10" in failure  # the user's line, not torch's wrapper


def test_record_file_is_read_when_no_bootstrap_ran(tmp_path: Path) -> None:
    """An executable entry (a shell wrapper) runs Python itself: only @record writes."""
    script = write_script(tmp_path / "train.py", RECORDED.replace("== 3", "== 0"))
    wrapper = write_script(tmp_path / "train.sh", f"#!/bin/sh\nexec {sys.executable} {script}\n")
    wrapper.chmod(0o755)
    opt_ml = make_tree(tmp_path / "ml")
    r = run(["--opt-ml", str(opt_ml), str(wrapper)])
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("UserScriptError: ValueError: label column missing in shard 3")
    assert "train.py:10" in first


def test_a_record_file_classifies_like_a_traceback(tmp_path: Path) -> None:
    # The exact shape torch 2.x's ErrorHandler writes.
    path = tmp_path / "error.json"
    callstack = (
        "Traceback (most recent call last):\n"
        '  File "/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py",'
        " line 362, in wrapper\n    return f(*args, **kwargs)\n"
        '  File "/opt/ml/code/train.py", line 7, in main\n    import cv2\n'
        "ModuleNotFoundError: No module named 'cv2'\n"
    )
    path.write_text(
        json.dumps(
            {
                "message": {
                    "message": "ModuleNotFoundError: No module named 'cv2'",
                    "extraInfo": {"py_callstack": callstack, "timestamp": "1"},
                }
            }
        )
    )
    failure = WorkerFailure("algo-1", 0, 0, 1, 0.0, error_file=path)
    c = classify(failure)
    assert c.category == "MissingDependency"
    assert "train.py:7" in c.reason
