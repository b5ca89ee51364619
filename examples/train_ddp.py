"""A small real DDP job on synthetic data: what `make demo` runs under --simulate 2x2.

Every rank trains a linear model on its own shard of a synthetic regression problem; the
gradients are averaged by DistributedDataParallel over gloo (NCCL on GPUs). Rank 0 saves
the model to the model dir (SageMaker tars /opt/ml/model into model.tar.gz).
"""

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import smdist


@smdist.main
def train(ctx: smdist.Context) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    args, _ = parser.parse_known_args()
    print(f"{ctx} starting", flush=True)

    torch.manual_seed(1234)  # the same true weights on every rank
    true_w = torch.randn(8, 1)
    gen = torch.Generator().manual_seed(ctx.rank)  # a different shard per rank
    x = torch.randn(256, 8, generator=gen)
    y = x @ true_w + 0.01 * torch.randn(256, 1, generator=gen)

    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        for i in range(0, 256, 32):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])
            loss.backward()
            opt.step()
        total = torch.tensor([loss.item()])
        dist.all_reduce(total)
        if ctx.is_master:
            print(f"epoch {epoch}: mean loss {total.item() / ctx.world_size:.4f}", flush=True)
        if ctx.should_stop:
            break

    # Rank 0 writes (atomically); the other ranks get None and do not wait.
    path = ctx.save(model.module.state_dict(), "model.pt")
    if path is not None:
        print(f"saved {path}", flush=True)


if __name__ == "__main__":
    train()
