"""The MPI backend (Open MPI's mpirun over ssh). Not built yet: see issue 9."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from smdist.config import JobConfig
from smdist.entry import Entry
from smdist.errors import ConfigError
from smdist.rendezvous import JobPlan
from smdist.supervisor import WorkerSpec


def worker_specs(
    entry: Entry,
    plan: JobPlan,
    config: JobConfig,
    base_env: Mapping[str, str],
    sm_env: Mapping[str, str],
    run_dir: Path,
) -> list[WorkerSpec]:
    raise ConfigError("--backend mpi: the MPI backend is not available in this build")
