"""SM_* variables and script arguments, pinned against the real sagemaker-training toolkit.

Each case writes an /opt/ml tree, runs the toolkit's own ``Environment`` in a subprocess
with ``SAGEMAKER_BASE_DIR`` at that tree (its module globals are computed from it at import),
and compares every variable and the argument list with ``smdist.agent.sm_env`` on the same tree.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smdist import config as smconfig
from smdist.agent.sm_env import hyperparameter_args, sm_environment
from smdist.contract import FRAMEWORK_HYPERPARAMETERS
from smdist.errors import ConfigError

TOOLKIT_SCRIPT = r"""
import json, os, sys
from sagemaker_training import environment
env = environment.Environment()
extra = ("CURRENT_HOST", "SAGEMAKER_JOB_NAME", "SAGEMAKER_REGION")
out = {
    "vars": env.to_env_vars(),
    "args": env.to_cmd_args(),
    "extra": {k: os.environ[k] for k in extra},
}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""

# The variables issue 3 names; every case must produce them (beside the toolkit's others).
REQUIRED = {
    "SM_MODEL_DIR",
    "SM_INPUT_DIR",
    "SM_INPUT_CONFIG_DIR",
    "SM_OUTPUT_DIR",
    "SM_OUTPUT_DATA_DIR",
    "SM_OUTPUT_INTERMEDIATE_DIR",
    "SM_CHANNELS",
    "SM_HPS",
    "SM_USER_ARGS",
    "SM_HOSTS",
    "SM_CURRENT_HOST",
    "SM_NUM_GPUS",
    "SM_NUM_CPUS",
    "SM_NETWORK_INTERFACE_NAME",
    "SM_USER_ENTRY_POINT",
    "SM_RESOURCE_CONFIG",
    "SM_INPUT_DATA_CONFIG",
    "SM_TRAINING_ENV",
    "SM_MODULE_NAME",
    "SM_LOG_LEVEL",
    "SM_FRAMEWORK_PARAMS",
}

# As SageMaker writes them: every value a string, decoded as JSON where it parses.
TWO_HOST_HPS: dict[str, Any] = {
    "lr": "0.01",
    "LR": "0.5",  # same SM_HP_LR as "lr": the later key wins, in the toolkit as here
    "epochs": "10",
    "b": "true",
    "layers": "[64, 32]",
    "nested": json.dumps({"opt": {"name": "adam", "betas": [0.9, 0.999]}, "wd": None}),
    "zip": "0123",
    "quoted": '"42"',
    "sci": "1e3",
    "nothing": "null",
    "phrase": "hello world --not-a-flag",
    "unicode": "héllo ✓ \"q\" 'q'",
    "neg": "-5",
    "big": "123456789012345678901234567890",
    "learning-rate": "3e-4",
    "empty": "",
    "nan": "NaN",
    "sagemaker_program": '"train.py"',
    "sagemaker_submit_directory": '"s3://bucket/job/source/sourcedir.tar.gz"',
    "sagemaker_container_log_level": "20",
    "sagemaker_job_name": '"smdist-job-1"',
    "sagemaker_region": '"us-west-2"',
    "sagemaker_distributed_dataparallel_enabled": "false",
    "sagemaker_torch_distributed_enabled": "true",
    "sagemaker_instance_type": '"ml.p4d.24xlarge"',
    "_tuning_objective_metric": '"validation:loss"',
}

TWO_HOST_CHANNELS = {
    "train": {
        "ContentType": "application/x-npy",
        "TrainingInputMode": "File",
        "S3DistributionType": "FullyReplicated",
        "RecordWrapperType": "None",
    },
    "eval": {
        "TrainingInputMode": "Pipe",
        "S3DistributionType": "ShardedByS3Key",
        "RecordWrapperType": "RecordIO",
    },
    "Test-Set": {"TrainingInputMode": "FastFile"},
}


def _two_host_resource(current: str) -> dict[str, Any]:
    return {
        "current_host": current,
        "hosts": ["algo-1", "algo-2"],
        "network_interface_name": "ethwe",
        "current_instance_type": "ml.p4d.24xlarge",
        "current_group_name": "homogeneousCluster",
        "instance_groups": [
            {
                "instance_group_name": "homogeneousCluster",
                "instance_type": "ml.p4d.24xlarge",
                "hosts": ["algo-1", "algo-2"],
            }
        ],
    }


@dataclass
class Case:
    name: str
    resource: dict[str, Any]
    hyperparameters: dict[str, Any]
    channels: dict[str, Any]
    entry_point: str
    env: dict[str, str] = field(default_factory=dict)
    # Executables put on PATH (name -> stdout): real programs the toolkit and smdist probe.
    tools: dict[str, str] = field(default_factory=dict)


CASES = [
    Case(
        "two-hosts-algo-1",
        _two_host_resource("algo-1"),
        TWO_HOST_HPS,
        TWO_HOST_CHANNELS,
        entry_point="train.py",
    ),
    Case(
        "two-hosts-algo-2",
        _two_host_resource("algo-2"),
        TWO_HOST_HPS,
        TWO_HOST_CHANNELS,
        entry_point="train.py",
    ),
    Case(
        "heterogeneous-unsorted",
        {
            "current_host": "algo-3",
            "hosts": ["algo-3", "algo-10", "algo-2"],
            "current_group_name": "data-group",
            "current_instance_type": "ml.c5.18xlarge",
            "instance_groups": [
                {
                    "instance_group_name": "train-group",
                    "instance_type": "ml.p4d.24xlarge",
                    "hosts": ["algo-2", "algo-10"],
                },
                {
                    "instance_group_name": "data-group",
                    "instance_type": "ml.c5.18xlarge",
                    "hosts": ["algo-3"],
                },
            ],
            "topology": [
                {"hostName": "algo-2", "capacityUnitId": "cu-1"},
                {"hostName": "algo-10", "capacityUnitId": "cu-1"},
            ],
        },
        {
            "sagemaker_distribution_instance_groups": '["train-group"]',
            "sagemaker_mpi_enabled": "true",
            "x": "1",
            "raw_int": 7,  # not a string: both keep it as is
            "default_user_module_name": '"my_module"',
            "sagemaker_s3_output": '"s3://bucket/out"',
        },
        {},
        entry_point="train.py",
        env={
            "SAGEMAKER_PROGRAM": "train.py",
            "TRAINING_JOB_NAME": "hetero-job",
            "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
            "SM_HP_MP_PARAMETERS": '{"partitions": 2}',
            "AWS_DEFAULT_REGION": "eu-west-1",
        },
    ),
    Case(
        "single-host-neuron-tools",
        {"current_host": "algo-1", "hosts": ["algo-1"]},
        {},
        {"training": {"TrainingInputMode": "File"}},
        entry_point="launch.sh",
        env={"SAGEMAKER_PROGRAM": "launch.sh", "SM_HP_MP_PARAMETERS": "{}"},
        tools={"neuron-ls": '[{"nc_count": 2}, {"nc_count": 6}]', "smddprun": ""},
    ),
    Case(
        "trn2-ddp",
        {
            "current_host": "algo-1",
            "hosts": ["algo-1"],
            "current_instance_type": "ml.trn2.48xlarge",
        },
        {
            "sagemaker_pytorch_ddp_enabled": "true",
            "sagemaker_program": "train.py",  # not JSON: kept as the string
            "sagemaker_container_log_level": '"10"',
            "a": '"x"',
            "z": "[]",
        },
        {"train": {"TrainingInputMode": "Pipe"}},
        entry_point="train.py",
        env={"SM_HP_MP_PARAMETERS": "", "AWS_DEFAULT_REGION": "ap-south-1"},
        tools={"smddpmprun": ""},
    ),
]


@dataclass
class Run:
    case: Case
    root: Path
    environ: dict[str, str]
    toolkit: dict[str, Any]


def _write_tree(root: Path, case: Case) -> None:
    cfg = root / "input" / "config"
    cfg.mkdir(parents=True)
    (cfg / "resourceconfig.json").write_text(json.dumps(case.resource), encoding="utf-8")
    (cfg / "hyperparameters.json").write_text(
        json.dumps(case.hyperparameters, ensure_ascii=False), encoding="utf-8"
    )
    (cfg / "inputdataconfig.json").write_text(json.dumps(case.channels), encoding="utf-8")
    for name in case.channels:
        (root / "input" / "data" / name).mkdir(parents=True)


def _environ(base: Path, case: Case) -> dict[str, str]:
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for tool, stdout in case.tools.items():
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\necho '{stdout}'\n", encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    # A closed environment: no AWS config file or credentials from this machine leak in.
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(base),
        "AWS_CONFIG_FILE": str(base / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(base / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "LANG": "C.UTF-8",
        **case.env,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every case's tree and the toolkit's answer for it (toolkit runs in parallel)."""
    started = []
    for case in CASES:
        base = tmp_path_factory.mktemp(case.name)
        root = base / "opt" / "ml"
        _write_tree(root, case)
        environ = _environ(base, case)
        out = base / "toolkit.json"
        proc = subprocess.Popen(
            [sys.executable, "-c", TOOLKIT_SCRIPT, str(out)],
            env={**environ, "SAGEMAKER_BASE_DIR": str(root)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        started.append((case, root, environ, out, proc))
    result = {}
    for case, root, environ, out, proc in started:
        log, _ = proc.communicate(timeout=120)  # hang guard only
        assert proc.returncode == 0, f"toolkit failed on {case.name}:\n{log.decode()}"
        toolkit = json.loads(out.read_text(encoding="utf-8"))
        result[case.name] = Run(case, root, environ, toolkit)
    yield result


def _mine(run: Run, **overrides: Any) -> dict[str, str]:
    tk = run.toolkit["vars"]
    # The toolkit probes nvidia-smi and cpu_count itself; the agent passes its own counts.
    kwargs: dict[str, Any] = {
        "entry_point": run.case.entry_point,
        "num_gpus": int(tk["SM_NUM_GPUS"]),
        "num_cpus": int(tk["SM_NUM_CPUS"]),
        "environ": run.environ,
    }
    kwargs.update(overrides)
    cfg = smconfig.load(smconfig.Paths(run.root))
    return sm_environment(cfg, **kwargs)


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_variables_match_the_toolkit(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    mine = _mine(run)
    expected = {**run.toolkit["vars"], **run.toolkit["extra"]}
    assert set(mine) >= REQUIRED
    assert sorted(mine) == sorted(expected)
    for name, value in expected.items():
        assert mine[name] == value, name
    # The same document, not only the same text: easier to read when it fails.
    assert json.loads(mine["SM_TRAINING_ENV"]) == json.loads(expected["SM_TRAINING_ENV"])


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_arguments_match_the_toolkit(runs: dict[str, Run], case: str) -> None:
    run = runs[case]
    cfg = smconfig.load(smconfig.Paths(run.root))
    assert hyperparameter_args(cfg.user_hyperparameters) == run.toolkit["args"]
    # Every key may be passed: SageMaker's own keys never become arguments.
    assert hyperparameter_args(cfg.hyperparameters) == run.toolkit["args"]
    assert json.loads(_mine(run)["SM_USER_ARGS"]) == run.toolkit["args"]


def test_what_a_script_reads_on_the_second_host(runs: dict[str, Run]) -> None:
    """Spot values a SageMaker script relies on, written out rather than taken from the toolkit."""
    run = runs["two-hosts-algo-2"]
    root = str(run.root)
    env = _mine(run, num_gpus=8, num_cpus=96)
    assert env["SM_MODEL_DIR"] == f"{root}/model"
    assert env["SM_CHANNEL_TRAIN"] == f"{root}/input/data/train"
    assert env["SM_CHANNEL_EVAL"] == f"{root}/input/data/eval"  # Pipe mode: same directory
    assert env["SM_CHANNEL_TEST-SET"] == f"{root}/input/data/Test-Set"
    assert json.loads(env["SM_CHANNELS"]) == ["Test-Set", "eval", "train"]
    assert env["SM_OUTPUT_DATA_DIR"] == f"{root}/output/data"
    assert env["SM_CURRENT_HOST"] == env["CURRENT_HOST"] == "algo-2"
    assert json.loads(env["SM_HOSTS"]) == ["algo-1", "algo-2"]
    assert env["SM_NETWORK_INTERFACE_NAME"] == "ethwe"
    assert (env["SM_NUM_GPUS"], env["SM_NUM_CPUS"]) == ("8", "96")
    assert env["SM_USER_ENTRY_POINT"] == "train.py"
    assert env["SM_MODULE_NAME"] == "train"
    assert env["SM_HP_ZIP"] == "0123"
    assert env["SM_HP_QUOTED"] == "42"
    assert env["SM_HP_SCI"] == "1000.0"
    assert env["SM_HP_B"] == "true"
    assert env["SM_HP_LR"] == "0.5"
    assert env["SM_HP_NOTHING"] == ""
    assert "SM_HP_SAGEMAKER_PROGRAM" not in env
    assert "SM_HP__TUNING_OBJECTIVE_METRIC" not in env
    assert json.loads(env["SM_FRAMEWORK_PARAMS"]) == {
        "sagemaker_distributed_dataparallel_enabled": False,
        "sagemaker_instance_type": "ml.p4d.24xlarge",
        "sagemaker_torch_distributed_enabled": True,
    }
    assert env["SAGEMAKER_JOB_NAME"] == "smdist-job-1"
    assert env["SAGEMAKER_REGION"] == "us-west-2"
    training = json.loads(env["SM_TRAINING_ENV"])
    assert (training["master_hostname"], training["is_master"]) == ("algo-1", False)
    args = json.loads(env["SM_USER_ARGS"])
    assert args[:4] == ["--LR", "0.5", "-b", "True"]
    assert args[args.index("--zip") : args.index("--zip") + 2] == ["--zip", "0123"]
    i = args.index("--nested")
    assert args[i + 1] == "opt={'name': 'adam', 'betas': [0.9, 0.999]},wd=None"


def test_toolkit_framework_keys_are_the_ones_smdist_knows() -> None:
    from sagemaker_training import params  # test-only dependency; no base dir needed

    assert set(FRAMEWORK_HYPERPARAMETERS) == set(params.SAGEMAKER_HYPERPARAMETERS)


@pytest.mark.parametrize(
    "hps",
    [
        {"a": 1, "bb": 2.5, "c": None, "dd": True, "e": [1, "x", None]},
        {"ü": "ünï", "-": "-", "": "empty-name", "x y": "a b", "dict": {"k": {"z": 1}, "a": []}},
        {"n": float("inf"), "m": -0.0, "big": 10**30, "s": "1e3", "t": 'say "hi"'},
    ],
)
def test_argument_formatting_matches_to_cmd_args(hps: Mapping[str, Any]) -> None:
    from sagemaker_training import mapping  # pure functions: import without a tree

    assert hyperparameter_args(hps) == mapping.to_cmd_args(hps)


def _tree(tmp_path: Path, hps: Mapping[str, Any], resource: Mapping[str, Any] | None = None) -> Any:
    case = Case(
        "bad",
        dict(resource or {"current_host": "algo-1", "hosts": ["algo-1"]}),
        dict(hps),
        {},
        "train.py",
    )
    root = tmp_path / "ml"
    _write_tree(root, case)
    return smconfig.load(smconfig.Paths(root))


def test_a_hyperparameter_name_with_equals_sign_is_refused_by_name(tmp_path: Path) -> None:
    cfg = _tree(tmp_path, {"a=b": "1"})
    with pytest.raises(ConfigError) as err:
        sm_environment(cfg, entry_point="train.py", num_gpus=0, num_cpus=1, environ={})
    msg = str(err.value)
    assert "hyperparameters.json" in msg and '"a=b"' in msg and "\n" not in msg


def test_a_nul_character_in_a_value_is_refused_by_name(tmp_path: Path) -> None:
    cfg = _tree(tmp_path, {"tag": "x\u0000y"})
    with pytest.raises(ConfigError, match=r'hyperparameters\.json: field "tag"'):
        sm_environment(cfg, entry_point="train.py", num_gpus=0, num_cpus=1, environ={})
    with pytest.raises(ConfigError, match='"tag"'):
        hyperparameter_args(cfg.user_hyperparameters)


def test_an_instance_group_without_a_name_is_refused_by_field(tmp_path: Path) -> None:
    resource = {
        "current_host": "algo-1",
        "hosts": ["algo-1"],
        "instance_groups": [{"hosts": ["algo-1"]}],
    }
    cfg = _tree(tmp_path, {}, resource)
    with pytest.raises(ConfigError, match=r'resourceconfig\.json: field "instance_groups\[0\]'):
        sm_environment(cfg, entry_point="train.py", num_gpus=0, num_cpus=1, environ={})


def test_distribution_instance_groups_must_be_a_list(tmp_path: Path) -> None:
    cfg = _tree(tmp_path, {"sagemaker_distribution_instance_groups": '"train-group"'})
    with pytest.raises(ConfigError, match="sagemaker_distribution_instance_groups"):
        sm_environment(cfg, entry_point="train.py", num_gpus=0, num_cpus=1, environ={})


def test_importing_sm_env_stays_cheap() -> None:
    code = (
        "import sys, smdist.agent.sm_env; "
        "bad = [m for m in ('torch', 'sagemaker_training', 'boto3') if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 0, done.stderr


def test_a_tree_without_config_files_is_one_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The toolkit cannot run here (it needs the files); smdist's documented default.
    root = tmp_path / "ml"
    root.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = smconfig.load(smconfig.Paths(Path("ml")))  # relative, as `--opt-ml ml` gives it
    env = sm_environment(cfg, entry_point="train.py", num_gpus=0, num_cpus=2, environ={})
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"]
    assert env["SM_CURRENT_HOST"] == "algo-1"
    assert json.loads(env["SM_CHANNELS"]) == []
    assert json.loads(env["SM_USER_ARGS"]) == []
    assert json.loads(env["SM_RESOURCE_CONFIG"]) == {"current_host": "algo-1", "hosts": ["algo-1"]}
    # Absolute: a worker started in another directory still finds the tree.
    assert env["SM_MODEL_DIR"] == f"{root}/model"
    assert env["SM_OUTPUT_DIR"] == f"{root}/output"


DUMP_SCRIPT = r"""
import json, os, sys
names = [k for k in os.environ if k.startswith("SM_")]
names += ["CURRENT_HOST", "SAGEMAKER_JOB_NAME", "SAGEMAKER_REGION"]
with open(os.environ["SM_ENV_TEST_OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in names}}, f)
"""


def test_a_worker_started_by_smdist_run_sees_what_the_toolkit_gives(
    runs: dict[str, Run], tmp_path: Path
) -> None:
    run = runs["trn2-ddp"]
    script = run.root / "code" / "train.py"  # the toolkit created code/; sagemaker_program
    script.write_text(DUMP_SCRIPT, encoding="utf-8")
    out = tmp_path / "worker.json"
    repo = Path(smconfig.__file__).resolve().parent.parent
    env = {**run.environ, "PYTHONPATH": str(repo), "SM_ENV_TEST_OUT": str(out)}
    done = subprocess.run(
        [sys.executable, "-m", "smdist.agent.cli", "--opt-ml", str(run.root), str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # hang guard only
    )
    assert done.returncode == 0, done.stdout + done.stderr
    worker = json.loads(out.read_text(encoding="utf-8"))
    got = worker["env"]
    want = {**run.toolkit["vars"], **run.toolkit["extra"]}
    got_te = json.loads(got.pop("SM_TRAINING_ENV"))
    want_te = json.loads(want.pop("SM_TRAINING_ENV"))
    if want["SM_NUM_GPUS"] != "0":
        # GPU machine: the toolkit counts every GPU nvidia-smi lists, the agent honours
        # CUDA_VISIBLE_DEVICES (topology's detection, tested there).
        for d in (got, want):
            d.pop("SM_NUM_GPUS")
        for d in (got_te, want_te):
            d.pop("num_gpus")
    assert got_te == want_te
    assert {k: got.get(k) for k in want} == want
    assert worker["argv"] == run.toolkit["args"]
