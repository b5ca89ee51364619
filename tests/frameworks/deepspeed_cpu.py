"""DeepSpeed on CPU: ``deepspeed.init_distributed()`` then ``deepspeed.initialize`` and a few
steps (a torch optimizer: DeepSpeed's own would compile its C++ ops first)."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from _report import report


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    model = torch.nn.Linear(4, 1)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
    )
    for step in range(3):
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    report(
        framework="deepspeed",
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        engine_world_size=engine.world_size,
        local_rank=engine.local_rank,
        steps=engine.global_steps,
        finished=True,
    )


if __name__ == "__main__":
    main()
