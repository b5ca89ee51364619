"""accelerate on CPU (``Accelerator(cpu=True)``): a tiny model, synthetic data, a few steps."""

from __future__ import annotations

import torch
from _report import report
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=4))
    steps = 0
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        if steps == 3:
            break
    total = accelerator.reduce(torch.tensor(float(accelerator.process_index + 1)), "sum")
    accelerator.wait_for_everyone()
    report(
        framework="accelerate",
        distributed_type=str(accelerator.distributed_type),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        local_rank=accelerator.local_process_index,
        sum=float(total),
        steps=steps,
        finished=True,
    )
    accelerator.end_training()


if __name__ == "__main__":
    main()
