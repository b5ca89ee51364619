"""Failure diagnosis across containers (issue 7): a dependency missing on one host only."""

from __future__ import annotations

import pytest

from compose.harness import Harness

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]


def test_a_module_missing_on_algo_2_only_is_every_hosts_root_cause(harness: Harness) -> None:
    job = harness.run_job(
        "missing-on-algo-2",
        hosts=2,
        command=["smdist-run", "--dns-timeout", "60", "missing_on_algo_2.py"],
        timeout=120,
    )
    print(f"job: {job.seconds:.1f} s")
    for host, result in job.hosts.items():
        assert result.exit_code not in (0, 137), (host, job.logs())
        first = result.failure.splitlines()[0] if result.failure else ""
        # algo-1 names algo-2's root cause, not its own stopped worker (PeerFailure).
        assert first.startswith("MissingDependency:"), (host, result.failure, job.logs())
        assert "some_missing_library" in first and "host algo-2" in first, (host, first)
        assert len(result.failure) <= 1024
