"""Script mode's dependencies: requirements.txt installed by real pip, once per host, before
any worker starts; failures named by file and line on every host; the rendezvous says who
is still installing. Offline: wheels built here, PIP_NO_INDEX + PIP_FIND_LINKS (pip's own
configuration, which smdist leaves alone). Installs go into a throwaway virtualenv that sees
the test environment's packages through a .pth file, never into the shared one."""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import threading
import zipfile
from pathlib import Path

import pytest

from smdist.agent import code
from smdist.agent.rendezvous import RendezvousSettings, rendezvous
from smdist.errors import DependencyInstallFailed, JobAborted
from smdist.log import log as smdist_log
from tests.helpers import REPO, env, free_port, make_tree


def _wheel(dest: Path, project: str, module: str, body: str) -> Path:
    """A minimal pure-Python wheel, written by hand (no build tools, no network)."""
    dist = project.replace("-", "_")
    files = {
        f"{module}/__init__.py": body.encode(),
        f"{dist}-1.0.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n"
        ).encode(),
        f"{dist}-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: smdist-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}-1.0.dist-info/RECORD,,")
    path = dest / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    _wheel(d, "smdist-testpkg", "smdist_testpkg", "VALUE = 42\n")
    # Listed as smdist-misnamed, but provides another module: the hint must say so.
    _wheel(d, "smdist-misnamed", "smdist_other_name", "")
    return d


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (pip installs land here) that sees torch, pip and smdist."""
    d = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = d / "lib" / version / "site-packages"
    (site / "smdist-tests.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{REPO}\n")
    return d / "bin" / "python"


def _offline(wheelhouse: Path) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}


USES_PACKAGE = """
import json, os
import smdist_testpkg
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{os.environ['RANK']}.json")
with open(out, "w") as f:
    json.dump({"value": smdist_testpkg.VALUE}, f)
"""


def test_requirements_installed_once_per_host_before_any_worker(
    tmp_path: Path, python: Path, wheelhouse: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "requirements.txt").write_text("# what train.py needs\n\nsmdist-testpkg==1.0\n")
    (src / "train.py").write_text(USES_PACKAGE)
    work = tmp_path / "work"
    r = subprocess.run(
        [str(python), "-m", "smdist.agent.cli", "--simulate", "2x2", "--work-dir", str(work),
         str(src / "train.py")],
        capture_output=True, text=True, timeout=300, env=env(**_offline(wheelhouse)),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    installs = collections.Counter(
        re.findall(r"^\[smdist (algo-\d) [\d:]+\] installing requirements: .*pip install -r "
                   r"requirements\.txt", r.stderr, re.MULTILINE)
    )  # fmt: skip
    assert installs == {"algo-1": 1, "algo-2": 1}  # once per host, never per rank
    # pip's output is relayed with the host's prefix; no rank ran pip.
    assert re.search(r"^\[smdist algo-\d [\d:]+\] pip: ", r.stderr, re.MULTILINE)
    assert not re.search(r"^\[algo-\d/\d\].*pip", r.stderr + r.stdout, re.MULTILINE)
    values = {
        p.name: json.loads(p.read_text())["value"]
        for p in work.glob("algo-*/output/data/rank-*.json")
    }
    assert values == {f"rank-{i}.json": 42 for i in range(4)}


def _agent(python: Path, root: Path, script: Path, port: int, extra: dict[str, str]):  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [str(python), "-m", "smdist.agent.cli", "--opt-ml", str(root), "--rdzv-port", str(port),
         "--host-addresses", "algo-1=127.0.0.1,algo-2=127.0.0.1", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra),
    )  # fmt: skip


def test_failed_install_on_one_host_stops_every_host_naming_file_line_and_host(
    tmp_path: Path, python: Path, wheelhouse: Path
) -> None:
    port = free_port()
    agents = {}
    for host in ("algo-1", "algo-2"):
        src = tmp_path / host / "code"
        src.mkdir(parents=True)
        (src / "train.py").write_text("print('should never run')\n")
        if host == "algo-2":  # only algo-2's image has the typo
            (src / "requirements.txt").write_text(
                "smdist-testpkg==1.0\n# vision\ntorchvison==9.9  # typo\n"
            )
        root = make_tree(tmp_path / host / "opt_ml", host, ["algo-1", "algo-2"])
        agents[host] = _agent(python, root, src / "train.py", port, _offline(wheelhouse))
    expected = (
        "DependencyInstallFailed: requirements.txt line 3 'torchvison==9.9': "
        "No matching distribution found (host algo-2)"
    )
    for host, agent in agents.items():
        _, err = agent.communicate(timeout=300)
        assert agent.returncode != 0, err
        failure = (tmp_path / host / "opt_ml" / "output" / "failure").read_text()
        assert failure.splitlines()[0] == expected, f"{host}: {failure}"
        assert "should never run" not in err and "Traceback" not in err


def test_missing_dependency_hint_says_the_install_did_not_provide_it(
    tmp_path: Path, python: Path, wheelhouse: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "requirements.txt").write_text("smdist-misnamed\n")
    (src / "train.py").write_text("import smdist_misnamed\n")
    root = make_tree(tmp_path / "opt_ml")
    r = subprocess.run(
        [str(python), "-m", "smdist.agent.cli", "--opt-ml", str(root), str(src / "train.py")],
        capture_output=True, text=True, timeout=300, env=env(**_offline(wheelhouse)),
    )  # fmt: skip
    assert r.returncode != 0
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("MissingDependency: module 'smdist_misnamed' is not installed")
    assert "requirements.txt lists smdist_misnamed" in failure
    assert "the install did not provide module 'smdist_misnamed'" in failure
    assert "Add smdist_misnamed to requirements.txt" not in failure


def test_the_rendezvous_says_who_is_installing_and_nobody_times_out() -> None:
    """Two real agents' rendezvous (real store, in threads): algo-2 installs for longer
    than the others' progress interval; algo-1 waits, saying why, and both go on."""
    settings = RendezvousSettings(port=free_port(), timeout_s=30)
    hosts = ["algo-1", "algo-2"]
    addresses = dict.fromkeys(hosts, "127.0.0.1")
    release = threading.Event()
    seen_waiting = threading.Event()
    errors: list[BaseException] = []

    def seen(_level: int, message: str) -> None:
        if "waiting for algo-2: installing requirements (" in message:
            seen_waiting.set()

    smdist_log.add_listener(seen)

    def host(name: str) -> None:
        try:
            _, coordinator = rendezvous(name, hosts, 1, addresses, settings)
            install = (lambda: (release.wait(60), None)[1]) if name == "algo-2" else None
            try:
                code.prepare_hosts(
                    coordinator, name, hosts, install, "installing requirements", 60,
                    progress_s=0.2,
                )  # fmt: skip
            finally:
                coordinator.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(h,)) for h in hosts]
    try:
        for t in threads:
            t.start()
        assert seen_waiting.wait(30), "algo-1 never said it waits for algo-2's install"
        release.set()
        for t in threads:
            t.join(60)
    finally:
        release.set()
        smdist_log.remove_listener(seen)
    assert not errors, errors


def test_a_failed_install_reaches_the_waiting_host_at_once() -> None:
    settings = RendezvousSettings(port=free_port(), timeout_s=30)
    hosts = ["algo-1", "algo-2"]
    addresses = dict.fromkeys(hosts, "127.0.0.1")
    results: dict[str, BaseException | None] = {}

    def fail() -> None:
        raise DependencyInstallFailed("requirements.txt line 1 'nope': No matching distribution")

    def host(name: str) -> None:
        _, coordinator = rendezvous(name, hosts, 1, addresses, settings)
        try:
            code.prepare_hosts(
                coordinator, name, hosts, fail if name == "algo-2" else None, "installing", 600
            )
            results[name] = None
        except BaseException as exc:
            results[name] = exc
        finally:
            coordinator.close()

    threads = [threading.Thread(target=host, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results["algo-2"], DependencyInstallFailed)
    waiting = results["algo-1"]
    assert isinstance(waiting, JobAborted)
    assert waiting.headline() == (
        "DependencyInstallFailed: requirements.txt line 1 'nope': No matching distribution "
        "(host algo-2)"
    )


def test_a_package_code_dir_is_installed_as_the_toolkit_does(tmp_path: Path) -> None:
    assert code.plan_install(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("x\n")
    assert code.plan_install(tmp_path).argv("py") == [  # type: ignore[union-attr]
        "py", "-m", "pip", "install", "-r", "requirements.txt",
    ]  # fmt: skip
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\n")  # no build system: not a package
    assert not code.plan_install(tmp_path).package  # type: ignore[union-attr]
    (tmp_path / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n')
    assert code.plan_install(tmp_path).argv("py") == [  # type: ignore[union-attr]
        "py", "-m", "pip", "install", ".", "-r", "requirements.txt",
    ]  # fmt: skip
    (tmp_path / "requirements.txt").unlink()
    (tmp_path / "setup.py").write_text("")
    assert code.plan_install(tmp_path).argv("py") == ["py", "-m", "pip", "install", "."]  # type: ignore[union-attr]


def test_codeartifact_index_as_the_toolkit_builds_it() -> None:
    """CodeArtifact itself cannot be reached here (no AWS account, no local server for
    it): the ARN parsing and the index URL are checked; the two boto3 calls are not."""
    arn = "arn:aws:codeartifact:eu-west-1:123456789012:repository/my-domain/my-repo"
    assert code.parse_repository_arn(arn) == {
        "partition": "aws",
        "region": "eu-west-1",
        "account": "123456789012",
        "domain": "my-domain",
        "repository": "my-repo",
    }
    endpoint = "https://my-domain-123456789012.d.codeartifact.eu-west-1.amazonaws.com/pypi/my-repo/"
    assert code.codeartifact_index_url(endpoint, "my-repo", "TOKEN") == (
        "https://aws:TOKEN@my-domain-123456789012.d.codeartifact.eu-west-1.amazonaws.com"
        "/pypi/my-repo/simple/"
    )
    with pytest.raises(Exception, match="CA_REPOSITORY_ARN: expected arn:PARTITION"):
        code.parse_repository_arn("arn:aws:s3:::bucket")
