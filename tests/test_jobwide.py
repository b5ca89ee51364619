"""Job-wide control across hosts: fail-fast, lost hosts, coordinated SIGTERM, model-dir clashes.

Real agents (one per simulated host, talking TCP on loopback), real workers, real gloo.
Timings are printed, and asserted only as generous hang guards; bench/ measures them.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.helpers import (
    free_port,
    make_tree,
    pid_alive,
    read_pids,
    run,
    start,
    start_hosts,
    wait_for,
    write_script,
)

RAISE_IN_COLLECTIVE = """
import os, time
import torch, torch.distributed as dist

def blocked_in_allreduce():
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 3 never joins: only the launcher can end this

dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 3:
    with open(os.path.join({out!r}, "raised-at"), "w") as f:
        f.write(repr(time.time()))
    raise RuntimeError("bad batch on rank 3")
blocked_in_allreduce()
"""


def test_a_raise_on_one_rank_stops_every_host_and_names_the_root_cause(tmp_path: Path) -> None:
    script = write_script(tmp_path / "job.py", RAISE_IN_COLLECTIVE.format(out=str(tmp_path)))
    work = tmp_path / "work"
    r = run(["--simulate", "2x2", "--work-dir", str(work), str(script)], timeout=120)
    ended = time.time()
    raised = float((tmp_path / "raised-at").read_text())
    print(f"raise -> every agent gone: {ended - raised:.2f} s")
    assert ended - raised < 15, "hang guard: peers must not wait for the collective's timeout"
    assert r.returncode == 1, r.stderr
    for host in ("algo-1", "algo-2"):
        text = (work / host / "output" / "failure").read_text()
        first = text.splitlines()[0]
        assert first.startswith("UserScriptError: RuntimeError: bad batch on rank 3"), first
        assert "(host algo-2, rank 3, exit 1)" in first, first
        assert len(text) <= 1024
    # The master's JSON report covers every rank: the root cause and its victims.
    report = json.loads((work / "algo-1" / "output" / "data" / "smdist-failure.json").read_text())
    by_rank = {f["rank"]: f["category"] for f in report["failures"]}
    assert by_rank == {0: "PeerFailure", 1: "PeerFailure", 2: "PeerFailure", 3: "UserScriptError"}
    assert report["root_cause"]["rank"] == 3 and report["root_cause"]["host"] == "algo-2"
    # The hung ranks' stacks were dumped into their logs before they were stopped.
    for rank, host in ((0, "algo-1"), (1, "algo-1"), (2, "algo-2")):
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"[{host}/{rank}] ")]
        assert any("in blocked_in_allreduce" in ln for ln in lines), f"no stack for rank {rank}"


BLOCK = """
import os, threading
open(os.path.join({out!r}, "up-" + os.environ["RANK"]), "w").write(str(os.getpid()))
threading.Event().wait()
"""


def test_a_host_that_vanishes_is_detected_by_missed_heartbeats(tmp_path: Path) -> None:
    script = write_script(tmp_path / "block.py", BLOCK.format(out=str(tmp_path)))
    hosts = ["algo-1", "algo-2", "algo-3"]
    agents = start_hosts(tmp_path, hosts, script, "--heartbeat-timeout", "3")
    pids = wait_for(lambda: read_pids([tmp_path / f"up-{r}" for r in range(3)]), 60, "workers up")
    killed_at = time.monotonic()
    agents["algo-3"].kill()  # like `docker kill`: no word from it; its worker dies with it
    for h in ("algo-1", "algo-2"):
        agents[h].communicate(timeout=60)
        assert agents[h].returncode == 1
        first = (tmp_path / h / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("HostLost: host algo-3 stopped responding"), first
    print(f"host killed -> survivors gone: {time.monotonic() - killed_at:.2f} s")
    agents["algo-3"].communicate(timeout=10)
    # algo-3's worker is sent its parent-death SIGKILL as its agent exits, and dies a moment
    # after the agent is reaped (later still on a loaded machine): awaited, not sampled.
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "every worker to be gone")


def test_losing_the_master_host_stops_the_others_at_once(tmp_path: Path) -> None:
    script = write_script(tmp_path / "block.py", BLOCK.format(out=str(tmp_path)))
    hosts = ["algo-1", "algo-2"]
    agents = start_hosts(tmp_path, hosts, script, "--heartbeat-timeout", "30")
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in range(2)), 60, "workers up")
    agents["algo-1"].kill()
    agents["algo-2"].communicate(timeout=20)  # well under the 30 s heartbeat bound
    assert agents["algo-2"].returncode == 1
    first = (tmp_path / "algo-2" / "output" / "failure").read_text().splitlines()[0]
    assert first.startswith("HostLost: host algo-1 stopped responding"), first


STOPPABLE = """
import json, os
import torch, torch.distributed as dist
import smdist

@smdist.main
def train(ctx):
    step = 0
    open(os.path.join({out!r}, f"up-{{ctx.rank}}"), "w").close()
    while not ctx.should_stop:
        t = torch.ones(1)
        dist.all_reduce(t)
        step += 1
    ctx.step = step

@train.on_stop
def checkpoint(ctx):
    ctx.save_checkpoint({{"step": ctx.step}}, "state.pt", scope="rank")
    with open(os.path.join({out!r}, f"hook-{{ctx.rank}}"), "w") as f:
        json.dump({{"step": ctx.step}}, f)

if __name__ == "__main__":
    train()
"""


def test_sigterm_to_the_master_is_a_coordinated_checkpointed_stop(tmp_path: Path) -> None:
    script = write_script(tmp_path / "stop.py", STOPPABLE.format(out=str(tmp_path)))
    hosts = ["algo-1", "algo-2"]
    agents = start_hosts(
        tmp_path, hosts, script, "--nproc-per-host", "2", "--no-hyperparameter-args"
    )
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in range(4)), 90, "ranks up")
    stop_at = time.monotonic()
    agents["algo-1"].send_signal(signal.SIGTERM)  # docker stop / StopTrainingJob on one host
    errs = {h: a.communicate(timeout=60)[1] for h, a in agents.items()}
    print(f"SIGTERM -> every agent gone: {time.monotonic() - stop_at:.2f} s")
    assert {h: a.returncode for h, a in agents.items()} == {"algo-1": 0, "algo-2": 0}, "\n".join(
        errs.values()
    )
    steps = {json.loads((tmp_path / f"hook-{r}").read_text())["step"] for r in range(4)}
    assert len(steps) == 1, f"ranks stopped at different steps: {steps}"  # should_stop agreed
    for rank, host in ((0, "algo-1"), (1, "algo-1"), (2, "algo-2"), (3, "algo-2")):
        assert (tmp_path / host / "checkpoints" / f"rank-{rank}" / "state.pt").is_file()
    for h in hosts:
        assert not (tmp_path / h / "output" / "failure").exists()


CLASH = """
import os
import smdist
rank = int(os.environ["RANK"])
if {direct}:
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "model.pt"), "w") as f:
        f.write(f"weights from rank {{rank}}")
else:
    with smdist.open_model_file("model.pt", "w") as f:
        f.write(f"weights from rank {{rank}}")
"""


def test_two_hosts_writing_the_same_model_file_fail_with_model_dir_clash(tmp_path: Path) -> None:
    script = write_script(tmp_path / "clash.py", CLASH.format(direct=True))
    work = tmp_path / "work"
    r = run(["--simulate", "2x1", "--work-dir", str(work), str(script)], timeout=60)
    assert r.returncode == 1, r.stderr
    for host in ("algo-1", "algo-2"):
        first = (work / host / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("ModelDirClash:"), first
        assert "model.pt on hosts algo-1, algo-2" in first


def test_writing_through_the_api_leaves_one_model_file(tmp_path: Path) -> None:
    script = write_script(tmp_path / "clash.py", CLASH.format(direct=False))
    work = tmp_path / "work"
    r = run(["--simulate", "2x2", "--work-dir", str(work), str(script)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert (work / "algo-1" / "model" / "model.pt").read_text() == "weights from rank 0"
    assert not any((work / "algo-2" / "model").iterdir())


NEVER_POLLS = """
import os, threading
import smdist

@smdist.main
def train(ctx):
    open(os.path.join({out!r}, f"up-{{ctx.rank}}"), "w").close()
    threading.Event().wait()  # a loop that never asks ctx.should_stop

@train.on_stop
def checkpoint(ctx):
    open(os.path.join({out!r}, f"hook-{{ctx.rank}}"), "w").close()

if __name__ == "__main__":
    train()
"""


def test_a_function_that_never_polls_should_stop_still_stops_cleanly(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ml")
    script = write_script(tmp_path / "t.py", NEVER_POLLS.format(out=str(tmp_path)))
    agent = start(["--opt-ml", str(root), "--nproc-per-host", "2", str(script)])
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in range(2)), 90, "ranks up")
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=60)  # far less than the 90 s grace
    assert agent.returncode == 0, err
    assert (tmp_path / "hook-0").exists() and (tmp_path / "hook-1").exists()


TRAIN_FOREVER = """
import os
import torch, torch.distributed as dist
dist.init_process_group("gloo")
open(os.path.join({out!r}, "up-" + os.environ["RANK"]), "w").close()
t = torch.ones(1024)
while True:
    dist.all_reduce(t)  # a collective is always in flight when a host dies
"""


def test_a_host_killed_mid_collective_is_the_root_cause_not_its_victims(tmp_path: Path) -> None:
    """The survivors' gloo fails at once with 'Connection closed by peer': a victim's error.
    The master's store sees the dead agent's connection drop and names the lost host."""
    script = write_script(tmp_path / "t.py", TRAIN_FOREVER.format(out=str(tmp_path)))
    hosts = ["algo-1", "algo-2", "algo-3"]
    agents = start_hosts(tmp_path, hosts, script, "--heartbeat-timeout", "60")
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in range(3)), 90, "ranks up")
    agents["algo-3"].kill()
    for h in ("algo-1", "algo-2"):
        _, err = agents[h].communicate(timeout=50)  # far less than the 60 s heartbeat bound
        assert agents[h].returncode == 1, err
        first = (tmp_path / h / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("HostLost: host algo-3 stopped responding"), first
    agents["algo-3"].communicate(timeout=10)


LATE_SIGTERM = """
import os, signal
import smdist

@smdist.main
def train(ctx):
    os.kill(os.getpid(), signal.SIGTERM)  # another host's agent asked first...
    while not ctx.should_stop:
        pass

if __name__ == "__main__":
    train()
    # ...and this host's own SIGTERM lands while the worker is tearing down
    os.kill(os.getpid(), signal.SIGTERM)
    print("teardown finished")
"""


def test_a_late_sigterm_after_the_stop_does_not_kill_the_teardown(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ml")
    script = write_script(tmp_path / "t.py", LATE_SIGTERM)
    r = run(["--opt-ml", str(root), str(script)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[algo-1/0] teardown finished" in r.stdout


def _mismatched_hosts(tmp_path: Path, **extra_env: str) -> dict[str, str]:
    """algo-2's resourceconfig.json lists a third host; every agent's stderr."""
    script = write_script(tmp_path / "never.py", "print('worker ran')\n")
    port = str(free_port())
    lists = {"algo-1": ["algo-1", "algo-2"], "algo-2": ["algo-1", "algo-2", "algo-3"]}
    addresses = "algo-1=127.0.0.1,algo-2=127.0.0.1,algo-3=127.0.0.1"
    common = ["--rdzv-port", port, "--host-addresses", addresses, "--rdzv-timeout", "15"]
    agents = {
        h: start(
            ["--opt-ml", str(make_tree(tmp_path / h, h, hosts)), *common, str(script)],
            **extra_env,
        )
        for h, hosts in lists.items()
    }
    logs = {h: p.communicate(timeout=120)[1] for h, p in agents.items()}
    assert all(p.returncode != 0 for p in agents.values()), logs
    assert all((tmp_path / h / "output/failure").is_file() for h in lists), logs
    assert not any("worker ran" in log or "Traceback" in log for log in logs.values()), logs
    return logs


def test_hosts_whose_configs_list_different_hosts_fail_naming_both(tmp_path: Path) -> None:
    """With one secret for the job, the master refuses the meeting with a one-line error
    naming both host lists (in short); every host fails, no worker starts."""
    logs = _mismatched_hosts(tmp_path, SMDIST_JOB_SECRET="one-secret-for-the-job")
    expected = (
        "hosts differ between algo-1 (2 hosts: algo-1, algo-2) and algo-2 (3 hosts: algo-1, "
        "algo-2, algo-3): every host's resourceconfig.json must list the same hosts"
    )
    assert expected in logs["algo-1"], logs["algo-1"]
    first = (tmp_path / "algo-1/output/failure").read_text().splitlines()[0]
    assert expected in first, first


def test_a_derived_secret_differs_with_the_hosts_and_both_sides_say_so(tmp_path: Path) -> None:
    """Without SMDIST_JOB_SECRET the host list is part of the derived secret: algo-2 is told
    at once that the secrets differ, and the master's timeout names the refused address."""
    logs = _mismatched_hosts(tmp_path)
    assert "the hosts hold different secrets" in logs["algo-2"], logs["algo-2"]
    first = (tmp_path / "algo-1/output/failure").read_text().splitlines()[0]
    assert "missing algo-2 (refused for a different secret: 127.0.0.1" in first, first
