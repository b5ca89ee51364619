"""The MPI backend with real Open MPI: smdist-run's mpirun, mpi4py and torch (gloo) ranks.

One host, two ranks (several hosts over ssh are the docker-compose scenarios'). Open MPI
comes from launchers/install-mpi.sh, mpi4py from the test extra.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smdist.agent.backends import mpi
from smdist.errors import ConfigError, RendezvousFailed
from smdist.worker import mpi_rank
from tests.helpers import (
    env,
    free_port,
    make_tree,
    pid_alive,
    read_pids,
    run,
    run_mpirun,
    start_hosts,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.mpi

MPI4PY_ALLREDUCE = """
import json, os
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
        "SM_CURRENT_HOST", "SM_HOSTS", "MY_SETTING"]
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{comm.Get_rank()}.json")
with open(out, "w") as f:
    json.dump({"size": comm.Get_size(), "sum": total,
               "env": {k: os.environ.get(k) for k in keys}}, f)
print(f"rank {comm.Get_rank()} says hello", flush=True)
"""

TORCH_DECORATOR = """
import json, os
import torch, torch.distributed as dist
import smdist

@smdist.main
def train(ctx):
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    out = os.path.join(os.environ.get("SM_OUTPUT_DATA_DIR", {out!r}), f"rank-{{ctx.rank}}.json")
    with open(out, "w") as f:
        json.dump({{"rank": ctx.rank, "world": dist.get_world_size(), "sum": t.item(),
                    "backend": dist.get_backend(), "local_rank": ctx.local_rank}}, f)

train()
"""

MPI4PY_RAISE = """
from mpi4py import MPI
comm = MPI.COMM_WORLD
if comm.Get_rank() == 1:
    raise ValueError("rank 1 fails on purpose")
comm.Barrier()  # rank 0 waits here for a rank that will never come
"""

TORCH_RAISE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    raise KeyError("missing column 'label'")
dist.all_reduce(torch.ones(1))  # rank 0 blocks here until mpirun ends the job
"""


def _reports(opt_ml: Path) -> dict[int, dict]:
    return {
        int(f.stem.split("-")[1]): json.loads(f.read_text())
        for f in (opt_ml / "output" / "data").glob("rank-*.json")
    }


def test_mpi4py_allreduce_over_two_ranks(tmp_path: Path) -> None:
    script = write_script(tmp_path / "allreduce.py", MPI4PY_ALLREDUCE)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2", str(script)],
        timeout=60,
        MY_SETTING="kept",
    )
    assert r.returncode == 0, r.stderr
    reports = _reports(opt_ml)
    assert sorted(reports) == [0, 1]
    for rank, rep in reports.items():
        assert rep["size"] == 2
        assert rep["sum"] == 1 + 2  # both ranks took part in one MPI allreduce
        e = rep["env"]
        assert (e["RANK"], e["LOCAL_RANK"]) == (str(rank), str(rank))
        assert (e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["NODE_RANK"]) == ("2", "2", "0")
        assert e["SM_CURRENT_HOST"] == "algo-1"
        assert json.loads(e["SM_HOSTS"]) == ["algo-1"]
        assert e["MY_SETTING"] == "kept"  # the container's own variables reach the ranks
    # Each rank's output comes out whole, named by host and rank; the command is logged.
    assert "[algo-1/1] rank 1 says hello" in r.stdout
    assert "[algo-1/0] rank 0 says hello" in r.stdout
    assert "mpirun: " in r.stderr and "-np 2 -H localhost:2" in r.stderr


def test_torch_decorator_under_mpi_selected_by_hyperparameters(tmp_path: Path) -> None:
    opt_ml = make_tree(
        tmp_path / "opt_ml",
        hyperparameters={
            "sagemaker_mpi_enabled": "true",
            "sagemaker_mpi_num_of_processes_per_host": "2",
        },
    )
    script = write_script(tmp_path / "ddp.py", TORCH_DECORATOR.format(out=str(tmp_path)))
    r = run(["--opt-ml", str(opt_ml), str(script)], timeout=90)
    assert r.returncode == 0, r.stderr
    assert "backend mpi" in r.stderr
    reports = _reports(opt_ml)
    assert sorted(reports) == [0, 1]
    for rank, rep in reports.items():
        assert rep == {
            "rank": rank,
            "world": 2,
            "sum": 3.0,
            "backend": "gloo",
            "local_rank": rank,
        }


def test_decorated_script_under_plain_mpirun_finds_its_peers(tmp_path: Path) -> None:
    # Horovod-style `mpirun python train.py`, no smdist-run: the decorator must not relaunch,
    # and rank 0's MASTER_ADDR/PORT reach the others through mpi4py.
    script = write_script(tmp_path / "ddp.py", TORCH_DECORATOR.format(out=str(tmp_path)))
    e = env()
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "SMDIST_AGENT_PID"):
        e.pop(name, None)
    r = run_mpirun(script, e)
    assert r.returncode == 0, r.stdout + r.stderr
    reports = {
        int(f.stem.split("-")[1]): json.loads(f.read_text()) for f in tmp_path.glob("rank-*.json")
    }
    assert sorted(reports) == [0, 1]
    assert all(rep["sum"] == 3.0 and rep["world"] == 2 for rep in reports.values())


def test_rank_raising_under_mpi4py_fails_the_job_promptly(tmp_path: Path) -> None:
    script = write_script(tmp_path / "fail.py", MPI4PY_RAISE)
    opt_ml = make_tree(tmp_path / "opt_ml")
    # Without MPI_Abort rank 1 would wait in MPI_Finalize for rank 0, forever: the
    # timeout is the hang guard.
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2", str(script)],
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert "mpirun: rank 1 on algo-1 failed first (exit 1)" in r.stdout + r.stderr
    text = (opt_ml / "output" / "failure").read_text()
    assert text.startswith("UserScriptError: ValueError: rank 1 fails on purpose")
    assert "fail.py:5" in text


def test_rank_raising_under_torch_fails_the_job_with_its_traceback(tmp_path: Path) -> None:
    script = write_script(tmp_path / "fail.py", TORCH_RAISE)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2", str(script)],
        timeout=90,
    )
    assert r.returncode == 1, r.stderr
    assert "mpirun: rank 1 on algo-1 failed first (exit 1)" in r.stdout + r.stderr
    text = (opt_ml / "output" / "failure").read_text()
    assert text.startswith("UserScriptError: KeyError: \"missing column 'label'\"")


def test_failure_file_names_the_failing_rank_not_the_launcher(tmp_path: Path) -> None:
    script = write_script(tmp_path / "fail.py", MPI4PY_RAISE)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2", str(script)],
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.endswith("(host algo-1, rank 1, exit 1)")


def test_bad_mpi_hyperparameters_fail_with_the_file_and_field(tmp_path: Path) -> None:
    script = write_script(tmp_path / "never.py", "raise SystemExit('must not run')\n")
    for hps, field in (
        ({"sagemaker_mpi_num_of_processes_per_host": "0"}, "sagemaker_mpi_num_of_processes"),
        ({"sagemaker_mpi_custom_mpi_options": '"-x FOO'}, "sagemaker_mpi_custom_mpi_options"),
    ):
        opt_ml = make_tree(
            tmp_path / field, hyperparameters={"sagemaker_mpi_enabled": "true", **hps}
        )
        r = run(["--opt-ml", str(opt_ml), str(script)], timeout=60)
        assert r.returncode == 2, r.stderr
        text = (opt_ml / "output" / "failure").read_text()
        assert text.startswith("ConfigError: ")
        assert "hyperparameters.json" in text and field in text
        assert "must not run" not in r.stderr


# --- the pieces, with mpirun's real words -----------------------------------------------

OMPI4_EXIT = """\
-------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
-------------------------------------------------------
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[48367,1],3]
  Exit code:    7
--------------------------------------------------------------------------"""

PRRTE_EXIT = """\
--------------------------------------------------------------------------
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-algo-1-2231@1,2]
   Exit code:    9
--------------------------------------------------------------------------"""

SIGNALLED = (
    "mpirun noticed that process rank 2 with PID 4242 on node algo-2 exited on signal 9 (Killed)."
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OMPI4_EXIT, mpi.RootCause(3, "algo-2", 1, 7)),
        (PRRTE_EXIT, mpi.RootCause(2, "algo-2", 0, 9)),
        (SIGNALLED, mpi.RootCause(2, "algo-2", 0, 137, 9)),
    ],
)
def test_root_cause_from_mpiruns_report(text: str, expected: mpi.RootCause) -> None:
    hosts = [("algo-1", 2), ("algo-2", 2)]
    assert mpi.parse_root_cause(text.splitlines(), hosts) == expected


def test_relay_rebuilds_lines_that_open_mpi_split_and_interleaved() -> None:
    # What Open MPI 4 writes for unbuffered Python output from two ranks at once.
    raw = (
        b"[1,1]<stdout>:line[1,0]<stdout>:hello from 0[1,1]<stdout>: one\n"
        b"[1,0]<stdout>: still 0\n"
        b"mpirun: its own words\n"
        b"[1,2]<stderr>:smdist: rank 2 on algo-2 failed (exit 3)\n"
        b"[1,3]<stdout>:unfinished"
    )
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    relay = mpi._Relay([("algo-1", 2), ("algo-2", 2)])
    with os.fdopen(r, "rb") as src, os.fdopen(out_w, "wb") as dst:
        t = threading.Thread(target=relay.run, args=(src, dst))
        t.start()
        os.write(w, raw)
        os.close(w)
        t.join(timeout=10)
    with os.fdopen(out_r, "rb") as f:
        lines = f.read().decode().splitlines()
    assert lines == [
        "[algo-1/1] line one",
        "[algo-1/0] hello from 0 still 0",
        "mpirun: its own words",
        "[algo-2/2] smdist: rank 2 on algo-2 failed (exit 3)",
        "[algo-2/3] unfinished",
    ]
    # A rank's own word that it failed: the root cause when mpirun's report is lost.
    assert relay.first_failure == mpi.RootCause(2, "algo-2", 0, 3)


def test_mpirun_command_for_two_hosts_forwards_no_per_host_values() -> None:
    argv = mpi.mpirun_argv(
        [("algo-1", 2), ("algo-2", 2)],
        ["python", "-m", "smdist.worker.mpi_rank", "train.py"],
        interface="eth0",
        port=22,
        custom=["-x", "NCCL_DEBUG=INFO", "--mca", "btl_tcp_links", "2"],
        forward=[mpi.JOB_DIR_ENV, "PATH"],
        as_root=True,
    )
    joined = " ".join(argv)
    assert "-np 4 -H algo-1:2,algo-2:2" in joined
    assert "--mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0" in joined
    assert "--allow-run-as-root" in argv
    assert "orte_abort_on_non_zero_status 1" in joined
    assert not any(a.startswith("SM_") for a in argv)  # each host's own, from host.json
    assert argv[-4:] == ["python", "-m", "smdist.worker.mpi_rank", "train.py"]
    assert mpi.forwarded_names(["-x", "NCCL_DEBUG=INFO", "-x", "FOO"]) == ["NCCL_DEBUG", "FOO"]


def test_users_plm_rsh_args_join_smdists_ssh_arguments_not_replace_them() -> None:
    key = mpi.JobKey(Path("/run/job/ssh/id_ed25519"), "ssh-ed25519 AAAA smdist-job")
    user = ["--mca", "plm_rsh_args", "-o ServerAliveInterval=30  -v", "--mca", "btl", "self,tcp"]
    argv = mpi.mpirun_argv(
        [("algo-1", 1), ("algo-2", 1)],
        ["python", "train.py"],
        interface="eth0",
        port=2222,
        ssh_extra=f"{mpi.ssh_key_args(key)} -o Compression=yes",
        custom=user,
    )
    values = [argv[i + 2] for i, a in enumerate(argv) if argv[i + 1 : i + 2] == ["plm_rsh_args"]]
    # One value (Open MPI refuses two): the port and the job's key first (ssh keeps an
    # option's first value), then SMDIST_SSH_ARGS, then the user's.
    assert len(values) == 1, argv
    assert values[0].startswith("-p 2222 -o StrictHostKeyChecking=no"), values
    assert values[0].endswith(
        "-i /run/job/ssh/id_ed25519 -o IdentitiesOnly=yes -o Compression=yes"
        " -o ServerAliveInterval=30 -v"
    ), values
    assert "--mca btl self,tcp" in " ".join(argv)  # the user's other options are kept
    # Open MPI 5's name for it merges the same way.
    argv5 = mpi.mpirun_argv([("algo-1", 1)], ["x"], interface=None, port=22,
                            custom=["-mca", "plm_ssh_args", "-4"])  # fmt: skip
    assert "plm_ssh_args" not in argv5 and argv5[argv5.index("plm_rsh_args") + 1].endswith(" -4")


PORTS = ["-p 2222", "-p2222", "-o Port=2222", "-oPort 2222"]


@pytest.mark.parametrize(
    ("option", "given"),
    [("--mca plm_rsh_args", given) for given in PORTS]
    # Open MPI 5's flags for its runtime's and PMIx's parameters, and Open MPI 4's global one.
    + [
        (o, "-p 2222")
        for o in ("--prtemca plm_ssh_args", "-pmixmca plm_rsh_args", "-gmca plm_rsh_args")
    ],
)
def test_a_port_in_the_users_plm_rsh_args_is_refused_naming_the_way(
    tmp_path: Path, option: str, given: str
) -> None:
    custom = f"{option} '-v {given}'"
    first = _refused(tmp_path, {mpi.CUSTOM_HP: custom}, {})
    assert first.startswith(f"ConfigError: {tmp_path}/ml/input/config/hyperparameters.json: ")
    assert f"sagemaker_mpi_custom_mpi_options: {option} '-v {given}' sets" in first
    assert "set SMDIST_SSH_PORT instead" in first


def test_open_mpi_5s_prtemca_and_pmixmca_are_read_as_mca_is() -> None:
    # The command only: this machine's Open MPI 4.1 mpirun refuses --prtemca and --pmixmca
    # ("unknown option"), so no real run; the refusals above run the real agent.
    user = [
        "--prtemca", "plm_ssh_args", "-o ServerAliveInterval=30",
        "--prtemca", "plm_ssh_no_tree_spawn", "0",
        "--pmixmca", "pmix_mca_gds", "hash",
        "-gmca", "btl", "self,tcp",
        "-x", "NCCL_DEBUG",
    ]  # fmt: skip
    argv = mpi.mpirun_argv([("algo-1", 1), ("algo-2", 1)], ["x"], interface="lo", port=22,
                           custom=user)  # fmt: skip
    # The user's ssh options join smdist's (the key and port stay), as with --mca.
    assert "plm_ssh_args" not in argv
    (ssh_args,) = [argv[i + 1] for i, a in enumerate(argv) if a == "plm_rsh_args"]
    assert ssh_args.startswith("-p 22 ") and ssh_args.endswith(" -o ServerAliveInterval=30")
    # A parameter the user sets replaces smdist's, under either Open MPI's name for it.
    assert "plm_rsh_no_tree_spawn" not in argv and "^openib" not in argv
    tail = argv[argv.index("lo", argv.index("oob_tcp_if_include")) + 1 :]
    assert tail == [*user[3:], "x"]  # the rest as given, after smdist's
    described = mpi.describe_custom(user)
    assert described.startswith(
        "--prtemca plm_ssh_args '-o ServerAliveInterval=30' (after smdist's ssh arguments) "
        "--prtemca plm_ssh_no_tree_spawn 0 (in place of smdist's 1) "
        "--pmixmca pmix_mca_gds hash -gmca btl self,tcp (in place of smdist's ^openib)"
    ), described


@pytest.mark.parametrize("given", PORTS)
def test_a_port_in_smdist_ssh_args_is_refused_naming_the_way(tmp_path: Path, given: str) -> None:
    # Refused on one host too: a setting that fails only once the job has two hosts is worse.
    first = _refused(tmp_path, {}, {"SMDIST_SSH_ARGS": f"-v {given}"})
    assert first.startswith(f"ConfigError: SMDIST_SSH_ARGS='-v {given}' sets the ssh port"), first
    assert first.endswith("set SMDIST_SSH_PORT instead (host algo-1)"), first


@pytest.mark.parametrize("given", ["0", "ssh", "70000", "22 "])
def test_a_bad_smdist_ssh_port_is_refused_at_the_start_on_every_host(
    tmp_path: Path, given: str
) -> None:
    # Before the hosts meet, as SMDIST_SSH_ARGS: not once the rank map is made (a host that
    # waits for the others first would wait for nothing).
    script = write_script(tmp_path / "never.py", "raise SystemExit('must not run')\n")
    opt_ml = make_tree(tmp_path / "ml", hyperparameters={"sagemaker_mpi_enabled": "true"})
    r = run(["--opt-ml", str(opt_ml), str(script)], timeout=60, SMDIST_SSH_PORT=given)
    assert r.returncode == 2, r.stderr
    assert "rank map:" not in r.stderr and "Traceback" not in r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first == (
        f"ConfigError: SMDIST_SSH_PORT: expected a TCP port (1-65535), got {given!r} (host algo-1)"
    ), first


@pytest.mark.parametrize(
    "given",
    [
        "--mca plm_rsh_agent rsh",
        "-mca orte_rsh_agent '/opt/launch.sh --fast'",
        "--prtemca plm_ssh_agent rsh",  # Open MPI 5's flag and name
    ],
)
def test_an_rsh_agent_that_is_not_ssh_is_refused_naming_the_way(tmp_path: Path, given: str) -> None:
    # It would replace smdist's ssh, and with it the job's key and port: nothing would open
    # the other hosts' job sshd (one host shows it: mpirun there uses no agent at all).
    first = _refused(tmp_path, {mpi.CUSTOM_HP: f"--mca btl self,tcp {given}"}, {})
    flag, name, value = given.split(" ", 2)
    assert f"sagemaker_mpi_custom_mpi_options: {flag} {name} {value.strip(chr(39))!r}: " in first
    assert "smdist starts the ranks over its own ssh (the job's key, SMDIST_SSH_PORT)" in first
    assert first.endswith("with --mca plm_rsh_args or SMDIST_SSH_ARGS (host algo-1)"), first


def _refused(tmp_path: Path, hyperparameters: dict[str, str], environ: dict[str, str]) -> str:
    """An MPI job that must fail before its script runs: the first line of its failure file."""
    script = write_script(tmp_path / "never.py", "raise SystemExit('must not run')\n")
    opt_ml = make_tree(
        tmp_path / "ml", hyperparameters={"sagemaker_mpi_enabled": "true", **hyperparameters}
    )
    r = run(["--opt-ml", str(opt_ml), str(script)], timeout=60, **environ)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "must not run" not in r.stderr
    return (opt_ml / "output" / "failure").read_text().splitlines()[0]


def test_each_rank_gets_its_own_hosts_values_and_explicit_x_wins() -> None:
    launched = {  # what orted hands a rank on algo-2: the master's -x values
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "NCCL_DEBUG": "INFO",
        mpi_rank.FORWARDED_ENV: "NCCL_DEBUG",
    }
    host = {
        "host": "algo-2",
        "node_rank": 1,
        "env": {"SM_CURRENT_HOST": "algo-2", "NCCL_DEBUG": "WARN", "MASTER_ADDR": "10.0.0.1"},
    }
    env = mpi_rank.rank_environment(launched, host, "/tmp/job/algo-2")
    assert env["SM_CURRENT_HOST"] == "algo-2"
    assert env["NCCL_DEBUG"] == "INFO"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert (env["LOCAL_WORLD_SIZE"], env["NODE_RANK"], env["MASTER_ADDR"]) == ("2", "1", "10.0.0.1")
    assert env["SMDIST_ERROR_FILE"] == "/tmp/job/algo-2/rank-3.error.json"


def test_ensure_sshd_starts_a_real_sshd_once(tmp_path: Path) -> None:
    # The opt-out (SMDIST_SSH_JOB_KEY=0): any sshd on the port will do.
    port = free_port()
    try:
        assert mpi.ensure_sshd(port) == f"started sshd on port {port}"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(4) == b"SSH-"
        assert mpi.ensure_sshd(port) == f"sshd already answering on port {port}"
    finally:
        pid_file = mpi.sshd_pid_file(port)
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)


# --- the per-job ssh key ----------------------------------------------------------------


def _ssh(port: int, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``ssh root@127.0.0.1 true`` with ``key`` and no other identity: 0 when let in."""
    return subprocess.run(
        [
            "ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", *extra,
            "root@127.0.0.1", "true",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_job_key_is_fresh_private_and_one_ed25519_line(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a, b = mpi.make_job_key(tmp_path / "a"), mpi.make_job_key(tmp_path / "b")
    assert a.public != b.public  # a new pair for every job
    assert a.public.startswith("ssh-ed25519 ") and a.public.endswith(" smdist-job")
    assert "\n" not in a.public
    assert a.private.parent == tmp_path / "a" / "ssh"
    assert a.private.parent.stat().st_mode & 0o777 == 0o700
    assert a.private.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" in a.private.read_text()
    args = mpi.ssh_key_args(a)
    assert args == f"-i {a.private} -o IdentitiesOnly=yes"
    # The master's word through the store: the public half only, validated on arrival.
    assert mpi.parse_ssh_key_word(json.dumps({"public_key": a.public})) == a.public
    assert mpi.parse_ssh_key_word(json.dumps({"public_key": None})) is None
    for bad in ("", "[]", '{"public_key": "ssh-rsa AAAA"}', '{"public_key": "x\\nssh-ed25519 A"}'):
        with pytest.raises(RendezvousFailed, match="mpi/ssh-key: the master's"):
            mpi.parse_ssh_key_word(bad)


def test_missing_or_broken_ssh_keygen_is_one_line_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as missing:
        mpi.make_job_key(tmp_path, path=str(empty))
    assert str(missing.value) == (
        f"the MPI backend's per-job ssh key: ssh-keygen not found (PATH={empty}): install "
        "openssh-client in the image (launchers/install-mpi.sh), or set SMDIST_SSH_JOB_KEY=0 "
        "to use your own keys"
    )
    fake = write_script(
        empty / "ssh-keygen", "#!/bin/sh\necho 'ssh-keygen: no entropy' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    with pytest.raises(ConfigError) as broken:
        mpi.make_job_key(tmp_path, path=str(empty))
    assert str(broken.value) == (
        f"the MPI backend's per-job ssh key: {fake} failed in {tmp_path / 'ssh'}: "
        "ssh-keygen: no entropy"
    )
    assert not (tmp_path / "ssh").exists()  # nothing half-made left behind


def test_job_sshd_admits_the_job_key_only_and_goes_at_job_end(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "job").mkdir()
    (tmp_path / "other").mkdir()
    job = mpi.make_job_key(tmp_path / "job")
    other = mpi.make_job_key(tmp_path / "other")  # e.g. a key baked into the image
    try:
        keys = mpi.install_job_key(port, job.public)
        assert keys.read_text() == f"restrict {job.public}\n"
        assert keys.stat().st_mode & 0o777 == 0o600
        assert keys.parent.stat().st_mode & 0o777 == 0o700
        said = mpi.ensure_sshd(port, authorized_keys=keys)
        assert said == f"started the job's sshd on port {port} (the job's key only)"
        assert _ssh(port, job.private).returncode == 0
        # Another key, even one root's own authorized_keys lists, is not the job's.
        refused = _ssh(port, other.private)
        assert refused.returncode == 255 and "Permission denied" in refused.stderr
        # A restart: the same sshd, the next attempt's key.
        assert mpi.install_job_key(port, other.public) == keys
        assert mpi.ensure_sshd(port, authorized_keys=keys).startswith("the job's sshd already")
        assert _ssh(port, other.private).returncode == 0
        assert _ssh(port, job.private).returncode == 255
    finally:
        stopped = mpi.stop_job_sshd(port)
    assert stopped and not mpi.sshd_job_dir(port).exists()
    wait_for(lambda: not mpi._ssh_banner("127.0.0.1", port, 0.5), 10, "the job sshd to stop")


def test_an_sshd_smdist_did_not_start_is_not_trusted_with_the_job(tmp_path: Path) -> None:
    port = free_port()
    try:
        mpi.ensure_sshd(port)  # as if the image's entrypoint had started one
        keys = mpi.install_job_key(port, mpi.make_job_key(tmp_path).public)
        with pytest.raises(ConfigError, match=rf"port {port}: an sshd that smdist did not start"):
            mpi.ensure_sshd(port, authorized_keys=keys)
    finally:
        os.kill(int(mpi.sshd_pid_file(port).read_text().split()[0]), signal.SIGTERM)
        mpi.stop_job_sshd(port)


def test_the_published_key_needs_the_jobs_secret(tmp_path: Path) -> None:
    from smdist.agent.store import StoreClient, StoreRefused, StoreServer

    server = StoreServer(0, secret=b"s" * 32)
    try:
        master = StoreClient("127.0.0.1", server.port, 5, "the job", secret=b"s" * 32)
        master.set(mpi.SSH_KEY_KEY, json.dumps({"public_key": "ssh-ed25519 AAAA smdist-job"}))
        master.close()
        with pytest.raises(StoreRefused):
            StoreClient("127.0.0.1", server.port, 5, "the job", secret=b"x" * 32)
        assert server.local_get(mpi.SSH_KEY_KEY) is not None  # nobody replaced it either
    finally:
        server.close()


# --- two hosts on one machine, mpirun over real ssh -------------------------------------
# algo-2 is 127.0.0.2: Open MPI takes it for another machine and starts its ranks through
# ssh, into the job sshd algo-2's agent starts (the per-job key the master made and handed
# over through the store: nothing to set up here but a free port).


@pytest.fixture
def job_ssh() -> Iterator[dict[str, str]]:
    port = free_port()
    try:
        yield {"SMDIST_SSH_PORT": str(port)}
    finally:
        # The agent stops its job sshd itself (asserted in the test); a killed one cannot.
        mpi.stop_job_sshd(port)


def _assert_job_ssh_cleaned_up(port: str, *logs: str) -> None:
    assert not mpi.sshd_job_dir(int(port)).exists()
    wait_for(lambda: not mpi._ssh_banner("127.0.0.1", int(port), 0.5), 10, "the job sshd to stop")
    for text in logs:
        assert "PRIVATE KEY" not in text and "AAAAC3NzaC1lZDI1NTE5" not in text


LOOPBACK = {"network_interface_name": "lo"}  # mpirun's interface options name it
# Two "hosts" on one machine must not share memory segments: TCP only (as custom options).
TCP_ONLY = {"sagemaker_mpi_custom_mpi_options": "--mca btl self,tcp"}


def _start_two_hosts(
    tmp_path: Path,
    script: Path,
    ssh_env: dict[str, str],
    *flags: str,
    hyperparameters: dict[str, str] = TCP_ONLY,
) -> dict[str, subprocess.Popen[str]]:
    return start_hosts(
        tmp_path,
        ["algo-1", "algo-2"],
        script,
        *("--backend", "mpi", "--nproc-per-host", "2", *flags),
        addresses={"algo-1": "127.0.0.1", "algo-2": "127.0.0.2"},
        hyperparameters=hyperparameters,
        resource_extra=LOOPBACK,
        extra_env=ssh_env,
    )


def _two_hosts(
    tmp_path: Path,
    script: Path,
    ssh_env: dict[str, str],
    hyperparameters: dict[str, str] = TCP_ONLY,
) -> dict[str, Any]:
    procs = _start_two_hosts(tmp_path, script, ssh_env, hyperparameters=hyperparameters)
    out = {}
    for h, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=45)  # the hang guard (a run takes ~5 s)
        finally:
            p.kill()
        out[h] = (p.returncode, stdout, stderr)
    return out


def test_two_hosts_over_ssh_each_rank_sees_its_own_host(
    tmp_path: Path, job_ssh: dict[str, str]
) -> None:
    script = write_script(tmp_path / "allreduce.py", MPI4PY_ALLREDUCE)
    # ssh options of the user's own: merged with the job key's, which still opens algo-2.
    # An ssh binary of the user's as the agent: it runs with smdist's arguments (the key).
    ssh = shutil.which("ssh")
    assert ssh is not None
    custom = (
        TCP_ONLY[mpi.CUSTOM_HP] + " --mca plm_rsh_args '-o ServerAliveInterval=30'"
        f" --mca plm_rsh_agent {ssh}"
    )
    results = _two_hosts(tmp_path, script, job_ssh, {mpi.CUSTOM_HP: custom})
    for host, (code, _, stderr) in results.items():
        assert code == 0, f"{host}: {stderr}"
    (logged,) = [ln for ln in results["algo-1"][2].splitlines() if "] mpirun: " in ln]
    assert logged.count("plm_rsh_args") == 1 and "IdentitiesOnly=yes -o ServerAlive" in logged
    assert logged.count("plm_rsh_agent") == 1 and f"--mca plm_rsh_agent {ssh} " in logged
    # Where each of the user's options went, in one line before mpirun's.
    assert (
        "MPI: from sagemaker_mpi_custom_mpi_options: --mca btl self,tcp (in place of smdist's "
        "^openib) --mca plm_rsh_args '-o ServerAliveInterval=30' (after smdist's ssh arguments)"
        f" --mca plm_rsh_agent {ssh} (with smdist's ssh arguments)"
    ) in results["algo-1"][2]
    reports = {**_reports(tmp_path / "algo-1"), **_reports(tmp_path / "algo-2")}
    assert sorted(reports) == [0, 1, 2, 3]
    for rank, rep in reports.items():
        assert rep["size"] == 4 and rep["sum"] == 1 + 2 + 3 + 4
        host = "algo-1" if rank < 2 else "algo-2"
        # Written under that host's own /opt/ml, with that host's SM_CURRENT_HOST.
        assert (tmp_path / host / "output" / "data" / f"rank-{rank}.json").exists()
        assert rep["env"]["SM_CURRENT_HOST"] == host
        assert rep["env"]["NODE_RANK"] == str(rank // 2)
        assert rep["env"]["LOCAL_RANK"] == str(rank % 2)
    assert "[algo-2/3] rank 3 says hello" in results["algo-1"][1]
    # Over the per-job key; at the end algo-2's job sshd and key file are gone, no key logged.
    assert "a new ssh key for this job, to algo-2 through the store" in results["algo-1"][2]
    assert "started the job's sshd on port" in results["algo-2"][2]
    assert "stopped the job's sshd on port" in results["algo-2"][2]
    _assert_job_ssh_cleaned_up(job_ssh["SMDIST_SSH_PORT"], *(o + e for _, o, e in results.values()))


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The opt-out: an sshd and key of the user's own (loopback only), no per-job key."""
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for key in ("host_key", "id"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n"
        f"HostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
    )
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    subprocess.run([sshd, "-f", str(d / "sshd_config"), "-E", str(d / "log")], check=True)
    try:
        yield {
            "SMDIST_SSH_PORT": str(port),
            "SMDIST_SSH_ARGS": f"-i {d / 'id'}",
            "SMDIST_SSH_JOB_KEY": "0",
        }
    finally:
        os.kill(int((d / "sshd.pid").read_text().split()[0]), signal.SIGTERM)


def test_opt_out_of_the_job_key_uses_the_users_own_sshd_and_key(
    tmp_path: Path, own_sshd: dict[str, str]
) -> None:
    script = write_script(tmp_path / "allreduce.py", MPI4PY_ALLREDUCE)
    results = _two_hosts(tmp_path, script, own_sshd)
    for host, (code, _, stderr) in results.items():
        assert code == 0, f"{host}: {stderr}"
    assert "no per-job ssh key (SMDIST_SSH_JOB_KEY=0)" in results["algo-1"][2]
    assert f"sshd already answering on port {own_sshd['SMDIST_SSH_PORT']}" in results["algo-2"][2]
    assert sorted({**_reports(tmp_path / "algo-1"), **_reports(tmp_path / "algo-2")}) == [
        0,
        1,
        2,
        3,
    ]


def test_a_broken_ssh_keygen_fails_every_host_naming_it(
    tmp_path: Path, job_ssh: dict[str, str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = write_script(
        bin_dir / "ssh-keygen", "#!/bin/sh\necho 'ssh-keygen: no entropy' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    script = write_script(tmp_path / "allreduce.py", MPI4PY_ALLREDUCE)
    results = _two_hosts(tmp_path, script, {**job_ssh, "PATH": path})
    for host, (code, _, stderr) in results.items():
        assert code == 2, f"{host}: {stderr}"
        assert "Traceback" not in stderr, stderr
        first = (tmp_path / host / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith(
            f"ConfigError: the MPI backend's per-job ssh key: {fake} failed in /"
        ), (host, first)
        assert first.endswith("/ssh: ssh-keygen: no entropy (host algo-1)"), (host, first)
    assert not mpi._ssh_banner("127.0.0.1", int(job_ssh["SMDIST_SSH_PORT"]), 0.5)


def test_two_hosts_a_rank_raising_on_algo_2_fails_every_host(
    tmp_path: Path, job_ssh: dict[str, str]
) -> None:
    script = write_script(tmp_path / "fail.py", MPI4PY_RAISE.replace("== 1", "== 3"))
    results = _two_hosts(tmp_path, script, job_ssh)
    for host, (code, _, stderr) in results.items():
        assert code == 1, f"{host}: {stderr}"
        text = (tmp_path / host / "output" / "failure").read_text()
        first = text.splitlines()[0]
        assert first.startswith("UserScriptError: ValueError: rank 1 fails on purpose"), text
        assert first.endswith("(host algo-2, rank 3, exit 1)"), text
    out = results["algo-1"][1] + results["algo-1"][2]
    assert "mpirun: rank 3 on algo-2 failed first (exit 1)" in out


def test_simulated_two_hosts_under_mpi_each_rank_sees_its_own_host(tmp_path: Path) -> None:
    # --simulate maps every host to 127.0.0.1: mpirun starts all ranks itself, no ssh.
    script = write_script(tmp_path / "allreduce.py", MPI4PY_ALLREDUCE)
    work = tmp_path / "work"
    r = run(["--simulate", "2x2", "--backend", "mpi", "--work-dir", str(work), str(script)], 45)
    assert r.returncode == 0, r.stderr
    assert "no ssh needed" in r.stderr
    reports = {**_reports(work / "algo-1"), **_reports(work / "algo-2")}
    assert sorted(reports) == [0, 1, 2, 3]
    for rank, rep in reports.items():
        assert rep["sum"] == 1 + 2 + 3 + 4
        host = "algo-1" if rank < 2 else "algo-2"
        assert (work / host / "output" / "data" / f"rank-{rank}.json").exists()
        assert rep["env"]["SM_CURRENT_HOST"] == host
        assert (rep["env"]["LOCAL_RANK"], rep["env"]["LOCAL_WORLD_SIZE"]) == (str(rank % 2), "2")


SLEEPER = """
import os, time
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
with open(os.path.join({out!r}, f"pid-{{rank}}"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(300)
"""


def test_two_hosts_master_killed_worker_host_exits_and_no_rank_survives(
    tmp_path: Path, job_ssh: dict[str, str]
) -> None:
    script = write_script(tmp_path / "sleep.py", SLEEPER.format(out=str(tmp_path)))
    procs = _start_two_hosts(tmp_path, script, job_ssh, "--heartbeat-timeout", "3")
    try:
        pids = wait_for(
            lambda: read_pids([tmp_path / f"pid-{r}" for r in range(4)]),
            45,
            "all four ranks to start",
        )
        procs["algo-1"].kill()  # the master's container is gone, agent and all
        _, stderr = procs["algo-2"].communicate(timeout=30)  # heartbeat 3 s: the hang guard
        assert procs["algo-2"].returncode != 0, stderr
        assert (
            "HostLost: host algo-1 stopped responding"
            in (tmp_path / "algo-2" / "output" / "failure").read_text()
        )
        # Ranks die with their mpirun / orted on both hosts: nothing is orphaned.
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "every rank to exit")
    finally:
        for p in procs.values():
            p.kill()
            p.communicate()


def test_master_gives_up_on_a_host_whose_sshd_never_answers() -> None:
    closed = free_port()  # nothing listens there
    with pytest.raises(RendezvousFailed, match=r"sshd did not become ready within 1 s on algo-2"):
        mpi._wait_sshd_ready(None, ["algo-2"], {"algo-2": "127.0.0.1"}, closed, 1.0)


MPI4PY_SEGFAULT = """
import ctypes, os
from mpi4py import MPI
MPI.COMM_WORLD.Barrier()
if MPI.COMM_WORLD.Get_rank() == 1:
    ctypes.string_at(0)  # a native crash: no Python traceback, no error file
MPI.COMM_WORLD.Barrier()
"""


def test_a_rank_killed_by_a_signal_is_named_not_the_launcher(tmp_path: Path) -> None:
    script = write_script(tmp_path / "segv.py", MPI4PY_SEGFAULT)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2", str(script)],
        timeout=60,
    )
    assert r.returncode == 128 + signal.SIGSEGV, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("Killed:") and "SIGSEGV" in first, first
    assert first.endswith("(host algo-1, rank 1, exit 139)"), first


def test_mpi_backend_starts_the_layout_the_hosts_agreed(tmp_path: Path) -> None:
    # The hyperparameter's count decides this host's share before the rendezvous; mpirun
    # then starts exactly what the hosts agreed, never the hyperparameter again.
    from smdist import config as cfg
    from smdist.agent import backends
    from smdist.agent.backends.base import Launch
    from smdist.agent.entry import resolve
    from smdist.agent.rendezvous import JobPlan, LocalCoordinator
    from smdist.agent.topology import build_layout

    hp = {"sagemaker_mpi_enabled": "true", "sagemaker_mpi_num_of_processes_per_host": "3"}
    config = cfg.load(cfg.Paths(make_tree(tmp_path / "opt_ml", hyperparameters=hp)))
    backend = backends.select(None, config)
    assert backend.name == "mpi"
    assert backend.processes_per_host("auto", 0) == (3, mpi.NPROC_HP)
    assert backend.processes_per_host("2", 0) == (2, "--nproc-per-host")
    script = write_script(tmp_path / "x.py", "pass\n")
    plan = JobPlan(build_layout({"algo-1": 2}), "127.0.0.1", free_port())
    launch = Launch(resolve([str(script)], None), dict(os.environ), {}, tmp_path)
    (spec,) = backend.worker_specs(launch, plan, LocalCoordinator())
    assert "-np 2 -H localhost:2" in " ".join(spec.argv)


# --- restarts and hangs under MPI ---------------------------------------------------------

MPI4PY_FAILS_ONCE = """
import json, os
from mpi4py import MPI
comm = MPI.COMM_WORLD
comm.Barrier()
count = os.environ["SMDIST_RESTART_COUNT"]
if count == "0" and comm.Get_rank() == 1:
    raise RuntimeError("rank 1 fails on the first attempt only")
comm.Barrier()
keys = ["SMDIST_RESTART_COUNT", "SMDIST_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS", "SM_CURRENT_HOST"]
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{comm.Get_rank()}.json")
with open(out, "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""


def _check_restarted_once(reports: dict[int, dict], ranks: int) -> None:
    assert sorted(reports) == list(range(ranks))
    for rep in reports.values():
        assert rep["SMDIST_RESTART_COUNT"] == rep["TORCHELASTIC_RESTART_COUNT"] == "1", rep
        assert rep["SMDIST_MAX_RESTARTS"] == rep["TORCHELASTIC_MAX_RESTARTS"] == "1", rep


def test_a_rank_failing_once_under_mpi_is_restarted_and_the_job_succeeds(tmp_path: Path) -> None:
    script = write_script(tmp_path / "once.py", MPI4PY_FAILS_ONCE)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2",
         "--max-restarts", "1", str(script)],
        timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "attempt 1 failed (UserScriptError: RuntimeError: rank 1 fails on the first" in (
        r.stderr
    )
    assert "restart 1 of 1 on every host" in r.stderr
    _check_restarted_once(_reports(opt_ml), 2)
    assert not (opt_ml / "output" / "failure").exists()


def test_simulated_two_hosts_under_mpi_restart_every_rank(tmp_path: Path) -> None:
    # mpirun on the master restarts every host's ranks; the other host meets it again.
    script = write_script(tmp_path / "once.py", MPI4PY_FAILS_ONCE)
    work = tmp_path / "work"
    r = run(
        ["--simulate", "2x2", "--backend", "mpi", "--work-dir", str(work), "--max-restarts", "1",
         str(script)],
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    reports = {**_reports(work / "algo-1"), **_reports(work / "algo-2")}
    _check_restarted_once(reports, 4)
    for rank, rep in reports.items():
        assert rep["SM_CURRENT_HOST"] == ("algo-1" if rank < 2 else "algo-2")


MPI4PY_HANGS = """
import os, time
from mpi4py import MPI
import smdist

comm = MPI.COMM_WORLD
STUCK = int(os.environ["STUCK_RANK"])

def next_batch(step):
    if step == 3 and comm.Get_rank() == STUCK and os.environ["SMDIST_RESTART_COUNT"] == "0":
        time.sleep(3600)  # a deadlocked data loader

for step in range(6):
    next_batch(step)
    smdist.progress()  # no decorator: the script counts its steps itself
    comm.allreduce(step)  # the others wait here for the stuck rank
open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{comm.Get_rank()}.json"), "w").write(
    '{"done": true}'
)
"""


def test_a_hang_under_mpi_names_the_stuck_rank_with_its_stack(tmp_path: Path) -> None:
    script = write_script(tmp_path / "hangs.py", MPI4PY_HANGS)
    opt_ml = make_tree(tmp_path / "opt_ml")
    r = run(
        ["--opt-ml", str(opt_ml), "--backend", "mpi", "--nproc-per-host", "2",
         "--hang-timeout", "4", str(script)],
        timeout=120,
        STUCK_RANK="1",
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    first = (opt_ml / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("Hang: rank 1 on algo-1 made no progress for"), first
    assert "stuck at hangs.py:11 in next_batch" in first, first
    # Its stack went to the log from the file the rank dumped it into, named by host/rank.
    assert any(
        ln.startswith("[algo-1/1] ") and "in next_batch" in ln for ln in r.stderr.splitlines()
    ), r.stderr


def test_simulated_two_hosts_under_mpi_a_hang_on_the_other_host_is_restarted(
    tmp_path: Path,
) -> None:
    # Rank 3 runs on algo-2, whose agent starts no worker (mpirun on algo-1 starts them all):
    # algo-2's agent still reads its ranks' steps, finds the hang and names the rank.
    script = write_script(tmp_path / "hangs.py", MPI4PY_HANGS)
    work = tmp_path / "work"
    r = run(
        ["--simulate", "2x2", "--backend", "mpi", "--work-dir", str(work), "--hang-timeout", "4",
         "--max-restarts", "1", str(script)],
        timeout=180,
        STUCK_RANK="3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "attempt 1 failed (Hang: rank 3 on algo-2 made no progress for" in r.stderr
    assert "stuck at hangs.py:11 in next_batch" in r.stderr
    reports = {**_reports(work / "algo-1"), **_reports(work / "algo-2")}
    assert sorted(reports) == [0, 1, 2, 3]
