"""A stop before the workers run, to an agent that is PID 1, as in a container.

PID 1 gets no signal it has no handler for, so these agents run as PID 1 of a fresh PID
namespace (``unshare --pid --fork``, root only) and get SIGTERM from outside it, as
``docker stop`` sends it. Each must end within a second or two (not at SIGKILL 120 s
later), say in its log and failure file at which stage it was stopped, and stop the
hosts that joined it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.dns_server import DnsServer
from tests.helpers import REPO, SMDIST, env, free_port, make_tree, write_script

needs_pid_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace (unshare --pid) needs root",
)

EXIT_BOUND_S = 5.0
"""A generous bound on "within a second or two" for a loaded CI machine (vs 120 s)."""


class Pid1Agent:
    """``smdist-run`` as PID 1 of its own PID namespace; its stderr read line by line."""

    def __init__(self, args: Sequence[str], **extra_env: str) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", *SMDIST, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env(**extra_env),
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # EOF
            self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float = 60.0) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or "" in self.lines, timeout
            )
            assert found and any(text in line for line in self.lines), (
                f"no line with {text!r}:\n{self.log}"
            )

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def agent_pid(self) -> int:
        """The agent's pid outside the namespace (unshare's child), checked to be PID 1 inside."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 30
        while not children.read_text().split():
            assert time.monotonic() < deadline, "unshare never started the agent"
            time.sleep(0.01)
        pid = int(children.read_text().split()[0])
        ns_pids = next(
            line.split()[1:]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        )
        assert ns_pids[-1] == "1", f"the agent is not PID 1 in its namespace: {ns_pids}"
        return pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _failure(root: Path) -> str:
    return (root / "output" / "failure").read_text()


def _stop(agent: Pid1Agent) -> float:
    os.kill(agent.agent_pid(), signal.SIGTERM)
    return time.monotonic()


@needs_pid_namespace
def test_sigterm_in_the_dns_wait_ends_a_pid1_agent_at_once(tmp_path: Path) -> None:
    script = write_script(tmp_path / "s.py", "print('never runs')\n")
    root = make_tree(tmp_path / "algo-1", "algo-1", ["algo-1", "algo-2"])
    with DnsServer() as dns:
        dns.drop_all = True  # every lookup times out: the slowest wait to interrupt
        agent = Pid1Agent(
            ["--opt-ml", str(root), "--nameserver", "{}:{}".format(*dns.endpoint), str(script)]
        )
        agent.wait_for_line("resolving 2 hosts")
        sent = _stop(agent)
        code = agent.wait(timeout=30)
    took = time.monotonic() - sent
    print(f"SIGTERM in the DNS wait -> exit in {took:.2f} s")
    assert took < EXIT_BOUND_S, agent.log
    assert code == 128 + signal.SIGTERM, agent.log
    first = _failure(root).splitlines()[0]
    assert first == (
        "Stopped: SIGTERM received on algo-1 during the DNS wait, before the workers started"
    ), first
    assert "SIGTERM received on algo-1 during the DNS wait" in agent.log
    assert "Traceback" not in agent.log


@needs_pid_namespace
@pytest.mark.parametrize("stopped", ["algo-1", "algo-2"])
def test_sigterm_in_the_rendezvous_wait_stops_every_host_that_joined(
    tmp_path: Path, stopped: str
) -> None:
    """algo-3 never comes: algo-1 (master) waits for it, algo-2 waits for the plan."""
    script = write_script(tmp_path / "s.py", "print('never runs')\n")
    hosts = ["algo-1", "algo-2", "algo-3"]
    port = free_port()
    addresses = ",".join(f"{h}=127.0.0.1" for h in hosts)
    roots = {h: make_tree(tmp_path / h, h, hosts) for h in hosts[:2]}
    flags = ["--rdzv-port", str(port), "--host-addresses", addresses, str(script)]
    agents = {h: Pid1Agent(["--opt-ml", str(root), *flags]) for h, root in roots.items()}
    for agent in agents.values():
        agent.wait_for_line("joined the rendezvous")
    sent = _stop(agents[stopped])
    codes = {h: a.wait(timeout=30) for h, a in agents.items()}
    took = time.monotonic() - sent
    logs = "\n".join(a.log for a in agents.values())
    print(f"SIGTERM to {stopped} in the rendezvous wait -> both hosts gone in {took:.2f} s")
    assert took < EXIT_BOUND_S, logs
    assert codes == {"algo-1": 143, "algo-2": 143}, logs
    expected = (
        f"Stopped: SIGTERM received on {stopped} during the rendezvous wait, "
        "before the workers started"
    )
    for h, root in roots.items():
        assert _failure(root).splitlines()[0] == expected, (h, logs)
    assert "Traceback" not in logs


class SilentIndex:
    """A package index that accepts connections and never answers: pip hangs in it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/simple"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@needs_pid_namespace
def test_sigterm_in_the_dependency_install_stops_pip_and_every_host(tmp_path: Path) -> None:
    """algo-1's pip hangs on its index; algo-2 (nothing to install) waits for algo-1."""
    hosts = ["algo-1", "algo-2"]
    port = free_port()
    addresses = ",".join(f"{h}=127.0.0.1" for h in hosts)
    index = SilentIndex()
    agents, roots = {}, {}
    try:
        for h in hosts:
            code = tmp_path / h / "code"
            code.mkdir(parents=True)
            (code / "train.py").write_text("print('never runs')\n")
            if h == "algo-1":
                (code / "requirements.txt").write_text("smdist-never-published==1.0\n")
            roots[h] = make_tree(tmp_path / h / "ml", h, hosts)
            flags = ["--rdzv-port", str(port), "--host-addresses", addresses]
            agents[h] = Pid1Agent(
                ["--opt-ml", str(roots[h]), *flags, str(code / "train.py")],
                PIP_INDEX_URL=index.url,
                PIP_RETRIES="0",
            )
        agents["algo-1"].wait_for_line("pip: Looking in indexes")
        agents["algo-2"].wait_for_line("joined the rendezvous")
        sent = _stop(agents["algo-1"])
        codes = {h: a.wait(timeout=30) for h, a in agents.items()}
        took = time.monotonic() - sent
    finally:
        index.close()
    logs = "\n".join(a.log for a in agents.values())
    print(f"SIGTERM to algo-1 in pip -> both hosts gone in {took:.2f} s")
    assert took < EXIT_BOUND_S, logs
    assert codes == {"algo-1": 143, "algo-2": 143}, logs
    expected = (
        "Stopped: SIGTERM received on algo-1 during the dependency install, "
        "before the workers started"
    )
    for h, root in roots.items():
        assert _failure(root).splitlines()[0] == expected, (h, logs)
    assert "Traceback" not in logs


STAGES = """
import signal, sys
from smdist.agent import stages
from smdist.log import setup

setup("algo-1")
stages.install()
stages.enter("the waiting stage")
try:
    signal.raise_signal(signal.SIGTERM)
    print("not interrupted")
except stages.StopRequested as stop:
    print("stopped:", stop.describe("algo-1"), stop.exit_code)
stages.enter("the report", interruptible=False)
signal.raise_signal(signal.SIGINT)  # the report runs to its end; a supervisor takes it over
print("pending:", stages.take_pending(), stages.take_pending())
"""


def test_a_stop_interrupts_a_stage_once_then_waits_for_whoever_takes_it_over() -> None:
    r = subprocess.run(
        [sys.executable, "-c", STAGES], capture_output=True, text=True, env=env(), timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "stopped: SIGTERM received on algo-1 during the waiting stage, before the workers "
        "started 143",
        f"pending: [{int(signal.SIGINT)}] []",
    ], r.stdout
    assert "SIGINT received during the report: finishing it" in r.stderr
