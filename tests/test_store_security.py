"""The control plane admits only the job (docs/security.md).

Real agents (two hosts on loopback, real workers, real gloo) while an intruder, speaking the
store's wire protocol itself, tries what the old store allowed: reading the job state,
writing the plan, ending the job with a fake ``hello``. The job's hosts are 127.0.0.1 and
127.0.0.2; the intruder connects from 127.0.0.3 (loopback too, but no host of the job's).
On one machine every agent's own connection comes from 127.0.0.1, the master's own address,
so the refusals below are the allow list's and the secret's, not a firewall's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from smdist import config as cfg
from smdist.agent import access, store
from smdist.agent.store import MAGIC, NONCE_BYTES, StoreClient, StoreRefused, StoreServer, _mac
from smdist.errors import ConfigError, RendezvousFailed
from tests.helpers import free_port, make_tree, start_hosts, wait_for, write_script

HOSTS = ["algo-1", "algo-2"]
ADDRESSES = {"algo-1": "127.0.0.1", "algo-2": "127.0.0.2"}
OUTSIDER = "127.0.0.3"

# Every rank says it is up, then waits (bounded) for the test's "go" and does a real
# all-reduce: a job whose plan or store was tampered with would not get through it.
WAIT_FOR_GO = """
import os, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
open(os.path.join({out!r}, "up-" + os.environ["RANK"]), "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(os.path.join({out!r}, "go")):
    assert time.monotonic() < deadline, "the test never said go"
    time.sleep(0.05)
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == 2.0
dist.destroy_process_group()
"""


Agents = dict[str, "subprocess.Popen[str]"]


def _start_job(tmp_path: Path, hyperparameters: dict[str, str]) -> tuple[Agents, int, bytes]:
    script = write_script(tmp_path / "job.py", WAIT_FOR_GO.format(out=str(tmp_path)))
    port = free_port()
    agents = start_hosts(
        tmp_path, HOSTS, script, port=port, addresses=ADDRESSES, hyperparameters=hyperparameters
    )
    # The secret the agents derived (no SMDIST_JOB_SECRET given): the test may know it.
    secret = access.job_secret(cfg.load(cfg.Paths(tmp_path / "algo-1"))).key
    wait_for(lambda: all((tmp_path / f"up-{r}").exists() for r in range(2)), 90, "ranks up")
    return agents, port, secret


def _finish(tmp_path: Path, agents: Agents) -> dict[str, str]:
    (tmp_path / "go").touch()
    logs = {}
    for h, proc in agents.items():
        out, err = proc.communicate(timeout=90)
        logs[h] = out + err
        assert proc.returncode == 0, f"{h} exited {proc.returncode}:\n{logs[h]}"
        assert not (tmp_path / h / "output" / "failure").exists()
    for h, text in logs.items():
        assert "Traceback" not in text, f"{h} printed a traceback:\n{text}"
    return logs


def _raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except OSError:
        pass
    return data


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _authenticated(port: int, secret: bytes) -> socket.socket:
    """A connection that passed the handshake, to send what the real client never would."""
    sock = _raw(port)
    greeting = sock.recv(4 + len(MAGIC) + NONCE_BYTES, socket.MSG_WAITALL)
    server_nonce = greeting[4 + len(MAGIC) :]
    mine = os.urandom(NONCE_BYTES)
    sock.sendall(_frame(mine + _mac(secret, b"client", server_nonce, mine)))
    answer = sock.recv(4 + 32, socket.MSG_WAITALL)
    assert answer[4:] == _mac(secret, b"server", server_nonce, mine)
    return sock


def test_an_intruder_cannot_read_write_or_end_the_job(tmp_path: Path) -> None:
    agents, port, secret = _start_job(tmp_path, {"lr": "0.1"})
    try:
        # From outside the job's addresses, even holding the secret: closed at accept.
        with pytest.raises(StoreRefused, match="does not admit this host's address"):
            StoreClient("127.0.0.1", port, 5, "algo-1", "algo-2", secret=secret, source=OUTSIDER)
        outsider = _raw(port, OUTSIDER)
        outsider.sendall(b'{"op":"hello","host":"algo-2"}\n{"op":"prefix","prefix":""}\n')
        assert _recv_all(outsider) == b"", "an outsider got an answer"
        outsider.close()
        # From an allowed address with the wrong secret: refused the same way.
        with pytest.raises(StoreRefused, match="hold different secrets"):
            StoreClient("127.0.0.1", port, 5, "algo-1", "algo-2", secret=b"x" * 32)
        # The old protocol's one line that ended a job: no handshake, so no hello, no lost host.
        old = _raw(port)
        old.sendall(b'{"op":"hello","host":"algo-2"}\n{"op":"set","key":"plan","value":"{}"}\n')
        reply = _recv_all(old)
        old.close()
        assert reply[4:].startswith(MAGIC) and len(reply) == 4 + len(MAGIC) + NONCE_BYTES, (
            "before authenticating, a peer gets the challenge and nothing else"
        )
    finally:
        logs = _finish(tmp_path, agents)
    master = logs["algo-1"]
    assert f"store: refused {OUTSIDER}: not one of the job's hosts' addresses" in master
    assert "store: refused 127.0.0.1: it did not prove it holds the job's secret" in master


def _fuzz_messages(rng: random.Random) -> list[bytes]:
    """Requests an authenticated but broken or hostile client might send, one frame each."""
    good_key = {"key": "k"}
    bodies: list[object] = [
        [], {}, None, 1, "set", {"op": None}, {"op": 7}, {"op": "nope" * 100},
        {"op": "set"}, {"op": "set", "key": "k"}, {"op": "set", "key": 1, "value": "v"},
        {"op": "set", "key": "", "value": "v"}, {"op": "set", "key": "k" * 5000, "value": "v"},
        {"op": "set", "key": "k", "value": ["v"]}, {"op": "get"}, {"op": "get", "key": {}},
        {"op": "add", **good_key}, {"op": "add", "key": "k", "amount": "1"},
        {"op": "add", "key": "k", "amount": True}, {"op": "add", "key": "k", "amount": 1.5},
        {"op": "add", "key": "plan", "amount": 1}, {"op": "add", "key": "k", "amount": 10**30},
        {"op": "compare_set", "key": "k"}, {"op": "compare_set", "key": "k", "expected": 1},
        {"op": "prefix"}, {"op": "prefix", "prefix": None},
        {"op": "wait"}, {"op": "wait", "keys": []}, {"op": "wait", "keys": "abort"},
        {"op": "wait", "keys": [1], "timeout": 1}, {"op": "wait", "keys": ["a"], "timeout": -1},
        {"op": "wait", "keys": ["a"], "timeout": 1e9}, {"op": "wait", "keys": ["a"], "all": 2},
        {"op": "wait", "keys": ["a"], "timeout": "1"}, {"op": "wait", "keys": ["a"] * 70000},
        {"op": "hello"}, {"op": "hello", "host": "algo-9"}, {"op": "hello", "host": ["algo-2"]},
        {"op": "hello", "host": "algo-2"},  # already connected: refused, nobody is lost
    ]  # fmt: skip
    frames = [_frame(json.dumps(b).encode()) for b in bodies]
    frames += [_frame(b"\xff\xfe garbage"), _frame(b"{" * 100000), _frame(b'{"op": "set"')]
    frames += [_frame(rng.randbytes(rng.randrange(1, 200))) for _ in range(100)]
    rng.shuffle(frames)
    return frames


def test_fuzzed_messages_from_an_allowed_address_leave_the_job_running(tmp_path: Path) -> None:
    agents, port, secret = _start_job(tmp_path, {"epochs": "3"})
    rng = random.Random(15)
    sent = 0
    try:
        # Before authenticating: garbage, old-protocol lines, huge lengths, wrong proofs.
        for i in range(150):
            sock = _raw(port)
            kind = i % 5
            if kind == 0:
                sock.sendall(rng.randbytes(rng.randrange(1, 300)))
            elif kind == 1:
                sock.sendall(b'{"op":"hello","host":"algo-2"}\n')
            elif kind == 2:
                sock.sendall(struct.pack(">I", 0xFFFFFFF0) + b"x" * 10)
            elif kind == 3:
                sock.sendall(_frame(os.urandom(64)))  # a well-formed but wrong proof
            else:
                sock.sendall(b"\x00\x00")  # half a header, then gone
            sock.close()
            sent += 1
        # Authenticated: malformed and out-of-order requests, some pipelined, some split
        # into single bytes, one oversized, one connection dropped mid-wait.
        conn = _authenticated(port, secret)
        for frame in _fuzz_messages(rng):
            if rng.random() < 0.1:
                for b in frame[:50]:
                    conn.send(bytes([b]))
                conn.sendall(frame[50:])
            else:
                conn.sendall(frame)
            sent += 1
            size = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))[0]
            reply = json.loads(conn.recv(size, socket.MSG_WAITALL))
            assert "error" in reply or "ok" in reply or "value" in reply, reply
        pipelined = _authenticated(port, secret)
        pipelined.sendall(b"".join(_frame(b"[]") for _ in range(50)))
        sent += 50
        waiting = _authenticated(port, secret)
        waiting.sendall(_frame(b'{"op":"wait","keys":["never"],"timeout":60}'))
        waiting.close()
        big = _authenticated(port, secret)
        big.sendall(struct.pack(">I", (16 << 20) + 1))
        assert _recv_all(big) == b"", "an oversized request closes its connection"
        sent += 2
        # The job's own connections were never disturbed: it is still there to finish.
        assert all(p.poll() is None for p in agents.values())
        pipelined.close()
        conn.close()
    finally:
        logs = _finish(tmp_path, agents)
    assert sent >= 300
    master = logs["algo-1"].splitlines()
    bad_lines = [ln for ln in master if "store: bad request from" in ln]
    assert 0 < len(bad_lines) <= 3 * 2, "a few lines per connection, not one per message"
    refused = [ln for ln in master if "store: refused 127.0.0.1" in ln]
    assert 0 < len(refused) <= 3 * 3, "refusals are counted, not printed one by one"
    print("\n".join(bad_lines + refused))


def test_the_derived_secret_is_the_same_on_every_host_and_changes_with_the_job(
    tmp_path: Path,
) -> None:
    def secret(host: str, hp: dict[str, str], **env: str) -> bytes:
        tree = make_tree(tmp_path / f"{host}-{len(hp)}-{len(env)}", host, HOSTS, hp)
        return access.job_secret(cfg.load(cfg.Paths(tree)), env).key

    assert secret("algo-1", {"lr": "1"}) == secret("algo-2", {"lr": "1"})
    assert secret("algo-1", {"lr": "1"}) != secret("algo-1", {"lr": "1", "b": "2"})
    assert secret("algo-1", {}, TRAINING_JOB_ARN="arn:a") != secret("algo-1", {})
    given = "0123456789abcdef0123"
    assert secret("algo-1", {}, SMDIST_JOB_SECRET=given) == given.encode()
    with pytest.raises(ConfigError, match="SMDIST_JOB_SECRET: the job secret is 5 bytes"):
        secret("algo-1", {}, SMDIST_JOB_SECRET="short")
    key_file = tmp_path / "key"
    key_file.write_text(given + "\n")
    assert secret("algo-1", {}, SMDIST_JOB_SECRET_FILE=str(key_file)) == given.encode()


def test_the_allow_list_admits_the_job_and_what_the_setting_adds() -> None:
    allow = access.allow_list(["10.0.0.2", "10.0.0.3"], {})
    assert allow.admits("10.0.0.2") and allow.admits("::ffff:10.0.0.3")
    assert allow.admits("127.0.0.1") and allow.admits("::1")
    assert not allow.admits("10.0.0.4") and not allow.admits("127.0.0.3")
    wide = access.allow_list(["10.0.0.2"], {"SMDIST_STORE_ALLOW": "10.1.0.0/16, fd00::/8"})
    assert wide.admits("10.1.2.3") and wide.admits("fd00::5") and not wide.admits("10.2.0.1")
    assert access.allow_list([], {"SMDIST_STORE_ALLOW": "any"}).admits("192.0.2.1")
    with pytest.raises(ConfigError, match="SMDIST_STORE_ALLOW: 'ten' is not an address"):
        access.allow_list([], {"SMDIST_STORE_ALLOW": "10.0.0.0/8,ten"})


def test_a_client_does_not_follow_a_master_without_the_secret() -> None:
    """A fake master (another job's, or an impostor on the master's address) cannot steer
    an agent: the agent checks the store's proof before sending a single request."""
    impostor = StoreServer(0, secret=b"i" * 32)
    try:
        with pytest.raises(StoreRefused):
            StoreClient("127.0.0.1", impostor.port, 5, "algo-1", secret=b"j" * 32)
    finally:
        impostor.close()
    # Nor can a listener that greets like a master but answers with a made-up proof.
    with socket.create_server(("127.0.0.1", 0)) as fake:

        def pretend() -> None:
            conn, _ = fake.accept()
            with conn:
                conn.sendall(_frame(MAGIC + os.urandom(NONCE_BYTES)))
                conn.recv(4 + 64, socket.MSG_WAITALL)
                conn.sendall(_frame(os.urandom(32)))
                conn.recv(1)

        thread = threading.Thread(target=pretend, daemon=True)
        thread.start()
        with pytest.raises(StoreRefused, match="did not prove it holds the job's secret"):
            StoreClient("127.0.0.1", fake.getsockname()[1], 10, "algo-1", secret=b"j" * 32)
        thread.join(timeout=10)


def test_the_store_names_a_silent_or_vanished_host_and_nobody_else() -> None:
    """Heartbeats are the watcher's waits; the store alone judges them (no agent reads N)."""
    lost: list[tuple[str, str]] = []
    told = threading.Event()

    def on_lost(server: StoreServer, host: str, why: str) -> None:
        lost.append((host, why))
        told.set()

    secret = b"s" * 32
    # 2 s against a beat every 0.2 s: a loaded machine stalling this thread cannot make algo-1 late.
    server = StoreServer(0, on_lost=on_lost, secret=secret, hosts=HOSTS, heartbeat_timeout_s=2.0)
    try:
        beating = StoreClient("127.0.0.1", server.port, 5, "t", "algo-1", secret=secret)
        with pytest.raises(RendezvousFailed, match="algo-1 is already connected"):
            StoreClient("127.0.0.1", server.port, 5, "t", "algo-1", secret=secret)
        with pytest.raises(RendezvousFailed, match="'algo-9' is not one of the job's hosts"):
            StoreClient("127.0.0.1", server.port, 5, "t", "algo-9", secret=secret)
        silent = StoreClient("127.0.0.1", server.port, 5, "t", "algo-2", secret=secret)
        assert not silent.wait(["never"], 0.05)  # its watcher started, then froze
        while not told.is_set():
            assert not beating.wait(["never"], 0.2)  # algo-1 beats; algo-2 says nothing
        assert lost[0][0] == "algo-2" and lost[0][1].startswith("no heartbeat for ")
        silent.close()  # already declared: its close says nothing more
        told.clear()

        # A wait in progress is no missed heartbeat; the connection closing under it is.
        def wait_long() -> None:
            with contextlib.suppress(RendezvousFailed):
                beating.wait(["never"], 60)

        waiter = threading.Thread(target=wait_long)
        waiter.start()
        wait_for(lambda: server._identified["algo-1"].waiting, 10, "algo-1's wait to arrive")
        beating.close()
        assert told.wait(10)
        waiter.join(10)
        assert lost[1:] == [("algo-1", "its agent's connection closed")]
    finally:
        server.close()


def test_a_wait_longer_than_the_servers_bound_is_several_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server refuses one wait over MAX_WAIT_S (an hour); the client splits a longer one
    (an install timeout may be longer) instead of failing the job."""
    monkeypatch.setattr(store, "MAX_WAIT_S", 0.2)
    server = StoreServer(0, secret=b"s" * 32)
    try:
        client = StoreClient("127.0.0.1", server.port, 5, "t", secret=b"s" * 32)
        assert not client.wait(["never"], 0.5)
        later = threading.Timer(0.5, lambda: server.local_compare_set("soon", None, "1"))
        later.start()
        assert client.wait(["soon"], 30)
    finally:
        server.close()
