"""A Lightning Trainer fit on synthetic data: ``--devices N --num-nodes M`` (default: left out)."""

from __future__ import annotations

import argparse

import lightning as L
import torch
from _report import report
from torch.utils.data import DataLoader, TensorDataset


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int)
    args = parser.parse_args()
    nodes = {} if args.num_nodes is None else {"num_nodes": args.num_nodes}
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=args.devices,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **nodes,
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    trainer.fit(Tiny(), DataLoader(data, batch_size=4))
    report(
        framework="lightning",
        environment=type(trainer.strategy.cluster_environment).__name__,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        node_rank=trainer.node_rank,
        local_rank=trainer.local_rank,
        steps=trainer.global_step,
        finished=True,
    )


if __name__ == "__main__":
    main()
