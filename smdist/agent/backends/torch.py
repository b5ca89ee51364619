"""The torch backend: one worker per GPU (NCCL) or per host on CPU (gloo), env:// init."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from smdist.agent.entry import Entry
from smdist.agent.rendezvous import Coordinator, JobPlan
from smdist.agent.supervisor import WorkerSpec
from smdist.config import JobConfig

# Set for every worker, whatever the container says: these define the worker.
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def worker_specs(
    entry: Entry,
    plan: JobPlan,
    config: JobConfig,
    base_env: Mapping[str, str],
    sm_env: Mapping[str, str],
    run_dir: Path,
    coordinator: Coordinator | None = None,
) -> list[WorkerSpec]:
    """One spec per local rank: SageMaker variables the user did not set, then the ranks.

    ``coordinator`` is unused: torch workers meet through MASTER_ADDR/MASTER_PORT."""
    slot = plan.layout.slot(config.resource.current_host)
    opt_ml_root = config.paths.root
    specs = []
    for local_rank, rank in enumerate(slot.ranks):
        env = dict(base_env)
        for name, value in sm_env.items():
            env.setdefault(name, value)  # a variable the user set is never clobbered
        if slot.nproc > 1:
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(local_rank),
                "WORLD_SIZE": str(plan.layout.world_size),
                "LOCAL_WORLD_SIZE": str(slot.nproc),
                "NODE_RANK": str(slot.node_rank),
                "GROUP_RANK": str(slot.node_rank),
                "MASTER_ADDR": plan.master_addr,
                "MASTER_PORT": str(plan.master_port),
                "SMDIST_AGENT_PID": str(os.getpid()),
                "SMDIST_OPT_ML": str(opt_ml_root),
                "SMDIST_ERROR_FILE": str(run_dir / f"rank-{rank}.error.json"),
                "SMDIST_CONTROL_FILE": str(run_dir / f"rank-{rank}.control.json"),
            }
        )
        specs.append(
            WorkerSpec(
                rank=rank,
                local_rank=local_rank,
                argv=entry.argv(),
                env=env,
                python=entry.python,
                error_file=run_dir / f"rank-{rank}.error.json",
                control_file=run_dir / f"rank-{rank}.control.json",
            )
        )
    return specs
