"""An mpi4py job for the MPI scenarios: what every rank saw, written on its own host.

Each rank all-reduces rank+1 (the sum is W*(W+1)/2), gathers every rank's SM_CURRENT_HOST
over MPI, and writes /opt/ml/output/data/ranks/rank-R.json on its host. With
``--torch-step``, it also takes one DDP step over gloo (torch.distributed initialised by
``smdist.init()`` from the MPI world), so both halves of the backend are exercised.
With ``--raise-on-rank R`` that rank raises after the first collective.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

from mpi4py import MPI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--torch-step", action="store_true")
    parser.add_argument("--raise-on-rank", type=int, default=-1)
    args, _ = parser.parse_known_args()  # SageMaker passes every hyperparameter as a flag

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    host = os.environ.get("SM_CURRENT_HOST", socket.gethostname())
    total = comm.allreduce(rank + 1)
    hosts = comm.allgather(host)
    if rank == args.raise_on_rank:
        raise RuntimeError(f"bad batch on rank {rank}")
    comm.Barrier()  # the others wait here: only the abort can end them

    record: dict[str, object] = {
        "rank": rank,
        "world": world,
        "sum": total,
        "hosts": hosts,
        "env": {
            k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SM_CURRENT_HOST")
        },
    }
    if args.torch_step:
        import torch
        import torch._dynamo  # before the process group exists: see ddp.py
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        import smdist

        ctx = smdist.init()
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))).sum()
        loss.backward()
        opt.step()
        record["torch"] = {"rank": ctx.rank, "world": dist.get_world_size()}
        record["weight0"] = model.module.weight.detach().flatten()[0].item()
        # Free the group (DDP holds it) so gloo's threads end here, not at exit (ddp.py).
        del model, opt, loss
        dist.barrier()
        dist.destroy_process_group()

    out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
