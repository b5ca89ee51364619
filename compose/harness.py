"""Run multi-host smdist jobs in docker-compose on one machine: every container a SageMaker host.

CLI (root; installs what it needs on Debian)::

    python -m compose.harness up                  # packages, private dockerd, images
    python -m compose.harness run [--hosts N] [--nproc-per-host N] SCRIPT [ARGS...]
    python -m compose.harness down                # stop the dockerd `up` started

Library (the compose tests)::

    with Harness.start() as h:            # private dockerd, base image, wheelhouse, image
        job = h.run_job("ddp", hosts=2, command=["smdist-run", "ddp.py"])
        job["algo-1"].exit_code, job["algo-1"].log, job["algo-1"].model_dir

Nothing here touches another Docker engine: the harness runs its own ``dockerd`` on a private
socket and data root under ``$SMDIST_COMPOSE_STATE`` (default /var/lib/smdist-compose), which
persists so a later run reuses the cached base image, and stops that dockerd (by its pid) when
done. No registry and no package index is needed from inside a container: the base image is
built with debootstrap and Python packages come from a wheelhouse built on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from compose.generate import host_names, job_command, write_job

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "compose"
CACHE_DIR = COMPOSE_DIR / ".cache"
SCRIPTS_DIR = COMPOSE_DIR / "scripts"
STATE_DIR = Path(os.environ.get("SMDIST_COMPOSE_STATE", "/var/lib/smdist-compose"))
IMAGE = "smdist-compose:latest"
# Pinned as in the Makefile: on the build machines this is a local CPU wheel.
TORCH = os.environ.get("SMDIST_COMPOSE_TORCH", "torch==2.13.0")
# Wheels beyond smdist's own dependencies that every training image should have.
EXTRA_WHEELS = ("numpy",)

HOST_PACKAGES = {
    "dockerd": "docker.io",
    "docker-compose": "docker-compose",
    "debootstrap": "debootstrap",
}
BASE_SUITE = "bookworm"
BASE_MIRROR = os.environ.get("SMDIST_COMPOSE_MIRROR", "http://deb.debian.org/debian")
# automake: libltdl-dev (pulled by libopenmpi-dev) needs it and debootstrap does not resolve it.
# python3-mpi4py: Debian's build against its own Open MPI (no wheel for it on PyPI); the
# image's venv sees it through --system-site-packages.
BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-mpi4py",
    "openssh-server",
    "openssh-client",
    "openmpi-bin",
    "libopenmpi-dev",
    "automake",
    "ca-certificates",
    "procps",
    "iproute2",
)
# Marks a dockerd that `up` left running on purpose (sessions use it and leave it running).
DETACHED = "dockerd.detached"
# A private pool so the job networks cannot collide with another engine's 172.17/16.
ADDRESS_POOL = "base=10.213.0.0/16,size=24"

Log = Callable[[str], None]
T = TypeVar("T")


C = TypeVar("C", bound="Closes")


class Closes:
    """``with x:`` closes ``x`` at the end, however the block ends: ``close`` is the class's."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: C) -> C:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HarnessError(RuntimeError):
    """Setting up or running a compose job failed; the message says which step and why."""


def _log(msg: str) -> None:
    print(f"[compose] {msg}", file=sys.stderr, flush=True)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> str:
    """Run ``cmd``; return its output or raise HarnessError naming ``what`` with the tail."""
    try:
        proc = subprocess.run(
            list(cmd),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{what}: still running after {timeout:.0f}s: {' '.join(cmd)}") from exc
    except FileNotFoundError as exc:
        raise HarnessError(f"{what}: {cmd[0]} not found") from exc
    if proc.returncode != 0:
        raise HarnessError(
            f"{what}: `{' '.join(cmd[:6])}...` exited {proc.returncode}:\n{_tail(proc.stdout)}"
        )
    return proc.stdout


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- host packages


def ensure_packages(log: Log = _log) -> None:
    """Install Debian's docker.io, docker-compose and debootstrap if any is missing."""
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise HarnessError(
            f"packages {', '.join(missing)} are missing; install them (Debian/Ubuntu, as root): "
            f"apt-get install {' '.join(missing)}"
        )
    log(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], what="apt-get update", env=env)
    _run(
        ["apt-get", "install", "-y", "-q", *missing],
        what="apt-get install",
        env=env,
    )


def docker_cli() -> str:
    """Debian's client first: it matches the Debian dockerd the harness starts."""
    override = os.environ.get("SMDIST_DOCKER")
    if override:
        return override
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise HarnessError("no docker client on PATH (Debian package docker.io)")
    return found


# --------------------------------------------------------------------------- the engine


@dataclass
class Engine:
    """A dockerd on a private socket. ``pid`` is set only if this process started it."""

    state_dir: Path
    pid: int | None = None
    adopted: bool = False  # a leftover of a dead session, stopped by its recorded pid
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.state_dir / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        # Debian's docker-compose v1 is a Python program whose package is `compose`: a
        # PYTHONPATH holding this checkout (whose compose/ is the harness) shadows it
        # ("No module named 'compose.cli'").
        env.pop("PYTHONPATH", None)
        env["DOCKER_HOST"] = self.host
        env["COMPOSE_INTERACTIVE_NO_CLI"] = "1"
        return env

    def docker(self, *args: str, what: str, timeout: float = 600) -> str:
        return _run([docker_cli(), *args], what=what, env=self.env, timeout=timeout)

    def unchecked(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` whose failure is an answer, not an error (``kill`` of a container
        that has already exited); output captured. Raises TimeoutExpired at ``timeout``."""
        return subprocess.run(
            [docker_cli(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )

    def logs(self, cid: str) -> str:
        """A container's whole log, stdout and stderr interleaved as it wrote them."""
        return subprocess.run(
            [docker_cli(), "logs", cid],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
        ).stdout

    def alive(self) -> bool:
        try:
            proc = self.unchecked("version", "--format", "{{.Server.Version}}", timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def image_exists(self, tag: str) -> bool:
        return self.unchecked("image", "inspect", tag, timeout=30).returncode == 0

    @classmethod
    def start(cls, state_dir: Path = STATE_DIR, log: Log = _log, timeout: float = 90) -> Engine:
        """Start a private dockerd, or reuse the one a previous ``up`` left on our socket."""
        state_dir.mkdir(parents=True, exist_ok=True)
        engine = cls(state_dir)
        with _locked(state_dir / "engine.lock"):
            if engine.socket.exists() and engine.alive():
                if (state_dir / DETACHED).exists():
                    log(f"using the dockerd `up` left on {engine.socket}")
                else:
                    # Left behind by a session that died: ours to stop when done.
                    log(f"adopting a leftover harness dockerd on {engine.socket}")
                    engine.adopted = True
                return engine
            (state_dir / DETACHED).unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                engine.socket.unlink()
            # A short exec root: containerd's socket path must fit in 108 bytes.
            exec_root = (
                Path(tempfile.gettempdir()) / f"smdist-compose-{_digest(str(state_dir))[:8]}"
            )
            cmd = [
                shutil.which("dockerd") or "dockerd",
                "--host", engine.host,
                "--data-root", str(state_dir / "data"),
                "--exec-root", str(exec_root),
                "--pidfile", str(state_dir / "dockerd.pid"),
                # No iptables, NAT, forwarding or default bridge: nothing that could clash
                # with another engine on this machine or route a container past it.
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--bridge=none",
                "--default-address-pool", ADDRESS_POOL,
            ]  # fmt: skip
            log_file = open(state_dir / "dockerd.log", "ab")  # noqa: SIM115 - owned by dockerd
            proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
            log_file.close()
            engine.pid, engine._proc = proc.pid, proc
            deadline = time.monotonic() + timeout
            while not (engine.socket.exists() and engine.alive()):
                if proc.poll() is not None:
                    log_path = state_dir / "dockerd.log"
                    raise HarnessError(
                        f"dockerd exited {proc.returncode} at start; "
                        f"log {log_path}:\n{_tail(_read(log_path))}"
                    )
                if time.monotonic() > deadline:
                    engine.stop()
                    raise HarnessError(
                        f"dockerd did not answer on {engine.socket} in {timeout:.0f}s"
                    )
                time.sleep(0.2)  # polling a socket that appears: no event to wait on
            log(f"started dockerd pid {proc.pid} on {engine.socket}")
            return engine

    def stop(self, timeout: float = 60) -> None:
        """Stop the dockerd this process started (SIGTERM, then SIGKILL); others are left alone."""
        if self.adopted:
            self.adopted = False
            stop_recorded_engine(self.state_dir, timeout=timeout)
        if self._proc is None:
            return
        proc, self._proc, self.pid = self._proc, None, None
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _session_lock(path: Path, log: Log, timeout: float = 1800) -> IO[str]:
    """One harness session at a time per state dir: a second one would share the engine
    and could have it stopped under its feet. The lock lives as long as the open file."""
    fh = open(path, "a+")  # noqa: SIM115 - held until Harness.close
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError as exc:
            if time.monotonic() > deadline:
                fh.close()
                raise HarnessError(
                    f"{path}: another compose session held it for {timeout:.0f}s"
                ) from exc
            if not announced:
                log(f"waiting for another compose session to finish ({path})")
                announced = True
            time.sleep(1)  # flock has no timed wait


def stop_recorded_engine(state_dir: Path = STATE_DIR, log: Log = _log, timeout: float = 60) -> bool:
    """``down``: stop the dockerd whose pid the harness recorded, if it is still that dockerd."""
    pid_file = state_dir / "dockerd.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        log("no harness dockerd recorded")
        return False
    cmdline = _read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ")
    if "dockerd" not in cmdline or str(state_dir / "docker.sock") not in cmdline:
        log(f"pid {pid} is not the harness's dockerd any more; nothing to stop")
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # not our child: /proc is the only way to see it go
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    log(f"stopped dockerd pid {pid}")
    return True


# --------------------------------------------------------------------------- images


def base_image_tag() -> str:
    """The debootstrap base image's tag: a hash of everything that goes into it."""
    recipe = json.dumps([BASE_SUITE, BASE_MIRROR, "minbase", sorted(BASE_PACKAGES), 1])
    return f"smdist-base:{_digest(recipe)}"


def ensure_base_image(engine: Engine, log: Log = _log) -> str:
    """Build the Debian base image with debootstrap + ``docker import`` unless cached."""
    tag = base_image_tag()
    with _locked(engine.state_dir / "base.lock"):
        if engine.image_exists(tag):
            return tag
        if os.geteuid() != 0:
            raise HarnessError("building the base image needs root (debootstrap)")
        log(f"building base image {tag} with debootstrap ({BASE_SUITE}, {BASE_MIRROR})")
        rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=engine.state_dir))
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    BASE_SUITE,
                    str(rootfs),
                    BASE_MIRROR,
                ],
                what="debootstrap",
                timeout=900,
            )
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / junk).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            tar = subprocess.Popen(
                ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                stdout=subprocess.PIPE,
            )
            try:
                out = subprocess.run(
                    [docker_cli(), "import", "-", tag],
                    stdin=tar.stdout,
                    env=engine.env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()
            if out.returncode != 0 or tar.returncode != 0:
                raise HarnessError(f"docker import {tag} failed: {_tail(out.stderr)}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        return tag


@dataclass(frozen=True)
class Wheelhouse:
    deps: Path  # torch and every other third-party wheel
    smdist: Path  # the smdist wheel, rebuilt whenever smdist's sources change


def _project_dependencies() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:  # Python 3.10: the one list we need, read by hand
        block = re.search(r"(?ms)^dependencies\s*=\s*\[(.*?)\]", text)
        listed = re.findall(r'"([^"]+)"', block.group(1)) if block else []
    else:
        listed = tomllib.loads(text)["project"]["dependencies"]
    deps = [d for d in listed if not re.match(r"torch\b", d)]
    return [TORCH, *deps, *EXTRA_WHEELS]


# Wheels for the image's Python (bookworm's 3.11; set SMDIST_COMPOSE_PYTHON for another
# base image), whatever Python runs the harness.
IMAGE_PYTHON = os.environ.get("SMDIST_COMPOSE_PYTHON", "3.11")
_IMAGE_PLATFORM = (
    "--only-binary=:all:",
    "--python-version", IMAGE_PYTHON,
    "--implementation", "cp",
    "--abi", "cp" + IMAGE_PYTHON.replace(".", ""),
    "--platform", "manylinux_2_28_x86_64",
    "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
)  # fmt: skip


def ensure_wheelhouse(python: str = sys.executable, log: Log = _log) -> Wheelhouse:
    """Third-party wheels (cached by a hash of the requirements) and a fresh smdist wheel."""
    root = CACHE_DIR / "wheelhouse"
    root.mkdir(parents=True, exist_ok=True)
    requirements = _project_dependencies()
    deps = root / f"deps-{_digest(*requirements, *_IMAGE_PLATFORM)}"
    if not deps.is_dir():
        log(f"downloading wheels: {' '.join(requirements)}")
        tmp = Path(tempfile.mkdtemp(prefix="tmp-deps-", dir=root))
        _run(
            [
                python,
                "-m",
                "pip",
                "download",
                "-q",
                "-d",
                str(tmp),
                *_IMAGE_PLATFORM,
                *requirements,
            ],
            what="pip download",
        )
        _prune(root, "deps-", keep=None)
        tmp.rename(deps)
    sources = sorted(
        p for p in (REPO / "smdist").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    key = _digest(
        (REPO / "pyproject.toml").read_bytes(),
        *(f"{p.relative_to(REPO)}" for p in sources),
        *(p.read_bytes() for p in sources),
    )
    wheel_dir = root / f"smdist-{key}"
    if not wheel_dir.is_dir():
        log("building the smdist wheel")
        with tempfile.TemporaryDirectory(dir=root) as tmp_name:
            src = Path(tmp_name) / "src"
            shutil.copytree(
                REPO / "smdist", src / "smdist", ignore=shutil.ignore_patterns("__pycache__")
            )
            shutil.copy2(REPO / "pyproject.toml", src / "pyproject.toml")
            readme = REPO / "README.md"
            (src / "README.md").write_text(readme.read_text() if readme.exists() else "smdist\n")
            out = Path(tmp_name) / "wheel"
            _run(
                [
                    python,
                    "-m",
                    "pip",
                    "wheel",
                    "-q",
                    "--no-deps",
                    "--no-build-isolation",
                    "-w",
                    str(out),
                    str(src),
                ],
                what="building the smdist wheel",
            )
            _prune(root, "smdist-", keep=None)
            out.rename(wheel_dir)
    return Wheelhouse(deps=deps, smdist=wheel_dir)


def _prune(root: Path, prefix: str, keep: Path | None) -> None:
    for old in root.glob(f"{prefix}*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def build_image(
    engine: Engine,
    base: str,
    wheels: Wheelhouse,
    code_dir: Path = SCRIPTS_DIR,
    tag: str = IMAGE,
    log: Log = _log,
) -> str:
    """``docker build`` compose/Dockerfile from a staged context; layers cache in the engine."""
    context = CACHE_DIR / "context"
    with _locked(CACHE_DIR / "context.lock"):
        shutil.rmtree(context, ignore_errors=True)
        (context / "deps").mkdir(parents=True)
        for wheel in wheels.deps.glob("*.whl"):
            # Hard links: the 200 MB of torch is not copied on every build.
            try:
                os.link(wheel, context / "deps" / wheel.name)
            except OSError:
                shutil.copy2(wheel, context / "deps" / wheel.name)
        shutil.copytree(wheels.smdist, context / "smdist")
        shutil.copytree(code_dir, context / "code", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "launchers", context / "launchers")
        shutil.copy2(COMPOSE_DIR / "Dockerfile", context / "Dockerfile")
        log(f"building image {tag} from {base}")
        engine.docker(
            "build", "--network", "none", "--build-arg", f"BASE_IMAGE={base}",
            "-t", tag, str(context),
            what=f"docker build {tag}",
        )  # fmt: skip
    return tag


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class HostResult:
    """One container of a finished job: what it exited with, printed and wrote."""

    host: str
    exit_code: int
    log: str
    host_dir: Path
    seconds: float  # from the container's start to its exit
    finished_at: float  # the container's exit, time.time() (containers share this clock)

    @property
    def model_dir(self) -> Path:
        return self.host_dir / "model"

    @property
    def output_dir(self) -> Path:
        return self.host_dir / "output"

    @property
    def checkpoint_dir(self) -> Path:
        return self.host_dir / "checkpoints"

    @property
    def failure(self) -> str:
        """/opt/ml/output/failure as the container left it ("" when there is none)."""
        return _read(self.output_dir / "failure")


@dataclass(frozen=True)
class JobResult:
    name: str
    hosts: dict[str, HostResult]
    compose_file: Path
    seconds: float
    # What a ``during`` action recorded: name -> time.time() (e.g. when it killed a host).
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def last_exit(self) -> float:
        """time.time() when the last container exited."""
        return max(r.finished_at for r in self.hosts.values())

    def __getitem__(self, host: str) -> HostResult:
        return self.hosts[host]

    @property
    def exit_codes(self) -> dict[str, int]:
        return {h: r.exit_code for h, r in self.hosts.items()}

    def logs(self) -> str:
        """Every container's log, headed by its host: the message of a failed assertion."""
        return "\n".join(
            f"----- {h} (exit {r.exit_code}) -----\n{_tail(r.log, 60)}"
            for h, r in self.hosts.items()
        )


@dataclass
class RunningJob:
    """A job whose containers are running: what a ``during`` action can wait for and do."""

    harness: Harness
    name: str
    work: Path
    ids: dict[str, str]  # host -> container id
    deadline: float  # time.monotonic() at which run_job gives up on the job
    marks: dict[str, float] = field(default_factory=dict)

    def output_dir(self, host: str) -> Path:
        return self.work / "hosts" / host / "output"

    def wait_for_log(self, host: str, pattern: str) -> None:
        """Return once ``host`` logged a line matching ``pattern`` (HarnessError: never)."""
        self.harness._await_log(self.ids[host], host, pattern, self.deadline - time.monotonic())

    def mark(self, what: str) -> float:
        self.marks[what] = now = time.time()
        return now

    def kill(self, host: str) -> None:
        """``docker kill``: SIGKILL, no word from the host; ``marks["kill HOST"]``."""
        self.mark(f"kill {host}")
        self.harness.engine.docker("kill", self.ids[host], what=f"{self.name}: kill {host}")

    def pause(self, host: str) -> None:
        """``docker pause``: the host freezes with its connections open; ``marks["pause HOST"]``."""
        self.mark(f"pause {host}")
        self.harness.engine.docker("pause", self.ids[host], what=f"{self.name}: pause {host}")

    def unpause(self, host: str) -> None:
        self.harness.engine.docker("unpause", self.ids[host], what=f"{self.name}: unpause {host}")

    def wait_exit(self, host: str) -> int:
        """Block until ``host``'s container exits (HarnessError at the job's deadline)."""
        out = self.harness.engine.docker(
            "wait", self.ids[host], what=f"{self.name}: wait for {host}",
            timeout=max(1.0, self.deadline - time.monotonic()),
        )  # fmt: skip
        return int(out.strip())

    def stop(self, host: str, grace: float = 120) -> None:
        """``docker stop -t GRACE`` (SIGTERM, SIGKILL after GRACE s); ``marks["stop HOST"]``."""
        self.mark(f"stop {host}")
        self.harness.engine.docker(
            "stop", "-t", str(int(grace)), self.ids[host],
            what=f"{self.name}: stop {host}", timeout=grace + 60,
        )  # fmt: skip


def compose_cli(engine: Engine) -> list[str]:
    """``docker compose`` (v2) when the plugin is there, else Debian's ``docker-compose`` (v1)."""
    forced = os.environ.get("SMDIST_COMPOSE_CLI")
    if forced:
        return forced.split()
    probe = subprocess.run(
        [docker_cli(), "compose", "version"], env=engine.env, capture_output=True, check=False
    )
    if probe.returncode == 0:
        return [docker_cli(), "compose"]
    found = shutil.which("docker-compose")
    if not found:
        raise HarnessError("neither `docker compose` nor `docker-compose` is installed")
    return [found]


def _timestamp(text: str) -> float:
    # Docker's RFC 3339 with nanoseconds: keep microseconds for fromisoformat (3.10).
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        return 0.0
    frac = (m.group(2) or ".0")[:7]
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return dt.datetime.fromisoformat(m.group(1) + frac + zone).timestamp()


@dataclass
class Harness(Closes):
    """A ready engine and image, and the jobs run on them; ``timings`` for the report."""

    engine: Engine
    image: str = IMAGE
    work_root: Path = REPO / ".smdist-work" / "compose"
    timings: list[tuple[str, float]] = field(default_factory=list)
    log: Log = _log
    _session: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        *,
        state_dir: Path = STATE_DIR,
        code_dir: Path = SCRIPTS_DIR,
        base_image: str | None = None,
        work_root: Path | None = None,
        log: Log = _log,
    ) -> Harness:
        """Packages, dockerd, base image, wheelhouse and image: everything a job needs."""
        timings: list[tuple[str, float]] = []

        def step(name: str, fn: Callable[[], T]) -> T:
            t0 = time.monotonic()
            result = fn()
            timings.append((name, time.monotonic() - t0))
            return result

        step("host packages", lambda: ensure_packages(log))
        state_dir.mkdir(parents=True, exist_ok=True)
        session = _session_lock(state_dir / "session.lock", log)
        try:
            engine = step("dockerd start", lambda: Engine.start(state_dir, log))
        except BaseException:
            session.close()
            raise
        try:
            base = base_image or step("base image", lambda: ensure_base_image(engine, log))
            if not base_image:
                # The Dockerfile's default BASE_IMAGE, for a plain `docker build` on this engine.
                engine.docker("tag", base, "smdist-base:latest", what="docker tag")
            wheels = step("wheelhouse", lambda: ensure_wheelhouse(log=log))
            step("image build", lambda: build_image(engine, base, wheels, code_dir, log=log))
        except BaseException:
            engine.stop()
            session.close()
            raise
        # Leftovers of a session that was killed mid-job: only ever on the harness's engine.
        for kind in ("container", "network", "image"):
            subprocess.run(
                [docker_cli(), kind, "prune", "-f"],
                env=engine.env,
                capture_output=True,
                check=False,
            )
        h = cls(engine=engine, timings=timings, log=log, _session=session)
        if work_root is not None:
            h.work_root = work_root
        return h

    def close(self) -> None:
        """Stop the dockerd this harness started and let the next session in."""
        self.engine.stop()
        if self._session is not None:
            self._session.close()
            self._session = None

    def detach(self) -> None:
        """Leave the dockerd running (``up``); ``python -m compose.harness down`` stops it."""
        (self.engine.state_dir / DETACHED).touch()
        self.engine._proc = None
        self.engine.pid = None
        self.engine.adopted = False
        self.close()

    def run_job(
        self,
        name: str,
        *,
        hosts: int | Sequence[str],
        command: Sequence[str],
        resource_hosts: Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        hyperparameters: Mapping[str, object] | None = None,
        start_order: Sequence[str] | None = None,
        wait_between: str | None = None,
        during: Callable[[RunningJob], None] | None = None,
        timeout: float = 240,
    ) -> JobResult:
        """Run one job to the end: write its compose file, start it, wait, collect, tear down.

        ``start_order`` starts the containers one at a time in that order; with
        ``wait_between`` (a regex), each is started only once the one before it has logged
        a matching line (e.g. that it is waiting for its peers).
        ``during`` runs (in a thread) once every container is up, while the job runs: e.g.
        ``lambda job: (job.wait_for_log("algo-2", "training"), job.kill("algo-2"))``; if it
        raises, the containers are killed and HarnessError is raised here with their logs.
        Its marks land in ``JobResult.marks``.
        Containers still running after ``timeout`` seconds are killed (exit code 137).
        """
        names = host_names(hosts) if isinstance(hosts, int) else list(hosts)
        work = self.work_root / name
        shutil.rmtree(work, ignore_errors=True)
        compose_file = write_job(
            work,
            names,
            command,
            image=self.image,
            resource_hosts=resource_hosts,
            environment=environment,
            hyperparameters=hyperparameters,
            header=f"compose job {name!r}, written by compose/harness.py",
        )
        project = re.sub(r"[^a-z0-9]", "", f"smdist{name}".lower()) + str(os.getpid())
        compose = [*compose_cli(self.engine), "-p", project, "-f", str(compose_file)]
        env = self.engine.env
        t0 = time.monotonic()
        try:
            if start_order:
                _run([*compose, "up", "--no-start"], what=f"{name}: compose up", env=env, cwd=work)
                for i, host in enumerate(start_order):
                    _run([*compose, "start", host], what=f"{name}: start {host}", env=env, cwd=work)
                    if wait_between and i < len(start_order) - 1:
                        (cid,) = self._containers(project, host)
                        left = timeout - (time.monotonic() - t0)
                        self._await_log(cid, host, wait_between, left)
            else:
                _run([*compose, "up", "-d"], what=f"{name}: compose up", env=env, cwd=work)
            ids = self._containers(project)
            if len(ids) != len(names):
                raise HarnessError(f"{name}: {len(ids)} containers for {len(names)} hosts")
            running: RunningJob | None = None
            action_error: list[BaseException] = []
            action: threading.Thread | None = None
            if during is not None:
                by_host = {h: self._containers(project, h)[0] for h in names}
                running = RunningJob(self, name, work, by_host, t0 + timeout)

                def act(
                    job: RunningJob = running, fn: Callable[[RunningJob], None] = during
                ) -> None:
                    try:
                        fn(job)
                    except BaseException as exc:  # re-raised in the caller once the job ends
                        action_error.append(exc)
                        # The scenario is broken: end the job now, not at its timeout.
                        self.engine.unchecked("kill", *job.ids.values())

                action = threading.Thread(target=act, name=f"{name}-during", daemon=True)
                action.start()
            try:
                self.engine.unchecked(
                    "wait", *ids, timeout=max(1.0, timeout - (time.monotonic() - t0))
                )
            except subprocess.TimeoutExpired:
                self.log(f"{name}: containers still running after {timeout:.0f}s; killing them")
                for verb in ("kill", "wait"):  # exited ones just answer with an error
                    self.engine.unchecked(verb, *ids)
            seconds = time.monotonic() - t0
            if action is not None:
                action.join(timeout=60)
            results = {r.host: r for r in (self._collect(cid, work) for cid in ids)}
        finally:
            subprocess.run(
                [*compose, "down", "-v", "--remove-orphans", "-t", "5"],
                env=env,
                cwd=work,
                capture_output=True,
                timeout=120,
                check=False,
            )
        self.timings.append((name, seconds))
        job = JobResult(
            name=name,
            hosts=dict(sorted(results.items())),
            compose_file=compose_file,
            seconds=seconds,
            marks=dict(running.marks) if running else {},
        )
        if action_error:
            raise HarnessError(
                f"{name}: the action during the job failed: {action_error[0]}\n{job.logs()}"
            ) from action_error[0]
        return job

    def _containers(self, project: str, host: str | None = None) -> list[str]:
        """Container ids by compose's labels, running or not (v1 and v2 label alike)."""
        labels = [f"com.docker.compose.project={project}"]
        if host is not None:
            labels.append(f"com.docker.compose.service={host}")
        filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
        return self.engine.docker("ps", "-a", "-q", *filters, what="docker ps").split()

    def _await_log(self, cid: str, host: str, pattern: str, timeout: float) -> None:
        """Follow a container's log until a line matches ``pattern``; raise at the deadline."""
        regex = re.compile(pattern)
        proc = subprocess.Popen(
            [docker_cli(), "logs", "-f", cid],
            env=self.engine.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        timer = threading.Timer(max(timeout, 1.0), proc.kill)  # the hang guard
        timer.start()
        seen: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(line)
                if regex.search(line):
                    return
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
        raise HarnessError(
            f"{host}: no log line matched {pattern!r} before it exited or {timeout:.0f}s "
            f"passed:\n{_tail(''.join(seen))}"
        )

    def _collect(self, cid: str, work: Path) -> HostResult:
        fmt = (
            '{{index .Config.Labels "com.docker.compose.service"}}|{{.State.ExitCode}}|'
            "{{.State.StartedAt}}|{{.State.FinishedAt}}"
        )
        info = self.engine.docker("inspect", "-f", fmt, cid, what="docker inspect").strip()
        host, code, started, finished = info.split("|")
        logs = self.engine.logs(cid)
        # Kept beside the host's model and output dirs: the job's record after teardown.
        (work / "hosts" / host / "container.log").write_text(logs)
        return HostResult(
            host=host,
            exit_code=int(code),
            log=logs,
            host_dir=work / "hosts" / host,
            seconds=max(0.0, _timestamp(finished) - _timestamp(started)),
            finished_at=_timestamp(finished),
        )

    def docker_run(
        self,
        name: str,
        args: Sequence[str],
        *,
        docker_args: Sequence[str] = (),
        timeout: float = 180,
    ) -> tuple[int, str]:
        """``docker run --rm [docker_args] IMAGE ARGS``: its exit code and output."""
        t0 = time.monotonic()
        cmd = [docker_cli(), "run", "--rm", "--network", "none", *docker_args, self.image, *args]
        try:
            proc = subprocess.run(
                cmd,
                env=self.engine.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"{name}: `docker run ... {' '.join(args)}` ran past {timeout:.0f}s"
            ) from exc
        self.timings.append((name, time.monotonic() - t0))
        return proc.returncode, proc.stdout


# --------------------------------------------------------------------------- CLI


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of hosts >= 1, got {text!r}")
    return int(text)


def _job_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '_', '.', '-', got {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m compose.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="install packages, start the private dockerd, build images")
    build = sub.add_parser("build", help="like up (kept for symmetry with docker compose)")
    run = sub.add_parser("run", help="run SCRIPT on N hosts; exit 0 only if every host did")
    for p in (up, build, run):
        p.add_argument("--code", type=Path, default=SCRIPTS_DIR, help="dir copied to /opt/ml/code")
        p.add_argument("--base-image", default=None, help="base image (default: debootstrap)")
    run.add_argument("--hosts", type=_count, default=2, help="number of hosts (default 2)")
    run.add_argument("--nproc-per-host", default=None, help="auto or N")
    run.add_argument(
        "--name", type=_job_name, default="job", help="work dir .smdist-work/compose/NAME"
    )
    run.add_argument("--timeout", type=float, default=1800)
    run.add_argument("script", help="entry script, relative to --code")
    run.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("down", help="stop the dockerd that `up` left running")
    ns = parser.parse_args(argv)
    if ns.cmd != "down":
        if not ns.code.is_dir():
            parser.error(f"--code {ns.code}: not a directory")
        in_code = ns.cmd == "run" and not Path(ns.script).is_absolute()
        if in_code and not (ns.code / ns.script).is_file():
            parser.error(f"script {ns.script}: not found in --code {ns.code}")
    try:
        if ns.cmd == "down":
            stop_recorded_engine()
            (STATE_DIR / DETACHED).unlink(missing_ok=True)
            return 0
        h = Harness.start(code_dir=ns.code.resolve(), base_image=ns.base_image)
        if ns.cmd in ("up", "build"):
            h.detach()
            print(f"export DOCKER_HOST={h.engine.host}")
            return 0
        with h:
            command = job_command(ns.script, ns.args, ns.nproc_per_host)
            job = h.run_job(ns.name, hosts=ns.hosts, command=command, timeout=ns.timeout)
        for host, result in job.hosts.items():
            print(f"===== {host}: exit {result.exit_code} ({result.host_dir}) =====")
            print(result.log, end="" if result.log.endswith("\n") else "\n")
        print(f"job {ns.name}: exit codes {job.exit_codes}; files under {job.compose_file.parent}")
        return max(job.exit_codes.values(), default=1)
    except HarnessError as exc:
        print(f"compose.harness: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
