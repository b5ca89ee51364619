"""An mpi4py job that holds its ranks up until the test lets them go.

Every rank all-reduces once (so the ranks on every host are up, started over ssh), says
``holding``, then waits until ``/opt/ml/checkpoints/release`` exists on its own host (the
test writes it through the bind mount) or ``--hold-s`` passes (then it raises: the test
never let it go), and ends with a barrier and its record in /opt/ml/output/data/ranks/.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mpi4py import MPI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold-s", type=float, default=120.0)
    args, _ = parser.parse_known_args()

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    total = comm.allreduce(rank + 1)
    print(f"holding rank={rank} world={world}", flush=True)
    release = Path("/opt/ml/checkpoints/release")
    deadline = time.monotonic() + args.hold_s
    while not release.exists():  # a file on this host: no event to wait on across the mount
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: {release} did not appear in {args.hold_s:.0f} s")
        time.sleep(0.2)
    comm.Barrier()
    out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    host = os.environ.get("SM_CURRENT_HOST")
    record = {"rank": rank, "world": world, "sum": total, "host": host}
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
