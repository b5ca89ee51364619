"""Script mode's launch rules: processes per host the toolkit's way, the SDK's distribution
keys honoured or refused by name, the network environment, the success file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from smdist import config as cfg
from smdist.agent import distribution, network_env
from smdist.errors import ConfigError
from tests.helpers import TRAIN, env, make_tree, run, write_script

RANK_SCRIPT = """
import json, os
keys = ["RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NCCL_SOCKET_IFNAME", "FI_PROVIDER"]
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{os.environ['RANK']}.json")
with open(out, "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""


def _script_job(root: Path, **hps: Any) -> Path:
    make_tree(
        root,
        hyperparameters={"sagemaker_program": '"train.py"', **hps},
        resource_extra={"network_interface_name": "lo"},
    )
    (root / "code").mkdir()
    (root / "code" / "train.py").write_text(RANK_SCRIPT)
    return root


def _train(root: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAIN, "--opt-ml", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(**extra),
    )


def _ranks(root: Path) -> list[dict[str, Any]]:
    files = sorted((root / "output" / "data").glob("rank-*.json"))
    return [json.loads(f.read_text()) for f in files]


# Two GPUs as CUDA_VISIBLE_DEVICES names them: topology counts its entries (as CUDA does)
# without touching a device, so the rule is tested on this CPU-only machine; no GPU is used.
TWO_GPUS = {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_script_mode_without_a_distribution_runs_one_process_per_host(tmp_path: Path) -> None:
    root = _script_job(tmp_path)
    r = _train(root, **TWO_GPUS)
    assert r.returncode == 0, r.stderr
    assert [rank["WORLD_SIZE"] for rank in _ranks(root)] == ["1"]
    assert "processes per host: 1 (script mode without a distribution setting" in r.stderr
    assert (root / "output" / "success").is_file()


def test_torch_distributed_runs_one_process_per_gpu(tmp_path: Path) -> None:
    root = _script_job(tmp_path, sagemaker_torch_distributed_enabled="true")
    r = _train(root, **TWO_GPUS)
    assert r.returncode == 0, r.stderr
    ranks = _ranks(root)
    assert [x["LOCAL_WORLD_SIZE"] for x in ranks] == ["2", "2"]
    assert "processes per host: 2 (sagemaker_torch_distributed_enabled; 2 GPU(s) visible)" in (
        r.stderr
    )
    # The network environment: from network_interface_name; no EFA on this machine.
    assert all(x["NCCL_SOCKET_IFNAME"] == "lo" and x["FI_PROVIDER"] is None for x in ranks)
    assert "network environment for the workers: NCCL_SOCKET_IFNAME; no EFA devices" in r.stderr


@pytest.mark.parametrize(("value", "expected"), [("auto", 2), ("3", 3)])
def test_an_explicit_count_wins_in_script_mode(tmp_path: Path, value: str, expected: int) -> None:
    root = _script_job(tmp_path)
    r = _train(root, SMDIST_NPROC_PER_HOST=value, **TWO_GPUS)
    assert r.returncode == 0, r.stderr
    assert len(_ranks(root)) == expected


def test_outside_script_mode_auto_is_one_per_gpu(tmp_path: Path) -> None:
    script = write_script(tmp_path / "train.py", RANK_SCRIPT)
    root = make_tree(tmp_path / "opt_ml")
    r = run(["--opt-ml", str(root), str(script)], **TWO_GPUS)
    assert r.returncode == 0, r.stderr
    assert len(_ranks(root)) == 2


def test_a_user_variable_is_never_overridden_and_a_failure_leaves_no_success_file(
    tmp_path: Path,
) -> None:
    root = _script_job(tmp_path, sagemaker_torch_distributed_enabled="true")
    (root / "output").mkdir(parents=True, exist_ok=True)
    (root / "output" / "success").write_text("")  # a previous run's
    (root / "code" / "train.py").write_text(RANK_SCRIPT + "\nraise SystemExit(3)\n")
    r = _train(root, NCCL_SOCKET_IFNAME="ens5")
    assert r.returncode == 3
    assert _ranks(root)[0]["NCCL_SOCKET_IFNAME"] == "ens5"
    assert "kept your NCCL_SOCKET_IFNAME" in r.stderr
    assert not (root / "output" / "success").exists()


# --- distribution keys ------------------------------------------------------------------


def _config(tmp_path: Path, hps: dict[str, Any], **resource: Any) -> cfg.JobConfig:
    hosts = resource.pop("hosts", ["algo-1"])
    root = make_tree(
        tmp_path,
        hosts[0],
        hosts,
        hyperparameters={k: json.dumps(v) for k, v in hps.items()},
        resource_extra=resource,
    )
    return cfg.load(cfg.Paths(root))


@pytest.mark.parametrize("key", sorted(distribution.REFUSED))
def test_a_distribution_smdist_cannot_run_is_refused_naming_the_key(
    tmp_path: Path, key: str
) -> None:
    value = {"partitions": 2} if key == "mp_parameters" else True
    config = _config(tmp_path, {key: value, "sagemaker_mpi_enabled": True})
    with pytest.raises(ConfigError) as info:
        distribution.read(config)
    line = info.value.headline()
    assert line.startswith(f'ConfigError: {config.paths.hyperparameters_file}: field "{key}": ')
    assert line.endswith("instead") and "\n" not in line


def test_refused_keys_end_to_end_leave_a_failure_file(tmp_path: Path) -> None:
    root = _script_job(tmp_path, sagemaker_distributed_dataparallel_enabled="true")
    r = _train(root)
    assert r.returncode == 2
    first = (root / "output" / "failure").read_text().splitlines()[0]
    assert 'field "sagemaker_distributed_dataparallel_enabled": SageMaker\'s distributed' in first
    assert 'use distribution={"torch_distributed": {"enabled": True}} (NCCL) instead' in first


@pytest.mark.parametrize(
    ("hps", "key"),
    [
        ({"sagemaker_torch_distributed_enabled": True}, "sagemaker_torch_distributed_enabled"),
        ({"sagemaker_pytorch_ddp_enabled": True}, "sagemaker_pytorch_ddp_enabled"),
        (
            {
                "sagemaker_mpi_enabled": True,
                "sagemaker_mpi_num_of_processes_per_host": 4,
                "sagemaker_mpi_custom_mpi_options": "-x NCCL_DEBUG",
            },
            "sagemaker_mpi_enabled",
        ),
        ({"sagemaker_torch_distributed_enabled": False}, None),
        ({"sagemaker_distributed_dataparallel_enabled": False}, None),
        ({"mp_parameters": {}}, None),
    ],
)
def test_honoured_distributions(tmp_path: Path, hps: dict[str, Any], key: str | None) -> None:
    assert distribution.read(_config(tmp_path, hps)).key == key


def test_torch_distributed_and_mpi_together_are_refused(tmp_path: Path) -> None:
    hps = {"sagemaker_torch_distributed_enabled": True, "sagemaker_mpi_enabled": True}
    with pytest.raises(ConfigError, match='field "sagemaker_mpi_enabled": both'):
        distribution.read(_config(tmp_path, hps))


GROUPS = {
    "hosts": ["algo-1", "algo-2", "algo-3"],
    "instance_groups": [
        {"instance_group_name": "train", "instance_type": "ml.p4d.24xlarge",
         "hosts": ["algo-2", "algo-3"]},
        {"instance_group_name": "data", "instance_type": "ml.c5.xlarge", "hosts": ["algo-1"]},
    ],
}  # fmt: skip


def test_instance_groups_choose_the_world(tmp_path: Path) -> None:
    hps = {"sagemaker_torch_distributed_enabled": True,
           "sagemaker_distribution_instance_groups": ["train"]}  # fmt: skip
    dist = distribution.read(_config(tmp_path, hps, **GROUPS))
    assert dist.world_hosts == ("algo-2", "algo-3") and dist.groups == ("train",)


def test_several_groups_without_distribution_instance_groups_is_refused(tmp_path: Path) -> None:
    """The toolkit's default (the current group) would train each group as its own job."""
    with pytest.raises(ConfigError, match='field "sagemaker_distribution_instance_groups": miss'):
        distribution.read(
            _config(tmp_path, {"sagemaker_torch_distributed_enabled": True}, **GROUPS)
        )


def test_an_unknown_distribution_group_is_named(tmp_path: Path) -> None:
    hps = {"sagemaker_distribution_instance_groups": ["trian"]}
    with pytest.raises(ConfigError, match="trian not among the instance groups"):
        distribution.read(_config(tmp_path, hps, **GROUPS))


# --- EFA --------------------------------------------------------------------------------


def _ib_device(sysfs: Path, name: str, driver: str, pci: str) -> None:
    drivers = sysfs / "bus" / "pci" / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    dev = sysfs / "class" / "infiniband" / name / "device"
    dev.mkdir(parents=True)
    os.symlink(drivers, dev / "driver")
    (dev / "device").write_text(pci + "\n")


def test_efa_environment_from_a_fake_sysfs(tmp_path: Path) -> None:
    """EFA hardware cannot exist on this machine: a sysfs tree laid out as the kernel lays it
    out (class/infiniband/<dev>/device/driver -> the efa driver) stands in for it."""
    sysfs = tmp_path / "sys"
    _ib_device(sysfs, "efa_0", "efa", "0xefa1")
    _ib_device(sysfs, "efa_1", "efa", "0xefa1")
    _ib_device(sysfs, "mlx5_0", "mlx5_core", "0x1017")  # InfiniBand, but not EFA
    config = _config(tmp_path / "job", {}, network_interface_name="ens32")
    net = network_env.network_environment(config, {}, sysfs)
    assert dict(net.variables) == {
        "NCCL_SOCKET_IFNAME": "ens32",
        "FI_PROVIDER": "efa",
        "RDMAV_FORK_SAFE": "1",
        "FI_EFA_USE_DEVICE_RDMA": "1",
    }
    assert "EFA: 2 device(s) (efa_0, efa_1), with RDMA" in net.describe()

    mine = network_env.network_environment(config, {"FI_PROVIDER": "tcp"}, sysfs)
    assert "FI_PROVIDER" not in mine.variables and mine.kept == ("FI_PROVIDER",)


def test_first_generation_efa_gets_no_device_rdma(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    _ib_device(sysfs, "efa_0", "efa", "0xefa0")
    net = network_env.network_environment(_config(tmp_path / "job", {}), {}, sysfs)
    assert dict(net.variables) == {"FI_PROVIDER": "efa", "RDMAV_FORK_SAFE": "1"}


def test_no_efa_no_interface_name_sets_nothing(tmp_path: Path) -> None:
    net = network_env.network_environment(_config(tmp_path / "job", {}), {}, tmp_path / "none")
    assert dict(net.variables) == {} and net.efa == ()
