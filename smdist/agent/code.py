"""Script mode: the job's code into /opt/ml/code, its dependencies installed, once per host.

The SageMaker SDK uploads ``source_dir`` as ``sourcedir.tar.gz`` and names it in the
``sagemaker_submit_directory`` hyperparameter; the toolkit fetches it into an *empty*
/opt/ml/code (a non-empty one, baked into the image or mounted by local mode, is used as it
is) and pip-installs ``requirements.txt``, or the code dir itself when it is a package. smdist
does the same in the agent, never per rank. Nothing here runs when there is nothing to fetch
or install: boto3 is imported for ``s3://`` only, pip runs only for a requirements file or a
package, so a job without them starts as fast as before.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from smdist import contract
from smdist.config import Paths
from smdist.errors import (
    CodeDownloadFailed,
    ConfigError,
    DependencyInstallFailed,
    JobAborted,
    RendezvousFailed,
    SmdistError,
)
from smdist.log import log
from smdist.records import dataclass

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from tarfile import TarInfo
    from typing import Any

SUBMIT_DIRECTORY = "sagemaker_submit_directory"
CA_REPOSITORY_ARN = "CA_REPOSITORY_ARN"
# The toolkit's variable first, then the ones boto3 itself reads (it applies those anyway).
S3_ENDPOINT_VARIABLES = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REQUIREMENTS = "requirements.txt"
_PIP_TAIL_LINES = 40


# --- the code -------------------------------------------------------------------------


def _is_empty_dir(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except FileNotFoundError:
        return True
    except NotADirectoryError:
        return False


def fetch(
    paths: Paths, hyperparameters: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> bool:
    """Fill an empty /opt/ml/code from ``sagemaker_submit_directory``; True if it did.

    ``s3://BUCKET/KEY`` (boto3: ``pip install 'smdist[s3]'``), a local ``.tar.gz`` or a local
    directory (``file://`` accepted). Raises ``CodeDownloadFailed`` naming the URI and why.
    """
    uri = hyperparameters.get(SUBMIT_DIRECTORY)
    if uri is None or uri == "":
        return False
    if not isinstance(uri, str):
        raise ConfigError(
            f'{paths.hyperparameters_file}: field "{SUBMIT_DIRECTORY}": expected an s3:// URI '
            f"or a path, got {json.dumps(uri)}"
        )
    env = os.environ if environ is None else environ
    code_dir = paths.code_dir
    if not _is_empty_dir(code_dir):
        log.info("code: %s is not empty: using it as it is (%s not fetched)", code_dir, uri)
        return False
    local = uri.removeprefix("file://")
    if not uri.startswith("s3://") and Path(local).resolve() == code_dir.resolve():
        return False
    import shutil
    import tarfile
    import tempfile

    started = time.monotonic()
    code_dir.parent.mkdir(parents=True, exist_ok=True)
    # Staged next to the code dir and moved in at the end: a failure leaves it empty.
    staging = Path(tempfile.mkdtemp(prefix=".smdist-code-", dir=code_dir.parent))
    try:
        tree = staging / "code"
        if uri.startswith("s3://"):
            archive = staging / "sourcedir.tar.gz"
            region = env.get("AWS_REGION") or hyperparameters.get("sagemaker_region")
            _download_s3(uri, archive, env, region if isinstance(region, str) else None)
            extract(archive, tree, uri, code_dir)
        elif "://" in local:
            raise CodeDownloadFailed(
                f"{uri}: unsupported URI scheme (expected s3://, a local .tar.gz or a directory)"
            )
        elif os.path.isdir(local):
            shutil.copytree(local, tree, symlinks=False)
        elif os.path.isfile(local):
            if local.endswith((".tar.gz", ".tgz", ".tar")) or tarfile.is_tarfile(local):
                extract(Path(local), tree, uri, code_dir)
            else:  # the toolkit copies a lone file as it is
                tree.mkdir()
                shutil.copy2(local, tree / os.path.basename(local))
        else:
            raise CodeDownloadFailed(f"{uri}: no such file or directory")
        code_dir.mkdir(exist_ok=True)
        count = 0
        for item in tree.iterdir():
            shutil.move(str(item), str(code_dir / item.name))
            count += 1
    except OSError as exc:
        raise CodeDownloadFailed(f"{uri}: cannot copy into {code_dir}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "code: %s fetched into %s (%d entries, %.1f s)",
        uri,
        code_dir,
        count,
        time.monotonic() - started,
    )
    return True


def _download_s3(uri: str, dest: Path, environ: Mapping[str, str], region: str | None) -> None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise CodeDownloadFailed(f"{uri}: expected s3://BUCKET/KEY")
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise CodeDownloadFailed(
            f"{uri}: boto3 is not installed (install smdist[s3] in the image)"
        ) from exc
    # boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself; the toolkit's name wins.
    endpoint = environ.get("S3_ENDPOINT_URL") or None
    named = next((v for v in S3_ENDPOINT_VARIABLES if environ.get(v)), None)
    log.info(
        "code: downloading %s%s",
        uri,
        f" (endpoint from {named}: {environ[named]})" if named else "",
    )
    try:
        client = boto3.session.Session().client("s3", region_name=region, endpoint_url=endpoint)
        client.download_file(bucket, key, str(dest))
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        reason = {
            "404": "no such key or bucket (404 Not Found)",
            "NoSuchKey": "no such key",
            "NoSuchBucket": "no such bucket",
            "403": "access denied (403 Forbidden): check the job role's s3:GetObject",
            "AccessDenied": "access denied: check the job role's s3:GetObject",
        }.get(code, f"{code}: {error.get('Message', exc)}")
        raise CodeDownloadFailed(f"{uri}: {reason}") from exc
    except BotoCoreError as exc:  # no credentials, endpoint unreachable, ...
        raise CodeDownloadFailed(f"{uri}: {exc}") from exc


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _refusal(member: TarInfo, root: str) -> str | None:
    """Why extracting ``member`` under ``root`` would be unsafe, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        return "has an absolute path"
    target = os.path.normpath(os.path.join(root, name))
    if not _inside(target, root):
        return "would be written outside the code dir"
    if member.issym():
        if os.path.isabs(member.linkname):
            return f"is a link to an absolute path ({member.linkname})"
        pointed = os.path.normpath(os.path.join(os.path.dirname(target), member.linkname))
        if not _inside(pointed, root):
            return f"is a link pointing outside the code dir ({member.linkname})"
    elif member.islnk():
        pointed = os.path.normpath(os.path.join(root, member.linkname))
        if os.path.isabs(member.linkname) or not _inside(pointed, root):
            return f"is a hard link pointing outside the code dir ({member.linkname})"
    elif not (member.isfile() or member.isdir()):
        return "is a device or FIFO"
    return None


def extract(archive: Path, dest: Path, uri: str, shown_as: Path) -> None:
    """Extract a tar(.gz) into ``dest`` after checking every member: nothing is written
    unless no member can land outside it (absolute paths, ``..``, links pointing out)."""
    import tarfile
    import zlib

    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                why = _refusal(member, root)
                if why is not None:
                    raise CodeDownloadFailed(
                        f"{uri}: archive member {member.name!r} {why}; refused, nothing was "
                        f"extracted into {shown_as}"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            # The standard library's own guard too, where this Python has it.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise CodeDownloadFailed(f"{uri}: not a valid tar.gz archive: {exc}") from exc


# --- the dependencies -----------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    """What pip will install for this host: the requirements, or the code dir as a package."""

    code_dir: Path
    package: bool
    requirements: Path | None

    @property
    def what(self) -> str:
        if self.package:
            return "the code dir as a package" + (" and requirements" if self.requirements else "")
        return "requirements"

    def argv(self, python: str) -> list[str]:
        argv = [python, "-m", "pip", "install"]
        if self.package:
            argv.append(".")
        if self.requirements is not None:
            argv += ["-r", self.requirements.name]
        return argv


def _is_package(code_dir: Path) -> bool:
    if (code_dir / "setup.py").is_file():
        return True
    try:
        text = (code_dir / "pyproject.toml").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"^\s*\[build-system\]", text, re.MULTILINE) is not None


def _lists_anything(requirements: Path) -> bool:
    """Whether a requirements file has a line that is not blank or a comment: an empty one
    costs no pip run (seconds of start-up) for nothing."""
    try:
        text = requirements.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # pip will say what is wrong with it
    return any(line.split("#", 1)[0].strip() for line in text.splitlines())


def plan_install(code_dir: Path | None, packages: bool = True) -> Install | None:
    """The toolkit's rule: a package (setup.py, or pyproject.toml with a build system) is
    installed with ``pip install .``; else a requirements.txt with ``pip install -r``.
    ``packages=False``: requirements only (an entry outside /opt/ml/code: a developer's
    own project is not pip-installed behind their back)."""
    if code_dir is None or not code_dir.is_dir():
        return None
    req = code_dir / REQUIREMENTS
    requirements = req if req.is_file() else None
    if requirements is not None and not _lists_anything(requirements):
        log.info("code: %s lists nothing to install: pip is not run", requirements)
        requirements = None
    package = packages and _is_package(code_dir)
    if not package and requirements is None:
        return None
    return Install(code_dir, package, requirements)


_ARN = (
    r"arn:(?P<partition>[^:]+):codeartifact:(?P<region>[^:]+):(?P<account>[^:]+)"
    r":repository/(?P<domain>[^/]+)/(?P<repository>.+)"
)


def parse_repository_arn(arn: str) -> dict[str, str]:
    m = re.fullmatch(_ARN, arn)
    if m is None:
        raise ConfigError(
            f"{CA_REPOSITORY_ARN}: expected arn:PARTITION:codeartifact:REGION:ACCOUNT:"
            f"repository/DOMAIN/REPOSITORY, got {arn!r}"
        )
    return m.groupdict()


def codeartifact_index_url(endpoint: str, repository: str, token: str) -> str:
    """The toolkit's pip index for a CodeArtifact repository endpoint: ``.../simple/``,
    authenticated as ``aws:TOKEN``."""
    simple = re.sub(f"{re.escape(repository)}/?$", f"{repository}/simple/", endpoint)
    return re.sub("^https://", f"https://aws:{token}@", simple)


def codeartifact_index(arn: str) -> str:
    """``CA_REPOSITORY_ARN`` -> an authenticated pip index URL, as the toolkit builds it."""
    parts = parse_repository_arn(arn)
    try:
        import boto3

        client = boto3.session.Session().client("codeartifact", region_name=parts["region"])
        token = client.get_authorization_token(
            domain=parts["domain"], domainOwner=parts["account"]
        )["authorizationToken"]
        endpoint = client.get_repository_endpoint(
            domain=parts["domain"],
            domainOwner=parts["account"],
            repository=parts["repository"],
            format="pypi",
        )["repositoryEndpoint"]
    except ImportError as exc:
        raise DependencyInstallFailed(
            f"{CA_REPOSITORY_ARN} is set but boto3 is not installed (install smdist[s3])"
        ) from exc
    except Exception as exc:  # botocore's errors: credentials, permissions, no such domain
        raise DependencyInstallFailed(
            f"cannot get a CodeArtifact index for {arn}: {type(exc).__name__}: {exc}"
        ) from exc
    return codeartifact_index_url(str(endpoint), parts["repository"], str(token))


@contextlib.contextmanager
def _interpreter_lock(python: str) -> Iterator[None]:
    """Hosts that share one interpreter (``--simulate``) install one after the other."""
    import fcntl
    import hashlib
    import tempfile

    digest = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"smdist-pip-{digest}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _requirement_name(text: str) -> str | None:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None


def requirement_names(path: Path) -> set[str]:
    """Normalised project names a requirements file lists (``-r``/options skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    names = set()
    for line in text.splitlines():
        name = _requirement_name(line.split("#", 1)[0])
        if name:
            names.add(name)
    return names


def failure_reason(tail: Sequence[str], install: Install, returncode: int) -> str:
    """One line: the requirement (file and line) pip stopped at, and pip's last error."""
    errors = [line.removeprefix("ERROR: ").strip() for line in tail if line.startswith("ERROR:")]
    last = errors[-1] if errors else (tail[-1].strip() if tail else "")
    last = last or f"pip exited {returncode}"
    req_file = install.requirements
    at = re.search(r"\(from line (\d+) of ([^)]+)\)", last)
    if at:
        return f"{Path(at.group(2)).name} line {at.group(1)}: {last[: at.start()].strip()}"
    m = re.fullmatch(r"(.*?) for (\S+)", last) or re.search(r"(.*) the requirement (\S+)", last)
    if m and req_file is not None:
        wanted = _requirement_name(m.group(2))
        try:
            lines = req_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        for number, line in enumerate(lines, 1):
            spec = line.split("#", 1)[0].strip()
            if spec and _requirement_name(spec) == wanted:
                return f"{req_file.name} line {number} '{spec}': {m.group(1).strip()}"
    what = " ".join(install.argv("python")[1:])
    return f"{what} failed (exit {returncode}): {last}"


def run_install(
    install: Install, python: str, timeout_s: float, environ: Mapping[str, str] | None = None
) -> None:
    """``python -m pip install ...`` in the code dir, its output relayed as ``pip: ...`` lines.

    pip's own configuration (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, pip.conf) applies
    as in any pip run; ``CA_REPOSITORY_ARN`` adds the CodeArtifact index as the toolkit does.
    """
    import subprocess  # here: not on every agent's way to its first rank (issue 18)
    import threading

    env = dict(os.environ if environ is None else environ)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    argv = install.argv(python)
    shown = list(argv)
    arn = env.get(CA_REPOSITORY_ARN)
    if arn:
        argv += ["-i", codeartifact_index(arn)]
        shown += ["-i", "<CodeArtifact index of CA_REPOSITORY_ARN>"]  # the URL holds a token
    log.info("installing %s: %s (in %s)", install.what, " ".join(shown), install.code_dir)
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    me = os.getpid()
    with _interpreter_lock(python):
        proc = subprocess.Popen(
            argv,
            cwd=install.code_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=contract.exec_dying_with(me),
        )
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    log.info("pip: %s", line)
                    tail.append(line)
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    if returncode != 0 and elapsed >= timeout_s:
        raise DependencyInstallFailed(
            f"pip did not finish within {timeout_s:.0f} s (--install-timeout): "
            + (tail[-1] if tail else "no output")
        )
    if returncode != 0:
        raise DependencyInstallFailed(failure_reason(list(tail), install, returncode))
    log.info("installed %s in %.1f s", install.what, elapsed)


# --- every host ready before any worker starts -----------------------------------------

READY = "deps/"
STATUS = "status/"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


def prepare_hosts(
    coordinator: Any,
    host: str,
    hosts: Sequence[str],
    install: Callable[[], None] | None,
    what: str,
    timeout_s: float,
    progress_s: float = 10.0,
) -> None:
    """Install on this host (if ``install``), then wait until every host has.

    While a host installs, the others know (its ``status/`` key) and say so; a failed
    install is published as the job's abort, so every host stops with its headline.
    ``coordinator`` is the rendezvous' Coordinator.
    """
    from smdist.agent.rendezvous import JobEvent

    if install is not None:
        coordinator.publish(STATUS + host, json.dumps({"doing": what, "since": time.time()}))
        try:
            install()
        except SmdistError as exc:
            headline = f"{exc.headline()} (host {host})"
            event = JobEvent("failure", host, headline, exc.exit_code, time=time.time())
            coordinator.report(event)
            raise
    others = [h for h in hosts if h != host]
    coordinator.publish(READY + host, "1")
    if not others:
        return
    keys = [READY + h for h in others]
    started = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - started)
        missing = coordinator.wait_for(keys, max(0.0, min(progress_s, left)), or_abort=True)
        event = coordinator.event()
        if event is not None:
            raise JobAborted(event.headline, event.exit_code)
        if not missing:
            return
        statuses = coordinator.published(STATUS)
        waiting = []
        for key in missing:
            h = key.removeprefix(READY)
            status = statuses.get(STATUS + h)
            if status is None:
                waiting.append(f"{h}: not ready yet")
                continue
            info = json.loads(status)
            since = max(0.0, time.time() - float(info.get("since", time.time())))
            waiting.append(f"{h}: {info.get('doing', 'preparing')} ({_duration(since)})")
        if left <= 0:
            raise RendezvousFailed(
                f"hosts not ready after {timeout_s:.0f} s (--install-timeout): "
                + "; ".join(waiting)
            )
        log.info("waiting for %s", "; ".join(waiting))
