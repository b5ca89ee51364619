"""Rank-aware writes to /opt/ml/model and the checkpoint dir (the agent checks the model dirs
of all hosts for clashes at the exit barrier: ``smdist.agent.model_dir``).

SageMaker tars every host's /opt/ml/model into one ``model.tar.gz``; two hosts writing the
same relative path means one file silently wins. Three scopes decide who writes where:

- ``"leader"``: global rank 0 only, at the top of the dir; every other rank gets a no-op;
- ``"host"``: local rank 0 of each host, under ``<host>/``;
- ``"rank"``: every rank, under ``rank-<N>/``.

Every write is atomic (a temporary file in the same directory, fsync, rename, fsync of the
directory), so neither a reader nor the tarball ever sees half a file. Importing this module
never imports torch; ``save`` does, lazily.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from smdist import contract
from smdist.config import resolve_root
from smdist.contract import Category
from smdist.errors import SmdistError
from smdist.worker import environment

Scope = Literal["leader", "host", "rank"]
SCOPES: tuple[str, ...] = ("leader", "host", "rank")

MODEL_DIR_ENV = "SM_MODEL_DIR"
CHECKPOINT_DIR_ENV = contract.CHECKPOINT_DIR_ENV
TEMP_SUFFIX = contract.TEMP_SUFFIX
_STEP_RE = re.compile(r"^(?P<stem>.+)\.step-(?P<step>\d+)(?P<suffix>\.[^.]*)?$")
# No "a" (an atomic write replaces) and no "x" (a rename cannot promise exclusive creation).
_WRITE_MODES = ("w", "wb", "wt")


class ArtifactError(SmdistError, ValueError):
    """A bad name, scope, mode or rank variable given to the artifact API."""

    category = Category.ARTIFACT_ERROR
    exit_code = 2


# -- who am I ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this process is, as the agent (or torchrun, or mpirun) told it through env vars."""

    rank: int
    local_rank: int | None
    """None when a rank is set but no local rank: nobody can tell who writes for the host."""
    host: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerIdentity:
        started = environment.detect(environ)
        try:
            return cls(rank=started.rank, local_rank=started.local_rank, host=started.host)
        except environment.VariableError as exc:
            raise ArtifactError(str(exc)) from None

    def __repr__(self) -> str:
        return f"WorkerIdentity(host={self.host}, rank={self.rank}, local_rank={self.local_rank})"


# -- names and scopes ----------------------------------------------------------------------


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ArtifactError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")


def _check_name(name: str, what: str) -> PurePosixPath:
    if not isinstance(name, str) or not name.strip():
        raise ArtifactError(f"{what} name {name!r}: expected a relative file name like 'model.pt'")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or name.endswith("/") or "\\" in name:
        raise ArtifactError(
            f"{what} name {name!r}: expected a relative path inside the {what} dir "
            "(no leading '/', no '..')"
        )
    if rel.name.endswith(TEMP_SUFFIX):
        raise ArtifactError(f"{what} name {name!r}: names ending in {TEMP_SUFFIX} are reserved")
    return rel


def _check_host(host: str) -> str:
    if not host or "/" in host or host in (".", ".."):
        raise ArtifactError(f"host name {host!r}: cannot be used as a directory name")
    return host


# -- atomic writes -------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(
    target: Path, mode: str = "wb", encoding: str | None = None, owner: str | None = None
) -> Iterator[IO[Any]]:
    """Open ``target`` for writing; it appears, complete, only when the block exits cleanly
    (fsynced: a model file must survive the container's end). ``owner``: the host writing,
    named in the temp file's name (default: ``SM_CURRENT_HOST``)."""
    if mode not in _WRITE_MODES:
        raise ArtifactError(
            f"mode {mode!r} for {target}: expected one of {', '.join(_WRITE_MODES)}"
        )
    binary = "b" in mode
    with contract.atomic_open(
        target, binary=binary, durable=True, encoding=encoding or "utf-8", owner=owner
    ) as f:
        yield f


@contextlib.contextmanager
def _discard(mode: str) -> Iterator[IO[Any]]:
    # A non-writer still runs the user's writing code (so ranks stay in step), into /dev/null.
    if mode not in _WRITE_MODES:
        raise ArtifactError(f"mode {mode!r}: expected one of {', '.join(_WRITE_MODES)}")
    with open(os.devnull, mode) as f:
        yield f


# -- the API -------------------------------------------------------------------------------


def step_name(name: str, step: int) -> str:
    """``checkpoint.pt`` at step 300 -> ``checkpoint.step-000000300.pt`` (sorts in ``ls``)."""
    rel = PurePosixPath(name)
    return str(rel.with_name(f"{rel.stem}.step-{step:09d}{rel.suffix}"))


@dataclass(frozen=True)
class Artifacts:
    """Where this worker writes model files and checkpoints; the module functions use one."""

    model_dir: Path
    checkpoint_dir: Path
    worker: WorkerIdentity

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Artifacts:
        env = os.environ if environ is None else environ
        paths = resolve_root(environ=env)
        model_dir = Path(env.get(MODEL_DIR_ENV) or paths.model_dir)
        checkpoint_dir = Path(env.get(CHECKPOINT_DIR_ENV) or paths.checkpoints_dir)
        return cls(model_dir, checkpoint_dir, WorkerIdentity.from_env(env))

    # scope -> directory

    def _writes(self, scope: str) -> bool:
        _check_scope(scope)
        if scope == "leader":
            return self.worker.rank == 0
        if scope == "host":
            if self.worker.local_rank is None:
                raise ArtifactError(
                    f'scope "host": RANK is {self.worker.rank} but LOCAL_RANK is not set, so '
                    "no process can tell whether it writes for this host"
                )
            return self.worker.local_rank == 0
        return True

    def scope_dir(self, base: Path, scope: str) -> Path:
        """The directory a scope reads and writes in (every rank may read any scope)."""
        _check_scope(scope)
        if scope == "host":
            return base / _check_host(self.worker.host)
        if scope == "rank":
            return base / f"rank-{self.worker.rank}"
        return base

    def _target(self, base: Path, name: str, scope: str, what: str) -> Path | None:
        rel = _check_name(name, what)
        if not self._writes(scope):
            return None
        target = self.scope_dir(base, scope) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    @contextlib.contextmanager
    def _open(
        self, base: Path, name: str, mode: str, scope: str, what: str, encoding: str | None
    ) -> Iterator[IO[Any]]:
        target = self._target(base, name, scope, what)
        if target is None:
            with _discard(mode) as f:
                yield f
        else:
            with atomic_open(target, mode, encoding, owner=self.worker.host) as f:
                yield f

    def _save(self, obj: Any, base: Path, name: str, scope: str, what: str) -> Path | None:
        import torch  # lazily: the agent imports this module and must start fast

        target = self._target(base, name, scope, what)
        if target is None:
            return None
        with atomic_open(target, "wb", owner=self.worker.host) as f:
            torch.save(obj, f)
        return target

    # model dir

    def model_path(self, name: str, scope: str = "leader") -> Path | None:
        """The path this rank writes ``name`` to (parent created), or None if it does not."""
        return self._target(self.model_dir, name, scope, "model")

    def open_model_file(
        self, name: str, mode: str = "wb", scope: str = "leader", encoding: str | None = None
    ) -> contextlib.AbstractContextManager[IO[Any]]:
        """Open ``name`` for an atomic write; non-writers get a writer that discards."""
        return self._open(self.model_dir, name, mode, scope, "model", encoding)

    def save(self, obj: Any, name: str, scope: str = "leader") -> Path | None:
        """``torch.save`` ``obj`` atomically into the model dir; None where this rank does not."""
        return self._save(obj, self.model_dir, name, scope, "model")

    # checkpoints

    def checkpoint_path(
        self, name: str, scope: str = "leader", step: int | None = None
    ) -> Path | None:
        return self._target(self.checkpoint_dir, _stepped(name, step), scope, "checkpoint")

    def open_checkpoint_file(
        self,
        name: str,
        mode: str = "wb",
        scope: str = "leader",
        step: int | None = None,
        encoding: str | None = None,
    ) -> contextlib.AbstractContextManager[IO[Any]]:
        return self._open(
            self.checkpoint_dir, _stepped(name, step), mode, scope, "checkpoint", encoding
        )

    def save_checkpoint(
        self,
        obj: Any,
        name: str = "checkpoint.pt",
        step: int | None = None,
        scope: str = "leader",
        keep: int | None = None,
    ) -> Path | None:
        """``torch.save`` a checkpoint; with ``keep``, older steps of ``name`` are deleted."""
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ArtifactError(f"keep={keep!r}: expected a positive integer or None")
        path = self._save(obj, self.checkpoint_dir, _stepped(name, step), scope, "checkpoint")
        if path is not None and keep is not None and step is not None:
            stepped = _stepped_files(path.parent, PurePosixPath(name).name)
            for _step, old in sorted(stepped, reverse=True)[keep:]:
                old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self, name: str | None = None, scope: str = "leader") -> Path | None:
        """The checkpoint to resume from: the highest step (of ``name``, or of any name).

        Every rank may call it for any scope: it reads the directory of the scope as seen
        by this rank. A file saved without a step counts as older than any step.
        """
        base = self.scope_dir(self.checkpoint_dir, scope)
        if name is not None:
            rel = _check_name(name, "checkpoint")
            directory = base / rel.parent
            found = _stepped_files(directory, rel.name)
            if found:
                return max(found)[1]
            unstepped = directory / rel.name
            return unstepped if unstepped.is_file() else None
        found = _stepped_files(base, None)
        if not found:
            plain = sorted(
                f
                for f in (base.iterdir() if base.is_dir() else ())
                if f.is_file() and not contract.is_temp_file(f) and not _STEP_RE.match(f.name)
            )
            if len(plain) > 1:
                names = ", ".join(f.name for f in plain)
                raise ArtifactError(
                    f"{base}: several checkpoints without a step ({names}); "
                    "pass name= to latest_checkpoint"
                )
            return plain[0] if plain else None
        top = max(step for step, _ in found)
        at_top = sorted(p for step, p in found if step == top)
        if len(at_top) > 1:
            names = ", ".join(p.name for p in at_top)
            raise ArtifactError(
                f"{base}: several checkpoints at step {top} ({names}); "
                "pass name= to latest_checkpoint"
            )
        return at_top[0]


def _stepped(name: str, step: int | None) -> str:
    if step is None:
        return name
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ArtifactError(f"checkpoint {name!r}: step={step!r}: expected an integer >= 0")
    _check_name(name, "checkpoint")
    return step_name(name, step)


def _stepped_files(directory: Path, name: str | None) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``directory``, of ``name`` only if given."""
    if not directory.is_dir():
        return []
    want = PurePosixPath(name) if name is not None else None
    found: list[tuple[int, Path]] = []
    for p in directory.iterdir():
        if contract.is_temp_file(p) or not p.is_file():
            continue
        m = _STEP_RE.match(p.name)
        if m is None:
            continue
        if want is not None and (m["stem"], m["suffix"] or "") != (want.stem, want.suffix):
            continue
        found.append((int(m["step"]), p))
    return found


# module-level API for plain scripts: the environment decides, read on each call (cheap)


def model_path(name: str, scope: str = "leader") -> Path | None:
    """Where this rank writes ``name`` in the model dir, or None when it does not write."""
    return Artifacts.from_env().model_path(name, scope)


def open_model_file(
    name: str, mode: str = "wb", scope: str = "leader", encoding: str | None = None
) -> contextlib.AbstractContextManager[IO[Any]]:
    """``with open_model_file("vocab.json", "w") as f:``: atomic; a no-op on non-writers."""
    return Artifacts.from_env().open_model_file(name, mode, scope, encoding)


def save(obj: Any, name: str, scope: str = "leader") -> Path | None:
    """``torch.save(obj)`` into the model dir, atomically, by the ranks of ``scope``."""
    return Artifacts.from_env().save(obj, name, scope)


def checkpoint_path(name: str, scope: str = "leader", step: int | None = None) -> Path | None:
    return Artifacts.from_env().checkpoint_path(name, scope, step)


def open_checkpoint_file(
    name: str,
    mode: str = "wb",
    scope: str = "leader",
    step: int | None = None,
    encoding: str | None = None,
) -> contextlib.AbstractContextManager[IO[Any]]:
    return Artifacts.from_env().open_checkpoint_file(name, mode, scope, step, encoding)


def save_checkpoint(
    obj: Any,
    name: str = "checkpoint.pt",
    step: int | None = None,
    scope: str = "leader",
    keep: int | None = None,
) -> Path | None:
    return Artifacts.from_env().save_checkpoint(obj, name, step, scope, keep)


def latest_checkpoint(name: str | None = None, scope: str = "leader") -> Path | None:
    return Artifacts.from_env().latest_checkpoint(name, scope)
