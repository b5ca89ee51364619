"""The failure file and the JSON report, written from failure values.

``/opt/ml/output/failure``'s first 1024 characters become the job's FailureReason, so
``report`` writes a whole file that fits: the root cause's category, reason, host, rank
and exit code on the first line, then the innermost user frames and a hint. The full
story (every rank, tracebacks, stderr tails, timings) goes to a JSON report in
``/opt/ml/output/data``, which SageMaker uploads with the output: each host's under its own
name (``smdist-failure-<host>.json``), and the master's, which covers every host, also as
``smdist-failure.json``. SageMaker (and its local mode) merges the hosts' output dirs, the
last host winning a name: only the master writes the whole-job name, so it survives.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from smdist import contract
from smdist.agent.report.memory import MemoryStats, memory_snapshot
from smdist.config import Paths
from smdist.contract import FAILURE_FILE_LIMIT
from smdist.errors import SmdistError
from smdist.records import dataclass, field

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:  # the classifier: imported when there is something to report
    from typing import Any

    from smdist.agent.report.classify import Classification
    from smdist.agent.report.failure import WorkerFailure

REPORT_NAME = "smdist-failure.json"
"""The whole job's report: the master's (or a one-host job's), every host's failures."""


def host_report_name(host: str) -> str:
    """Each host's own report: a name no other host writes."""
    return f"smdist-failure-{host}.json"


def _same(a: WorkerFailure, b: WorkerFailure | None) -> bool:
    """The same failure, also when one copy was decoded from another host's message."""
    return b is not None and (a.host, a.rank, a.time) == (b.host, b.rank, b.time)


@dataclass(frozen=True)
class Diagnosis:
    """What ``report`` decided and wrote."""

    category: str
    headline: str
    """The first line of the failure file."""
    text: str
    """The failure file smdist composed (at most 1024 characters)."""
    exit_code: int
    host: str | None = None
    rank: int | None = None
    root_cause: WorkerFailure | None = field(default=None, repr=False)
    failure_file_written: bool = False
    """False when the user's own failure file was kept (or the disk refused)."""
    user_failure_text: str | None = field(default=None, repr=False)
    report_path: Path | None = None


def _compose(
    headline_: str,
    c: Classification | None,
    others: Sequence[str],
    report_path: Path | None,
) -> str:
    """Fit the failure file in 1024 characters, the most useful lines first."""
    lines: list[str] = []
    if c is not None:
        lines += [f"  at {w}" if not w.startswith("(") else f"  {w}" for w in c.where]
        lines += list(c.details)
        lines += [f"Hint: {c.hint}"] if c.hint else []
    if others:
        lines.append(f"Also: {'; '.join(others)}")
    if report_path is not None:
        lines.append(f"Full report: {report_path}")
    text = contract.clip(headline_, FAILURE_FILE_LIMIT)
    for line in lines:
        room = FAILURE_FILE_LIMIT - contract.utf8_size(text) - 1
        if room >= min(contract.utf8_size(line), 40):
            text += "\n" + contract.clip(line, room)
    return text


def _other_lines(failures: Sequence[WorkerFailure], root: WorkerFailure | None) -> list[str]:
    from smdist.agent.report.classify import classify, one_line

    others = [f for f in failures if not _same(f, root) and not f.peer_stopped]
    peers = [f for f in failures if not _same(f, root) and f.peer_stopped]
    out = []
    for f in sorted(others, key=lambda f: f.time)[:3]:
        c = classify(f)
        out.append(f"rank {f.rank} on {f.host} {c.category}: {one_line(c.reason, 80)}")
    if len(others) > 3:
        out.append(f"{len(others) - 3} more failed")
    if peers:
        n = len(peers)
        out.append(f"{n} other rank{'s' if n > 1 else ''} stopped after it (PeerFailure)")
    return out


def report(
    paths: Paths,
    failures: Sequence[WorkerFailure],
    *,
    current_host: str,
    root_cause: WorkerFailure | None = None,
    smdist_error: SmdistError | None = None,
    extra: Mapping[str, Any] | None = None,
    memory_at_start: MemoryStats | None = None,
    whole_job: bool = True,
    headline_note: str = "",
) -> Diagnosis:
    """Classify the root cause, write the failure file and the JSON report.

    ``headline_note`` ends the first line (a restarted job: how many attempts were made).

    The root cause is ``smdist_error`` (one of smdist's own stages failed), else
    ``root_cause``, else the earliest failure that is not a victim. A failure file the
    user wrote (``smdist.fail``) is kept. ``memory_at_start`` is ``memory_snapshot()``
    taken before the workers started; without it any recorded OOM kill counts.
    The JSON report goes to ``smdist-failure-<current_host>.json`` and, when ``whole_job``
    (the master, or a host that does not know its name yet), to ``smdist-failure.json``.
    """
    from smdist.agent.report.classify import choose_root_cause, classify, one_line

    memory = memory_snapshot(memory_at_start.cgroup_dir if memory_at_start else None)
    base = memory_at_start.oom_kill if memory_at_start and memory_at_start.oom_kill else 0
    oom_kills = max(0, (memory.oom_kill or 0) - base)
    known = current_host not in ("", "-")
    targets = [paths.output_data_dir / host_report_name(current_host)] if known else []
    if whole_job or not known:
        targets.insert(0, paths.output_data_dir / REPORT_NAME)
    report_path = targets[0]
    classified = [(f, classify(f, oom_kills=oom_kills, memory=memory)) for f in failures]

    root: WorkerFailure | None = None
    c: Classification | None = None
    if smdist_error is not None:
        category = smdist_error.category
        where = smdist_error.where
        suffix = f" (host {current_host})" if where is None else (f" ({where})" if where else "")
        head = f"{category}: {contract.clip(one_line(str(smdist_error), 700), 700)}{suffix}"
        exit_code = smdist_error.exit_code
    else:
        root = root_cause or choose_root_cause(failures)
        if root is None and failures:
            root = min(failures, key=lambda f: f.time)
        if root is None:
            raise ValueError("report() needs at least one failure or an smdist_error")
        c = next((cl for f, cl in classified if _same(f, root)), None) or classify(
            root, oom_kills=oom_kills, memory=memory
        )
        category = c.category
        head = f"{category}: {contract.clip(one_line(c.reason, 700), 700)} ({root.suffix()})"
        exit_code = root.exit_code or 1
    head += headline_note
    text = _compose(head, c, _other_lines(failures, root), report_path)

    user_text = _read_user_failure(paths)
    written = False if user_text is not None else write_failure_file(paths, text)
    body: dict[str, Any] = {
        "version": 1,
        "category": category,
        "headline": head,
        "failure_file": text,
        "user_failure_file": user_text,
        "exit_code": exit_code,
        "current_host": current_host,
        "root_cause": _failure_json(root, c) if root is not None and c is not None else None,
        "smdist_error": (
            {
                "category": smdist_error.category,
                "type": type(smdist_error).__qualname__,
                "message": str(smdist_error),
                "exit_code": smdist_error.exit_code,
            }
            if smdist_error is not None
            else None
        ),
        "failures": [_failure_json(f, cl) for f, cl in sorted(classified, key=_rank_key)],
        "memory": {
            "cgroup": str(memory.cgroup_dir) if memory.cgroup_dir else None,
            "cgroup_version": memory.version,
            "limit_bytes": memory.limit,
            "peak_bytes": memory.peak,
            "oom_kills_during_job": oom_kills,
        },
        "timings": _timings(failures),
        "extra": dict(extra or {}),
        "written_at": time.time(),
    }
    saved = all([_write_json(path, body) for path in targets])
    return Diagnosis(
        category=category,
        headline=head,
        text=text,
        exit_code=exit_code,
        host=root.host if root is not None else current_host,
        rank=root.rank if root is not None else None,
        root_cause=root,
        failure_file_written=written,
        user_failure_text=user_text,
        report_path=report_path if saved else None,
    )


def _rank_key(item: tuple[WorkerFailure, Classification]) -> tuple[int, str]:
    return (item[0].rank, item[0].host)


def _failure_json(f: WorkerFailure, c: Classification) -> dict[str, Any]:
    return {
        "host": f.host,
        "rank": f.rank,
        "local_rank": f.local_rank,
        "returncode": f.returncode,
        "exit_code": f.exit_code,
        "signal": f.signal_name,
        "time": f.time,
        "peer_stopped": f.peer_stopped,
        "category": c.category,
        "reason": c.reason,
        "where": list(c.where),
        "hint": c.hint,
        "error": f.error_record(),
        "stderr_tail": list(f.stderr_tail),
    }


def _timings(failures: Sequence[WorkerFailure]) -> dict[str, Any]:
    if not failures:
        return {}
    first = min(f.time for f in failures)
    return {
        "first_failure_at": first,
        "seconds_after_first": {
            f"{f.host}/{f.rank}": round(f.time - first, 3)
            for f in sorted(failures, key=lambda f: f.time)
        },
    }


def clear_failure_files(paths: Paths, host: str | None = None) -> None:
    """Remove a previous run's failure file and reports (the agent, before workers start):
    the whole job's, and ``host``'s own (never another host's: the dir may be shared).

    After this, a failure file that exists at ``report`` time is the user's own.
    """
    names = [REPORT_NAME] + ([host_report_name(host)] if host else [])
    for path in (paths.failure_file, *(paths.output_data_dir / n for n in names)):
        path.unlink(missing_ok=True)


def _read_user_failure(paths: Paths) -> str | None:
    try:
        return paths.failure_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> bool:
    try:
        contract.atomic_write(path, json.dumps(data, indent=2, default=str))
    except OSError:
        return False
    return True


def write_failure_file(paths: Paths, text: str, *, overwrite_user: bool = False) -> bool:
    """Write the failure file, at most 1024 characters; keep one the user wrote.

    Returns whether the file was written.
    """
    return contract.write_failure_file(paths.failure_file, text, exclusive=not overwrite_user)
