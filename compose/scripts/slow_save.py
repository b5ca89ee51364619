"""Rank 0 saves two 4 MiB files slowly; every other rank finishes while it writes.

``model.bin`` goes through smdist's atomic ``open_model_file``, ``direct.bin`` is written
straight into SM_MODEL_DIR with ``open()``; the two are written side by side, a chunk of
each at a time, over ``--seconds S`` (default 4). Their content is ``--seed``-derived so
a test can check that what landed is whole. In a model dir shared between hosts (the SDK's
local mode) the other ranks see rank 0's writes begin and only then finish, so their host
is done while rank 0 is mid-write, every time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import smdist

SIZE = 4 << 20
CHUNKS = 8


def content(seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (SIZE // 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args, _ = parser.parse_known_args()
    direct = Path(os.environ["SM_MODEL_DIR"]) / "direct.bin"
    if int(os.environ["RANK"]) != 0:
        deadline = time.monotonic() + 60  # a model dir of its own: rank 0's file never shows
        while not direct.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # another host's write: no event crosses the shared directory
        seen = "rank 0 is writing" if direct.exists() else "no write seen in 60 s"
        print(f"{seen}; nothing to save here", flush=True)
        return
    data = content(args.seed)
    step = len(data) // CHUNKS
    print(f"saving model.bin and direct.bin ({len(data)} bytes each, {args.seconds:g} s)")
    with smdist.open_model_file("model.bin") as api, open(direct, "wb") as plain:
        for i in range(CHUNKS):
            for fh in (api, plain):
                fh.write(data[i * step : (i + 1) * step])
                fh.flush()
            time.sleep(args.seconds / CHUNKS)  # a slow filesystem, simulated
    print(f"saved sha256={hashlib.sha256(data).hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
