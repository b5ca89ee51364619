"""Run SageMaker SDK local-mode training jobs on request (run by .venv-sdk's interpreter).

Started by ``compose.sdk.LocalMode``. It imports the SDK once, answers
``{"ready": true, "sagemaker": VERSION, "compose": CMD}``, then reads one JSON request a line
from stdin and answers each with one JSON line::

    {"id": 1, "estimator": "Estimator" | "PyTorch", "kwargs": {...}, "region": "us-west-2",
     "container_root": DIR, "log": FILE}
    -> {"id": 1, "ok": true, "error_type": "", "error": "", "model_data": "file://...",
        "hosts": ["algo-1-abcde", "algo-2-abcde"]}

Answers go to the stdout it was started with; everything else (the SDK's own output,
docker-compose's, stray subprocesses') goes to stderr, and while a job runs to its log.
This file must not import smdist: it runs where only the SDK is installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

# Answers keep a private copy of stdout; fd 1 then points where stderr does, so nothing
# the SDK or a subprocess prints can corrupt an answer.
_ANSWERS: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)

# The SDK opts out of telemetry (a request to AWS per call) through its defaults config.
SDK_CONFIG = {
    "SchemaVersion": "1.0",
    "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}},
}


class _Current:
    """A stream that writes wherever sys.stdout points now (the job's log while it runs)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def answer(message: dict[str, Any]) -> None:
    _ANSWERS.write(json.dumps(message) + "\n")
    _ANSWERS.flush()


def compose_command() -> str:
    from sagemaker.local.image import _SageMakerContainer

    prefix = _SageMakerContainer._get_compose_cmd_prefix()
    version = subprocess.run(
        [*prefix, "version", "--short"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"{' '.join(prefix)} {version}".strip()


def hosts_of(container_root: Path) -> list[str]:
    """The hosts the SDK named, from the compose file it wrote (kept after the job)."""
    import yaml

    for path in sorted(container_root.glob("*/docker-compose.yaml")):
        services = yaml.safe_load(path.read_text()).get("services", {})
        return sorted(services)
    return []


def run(request: dict[str, Any]) -> dict[str, Any]:
    import boto3
    from sagemaker.estimator import Estimator
    from sagemaker.local import LocalSession
    from sagemaker.pytorch import PyTorch

    classes = {"Estimator": Estimator, "PyTorch": PyTorch}
    root = Path(request["container_root"])
    session = LocalSession(
        boto_session=boto3.Session(region_name=request["region"]), sagemaker_config=SDK_CONFIG
    )
    session.config = {"local": {"local_code": True, "container_root": str(root)}}
    estimator = classes[request["estimator"]](sagemaker_session=session, **request["kwargs"])
    result: dict[str, Any] = {"id": request["id"], "ok": True, "error_type": "", "error": ""}
    try:
        estimator.fit(wait=True)
    except Exception as exc:  # the outcome under test: reported, not raised
        traceback.print_exc()
        result.update(ok=False, error_type=type(exc).__name__, error=str(exc))
    with contextlib.suppress(Exception):  # model_data raises when no job completed
        result["model_data"] = str(estimator.model_data or "")
    result["hosts"] = hosts_of(root)
    return result


def main() -> None:
    # The root handler now, bound to whatever sys.stdout is when a record is written: the
    # SDK's own logging.basicConfig() (called mid-job) is then a no-op, not a handler bound
    # to the first job's log file.
    logging.basicConfig(
        stream=_Current(),  # type: ignore[arg-type]
        format="%(name)s %(levelname)s - %(message)s",
    )
    logging.getLogger("sagemaker").setLevel(logging.INFO)

    import sagemaker

    answer({"ready": True, "sagemaker": sagemaker.__version__, "compose": compose_command()})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        with open(request["log"], "a", buffering=1) as log:
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = log
            try:
                result = run(request)
            except Exception as exc:  # building the estimator failed: also an outcome
                traceback.print_exc()
                result = {
                    "id": request["id"],
                    "ok": False,
                    "error_type": type(exc).__name__,
                    "error": str(exc),
                }
            finally:
                sys.stdout, sys.stderr = saved
        answer(result)


if __name__ == "__main__":
    main()
