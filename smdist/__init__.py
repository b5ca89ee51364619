"""smdist: SageMaker-style multi-node training, coordinated.

Importing smdist is cheap (no torch): the agent and the worker bootstrap use it.
"""

from __future__ import annotations

__version__ = "0.1.0"
