"""A training loop that never ends on its own: all-reduce, a short pause, again.

Each rank prints ``training rank=R`` after its first step, so a test knows the job is
mid-training before it kills or stops a host.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    step = 0
    while True:
        t = torch.ones(1)
        dist.all_reduce(t)
        step += 1
        if step == 1:
            print(f"training rank={rank}", flush=True)
        time.sleep(0.2)  # stands in for a step's compute; keeps two busy cores free


if __name__ == "__main__":
    main()
