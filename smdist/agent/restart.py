"""Job-wide in-place restarts: which causes a new attempt may fix, the pause before it, and
the record of every attempt for the report.

Every host decides alone, from the attempt's one job-wide event (the same on every host:
first writer wins) and the same budget, so every host reaches the same decision and meets
the others again for the next attempt without a word about it.
"""

from __future__ import annotations

from smdist.agent.rendezvous import JobEvent
from smdist.contract import MAX_RESTARTS_ENV, RESTART_COUNT_ENV, Category
from smdist.records import asdict, dataclass

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

BACKOFF_FIRST_S = 0.1
"""The default first pause (``--restart-pause``): long enough for the ranks of the attempt
that failed to be gone (they are: every host waits for its workers to exit before it leaves
the attempt), short enough not to count beside a cold start."""
BACKOFF_MAX_S = 30.0
RETRYABLE = frozenset(
    {
        Category.USER_SCRIPT_ERROR,
        Category.KILLED,
        Category.OUT_OF_MEMORY,
        Category.PEER_FAILURE,
        Category.HANG,
    }
)
"""Causes that can pass on another try: a crash, a signal, an OOM kill, a hang, a collective
broken by one of those. Everything else (a config error, a missing entry point or module, a
model-dir clash, a lost host, a full disk) would fail the same way again."""


def backoff_s(restart: int, first_s: float = BACKOFF_FIRST_S) -> float:
    """The pause before restart ``restart`` (1, 2, ...): ``first_s``, doubling, at most
    30 s (or ``first_s`` itself when it is longer: a pause asked for is never cut)."""
    return float(min(max(BACKOFF_MAX_S, first_s), first_s * 2 ** min(restart - 1, 64)))


def worker_env(restart_count: int, max_restarts: int) -> dict[str, str]:
    """What every worker of an attempt is told about restarts in smdist's names (the
    backends give torchrun's, TORCHELASTIC_RESTART_COUNT and _MAX_RESTARTS, through
    ``smdist.torchrun_env``)."""
    return {RESTART_COUNT_ENV: str(restart_count), MAX_RESTARTS_ENV: str(max_restarts)}


@dataclass(frozen=True)
class Attempt:
    """One attempt's end, as the report lists it."""

    attempt: int
    category: str
    headline: str
    host: str | None
    rank: int | None
    time: float
    exit_code: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attempt_record(attempt: int, event: JobEvent | None, exit_code: int, now: float) -> Attempt:
    """The attempt's root cause from its job-wide event (the same on every host)."""
    if event is None:
        return Attempt(attempt, "Failed", f"exit {exit_code}", None, None, now, exit_code)
    category = event.headline.split(":", 1)[0]
    if event.kind == "failure" and event.failure is not None:
        from smdist.agent.report.classify import classify  # after a failure, not at start
        from smdist.agent.report.failure import WorkerFailure

        category = classify(WorkerFailure.from_dict(event.failure)).category
    return Attempt(
        attempt,
        category,
        event.headline,
        event.host or None,
        event.rank,
        event.time or now,
        event.exit_code or exit_code,
    )


def why_not_restart(record: Attempt, kind: str | None, restarts_done: int, budget: int) -> str:
    """Empty when the job restarts; else why not (for the log)."""
    if budget <= 0:
        return "no restarts asked for (--max-restarts 0)"
    if kind == "lost":
        return f"host {record.host} is gone; a lost host is not restarted"
    if kind == "stop":
        return "the job was stopped"
    if record.category not in RETRYABLE:
        return f"{record.category} would fail the same way again"
    if restarts_done >= budget:
        return f"the restart budget is spent ({budget} of --max-restarts {budget})"
    return ""
