"""The SageMaker Python SDK's local mode, driving the compose tier's image on its private engine.

The SDK (``sagemaker>=2.250,<3``: v2 has ``sagemaker.local``) lives in its own virtualenv,
``.venv-sdk`` (``$SMDIST_SDK_VENV`` moves it), so its ~65 dependencies (boto3, pandas,
pydantic, ...) never touch the main ``.venv``::

    python -m compose.sdk install     # create/refresh .venv-sdk (the Makefile runs this)

Tests talk to one long-lived driver process (``compose/sdk_driver.py``, run by the SDK's
interpreter): importing the SDK takes 5-30 s, so it is paid once per session, not per job.
Each ``fit`` is a real ``Estimator(...).fit()`` / ``PyTorch(...).fit()`` with a
``LocalSession``; the SDK writes its own docker-compose file and runs ``docker-compose up``
against the harness's dockerd (``DOCKER_HOST``), exactly as on a user's laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from compose.harness import (
    REPO,
    TORCH,
    Closes,
    Engine,
    HarnessError,
    _locked,
    _log,
    _read,
    docker_cli,
)

SDK_REQUIREMENT = "sagemaker>=2.250,<3"
SDK_VENV = Path(os.environ.get("SMDIST_SDK_VENV", REPO / ".venv-sdk"))
DRIVER = Path(__file__).resolve().parent / "sdk_driver.py"
# A dummy role and a region: local mode never calls AWS with them.
ROLE = "arn:aws:iam::111111111111:role/smdist-local-mode"
REGION = "us-west-2"


def sdk_python(venv: Path = SDK_VENV) -> Path:
    return venv / "bin" / "python"


def ensure_sdk_venv(venv: Path = SDK_VENV, log: Any = _log) -> float:
    """Create ``venv`` with the SDK unless it already has this requirement; seconds spent.

    torch is pinned by a constraint (as everywhere in this repo): the SDK does not pull it,
    and if a future release did, it must not bring GBs of CUDA wheels with it.
    """
    stamp = venv / ".installed"
    wanted = f"{SDK_REQUIREMENT}\n{TORCH}\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.parent / f"{venv.name}.lock"):
        if stamp.is_file() and stamp.read_text() == wanted and sdk_python(venv).exists():
            return 0.0
        t0 = time.monotonic()
        log(f"installing {SDK_REQUIREMENT} into {venv}")
        if not sdk_python(venv).exists():
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", str(venv)], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write(f"{TORCH}\n")
        try:
            proc = subprocess.run(
                [
                    str(sdk_python(venv)), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "-c", constraints.name, SDK_REQUIREMENT,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )  # fmt: skip
        finally:
            os.unlink(constraints.name)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-20:])
            raise HarnessError(f"pip install {SDK_REQUIREMENT} into {venv} failed:\n{tail}")
        stamp.write_text(wanted)
        seconds = time.monotonic() - t0
        log(f"{SDK_REQUIREMENT} installed in {seconds:.0f} s")
        return seconds


# --------------------------------------------------------------------------- results


def _members(tar_path: Path) -> dict[str, bytes]:
    """name -> content of every regular file in a .tar.gz (names without a leading './')."""
    if not tar_path.is_file():
        return {}
    out: dict[str, bytes] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                fh = tar.extractfile(member)
                assert fh is not None
                out[member.name.removeprefix("./")] = fh.read()
    return out


@dataclass(frozen=True)
class FitResult:
    """What a user of the SDK sees after ``fit()``: its outcome, log and the two tarballs."""

    name: str
    ok: bool
    error_type: str  # "" when fit() returned
    error: str
    log: str  # what fit() printed: the SDK's lines and every container's output
    model_data: str  # estimator.model_data ("file://.../model.tar.gz"), "" when unknown
    hosts: list[str]  # the hosts the SDK named (algo-1-xxxxx, ...), in order
    container_logs: dict[str, str]  # host -> `docker logs` of its container, complete
    seconds: float
    model: dict[str, bytes] = field(default_factory=dict)  # model.tar.gz
    output: dict[str, bytes] = field(default_factory=dict)  # output.tar.gz

    def text(self, name: str) -> str:
        return self.output[name].decode(errors="replace")

    def logs(self) -> str:
        """The message of a failed assertion: the outcome and every container's log."""
        parts = [f"fit(): {'ok' if self.ok else self.error_type + ': ' + self.error}"]
        for host, log in self.container_logs.items():
            tail = "\n".join(log.strip().splitlines()[-60:])
            parts.append(f"----- {host} -----\n{tail}")
        if not self.container_logs:
            parts.append("\n".join(self.log.strip().splitlines()[-80:]))
        return "\n".join(parts)


class LocalMode(Closes):
    """A driver process with the SDK imported; ``fit`` runs one local-mode training job.

    Needs the harness's engine (its dockerd, its image): the SDK's docker-compose talks to
    it through ``DOCKER_HOST``. Jobs run one at a time, each under ``work_root/NAME``.
    """

    def __init__(self, engine: Engine, work_root: Path, venv: Path = SDK_VENV) -> None:
        self.engine = engine
        self.work_root = work_root
        self.timings: list[tuple[str, float]] = []
        work_root.mkdir(parents=True, exist_ok=True)
        # The SDK finds `docker` and `docker-compose` on PATH: the harness's client first.
        bin_dir = work_root / "bin"
        bin_dir.mkdir(exist_ok=True)
        link = bin_dir / "docker"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(docker_cli())
        env = dict(engine.env)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
                # No credentials, no instance metadata service to wait for: local mode
                # needs neither.
                "AWS_EC2_METADATA_DISABLED": "true",
                "HOME": str(work_root),  # no ~/.sagemaker/config.yaml of the user's
            }
        )
        for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name, None)
        self._driver_log = work_root / "driver.log"
        t0 = time.monotonic()
        with open(self._driver_log, "ab") as log_fh:
            self._proc = subprocess.Popen(
                [str(sdk_python(venv)), "-u", str(DRIVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fh,
                env=env,
                cwd=work_root,
            )
        self._next_id = 0
        ready = self._read_reply(timeout=300, what="the SDK driver to import sagemaker")
        self.sdk_version = str(ready["sagemaker"])
        self.compose = str(ready["compose"])
        self.timings.append((f"import sagemaker {self.sdk_version}", time.monotonic() - t0))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _read_reply(self, timeout: float, what: str) -> dict[str, Any]:
        out: IO[bytes] | None = self._proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else b""
        if not line:
            raise HarnessError(
                f"no answer from the SDK driver while waiting for {what} "
                f"({'timed out' if not ready else 'it exited'}); its log "
                f"{self._driver_log}:\n{_tail_file(self._driver_log)}"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    def fit(
        self,
        name: str,
        *,
        source_dir: Path,
        entry_point: str,
        estimator: str = "Estimator",
        instance_count: int = 2,
        hyperparameters: Mapping[str, object] | None = None,
        environment: Mapping[str, str] | None = None,
        distribution: Mapping[str, object] | None = None,
        timeout: float = 300,
    ) -> FitResult:
        """``Estimator``/``PyTorch``(image_uri=the compose image, instance_type="local").fit()."""
        work = self.work_root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        kwargs: dict[str, Any] = {
            "entry_point": entry_point,
            "source_dir": str(source_dir),
            "image_uri": "smdist-compose:latest",
            "instance_count": instance_count,
            "instance_type": "local",
            "role": ROLE,
            "base_job_name": f"smdist-{name}",
        }
        if hyperparameters:
            kwargs["hyperparameters"] = dict(hyperparameters)
        if environment:
            kwargs["environment"] = dict(environment)
        if distribution:
            kwargs["distribution"] = dict(distribution)
        self._next_id += 1
        request = {
            "id": self._next_id,
            "estimator": estimator,
            "kwargs": kwargs,
            "region": REGION,
            "container_root": str(work),
            "log": str(work / "fit.log"),
        }
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request).encode() + b"\n")
        self._proc.stdin.flush()
        t0 = time.monotonic()
        try:
            reply = self._read_reply(timeout, what=f"{name}: fit()")
        except HarnessError:
            # A hung job must not hang the tier: kill its containers, fit() then returns.
            self._kill_containers()
            reply = self._read_reply(60, what=f"{name}: fit() after its containers were killed")
            reply.setdefault("error", "")
            reply["error"] = f"killed after {timeout:.0f}s; {reply['error']}"
        seconds = time.monotonic() - t0
        self.timings.append((f"local mode: {name}", seconds))
        container_logs = self._collect_containers()
        model_data = str(reply.get("model_data") or "")
        model_tar = Path(model_data.removeprefix("file://")) if model_data else None
        if model_tar is None or not model_tar.exists():
            # fit() raised before returning the path: the SDK still merged and packed the
            # hosts' dirs (in a finally), under container_root/<tmp>/compressed_artifacts.
            found = sorted(work.glob("*/compressed_artifacts/model.tar.gz"))
            model_tar = found[0] if found else None
        return FitResult(
            name=name,
            ok=bool(reply["ok"]),
            error_type=str(reply.get("error_type", "")),
            error=str(reply.get("error", "")),
            log=_read(work / "fit.log"),
            model_data=model_data,
            hosts=list(reply.get("hosts", [])),
            container_logs=container_logs,
            seconds=seconds,
            model=_members(model_tar) if model_tar else {},
            output=_members(model_tar.with_name("output.tar.gz")) if model_tar else {},
        )

    def _containers(self) -> list[str]:
        # The harness holds the engine for this session: every compose container is this job's.
        out = self.engine.docker(
            "ps", "-a", "-q", "--filter", "label=com.docker.compose.service", what="docker ps"
        )
        return out.split()

    def _kill_containers(self) -> None:
        ids = self._containers()
        if ids:
            self.engine.unchecked("kill", *ids)

    def _collect_containers(self) -> dict[str, str]:
        """host -> full `docker logs` of each container the job left behind; then remove them.

        Local mode never runs `docker-compose down`: the exited containers stay, and their
        logs are complete where fit()'s streamed copy may lose the last lines.
        """
        logs: dict[str, str] = {}
        ids = self._containers()
        for cid in ids:
            host = self.engine.docker(
                "inspect", "-f", '{{index .Config.Labels "com.docker.compose.service"}}', cid,
                what="docker inspect",
            ).strip()  # fmt: skip
            logs[host] = self.engine.logs(cid)
        if ids:
            self.engine.unchecked("rm", "-f", *ids, timeout=120)
        return dict(sorted(logs.items()))


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose.sdk", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help=f"create {SDK_VENV} with {SDK_REQUIREMENT} (if needed)")
    parser.parse_args(argv)
    try:
        seconds = ensure_sdk_venv()
    except (HarnessError, OSError, subprocess.CalledProcessError) as exc:
        print(f"compose.sdk: {exc}", file=sys.stderr)
        return 1
    done = f"installed in {seconds:.0f} s" if seconds else "already installed"
    print(f"{SDK_VENV}: {SDK_REQUIREMENT} {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
