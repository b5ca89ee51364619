"""Every rank saves ``model.pt``: straight into SM_MODEL_DIR (``--direct``), or through
smdist's leader-scoped API (the default), which lets global rank 0 alone write it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import smdist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--direct", action="store_true")
    args, _ = parser.parse_known_args()
    rank, host = int(os.environ["RANK"]), os.environ["SM_CURRENT_HOST"]
    state = {"rank": rank, "host": host}
    if args.direct:
        import torch

        torch.save(state, Path(os.environ["SM_MODEL_DIR"]) / "model.pt")
    else:
        smdist.save(state, "model.pt")  # scope="leader": a no-op on every other rank


if __name__ == "__main__":
    main()
