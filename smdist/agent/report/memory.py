"""The container's memory cgroup (v2 or v1): OOM kills, limit, peak.

The agent takes a snapshot before its workers start; a worker killed by SIGKILL while the
``oom_kill`` counter grew is classified OutOfMemory.
"""

from __future__ import annotations

from pathlib import Path

from smdist.records import dataclass

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryStats:
    """The container's memory cgroup counters at one moment (None: not known here)."""

    cgroup_dir: Path | None
    oom_kill: int | None = None
    limit: int | None = None
    peak: int | None = None
    version: int | None = None

    def describe(self) -> str | None:
        parts = []
        if self.limit is not None:
            parts.append(f"limit {format_bytes(self.limit)}")
        if self.peak is not None:
            parts.append(f"peak {format_bytes(self.peak)}")
        return ", ".join(parts) if parts else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max": no limit


def _read_keyed(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _cgroup_candidates() -> list[Path]:
    """This process's memory cgroup directories, most specific first (v2, then v1)."""
    v2: list[Path] = []
    v1: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            v2.append(CGROUP_ROOT / rel.lstrip("/"))
        elif "memory" in controllers.split(","):
            v1.append(CGROUP_ROOT / "memory" / rel.lstrip("/"))
    # Inside a container the cgroup namespace often shows the path of the host: use the root.
    return [*v2, CGROUP_ROOT, *v1, CGROUP_ROOT / "memory"]


def memory_snapshot(cgroup_dir: Path | None = None) -> MemoryStats:
    """Read the memory cgroup's OOM-kill counter, limit and peak (cgroup v2 or v1).

    The agent takes one at start and passes it to ``report``: a worker killed by SIGKILL
    while ``oom_kill`` grew is classified OutOfMemory.
    """
    candidates = [cgroup_dir] if cgroup_dir is not None else _cgroup_candidates()
    for d in candidates:
        events = d / "memory.events"
        if events.is_file():
            limit = _read_int(d / "memory.max")
            return MemoryStats(
                cgroup_dir=d,
                oom_kill=_read_keyed(events).get("oom_kill"),
                limit=limit,
                peak=_read_int(d / "memory.peak"),
                version=2,
            )
        control = d / "memory.oom_control"
        if control.is_file():
            limit = _read_int(d / "memory.limit_in_bytes")
            return MemoryStats(
                cgroup_dir=d,
                oom_kill=_read_keyed(control).get("oom_kill"),
                # v1 writes "no limit" as a page-rounded 2**63-1.
                limit=limit if limit is not None and limit < 2**62 else None,
                peak=_read_int(d / "memory.max_usage_in_bytes"),
                version=1,
            )
    return MemoryStats(cgroup_dir=None)


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns
