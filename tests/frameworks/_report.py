"""What each framework script writes: the ranks the framework itself reports, per rank."""

from __future__ import annotations

import json
import os
from typing import Any


def report(**fields: Any) -> None:
    """``rank-<RANK>.json`` in the job's output data dir (SM_OUTPUT_DATA_DIR)."""
    path = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{os.environ['RANK']}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(fields, f)
    os.replace(path + ".tmp", path)
