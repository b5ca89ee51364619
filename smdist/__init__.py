"""smdist: SageMaker-style multi-node training, coordinated.

Importing smdist is cheap (no torch): the agent and the worker bootstrap use it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: every rank imports this package before its first line

__version__ = "0.1.0"

if TYPE_CHECKING:
    from typing import Any

    from smdist.steps import progress
    from smdist.worker.api import Context, init, main
    from smdist.worker.artifacts import (
        checkpoint_path,
        latest_checkpoint,
        model_path,
        open_checkpoint_file,
        open_model_file,
        save,
        save_checkpoint,
    )
    from smdist.worker.channels import channel
    from smdist.worker.fail import fail

_API = ("main", "init", "Context", "launched")
_ARTIFACTS = (
    "model_path",
    "open_model_file",
    "save",
    "checkpoint_path",
    "open_checkpoint_file",
    "save_checkpoint",
    "latest_checkpoint",
)

__all__ = [
    "Context",
    "__version__",
    "channel",
    "checkpoint_path",
    "fail",
    "init",
    "latest_checkpoint",
    "main",
    "model_path",
    "open_checkpoint_file",
    "open_model_file",
    "progress",
    "save",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import smdist` in the agent and the bootstrap must not pull in torch.
    import importlib

    if name in _API:
        return getattr(importlib.import_module("smdist.worker.api"), name)
    if name in _ARTIFACTS:
        return getattr(importlib.import_module("smdist.worker.artifacts"), name)
    if name == "channel":
        return importlib.import_module("smdist.worker.channels").channel
    if name == "progress":  # called once per step: resolved once, then a plain attribute
        from smdist.steps import progress

        globals()["progress"] = progress
        return progress
    if name == "fail":
        return importlib.import_module("smdist.worker.fail").fail
    raise AttributeError(f"module 'smdist' has no attribute {name!r}")
