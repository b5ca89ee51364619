"""The worker of ``bench.resilience``: plain torch, so smdist and torchrun run the same code.

``restart``: every rank records ``ready-<attempt>-<rank>`` once past ``init_process_group``
and one all-reduce; on the first attempt the last rank then records ``fail`` and exits 1
while the others wait in an all-reduce; on the next attempt every rank exits 0.
``hang``: ranks step (``smdist.progress()`` and an all-reduce) every 10 ms; rank 1 records
``stopped`` after 50 steps and sleeps; the others then wait in the all-reduce.
``progress``: time ``smdist.progress()`` in a tight loop against an empty loop.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _record(out: Path, name: str) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps({"t": time.time()}))
    os.replace(tmp, out / name)


def restart(out: Path) -> None:
    import torch
    import torch.distributed as dist

    attempt = int(
        os.environ.get("SMDIST_RESTART_COUNT") or os.environ["TORCHELASTIC_RESTART_COUNT"]
    )
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))
    rank, world = dist.get_rank(), dist.get_world_size()
    _record(out, f"ready-{attempt}-{rank}")
    if attempt == 0:
        if rank == world - 1:
            _record(out, "fail")
            os._exit(1)
        dist.all_reduce(torch.ones(1))  # waits for the failed rank: stopped by the launcher
    dist.destroy_process_group()


def hang(out: Path) -> None:
    import torch
    import torch.distributed as dist

    import smdist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for step in range(1_000_000):
        smdist.progress()
        if rank == 1 and step == 50:
            _record(out, "stopped")
            time.sleep(3600)
        dist.all_reduce(torch.ones(1))
        time.sleep(0.01)


def progress(out: Path, n: int = 2_000_000) -> None:
    import smdist

    step = smdist.progress

    def empty() -> None:
        pass

    timings = {}
    for name, fn in (("empty", empty), ("progress", step)):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best / n
    (out / "progress.json").write_text(json.dumps(timings))


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    {"restart": restart, "hang": hang, "progress": progress}[mode](target)
