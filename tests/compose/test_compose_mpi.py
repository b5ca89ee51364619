"""The MPI backend across containers (issue 9): mpirun on algo-1 reaches algo-2 over ssh.

Each container runs the agent with ``--backend mpi``; algo-2's agent starts sshd (the
image's job key, launchers/sshd-setup.sh) and algo-1's runs mpirun over the job network.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from compose.harness import Harness, JobResult, RunningJob

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]

MPI_RUN = ["smdist-run", "--backend", "mpi", "--nproc-per-host", "2", "--dns-timeout", "60"]
HEARTBEAT_S = 3.0
HOST_OF_RANK = ["algo-1", "algo-1", "algo-2", "algo-2"]


def rank_records(job: JobResult) -> dict[int, dict[str, Any]]:
    """rank -> its record, each read from the host it ran on."""
    records = {}
    for host, result in job.hosts.items():
        for path in (result.output_dir / "data" / "ranks").glob("rank-*.json"):
            record = json.loads(path.read_text())
            assert HOST_OF_RANK[record["rank"]] == host, (path, record)
            records[record["rank"]] = record
    return records


def test_mpi4py_allreduce_and_a_ddp_step_over_ssh(harness: Harness) -> None:
    job = harness.run_job(
        "mpi-2x2",
        hosts=2,
        command=[*MPI_RUN, "mpi_allreduce.py", "--torch-step"],
        timeout=150,
    )
    print(f"job: {job.seconds:.1f} s")
    assert job.exit_codes == {"algo-1": 0, "algo-2": 0}, job.logs()
    records = rank_records(job)
    assert sorted(records) == [0, 1, 2, 3], job.logs()
    for rank, rec in records.items():
        assert rec["world"] == 4 and rec["sum"] == 1 + 2 + 3 + 4, rec
        assert rec["hosts"] == HOST_OF_RANK, rec  # each rank saw its own SM_CURRENT_HOST
        assert rec["env"]["SM_CURRENT_HOST"] == HOST_OF_RANK[rank], rec
        assert rec["env"]["LOCAL_RANK"] == str(rank % 2), rec
        assert rec["torch"] == {"rank": rank, "world": 4}, rec
    # DDP averaged the gradients over both containers: every rank took the same step.
    assert len({rec["weight0"] for rec in records.values()}) == 1, records


def test_mpi_rank_raising_on_algo_2_fails_every_container_with_it(harness: Harness) -> None:
    job = harness.run_job(
        "mpi-raise",
        hosts=2,
        command=[*MPI_RUN, "mpi_allreduce.py", "--raise-on-rank", "3"],
        timeout=150,
    )
    print(f"job: {job.seconds:.1f} s")
    for host, result in job.hosts.items():
        assert result.exit_code not in (0, 137), (host, job.logs())
        first = result.failure.splitlines()[0] if result.failure else ""
        assert first.startswith("UserScriptError: RuntimeError: bad batch on rank 3"), (
            host,
            result.failure,
            job.logs(),
        )
        assert "host algo-2, rank 3" in first, (host, first)
    assert job.seconds < 90, "hang guard: the abort, not a collective timeout"


def test_mpi_master_container_killed_stops_the_worker_container(harness: Harness) -> None:
    def kill_master(job: RunningJob) -> None:
        # mpirun on algo-1 relays every rank's output: algo-2's ranks are running too.
        for rank in range(4):
            job.wait_for_log("algo-1", rf"\[{HOST_OF_RANK[rank]}/{rank}\] training rank={rank}")
        job.kill("algo-1")

    job = harness.run_job(
        "mpi-kill-master",
        hosts=2,
        command=[*MPI_RUN, "--heartbeat-timeout", str(HEARTBEAT_S), "mpi_train_forever.py"],
        during=kill_master,
        timeout=150,
    )
    latency = job["algo-2"].finished_at - job.marks["kill algo-1"]
    print(f"docker kill algo-1 -> algo-2 exit: {latency:.2f} s")
    harness.timings.append(("  docker kill algo-1 -> algo-2 exit (mpi)", latency))
    assert job["algo-1"].exit_code == 137, job.logs()
    assert job["algo-2"].exit_code not in (0, 137), job.logs()
    assert job["algo-2"].failure.startswith("HostLost: host algo-1"), job["algo-2"].failure
    assert latency < HEARTBEAT_S + 20, "hang guard: the heartbeat bound, generously"
