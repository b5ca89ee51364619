"""Job-wide restarts across containers (issue 16): a failure restarts both containers'
workers in place; a killed container still ends the job (a lost host is not restarted)."""

from __future__ import annotations

import json

import pytest

from compose.harness import Harness, RunningJob

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]

SMDIST_RUN = ["smdist-run", "--dns-timeout", "60"]


def test_a_failure_restarts_both_containers_which_resume(harness: Harness) -> None:
    job = harness.run_job(
        "restart-once",
        hosts=2,
        command=[*SMDIST_RUN, "--max-restarts", "1", "restart_once.py"],
        timeout=180,
    )
    print(f"job with one restart: {job.seconds:.1f} s")
    assert job.exit_codes == {"algo-1": 0, "algo-2": 0}, job.logs()
    for rank, host in ((0, "algo-1"), (1, "algo-2")):
        done = json.loads((job[host].output_dir / "data" / f"done-{rank}.json").read_text())
        assert done == {"restart_count": 1, "resumed_at": 2}, (rank, done)
        assert "restart 1 of 1 on every host" in job[host].log, job.logs()
        assert job[host].failure == ""


def test_a_killed_container_is_not_restarted(harness: Harness) -> None:
    def kill_algo_2(job: RunningJob) -> None:
        job.wait_for_log("algo-2", r"\[algo-2/1\] training rank=1")
        job.kill("algo-2")

    job = harness.run_job(
        "restart-kill-algo-2",
        hosts=2,
        command=[*SMDIST_RUN, "--heartbeat-timeout", "3", "--max-restarts", "2",
                 "train_forever.py"],
        during=kill_algo_2,
        timeout=120,
    )  # fmt: skip
    assert job["algo-2"].exit_code == 137, job.logs()
    assert job["algo-1"].exit_code not in (0, 137), job.logs()
    first = job["algo-1"].failure.splitlines()[0]
    assert first.startswith("HostLost: host algo-2"), job["algo-1"].failure
    assert "not restarting: host algo-2 is gone" in job["algo-1"].log
