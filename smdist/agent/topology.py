"""Who is master, which ranks live where: pure functions, no I/O beyond counting GPUs."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from smdist.errors import ConfigError
from smdist.records import dataclass


def sorted_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """Plain string order, identical on every host: algo-1 < algo-10 < algo-2."""
    return tuple(sorted(hosts))


def master_host(hosts: Sequence[str]) -> str:
    return sorted_hosts(hosts)[0]


def node_rank(hosts: Sequence[str], host: str) -> int:
    return sorted_hosts(hosts).index(host)


@dataclass(frozen=True)
class HostSlot:
    host: str
    node_rank: int
    nproc: int
    first_rank: int

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.nproc)


@dataclass(frozen=True)
class Layout:
    """The job's rank map: hosts in node-rank order, global ranks contiguous per host."""

    slots: tuple[HostSlot, ...]

    @property
    def master(self) -> str:
        """The first host with ranks (hosts outside a heterogeneous job's distribution have
        none); it hosts the rendezvous store and the workers' MASTER_ADDR."""
        return next((s.host for s in self.slots if s.nproc > 0), self.slots[0].host)

    @property
    def world_size(self) -> int:
        return sum(s.nproc for s in self.slots)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(s.host for s in self.slots)

    def slot(self, host: str) -> HostSlot:
        for s in self.slots:
            if s.host == host:
                return s
        raise KeyError(host)

    def describe(self) -> list[str]:
        """One line per host, for the start-of-job log."""
        lines = []
        for s in self.slots:
            if s.nproc == 0:
                lines.append(f"{s.host}: outside the distribution (runs the entry once, plain)")
                continue
            ranks = f"{s.first_rank}" if s.nproc == 1 else f"{s.ranks[0]}-{s.ranks[-1]}"
            tag = " (master)" if s.host == self.master else ""
            lines.append(f"{s.host}: node rank {s.node_rank}, ranks {ranks}{tag}")
        return lines


def build_layout(nproc_by_host: Mapping[str, int]) -> Layout:
    """Node ranks and global ranks in host order; a host with no processes (outside a
    heterogeneous job's distribution) takes part in the job but not in the world (node rank
    -1)."""
    slots = []
    first = node = 0
    for host in sorted_hosts(list(nproc_by_host)):
        n = nproc_by_host[host]
        slots.append(HostSlot(host=host, node_rank=node if n else -1, nproc=n, first_rank=first))
        first += n
        node += 1 if n else 0
    return Layout(tuple(slots))


# What CUDA accepts in CUDA_VISIBLE_DEVICES: an index or a GPU / MIG UUID.
_CUDA_DEVICE = re.compile(r"\d+|GPU-[\w-]+|MIG-[\w/-]+")


def gpu_count(
    environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")
) -> tuple[int, str]:
    """GPUs this container can use and how that was known, without importing torch.

    CUDA_VISIBLE_DEVICES wins (as CUDA reads it: up to the first invalid entry); else the
    NVIDIA device nodes; else the driver's /proc entries; else ``nvidia-smi -L``.
    """
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for item in visible.split(","):
            if not _CUDA_DEVICE.fullmatch(item.strip()):
                break
            count += 1
        return count, "CUDA_VISIBLE_DEVICES"
    try:
        nodes = sum(1 for p in dev.iterdir() if re.fullmatch(r"nvidia\d+", p.name))
    except OSError:
        nodes = 0
    if nodes:
        return nodes, f"{dev}/nvidia*"
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir()), str(proc)
    return _nvidia_smi(env)


def _nvidia_smi(env: Mapping[str, str]) -> tuple[int, str]:
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi:
        import subprocess  # here: not on every agent's way to its first rank (issue 18)

        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return 0, "nvidia-smi did not answer"
        if out.returncode == 0:
            return sum(1 for ln in out.stdout.splitlines() if ln.startswith("GPU ")), "nvidia-smi"
    return 0, "no NVIDIA driver"


def visible_gpus(environ: Mapping[str, str] | None = None, dev: Path = Path("/dev")) -> int:
    """How many GPUs this container can use (``gpu_count`` without the source)."""
    return gpu_count(environ, dev)[0]


def processes_per_host(flag: str, gpus: int) -> int:
    """``--nproc-per-host auto|N``: auto is one per visible GPU, 1 on CPU."""
    if flag == "auto":
        return gpus if gpus > 0 else 1
    try:
        n = int(flag)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f'--nproc-per-host: expected "auto" or a positive integer, got "{flag}"')
    return n
