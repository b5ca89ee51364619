"""Preflight (`smdist-run --check`): what would fail, found before a worker starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from smdist.agent import preflight
from smdist.agent.preflight import Check, format_table, quick_checks, run_checks
from smdist.agent.report.write import report
from smdist.config import Paths
from smdist.errors import HostResolutionFailed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def opt_ml(tmp_path: Path) -> Paths:
    paths = Paths(tmp_path / "opt_ml")
    paths.input_config_dir.mkdir(parents=True)
    paths.resource_config_file.write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1", "algo-2"]})
    )
    return paths


@pytest.fixture
def code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "code"
    d.mkdir()
    monkeypatch.chdir(d)  # entry paths are relative to the working directory, as for python
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def by_name(checks: Sequence[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_a_ready_job_passes(code: Path, opt_ml: Paths) -> None:
    write(code / "model.py", "import json\nfrom utils.io import load\n")
    write(code / "utils" / "__init__.py", "")
    write(code / "utils" / "io.py", "import tenacity\ndef load(): pass\n")
    write(code / "train.py", "import os\nimport dns.resolver\nimport model\n")
    checks = run_checks(opt_ml, ["train.py", "--epochs", "3"])
    got = by_name(checks)
    assert [c.status for c in checks] == ["ok"] * len(checks), format_table(checks)
    assert "2 host(s) [algo-1, algo-2], current algo-1" in got["config"].detail
    assert {"entry point", "imports", "model dir", "output dir", "GPUs", "disk"} <= set(got)
    assert preflight.exit_code(checks) == 0
    assert format_table(checks).splitlines()[-1].startswith("ready:")


def test_missing_modules_in_script_and_local_module(code: Path, opt_ml: Paths) -> None:
    write(code / "model.py", "import json\n\nimport cv2\n")
    write(
        code / "train.py",
        """\
        import os
        import some_missing_library
        from model import Net
        """,
    )
    checks = run_checks(opt_ml, ["train.py"])
    imports = by_name(checks)["imports"]
    assert imports.status == "fail" and imports.category == "MissingDependency"
    assert "some_missing_library (train.py:2)" in imports.detail
    assert "cv2 (model.py:3)" in imports.detail
    assert preflight.exit_code(checks) == 1
    table = format_table(checks)
    assert "FAIL    imports" in table and "MissingDependency: not installed" in table
    assert table.splitlines()[-1] == "1 check(s) failed (MissingDependency): the job would fail."


def test_the_scripts_own_modules_are_not_missing_ones(code: Path, opt_ml: Paths) -> None:
    # Local: a module file, a package, a namespace directory and compiled extensions (their
    # names are not installed anywhere, so the check would fail on any it took for missing).
    write(code / "mylocal.py", "")
    write(code / "mypkg" / "__init__.py", "")
    (code / "mynamespace").mkdir()
    (code / "myext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (code / "myplainext.so").write_bytes(b"")
    (code / "notamodule.py").mkdir()  # a directory named like a module file: not one
    imports = ["mylocal", "mypkg", "mynamespace", "myext", "myplainext", "notamodule"]
    write(code / "train.py", "".join(f"import {m}\n" for m in imports))
    got = by_name(quick_checks(opt_ml, ["train.py"]))["imports"]
    assert got.status == "fail" and "notamodule (train.py:6)" in got.detail, got.detail
    assert not any(f"{m} (" in got.detail for m in imports[:-1]), got.detail


def test_scan_runs_nothing(code: Path, opt_ml: Paths) -> None:
    marker = code / "ran"
    write(code / "train.py", f"open({str(marker)!r}, 'w')\nraise SystemExit(3)\nimport json\n")
    checks = quick_checks(opt_ml, ["train.py"])
    assert by_name(checks)["imports"].status == "ok"
    assert not marker.exists()


def test_optional_imports_do_not_fail(code: Path, opt_ml: Paths) -> None:
    write(
        code / "train.py",
        """\
        from typing import TYPE_CHECKING
        try:
            import apex
        except ImportError:
            apex = None
        if TYPE_CHECKING:
            import some_stub_only_module

        def export():
            import onnx_exporter_not_here

        if __name__ == "__main__":
            import json
        """,
    )
    imports = by_name(quick_checks(opt_ml, ["train.py"]))["imports"]
    assert imports.status == "warn", imports
    assert "onnx_exporter_not_here (train.py:10)" in imports.detail
    assert "apex" not in imports.detail and "some_stub_only_module" not in imports.detail


def test_a_module_listed_in_requirements_is_a_warning(code: Path, opt_ml: Paths) -> None:
    write(code / "requirements.txt", "some-missing-library==1.2\n")
    write(code / "train.py", "import some_missing_library\n")
    imports = by_name(quick_checks(opt_ml, ["train.py"]))["imports"]
    assert imports.status == "warn" and "requirements.txt" in imports.detail


def test_a_module_requirements_may_provide_under_another_name_is_a_warning(
    code: Path, opt_ml: Paths
) -> None:
    # `import cv2` from opencv-python, `import yaml` from PyYAML: the install runs before
    # the workers, and if it fails pip's error (a typo in requirements.txt) is the truth.
    write(code / "requirements.txt", "opencv-python-headless==4.10\n")
    write(code / "train.py", "import cv2\n")
    imports = by_name(quick_checks(opt_ml, ["train.py"]))["imports"]
    assert imports.status == "warn", imports
    assert imports.detail == (
        "not installed yet, may come with the requirements installed first: cv2 (train.py:1)"
    )


def test_a_missing_module_without_anything_to_install_still_fails(
    code: Path, opt_ml: Paths
) -> None:
    write(code / "train.py", "import cv2\n")
    imports = by_name(quick_checks(opt_ml, ["train.py"]))["imports"]
    assert imports.status == "fail" and imports.category == "MissingDependency", imports


def test_syntax_error_is_reported_with_its_line(code: Path, opt_ml: Paths) -> None:
    write(code / "train.py", "import os\n\ndef f(:\n    pass\n")
    imports = by_name(quick_checks(opt_ml, ["train.py"]))["imports"]
    assert imports.status == "fail" and imports.category == "UserScriptError"
    assert "train.py:3" in imports.detail


def test_missing_entry_point(code: Path, opt_ml: Paths) -> None:
    checks = run_checks(opt_ml, ["trian.py"])
    entry = by_name(checks)["entry point"]
    assert entry.status == "fail" and entry.category == "EntryPointNotFound"
    assert f"trian.py: no such file (looked for {code / 'trian.py'}" in entry.detail
    assert preflight.exit_code(checks) == 2
    assert "imports" not in by_name(checks)


def test_entry_found_in_the_code_dir(code: Path, opt_ml: Paths) -> None:
    write(opt_ml.code_dir / "train.py", "import some_missing_library\n")
    checks = by_name(quick_checks(opt_ml, ["train.py"]))
    assert checks["entry point"].status == "ok"
    assert checks["imports"].category == "MissingDependency"


def test_module_entry(code: Path, opt_ml: Paths) -> None:
    write(code / "pkg" / "__init__.py", "import json\n")
    write(code / "pkg" / "util.py", "import json\nimport cv2\n")
    write(code / "pkg" / "train.py", "from pkg.util import load\nimport some_missing_library\n")
    checks = by_name(quick_checks(opt_ml, ["-m", "pkg.train", "--lr", "0.1"]))
    assert checks["entry point"].detail.endswith("pkg/train.py")
    imports = checks["imports"]
    assert imports.category == "MissingDependency" and "pkg (" not in imports.detail
    assert "cv2 (pkg/util.py:2)" in imports.detail
    assert "some_missing_library (pkg/train.py:2)" in imports.detail
    missing = by_name(quick_checks(opt_ml, ["-m", "pkg.nothing"]))["entry point"]
    assert missing.category == "EntryPointNotFound" and "'pkg.nothing'" in missing.detail


def test_program_entry_must_be_executable(code: Path, opt_ml: Paths) -> None:
    prog = write(code / "train.sh", "#!/bin/sh\nexec ./a.out\n")
    entry = by_name(quick_checks(opt_ml, ["train.sh"]))["entry point"]
    assert entry.status == "fail" and "chmod +x" in entry.detail
    prog.chmod(0o755)
    assert by_name(quick_checks(opt_ml, ["train.sh"]))["entry point"].status == "ok"


def test_broken_config_is_a_failed_row(code: Path, opt_ml: Paths) -> None:
    opt_ml.resource_config_file.write_text('{"current_host": "algo-9", "hosts": ["algo-1"]}')
    write(code / "train.py", "import json\n")
    checks = run_checks(opt_ml, ["train.py"])
    cfg = by_name(checks)["config"]
    assert cfg.status == "fail" and cfg.category == "ConfigError"
    assert str(opt_ml.resource_config_file) in cfg.detail and '"current_host"' in cfg.detail
    assert preflight.exit_code(checks) == 2


@pytest.fixture
def mount_tmpfs() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], check=False)


def _mount(path: Path, options: str, mounted: list[Path]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    mounted.append(path)


def test_read_only_model_dir(code: Path, opt_ml: Paths, mount_tmpfs: list[Path]) -> None:
    _mount(opt_ml.model_dir, "ro,size=64k", mount_tmpfs)
    write(code / "train.py", "import json\n")
    model = by_name(quick_checks(opt_ml, ["train.py"]))["model dir"]
    assert model.status == "fail" and model.category == "PermissionDenied"
    assert str(opt_ml.model_dir) in model.detail and "root" in model.detail


def test_full_disk(code: Path, opt_ml: Paths, mount_tmpfs: list[Path]) -> None:
    _mount(opt_ml.output_dir, "size=64k", mount_tmpfs)
    (opt_ml.output_dir / "fill").write_bytes(b"x" * (64 << 10))
    write(code / "train.py", "import json\n")
    checks = by_name(run_checks(opt_ml, ["train.py"]))
    assert checks["output dir"].category == "DiskFull"
    assert checks["disk"].status == "fail" and checks["disk"].category == "DiskFull"
    assert str(opt_ml.output_dir) in checks["disk"].detail


def test_gpu_count_without_torch(tmp_path: Path) -> None:
    assert preflight.gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == (3, "CUDA_VISIBLE_DEVICES")
    assert preflight.gpu_count({"CUDA_VISIBLE_DEVICES": ""})[0] == 0
    assert preflight.gpu_count({"CUDA_VISIBLE_DEVICES": "-1"})[0] == 0
    # No GPU on this machine: a stand-in nvidia-smi prints what the real one does.
    fake = write(
        tmp_path / "bin" / "nvidia-smi",
        """\
        #!/bin/sh
        echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"
        echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)"
        """,
    )
    fake.chmod(0o755)
    assert preflight.gpu_count({"PATH": str(fake.parent)}) == (2, "nvidia-smi")


def test_small_shm_warns_on_gpu_hosts(tmp_path: Path, mount_tmpfs: list[Path]) -> None:
    _mount(tmp_path / "shm", "size=64m", mount_tmpfs)
    assert preflight.check_shm(8, tmp_path / "shm").status == "warn"
    assert preflight.check_shm(0, tmp_path / "shm").status == "ok"


def test_host_resolution_hook(code: Path, opt_ml: Paths) -> None:
    write(code / "train.py", "import json\n")

    # Stands in for smdist.agent.discovery's resolver (another module's job, with its own tests).
    def resolve(hosts: Sequence[str]) -> None:
        missing = [h for h in hosts if h != "algo-1"]
        if missing:
            raise HostResolutionFailed(f"{', '.join(missing)}: NXDOMAIN after 3 attempts")

    hosts = by_name(run_checks(opt_ml, ["train.py"], resolve_hosts=resolve))["hosts"]
    assert hosts.status == "fail" and hosts.category == "HostResolutionFailed"
    assert "algo-2: NXDOMAIN" in hosts.detail


def test_a_failed_check_becomes_the_failure_file(code: Path, opt_ml: Paths) -> None:
    write(code / "train.py", "import some_missing_library\n")
    failed = preflight.first_failure(quick_checks(opt_ml, ["train.py"]))
    assert failed is not None
    d = report(opt_ml, [], current_host="algo-2", smdist_error=failed.as_error())
    first = opt_ml.failure_file.read_text().splitlines()[0]
    assert first.startswith("MissingDependency: not installed: some_missing_library (train.py:1)")
    assert first.endswith("(host algo-2)") and d.exit_code == 1


def test_importing_preflight_and_failure_does_not_import_torch() -> None:
    code = (
        "import sys, smdist.agent.preflight, smdist.worker.bootstrap; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert out.stdout.strip() == "False", out.stderr
