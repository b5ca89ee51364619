"""A worker that did not exit 0, as a value (torch elastic's ``ProcessFailure``).

Its error record (the bootstrap's error file) is read once, when the value is made, or
carried from another host's agent (``to_dict``/``from_dict``). The rooms around it:
``classify`` says why it died, ``memory`` reads the container's memory cgroup, ``stderr``
parses what a worker printed, ``write`` writes the failure file and the JSON report.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smdist import contract
from smdist.agent.report.stderr import from_torchelastic
from smdist.records import dataclass, field


@dataclass(frozen=True)
class WorkerFailure:
    """One worker that did not exit 0."""

    host: str
    rank: int
    local_rank: int
    returncode: int
    """As Popen gives it: negative for a signal."""
    time: float
    error_file: Path | None = None
    stderr_tail: tuple[str, ...] = field(default=(), repr=False)
    peer_stopped: bool = False
    """Stopped by smdist because of another failure (a victim, never the root cause)."""
    record: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """The error file's content: read once, here, or carried from another host."""

    def __post_init__(self) -> None:
        if self.record is None:  # read once (the file may be gone by the report)
            object.__setattr__(self, "record", _read_record(self.error_file))

    @property
    def exit_code(self) -> int:
        """The shell convention: 128+N for signal N."""
        return contract.exit_code(self.returncode)

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def error_record(self) -> dict[str, Any] | None:
        """The bootstrap's error file, if the worker died of a recorded exception."""
        return dict(self.record) if self.record is not None else None

    def suffix(self) -> str:
        """Who failed, as the failure file's first line ends: ``host, rank, exit``."""
        return f"host {self.host}, rank {self.rank}, exit {self.exit_code}"

    def describe(self) -> str:
        where = f"host {self.host}, rank {self.rank}"
        if self.signal_name:
            return f"{where}, killed by {self.signal_name}"
        return f"{where}, exit {self.exit_code}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, with the error record inlined, to send to another host's agent."""
        return {
            "host": self.host,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "returncode": self.returncode,
            "time": self.time,
            "stderr_tail": list(self.stderr_tail),
            "peer_stopped": self.peer_stopped,
            "record": self.error_record(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerFailure:
        return cls(
            host=str(data["host"]),
            rank=int(data["rank"]),
            local_rank=int(data.get("local_rank", 0)),
            returncode=int(data["returncode"]),
            time=float(data["time"]),
            stderr_tail=tuple(str(s) for s in data.get("stderr_tail") or ()),
            peer_stopped=bool(data.get("peer_stopped", False)),
            record=data.get("record"),
        )


def _read_record(path: Path | None) -> dict[str, Any] | None:
    """The error file: the bootstrap's record, or one made from torch elastic's (``@record``
    wrote it and the bootstrap did not run)."""
    data = contract.read_error_record(path)
    if data is not None and contract.is_torchelastic_record(data):
        return from_torchelastic(data)
    return data
