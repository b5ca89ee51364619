"""The one worker script every launcher runs in the benchmarks (plain torch, no smdist API).

Each rank records what the harness measures as small JSON files under ``--out``:
``pid-R`` at start, ``ready-R`` once past ``init_process_group`` and one all-reduce,
``raise-R`` just before the failing rank raises, ``ckpt-R`` when its SIGTERM handler has
written its checkpoint. Times are ``time.time()`` so the harness can compare them with
its own clock.
"""

from __future__ import annotations

import time

STARTED = time.time()  # first: the start-up measurement's "first line of the worker"

import argparse  # noqa: E402 - after the clock
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

LINE_BYTES = 100


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _record(out: Path, name: str, **data: Any) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps({"t": time.time(), "pid": os.getpid(), **data}))
    os.replace(tmp, out / name)  # the harness never sees a half-written record


PHASES: dict[str, float] = {}
"""time.time() at each step of ``_init``: where a rank's time-to-ready goes."""


def _init() -> Any:
    import torch
    import torch.distributed as dist

    PHASES["torch"] = time.time()
    dist.init_process_group("gloo")
    PHASES["init"] = time.time()
    t = torch.ones(1)
    dist.all_reduce(t)
    PHASES["allreduce"] = time.time()
    return t


def _hang() -> None:
    # Blocks where only a signal ends it: what a rank stuck in a collective looks like.
    while True:
        time.sleep(3600)


def _checkpoint_on_sigterm(out: Path, rank: int, handler_s: float) -> None:
    def handler(_signum: int, _frame: object) -> None:
        started = time.time()
        import torch

        path = out / f"checkpoint-{rank}.pt"
        torch.save({"step": 1, "weights": torch.zeros(256, 1024)}, path)  # 1 MiB
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        rest = handler_s - (time.time() - started)
        if rest > 0:
            time.sleep(rest)  # a bigger model's save, at a known cost
        _record(out, f"ckpt-{rank}", started=started)
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)


def _all_started(out: Path) -> None:
    """Until every rank has written its ``pid`` record. The relay measurement's clock starts
    at the last rank's start: without this wait a rank that starts early (smdist's first
    rank, in the interpreter started with the agent) would write lines before the clock,
    and a launcher that starts its ranks one after another would be timed on its spawning.
    A millisecond poll: the workload's, not the harness's, and the same for every launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    while len(list(out.glob("pid-*"))) < world:
        time.sleep(0.001)


def _log(lines: int, error_class: bool) -> None:
    rank = _rank()
    # A line naming an error class goes to stderr, where launchers look for errors.
    word = "ValueError" if error_class else "step"
    out = sys.stderr.buffer if error_class else sys.stdout.buffer
    batch = 1000
    for start in range(0, lines, batch):
        chunk = []
        for i in range(start, min(start + batch, lines)):
            head = f"rank {rank} {word} {i} loss 0.1234 "
            chunk.append(head.ljust(LINE_BYTES - 1, "x") + "\n")
        out.write("".join(chunk).encode())
    out.flush()


def _train(out: Path, seconds: float) -> None:
    import torch
    import torch.distributed as dist

    _init()
    rank = _rank()
    _record(out, f"ready-{rank}")
    end = time.time() + seconds
    step = 0
    done = torch.zeros(1)
    while not done.item():
        # The all-reduce doubles as the stop vote, so every rank leaves at the same step.
        done.fill_(1.0 if time.time() >= end else 0.0)
        dist.all_reduce(done, op=dist.ReduceOp.MAX)
        step += 1
        if step % 25 == 0:
            print(f"rank {rank} step {step} loss {1.0 / step:.4f}", flush=True)
        time.sleep(0.02)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--lines", type=int, default=0)
    p.add_argument("--error-class", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--handler-s", type=float, default=0.3)
    args = p.parse_args(argv)
    out = Path(args.out)
    rank = _rank()
    _record(out, f"pid-{rank}", started=STARTED)
    if args.mode == "trivial":
        _record(out, f"ready-{rank}")
    elif args.mode == "log":
        _all_started(out)
        _log(args.lines, bool(args.error_class))
    elif args.mode == "train":
        _train(out, args.seconds)
    elif args.mode in ("ready", "fail", "sigterm"):
        if args.mode == "sigterm":
            _checkpoint_on_sigterm(out, rank, args.handler_s)
        _init()
        _record(out, f"ready-{rank}", started=STARTED, phases=PHASES)
        if args.mode == "fail":
            if rank == args.fail_rank:
                _record(out, f"raise-{rank}")
                raise RuntimeError(f"rank {rank} fails on purpose")
            _hang()
        elif args.mode == "sigterm":
            _hang()
        else:
            import torch.distributed as dist

            dist.destroy_process_group()
    else:
        p.error(f"unknown --mode {args.mode!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
