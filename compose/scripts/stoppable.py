"""A decorated training loop that stops when asked and checkpoints on the way out.

``ctx.should_stop`` turns True on every rank at once after a SIGTERM anywhere (``docker
stop``, StopTrainingJob); the ``on_stop`` hook then saves each rank's checkpoint under
/opt/ml/checkpoints/rank-R/ and records the step it stopped at in
$SM_OUTPUT_DATA_DIR/hook-R.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import smdist


@smdist.main
def train(ctx: smdist.Context) -> None:
    step = 0
    while not ctx.should_stop:
        t = torch.ones(1)
        dist.all_reduce(t)
        step += 1
        ctx.step = step
        if step == 1:
            print(f"training rank={ctx.rank}", flush=True)
        time.sleep(0.1)  # stands in for a step's compute


@train.on_stop
def checkpoint(ctx: smdist.Context) -> None:
    step = getattr(ctx, "step", 0)
    ctx.save_checkpoint({"step": step}, "state.pt", scope="rank")
    out = Path(os.environ["SM_OUTPUT_DATA_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hook-{ctx.rank}.json").write_text(json.dumps({"step": step}))


if __name__ == "__main__":
    train()
