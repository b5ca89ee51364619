"""The ways a job's workers are started: one class each, picked by name from a table.

The table names each class by module so that importing this package imports no backend
(``python -m smdist.agent.backends.mpi`` runs the MPI launcher in its own process).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from smdist.agent.backends.base import Backend
    from smdist.config import JobConfig

BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("smdist.agent.backends.torch", "TorchBackend"),
    "mpi": ("smdist.agent.backends.mpi", "MpiBackend"),
}
"""``--backend`` name -> (module, class)."""
MPI_ENABLED_HP = "sagemaker_mpi_enabled"


def select(name: str | None, config: JobConfig) -> Backend:
    """``--backend``, else mpi when the job's ``sagemaker_mpi_enabled`` is true, else torch.

    Raises ConfigError for a backend option the job's configuration gets wrong."""
    if name is None:
        name = "mpi" if config.framework_parameters.get(MPI_ENABLED_HP) is True else "torch"
    module, cls = BACKENDS[name]
    backend: Backend = getattr(importlib.import_module(module), cls)(config)
    return backend
