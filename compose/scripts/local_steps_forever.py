"""Ranks that joined the process group, then only compute locally (evaluation, data loading).

No collective runs after the first barrier, so nothing but smdist's heartbeats can tell a
rank that another host is gone. Each rank prints ``training rank=R`` once it is there.
"""

from __future__ import annotations

import time

import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    dist.barrier()
    print(f"training rank={dist.get_rank()}", flush=True)
    while True:
        time.sleep(0.2)  # stands in for a local step's compute


if __name__ == "__main__":
    main()
