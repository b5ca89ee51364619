"""A host outside the distribution's instance groups (heterogeneous clusters).

The toolkit runs the entry there once, as a plain process with its environment (``SM_*``),
outside the torch/MPI world: no ``RANK``, ``WORLD_SIZE`` or ``MASTER_ADDR``. smdist does the
same, and the host still takes part in job-wide control: its agent is in the rendezvous (with
no ranks), a failure there stops every host, a stop reaches it, and it waits at the exit
barrier. In logs and failure records its process is numbered after the world's ranks.
"""

from __future__ import annotations

from smdist import contract
from smdist.agent.backends.base import Launch
from smdist.agent.rendezvous import Coordinator, JobPlan
from smdist.agent.report.failure import WorkerFailure
from smdist.agent.supervisor import WorkerSpec
from smdist.config import JobConfig

RULE = "outside the distribution's instance groups: the entry runs once, as a plain process"


class PlainBackend:
    name = "plain"

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def processes_per_host(self, flag: str, gpus: int) -> tuple[int, str]:
        return 0, RULE  # no ranks in the world; its one process is not a rank

    def identify(self, failure: WorkerFailure) -> WorkerFailure:
        return failure

    def close(self) -> None:
        pass  # nothing outlives the workers

    def worker_specs(
        self, launch: Launch, plan: JobPlan, coordinator: Coordinator
    ) -> list[WorkerSpec]:
        host = self.config.resource.current_host
        outside = [s.host for s in plan.layout.slots if s.nproc == 0]
        number = plan.layout.world_size + outside.index(host)
        files = contract.RunDir(launch.run_dir)
        env = dict(launch.base_env)
        for name, value in launch.sm_env.items():
            env.setdefault(name, value)  # a variable the user set is never clobbered
        env.update(
            {
                **contract.agent_variables(self.config.paths.root),
                contract.ERROR_FILE_ENV: str(files.error_file(number)),
                contract.CONTROL_FILE_ENV: str(files.control_file(number)),
                contract.OUTSIDE_WORLD_ENV: f"{number}/{plan.layout.world_size}",
            }
        )
        return [
            WorkerSpec(
                rank=number,
                local_rank=0,
                argv=launch.entry.argv(),
                env=env,
                python=launch.entry.python,
                error_file=files.error_file(number),
                control_file=files.control_file(number),
            )
        ]
