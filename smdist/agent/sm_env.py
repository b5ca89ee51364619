"""The SageMaker training toolkit's worker environment, computed from the /opt/ml tree.

A script written for a SageMaker container reads ``SM_*`` variables and parses its
hyperparameters as ``--name value`` arguments. This module gives workers exactly what the
official ``sagemaker-training`` toolkit (``Environment.to_env_vars`` / ``to_cmd_args``)
gives for the same tree, without importing it: it pulls in boto3, and the agent must start
fast. ``tests/test_sm_env.py`` pins every value against the real toolkit.

What smdist cannot derive from the tree it takes from the same source the toolkit does:
``TRAINING_JOB_NAME``, ``SAGEMAKER_TRAINING_MODULE``, ``SM_HP_MP_PARAMETERS``,
``AWS_DEFAULT_REGION`` and ``PATH`` (for ``smddprun`` / ``smddpmprun`` / ``neuron-ls``) from
the environment. GPU and CPU counts are the caller's (the agent's own detection).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from smdist.config import JobConfig
from smdist.contract import FRAMEWORK_HYPERPARAMETERS, is_framework_hyperparameter
from smdist.errors import ConfigError

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

# Any of these framework flags puts the current instance group in the distribution.
_DISTRIBUTION_FLAGS = (
    "sagemaker_mpi_enabled",
    "sagemaker_parameter_server_enabled",
    "sagemaker_distributed_dataparallel_enabled",
    "sagemaker_pytorch_ddp_enabled",
    "sagemaker_pytorch_xla_multi_worker_enabled",
    "sagemaker_multi_worker_mirrored_strategy_enabled",
    "sagemaker_torch_distributed_enabled",
)
_DEFAULT_LOG_LEVEL = 20  # logging.INFO, without importing logging's config machinery
_DEFAULT_INSTANCE_GROUP = "homogeneousCluster"
_NEURON_LS_TIMEOUT_S = 30.0


def _text(value: Any) -> str:
    """The toolkit's ``mapping._decode``: None is empty, everything else ``str()``."""
    return "" if value is None else str(value)


def _env_value(value: Any) -> str:
    """The toolkit's ``to_env_vars`` value: strings as is, anything else compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _arg_name(name: str) -> str:
    return "" if not name else (f"--{name}" if len(name) > 1 else f"-{name}")


def _arg_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return _text(value)


def hyperparameter_args(user_hyperparameters: Mapping[str, Any]) -> list[str]:
    """The script's arguments, as the toolkit's ``mapping.to_cmd_args`` writes them.

    Keys sorted; ``--name`` (``-n`` for a one-character name); values through ``str()``
    (so ``True``, ``[64, 32]``), dicts as ``k=v,k2=v2``, null as an empty string.
    Keys the toolkit keeps for SageMaker (``sagemaker_*``, ``_tuning_objective_metric``,
    ``default_user_module_name``) are left out, so passing every hyperparameter is safe.
    """
    args: list[str] = []
    for name in sorted(k for k in user_hyperparameters if not is_framework_hyperparameter(k)):
        value = _arg_value(user_hyperparameters[name])
        if "\0" in name or "\0" in value:
            # execve cannot carry a NUL; the toolkit would crash on it at spawn.
            raise ConfigError(
                f'hyperparameters.json: field "{name!s}": a NUL character cannot be passed '
                "as a command-line argument"
            )
        args += [_arg_name(name), value]
    return args


def _entry_module_name(entry_point: str) -> str:
    return entry_point[:-3] if entry_point.endswith(".py") else entry_point


def _which(program: str, environ: Mapping[str, str]) -> bool:
    import shutil

    return shutil.which(program, path=environ.get("PATH", os.defpath)) is not None


def detect_neuron_cores(instance_type: Any, environ: Mapping[str, str]) -> int:
    """The toolkit's ``num_neurons``: 64 on trn2.48xlarge, else the cores ``neuron-ls`` lists."""
    if isinstance(instance_type, str) and "trn2.48xlarge" in instance_type:
        return 64
    import shutil

    neuron_ls = shutil.which("neuron-ls", path=environ.get("PATH", os.defpath))
    if neuron_ls is None:
        return 0
    import subprocess  # here: not on every agent's way to its first rank (issue 18)

    try:
        out = subprocess.run(
            [neuron_ls, "-j"],
            capture_output=True,
            check=True,
            timeout=_NEURON_LS_TIMEOUT_S,
            env=dict(environ),
        ).stdout
        devices = json.loads(out.decode("utf-8"))
        return sum(int(d.get("nc_count", 0)) for d in devices)
    except (OSError, subprocess.SubprocessError, ValueError, TypeError, AttributeError):
        return 0  # the toolkit also reads a failing neuron-ls as "no Neuron cores"


def _instance_groups(config: JobConfig) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, group) per ``instance_groups`` entry, each name checked once here."""
    where = config.paths.resource_config_file
    groups = []
    for i, group in enumerate(config.resource.instance_groups):
        name = group.get("instance_group_name")
        if not isinstance(name, str):
            raise ConfigError(
                f'{where}: field "instance_groups[{i}].instance_group_name": '
                f"expected a group name (string), got {json.dumps(name)}"
            )
        groups.append((name, group))
    return groups


def _group_hosts(config: JobConfig, index: int, group: Mapping[str, Any]) -> list[Any]:
    hosts = group.get("hosts")
    if not isinstance(hosts, list):
        raise ConfigError(
            f'{config.paths.resource_config_file}: field "instance_groups[{index}].hosts": '
            f"expected a list of host names, got {json.dumps(hosts)}"
        )
    return hosts


def training_env(
    config: JobConfig,
    *,
    entry_point: str,
    num_gpus: int,
    num_cpus: int,
    num_neurons: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What the toolkit's ``Environment`` holds (``SM_TRAINING_ENV``), as a plain dict."""
    env = os.environ if environ is None else environ
    # Absolute, so a worker started in another directory still finds the tree.
    root = os.path.abspath(config.paths.root)
    code_dir = os.path.join(root, "code")
    input_dir = os.path.join(root, "input")
    output_dir = os.path.join(root, "output")
    hps = config.hyperparameters
    user_hps = config.user_hyperparameters
    # The toolkit's "additional" ones: SageMaker's keys less its own few.
    framework_params = {
        k: v for k, v in config.framework_parameters.items() if k not in FRAMEWORK_HYPERPARAMETERS
    }

    hosts = list(config.resource.hosts)
    resource: dict[str, Any] = dict(config.resource.raw)
    if not config.resource.from_file:
        # No resourceconfig.json (outside SageMaker): describe the one-host default.
        resource = {"current_host": config.resource.current_host, "hosts": hosts}
    current_host = config.resource.current_host
    instance_type = resource.get("current_instance_type", "local")
    current_group = resource.get("current_group_name", _DEFAULT_INSTANCE_GROUP)

    groups = _instance_groups(config)
    if "sagemaker_distribution_instance_groups" in framework_params:
        dist_groups = framework_params["sagemaker_distribution_instance_groups"]
        if not isinstance(dist_groups, list):
            raise ConfigError(
                f"{config.paths.hyperparameters_file}: field "
                '"sagemaker_distribution_instance_groups": expected a list of instance group '
                f"names, got {json.dumps(dist_groups)}"
            )
    else:
        enabled = any(framework_params.get(flag, False) for flag in _DISTRIBUTION_FLAGS)
        dist_groups = [current_group] if enabled else []
    if groups:
        dist_hosts: list[Any] = []
        for i, (name, group) in enumerate(groups):
            if name in dist_groups:
                dist_hosts.extend(_group_hosts(config, i, group))
    else:
        dist_hosts = list(hosts)  # no groups: the toolkit's local mode, every host
    current_group_hosts: list[Any] = []
    for i, (name, group) in enumerate(groups):
        if name == current_group:
            current_group_hosts = _group_hosts(config, i, group)
            break
    master = dist_hosts[0] if dist_hosts else hosts[0]

    mp_parameters = env.get("SM_HP_MP_PARAMETERS")
    if num_neurons is None:
        num_neurons = detect_neuron_cores(instance_type, env)

    return {
        "additional_framework_parameters": framework_params,
        "channel_input_dirs": {
            name: os.path.join(input_dir, "data", name) for name in config.channels
        },
        "current_host": current_host,
        "current_instance_group": current_group,
        "current_instance_group_hosts": current_group_hosts,
        "current_instance_type": instance_type,
        "distribution_hosts": dist_hosts,
        "distribution_instance_groups": dist_groups,
        "framework_module": env.get("SAGEMAKER_TRAINING_MODULE"),
        "hosts": hosts,
        "hyperparameters": user_hps,
        "input_config_dir": os.path.join(input_dir, "config"),
        "input_data_config": {name: dict(ch.raw) for name, ch in config.channels.items()},
        "input_dir": input_dir,
        "instance_groups": [name for name, _ in groups],
        "instance_groups_dict": {name: dict(group) for name, group in groups},
        "is_hetero": len(groups) > 1,
        "is_master": current_host == master,
        # The toolkit's own expression, kept so its None / "" / bool values carry over.
        "is_modelparallel_enabled": mp_parameters and mp_parameters != "{}",
        "is_smddpmprun_installed": _which("smddpmprun", env),
        "is_smddprun_installed": _which("smddprun", env),
        "job_name": env.get("TRAINING_JOB_NAME"),
        "log_level": hps.get("sagemaker_container_log_level", _DEFAULT_LOG_LEVEL),
        "master_hostname": master,
        "model_dir": os.path.join(root, "model"),
        "module_dir": str(hps.get("sagemaker_submit_directory", code_dir)),
        "module_name": _entry_module_name(entry_point),
        "network_interface_name": config.resource.network_interface_name,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "num_neurons": num_neurons,
        "output_data_dir": os.path.join(output_dir, "data"),
        "output_dir": output_dir,
        "output_intermediate_dir": os.path.join(output_dir, "intermediate"),
        "resource_config": resource,
        "topology": resource.get("topology", []),
        "user_entry_point": entry_point,
    }


def sm_environment(
    config: JobConfig,
    *,
    entry_point: str,
    num_gpus: int,
    num_cpus: int,
    num_neurons: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every variable the toolkit gives a worker, by name, for this host of the job.

    ``entry_point`` is the script (``train.py``) or module as SageMaker names it
    (``SM_USER_ENTRY_POINT``; ``SM_MODULE_NAME`` drops ``.py``). ``environ`` (default
    ``os.environ``) is read for the few values the toolkit takes from the environment.
    Besides ``SM_*``, the toolkit also sets ``CURRENT_HOST``, ``SAGEMAKER_JOB_NAME`` and
    ``SAGEMAKER_REGION`` for its child; they are here too. The caller decides precedence
    (smdist keeps a value already set in the container).
    """
    env = os.environ if environ is None else environ
    te = training_env(
        config,
        entry_point=entry_point,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        num_neurons=num_neurons,
        environ=env,
    )
    # Same keys, same order as Environment.to_env_vars, so name clashes resolve alike.
    named: dict[str, Any] = {
        "hosts": te["hosts"],
        "network_interface_name": te["network_interface_name"],
        "hps": te["hyperparameters"],
        "user_entry_point": te["user_entry_point"],
        "framework_params": te["additional_framework_parameters"],
        "resource_config": te["resource_config"],
        "input_data_config": te["input_data_config"],
        "output_data_dir": te["output_data_dir"],
        "channels": sorted(te["channel_input_dirs"]),
        "current_host": te["current_host"],
        "current_instance_type": te["current_instance_type"],
        "current_instance_group": te["current_instance_group"],
        "current_instance_group_hosts": te["current_instance_group_hosts"],
        "instance_groups": te["instance_groups"],
        "instance_groups_dict": te["instance_groups_dict"],
        "distribution_instance_groups": te["distribution_instance_groups"],
        "is_hetero": te["is_hetero"],
        "module_name": te["module_name"],
        "log_level": te["log_level"],
        "framework_module": te["framework_module"],
        "input_dir": te["input_dir"],
        "input_config_dir": te["input_config_dir"],
        "output_dir": te["output_dir"],
        "num_cpus": te["num_cpus"],
        "num_gpus": te["num_gpus"],
        "num_neurons": te["num_neurons"],
        "model_dir": te["model_dir"],
        "module_dir": te["module_dir"],
        "training_env": te,
        "user_args": hyperparameter_args(te["hyperparameters"]),
        "output_intermediate_dir": te["output_intermediate_dir"],
    }
    if te["topology"]:
        named["topology"] = te["topology"]
    for name, path in te["channel_input_dirs"].items():
        named[f"channel_{name}"] = path
    for name, value in te["hyperparameters"].items():
        named[f"hp_{name}"] = value

    result = {f"SM_{key.upper()}": _env_value(value) for key, value in named.items()}
    hps = config.hyperparameters
    region = hps.get("sagemaker_region", env.get("AWS_DEFAULT_REGION"))
    result["CURRENT_HOST"] = te["current_host"]
    result["SAGEMAKER_JOB_NAME"] = _text(hps.get("sagemaker_job_name", ""))
    result["SAGEMAKER_REGION"] = _text(region or "")
    _check_passable(config, te["hyperparameters"], result)
    return result


def _check_passable(
    config: JobConfig, user_hps: Mapping[str, Any], variables: Mapping[str, str]
) -> None:
    """execve refuses '=' in a name and NUL anywhere: name the input that made such a variable."""
    rule = "cannot hold '=' in its name or a NUL character"
    for name, value in user_hps.items():
        if "=" in name or "\0" in name or (isinstance(value, str) and "\0" in value):
            raise ConfigError(
                f"{config.paths.hyperparameters_file}: field {json.dumps(name)}: "
                f"becomes the environment variable SM_HP_<name>, which {rule}"
            )
    for name in config.channels:
        if "=" in name or "\0" in name:
            raise ConfigError(
                f"{config.paths.input_data_config_file}: channel {json.dumps(name)}: "
                f"becomes the environment variable SM_CHANNEL_<name>, which {rule}"
            )
    for var, value in variables.items():
        if "\0" in value:
            raise ConfigError(f"{config.paths.root}: the value of {var} would hold a NUL character")
