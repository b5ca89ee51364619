"""Heterogeneous clusters: only the distribution's instance groups form the world; a host of
another group runs the entry once as a plain process and still takes part in job-wide
control. Three real agents, one per host, each with its own /opt/ml tree."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.helpers import free_port, make_tree, start, wait_for

HOSTS = ["algo-1", "algo-2", "algo-3"]
RESOURCE = {
    "instance_groups": [
        {"instance_group_name": "data", "instance_type": "ml.c5.xlarge", "hosts": ["algo-1"]},
        {"instance_group_name": "train", "instance_type": "ml.p4d.24xlarge",
         "hosts": ["algo-3", "algo-2"]},
    ],
}  # fmt: skip
HPS = {
    "sagemaker_program": '"train.py"',
    "sagemaker_torch_distributed_enabled": "true",
    "sagemaker_distribution_instance_groups": '["train"]',
}

SCRIPT = """
import json, os, sys, time
out = os.environ["SM_OUTPUT_DATA_DIR"]
host = os.environ["SM_CURRENT_HOST"]
if os.environ.get("WAIT_FOR_STOP"):  # every process: wait for SIGTERM, say so, exit 0
    import signal
    me = f"{host}-{os.environ.get('RANK', 'plain')}"
    def stopped(*_):
        open(os.path.join(out, f"stopped-{me}"), "w").close()
        os._exit(0)
    signal.signal(signal.SIGTERM, stopped)
    open(os.path.join(out, f"started-{me}"), "w").close()
    while True:
        time.sleep(0.1)
if "RANK" not in os.environ:  # the plain process of a host outside the distribution
    with open(os.path.join(out, "plain.txt"), "a") as f:
        f.write(host + " " + os.environ["SM_TRAINING_ENV"] + "\\n")
    if os.environ.get("FAIL_PLAIN"):
        raise RuntimeError("bad shard on " + host)
    sys.exit(0)
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([1.0])
dist.all_reduce(t)
with open(os.path.join(out, f"rank-{dist.get_rank()}.json"), "w") as f:
    json.dump({"host": host, "world": dist.get_world_size(), "sum": t.item()}, f)
if os.environ.get("FAIL_PLAIN"):
    while True:  # trains until the failure elsewhere stops it
        time.sleep(0.1)
dist.destroy_process_group()
"""


DECORATED = """
import json, os
import torch, torch.distributed as dist
import smdist

@smdist.main
def train(ctx):
    seen = {"in_world": ctx.in_world, "rank": ctx.rank, "world": ctx.world_size,
            "is_master": ctx.is_master, "group": dist.is_initialized()}
    if ctx.in_world:
        t = torch.tensor([1.0])
        dist.all_reduce(t)
        seen["sum"] = t.item()
    seen["saved"] = ctx.save({"w": 1}, "model.pt") is not None
    with open(os.path.join(ctx.output_data_dir, "ctx.json"), "w") as f:
        json.dump(seen, f)

train()
"""


def _job(
    tmp_path: Path, script: str = SCRIPT, **extra_env: str
) -> dict[str, subprocess.Popen[str]]:
    port = free_port()
    addresses = ",".join(f"{h}=127.0.0.1" for h in HOSTS)
    agents = {}
    for host in HOSTS:
        root = make_tree(tmp_path / host, host, HOSTS, hyperparameters=HPS, resource_extra={
            **RESOURCE, "current_group_name": "data" if host == "algo-1" else "train"})  # fmt: skip
        (root / "code").mkdir()
        (root / "code" / "train.py").write_text(script)
        agents[host] = start(
            ["--opt-ml", str(root), "--rdzv-port", str(port), "--host-addresses", addresses,
             "--heartbeat-timeout", "60", str(root / "code" / "train.py")],
            **extra_env,
        )  # fmt: skip
    return agents


def test_only_the_distribution_groups_form_the_world(tmp_path: Path) -> None:
    agents = _job(tmp_path)
    logs = {}
    for host, agent in agents.items():
        _, logs[host] = agent.communicate(timeout=180)
        assert agent.returncode == 0, f"{host}: {logs[host]}"
    ranks = {}
    for host in ("algo-2", "algo-3"):
        for f in (tmp_path / host / "output" / "data").glob("rank-*.json"):
            ranks[int(f.stem.split("-")[1])] = json.loads(f.read_text())
    assert ranks == {
        0: {"host": "algo-2", "world": 2, "sum": 2.0},  # master: first distribution host
        1: {"host": "algo-3", "world": 2, "sum": 2.0},
    }
    plain = (tmp_path / "algo-1" / "output" / "data" / "plain.txt").read_text().splitlines()
    assert len(plain) == 1 and plain[0].startswith("algo-1 ")  # ran once
    training_env = json.loads(plain[0].split(" ", 1)[1])
    assert training_env["distribution_hosts"] == ["algo-3", "algo-2"]  # the toolkit's value
    assert not (tmp_path / "algo-1" / "output" / "data" / "rank-0.json").exists()
    assert "rank map: algo-2: node rank 0, ranks 0 (master)" in logs["algo-1"]
    assert "rank map: algo-1: outside the distribution" in logs["algo-1"]
    assert "processes per host: 1 plain process (outside the distribution" in logs["algo-1"]
    for host in HOSTS:
        assert (tmp_path / host / "output" / "success").is_file()


def test_a_failure_on_the_plain_host_stops_the_job(tmp_path: Path) -> None:
    agents = _job(tmp_path, FAIL_PLAIN="1")
    for host, agent in agents.items():
        _, err = agent.communicate(timeout=180)
        assert agent.returncode != 0, f"{host}: {err}"
        first = (tmp_path / host / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("UserScriptError: RuntimeError: bad shard on algo-1"), first
        assert "host algo-1" in first


def test_a_stop_reaches_the_plain_host(tmp_path: Path) -> None:
    agents = _job(tmp_path, WAIT_FOR_STOP="1")
    data = {h: tmp_path / h / "output" / "data" for h in HOSTS}
    started = [data["algo-1"] / "started-algo-1-plain", data["algo-2"] / "started-algo-2-0",
               data["algo-3"] / "started-algo-3-1"]  # fmt: skip
    wait_for(lambda: all(p.exists() for p in started), 120, "every process to start")
    agents["algo-3"].send_signal(signal.SIGTERM)  # StopTrainingJob reaches any one host first
    for host, agent in agents.items():
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, f"{host}: {err}"
    assert (data["algo-1"] / "stopped-algo-1-plain").exists()


def test_the_decorator_on_the_plain_host_is_outside_the_world(tmp_path: Path) -> None:
    """``@smdist.main`` on a host outside the distribution: no process group, not the master,
    numbered after the world's ranks, so the model is saved by the world's rank 0 alone."""
    agents = _job(tmp_path, DECORATED)
    for host, agent in agents.items():
        _, err = agent.communicate(timeout=180)
        assert agent.returncode == 0, f"{host}: {err}"
    seen = {
        h: json.loads((tmp_path / h / "output" / "data" / "ctx.json").read_text()) for h in HOSTS
    }
    assert seen["algo-1"] == {"in_world": False, "rank": 2, "world": 2, "is_master": False,
                              "group": False, "saved": False}  # fmt: skip
    assert seen["algo-2"] == {"in_world": True, "rank": 0, "world": 2, "is_master": True,
                              "group": True, "sum": 2.0, "saved": True}  # fmt: skip
    assert seen["algo-3"]["rank"] == 1 and seen["algo-3"]["saved"] is False
    models = [h for h in HOSTS if (tmp_path / h / "model" / "model.pt").exists()]
    assert models == ["algo-2"]
