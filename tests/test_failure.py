"""Failure diagnosis end to end: real workers through the bootstrap, real signals, real
mounts and cgroups; the failure file and JSON report a user reads afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smdist.agent.report.failure import WorkerFailure
from smdist.agent.report.memory import MemoryStats, memory_snapshot
from smdist.agent.report.write import REPORT_NAME, Diagnosis, clear_failure_files, report
from smdist.config import Paths
from smdist.contract import FAILURE_FILE_LIMIT
from smdist.errors import HostResolutionFailed

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD = 60


class Worker:
    """A worker started as the agent starts it: ``python -m smdist.worker.bootstrap SCRIPT``."""

    def __init__(
        self,
        workdir: Path,
        script: str,
        *,
        host: str = "algo-2",
        rank: int = 5,
        local_rank: int = 1,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        bootstrap: bool = True,
        name: str = "train.py",
    ) -> None:
        self.host, self.rank, self.local_rank = host, rank, local_rank
        self.script = workdir / name
        self.script.write_text(textwrap.dedent(script))
        errors = workdir / "errors"
        errors.mkdir(exist_ok=True)
        errors.chmod(0o777)  # a worker that drops to nobody still records its error
        self.error_file = errors / f"{host}-{rank}.json"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "SM_CURRENT_HOST": host,
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        if bootstrap:
            full_env["SMDIST_ERROR_FILE"] = str(self.error_file)
            cmd = [sys.executable, "-m", "smdist.worker.bootstrap", name]
        else:
            cmd = [sys.executable, name]
        self.proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )

    def wait_for_line(self, expected: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == expected, f"worker said {line!r}"

    def finish(self, *, peer_stopped: bool = False) -> WorkerFailure:
        _, err = self.proc.communicate(timeout=HANG_GUARD)
        assert self.proc.returncode != 0, f"worker succeeded; stderr: {err}"
        return WorkerFailure(
            host=self.host,
            rank=self.rank,
            local_rank=self.local_rank,
            returncode=self.proc.returncode,
            time=time.time(),
            error_file=self.error_file,
            stderr_tail=tuple(err.splitlines()[-50:]),  # what the agent keeps
            peer_stopped=peer_stopped,
        )


@pytest.fixture
def opt_ml(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "opt_ml")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "code"
    d.mkdir()
    return d


def run_one(workdir: Path, script: str, **kwargs: Any) -> WorkerFailure:
    return Worker(workdir, script, **kwargs).finish()


def check_file(paths: Paths, d: Diagnosis, category: str, host: str, rank: int, exit_: int) -> str:
    """The failure file as SageMaker shows it: whole, headline first, right host and rank."""
    text = paths.failure_file.read_text()
    assert text == d.text
    assert len(text) <= FAILURE_FILE_LIMIT
    first = text.splitlines()[0]
    assert first.startswith(f"{category}: "), text
    assert first.endswith(f"(host {host}, rank {rank}, exit {exit_})"), text
    assert d.category == category and d.exit_code == exit_
    return text


def report_json(paths: Paths) -> dict[str, Any]:
    data = json.loads((paths.output_data_dir / REPORT_NAME).read_text())
    assert isinstance(data, dict)
    return data


# --- the seed's three examples ---------------------------------------------------------

BAD_DATA = """\
import os

def load_data(data_path):
    with open(data_path, "r") as f:
        lines = f.readlines()
    first_value = int(lines[0])
    return first_value

if __name__ == "__main__":
    data = load_data(os.environ["SM_CHANNEL_TRAINING"] + "/mydata.txt")
"""


def test_value_error_on_bad_data(workdir: Path, opt_ml: Paths) -> None:
    (workdir / "mydata.txt").write_text("not-a-number\n")
    f = run_one(workdir, BAD_DATA, env={"SM_CHANNEL_TRAINING": str(workdir)})
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "UserScriptError", "algo-2", 5, 1)
    first = text.splitlines()[0]
    assert "ValueError: invalid literal for int()" in first
    assert "at train.py:6" in first  # the innermost frame in user code, not runpy/smdist
    assert "train.py:6 in load_data: first_value = int(lines[0])" in text
    assert "bootstrap" not in text and "runpy" not in text


def test_missing_library_names_module_and_import_line(workdir: Path, opt_ml: Paths) -> None:
    script = """\
    import os
    import some_missing_library  # not in the image

    model = some_missing_library.MyModel()
    """
    f = run_one(workdir, script, host="algo-1", rank=0, local_rank=0)
    d = report(opt_ml, [f], current_host="algo-1")
    text = check_file(opt_ml, d, "MissingDependency", "algo-1", 0, 1)
    first = text.splitlines()[0]
    assert "'some_missing_library'" in first and "train.py:2" in first
    assert "requirements.txt" in text


def test_missing_library_imported_by_a_local_module(workdir: Path, opt_ml: Paths) -> None:
    (workdir / "model.py").write_text("import json\nimport cv2\n")
    f = run_one(workdir, "import model\n")
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "MissingDependency", "algo-2", 5, 1)
    assert "model.py:2" in text.splitlines()[0]
    assert "train.py:1 in <module>: import model" in text
    assert "opencv-python" in text  # the pip name, not the module name


def test_import_typo_in_local_code_is_a_script_error(workdir: Path, opt_ml: Paths) -> None:
    (workdir / "model.py").write_text("class Net:\n    pass\n")
    f = run_one(workdir, "import json\nfrom model import Nett\n")
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "UserScriptError", "algo-2", 5, 1)
    assert "cannot import name 'Nett' from 'model'" in text.splitlines()[0]


def test_missing_native_library(workdir: Path, opt_ml: Paths) -> None:
    script = """\
    import ctypes
    cudnn = ctypes.CDLL("libsmdist_absent.so.8")  # as libraries load CUDA's .so files
    """
    f = run_one(workdir, script)
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "MissingDependency", "algo-2", 5, 1)
    first = text.splitlines()[0]
    assert "native library libsmdist_absent.so.8 is missing at train.py:2" in first
    assert "system package" in text


def test_memory_error_under_a_memory_limit(workdir: Path, opt_ml: Paths) -> None:
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    (workdir / "large_data.csv").write_text("1,2,3\n" * 1000)
    script = """\
    def load_large_data(path):
        with open(path) as f:
            text = f.read()
        return text * (1 << 24)  # 96 GB: the whole data set in RAM

    data = load_large_data("large_data.csv")
    """
    f = run_one(workdir, script, preexec_fn=limit_memory)
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "OutOfMemory", "algo-2", 5, 1)
    assert "MemoryError" in text.splitlines()[0] and "train.py:4" in text.splitlines()[0]
    assert "chunks" in text


# --- the environment refusing ----------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the user nobody can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="smdist-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_permission_denied_names_path_and_user(shared_dir: Path, opt_ml: Paths) -> None:
    locked = shared_dir / "model"
    locked.mkdir(mode=0o755)  # owned by root
    # The interpreter lives under /root (0700) here, so the script drops to nobody itself
    # once started, as a container whose USER is not root would run it.
    script = f"""\
    import os
    os.setgid(65534)
    os.setuid(65534)
    with open("{locked}/model.pt", "wb") as f:
        f.write(b"weights")
    """
    f = run_one(shared_dir, script)
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "PermissionDenied", "algo-2", 5, 1)
    first = text.splitlines()[0]
    assert f"{locked}/model.pt" in first and "nobody" in first and "train.py:4" in first


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_filesystem_is_permission_denied(workdir: Path, opt_ml: Paths) -> None:
    with tmpfs(workdir / "ro", "ro,size=64k") as ro:
        f = run_one(workdir, f'open("{ro}/out.txt", "w")\n')
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "PermissionDenied", "algo-2", 5, 1)
    assert "read-only file system" in text.splitlines()[0]


def test_disk_full_names_the_file_and_the_filesystem(workdir: Path, opt_ml: Paths) -> None:
    with tmpfs(workdir / "small", "size=64k") as small:
        script = f"""\
        def save(path):
            with open(path, "wb") as f:
                f.write(b"x" * (1 << 20))

        save("{small}/checkpoint.bin")
        """
        f = run_one(workdir, script)
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "DiskFull", "algo-2", 5, 1)
    assert f"{small}/checkpoint.bin" in text.splitlines()[0]
    assert re.search(rf"Filesystem {small}: 64\.0 KiB total", text), text
    assert "VolumeSizeInGB" in text


# --- signals ---------------------------------------------------------------------------


def test_segfault_is_killed_with_the_python_line(workdir: Path, opt_ml: Paths) -> None:
    script = """\
    import ctypes, threading

    def parse(buf):
        return ctypes.string_at(0)  # a native crash, in a loader thread

    t = threading.Thread(target=parse, args=(None,))
    t.start()
    t.join()
    """
    f = run_one(workdir, script)
    assert f.returncode == -signal.SIGSEGV
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "Killed", "algo-2", 5, 139)
    assert "SIGSEGV" in text.splitlines()[0]
    assert "train.py:4" in text.splitlines()[0]  # from faulthandler's dump in stderr


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A child memory cgroup of 64 MiB, so an OOM kill stays inside the test."""
    name = f"smdist-test-{os.getpid()}-{time.monotonic_ns()}"
    v2 = Path("/sys/fs/cgroup")
    v1 = v2 / "memory"
    if (v2 / "cgroup.controllers").is_file():
        d, limit_file = v2 / name, "memory.max"
    elif (v1 / "memory.oom_control").is_file():
        d, limit_file = v1 / name, "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup controller mounted at /sys/fs/cgroup")
    try:
        d.mkdir()
        (d / limit_file).write_text(str(64 << 20))
        if (d / "memory.swap.max").exists():
            (d / "memory.swap.max").write_text("0")
    except OSError as exc:
        with contextlib.suppress(OSError):
            d.rmdir()
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    try:
        yield d
    finally:
        for _ in range(100):  # the kernel releases the cgroup shortly after its last task
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def test_sigkill_with_an_oom_kill_recorded_is_out_of_memory(
    workdir: Path, opt_ml: Paths, memory_cgroup: Path
) -> None:
    start = memory_snapshot(memory_cgroup)
    assert start.oom_kill == 0

    def join_cgroup() -> None:
        (memory_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    script = """\
    chunks = []
    while True:
        chunks.append(b"x" * (8 << 20))  # touched pages: charged to the cgroup
    """
    try:
        f = run_one(workdir, script, preexec_fn=join_cgroup)
    except subprocess.SubprocessError as exc:  # e.g. cgroup v2 refusing a process there
        pytest.skip(f"cannot move a process into {memory_cgroup}: {exc}")
    if f.returncode != -signal.SIGKILL:
        pytest.skip(f"the kernel did not OOM-kill the worker (returncode {f.returncode})")
    d = report(opt_ml, [f], current_host="algo-2", memory_at_start=start)
    text = check_file(opt_ml, d, "OutOfMemory", "algo-2", 5, 137)
    assert "SIGKILL" in text.splitlines()[0] and "OOM kill" in text.splitlines()[0]
    assert "limit 64.0 MiB" in text
    assert report_json(opt_ml)["memory"]["oom_kills_during_job"] == 1


def test_sigkill_without_oom_is_killed(workdir: Path, opt_ml: Paths) -> None:
    start = memory_snapshot()
    w = Worker(workdir, "import time\nprint('ready')\ntime.sleep(60)\n", host="algo-1", rank=2)
    w.wait_for_line("ready")
    w.proc.kill()
    f = w.finish()
    # The container's counter: an OOM kill elsewhere during this test would make it flaky.
    if (memory_snapshot().oom_kill or 0) != (start.oom_kill or 0):
        pytest.skip("the container's memory cgroup recorded an OOM kill during the test")
    d = report(opt_ml, [f], current_host="algo-1", memory_at_start=start)
    text = check_file(opt_ml, d, "Killed", "algo-1", 2, 137)
    assert "SIGKILL" in text.splitlines()[0]


def test_stack_dump_signal_prints_the_stack(workdir: Path) -> None:
    script = """\
    import time
    def train_step():
        print("ready", flush=True)
        time.sleep(60)
    train_step()
    """
    w = Worker(workdir, script)
    w.wait_for_line("ready")
    w.proc.send_signal(signal.SIGUSR1)  # what the agent does before killing a hung worker
    assert w.proc.stderr is not None
    seen = []
    for line in w.proc.stderr:  # the hang guard is pytest's timeout
        seen.append(line)
        # line 3 or 4: the signal may land while print() is still returning
        if re.search(r'train\.py", line [34] in train_step', line):
            break
    else:
        pytest.fail(f"no stack dump on stderr: {seen}")
    assert "most recent call first" in seen[0], seen
    w.proc.kill()
    w.proc.wait(timeout=HANG_GUARD)


# --- several ranks ---------------------------------------------------------------------


def test_failure_on_a_non_master_rank_among_four(tmp_path: Path, opt_ml: Paths) -> None:
    """Like --simulate 2x2: rank 3 on algo-2 fails, the other three are stopped as peers."""
    waiting = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    peers = []
    for rank, host in [(0, "algo-1"), (1, "algo-1"), (2, "algo-2")]:
        d = tmp_path / f"w{rank}"
        d.mkdir()
        peers.append(Worker(d, waiting, host=host, rank=rank, local_rank=rank % 2))
    for p in peers:
        p.wait_for_line("ready")
    d3 = tmp_path / "w3"
    d3.mkdir()
    (d3 / "mydata.txt").write_text("abc\n")
    root = run_one(d3, BAD_DATA, host="algo-2", rank=3, env={"SM_CHANNEL_TRAINING": str(d3)})
    for p in peers:
        p.proc.terminate()
    victims = [p.finish(peer_stopped=True) for p in peers]

    d = report(opt_ml, [*victims, root], current_host="algo-2", extra={"job": "2x2"})
    text = check_file(opt_ml, d, "UserScriptError", "algo-2", 3, 1)
    assert "3 other ranks stopped" in text
    data = report_json(opt_ml)
    assert sorted(f["rank"] for f in data["failures"]) == [0, 1, 2, 3]
    by_rank = {f["rank"]: f for f in data["failures"]}
    assert [by_rank[r]["category"] for r in range(4)] == ["PeerFailure"] * 3 + ["UserScriptError"]
    assert "ValueError" in by_rank[3]["error"]["traceback"]
    assert data["root_cause"]["rank"] == 3 and data["extra"] == {"job": "2x2"}


def test_a_peers_connection_error_is_not_the_root_cause(tmp_path: Path, opt_ml: Paths) -> None:
    """Rank 0 sees the collective break and dies first; rank 1's own error is the cause."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    victim = run_one(
        tmp_path / "a",
        'raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")\n',
        host="algo-1",
        rank=0,
    )
    cause = run_one(tmp_path / "b", "x = {}\nx['labels']\n", host="algo-2", rank=1)
    d = report(opt_ml, [victim, cause], current_host="algo-1")
    text = check_file(opt_ml, d, "UserScriptError", "algo-2", 1, 1)
    assert "KeyError: 'labels'" in text.splitlines()[0]
    assert "rank 0 on algo-1" in text  # still mentioned, below


def test_only_peer_stopped_workers_name_no_false_cause(workdir: Path, opt_ml: Paths) -> None:
    """With a root cause from another host, that host's failure heads this host's file."""
    w = Worker(workdir, "import time\nprint('ready', flush=True)\ntime.sleep(60)\n", rank=4)
    w.wait_for_line("ready")
    w.proc.terminate()
    local = w.finish(peer_stopped=True)
    other = tmp = workdir / "other"
    tmp.mkdir()
    remote = run_one(other, "import some_missing_library\n", host="algo-3", rank=9)
    # It travels through the store as JSON, with its error record inlined.
    remote = WorkerFailure.from_dict(json.loads(json.dumps(remote.to_dict())))
    d = report(opt_ml, [local], current_host="algo-2", root_cause=remote)
    check_file(opt_ml, d, "MissingDependency", "algo-3", 9, 1)


# --- what the user wrote ---------------------------------------------------------------


def test_smdist_fail_keeps_the_users_reason(workdir: Path, opt_ml: Paths) -> None:
    script = """\
    import smdist
    smdist.fail("channel 'train' is empty: upload data to s3://bucket/train", 3)
    """
    env = {"SM_OUTPUT_DIR": str(opt_ml.output_dir)}
    f = run_one(workdir, script, env=env)
    assert f.returncode == 3
    user_text = "channel 'train' is empty: upload data to s3://bucket/train"
    assert opt_ml.failure_file.read_text() == user_text
    d = report(opt_ml, [f], current_host="algo-2")
    assert opt_ml.failure_file.read_text() == user_text  # the agent keeps it
    assert not d.failure_file_written and d.user_failure_text == user_text
    assert d.exit_code == 3 and "train.py:2" in d.headline
    data = report_json(opt_ml)
    assert data["user_failure_file"] == user_text and data["failures"][0]["rank"] == 5


def test_smdist_fail_first_rank_wins(tmp_path: Path, opt_ml: Paths) -> None:
    env = {"SM_OUTPUT_DIR": str(opt_ml.output_dir)}
    for rank, reason in [(0, "rank 0: labels missing"), (1, "rank 1: labels missing")]:
        d = tmp_path / f"w{rank}"
        d.mkdir()
        run_one(d, f"import smdist\nsmdist.fail({reason!r})\n", rank=rank, env=env)
    assert opt_ml.failure_file.read_text() == "rank 0: labels missing"


def test_sys_exit_message_is_recorded(workdir: Path, opt_ml: Paths) -> None:
    f = run_one(workdir, "import sys\nsys.exit('no GPUs found, refusing to train on CPU')\n")
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "UserScriptError", "algo-2", 5, 1)
    assert "no GPUs found, refusing to train on CPU" in text.splitlines()[0]


def test_without_error_file_the_stderr_traceback_is_used(workdir: Path, opt_ml: Paths) -> None:
    """A worker not started through the bootstrap (or whose disk was full): stderr decides."""
    f = run_one(workdir, "import os\nimport some_missing_library\n", bootstrap=False)
    assert not f.error_file or not f.error_file.exists()
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "MissingDependency", "algo-2", 5, 1)
    assert "some_missing_library" in text.splitlines()[0] and "train.py:2" in text


def test_huge_message_and_deep_stack_fit_in_1024(workdir: Path, opt_ml: Paths) -> None:
    script = """\
    def walk(n):
        if n == 0:
            raise ValueError("ligne invalide: " + "é" * 5000)
        return walk(n - 1)
    walk(500)
    """
    f = run_one(workdir, script)
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "UserScriptError", "algo-2", 5, 1)
    assert "train.py:3 in walk" in text
    assert len(opt_ml.failure_file.read_bytes()) <= FAILURE_FILE_LIMIT  # bytes, too


def test_cuda_out_of_memory_message_is_out_of_memory(workdir: Path, opt_ml: Paths) -> None:
    # No GPU here: the exception mimics torch.OutOfMemoryError's type name and message.
    script = """\
    class OutOfMemoryError(RuntimeError):
        pass
    raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")
    """
    f = run_one(workdir, script)
    d = report(opt_ml, [f], current_host="algo-2")
    text = check_file(opt_ml, d, "OutOfMemory", "algo-2", 5, 1)
    assert "CUDA out of memory" in text.splitlines()[0] and "batch size" in text


def test_stale_files_are_cleared_and_user_files_survive(workdir: Path, opt_ml: Paths) -> None:
    opt_ml.output_data_dir.mkdir(parents=True)
    opt_ml.failure_file.write_text("UserScriptError: from yesterday's run")
    (opt_ml.output_data_dir / REPORT_NAME).write_text("{}")
    clear_failure_files(opt_ml)  # the agent, at start
    assert not opt_ml.failure_file.exists()
    assert not (opt_ml.output_data_dir / REPORT_NAME).exists()
    f = run_one(workdir, "raise KeyError('x')\n")
    assert report(opt_ml, [f], current_host="algo-2").failure_file_written


def test_smdist_stage_error_heads_the_file(opt_ml: Paths) -> None:
    err = HostResolutionFailed("algo-2 did not resolve in 300 s (NXDOMAIN)")
    d = report(opt_ml, [], current_host="algo-1", smdist_error=err)
    first = opt_ml.failure_file.read_text().splitlines()[0]
    assert first == "HostResolutionFailed: algo-2 did not resolve in 300 s (NXDOMAIN) (host algo-1)"
    assert d.exit_code == 1 and report_json(opt_ml)["smdist_error"]["category"] == d.category


def test_memory_snapshot_reads_this_container() -> None:
    stats = memory_snapshot()
    if stats.cgroup_dir is None:
        pytest.skip("no memory cgroup visible")
    assert isinstance(stats, MemoryStats) and stats.version in (1, 2)
    assert stats.oom_kill is None or stats.oom_kill >= 0
