"""The SageMaker /opt/ml contract: paths and the three JSON files as immutable objects.

Every validation error names the file, the field and what was expected, in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from smdist import contract
from smdist.errors import ConfigError
from smdist.records import dataclass, field

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_ROOT = "/opt/ml"
ROOT_ENV = contract.OPT_ML_ENV
TRAINING_INPUT_MODES = ("File", "Pipe", "FastFile")


@dataclass(frozen=True)
class Paths:
    """The /opt/ml tree, rooted anywhere (tests and local runs use a temporary root)."""

    root: Path

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def input_config_dir(self) -> Path:
        return self.root / "input" / "config"

    @property
    def input_data_dir(self) -> Path:
        return self.root / "input" / "data"

    @property
    def resource_config_file(self) -> Path:
        return self.input_config_dir / "resourceconfig.json"

    @property
    def hyperparameters_file(self) -> Path:
        return self.input_config_dir / "hyperparameters.json"

    @property
    def input_data_config_file(self) -> Path:
        return self.input_config_dir / "inputdataconfig.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.root / "output" / "data"

    @property
    def output_intermediate_dir(self) -> Path:
        return self.root / "output" / "intermediate"

    @property
    def failure_file(self) -> Path:
        return self.root / "output" / "failure"

    @property
    def success_file(self) -> Path:
        return self.root / "output" / "success"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def code_dir(self) -> Path:
        return self.root / "code"

    def channel_dir(self, name: str) -> Path:
        return self.input_data_dir / name


def resolve_root(flag: str | None = None, environ: Mapping[str, str] | None = None) -> Paths:
    """``--opt-ml`` wins over ``SMDIST_OPT_ML``, which wins over /opt/ml."""
    env = os.environ if environ is None else environ
    return Paths(Path(flag or env.get(ROOT_ENV) or DEFAULT_ROOT))


@dataclass(frozen=True)
class ResourceConfig:
    current_host: str
    hosts: tuple[str, ...]
    network_interface_name: str = "eth0"
    instance_groups: tuple[Mapping[str, Any], ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    from_file: bool = True


@dataclass(frozen=True)
class Channel:
    name: str
    training_input_mode: str = "File"
    content_type: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class JobConfig:
    paths: Paths
    resource: ResourceConfig
    hyperparameters: Mapping[str, Any]
    """Every key of hyperparameters.json, values decoded (framework keys included)."""
    channels: Mapping[str, Channel]

    @property
    def user_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters meant for the user's script (no SageMaker keys)."""
        hps = self.hyperparameters
        return {k: v for k, v in hps.items() if not contract.is_framework_hyperparameter(k)}

    @property
    def framework_parameters(self) -> dict[str, Any]:
        """SageMaker's keys (``sagemaker_*`` and the toolkit's own few)."""
        hps = self.hyperparameters
        return {k: v for k, v in hps.items() if contract.is_framework_hyperparameter(k)}


def decode_hyperparameter(value: Any) -> Any:
    """SageMaker writes every value as a string: decode it as JSON where it parses.

    ``"1e3"`` -> 1000.0, ``"true"`` -> True, ``"[64, 32]"`` -> [64, 32],
    ``"\\"abc\\""`` -> ``abc``; ``"0123"`` is not JSON and stays ``"0123"``.
    """
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _read_json(path: Path) -> Any | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc


def _fail(path: Path, field_name: str, expected: str, got: Any) -> ConfigError:
    shown = json.dumps(got) if not isinstance(got, _Missing) else "nothing"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f'{path}: field "{field_name}": expected {expected}, got {shown}')


class _Missing:
    pass


_MISSING = _Missing()


def load_resource_config(path: Path) -> ResourceConfig:
    data = _read_json(path)
    if data is None:
        # No file: a job outside SageMaker, one host. The agent logs this default.
        return ResourceConfig(current_host="algo-1", hosts=("algo-1",), from_file=False)
    if not isinstance(data, dict):
        raise _fail(path, "(top level)", "a JSON object", data)
    hosts = data.get("hosts", _MISSING)
    if (
        not isinstance(hosts, list)
        or not hosts
        or not all(isinstance(h, str) and h for h in hosts)
        or len(set(hosts)) != len(hosts)
    ):
        raise _fail(path, "hosts", "a non-empty list of unique host names", hosts)
    current = data.get("current_host", _MISSING)
    if not isinstance(current, str) or not current:
        raise _fail(path, "current_host", "a host name (string)", current)
    if current not in hosts:
        raise _fail(path, "current_host", f"one of hosts {json.dumps(hosts)}", current)
    iface = data.get("network_interface_name", "eth0")
    if not isinstance(iface, str) or not iface:
        raise _fail(path, "network_interface_name", "an interface name (string)", iface)
    groups = data.get("instance_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _fail(path, "instance_groups", "a list of objects", groups)
    return ResourceConfig(
        current_host=current,
        hosts=tuple(hosts),
        network_interface_name=iface,
        instance_groups=tuple(groups),
        raw=data,
    )


def load_hyperparameters(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(path, "(top level)", "a JSON object of name -> value", data)
    return {str(k): decode_hyperparameter(v) for k, v in data.items()}


def load_channels(path: Path) -> dict[str, Channel]:
    data = _read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _fail(path, "(top level)", "a JSON object of channel name -> settings", data)
    channels: dict[str, Channel] = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise _fail(path, name, "an object with TrainingInputMode", spec)
        mode = spec.get("TrainingInputMode", "File")
        if mode not in TRAINING_INPUT_MODES:
            raise _fail(path, f"{name}.TrainingInputMode", " or ".join(TRAINING_INPUT_MODES), mode)
        ctype = spec.get("ContentType")
        if ctype is not None and not isinstance(ctype, str):
            raise _fail(path, f"{name}.ContentType", "a string", ctype)
        channels[name] = Channel(name=name, training_input_mode=mode, content_type=ctype, raw=spec)
    return channels


def load(paths: Paths) -> JobConfig:
    """Read and validate the three files; a missing optional file means empty."""
    return JobConfig(
        paths=paths,
        resource=load_resource_config(paths.resource_config_file),
        hyperparameters=load_hyperparameters(paths.hyperparameters_file),
        channels=load_channels(paths.input_data_config_file),
    )
