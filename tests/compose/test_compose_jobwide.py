"""Job-wide control across containers (issue 6) and the model-dir clash check (issue 8).

Real containers on the harness's private dockerd, the smdist agent as each container's
command, gloo between them. Latencies are printed (and added to the tier's timing table);
they are asserted only as generous hang guards.
"""

from __future__ import annotations

import json

import pytest
import torch

from compose.harness import Harness, HostResult, JobResult, RunningJob

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]

SMDIST_RUN = ["smdist-run", "--dns-timeout", "60"]
HEARTBEAT_S = 3.0


def first_line(result: HostResult) -> str:
    return result.failure.splitlines()[0] if result.failure else ""


def report(harness: Harness, what: str, seconds: float) -> None:
    print(f"{what}: {seconds:.2f} s")
    harness.timings.append((f"  {what}", seconds))


def wait_until_training(job: RunningJob, ranks: dict[str, list[int]]) -> None:
    """Every listed rank printed its first step (relayed as ``[host/rank] training ...``)."""
    for host, host_ranks in ranks.items():
        for rank in host_ranks:
            job.wait_for_log(host, rf"\[{host}/{rank}\] training rank={rank}")


def failed_by_itself(job: JobResult) -> None:
    for host, result in job.hosts.items():
        assert result.exit_code not in (0, 137), (host, job.logs())


def test_a_raise_on_rank_3_stops_every_container_and_names_it(harness: Harness) -> None:
    job = harness.run_job(
        "raise-2x2",
        hosts=2,
        command=[*SMDIST_RUN, "--nproc-per-host", "2", "raise_in_allreduce.py"],
        timeout=120,
    )
    raised = float((job["algo-2"].output_dir / "data" / "raised-at").read_text())
    latency = job.last_exit - raised
    report(harness, "raise -> last container exit", latency)
    assert latency < 20, "hang guard: peers must not wait for the collective's timeout"
    failed_by_itself(job)
    for host, result in job.hosts.items():
        first = first_line(result)
        assert first.startswith("UserScriptError: RuntimeError: bad batch on rank 3"), (host, first)
        assert "(host algo-2, rank 3, exit 1)" in first, (host, first)
        assert len(result.failure) <= 1024
    # The hung ranks' stacks were dumped into their container's log before they were stopped.
    for host, rank in (("algo-1", 0), ("algo-1", 1), ("algo-2", 2)):
        lines = [ln for ln in job[host].log.splitlines() if ln.startswith(f"[{host}/{rank}] ")]
        assert any("in blocked_in_allreduce" in ln for ln in lines), (host, rank, job.logs())


@pytest.mark.parametrize(
    "script",
    [
        # No collective in flight: the master's store sees algo-2's connection drop.
        "local_steps_forever.py",
        # All-reducing when the host dies: gloo fails at once with "Connection closed by
        # peer", a victim's error that must not become the root cause.
        "train_forever.py",
    ],
)
def test_docker_kill_of_a_host_stops_the_other_within_the_heartbeat_bound(
    harness: Harness, script: str
) -> None:
    def kill_algo_2(job: RunningJob) -> None:
        wait_until_training(job, {"algo-1": [0], "algo-2": [1]})
        job.kill("algo-2")

    name = "kill-algo-2-" + script.removesuffix(".py").replace("_", "-")
    job = harness.run_job(
        name,
        hosts=2,
        command=[*SMDIST_RUN, "--heartbeat-timeout", str(HEARTBEAT_S), script],
        during=kill_algo_2,
        timeout=120,
    )
    latency = job["algo-1"].finished_at - job.marks["kill algo-2"]
    report(harness, "docker kill algo-2 -> algo-1 exit", latency)
    assert job["algo-2"].exit_code == 137, job.logs()
    assert job["algo-1"].exit_code not in (0, 137), job.logs()
    assert first_line(job["algo-1"]).startswith("HostLost: host algo-2"), job["algo-1"].failure
    assert latency < HEARTBEAT_S + 20, "hang guard: the heartbeat bound, generously"


def test_a_frozen_host_is_lost_within_the_heartbeat_bound(harness: Harness) -> None:
    # `docker pause` freezes algo-2 with every connection open: the others hang in their
    # all-reduce, and only the missed heartbeats can tell.
    def freeze_algo_2(job: RunningJob) -> None:
        wait_until_training(job, {"algo-1": [0], "algo-2": [1]})
        job.pause("algo-2")
        try:
            job.wait_exit("algo-1")
        finally:
            job.unpause("algo-2")
            job.kill("algo-2")

    job = harness.run_job(
        "pause-algo-2",
        hosts=2,
        command=[*SMDIST_RUN, "--heartbeat-timeout", str(HEARTBEAT_S), "train_forever.py"],
        during=freeze_algo_2,
        timeout=120,
    )
    latency = job["algo-1"].finished_at - job.marks["pause algo-2"]
    report(harness, "docker pause algo-2 -> algo-1 exit", latency)
    assert job["algo-1"].exit_code not in (0, 137), job.logs()
    assert first_line(job["algo-1"]).startswith("HostLost: host algo-2"), job["algo-1"].failure
    assert latency < HEARTBEAT_S + 20, "hang guard: the heartbeat bound, generously"


def test_docker_stop_of_the_master_is_a_checkpointed_stop(harness: Harness) -> None:
    def stop_master(job: RunningJob) -> None:
        wait_until_training(job, {"algo-1": [0, 1], "algo-2": [2, 3]})
        job.stop("algo-1", grace=120)  # what StopTrainingJob / a spot interruption does

    job = harness.run_job(
        "stop-master-2x2",
        hosts=2,
        command=[*SMDIST_RUN, "--nproc-per-host", "2", "stoppable.py"],
        during=stop_master,
        timeout=180,
    )
    latency = job.last_exit - job.marks["stop algo-1"]
    report(harness, "docker stop algo-1 -> last container exit", latency)
    assert job.exit_codes == {"algo-1": 0, "algo-2": 0}, job.logs()
    assert latency < 60, "well within SageMaker's 120 s"
    steps = {}
    for rank, host in ((0, "algo-1"), (1, "algo-1"), (2, "algo-2"), (3, "algo-2")):
        hook = job[host].output_dir / "data" / f"hook-{rank}.json"
        assert hook.is_file(), (rank, job.logs())  # every rank's on_stop hook ran
        steps[rank] = json.loads(hook.read_text())["step"]
        checkpoint = job[host].checkpoint_dir / f"rank-{rank}" / "state.pt"
        assert torch.load(checkpoint) == {"step": steps[rank]}, rank
    assert len(set(steps.values())) == 1, f"should_stop disagreed across ranks: {steps}"
    for result in job.hosts.values():
        assert result.failure == "", result.failure


def test_two_containers_writing_model_pt_directly_fail_with_model_dir_clash(
    harness: Harness,
) -> None:
    job = harness.run_job(
        "model-clash",
        hosts=2,
        command=[*SMDIST_RUN, "model_clash.py", "--direct"],
        timeout=120,
    )
    failed_by_itself(job)
    for host, result in job.hosts.items():
        first = first_line(result)
        assert first.startswith("ModelDirClash:"), (host, result.failure, job.logs())
        assert "model.pt on hosts algo-1, algo-2" in first, first


def test_model_pt_through_the_api_lands_once_on_the_master(harness: Harness) -> None:
    job = harness.run_job(
        "model-api-2x2",
        hosts=2,
        command=[*SMDIST_RUN, "--nproc-per-host", "2", "model_clash.py"],
        timeout=120,
    )
    assert job.exit_codes == {"algo-1": 0, "algo-2": 0}, job.logs()
    assert [p.name for p in job["algo-1"].model_dir.iterdir()] == ["model.pt"]
    assert torch.load(job["algo-1"].model_dir / "model.pt") == {"rank": 0, "host": "algo-1"}
    assert list(job["algo-2"].model_dir.iterdir()) == []
