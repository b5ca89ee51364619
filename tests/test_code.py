"""Script mode's code: ``sagemaker_submit_directory`` fetched into an empty /opt/ml/code by
the real ``train`` entry, from a real S3 API server on loopback (moto's server, the same
HTTP API boto3 speaks to AWS), a local .tar.gz and a local directory; unsafe archives
refused with nothing written outside the code dir."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TRAIN, env, free_port, make_tree, wait_for

SCRIPT = """
import os, sys
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "ran.txt")
with open(out, "w") as f:
    f.write(os.path.dirname(os.path.abspath(__file__)) + " " + " ".join(sys.argv[1:]))
"""


def _source_dir(root: Path) -> Path:
    src = root / "src"
    (src / "lib").mkdir(parents=True)
    (src / "train.py").write_text(SCRIPT)
    (src / "lib" / "helper.py").write_text("X = 1\n")
    return src


def _tarball(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for item in sorted(src.iterdir()):
            tar.add(item, arcname=item.name)
    return dest


def _train(root: Path, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAIN, "--opt-ml", str(root)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(**extra),
    )


def _job(root: Path, submit: str) -> Path:
    return make_tree(
        root,
        hyperparameters={
            "sagemaker_program": json.dumps("train.py"),
            "sagemaker_submit_directory": json.dumps(submit),
            "epochs": "3",
        },
    )


def _ran(root: Path) -> str:
    return (root / "output" / "data" / "ran.txt").read_text()


def _empty(code_dir: Path) -> bool:
    return not code_dir.exists() or not any(code_dir.iterdir())


def _failure(root: Path) -> str:
    return (root / "output" / "failure").read_text()


# --- a real S3 API on loopback ---------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's standalone server: a real HTTP S3 API (no AWS account can be used here)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(up, 60, "moto_server to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


def _s3_put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    import boto3

    s3 = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("variable", ["S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
def test_s3_sourcedir_is_fetched_and_the_program_runs(
    tmp_path: Path, s3_server: str, variable: str
) -> None:
    archive = _tarball(_source_dir(tmp_path), tmp_path / "sourcedir.tar.gz")
    _s3_put(s3_server, "job-bucket", "job-1/source/sourcedir.tar.gz", archive.read_bytes())
    root = _job(tmp_path / "opt_ml", "s3://job-bucket/job-1/source/sourcedir.tar.gz")
    r = _train(root, **AWS, **{variable: s3_server})
    assert r.returncode == 0, r.stderr
    code = root / "code"
    assert (code / "train.py").is_file() and (code / "lib" / "helper.py").is_file()
    assert _ran(root) == f"{code} --epochs 3"
    assert f"endpoint from {variable}" in r.stderr


def test_s3_missing_key_is_code_download_failed_naming_the_uri(
    tmp_path: Path, s3_server: str
) -> None:
    _s3_put(s3_server, "job-bucket", "other", b"x")
    uri = "s3://job-bucket/job-2/source/sourcedir.tar.gz"
    root = _job(tmp_path / "opt_ml", uri)
    r = _train(root, **AWS, S3_ENDPOINT_URL=s3_server)
    assert r.returncode != 0
    line = _failure(root).splitlines()[0]
    assert line.startswith(f"CodeDownloadFailed: {uri}: no such key"), line
    assert "Traceback" not in r.stderr
    assert _empty(root / "code")


def test_s3_without_credentials_says_so(tmp_path: Path, s3_server: str) -> None:
    root = _job(tmp_path / "opt_ml", "s3://job-bucket/k.tar.gz")
    r = _train(
        root,
        S3_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID="",
        AWS_SECRET_ACCESS_KEY="",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    assert r.returncode != 0
    assert _failure(root).startswith(
        "CodeDownloadFailed: s3://job-bucket/k.tar.gz: Unable to locate credentials"
    ), _failure(root)


# --- local sources ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar.gz", "directory", "file-uri"])
def test_local_sourcedir(tmp_path: Path, kind: str) -> None:
    src = _source_dir(tmp_path)
    submit = {
        "tar.gz": str(_tarball(src, tmp_path / "sourcedir.tar.gz")),
        "directory": str(src),
        "file-uri": f"file://{src}",
    }[kind]
    root = _job(tmp_path / "opt_ml", submit)
    r = _train(root)
    assert r.returncode == 0, r.stderr
    assert (root / "code" / "lib" / "helper.py").read_text() == "X = 1\n"
    assert _ran(root) == f"{root / 'code'} --epochs 3"


def test_a_non_empty_code_dir_is_used_as_it_is(tmp_path: Path) -> None:
    """The toolkit's rule: code baked into the image (or mounted) wins; nothing is fetched."""
    root = _job(tmp_path / "opt_ml", "s3://nowhere/sourcedir.tar.gz")
    (root / "code").mkdir()
    (root / "code" / "train.py").write_text(SCRIPT)
    r = _train(root)
    assert r.returncode == 0, r.stderr
    assert "is not empty: using it as it is" in r.stderr


def test_corrupt_archive(tmp_path: Path) -> None:
    bad = tmp_path / "sourcedir.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    root = _job(tmp_path / "opt_ml", str(bad))
    r = _train(root)
    assert r.returncode != 0
    assert _failure(root).startswith(f"CodeDownloadFailed: {bad}: not a valid tar.gz archive")


def _evil(path: Path, name: str, *, link: str | None = None, hard: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        good = tarfile.TarInfo("train.py")
        good.size = len(SCRIPT)
        tar.addfile(good, io.BytesIO(SCRIPT.encode()))
        info = tarfile.TarInfo(name)
        if link is not None:
            info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
            info.linkname = link
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize(
    ("member", "link", "hard", "why"),
    [
        ("../escape", None, False, "would be written outside the code dir"),
        ("lib/../../../escape", None, False, "would be written outside the code dir"),
        ("/tmp/smdist-abs-escape", None, False, "has an absolute path"),
        ("out", "../../escape", False, "is a link pointing outside the code dir"),
        ("out", "/etc/passwd", False, "is a link to an absolute path"),
        ("out", "../escape", True, "is a hard link pointing outside the code dir"),
    ],
)
def test_unsafe_archive_is_refused_and_nothing_is_written(
    tmp_path: Path, member: str, link: str | None, hard: bool, why: str
) -> None:
    archive = _evil(tmp_path / "evil.tar.gz", member, link=link, hard=hard)
    root = _job(tmp_path / "opt_ml", str(archive))
    before = sorted(p for p in tmp_path.rglob("*") if "output" not in p.parts)
    r = _train(root)
    assert r.returncode != 0
    line = _failure(root).splitlines()[0]
    assert line.startswith(f"CodeDownloadFailed: {archive}: archive member {member!r} {why}"), line
    assert "nothing was extracted" in line and "Traceback" not in r.stderr
    after = sorted(p for p in tmp_path.rglob("*") if "output" not in p.parts)
    assert after == before or set(after) - set(before) == {root / "code"}
    assert _empty(root / "code")
    assert not Path("/tmp/smdist-abs-escape").exists()


def test_nothing_to_fetch_or_install_costs_nothing(tmp_path: Path) -> None:
    """The start-up path of a job without script mode: no boto3 import, no pip run (the
    interpreter's own import trace of the agent says what it imported)."""
    script = tmp_path / "train.py"
    script.write_text("print('ok')\n")
    root = make_tree(tmp_path / "opt_ml")
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "smdist.agent.cli", "--opt-ml", str(root),
         str(script)],
        capture_output=True, text=True, timeout=120, env=env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "smdist.agent.settings" in imported  # the trace is the agent's
    assert not {m for m in imported if m.split(".")[0] in ("boto3", "botocore", "tarfile")}
    assert "installing" not in r.stderr and "pip:" not in r.stderr
