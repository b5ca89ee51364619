"""``SMDIST_TIMELINE=1``: the agent's start-up steps on stderr, for finding where time goes.

Each step is one line, ``smdist timeline: <wall clock> +<ms since smdist was imported> <step>``:
the wall clock (``time.time()``) lets a harness line the steps up with its own launch time
and with the worker's first line. Off (the default), a step costs one attribute read.
"""

from __future__ import annotations

import os
import sys
import time

ENABLED = os.environ.get("SMDIST_TIMELINE", "") not in ("", "0")
STARTED = time.time()
PREFIX = "smdist timeline:"


def mark(step: str) -> None:
    """Log ``step`` (when the timeline is on)."""
    if ENABLED:
        now = time.time()
        sys.stderr.write(f"{PREFIX} {now:.6f} +{(now - STARTED) * 1000:.1f} ms {step}\n")
        sys.stderr.flush()
