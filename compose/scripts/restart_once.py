"""Fails once, then resumes: the job-wide restart scenario (issue 16).

Each rank steps with ``@smdist.main``; at step 1 every host's local rank 0 writes a
checkpoint (``scope="host"``: every container reads its own back); on the first attempt the
last rank raises at step 2. The next attempt resumes from the checkpoint and every rank writes
``$SM_OUTPUT_DATA_DIR/done-<rank>.json`` with its restart count and the step it resumed at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import smdist


@smdist.main
def train(ctx: smdist.Context) -> None:
    start = 0
    if (latest := ctx.latest_checkpoint(scope="host")) is not None:
        start = torch.load(latest)["step"] + 1
    print(f"training rank={ctx.rank} attempt={ctx.restart_count}", flush=True)
    for step in range(start, 4):
        if ctx.should_stop:
            break
        dist.all_reduce(torch.ones(1))
        if step == 1:
            ctx.save_checkpoint({"step": step}, step=step, scope="host")
            ctx.barrier()
        if step == 2 and ctx.restart_count == 0 and ctx.rank == ctx.world_size - 1:
            raise RuntimeError(f"bad batch on rank {ctx.rank}")
    out = Path(os.environ["SM_OUTPUT_DATA_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    done = {"restart_count": ctx.restart_count, "resumed_at": start}
    (out / f"done-{ctx.rank}.json").write_text(json.dumps(done))


if __name__ == "__main__":
    train()
