"""Imports a package that only requirements.txt provides and records what it got.

Each rank writes $SM_OUTPUT_DATA_DIR/requirement-R.json: its host, the package's
``VALUE`` and where the module was imported from (the container's site-packages, where
``pip install -r requirements.txt`` put it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import smdist_lm_probe  # not in the image: requirements.txt names it

rank = int(os.environ["RANK"])
out = Path(os.environ["SM_OUTPUT_DATA_DIR"])
out.mkdir(parents=True, exist_ok=True)
record = {
    "rank": rank,
    "host": os.environ["SM_CURRENT_HOST"],
    "value": smdist_lm_probe.VALUE,
    "module_file": smdist_lm_probe.__file__,
}
(out / f"requirement-{rank}.json").write_text(json.dumps(record))
print(f"rank {rank}: smdist_lm_probe {smdist_lm_probe.VALUE}", flush=True)
