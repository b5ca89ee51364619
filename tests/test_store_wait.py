"""Ranks other than 0 wait for rank 0's TCPStore before torch connects (issue 18).

A rank that reaches ``init_process_group`` before rank 0 has its store up is refused, and
torch's client then sleeps a backoff of about half a second or more before it tries again:
the whole job waits it out. smdist's bootstrap makes such a rank poll the store's port
instead and connect as soon as it listens. Real torch TCPStores and a real 2-rank job here;
how much time it saves is measured by ``python -m bench.run --only ready``.

The loop itself is ``smdist.contract.connect_when_listening``, which the agents also use to
reach the master's rendezvous store: it is tested here with real sockets too.
"""

from __future__ import annotations

import importlib
import json
import socket
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from smdist import contract
from smdist.errors import RendezvousFailed
from smdist.worker import store_wait
from tests.helpers import free_port, make_tree, run, wait_for, write_script


def test_a_client_rank_connects_once_rank0s_store_listens(tmp_path: Path) -> None:
    import torch.distributed as dist

    # The module, not torch.distributed.rendezvous the function, which shadows it.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    port = free_port()
    create = store_wait.wrap(rendezvous._create_c10d_store)
    got: dict[str, Any] = {}

    def rank1() -> None:
        try:
            got["store"] = create("127.0.0.1", port, 1, 2, timedelta(seconds=60))
        except Exception as exc:  # reported by the assertion below
            got["error"] = exc

    t = threading.Thread(target=rank1, daemon=True)
    t.start()
    # Rank 1 is refused at least twice before rank 0's store exists: it is waiting.
    wait_for(lambda: store_wait.last_wait.get("attempts", 0) >= 2, 60, "rank 1 polling")
    assert t.is_alive() and "store" not in got
    server = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=60), False)
    t.join(60)
    assert "error" not in got, got.get("error")
    got["store"].set("from-rank-1", "hello")
    assert server.get("from-rank-1") == b"hello"
    assert store_wait.last_wait["listening"] is True
    assert store_wait.last_wait["address"] == f"127.0.0.1:{port}"


def test_rank0_and_torchruns_agent_store_do_not_wait(monkeypatch: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    create = store_wait.wrap(lambda *a, **k: calls.append(a) or "store")
    store_wait.last_wait.clear()
    # Nothing listens on port 9 (discard): a client rank would wait here.
    assert create("127.0.0.1", 9, 0, 2, timedelta(seconds=60)) == "store"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert create("127.0.0.1", 9, 1, 2, timedelta(seconds=60)) == "store"
    assert len(calls) == 2 and store_wait.last_wait == {}


def test_a_master_that_never_listens_is_left_to_torch_after_the_budget() -> None:
    assert store_wait.wait_listening("127.0.0.1", free_port(), 0.2) is False
    assert store_wait.last_wait["listening"] is False
    assert store_wait.last_wait["attempts"] >= 2


def test_the_shared_loop_connects_once_the_peer_listens_and_gives_up_at_its_budget() -> None:
    port = free_port()
    waits: list[float] = []
    refused_twice = threading.Event()

    def on_wait(exc: OSError, elapsed_s: float) -> None:
        assert isinstance(exc, ConnectionRefusedError), exc
        waits.append(elapsed_s)
        if len(waits) == 2:
            refused_twice.set()

    got: dict[str, socket.socket] = {}

    def connect() -> None:
        got["sock"] = contract.connect_when_listening(
            "127.0.0.1", port, 60, lambda _: 0.01, attempt_timeout_s=1.0, on_wait=on_wait
        )

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    assert refused_twice.wait(60), "no refused try"
    with socket.create_server(("127.0.0.1", port)) as server:
        t.join(60)
        assert "sock" in got, "not connected once the peer listened"
        peer, _ = server.accept()  # the connection it returned is the one the peer took
        with got["sock"] as sock, peer:
            sock.sendall(b"hi")
            assert peer.recv(2) == b"hi"
    # Nothing listens: the last error, once the next pause would end past the budget.
    tries: list[int] = []
    with pytest.raises(ConnectionRefusedError):
        contract.connect_when_listening(
            "127.0.0.1", free_port(), 0.3, lambda _: 0.05, attempt_timeout_s=1.0,
            on_attempt=lambda: tries.append(1),
        )  # fmt: skip
    assert len(tries) >= 2


def test_an_agent_that_cannot_reach_the_masters_store_says_where_and_how_long() -> None:
    from smdist.agent.store import StoreClient

    port = free_port()
    with pytest.raises(RendezvousFailed) as caught:
        StoreClient("127.0.0.1", port, 1, "algo-1", secret=b"s" * 32)
    assert str(caught.value) == (
        f"cannot reach the rendezvous store of algo-1 at 127.0.0.1:{port} after 1 s: "
        "Connection refused"
    )


CHECK = r"""
import importlib, json, os, sys
import torch, torch.distributed as dist
from smdist.worker import store_wait

rendezvous = importlib.import_module("torch.distributed.rendezvous")

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
out = {
    "rank": dist.get_rank(),
    "sum": t.item(),
    "patched": getattr(rendezvous._create_c10d_store, store_wait.MARK, False),
    "waited": store_wait.last_wait,
}
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def test_in_a_real_job_rank1_meets_rank0s_store_through_the_wait(tmp_path: Path) -> None:
    script = write_script(tmp_path / "check.py", CHECK)
    root = make_tree(tmp_path / "ml")
    r = run(["--opt-ml", str(root), "--nproc-per-host", "2", str(script), str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert [x["sum"] for x in ranks] == [2.0, 2.0]
    assert all(x["patched"] for x in ranks)
    assert ranks[0]["waited"] == {}  # rank 0 starts the store: nothing to wait for
    assert ranks[1]["waited"]["listening"] is True
