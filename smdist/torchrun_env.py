"""torchrun's environment contract, so frameworks recognise smdist as the launcher they know.

torchrun (torch.distributed.elastic's local agent) gives every worker, besides RANK and
friends, ``TORCHELASTIC_*``, ``GROUP_*`` and ``ROLE_*``. Frameworks read them: Lightning picks
its ``TorchElasticEnvironment`` (and checks ``devices * num_nodes`` against the world size)
only when ``TORCHELASTIC_RUN_ID`` is set, ``torch.distributed.is_torchelastic_launched()``
asks the same, and ``@record`` writes its error to ``TORCHELASTIC_ERROR_FILE``.

Two kinds of variable:

- the ones that describe the worker's place in the world (``GROUP_RANK``,
  ``GROUP_WORLD_SIZE``, ``ROLE_RANK``, ``ROLE_WORLD_SIZE``, the restart counters) are always
  smdist's, like ``RANK``: a stale value would contradict ``RANK``/``WORLD_SIZE``;
- the others (``TORCHELASTIC_RUN_ID``, ``ROLE_NAME``, ``TORCHELASTIC_ERROR_FILE``,
  ``TORCHELASTIC_USE_AGENT_STORE``, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``) are the user's when
  the container sets them.

``TORCHELASTIC_USE_AGENT_STORE`` is ``False``, as torchrun says when its agent does not host
the workers' store: smdist's agent never does (rank 0 hosts torch's TCPStore).

Shared by both sides: the agent's backends build a worker's variables; the MPI rank wrapper
adds the per-rank ones. Pure functions of their arguments, standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

ROLE_NAME = "default"  # torchrun's role when none is given
JOB_NAME_SOURCES = ("TRAINING_JOB_NAME",)
"""Container variables naming the job (SageMaker sets TRAINING_JOB_NAME), in order."""
JOB_NAME_HYPERPARAMETER = "sagemaker_job_name"

# Forced: describe the worker; the same as torchrun computes them.
PLACE_VARIABLES = (
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
)
# Defaults: a value the user set wins.
DEFAULT_VARIABLES = (
    "TORCHELASTIC_RUN_ID",
    "ROLE_NAME",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def run_id(
    environ: Mapping[str, str],
    hyperparameters: Mapping[str, Any],
    master_addr: str,
    hosts: Sequence[str],
) -> tuple[str, str]:
    """The job's run id and where it came from: the job's name when the platform gives one
    (``TRAINING_JOB_NAME``, then the ``sagemaker_job_name`` hyperparameter), else an id
    derived from the plan, the same on every host and across restarts of the job."""
    for name in JOB_NAME_SOURCES:
        if environ.get(name):
            return environ[name], name
    hp = hyperparameters.get(JOB_NAME_HYPERPARAMETER)
    if isinstance(hp, str) and hp:
        return hp, f"hyperparameter {JOB_NAME_HYPERPARAMETER}"
    import zlib  # a checksum, not hashlib: the same on every host, cheap to import

    plan = f"{master_addr}|{','.join(hosts)}"
    digest = f"{zlib.crc32(plan.encode()):08x}"
    return f"smdist-{digest}", "the master's address and the host list (no job name)"


def _merge(
    user_env: Mapping[str, str], forced: dict[str, str], defaults: dict[str, str]
) -> dict[str, str]:
    out = {k: v for k, v in defaults.items() if k not in user_env}
    out.update(forced)
    return out


def host_variables(
    user_env: Mapping[str, str],
    *,
    run_id: str,
    node_rank: int,
    num_hosts: int,
    restart_count: int = 0,
    max_restarts: int = 0,
) -> dict[str, str]:
    """What every worker on one host shares; ``user_env`` is the container's environment.

    Returns the variables to set (a default the user set is left out)."""
    forced = {
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(num_hosts),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
    }
    defaults = {
        "TORCHELASTIC_RUN_ID": run_id,
        "ROLE_NAME": ROLE_NAME,
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # torchrun's default: a hung NCCL op aborts
    }
    return _merge(user_env, forced, defaults)


def rank_variables(
    user_env: Mapping[str, str], *, rank: int | str, world_size: int | str, error_file: str
) -> dict[str, str]:
    """One worker's own: one role, so its role rank is its rank; ``@record`` writes to
    ``error_file``, the file smdist's bootstrap writes and the agent reads."""
    forced = {"ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world_size)}
    return _merge(user_env, forced, {"TORCHELASTIC_ERROR_FILE": error_file})


def worker_variables(
    user_env: Mapping[str, str],
    *,
    run_id: str,
    rank: int,
    world_size: int,
    node_rank: int,
    num_hosts: int,
    error_file: str,
    restart_count: int = 0,
    max_restarts: int = 0,
) -> dict[str, str]:
    """Every torchrun variable of one worker (what ``env.update`` should apply)."""
    out = host_variables(
        user_env,
        run_id=run_id,
        node_rank=node_rank,
        num_hosts=num_hosts,
        restart_count=restart_count,
        max_restarts=max_restarts,
    )
    out.update(rank_variables(user_env, rank=rank, world_size=world_size, error_file=error_file))
    return out
