"""What the workers run: a ``.py`` script, ``-m module``, or any program. No shell, ever."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from smdist.errors import EntryPointNotFound
from smdist.records import dataclass


@dataclass(frozen=True)
class Entry:
    kind: str
    """``script`` (run through the bootstrap), ``module`` (``-m``) or ``program``."""
    target: str
    args: tuple[str, ...] = ()
    given: str = ""
    """As the user (or ``sagemaker_program``) wrote it: SM_USER_ENTRY_POINT, as the toolkit."""

    @property
    def name(self) -> str:
        return self.given or (
            os.path.basename(self.target) if self.kind != "module" else self.target
        )

    @property
    def python(self) -> bool:
        return self.kind in ("script", "module")

    def argv(self) -> list[str]:
        if self.kind == "script":
            return [sys.executable, "-m", "smdist.worker.bootstrap", self.target, *self.args]
        if self.kind == "module":
            return [sys.executable, "-m", "smdist.worker.bootstrap", "-m", self.target, *self.args]
        return [self.target, *self.args]

    def with_args(self, extra: list[str]) -> Entry:
        return Entry(self.kind, self.target, (*self.args, *extra), self.given)


def resolve(
    argv: Sequence[str], base_dir: Path | None = None, code_dir: Path | None = None
) -> Entry:
    """``[script.py, args...]``, ``[-m, module, args...]`` or ``[program, args...]``.

    The one rule the agent and ``--check`` share. A relative script or program path is
    taken relative to ``base_dir`` (the ``train`` entry uses /opt/ml/code), else to the
    working directory; when not there, relative to ``code_dir`` (SageMaker's code dir). A
    bare program name that is in neither is looked up on PATH.
    """
    if not argv:
        raise EntryPointNotFound("no entry point: give a script, -m MODULE, or a program")
    if argv[0] == "-m":
        if len(argv) < 2 or not argv[1]:
            raise EntryPointNotFound("-m needs a module name")
        return Entry("module", argv[1], tuple(argv[2:]), argv[1])
    target, args = argv[0], tuple(argv[1:])
    candidates = _candidates(target, base_dir, code_dir)
    path = next((c for c in candidates if c.is_file()), candidates[0])
    if target.endswith(".py"):
        if not path.is_file():
            raise EntryPointNotFound(f"entry script {path}: no such file ({_looked(candidates)})")
        return Entry("script", str(path.resolve()), args, target)
    if path.is_file() or "/" in target or base_dir is not None:
        if not path.is_file():
            raise EntryPointNotFound(f"entry program {path}: no such file ({_looked(candidates)})")
        if not os.access(path, os.X_OK):
            raise EntryPointNotFound(f"entry program {path} is not executable (chmod +x it)")
        return Entry("program", str(path.resolve()), args, target)
    import shutil

    found = shutil.which(target)
    if found is None:
        raise EntryPointNotFound(f"entry program {target} not found on PATH")
    return Entry("program", found, args, target)


def _candidates(target: str, base_dir: Path | None, code_dir: Path | None) -> list[Path]:
    path = Path(target)
    if path.is_absolute():
        return [path]
    first = (base_dir or Path.cwd()) / path
    second = code_dir / path if code_dir is not None else None
    return [first] if second is None or second == first else [first, second]


def _looked(candidates: Sequence[Path]) -> str:
    return "looked for " + " or ".join(str(c) for c in candidates)
