"""The agent's log relay: every worker pipe into the agent's output, whole lines, prefixed.

Real pipes fed by real processes (``python -c``), relayed by the supervisor's ``Relay`` into
a real file or pipe; the agent-level behaviour (``[algo-1/0] line`` in the job's output, the
failure report's tail) is covered in test_spine and test_failure.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from smdist.agent.supervisor import MAX_LINE, PIPE_BYTES, READ_BYTES, TAIL_LINES, Activity, Relay

WAIT_S = 60.0
"""Bound on each wait for relayed output: generous, for a loaded machine."""


def _writer(code: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=stdin, stdout=subprocess.PIPE, stderr=None
    )


def _relay_all(procs: list[subprocess.Popen[bytes]], out: Path) -> list[Activity]:
    """Relay each writer's stdout into ``out`` as rank i; return when every pipe ended."""
    relay = Relay()
    relay.start()
    activities = []
    with out.open("wb") as dst:
        for i, p in enumerate(procs):
            assert p.stdout is not None
            activity = Activity()
            activities.append(activity)
            relay.add(p.stdout, dst, f"[algo-1/{i}] ".encode(), activity=activity)
        relay.seal()
        for p in procs:
            assert p.wait(WAIT_S) == 0
        relay.join(WAIT_S)
    return activities


# Lines of every length from 1 to 300 bytes, written in 64 KiB bursts (over PIPE_BUF, so a
# shared pipe could interleave them): rank, sequence number, padding, a fixed end.
BURSTS = r"""
import os, sys
rank = int(sys.argv[1])
lines = [b"r%d n%d %s END\n" % (rank, i, b"x" * (i % 300)) for i in range(20000)]
data = b"".join(lines)
for at in range(0, len(data), 65536):
    os.write(1, data[at : at + 65536])
"""


def test_lines_of_many_writers_arrive_whole_in_order_each_with_its_prefix(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", BURSTS, str(r)], stdout=subprocess.PIPE)
        for r in range(4)
    ]
    out = tmp_path / "out"
    _relay_all(procs, out)
    line = re.compile(rb"\[algo-1/(\d)\] r(\d) n(\d+) (x*) END\n")
    seen = collections.defaultdict(list)
    with out.open("rb") as f:
        for raw in f:
            m = line.fullmatch(raw)
            assert m is not None, raw[:200]
            assert m[1] == m[2], raw[:200]  # the prefix names the rank that wrote it
            n = int(m[3])
            assert len(m[4]) == n % 300, raw[:200]  # not cut, nothing spliced in
            seen[int(m[1])].append(n)
    assert {r: seen[r] for r in range(4)} == {r: list(range(20000)) for r in range(4)}


def test_a_last_line_without_its_newline_still_arrives_ended(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('one\\ntwo\\nno newline at the end')"
    out = tmp_path / "out"
    _relay_all([_writer(code)], out)
    assert out.read_bytes() == b"[algo-1/0] one\n[algo-1/0] two\n[algo-1/0] no newline at the end\n"


def test_an_endless_line_goes_out_in_prefixed_pieces_nothing_lost(tmp_path: Path) -> None:
    size = 3 * MAX_LINE + 12345
    code = (
        f"import os\ndata = b'y' * {size}\n"
        "for at in range(0, len(data), 65536): os.write(1, data[at : at + 65536])\n"
    )
    out = tmp_path / "out"
    _relay_all([_writer(code)], out)
    pieces = out.read_bytes().split(b"\n")
    assert pieces[-1] == b""
    pieces = pieces[:-1]
    assert len(pieces) >= 3  # not held whole
    assert all(p.startswith(b"[algo-1/0] y") for p in pieces)
    assert all(len(p) <= len(b"[algo-1/0] ") + MAX_LINE + READ_BYTES for p in pieces)
    assert sum(len(p) - len(b"[algo-1/0] ") for p in pieces) == size


def test_the_tail_keeps_the_last_lines_and_a_stack_dump_is_captured(tmp_path: Path) -> None:
    code = "import sys\nfor i in range(5000): print(f'err {i}')\nsys.stdout.write('last')"
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = _writer(code)
    relay = Relay()
    relay.start()
    activity = Activity(capture=[])  # as while a stack dump is awaited
    with (tmp_path / "out").open("wb") as dst:
        assert proc.stdout is not None
        relay.add(proc.stdout, dst, b"[algo-1/0] ", tail, activity)
        relay.seal()
        assert proc.wait(WAIT_S) == 0
        relay.join(WAIT_S)
    expected = [f"err {i}" for i in range(5000)] + ["last"]
    assert list(tail) == expected[-TAIL_LINES:]
    assert activity.capture == expected
    assert activity.last_output > 0


def test_worker_pipes_get_a_bigger_buffer(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if limit < PIPE_BYTES and os.geteuid() != 0:
        pytest.skip(f"pipe-max-size is {limit}: an unprivileged pipe cannot reach {PIPE_BYTES}")
    r, w = os.pipe()
    relay = Relay()
    with os.fdopen(r, "rb") as src, (tmp_path / "out").open("wb") as dst:
        relay.add(src, dst, b"[algo-1/0] ")
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == PIPE_BYTES
        os.close(w)
        relay.start()
        relay.seal()
        relay.join(WAIT_S)
    assert (tmp_path / "out").read_bytes() == b""


# Writes a line, then waits for the test to have seen it relayed before writing the next:
# it only ends if each line is relayed on its own, with no later output to push it out.
LOCKSTEP = r"""
import sys
for i in range(3):
    sys.stdout.write(f"step {i}\n")
    sys.stdout.flush()
    if sys.stdin.readline() != "go\n":
        sys.exit(3)
"""


def test_each_chunk_is_relayed_at_once_not_when_more_output_comes() -> None:
    out_r, out_w = os.pipe()
    proc = _writer(LOCKSTEP, stdin=subprocess.PIPE)
    relay = Relay()
    relay.start()
    try:
        with os.fdopen(out_w, "wb") as dst, os.fdopen(out_r, "rb") as relayed:
            assert proc.stdout is not None and proc.stdin is not None
            relay.add(proc.stdout, dst, b"[algo-1/0] ")
            relay.seal()
            for i in range(3):
                ready, _, _ = select.select([relayed], [], [], WAIT_S)
                assert ready, f"step {i} not relayed within {WAIT_S} s"
                assert relayed.readline() == f"[algo-1/0] step {i}\n".encode()
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
            assert proc.wait(WAIT_S) == 0
            relay.join(WAIT_S)
    finally:
        proc.kill()
        proc.wait(WAIT_S)
