"""Multi-node jobs in docker-compose: every container a SageMaker host, on a private dockerd.

Each test runs a real job (real containers, Docker's embedded DNS, the smdist agent in every
container, torch.distributed over gloo between them) and asserts on what the containers
wrote into their bind-mounted /opt/ml/model and /opt/ml/output and on their exit codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from compose.harness import Harness, JobResult

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


def rank_records(job: JobResult) -> dict[int, dict[str, Any]]:
    """rank -> what that rank wrote, read from the host directory it landed in."""
    records: dict[int, dict[str, Any]] = {}
    for host, result in job.hosts.items():
        for path in sorted((result.output_dir / "data" / "ranks").glob("rank-*.json")):
            record = json.loads(path.read_text())
            assert record["host"] == host, f"{path} was written by {record['host']}"
            records[record["rank"]] = record
    return records


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_ddp_two_hosts_two_processes_each(harness: Harness) -> None:
    job = harness.run_job(
        "ddp-2x2",
        hosts=2,
        command=["smdist-run", "--nproc-per-host", "2", "--dns-timeout", "60", "ddp.py"],
    )
    assert job.exit_codes == {"algo-1": 0, "algo-2": 0}, job.logs()

    records = rank_records(job)
    assert sorted(records) == [0, 1, 2, 3], job.logs()
    assert {r: rec["host"] for r, rec in records.items()} == {
        0: "algo-1",
        1: "algo-1",
        2: "algo-2",
        3: "algo-2",
    }
    for rank, rec in records.items():
        assert rec["world_size"] == 4 and rec["allreduce"] == 4.0, rec
        assert rec["local_rank"] == rank % 2, rec
        assert rec["hosts_by_rank"] == ["algo-1", "algo-1", "algo-2", "algo-2"], rec
        # The group was really freed: no gloo or TCPStore thread is left to run during
        # interpreter exit, where a peer hanging up used to abort it (exit 134).
        assert rec["threads_after_teardown"] == [], rec
    # DDP averaged gradients across both containers: every rank ends with the same weights.
    assert len({tuple(rec["weights"]) for rec in records.values()}) == 1

    # The model lands on the master host only, and it is the trained one.
    assert files_under(job["algo-1"].model_dir) == ["model.pt"]
    assert files_under(job["algo-2"].model_dir) == []
    state = torch.load(job["algo-1"].model_dir / "model.pt")
    saved = torch.cat([state["weight"].flatten(), state["bias"].flatten()]).tolist()
    assert saved == pytest.approx(records[0]["weights"])

    # Worker output reaches each container's log with its host/rank prefix.
    assert "[algo-2/3] allreduce=4 world_size=4 rank=3 host=algo-2" in job["algo-2"].log
    assert "[algo-1/0] allreduce=4 world_size=4 rank=0 host=algo-1" in job["algo-1"].log


def test_four_hosts_started_in_reverse_order(harness: Harness) -> None:
    # Each container is started only once the one before it is seen waiting for its peers:
    # algo-4 waits for names that do not exist yet, algo-1 (the master) comes up last.
    job = harness.run_job(
        "late-hosts-4x1",
        hosts=4,
        command=["smdist-run", "--nproc-per-host", "1", "--dns-timeout", "120", "ddp.py"],
        start_order=["algo-4", "algo-3", "algo-2", "algo-1"],
        wait_between=r"waiting for \d+/4 hosts",
    )
    assert job.exit_codes == {f"algo-{i}": 0 for i in range(1, 5)}, job.logs()
    records = rank_records(job)
    assert sorted(records) == [0, 1, 2, 3], job.logs()
    expected = ["algo-1", "algo-2", "algo-3", "algo-4"]
    for rank, rec in records.items():
        assert rec["host"] == expected[rank] and rec["world_size"] == 4, rec
        assert rec["hosts_by_rank"] == expected and rec["allreduce"] == 4.0, rec
    assert files_under(job["algo-1"].model_dir) == ["model.pt"]
    assert "waiting for 3/4 hosts" in job["algo-4"].log


def test_host_that_never_appears_fails_every_container(harness: Harness) -> None:
    dns_timeout = 8.0
    job = harness.run_job(
        "missing-host",
        hosts=2,
        resource_hosts=["algo-1", "algo-2", "algo-3"],  # no container is ever algo-3
        command=["smdist-run", "--dns-timeout", str(dns_timeout), "ddp.py"],
        timeout=120,
    )
    for host, result in job.hosts.items():
        assert result.exit_code not in (0, 137), job.logs()  # failed by itself, not killed
        first_line = result.failure.splitlines()[0] if result.failure else ""
        assert first_line.startswith("HostResolutionFailed: "), (host, result.failure)
        assert "algo-3" in first_line, first_line
        # Hang guard, generous: the deadline is what ends the wait.
        assert result.seconds < dns_timeout + 60, (host, result.seconds)
    assert rank_records(job) == {}


def test_docker_run_image_train_single_host(harness: Harness, tmp_path: Path) -> None:
    # SageMaker's literal invocation, no compose: `docker run IMAGE train`, the entry script
    # named by the sagemaker_program hyperparameter, /opt/ml mounted as SageMaker does.
    config, model, output = tmp_path / "config", tmp_path / "model", tmp_path / "output"
    for d in (config, model, output):
        d.mkdir()
    hyperparameters = {"sagemaker_program": '"ddp.py"', "steps": "2"}
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]})
    )
    code, log = harness.docker_run(
        "docker-run-train",
        ["train"],
        docker_args=[
            "--hostname", "algo-1",
            "-v", f"{config}:/opt/ml/input/config:ro",
            "-v", f"{model}:/opt/ml/model",
            "-v", f"{output}:/opt/ml/output",
        ],
    )  # fmt: skip
    assert code == 0, log
    assert files_under(model) == ["model.pt"], log
    record = json.loads((output / "data" / "ranks" / "rank-0.json").read_text())
    assert record["world_size"] == 1 and record["allreduce"] == 1.0, record
    assert "[algo-1/0] allreduce=1 world_size=1 rank=0 host=algo-1" in log


def test_a_hung_job_is_killed_at_its_timeout(harness: Harness) -> None:
    # The harness's own guarantee: a job that never ends cannot hang the tier.
    job = harness.run_job("hung", hosts=2, command=["sleep", "600"], timeout=5)
    assert job.exit_codes == {"algo-1": 137, "algo-2": 137}, job.logs()
    assert job.seconds < 5 + 60, job.seconds  # hang guard: the kill, not sleep's end
