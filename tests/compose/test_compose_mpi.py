"""The MPI backend across containers (issue 9): mpirun on algo-1 reaches algo-2 over ssh.

Each container runs the agent with ``--backend mpi``; algo-1's agent makes a key pair for
the job and hands the public key to algo-2 through the authenticated store, algo-2's agent
starts the job's own sshd that accepts that key only, and algo-1's mpirun uses it over the
job network. The image trusts no key of its own (launchers/sshd-setup.sh).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
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
        # The hang guard: 12.5 s on a quiet 2-core machine, 108 s once on a loaded one.
        timeout=300,
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


# An intruder: a container of the same image on the job's network, not part of the job. It
# tries to ssh into algo-2 while the job's ranks run there, with every key it could have:
# the image's own (sshd-setup.sh bakes none now: any it finds), one it makes, and one that
# algo-2's root trusts in ~/.ssh/authorized_keys (planted there by the test, as an image
# with a baked key would have it). The job's sshd accepts only the job's key.
INTRUDER = r"""
cd /tmp
ssh-keygen -q -t ed25519 -N '' -f own >/dev/null
for key in /root/.ssh/id_* own /keys/planted; do
    case "$key" in *.pub|'/root/.ssh/id_*') continue ;; esac
    [ -f "$key" ] || continue
    out=$(ssh -F /dev/null -i "$key" -o IdentitiesOnly=yes -o BatchMode=yes \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 \
        -o LogLevel=ERROR root@algo-2 'echo INSIDE' 2>&1)
    rc=$?
    echo "ATTEMPT $key rc=$rc $(echo "$out" | tr '\r\n' '  ')"  # ssh ends lines with \r\n
done
exit 0
"""


def test_mpi_a_container_outside_the_job_cannot_ssh_into_a_job_host(
    harness: Harness, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    planted = keys / "planted"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "planted", "-f", str(planted)],
        check=True,
    )
    attempts: list[str] = []

    def intrude(job: RunningJob) -> None:
        # Every rank is up (algo-2's were started over ssh with the job's key) and holds.
        for rank in range(4):
            job.wait_for_log("algo-1", rf"\[{HOST_OF_RANK[rank]}/{rank}\] holding rank={rank}")
        docker = job.harness.engine.docker
        algo2 = job.ids["algo-2"]
        pub = (keys / "planted.pub").read_text().strip()
        docker(
            "exec", algo2, "sh", "-c",
            'mkdir -p /root/.ssh && chmod 700 /root/.ssh && printf "%s\\n" "$1" '
            ">> /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys",
            "sh", pub, what="plant a key in algo-2's root authorized_keys",
        )  # fmt: skip
        fmt = "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}"
        (network,) = docker("inspect", "-f", fmt, algo2, what="algo-2's network").split()
        out = docker(
            "run", "--rm", "--network", network, "-v", f"{keys}:/keys:ro",
            "--entrypoint", "sh", harness.image, "-c",
            "cp /keys/planted /tmp/planted && chmod 600 /tmp/planted && "
            + INTRUDER.replace("/keys/planted", "/tmp/planted"),
            what="the intruder's ssh attempts", timeout=120,
        )  # fmt: skip
        attempts.extend(line for line in out.splitlines() if line.startswith("ATTEMPT "))
        for host in ("algo-1", "algo-2"):  # let the ranks go
            (job.work / "hosts" / host / "checkpoints" / "release").write_text("go")

    job = harness.run_job(
        "mpi-intruder",
        hosts=2,
        command=[*MPI_RUN, "mpi_hold.py"],
        during=intrude,
        timeout=180,
    )
    print(f"job: {job.seconds:.1f} s; intruder: {attempts}")
    assert job.exit_codes == {"algo-1": 0, "algo-2": 0}, job.logs()
    records = rank_records(job)
    assert sorted(records) == [0, 1, 2, 3], job.logs()
    assert all(r["world"] == 4 and r["sum"] == 10 for r in records.values()), records
    # The intruder reached algo-2's sshd (it answered: publickey refused, not unreachable)
    # with its own key and the planted one, and got in with none.
    tried = {a.split()[1] for a in attempts}
    assert {"own", "/tmp/planted"} <= tried, attempts
    for attempt in attempts:
        assert "INSIDE" not in attempt and " rc=255 " in attempt, attempts
        assert "Permission denied (publickey)" in attempt, attempts
    assert "started the job's sshd on port 22 (the job's key only)" in job["algo-2"].log
    for host in ("algo-1", "algo-2"):
        assert "PRIVATE KEY" not in job[host].log and "AAAAC3NzaC1lZDI1NTE5" not in job[host].log
