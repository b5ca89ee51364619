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
import time
from pathlib import Path

import torch
import torch._dynamo  # before any process group exists: see _teardown
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
    print(f"allreduce={one.item():g} world_size={world} rank={rank} host={host}", flush=True)

    if rank == 0:
        model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
        torch.save(model.module.state_dict(), model_dir / "model.pt")
    del model, opt  # DDP holds the process group: drop it before destroying the group
    _teardown()
    record["threads_after_teardown"] = _torch_threads()

    out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{rank}.json").write_text(json.dumps(record))


def _teardown() -> None:
    """End torch.distributed so that no gloo thread outlives ``main``.

    torch 2.13 keeps a process group alive after destroy_process_group() while anything
    references it: DDP does, and importing torch._dynamo (DDP does that lazily, on first
    use) pins every group that exists at that moment for the life of the process. A group
    still alive at exit keeps gloo's threads (and rank 0's TCPStore thread) running
    through interpreter finalization, and a peer on another host hanging up then aborts
    the process ("terminate called without an active exception", exit 134) after its
    work was done. Hence the early torch._dynamo import and the ``del`` above: here the
    group is really freed and its threads joined while every peer is still connected.
    """
    dist.barrier()
    dist.destroy_process_group()


def _torch_threads(settle_s: float = 5.0) -> list[str]:
    """Names of this process's gloo and TCPStore threads still there after ``settle_s``.

    Linux names threads in /proc. A thread that torch has joined can still be listed there
    for a moment: ``pthread_join`` returns when the thread clears its tid, a little before
    the kernel removes its task (seen here for the TCPStore thread about once in 300 joins).
    So the listing is read until it is empty or ``settle_s`` has passed: a thread still
    running, as when the group was never freed, is reported; one that was ending is not.
    """
    deadline = time.monotonic() + settle_s
    while True:
        names = []
        for tid in os.listdir("/proc/self/task"):
            try:
                name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            except OSError:  # the thread ended meanwhile
                continue
            if "gloo" in name or "tcpstore" in name:
                names.append(name)
        if not names or time.monotonic() >= deadline:
            return sorted(names)
        time.sleep(0.01)  # no event marks a task's removal from /proc: read it again


if __name__ == "__main__":
    main()
