"""Lightning Fabric: a few DDP steps and one all-reduce over the whole world."""

from __future__ import annotations

import torch
from _report import report
from lightning.fabric import Fabric


def main() -> None:
    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2, num_nodes=2)
    fabric.launch()
    model = torch.nn.Linear(4, 1)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(3):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(fabric.global_rank + step))
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    total = fabric.all_reduce(torch.tensor(float(fabric.global_rank + 1)), reduce_op="sum")
    report(
        framework="fabric",
        environment=type(fabric.strategy.cluster_environment).__name__,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        node_rank=fabric.node_rank,
        local_rank=fabric.local_rank,
        sum=float(total),
        finished=True,
    )


if __name__ == "__main__":
    main()
