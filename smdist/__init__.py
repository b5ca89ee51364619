"""smdist: SageMaker-style multi-node training, coordinated.

Importing smdist is cheap (no torch): the agent and the worker bootstrap use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from smdist.api import Context, init, main

__all__ = ["Context", "__version__", "init", "main"]


def __getattr__(name: str) -> Any:
    # Lazy: `import smdist` in the agent and the bootstrap must not pull in torch.
    if name in ("main", "init", "Context", "launched"):
        from smdist import api

        return getattr(api, name)
    raise AttributeError(f"module 'smdist' has no attribute {name!r}")
