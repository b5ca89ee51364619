"""How each launcher starts the same worker on H (simulated) hosts x P processes.

``floor``: bare processes with the rank variables set by hand, no launcher at all.
``smdist``: ``smdist-run`` (``--simulate HxP`` across hosts).
``torchrun``: pip's torch, static rendezvous, one ``torchrun`` per host.
``toolkit``: the SageMaker training toolkit (``sagemaker-training`` +
``sagemaker-pytorch-training``'s torch_distributed runner), one per host, each with its
own /opt/ml tree (``SAGEMAKER_BASE_DIR``); hosts are named 127.0.0.N so its DNS wait
resolves them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LAUNCHERS = ("floor", "smdist", "torchrun", "toolkit")
SCRIPT_MODE = "smdist-script"
"""smdist as SageMaker's script mode runs it (``train``, the entry from ``sagemaker_program``,
``sagemaker_submit_directory`` set) with the code already in /opt/ml/code and an empty
requirements.txt: nothing to fetch or install. Only in the start-up measurement."""
WORKER = Path(__file__).with_name("worker.py").resolve()
BIN = Path(sys.executable).parent
TOOLKIT_MODULE = "sagemaker_pytorch_container.training:main"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(launcher: str) -> str | None:
    """Why this launcher cannot run here (None when it can)."""
    if launcher == "toolkit":
        for mod in ("sagemaker_training", "sagemaker_pytorch_container"):
            try:
                importlib.import_module(mod)
            except Exception as exc:  # the toolkit imports boto3 etc. at import time
                return f"{mod} does not import ({exc}): pip install -e '.[bench]'"
    if launcher == SCRIPT_MODE and not (BIN / "train").exists():
        return f"no train next to {sys.executable}: pip install -e ."
    if launcher == "torchrun" and not (BIN / "torchrun").exists():
        return f"no torchrun next to {sys.executable}"
    return None


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SM_HPS"):
        env.pop(name, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # what smdist and torchrun set for >1 process; same for all
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Launch:
    launcher: str
    hosts: int
    nproc: int
    out: Path
    """Where the workers write their records."""
    run_dir: Path
    t0: float
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exits: dict[int, tuple[int, float]] = field(default_factory=dict)
    """index -> (exit code, time.time() of the exit)."""
    marks: list[tuple[float, str]] = field(default_factory=list)
    """(arrival time, line) of stderr lines matching ``mark``."""
    _threads: list[threading.Thread] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def world(self) -> int:
        return self.hosts * self.nproc

    def wait(self, timeout: float) -> bool:
        """Wait for every top-level process to exit; False on timeout."""
        return self._done.wait(timeout)

    def records(self, prefix: str) -> dict[int, dict[str, Any]]:
        found = {}
        for p in self.out.glob(f"{prefix}-*"):
            with contextlib.suppress(ValueError, OSError):
                found[int(p.name.rsplit("-", 1)[1])] = json.loads(p.read_text())
        return found

    def wait_records(self, prefix: str, count: int, timeout: float) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.records(prefix)
            if len(got) >= count or time.monotonic() > deadline or self._done.is_set():
                return self.records(prefix)
            time.sleep(0.02)

    def worker_pids(self) -> list[int]:
        return [r["pid"] for r in self.records("pid").values()]

    def signal(self, sig: int) -> float:
        """Send ``sig`` to every top-level process (every container); return when."""
        t = time.time()
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        return t

    def cleanup(self) -> None:
        """Kill whatever is left (workers a launcher orphaned included)."""
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.wait(30)
        for t in self._threads:
            t.join(5)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _watch_exit(launch: Launch, i: int, proc: subprocess.Popen[bytes]) -> None:
    code = proc.wait()
    launch.exits[i] = (code, time.time())
    if len(launch.exits) == len(launch.procs):
        launch._done.set()


def _read_marks(launch: Launch, src: IO[bytes], sink: IO[bytes], mark: re.Pattern[bytes]) -> None:
    for line in src:
        if mark.search(line):
            launch.marks.append((time.time(), line.decode("utf-8", "replace").rstrip()))
        sink.write(line)
    sink.close()


def _toolkit_tree(root: Path, host: int, hosts: int, nproc: int, args: list[str]) -> Path:
    names = [f"127.0.0.{i + 1}" for i in range(hosts)]
    config = root / "input" / "config"
    # What SageMaker creates: without output/ the toolkit's failure path itself fails.
    for d in (config, root / "input" / "data", root / "model", root / "output" / "data"):
        d.mkdir(parents=True)
    code = root / "submit"
    code.mkdir()
    shutil.copy(WORKER, code / WORKER.name)
    resource = {"current_host": names[host], "hosts": names, "network_interface_name": "lo"}
    (config / "resourceconfig.json").write_text(json.dumps(resource))
    hps: dict[str, Any] = {
        "sagemaker_program": WORKER.name,
        "sagemaker_submit_directory": str(code),
        "sagemaker_torch_distributed_enabled": True,
        "sagemaker_mpi_num_of_processes_per_host": nproc,
        "sagemaker_region": "us-east-1",
    }
    for name, value in zip(args[::2], args[1::2], strict=True):
        hps[name.removeprefix("--")] = value
    # SageMaker writes every hyperparameter value JSON-encoded, as a string.
    (config / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in hps.items()})
    )
    (config / "inputdataconfig.json").write_text("{}")
    return root


def _script_mode_tree(root: Path, nproc: int, args: list[str]) -> list[str]:
    """An /opt/ml tree for script mode with nothing to do; the ``train`` command line."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    code = root / "code"
    code.mkdir()
    shutil.copy(WORKER, code / WORKER.name)
    (code / "requirements.txt").write_text("# nothing to install\n")
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]})
    )
    hps: dict[str, Any] = {
        "sagemaker_program": WORKER.name,
        # Never fetched: /opt/ml/code is not empty, as when SageMaker has put the code there.
        "sagemaker_submit_directory": "s3://bench-bucket/never-fetched/sourcedir.tar.gz",
    }
    for name, value in zip(args[::2], args[1::2], strict=True):
        hps[name.removeprefix("--")] = value
    (config / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in hps.items()})
    )
    return [str(BIN / "train"), "--opt-ml", str(root), "--nproc-per-host", str(nproc)]


def _commands(
    launcher: str,
    hosts: int,
    nproc: int,
    args: list[str],
    run_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, env) of every top-level process."""
    env = {**base_env(), **(extra_env or {})}
    worker = [str(WORKER), *args]
    if launcher == "floor":
        port = str(free_port())
        world = hosts * nproc
        return [
            (
                [sys.executable, *worker],
                dict(
                    env,
                    RANK=str(r),
                    LOCAL_RANK=str(r % nproc),
                    WORLD_SIZE=str(world),
                    LOCAL_WORLD_SIZE=str(nproc),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                ),
            )
            for r in range(world)
        ]
    if launcher == "smdist":
        smdist_run = str(BIN / "smdist-run")
        if hosts == 1:
            argv = [smdist_run, "--nproc-per-host", str(nproc), "--opt-ml", str(run_dir / "opt-ml")]
            argv += ["--rdzv-port", str(free_port())]
        else:
            argv = [
                smdist_run,
                "--simulate",
                f"{hosts}x{nproc}",
                "--work-dir",
                str(run_dir / "sim"),
            ]
        return [([*argv, "--", *worker], env)]
    if launcher == SCRIPT_MODE:
        if hosts != 1:
            raise ValueError(f"{SCRIPT_MODE} runs one host only")
        return [(_script_mode_tree(run_dir / "opt-ml", nproc, args), env)]
    if launcher == "torchrun":
        port = str(free_port())
        return [
            (
                [
                    str(BIN / "torchrun"),
                    f"--nnodes={hosts}",
                    f"--nproc-per-node={nproc}",
                    f"--node-rank={h}",
                    "--master-addr=127.0.0.1",
                    f"--master-port={port}",
                    *worker,
                ],
                env,
            )
            for h in range(hosts)
        ]
    if launcher == "toolkit":
        cmds = []
        for h in range(hosts):
            root = _toolkit_tree(run_dir / f"toolkit-{h}", h, hosts, nproc, args)
            tenv = dict(env, SAGEMAKER_BASE_DIR=str(root), SAGEMAKER_TRAINING_MODULE=TOOLKIT_MODULE)
            tenv.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            cmds.append(([sys.executable, "-m", "sagemaker_training.cli.train"], tenv))
        return cmds
    raise ValueError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}")


def start(
    launcher: str,
    hosts: int,
    nproc: int,
    args: list[str],
    work: Path,
    *,
    stdout: Path | None = None,
    mark: bytes | None = None,
    on_start: Callable[[Launch], None] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Launch:
    """Start one run; the worker gets ``--out`` (its records' folder) and ``args``."""
    run_dir = Path(os.path.realpath(work)) / f"{launcher}-{time.monotonic_ns()}"
    out = run_dir / "out"
    out.mkdir(parents=True)
    full = ["--out", str(out), *args]
    cmds = _commands(launcher, hosts, nproc, full, run_dir, extra_env)
    stdout_f = open(stdout or run_dir / "stdout", "ab")  # noqa: SIM115 - children own it
    stderr_f = open(run_dir / "stderr", "wb")  # noqa: SIM115
    launch = Launch(launcher, hosts, nproc, out, run_dir, t0=time.time())
    try:
        for argv, env in cmds:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout_f,
                stderr=subprocess.PIPE if mark else stderr_f,
                cwd=run_dir,
                start_new_session=True,  # one group per "container", for the cleanup
            )
            launch.procs.append(proc)
            if mark and proc.stderr is not None:
                copy = open(run_dir / f"stderr-{len(launch.procs)}", "wb")  # noqa: SIM115
                t = threading.Thread(
                    target=_read_marks,
                    args=(launch, proc.stderr, copy, re.compile(mark)),
                    daemon=True,
                )
                t.start()
                launch._threads.append(t)
    finally:
        stdout_f.close()
        stderr_f.close()
    for i, proc in enumerate(launch.procs):
        t = threading.Thread(target=_watch_exit, args=(launch, i, proc), daemon=True)
        t.start()
    if on_start is not None:
        on_start(launch)
    return launch
