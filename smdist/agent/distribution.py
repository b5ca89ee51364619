"""The SDK's ``distribution=`` as hyperparameters: honoured, or refused naming the key.

The SageMaker SDK turns ``distribution={...}`` into ``sagemaker_*`` hyperparameters. smdist
honours the ones it can run (``torch_distributed``, ``pytorchddp``, ``mpi`` with its process
count and options, ``instance_groups``) and refuses the others with one line that names the key
and what to use instead: a job never silently runs in a way it did not ask for.

It also decides, with the toolkit's rules, which hosts form the torch/MPI world (instance
groups) and how many processes a host starts in script mode.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from smdist.config import JobConfig
from smdist.errors import ConfigError
from smdist.records import dataclass

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

TORCH_DISTRIBUTED = "sagemaker_torch_distributed_enabled"
PYTORCH_DDP = "sagemaker_pytorch_ddp_enabled"
MPI = "sagemaker_mpi_enabled"
INSTANCE_GROUPS = "sagemaker_distribution_instance_groups"
PROGRAM = "sagemaker_program"

_USE_TORCH = 'distribution={"torch_distributed": {"enabled": True}}'
# key -> why smdist cannot run it, and what to use instead.
REFUSED: Mapping[str, str] = {
    "sagemaker_distributed_dataparallel_enabled": (
        "SageMaker's distributed data parallel library (smddp) is not part of smdist; use "
        f"{_USE_TORCH} (NCCL) instead"
    ),
    "sagemaker_pytorch_xla_multi_worker_enabled": (
        f"PyTorch/XLA multi-worker training is not supported by smdist; use {_USE_TORCH} instead"
    ),
    "sagemaker_parameter_server_enabled": (
        "parameter servers are TensorFlow's; smdist runs torch.distributed or MPI: use "
        f'{_USE_TORCH} or distribution={{"mpi": {{"enabled": True}}}} instead'
    ),
    "sagemaker_multi_worker_mirrored_strategy_enabled": (
        "MultiWorkerMirroredStrategy is TensorFlow's; smdist runs torch.distributed or MPI: "
        f"use {_USE_TORCH} instead"
    ),
    "mp_parameters": (
        "SageMaker model parallelism (smp) is not part of smdist; use "
        f"{_USE_TORCH} with PyTorch FSDP or DeepSpeed instead"
    ),
}


def enabled(value: Any) -> bool:
    """A flag as the SDK writes it (``true``, decoded to True)."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


@dataclass(frozen=True)
class Distribution:
    key: str | None
    """The hyperparameter that chose the distribution (None: no distribution setting)."""
    script_mode: bool
    """``sagemaker_program`` is set: a job submitted the SDK's way."""
    world_hosts: tuple[str, ...]
    """The hosts that form the torch/MPI world (all, unless instance groups say otherwise)."""
    groups: tuple[str, ...] = ()
    """The distribution's instance groups (heterogeneous clusters)."""

    def nproc_rule(self, flag: str, given: bool) -> str | None:
        """Why a host starts one process, when the toolkit's script-mode rule applies
        (script mode, no distribution setting, no explicit count); else None."""
        if self.script_mode and self.key is None and not given and flag == "auto":
            return (
                "script mode without a distribution setting: one per host, as the SageMaker "
                f"toolkit; set {_USE_TORCH}, SMDIST_NPROC_PER_HOST or --nproc-per-host for more"
            )
        return None


def _field(config: JobConfig, key: str, message: str) -> ConfigError:
    return ConfigError(f'{config.paths.hyperparameters_file}: field "{key}": {message}')


def read(config: JobConfig) -> Distribution:
    """The job's distribution from its hyperparameters; ConfigError for a key smdist will
    not run, naming it and what to use instead."""
    hps = config.hyperparameters
    for refused, why in REFUSED.items():
        value = hps.get(refused)
        if refused == "mp_parameters":
            if value not in (None, "", {}, "{}"):
                raise _field(config, refused, why)
        elif enabled(value):
            raise _field(config, refused, why)
    chosen = [k for k in (TORCH_DISTRIBUTED, PYTORCH_DDP, MPI) if enabled(hps.get(k))]
    if TORCH_DISTRIBUTED in chosen and MPI in chosen:
        raise _field(
            config, MPI, f"both {TORCH_DISTRIBUTED} and {MPI} are true: choose one distribution"
        )
    key = chosen[0] if chosen else None
    world, groups = _world_hosts(config, key)
    return Distribution(key, isinstance(hps.get(PROGRAM), str), world, groups)


def _world_hosts(config: JobConfig, key: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The toolkit's ``distribution_hosts``: the hosts of the distribution's instance groups.

    No instance groups (or one): every host. ``sagemaker_distribution_instance_groups``
    names the groups; without it the toolkit takes the *current* group, which with several
    groups would train each group as a job of its own: refused, naming the key.
    """
    res = config.resource
    groups = _groups(config)
    if INSTANCE_GROUPS not in config.hyperparameters:
        if len(groups) > 1 and key is not None:
            raise _field(
                config,
                INSTANCE_GROUPS,
                f"missing in a job with instance groups {json.dumps(sorted(groups))} and "
                f"{key}: name the groups that train together "
                '(distribution={..., "instance_groups": [...]})',
            )
        return tuple(res.hosts), ()
    names = config.hyperparameters[INSTANCE_GROUPS]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise _field(config, INSTANCE_GROUPS, "expected a non-empty list of instance group names")
    if not groups:
        return tuple(res.hosts), tuple(names)
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise _field(
            config,
            INSTANCE_GROUPS,
            f"{', '.join(unknown)} not among the instance groups of "
            f"{config.paths.resource_config_file} ({', '.join(sorted(groups))})",
        )
    world = sorted({h for n in names for h in groups[n]})
    if not world:
        raise _field(config, INSTANCE_GROUPS, f"the groups {', '.join(names)} have no hosts")
    return tuple(world), tuple(names)


def _groups(config: JobConfig) -> dict[str, Sequence[str]]:
    where = config.paths.resource_config_file
    groups: dict[str, Sequence[str]] = {}
    for i, group in enumerate(config.resource.instance_groups):
        name, hosts = group.get("instance_group_name"), group.get("hosts")
        if not isinstance(name, str) or not isinstance(hosts, list):
            raise ConfigError(
                f'{where}: field "instance_groups[{i}]": expected instance_group_name (string) '
                "and hosts (list)"
            )
        stray = [h for h in hosts if h not in config.resource.hosts]
        if stray:
            raise ConfigError(
                f'{where}: field "instance_groups[{i}].hosts": {", ".join(map(str, stray))} '
                'not in "hosts"'
            )
        groups[name] = [str(h) for h in hosts]
    return groups
