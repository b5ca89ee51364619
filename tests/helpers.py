"""Shared test helpers: /opt/ml trees, running the real agent, awaiting files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SMDIST = [sys.executable, "-m", "smdist.agent.launch"]
TRAIN = [
    sys.executable,
    "-c",
    "import sys; from smdist.agent.cli import train_main; sys.exit(train_main())",
]


def make_tree(
    root: Path,
    current_host: str = "algo-1",
    hosts: Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    channels: Mapping[str, Any] | None = None,
    resource_extra: Mapping[str, Any] | None = None,
) -> Path:
    """An /opt/ml tree as SageMaker writes it (hyperparameter values as strings)."""
    cfg = root / "input" / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    resource = {"current_host": current_host, "hosts": list(hosts or [current_host])}
    resource.update(resource_extra or {})
    (cfg / "resourceconfig.json").write_text(json.dumps(resource))
    if hyperparameters is not None:
        (cfg / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    if channels is not None:
        (cfg / "inputdataconfig.json").write_text(json.dumps(channels))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("SMDIST_OPT_ML", None)
    e["PYTHONPATH"] = str(REPO)
    e.update(extra)
    return e


def run(
    args: Sequence[str], timeout: float = 120, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """Run the real agent to completion (the timeout only catches a hang)."""
    return subprocess.run(
        [*SMDIST, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(**extra_env),
        cwd=REPO,
    )


def start(args: Sequence[str], **extra_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SMDIST, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(**extra_env),
        cwd=REPO,
    )


def start_hosts(
    tmp_path: Path,
    hosts: Sequence[str],
    script: Path,
    *flags: str,
    started: Sequence[str] | None = None,
    resolve: str = "static",
    addresses: Mapping[str, str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    resource_extra: Mapping[str, Any] | None = None,
    prepare: Callable[[str, Path], object] | None = None,
    extra_env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> dict[str, subprocess.Popen[str]]:
    """One real agent per host (a job of separate agents, as on SageMaker), each with its own
    /opt/ml tree under ``tmp_path/<host>``, sharing a rendezvous port. Every tree lists all
    ``hosts`` (and ``hyperparameters``, ``resource_extra``); only ``started`` (default all)
    get an agent. ``resolve="static"`` maps every host to ``addresses`` (default loopback,
    no DNS); else pass ``--nameserver`` flags yourself. ``prepare(host, tree)`` runs before
    that host's agent starts; ``extra_env`` is added to every agent's environment; ``port``:
    the rendezvous port (default a free one)."""
    port = port or free_port()
    where = addresses or {h: "127.0.0.1" for h in hosts}
    how = ["--host-addresses", ",".join(f"{h}={a}" for h, a in where.items())]
    if resolve != "static":
        how = []
    agents = {}
    for h in started if started is not None else hosts:
        tree = make_tree(tmp_path / h, h, hosts, hyperparameters, resource_extra=resource_extra)
        if prepare is not None:
            prepare(h, tree)
        args = ["--opt-ml", str(tree), "--rdzv-port", str(port), *how, *flags, str(script)]
        agents[h] = start(args, **(extra_env or {}))
    return agents


def run_mpirun(
    script: Path, environ: Mapping[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """``mpirun -np 2 python script``, no smdist-run (as Horovod users start a job), allowed
    to run as root; ``environ`` is the whole environment."""
    mpirun = shutil.which("mpirun")
    assert mpirun is not None, "Open MPI is missing: run launchers/install-mpi.sh"
    e = {**environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return subprocess.run(
        [mpirun, "-np", "2", "--bind-to", "none", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
        cwd=REPO,
    )


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Await a condition the test cannot be told about directly (a file a worker writes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read_pids(paths: Sequence[Path]) -> list[int] | None:
    """The pid each of ``paths`` holds, once every one holds it (else None), for
    ``wait_for``. A worker's ``open(path, "w").write(str(pid))`` creates the file before
    its pid is in it: a file that exists can still read empty."""
    try:
        texts = [p.read_text() for p in paths]
    except FileNotFoundError:
        return None
    return [int(t) for t in texts] if all(texts) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def write_script(path: Path, body: str) -> Path:
    path.write_text(body)
    return path
