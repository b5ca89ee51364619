"""``smdist.fail``: a rank stops the job with its own words as the FailureReason.

Worker-side only: a training script that calls it imports nothing of the agent.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from smdist import contract
from smdist.config import resolve_root
from smdist.worker import bootstrap

OUTPUT_DIR_ENV = "SM_OUTPUT_DIR"


def failure_file_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where a worker writes the failure file: ``$SM_OUTPUT_DIR/failure``, else under /opt/ml."""
    env = os.environ if environ is None else environ
    out = env.get(OUTPUT_DIR_ENV)
    return Path(out) / "failure" if out else resolve_root(environ=env).failure_file


def fail(reason: str, exit_code: int = 1) -> NoReturn:
    """Stop this worker with ``reason`` as the job's FailureReason (kept verbatim by the agent).

    Under smdist the first rank to call it wins; outside smdist it overwrites the file.
    """
    under_agent = bool(os.environ.get(contract.ERROR_FILE_ENV))
    contract.write_failure_file(failure_file_path(), str(reason), exclusive=under_agent)
    try:
        raise RuntimeError(reason)
    except RuntimeError as exc:
        record = bootstrap.build_record(exc, kind="fail")
    # The caller's frames, not this function's.
    record["frames"] = _caller_frames()
    record["type"] = "smdist.fail"
    record["exit_code"] = exit_code
    bootstrap.write_record(record)
    sys.stderr.write(f"smdist.fail: {reason}\n")
    sys.stderr.flush()
    raise SystemExit(exit_code)


def _caller_frames() -> list[dict[str, Any]]:
    return bootstrap.frame_dicts(traceback.extract_stack()[:-2][-20:])
