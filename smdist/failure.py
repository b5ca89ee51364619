"""Failures as values: what died, where, and the text SageMaker shows.

``/opt/ml/output/failure``'s first 1024 characters become the job's FailureReason.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smdist.config import Paths

FAILURE_FILE_LIMIT = 1024


@dataclass(frozen=True)
class WorkerFailure:
    """One worker that did not exit 0."""

    host: str
    rank: int
    local_rank: int
    returncode: int
    """As Popen gives it: negative for a signal."""
    time: float
    error_file: Path | None = None
    stderr_tail: tuple[str, ...] = field(default=(), repr=False)
    peer_stopped: bool = False
    """Stopped by smdist because of another failure (a victim, never the root cause)."""

    @property
    def exit_code(self) -> int:
        """The shell convention: 128+N for signal N."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def error_record(self) -> dict[str, Any] | None:
        if self.error_file is None:
            return None
        try:
            data = json.loads(self.error_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def describe(self) -> str:
        where = f"host {self.host}, rank {self.rank}"
        if self.signal_name:
            return f"{where}, killed by {self.signal_name}"
        return f"{where}, exit {self.exit_code}"


def headline(failure: WorkerFailure) -> str:
    """The first line of the failure file for a worker's death."""
    rec = failure.error_record()
    if rec is not None:
        what = f"{rec.get('type')}: {rec.get('message')}"
        return f"UserScriptError: {what} ({failure.describe()})"
    if failure.signal_name:
        return f"Killed: worker killed by {failure.signal_name} ({failure.describe()})"
    return f"UserScriptError: worker exited with code {failure.exit_code} ({failure.describe()})"


def write_failure_file(paths: Paths, text: str, *, overwrite_user: bool = False) -> bool:
    """Write the failure file, at most 1024 characters; keep one the user wrote.

    Returns whether the file was written.
    """
    target = paths.failure_file
    if target.exists() and not overwrite_user:
        return False
    if len(text) > FAILURE_FILE_LIMIT:
        text = text[: FAILURE_FILE_LIMIT - 3] + "..."
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".failure.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        return False
    return True
