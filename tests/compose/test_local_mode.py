"""The SageMaker Python SDK's local mode: a real client nobody here wrote, on the compose image.

Each test is what a user types in a notebook: ``Estimator(...)`` or ``PyTorch(...)`` with
``image_uri`` = the compose tier's image, ``instance_type="local"``, ``instance_count=2``,
a dummy role, a region and a ``LocalSession`` with local code. The SDK (``sagemaker`` v2,
in its own ``.venv-sdk``) writes its docker-compose file (hosts ``algo-1-xxxxx``, one
``/opt/ml/model`` mounted into every container, the source dir mounted at /opt/ml/code)
and runs ``docker-compose up --abort-on-container-exit`` against the harness's private
dockerd. Assertions are on what the user sees: whether ``fit()`` raised, the log, and the
``model.tar.gz`` / ``output.tar.gz`` local mode packs from the hosts' directories.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from compose.harness import SCRIPTS_DIR, Harness
from compose.sdk import FitResult, LocalMode, ensure_sdk_venv

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def local_mode(harness: Harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMode]:
    seconds = ensure_sdk_venv()
    if seconds:
        harness.timings.append(("sagemaker SDK install", seconds))
    lm = LocalMode(harness.engine, tmp_path_factory.mktemp("local-mode"))
    try:
        yield lm
    finally:
        lm.close()
        harness.timings.extend(lm.timings)


def source_dir(tmp_path: Path, *scripts: str, files: dict[str, bytes] | None = None) -> Path:
    """A user's source_dir: the named scripts of compose/scripts plus ``files``."""
    src = tmp_path / "src"
    src.mkdir()
    for script in scripts:
        shutil.copy2(SCRIPTS_DIR / script, src / script)
    for name, data in (files or {}).items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def json_members(fit: FitResult, prefix: str) -> dict[str, Any]:
    return {n: json.loads(d) for n, d in fit.output.items() if n.startswith(prefix)}


def assert_ddp_job(fit: FitResult) -> None:
    """A 2-host DDP job (one rank per host): what ddp.py left in the two tarballs."""
    assert fit.ok, fit.logs()
    assert len(fit.hosts) == 2 and all(h.startswith("algo-") for h in fit.hosts), fit.hosts
    records = {r["rank"]: r for r in json_members(fit, "data/ranks/").values()}
    assert sorted(records) == [0, 1], (sorted(fit.output), fit.logs())
    for rank, rec in records.items():
        assert rec["host"] == fit.hosts[rank], rec  # ranks follow the SDK's host order
        assert rec["world_size"] == 2 and rec["allreduce"] == 2.0, rec
        assert rec["hosts_by_rank"] == fit.hosts, rec
        assert rec["threads_after_teardown"] == [], rec
    assert records[0]["weights"] == records[1]["weights"]  # DDP kept the replicas equal
    # The model the user downloads: the trained one, nothing else beside it.
    assert sorted(fit.model) == ["model.pt"], sorted(fit.model)
    state = torch.load(io.BytesIO(fit.model["model.pt"]))
    saved = torch.cat([state["weight"].flatten(), state["bias"].flatten()]).tolist()
    assert saved == pytest.approx(records[0]["weights"])
    for rank, host in enumerate(fit.hosts):
        assert (
            f"[{host}/{rank}] allreduce=2 world_size=2 rank={rank} host={host}"
            in (fit.container_logs[host])
        ), fit.logs()


def test_estimator_runs_a_ddp_script_on_two_local_hosts(
    local_mode: LocalMode, tmp_path: Path
) -> None:
    fit = local_mode.fit(
        "estimator-ddp",
        estimator="Estimator",
        source_dir=source_dir(tmp_path, "ddp.py"),
        entry_point="ddp.py",
        hyperparameters={"steps": 2},
    )
    assert_ddp_job(fit)


def test_pytorch_estimator_with_torch_distributed(local_mode: LocalMode, tmp_path: Path) -> None:
    # PyTorch(image_uri=...) writes sagemaker_torch_distributed_enabled into the
    # hyperparameters; on this CPU machine that is one process per host.
    fit = local_mode.fit(
        "pytorch-torch-distributed",
        estimator="PyTorch",
        source_dir=source_dir(tmp_path, "ddp.py"),
        entry_point="ddp.py",
        hyperparameters={"steps": 2},
        distribution={"torch_distributed": {"enabled": True}},
    )
    assert_ddp_job(fit)
