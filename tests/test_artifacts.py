"""Rank-aware, atomic writes to the model and checkpoint dirs, and the model dir clash check,
with real worker processes (each with its own RANK/LOCAL_RANK) and real signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import smdist
from smdist.agent.model_dir import (
    ModelDirClash,
    check_clashes,
    decode_inventory,
    encode_inventory,
    find_clashes,
    inventory,
    remove_temp_files,
)
from smdist.worker import artifacts
from smdist.worker.artifacts import ArtifactError, Artifacts

REPO = Path(smdist.__file__).resolve().parents[1]
IDENTITY_VARS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "SM_CURRENT_HOST",
    "SM_MODEL_DIR",
    "SMDIST_CHECKPOINT_DIR",
    "SMDIST_OPT_ML",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "MPI_LOCALRANKID",
}


def worker_env(root: Path, **identity: str) -> dict[str, str]:
    """The environment the agent gives a worker: who it is, and where /opt/ml is."""
    env = {k: v for k, v in os.environ.items() if k not in IDENTITY_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["SMDIST_OPT_ML"] = str(root)
    env.update(identity)
    return env


def all_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def arts(root: Path, rank: int, local_rank: int, host: str) -> Artifacts:
    return Artifacts.from_env(
        {
            "SMDIST_OPT_ML": str(root),
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "SM_CURRENT_HOST": host,
        }
    )


CONCURRENT_WORKER = r"""
import json, os, sys
from pathlib import Path
from smdist.worker import artifacts

rank = int(os.environ["RANK"])
payload = f"rank {rank} ".encode() * 200_000  # ~1.5 MB: a write takes a while
sys.stdin.read(1)  # the go signal: all four write at the same moment
with artifacts.open_model_file("model.bin") as f:
    f.write(payload)
with artifacts.open_model_file("host.txt", "w", scope="host") as f:
    f.write(f"written by rank {rank}\n")
with artifacts.open_model_file("metrics.json", "w", scope="rank") as f:
    json.dump({"rank": rank}, f)
# Four writers on one path: the survivor must be one whole payload, never a mix.
with artifacts.atomic_open(Path(os.environ["SM_MODEL_DIR"]) / "shared" / "same.bin") as f:
    f.write(payload)
print(json.dumps({s: str(artifacts.model_path("x", s)) for s in ("leader", "host", "rank")}))
"""


def test_four_concurrent_ranks_leave_one_leader_file_and_per_host_per_rank_dirs(
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "model"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WORKER],
            env=worker_env(
                tmp_path,
                RANK=str(rank),
                LOCAL_RANK=str(rank % 2),
                WORLD_SIZE="4",
                SM_CURRENT_HOST=f"algo-{rank // 2 + 1}",
                SM_MODEL_DIR=str(model_dir),
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("g")
        p.stdin.close()
    reports = []
    for p in procs:
        assert p.stdout is not None
        out = p.stdout.read()
        assert p.wait(timeout=60) == 0
        reports.append(json.loads(out))

    assert all_files(model_dir) == {
        "model.bin",
        "algo-1/host.txt",
        "algo-2/host.txt",
        "rank-0/metrics.json",
        "rank-1/metrics.json",
        "rank-2/metrics.json",
        "rank-3/metrics.json",
        "shared/same.bin",
    }
    assert (model_dir / "model.bin").read_bytes() == b"rank 0 " * 200_000
    assert (model_dir / "algo-1" / "host.txt").read_text() == "written by rank 0\n"
    assert (model_dir / "algo-2" / "host.txt").read_text() == "written by rank 2\n"
    for rank in range(4):
        assert json.loads((model_dir / f"rank-{rank}" / "metrics.json").read_text()) == {
            "rank": rank
        }
    same = (model_dir / "shared" / "same.bin").read_bytes()
    assert same in {f"rank {r} ".encode() * 200_000 for r in range(4)}
    # model_path says who writes: None for the ranks that do not.
    assert [r["leader"] for r in reports] == [str(model_dir / "x"), "None", "None", "None"]
    assert [r["host"] for r in reports] == [
        str(model_dir / "algo-1" / "x"),
        "None",
        str(model_dir / "algo-2" / "x"),
        "None",
    ]
    assert [r["rank"] for r in reports] == [str(model_dir / f"rank-{n}" / "x") for n in range(4)]


KILLED_WORKER = r"""
import sys
from smdist.worker import artifacts

with artifacts.open_model_file("model.bin") as f:
    f.write(b"v1" * 100_000)
with artifacts.open_model_file("model.bin") as old, artifacts.open_model_file("new.bin") as new:
    old.write(b"v2" * 100_000)
    new.write(b"n" * 100_000)
    old.flush()
    new.flush()
    print("mid-write", flush=True)
    sys.stdin.read()  # until killed
"""


def test_a_writer_killed_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER],
        env=worker_env(tmp_path, RANK="0", LOCAL_RANK="0"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "mid-write\n"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    model_dir = tmp_path / "model"
    # The previous complete version survives; the new file never appears.
    assert (model_dir / "model.bin").read_bytes() == b"v1" * 100_000
    assert not (model_dir / "new.bin").exists()
    v1 = hashlib.sha256(b"v1" * 100_000).hexdigest()
    # The clash check ignores the abandoned temp files; the agent sweeps them before tar.
    assert inventory(model_dir) == {"model.bin": (200_000, v1)}
    assert len(remove_temp_files(model_dir)) == 2
    assert all_files(model_dir) == {"model.bin"}


def test_an_exception_inside_the_block_writes_nothing(tmp_path: Path) -> None:
    a = arts(tmp_path, 0, 0, "algo-1")
    with a.open_model_file("config.json", "w") as f:
        f.write('{"layers": 2}')
    with pytest.raises(RuntimeError), a.open_model_file("config.json", "w") as f:
        f.write('{"lay')
        raise RuntimeError("boom")
    assert all_files(a.model_dir) == {"config.json"}
    assert (a.model_dir / "config.json").read_text() == '{"layers": 2}'


def test_non_writers_get_a_discarding_writer_and_nothing_on_disk(tmp_path: Path) -> None:
    a = arts(tmp_path, 3, 1, "algo-2")
    with a.open_model_file("model.bin") as f:
        assert f.write(b"ignored") == 7
    with a.open_model_file("notes.txt", "w", scope="host") as f:
        f.write("ignored")
    assert a.model_path("model.bin") is None
    assert a.save_checkpoint({"x": 1}, step=1) is None
    assert not (tmp_path / "model").exists()
    assert not (tmp_path / "checkpoints").exists()
    # Its own rank dir is its to write.
    assert a.model_path("log.txt", "rank") == tmp_path / "model" / "rank-3" / "log.txt"


def test_save_writes_a_torch_object_that_loads_back(tmp_path: Path) -> None:
    import torch

    state = {"weight": torch.arange(6.0).reshape(2, 3), "step": 7}
    leader = arts(tmp_path, 0, 0, "algo-1")
    path = leader.save(state, "model.pt")
    assert path == tmp_path / "model" / "model.pt"
    loaded = torch.load(path)
    assert torch.equal(loaded["weight"], state["weight"]) and loaded["step"] == 7
    assert arts(tmp_path, 1, 1, "algo-1").save(state, "model.pt") is None
    assert all_files(tmp_path / "model") == {"model.pt"}


def test_checkpoint_dir_follows_the_environment(tmp_path: Path) -> None:
    env = {"SMDIST_OPT_ML": str(tmp_path), "RANK": "0", "LOCAL_RANK": "0"}
    assert Artifacts.from_env(env).checkpoint_dir == tmp_path / "checkpoints"
    env["SMDIST_CHECKPOINT_DIR"] = str(tmp_path / "ckpt")
    env["SM_MODEL_DIR"] = str(tmp_path / "m")
    a = Artifacts.from_env(env)
    assert a.checkpoint_path("c.pt", step=5) == tmp_path / "ckpt" / "c.step-000000005.pt"
    assert a.model_path("w.pt") == tmp_path / "m" / "w.pt"


def test_latest_checkpoint_after_several_saves(tmp_path: Path) -> None:
    import torch

    leader = arts(tmp_path, 0, 0, "algo-1")
    other = arts(tmp_path, 1, 1, "algo-1")
    assert leader.latest_checkpoint() is None
    leader.save_checkpoint({"step": 0}, "checkpoint.pt")  # no step: older than any step
    assert leader.latest_checkpoint() == tmp_path / "checkpoints" / "checkpoint.pt"
    for step in (1, 9, 10, 100):  # 100 sorts before 9 as text: the step number decides
        leader.save_checkpoint({"step": step}, "checkpoint.pt", step=step)
    latest = leader.latest_checkpoint()
    assert latest is not None and torch.load(latest) == {"step": 100}
    # Every rank resumes from the leader's checkpoint.
    assert other.latest_checkpoint() == latest == leader.latest_checkpoint("checkpoint.pt")

    leader.save_checkpoint({"step": 101}, "checkpoint.pt", step=101, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.step-*")) == [
        "checkpoint.step-000000100.pt",
        "checkpoint.step-000000101.pt",
    ]
    # Two names at the top step: say so rather than guess.
    leader.save_checkpoint({"opt": 1}, "optimizer.pt", step=101)
    with pytest.raises(ArtifactError, match=r"several checkpoints at step 101.*pass name="):
        leader.latest_checkpoint()
    assert leader.latest_checkpoint("optimizer.pt") == (
        tmp_path / "checkpoints" / "optimizer.step-000000101.pt"
    )
    # Rank scope: each rank resumes from its own.
    other.save_checkpoint({"rng": 1}, "rng.pt", step=3, scope="rank")
    assert other.latest_checkpoint(scope="rank") == (
        tmp_path / "checkpoints" / "rank-1" / "rng.step-000000003.pt"
    )
    assert leader.latest_checkpoint(scope="rank") is None


STOPPABLE_WORKER = r"""
import signal, sys
import torch
from smdist.worker import artifacts

stopping = False
def on_sigterm(signum, frame):  # what the SIGTERM stop hook does: finish the step, save
    global stopping
    stopping = True
signal.signal(signal.SIGTERM, on_sigterm)

latest = artifacts.latest_checkpoint()
step = torch.load(latest)["step"] if latest is not None else 0
print(f"resumed at {step}", flush=True)
while True:
    step += 1
    if step % 50 == 0:
        artifacts.save_checkpoint({"step": step}, step=step, keep=2)
    print(f"step {step}", flush=True)
    if stopping:
        artifacts.save_checkpoint({"step": step}, step=step, keep=2)
        print(f"stopped at {step}", flush=True)
        sys.exit(0)
"""


def test_a_job_stopped_by_sigterm_resumes_where_it_was(tmp_path: Path) -> None:
    env = worker_env(tmp_path, RANK="0", LOCAL_RANK="0")

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", STOPPABLE_WORKER], env=env, stdout=subprocess.PIPE, text=True
        )

    first = start()
    assert first.stdout is not None
    try:
        assert first.stdout.readline() == "resumed at 0\n"
        while first.stdout.readline() != "step 3\n":
            pass
        first.send_signal(signal.SIGTERM)
        rest = first.stdout.read().splitlines()
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    assert first.returncode == 0
    stopped_at = int(rest[-1].removeprefix("stopped at "))
    assert stopped_at >= 3

    second = start()
    assert second.stdout is not None
    try:
        assert second.stdout.readline() == f"resumed at {stopped_at}\n"
    finally:
        second.kill()
        second.wait(timeout=30)


def test_clash_between_two_hosts_names_the_path_and_both_hosts(tmp_path: Path) -> None:
    dirs = {host: tmp_path / host / "model" for host in ("algo-1", "algo-2")}
    for host, d in dirs.items():
        (d / "tokenizer").mkdir(parents=True)
        # Written without the API, on every host: different weights, same config.
        (d / "model.pt").write_bytes(f"weights trained on {host}".encode())
        (d / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    inventories = {
        # Through the store as the agent sends them.
        host: decode_inventory(encode_inventory(inventory(d)), host)
        for host, d in dirs.items()
    }
    failing, warnings = find_clashes(inventories)
    assert [(c.path, c.hosts) for c in failing] == [("model.pt", ("algo-1", "algo-2"))]
    assert [(c.path, c.hosts) for c in warnings] == [("tokenizer/vocab.json", ("algo-1", "algo-2"))]
    with pytest.raises(ModelDirClash) as err:
        check_clashes(inventories)
    headline = err.value.headline()
    assert headline.startswith("ModelDirClash: 1 path(s) in the model dir differ between hosts")
    assert "model.pt on hosts algo-1, algo-2 (different content)" in headline
    assert "\n" not in headline

    # Same content everywhere: a warning only, the job goes on.
    (dirs["algo-2"] / "model.pt").write_bytes(b"weights trained on algo-1")
    warnings = check_clashes({h: inventory(d) for h, d in dirs.items()})
    assert [c.path for c in warnings] == ["model.pt", "tokenizer/vocab.json"]
    assert all(c.identical for c in warnings)


def test_a_file_on_one_host_and_a_directory_on_another_clash(tmp_path: Path) -> None:
    failing, _ = find_clashes(
        {
            "algo-1": {"export": (3, "aa")},
            "algo-2": {"export/a.bin": (1, "b"), "export/b": (1, "c")},
        }
    )
    assert [str(c) for c in failing] == [
        "export on hosts algo-1, algo-2 (a file on algo-1, a directory on algo-2)"
    ]


def test_writes_through_the_api_never_clash(tmp_path: Path) -> None:
    inventories = {}
    for host, ranks in (("algo-1", (0, 1)), ("algo-2", (2, 3))):
        model_dir = tmp_path / host
        for rank in ranks:
            a = Artifacts(model_dir, tmp_path / "ck", arts(tmp_path, rank, rank % 2, host).worker)
            with a.open_model_file("model.bin") as f:
                f.write(b"final")
            with a.open_model_file("stats.txt", "w", scope="host") as f:
                f.write(host)
            with a.open_model_file("log.txt", "w", scope="rank") as f:
                f.write(str(rank))
        inventories[host] = inventory(model_dir)
    assert find_clashes(inventories) == ([], [])
    assert sorted(inventories["algo-1"]) == [
        "algo-1/stats.txt",
        "model.bin",
        "rank-0/log.txt",
        "rank-1/log.txt",
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.model_path("../up.pt"), "model name '../up.pt': expected a relative path"),
        (lambda a: a.model_path("/abs.pt"), "model name '/abs.pt': expected a relative path"),
        (lambda a: a.model_path(""), "model name '': expected a relative file name"),
        (
            lambda a: a.model_path("m.pt", "node"),
            "scope 'node': expected one of leader, host, rank",
        ),
        (lambda a: a.open_model_file("m.pt", "ab").__enter__(), "mode 'ab' for "),
        (lambda a: a.save_checkpoint({}, "c.pt", step=-1), "step=-1: expected an integer >= 0"),
        (lambda a: a.save_checkpoint({}, "c.pt", step=1, keep=0), "keep=0: expected a positive"),
    ],
)
def test_bad_arguments_get_a_one_line_error(
    tmp_path: Path, call: Callable[[Artifacts], object], message: str
) -> None:
    with pytest.raises(ArtifactError) as err:
        call(arts(tmp_path, 0, 0, "algo-1"))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_rank_variables_are_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="environment variable RANK: expected a non-negative"):
        Artifacts.from_env({"SMDIST_OPT_ML": str(tmp_path), "RANK": "two"})
    no_local = Artifacts.from_env({"SMDIST_OPT_ML": str(tmp_path), "RANK": "3"})
    with pytest.raises(ArtifactError, match='scope "host": RANK is 3 but LOCAL_RANK is not set'):
        no_local.model_path("x", "host")
    # mpirun's variables count as well.
    mpi = Artifacts.from_env(
        {
            "SMDIST_OPT_ML": str(tmp_path),
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        }
    )
    assert (mpi.worker.rank, mpi.worker.local_rank, mpi.worker.host) == (5, 1, "algo-1")


def test_module_functions_read_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in IDENTITY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SMDIST_OPT_ML", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SM_CURRENT_HOST", "algo-2")
    assert artifacts.model_path("m.pt") is None
    with artifacts.open_checkpoint_file("opt.json", "w", scope="host", step=4) as f:
        f.write("{}")
    assert artifacts.latest_checkpoint(scope="host") == (
        tmp_path / "checkpoints" / "algo-2" / "opt.step-000000004.json"
    )


def test_importing_the_worker_modules_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, smdist.worker.artifacts, smdist.worker.channels; print('torch' in sys.modules)"
    )
    env = worker_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "False\n"
