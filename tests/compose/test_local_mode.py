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

import base64
import hashlib
import io
import json
import shutil
import zipfile
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
    with LocalMode(harness.engine, tmp_path_factory.mktemp("local-mode")) as lm:
        try:
            yield lm
        finally:
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


# --------------------------------------------------------------------------- requirements.txt


def probe_wheel(value: str) -> tuple[str, bytes]:
    """A one-module wheel (``smdist_lm_probe``, ``VALUE = value``) that no index serves.

    Built by hand (a wheel is a zip with three metadata files) so the test needs no build
    backend; pip installs it from the source dir like any wheel a user ships.
    """
    name, version = "smdist_lm_probe", "1.0"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VALUE = {value!r}\n".encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: smdist-lm-probe\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: smdist-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


# pip inside the containers: no index (none is reachable), wheels from the source dir.
OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/opt/ml/code/wheels"}


def test_requirements_txt_is_installed_from_the_source_dir(
    local_mode: LocalMode, tmp_path: Path
) -> None:
    wheel, data = probe_wheel("from-requirements")
    fit = local_mode.fit(
        "requirements",
        source_dir=source_dir(
            tmp_path,
            "uses_requirement.py",
            files={"requirements.txt": b"smdist-lm-probe==1.0\n", f"wheels/{wheel}": data},
        ),
        entry_point="uses_requirement.py",
        environment=OFFLINE_PIP,
    )
    assert fit.ok, fit.logs()
    records = {r["rank"]: r for r in json_members(fit, "data/requirement-").values()}
    assert sorted(records) == [0, 1], (sorted(fit.output), fit.logs())
    for rank, rec in records.items():
        assert rec["host"] == fit.hosts[rank] and rec["value"] == "from-requirements", rec
        # Installed into the image's environment, not imported from the mounted code dir.
        assert "site-packages" in rec["module_file"], rec
    for host in fit.hosts:  # pip ran on every host, its output relayed there
        assert "smdist-lm-probe" in fit.container_logs[host], fit.logs()


def test_a_requirement_that_does_not_exist_fails_every_host(
    local_mode: LocalMode, tmp_path: Path
) -> None:
    # The script imports a module requirements.txt does not name literally (as `import cv2`
    # with opencv-python): the install runs first and its failure is the one reported.
    fit = local_mode.fit(
        "requirement-missing",
        source_dir=source_dir(
            tmp_path,
            "uses_requirement.py",
            files={"requirements.txt": b"# the job's extras\nsmdist-no-such-package==9.9\n"},
        ),
        entry_point="uses_requirement.py",
        environment=OFFLINE_PIP,
    )
    assert not fit.ok and fit.error_type == "RuntimeError", fit.logs()  # the SDK's "Failed to run"
    # The FailureReason the user reads (output.tar.gz keeps the last host's failure file).
    headline = fit.text("failure").splitlines()[0]
    assert headline.startswith(
        "DependencyInstallFailed: requirements.txt line 2 'smdist-no-such-package==9.9'"
    ), headline
    for host in fit.hosts:
        log = fit.container_logs[host]
        lines = [ln for ln in log.splitlines() if "DependencyInstallFailed" in ln]
        assert lines, (host, fit.logs())
        assert "smdist-no-such-package" in lines[0], lines
        assert "Traceback" not in log, fit.logs()
    assert not json_members(fit, "data/requirement-"), sorted(fit.output)  # never ran


# --------------------------------------------------------------------------- issue 15


def test_a_slow_rank_0_save_in_the_shared_model_dir(local_mode: LocalMode, tmp_path: Path) -> None:
    # Local mode mounts ONE model dir into both containers: the other host finishes while
    # rank 0 is still writing, model.bin through smdist's API and direct.bin with open().
    # Nothing may be lost, clash or warn.
    fit = local_mode.fit(
        "slow-save",
        source_dir=source_dir(tmp_path, "slow_save.py"),
        entry_point="slow_save.py",
        hyperparameters={"seconds": 4, "seed": 7},
    )
    assert fit.ok, fit.logs()
    assert sorted(fit.model) == ["direct.bin", "model.bin"], sorted(fit.model)
    whole = hashlib.sha256(b"7").digest() * ((4 << 20) // 32)
    for name in ("direct.bin", "model.bin"):
        assert fit.model[name] == whole, f"{name} is not whole"
    for host, log in fit.container_logs.items():
        for word in ("ModelDirClash", "same content", "left by a write that never finished"):
            assert word not in log, (host, word, fit.logs())


def test_a_failing_rank_reaches_output_tar_gz_with_the_masters_full_report(
    local_mode: LocalMode, tmp_path: Path
) -> None:
    fit = local_mode.fit(
        "rank-fails",
        source_dir=source_dir(tmp_path, "raise_in_allreduce.py"),
        entry_point="raise_in_allreduce.py",
        hyperparameters={"fail-rank": 1},
    )
    assert not fit.ok and fit.error_type == "RuntimeError", fit.logs()
    master, worker = fit.hosts
    headline = fit.text("failure").splitlines()[0]
    assert headline.startswith("UserScriptError: RuntimeError: bad batch on rank 1"), headline
    assert f"host {worker}, rank 1" in headline, headline
    # The SDK merges the hosts' output dirs (the last host wins a name): each host's report
    # has its own name, and only the master writes the whole job's.
    found = json_members(fit, "data/smdist-failure")
    assert sorted(found) == sorted(
        ["data/smdist-failure.json", *(f"data/smdist-failure-{h}.json" for h in fit.hosts)]
    ), (sorted(fit.output), fit.logs())
    own = found[f"data/smdist-failure-{worker}.json"]  # the failing host's own report
    assert own["current_host"] == worker, own
    assert (1, worker) in [(f["rank"], f["host"]) for f in own["failures"]], own
    assert own["headline"].startswith("UserScriptError: RuntimeError: bad batch on rank 1"), own
    # The master's report is the whole job's: every rank, the root cause named once.
    full = found["data/smdist-failure.json"]
    assert full["current_host"] == master, full
    assert full == found[f"data/smdist-failure-{master}.json"]
    assert [(f["rank"], f["host"]) for f in full["failures"]] == [(0, master), (1, worker)], full
    assert full["root_cause"]["rank"] == 1 and full["root_cause"]["host"] == worker, full
    assert full["failure_file"].count("bad batch on rank 1") == 1, full["failure_file"]
