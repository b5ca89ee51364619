"""One MPI rank's wrapper: ``python -m smdist.worker.mpi_rank ENTRY_ARGV...``.

mpirun starts it on every host with Open MPI's variables and the job directory's path. It
takes this host's environment from the job directory (``host.json``, written by this host's
agent), maps the MPI world to RANK / LOCAL_RANK / WORLD_SIZE / ..., and execs the entry,
so the rank sees what a torch-backend worker on the same host would see.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smdist import contract
from smdist.torchrun_env import rank_variables
from smdist.worker import environment

JOB_DIR_ENV = contract.MPI_JOB_DIR_ENV
FORWARDED_ENV = contract.MPI_FORWARDED_ENV
HOSTS_ENV = contract.MPI_HOSTS_ENV
HOST_FILE = contract.RunDir.HOST_FILE


def host_dir(job_dir: Path, environ: Mapping[str, str]) -> tuple[Path, dict[str, str]]:
    """This rank's host's directory: the only one on this machine, or (hosts sharing a
    machine, a simulation) the host mpirun placed the rank on, with the local rank and
    size on that host (Open MPI counts one machine as one node)."""
    found = [p for p in job_dir.iterdir() if (p / HOST_FILE).is_file()]
    if len(found) == 1:
        return found[0], {}
    hosts = contract.parse_mpi_hosts(environ.get(HOSTS_ENV, ""))
    host, local = contract.place(hosts, environment.OpenMPI(environ).rank)
    size = dict(hosts).get(host, 1)
    return job_dir / host, {"LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(size)}


def rank_environment(
    environ: Mapping[str, str], host: Mapping[str, Any], host_dir: str
) -> dict[str, str]:
    """This host's worker environment, Open MPI's own variables, and the rank variables."""
    forwarded = {n for n in environ.get(FORWARDED_ENV, "").split(",") if n}
    env = dict(environ)
    for name, value in dict(host.get("env") or {}).items():
        if name not in forwarded:  # an explicit -x NAME wins over the host's own value
            env[name] = str(value)
    started = environment.OpenMPI(environ)
    env.update(
        {
            **torch_variables(started),
            "NODE_RANK": str(host.get("node_rank", 0)),
            "GROUP_RANK": str(host.get("node_rank", 0)),
            contract.ERROR_FILE_ENV: str(contract.RunDir(Path(host_dir)).error_file(started.rank)),
        }
    )
    env.update(
        rank_variables(
            host.get("env") or {},
            rank=env["RANK"],
            world_size=env["WORLD_SIZE"],
            error_file=env[contract.ERROR_FILE_ENV],
        )
    )
    return env


def torch_variables(started: environment.Environment) -> dict[str, str]:
    """An MPI rank's place in the world, in torch's variables."""
    return {
        "RANK": str(started.rank),
        "LOCAL_RANK": str(started.local_rank or 0),
        "WORLD_SIZE": str(started.world_size),
        "LOCAL_WORLD_SIZE": str(started.local_world_size),
    }


def world_from_mpi(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, ... for a script ``mpirun`` started without smdist's wrapper
    (Horovod-style ``mpirun python train.py``, Open MPI or MPICH/Intel MPI); empty when not
    under mpirun or already set.

    Without MASTER_ADDR/MASTER_PORT, rank 0 picks them and mpi4py broadcasts them.
    """
    started = environment.detect(environ)
    if not isinstance(started, environment.MpiEnvironment):
        return {}
    env = torch_variables(started)
    if "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        return env
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "started by mpirun without MASTER_ADDR/MASTER_PORT: install mpi4py "
            "(pip install 'smdist[mpi]') or pass -x MASTER_ADDR -x MASTER_PORT"
        ) from None
    address = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            address = (socket.gethostname(), s.getsockname()[1])
    host, port = MPI.COMM_WORLD.bcast(address, root=0)
    env["MASTER_ADDR"], env["MASTER_PORT"] = str(host), str(port)
    return env


def _abort_mpi(code: int) -> None:
    """If the entry initialised MPI, abort the world: MPI_Finalize at exit would wait for
    ranks that wait for this one (a hang instead of a failure)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return
    try:
        if not mpi.Is_initialized() or mpi.Is_finalized():
            return
    except Exception:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(code)


def _failed(code: int) -> None:
    rank = os.environ.get("RANK", "?")
    host = os.environ.get("SM_CURRENT_HOST", socket.gethostname())
    sys.stderr.write(contract.rank_failed_line(rank, host, code) + "\n")
    sys.stderr.flush()
    _abort_mpi(code)


def _run_python(args: list[str]) -> None:
    """The bootstrap in this process, so an uncaught exception can abort the MPI world."""
    from smdist.worker import bootstrap

    try:
        bootstrap.main(args)
    except SystemExit as exc:
        code = exc.code
        if code not in (None, 0):
            if not isinstance(code, int):
                sys.stderr.write(f"{code}\n")
                code = 1
            _failed(code)
        raise
    except BaseException:
        traceback.print_exc()
        _failed(1)
        raise SystemExit(1) from None


def _progress_files(env: dict[str, str], host_dir: contract.RunDir) -> None:
    """What this host's agent watches for ``--hang-timeout`` and step rates: the step counter
    it made for this rank, where SIGUSR1 dumps the stacks, and this process's pid (the
    bootstrap runs in it, so SIGUSR1 reaches faulthandler)."""
    rank = env["RANK"]
    steps = host_dir.steps_file(rank)
    if not steps.is_file():
        return  # an agent that does not watch its ranks
    env[contract.STEPS_FILE_ENV] = str(steps)
    env[contract.STACKS_FILE_ENV] = str(host_dir.stacks_file(rank))
    with contextlib.suppress(OSError):
        host_dir.pid_file(rank).write_text(str(os.getpid()), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write("usage: python -m smdist.worker.mpi_rank PROGRAM [ARGS...]\n")
        raise SystemExit(2)
    parent = os.getppid()
    # Die with mpirun / orted, even when they are SIGKILLed: no orphaned rank.
    if not contract.die_with_parent(parent):
        raise SystemExit(1)
    where = socket.gethostname()
    job_dir = os.environ.get(JOB_DIR_ENV)
    if not environment.OpenMPI.detect(os.environ) or not job_dir:
        sys.stderr.write(
            f"smdist: mpi_rank on {where} needs OMPI_COMM_WORLD_RANK and {JOB_DIR_ENV} "
            "(it is started by smdist's mpirun, not by hand)\n"
        )
        raise SystemExit(2)
    path = Path(job_dir) / HOST_FILE
    try:
        where_dir, local = host_dir(Path(job_dir), os.environ)
        path = where_dir / HOST_FILE
        host = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sys.stderr.write(
            f"smdist: {path} on {where} cannot be read ({exc}): is smdist's agent running "
            "on this host (same command on every host)?\n"
        )
        raise SystemExit(2) from None
    env = rank_environment(os.environ, host, str(path.parent))
    env.update(local)
    if args[:3] == [sys.executable, "-m", "smdist.worker.bootstrap"]:
        _progress_files(env, contract.RunDir(path.parent))
        os.environ.clear()
        os.environ.update(env)
        _run_python(args[3:])
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(args[0], args, env)
    except OSError as exc:
        sys.stderr.write(f"smdist: cannot start {args[0]} on {where}: {exc.strerror or exc}\n")
        raise SystemExit(127) from None


if __name__ == "__main__":
    main()
