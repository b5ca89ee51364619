"""The decorator and the ``Context`` a training function gets.

Under ``smdist-run`` (or torchrun) the decorator initialises torch.distributed from the
environment, binds the device by local rank, calls the function, and tears the group down.
Run directly (``python train.py``, no launcher), it re-executes the script under the smdist
agent, so both paths behave the same.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from smdist import contract
from smdist.config import decode_hyperparameter, resolve_root
from smdist.steps import finished, progress
from smdist.worker import environment

T = TypeVar("T")
LAUNCHED_ENV = contract.AGENT_PID_ENV


def launched() -> bool:
    """Started by smdist's agent, by mpirun (Open MPI, MPICH, Intel MPI), or by another
    launcher that set the rank variables (``smdist.worker.environment``)."""
    return environment.detect().creates_processes_externally


def _restart_count() -> int:
    """SMDIST_RESTART_COUNT (smdist's agent), else torchrun's TORCHELASTIC_RESTART_COUNT."""
    for name in (contract.RESTART_COUNT_ENV, "TORCHELASTIC_RESTART_COUNT"):
        text = os.environ.get(name, "")
        if text.isdigit():
            return int(text)
    return 0


def _json_env(name: str, default: Any) -> Any:
    try:
        return json.loads(os.environ[name])
    except (KeyError, ValueError):
        return default


@dataclass
class Context:
    """Who this worker is and where things go. ``repr`` is made for logs."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    hosts: tuple[str, ...]
    current_host: str
    device: Any
    hyperparameters: dict[str, Any]
    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    restart_count: int = 0
    """Which restart of the job this is (0: the first attempt), as --max-restarts counts."""
    in_world: bool = True
    """False on a host outside the distribution (heterogeneous clusters): the entry runs
    there once, with no process group; ``rank`` is numbered after the world's ranks."""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _stop_hooks: list[Callable[[Context], None]] = field(default_factory=list, repr=False)
    _stop_polled: bool = field(default=False, repr=False)
    _distributed: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        return (
            f"Context(rank={self.rank}({self.world_size}), "
            f"local_rank={self.local_rank}({self.local_world_size}), "
            f"node={self.node_rank}({len(self.hosts)}), host={self.current_host}, "
            f"device={self.device})"
        )

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def channels(self) -> dict[str, Any]:
        from smdist.worker import channels

        return dict(channels.channels())

    @property
    def should_stop(self) -> bool:
        """True once a stop was asked for (SIGTERM anywhere in the job), on every rank at
        the same call: the ranks agree with one tiny all-reduce, so call it once per step."""
        self._stop_polled = True
        progress()  # one step: what --hang-timeout and the step rates count
        local = self._stop.is_set()
        if not self._distributed:
            return local
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=self._flag_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self._stop.set()
        return bool(flag.item())

    def _flag_device(self) -> Any:
        return self.device

    def on_stop(self, fn: Callable[[Context], None]) -> Callable[[Context], None]:
        """Register a hook run once when the job is stopped (e.g. to save a checkpoint)."""
        self._stop_hooks.append(fn)
        return fn

    # -- /opt/ml/model and /opt/ml/checkpoints, rank-aware (see smdist.worker.artifacts) -------
    @property
    def artifacts(self) -> Any:
        from smdist.worker.artifacts import Artifacts, WorkerIdentity

        who = WorkerIdentity(self.rank, self.local_rank, self.current_host)
        return Artifacts(self.model_dir, self.checkpoint_dir, who)

    def model_path(self, name: str, scope: str = "leader") -> Path | None:
        path: Path | None = self.artifacts.model_path(name, scope)
        return path

    def open_model_file(self, name: str, mode: str = "wb", scope: str = "leader") -> Any:
        return self.artifacts.open_model_file(name, mode, scope)

    def save(self, obj: Any, name: str, scope: str = "leader") -> Path | None:
        path: Path | None = self.artifacts.save(obj, name, scope)
        return path

    def save_checkpoint(self, obj: Any, name: str = "checkpoint.pt", **kw: Any) -> Path | None:
        path: Path | None = self.artifacts.save_checkpoint(obj, name, **kw)
        return path

    def latest_checkpoint(self, name: str | None = None, scope: str = "leader") -> Path | None:
        path: Path | None = self.artifacts.latest_checkpoint(name, scope)
        return path

    def barrier(self) -> None:
        if self._distributed:
            import torch.distributed as dist

            dist.barrier()

    def _run_stop_hooks(self) -> None:
        hooks, self._stop_hooks = self._stop_hooks, []
        for hook in hooks:
            hook(self)


class StopRequested(BaseException):
    """Raised in a training function that never polls ``ctx.should_stop`` when the job is
    stopped; the decorator catches it, runs the ``on_stop`` hooks and returns normally."""


class _StopWatcher:
    """Turns the agent's SIGTERM into ``ctx.should_stop``.

    A thread reads the signal wake-up fd, so it reacts even while the main thread is blocked
    inside a collective: when the agent is aborting the job (a failure elsewhere) the worker
    exits at once instead of waiting for a collective that will never complete.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old_handler = signal.signal(signal.SIGTERM, self._handler)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="smdist-stop", daemon=True)
        self._thread.start()

    def _handler(self, _signum: int, _frame: object) -> None:
        self.ctx._stop.set()
        if not self.ctx._stop_polled:
            # The function never asks ctx.should_stop: stop it here, in the main thread,
            # rather than let it run on until the agent's grace ends in SIGKILL.
            raise StopRequested()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self.ctx._stop.set()
                action = contract.read_control(os.environ.get(contract.CONTROL_FILE_ENV))
                if action == contract.ABORT:
                    sys.stderr.write("smdist: job aborted by the agent (a failure elsewhere)\n")
                    sys.stderr.flush()
                    os._exit(contract.signal_exit_code(signal.SIGTERM))

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        if self.ctx._stop.is_set():
            # Stopping already: this host's SIGTERM may still be on its way (the ranks agree
            # to stop as soon as any host's agent says so). It must not kill the teardown.
            signal.signal(signal.SIGTERM, _ignore)
        else:
            signal.signal(signal.SIGTERM, self._old_handler)
        os.close(self._w)


def _ignore(_signum: int, _frame: object) -> None:
    pass


def _device(local_rank: int) -> tuple[Any, str]:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def init(*, timeout_s: float | None = None) -> Context:
    """Initialise torch.distributed from the environment and describe this worker."""
    import torch.distributed as dist

    from smdist.worker.mpi_rank import world_from_mpi

    started = environment.detect()
    for name, value in world_from_mpi(os.environ).items():  # plain `mpirun python train.py`
        os.environ.setdefault(name, value)  # torch's env:// reads them
    rank, world = started.rank, started.world_size
    local_rank = started.local_rank or 0
    device, backend = _device(local_rank)
    distributed = dist.is_initialized()
    if not distributed and started.in_world and "MASTER_ADDR" in os.environ:
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
        distributed = True
    root = resolve_root().root
    current = started.host
    hps = _json_env("SM_HPS", {})
    return Context(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=started.local_world_size,
        node_rank=started.node_rank,
        hosts=tuple(_json_env("SM_HOSTS", [current])),
        current_host=current,
        device=device,
        hyperparameters={k: decode_hyperparameter(v) for k, v in hps.items()},
        model_dir=Path(os.environ.get("SM_MODEL_DIR", root / "model")),
        output_data_dir=Path(os.environ.get("SM_OUTPUT_DATA_DIR", root / "output" / "data")),
        checkpoint_dir=Path(os.environ.get(contract.CHECKPOINT_DIR_ENV, root / "checkpoints")),
        restart_count=_restart_count(),
        in_world=started.in_world,
        _distributed=distributed,
    )


def _relaunch() -> None:
    """No launcher: become ``smdist-run THIS_SCRIPT ARGS`` (same process, same pid)."""
    script = os.path.abspath(sys.argv[0])
    argv = [sys.executable, "-m", "smdist.agent.launch", script, *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


class _Main:
    """What ``@smdist.main`` returns: call it to run; ``.on_stop`` registers a stop hook."""

    def __init__(self, fn: Callable[[Context], Any]) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._hooks: list[Callable[[Context], None]] = []

    def on_stop(self, hook: Callable[[Context], None]) -> Callable[[Context], None]:
        self._hooks.append(hook)
        return hook

    def __call__(self) -> Any:
        if not launched():
            _relaunch()
        ctx = init()
        ctx._stop_hooks.extend(self._hooks)
        watcher = _StopWatcher(ctx)
        ended_well = False
        try:
            try:
                result = self._fn(ctx)
            except StopRequested:
                result = None
            if ctx._stop.is_set():
                ctx._run_stop_hooks()
            ended_well = True
            return result
        finally:
            watcher.close()
            if ended_well:
                finished()  # what is left is the way out: it gets --hang-timeout afresh
                _leave_process_group(meet=not ctx._stop.is_set())


def _leave_process_group(*, meet: bool) -> None:
    """After the function returned: meet the other ranks, then destroy the process group.

    Meeting first (``meet``; not when stopping, where ranks leave as each is done) keeps rank
    0, whose process holds the store every rank connected through, alive until every rank is
    past it: a function that returns at once would otherwise end the store while another rank
    still reads it. Nothing on a failure: destroying a group while another rank may still wait
    in a collective can block, and the failure must reach the error file first."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_initialized():
        return
    if meet:
        with contextlib.suppress(Exception):
            dist.barrier()
    from smdist.worker.bootstrap import release_process_groups

    release_process_groups()  # what the bootstrap does after any script that ended well


def main(fn: Callable[[Context], Any]) -> _Main:
    """``@smdist.main``: the training function receives a ``Context``."""
    return _Main(fn)
