"""The compose tier: one private Docker engine and image for the whole session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `compose` is not an installed package: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from compose.harness import Harness

# (step or scenario, seconds), in the order they ran; printed at the end of the session.
# A name starting with a space is a latency measured inside the job above it.
TIMINGS: list[tuple[str, float]] = []


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    if os.geteuid() != 0:
        pytest.skip("the compose tier installs packages and starts its own dockerd: run as root")
    with Harness.start(work_root=tmp_path_factory.mktemp("compose-jobs")) as h:
        try:
            yield h
        finally:
            TIMINGS.extend(h.timings)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    tr = terminalreporter
    tr.write_sep("-", "compose tier timings")
    width = max(len(name) for name, _ in TIMINGS)
    for name, seconds in TIMINGS:
        tr.write_line(f"{name:<{width}}  {seconds:7.1f} s")
    # Indented rows are measurements inside a job (a latency), not more wall time.
    total = sum(s for name, s in TIMINGS if not name.startswith(" "))
    tr.write_line(f"{'total':<{width}}  {total:7.1f} s")
