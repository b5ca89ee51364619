"""A small DDP job over gloo: what every rank saw is written where the tests can read it.

Each rank all-reduces a one (so the sum is the world size), gathers every rank's host,
trains a linear model for a few steps on rank-specific data (DDP keeps the weights equal),
and writes /opt/ml/output/data/ranks/rank-R.json on its host. Rank 0 alone saves the
model to SM_MODEL_DIR, as a SageMaker script should.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    args, _ = parser.parse_known_args()  # SageMaker passes every hyperparameter as a flag

    # env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from the agent.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    host = os.environ.get("SM_CURRENT_HOST", socket.gethostname())

    one = torch.ones(1)
    dist.all_reduce(one)
    hosts: list[object] = [None] * world
    dist.all_gather_object(hosts, host)

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        loss = model(torch.randn(8, 4, generator=data)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()

    record = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": world,
        "host": host,
        "allreduce": one.item(),
        "hosts_by_rank": hosts,
        "weights": weights,
    }
    out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(record))
    print(f"allreduce={one.item():g} world_size={world} rank={rank} host={host}", flush=True)

    if rank == 0:
        model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
        torch.save(model.module.state_dict(), model_dir / "model.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
