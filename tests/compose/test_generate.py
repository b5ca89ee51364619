"""compose/generate.py without Docker: the files each host gets, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compose.generate import host_names, main, render, write_job
from smdist.config import load_resource_config

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"


def test_each_host_gets_its_own_resourceconfig_and_dirs(tmp_path: Path) -> None:
    hosts = host_names(3)
    compose_file = write_job(tmp_path, hosts, ["train"], hyperparameters={"epochs": 2})
    assert compose_file == tmp_path / "docker-compose.yml"
    for host in hosts:
        host_dir = tmp_path / "hosts" / host
        config = load_resource_config(host_dir / "input" / "config" / "resourceconfig.json")
        assert config.current_host == host and config.hosts == ("algo-1", "algo-2", "algo-3")
        hp = json.loads((host_dir / "input" / "config" / "hyperparameters.json").read_text())
        assert hp == {"epochs": "2"}  # SageMaker's encoding: every value a JSON string
        assert (host_dir / "model").is_dir() and (host_dir / "output").is_dir()
        assert (host_dir / "checkpoints").is_dir()
    text = compose_file.read_text()
    for host in hosts:
        assert f'hostname: "{host}"' in text
        assert f'"./hosts/{host}/model:/opt/ml/model"' in text
        assert f'"./hosts/{host}/checkpoints:/opt/ml/checkpoints"' in text
        assert f'"./hosts/{host}/input/config:/opt/ml/input/config:ro"' in text


def test_resourceconfig_may_name_a_host_without_a_container(tmp_path: Path) -> None:
    write_job(tmp_path, ["algo-1"], ["train"], resource_hosts=["algo-1", "algo-2"])
    config = load_resource_config(tmp_path / "hosts/algo-1/input/config/resourceconfig.json")
    assert config.hosts == ("algo-1", "algo-2")
    assert "algo-2:" not in (tmp_path / "docker-compose.yml").read_text()


def test_command_and_environment_are_quoted_exactly(tmp_path: Path) -> None:
    command = ["smdist-run", "ddp.py", "--note", 'say "hi": yes #1']
    text = render(["algo-1"], command, environment={"MY_VAR": "a: b"})
    assert json.dumps(command[-1]) in text
    assert '"MY_VAR": "a: b"' in text


def test_committed_two_host_file_is_what_the_generator_writes(tmp_path: Path) -> None:
    assert main(["--hosts", "2", "--out", str(tmp_path)]) == 0
    generated = (tmp_path / "docker-compose.yml").read_text()
    assert (COMPOSE_DIR / "docker-compose.yml").read_text() == generated, (
        "compose/docker-compose.yml is stale: python -m compose.generate --hosts 2 --out compose"
    )
    for host in ("algo-1", "algo-2"):
        rel = f"hosts/{host}/input/config/resourceconfig.json"
        assert (COMPOSE_DIR / rel).read_text() == (tmp_path / rel).read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": ["algo_1"]}, "host 'algo_1': expected a DNS label"),
        ({"hosts": ["algo-1", "algo-2"], "resource_hosts": ["algo-1"]}, "missing ['algo-2']"),
    ],
)
def test_bad_hosts_are_named(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_job(tmp_path, command=["train"], **kwargs)  # type: ignore[arg-type]


def test_zero_hosts_is_refused() -> None:
    with pytest.raises(ValueError, match="hosts: expected at least 1, got 0"):
        host_names(0)
