"""How this rank was started: one class per launcher; the first that detects wins.

Every launcher tells a process who it is through its own variables: smdist's agent and
torchrun through torch's (``RANK``, ``LOCAL_RANK``, ...), Open MPI through
``OMPI_COMM_WORLD_*``, MPICH and Intel MPI (Hydra) through ``PMI_RANK`` and
``MPI_LOCALRANKID``. Each class below reads its launcher's variables (one table, as
submitit's ``JobEnvironment``) and nothing else reads them: ``detect()`` gives the answer
for this process. Adding a launcher (Slurm, Kubernetes) is adding one class to ``ENVIRONMENTS``.

    >>> detect({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", ...})
    OpenMPI(rank=5(6), local_rank=2(3), node_rank=1, host=algo-2, master=None)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from typing import ClassVar

from smdist import contract
from smdist.config import load_resource_config, resolve_root
from smdist.errors import ConfigError


class VariableError(ConfigError):
    """A launcher's variable does not hold what it must (a non-negative integer)."""


class Environment:
    """What the launcher told this process; the same members whoever the launcher was.

    ``local_rank`` is None when a launcher gave a rank but no local rank: nobody can tell
    which process speaks for the host.
    """

    in_world: ClassVar[bool] = True
    """False: the plain process of a host outside the distribution (no process group)."""
    creates_processes_externally: ClassVar[bool] = True
    """A launcher started this process (and its peers); False: run directly, the decorator
    starts smdist's agent itself."""
    VARIABLES: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "master_addr": ("MASTER_ADDR",),
        "master_port": ("MASTER_PORT",),
    }
    """Member -> the launcher's variables for it, the first one set wins."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        raise NotImplementedError

    # -- reading the table --------------------------------------------------------------

    def _raw(self, member: str) -> tuple[str, str] | None:
        for name in self.VARIABLES.get(member, ()):
            value = self.environ.get(name)
            if value:
                return name, value
        return None

    def _int(self, member: str) -> int | None:
        found = self._raw(member)
        if found is None:
            return None
        name, raw = found
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise VariableError(
                f"environment variable {name}: expected a non-negative integer, got {raw!r}"
            )
        return value

    # -- the members ---------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._int("rank") or 0

    @property
    def world_size(self) -> int:
        return self._int("world_size") or 1

    @property
    def local_rank(self) -> int | None:
        return self._int("local_rank")

    @property
    def local_world_size(self) -> int:
        return self._int("local_world_size") or 1

    @property
    def node_rank(self) -> int:
        return self._int("node_rank") or 0

    @property
    def master_addr(self) -> str | None:
        found = self._raw("master_addr")
        return found[1] if found else None

    @property
    def master_port(self) -> int | None:
        return self._int("master_port")

    @cached_property
    def host(self) -> str:
        """The SageMaker host name (``algo-N``): ``SM_CURRENT_HOST``, else resourceconfig.json."""
        current = self.environ.get("SM_CURRENT_HOST")
        if current:
            return current
        return load_resource_config(
            resolve_root(environ=self.environ).resource_config_file
        ).current_host

    def __repr__(self) -> str:
        master = f"{self.master_addr}:{self.master_port}" if self.master_addr else None
        return (
            f"{type(self).__name__}(rank={self.rank}({self.world_size}), "
            f"local_rank={self.local_rank}({self.local_world_size}), "
            f"node_rank={self.node_rank}, host={self.host}, master={master})"
        )


_TORCH = {
    **Environment.VARIABLES,
    "rank": ("RANK",),
    "world_size": ("WORLD_SIZE",),
    "local_rank": ("LOCAL_RANK",),
    "local_world_size": ("LOCAL_WORLD_SIZE",),
    "node_rank": ("NODE_RANK", "GROUP_RANK"),
}


class SmdistAgent(Environment):
    """Started by smdist's agent (``smdist-run``, ``train``, or smdist's own mpirun)."""

    VARIABLES = _TORCH

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return contract.AGENT_PID_ENV in environ


class OutsideWorld(Environment):
    """The plain process of a host outside the distribution's instance groups, started by
    smdist's agent: not a rank of the world (no ``RANK``, as the toolkit does), numbered
    after the world's ranks so that it is never the leader that saves the model."""

    in_world = False

    def _pair(self) -> tuple[int, int]:
        raw = self.environ.get(contract.OUTSIDE_WORLD_ENV, "")
        number, _, world = raw.partition("/")
        if not (number.isdigit() and world.isdigit()):
            raise VariableError(
                f"environment variable {contract.OUTSIDE_WORLD_ENV}: expected "
                f"NUMBER/WORLD_SIZE, got {raw!r}"
            )
        return int(number), int(world)

    @property
    def rank(self) -> int:
        return self._pair()[0]

    @property
    def world_size(self) -> int:
        return self._pair()[1]

    @property
    def local_rank(self) -> int:
        return 0

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return contract.OUTSIDE_WORLD_ENV in environ


class TorchRun(Environment):
    """Started by torchrun, or by anything else that set torch's rank variables."""

    VARIABLES = _TORCH

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return bool(environ.get("RANK"))


class MpiEnvironment(Environment):
    """An MPI launcher: ``mpirun python train.py`` with no smdist in between (Horovod-style).

    MPI names no node rank: under ``--map-by slot`` with the same processes on every host it
    is ``rank // local_world_size``. MASTER_ADDR/MASTER_PORT only if the user passed them.
    """

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size


class OpenMPI(MpiEnvironment):
    """Started by Open MPI's ``mpirun`` (``OMPI_COMM_WORLD_*``)."""

    VARIABLES = {
        **Environment.VARIABLES,
        "rank": ("OMPI_COMM_WORLD_RANK",),
        "world_size": ("OMPI_COMM_WORLD_SIZE",),
        "local_rank": ("OMPI_COMM_WORLD_LOCAL_RANK",),
        "local_world_size": ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    }

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return bool(environ.get("OMPI_COMM_WORLD_RANK"))


class Pmi(MpiEnvironment):
    """Started by MPICH's or Intel MPI's ``mpirun`` (Hydra: ``PMI_RANK``, ``MPI_LOCALRANKID``)."""

    VARIABLES = {
        **Environment.VARIABLES,
        "rank": ("PMI_RANK",),
        "world_size": ("PMI_SIZE",),
        "local_rank": ("MPI_LOCALRANKID",),
        "local_world_size": ("MPI_LOCALNRANKS",),
    }

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return bool(environ.get("PMI_RANK"))


class Direct(Environment):
    """No launcher: ``python train.py``. One process, rank 0 of 1; the decorator relaunches
    the script under smdist's agent."""

    creates_processes_externally = False

    @property
    def local_rank(self) -> int:
        return 0

    @staticmethod
    def detect(environ: Mapping[str, str]) -> bool:
        return True


ENVIRONMENTS: tuple[type[Environment], ...] = (
    OutsideWorld,
    SmdistAgent,
    TorchRun,
    OpenMPI,
    Pmi,
    Direct,
)
"""In order: the first whose ``detect()`` holds is how this process was started."""


def detect(environ: Mapping[str, str] | None = None) -> Environment:
    """How this process (or one with ``environ``) was started."""
    env = os.environ if environ is None else environ
    cls = next(c for c in ENVIRONMENTS if c.detect(env))
    return cls(env)
