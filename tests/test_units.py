"""Pure parts: config decoding, topology, the rendezvous store (real sockets, no mocks)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from smdist import config
from smdist.agent import topology
from smdist.agent.store import StoreClient, StoreServer, StoreUnavailable
from smdist.errors import ConfigError, RendezvousFailed
from tests.helpers import free_port


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("1e3", 1000.0),
        ("true", True),
        ("[64, 32]", [64, 32]),
        ("0123", "0123"),
        ('"abc"', "abc"),
        ("abc", "abc"),
        ("3", 3),
        ('{"a": 1}', {"a": 1}),
        ("null", None),
        (5, 5),
    ],
)
def test_hyperparameters_decode_as_json_where_they_parse(raw: object, decoded: object) -> None:
    assert config.decode_hyperparameter(raw) == decoded


def test_framework_keys_are_kept_apart(tmp_path: Path) -> None:
    cfg_dir = tmp_path / "input" / "config"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "hyperparameters.json").write_text(
        json.dumps({"lr": "0.1", "sagemaker_program": '"train.py"'})
    )
    job = config.load(config.Paths(tmp_path))
    assert job.user_hyperparameters == {"lr": 0.1}
    assert job.framework_parameters == {"sagemaker_program": "train.py"}
    assert job.resource.hosts == ("algo-1",) and not job.resource.from_file
    assert job.channels == {}


def test_root_flag_beats_environment() -> None:
    assert config.resolve_root("/a", {"SMDIST_OPT_ML": "/b"}).root == Path("/a")
    assert config.resolve_root(None, {"SMDIST_OPT_ML": "/b"}).root == Path("/b")
    assert config.resolve_root(None, {}).root == Path("/opt/ml")


def test_master_is_first_in_plain_string_order() -> None:
    hosts = ["algo-2", "algo-10", "algo-1"]
    assert topology.master_host(hosts) == "algo-1"
    assert topology.sorted_hosts(hosts) == ("algo-1", "algo-10", "algo-2")
    assert topology.node_rank(hosts, "algo-2") == 2


def test_layout_ranks_are_contiguous_per_host() -> None:
    layout = topology.build_layout({"algo-2": 3, "algo-1": 2})
    assert layout.world_size == 5 and layout.master == "algo-1"
    assert list(layout.slot("algo-1").ranks) == [0, 1]
    assert list(layout.slot("algo-2").ranks) == [2, 3, 4]
    assert layout.describe() == [
        "algo-1: node rank 0, ranks 0-1 (master)",
        "algo-2: node rank 1, ranks 2-4",
    ]


@pytest.mark.parametrize(
    ("visible", "count"),
    [("0,1,2", 3), ("", 0), ("1", 1), ("0,-1,2", 1), ("GPU-abc,GPU-def", 2), (None, 2)],
)
def test_visible_gpus_honours_cuda_visible_devices(
    tmp_path: Path, visible: str | None, count: int
) -> None:
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert topology.visible_gpus(env, dev=tmp_path) == count


def test_processes_per_host() -> None:
    assert topology.processes_per_host("auto", 0) == 1
    assert topology.processes_per_host("auto", 8) == 8
    assert topology.processes_per_host("3", 8) == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ConfigError, match="--nproc-per-host"):
            topology.processes_per_host(bad, 0)


SECRET = b"unit-test-secret-0123456789"


def test_store_first_compare_set_wins_and_waits_wake_on_set() -> None:
    server = StoreServer(0, secret=SECRET)
    try:
        a = StoreClient("127.0.0.1", server.port, 5, "test", secret=SECRET)
        b = StoreClient("127.0.0.1", server.port, 5, "test", secret=SECRET)
        assert a.compare_set("abort", None, "first") == "first"
        assert b.compare_set("abort", None, "second") == "first"
        assert a.add("n", 2) == 2 and b.add("n", 3) == 5
        assert not a.wait(["later"], 0.05)
        result: list[bool] = []
        waiter = threading.Thread(
            target=lambda: result.append(a.wait(["x", "later"], 30, all_keys=False))
        )
        waiter.start()
        b.set("later", "1")
        waiter.join(timeout=10)
        assert result == [True]
        assert b.prefix("ab") == {"abort": "first"}
    finally:
        server.close()
    with pytest.raises(StoreUnavailable):
        a.get("abort")


def test_store_port_in_use_names_the_port() -> None:
    server = StoreServer(0, secret=SECRET)
    try:
        with pytest.raises(RendezvousFailed, match=f"rendezvous port {server.port} on algo-9"):
            StoreServer(server.port, "algo-9", secret=SECRET)
    finally:
        server.close()


def test_store_client_gives_up_at_its_deadline() -> None:
    server = StoreServer(0, secret=SECRET)
    port = server.port
    server.close()
    with pytest.raises(
        RendezvousFailed, match=f"cannot reach the rendezvous store of algo-1 at 127.0.0.1:{port}"
    ):
        StoreClient("127.0.0.1", port, 0.5, "algo-1", secret=SECRET)


def test_a_store_client_started_before_its_master_connects_once_it_listens() -> None:
    """Hosts start together and the master's store comes up a moment later: normal."""
    port = free_port()
    clients: list[StoreClient] = []
    t = threading.Thread(
        target=lambda: clients.append(StoreClient("127.0.0.1", port, 60, "algo-1", secret=SECRET)),
        daemon=True,
    )
    t.start()
    assert t.is_alive()  # nothing listens yet: it is retrying
    server = StoreServer(port, secret=SECRET)
    try:
        t.join(60)
        (client,) = clients
        client.set("joined", "yes")
        assert client.get("joined") == "yes"
        client.close()
    finally:
        server.close()


def test_on_a_gpu_host_the_worker_binds_its_local_rank_and_picks_nccl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mock, because no GPU runs here (docs/gpu.md): CUDA is made to look available and
    set_device is recorded; the real NCCL path is what docs/gpu.md asks a GPU session to run."""
    import torch

    from smdist.worker import api

    bound: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    device, backend = api._device(3)
    assert backend == "nccl"
    assert device == torch.device("cuda", 3)
    assert bound == [3]


def test_on_cpu_the_worker_uses_gloo() -> None:
    import torch

    from smdist.worker import api

    assert not torch.cuda.is_available()
    assert api._device(1) == (torch.device("cpu"), "gloo")
