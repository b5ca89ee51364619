"""The torch backend: one worker per GPU (NCCL) or per host on CPU (gloo), env:// init."""

from __future__ import annotations

from smdist import contract
from smdist.agent.backends.base import Launch, nproc_from_flag
from smdist.agent.rendezvous import Coordinator, JobPlan
from smdist.agent.supervisor import WorkerSpec
from smdist.config import JobConfig
from smdist.log import log
from smdist.torchrun_env import run_id, worker_variables

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from smdist.agent.report.failure import WorkerFailure


class TorchBackend:
    """torch.distributed's own way: every worker started here, rendezvous by env://."""

    name = "torch"

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def processes_per_host(self, flag: str, gpus: int) -> tuple[int, str]:
        return nproc_from_flag(flag, gpus)

    def identify(self, failure: WorkerFailure) -> WorkerFailure:
        return failure

    def close(self) -> None:
        pass  # nothing outlives the workers

    def worker_specs(
        self, launch: Launch, plan: JobPlan, coordinator: Coordinator
    ) -> list[WorkerSpec]:
        """One spec per local rank: SageMaker variables the user did not set, then the ranks.

        ``coordinator`` is unused: torch workers meet through MASTER_ADDR/MASTER_PORT."""
        run_dir, sm_env = launch.run_dir, launch.sm_env
        slot = plan.layout.slot(self.config.resource.current_host)
        opt_ml_root = self.config.paths.root
        files = contract.RunDir(run_dir)
        specs = []
        hosts = plan.layout.hosts
        job_id, source = run_id(
            launch.base_env, self.config.hyperparameters, plan.master_addr, hosts
        )
        log.info("torchrun variables for the workers: TORCHELASTIC_RUN_ID from %s", source)
        for local_rank, rank in enumerate(slot.ranks):
            env = dict(launch.base_env)
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
                    **contract.agent_variables(opt_ml_root),
                    contract.ERROR_FILE_ENV: str(files.error_file(rank)),
                    contract.CONTROL_FILE_ENV: str(files.control_file(rank)),
                }
            )
            env.update(
                worker_variables(
                    launch.base_env,
                    run_id=job_id,
                    rank=rank,
                    world_size=plan.layout.world_size,
                    node_rank=slot.node_rank,
                    num_hosts=sum(1 for s in plan.layout.slots if s.nproc),  # the world's
                    error_file=env[contract.ERROR_FILE_ENV],
                    restart_count=launch.restart_count,
                    max_restarts=launch.max_restarts,
                )
            )
            specs.append(
                WorkerSpec(
                    rank=rank,
                    local_rank=local_rank,
                    argv=launch.entry.argv(),
                    env=env,
                    python=launch.entry.python,
                    error_file=files.error_file(rank),
                    control_file=files.control_file(rank),
                )
            )
        return specs
