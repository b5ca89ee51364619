"""One rank raises while every other rank blocks in an all-reduce it never joins.

The failing rank (``--fail-rank``, default 3) first writes time.time() to
$SM_OUTPUT_DATA_DIR/raised-at, so a test can time the raise -> every container's exit.
The others hang in ``blocked_in_allreduce``: only the launcher can end them, and their
stacks (faulthandler) name that function.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def blocked_in_allreduce() -> None:
    t = torch.ones(1)
    dist.all_reduce(t)  # the failing rank never joins


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int, default=3)
    args, _ = parser.parse_known_args()
    dist.init_process_group("gloo")
    dist.barrier()
    rank = dist.get_rank()
    print(f"training rank={rank}", flush=True)
    if rank == args.fail_rank:
        out = Path(os.environ["SM_OUTPUT_DATA_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "raised-at").write_text(repr(time.time()))
        raise RuntimeError(f"bad batch on rank {rank}")
    blocked_in_allreduce()


if __name__ == "__main__":
    main()
