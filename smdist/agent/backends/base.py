"""What every backend is: how many workers a host starts, and what they are.

A backend turns the plan the hosts agreed on into this host's :class:`WorkerSpec` list; the
supervisor runs them without knowing which backend made them. ``smdist.agent.backends.select``
picks one from its table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from smdist.agent.entry import Entry
from smdist.agent.rendezvous import Coordinator, JobPlan
from smdist.agent.supervisor import WorkerSpec
from smdist.records import dataclass, field

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Protocol

    from smdist.agent.hang import RankSteps, RelayedRanks
    from smdist.agent.report.failure import WorkerFailure
else:
    Protocol = object  # the structural type exists for mypy only


@dataclass(frozen=True)
class Launch:
    """What this host's workers are made from, whatever the backend."""

    entry: Entry
    base_env: Mapping[str, str]
    """The container's environment."""
    sm_env: Mapping[str, str]
    """The SageMaker toolkit's SM_* variables for this host (a user's own value wins)."""
    run_dir: Path
    """This attempt's private directory: error, control and progress files."""
    restart_count: int = 0
    """Which restart of the job this attempt is (0: the first attempt)."""
    max_restarts: int = 0
    watch: list[RankSteps] = field(default_factory=list)
    """Step counters of ranks on this host that another process starts (mpirun): the
    backend adds them, the supervisor reads them (hang detection, step rates)."""
    relayed: list[RelayedRanks] = field(default_factory=list)
    """Under MPI, on the master (one): every rank's last output time, for the hang watch."""


class Backend(Protocol):
    name: str

    def processes_per_host(self, flag: str, gpus: int) -> tuple[int, str]:
        """This host's worker count from ``--nproc-per-host`` and the visible GPUs, and
        where it came from (for the log). The rendezvous agrees on it; nothing changes it."""

    def worker_specs(
        self, launch: Launch, plan: JobPlan, coordinator: Coordinator
    ) -> list[WorkerSpec]:
        """This host's workers for the agreed ``plan`` (may be none: another host starts
        them)."""

    def identify(self, failure: WorkerFailure) -> WorkerFailure:
        """The failure as the user should see it (a launcher's record names the real rank)."""

    def close(self) -> None:
        """The job ended on this host (every attempt): release what the backend set up."""


def nproc_from_flag(flag: str, gpus: int) -> tuple[int, str]:
    """``--nproc-per-host auto|N`` as every backend reads it when it has no say of its own."""
    from smdist.agent import topology

    n = topology.processes_per_host(flag, gpus)
    return n, (f"{gpus} GPU(s) visible" if flag == "auto" else "--nproc-per-host")
