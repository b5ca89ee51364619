"""An mpi4py training loop that never ends on its own: allreduce, a short pause, again.

Each rank prints ``training rank=R`` after its first allreduce, so a test knows the
MPI world is up on every host before it kills one.
"""

from __future__ import annotations

import time

from mpi4py import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    step = 0
    while True:
        comm.allreduce(1)
        step += 1
        if step == 1:
            print(f"training rank={comm.Get_rank()}", flush=True)
        time.sleep(0.2)  # stands in for a step's compute


if __name__ == "__main__":
    main()
