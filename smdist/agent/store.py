"""The rendezvous store: a small key-value server the master agent hosts, over TCP.

Why not torch's TCPStore: importing torch costs the agent about 2 s on a small host, and
the agent must not sit between a job and its first step. This store is standard library.

Wire: every message is a frame, a 4-byte big-endian length and that many bytes. A connection
from an address the allow list admits (smdist.agent.access) starts with a mutual HMAC-SHA256
challenge-response on the job's secret; only then are requests read, one JSON object per
frame, bounded and validated, each answered with one JSON object. Nothing from the network
is unpickled or evaluated; a bad request gets an error reply and one log line, never a
traceback. (multiprocessing.connection has the same handshake, but its blocking accept
would put a thread behind every connection; docs/security.md.)

One thread serves every connection around a selector, and waits are registered per key, so
1024 agents heartbeating cost one request each per interval, not a wake-up of every waiter
(bench/store_load.py). An identified connection (``hello``) is an agent's watcher: its
waits are its heartbeats, and the server calls ``on_lost`` when it closes without the host
having left or, once its first wait arrived (the watcher starts with the workers, so a host
still installing is judged by its connection alone), when its next request is late by more
than the heartbeat timeout.
"""

from __future__ import annotations

import contextlib
import heapq
import hmac
import json
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from smdist import contract
from smdist.errors import RendezvousFailed
from smdist.log import log

TYPE_CHECKING = False  # not typing's: every host's agent imports this on its way to the rendezvous
if TYPE_CHECKING:
    from typing import Any


MAGIC = b"smdist-store-1\0"
NONCE_BYTES = 32
MAX_REQUEST_BYTES = 16 << 20  # an inventory of a large model dir fits; a runaway does not
MAX_REPLY_BYTES = 256 << 20
MAX_KEY_CHARS = 1024
MAX_WAIT_S = 3600.0
HANDSHAKE_TIMEOUT_S = 30.0  # a thousand agents joining at once answer late, not never
MAX_UNAUTHENTICATED = 1024  # beyond it, accepting pauses (the kernel's backlog holds the rest)
BAD_REQUESTS_LOGGED = 3  # per connection; then one line saying the rest are not
_HEADER = struct.Struct(">I")


class StoreUnavailable(RendezvousFailed):
    """The connection to the master's store broke (its host is gone)."""


class StoreRefused(RendezvousFailed):
    """The store and this agent could not authenticate each other."""


def _mac(secret: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    # The role is in the message, so one side's proof can never be replayed as the other's.
    return hmac.new(secret, role + server_nonce + client_nonce, "sha256").digest()


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class _Conn:
    __slots__ = (
        "address",
        "authed",
        "bad",
        "expect_by",
        "last_payload",
        "last_request",
        "nonce",
        "opened",
        "peer",
        "rbuf",
        "sock",
        "waiting",
        "wbuf",
        "who",
    )

    def __init__(self, sock: socket.socket, address: str, port: int) -> None:
        self.sock = sock
        self.address = address
        self.peer = f"{address}:{port}"
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.nonce = os.urandom(NONCE_BYTES)
        self.authed = False
        self.who: str | None = None
        self.waiting: _Waiter | None = None
        self.expect_by = math.inf  # armed by its first wait: its watcher has started
        self.bad = 0
        self.opened = time.monotonic()
        # A watcher's heartbeat repeats its last wait byte for byte: not parsed again.
        self.last_payload = b""
        self.last_request: dict[str, Any] = {}

    def name(self) -> str:
        return f"{self.peer} ({self.who})" if self.who else self.peer


class _Waiter:
    __slots__ = ("conn", "distinct", "done", "missing", "need_all", "stop_keys", "values")

    def __init__(
        self, conn: _Conn, distinct: int, missing: set[str], need_all: bool, stop: set[str]
    ) -> None:
        self.conn, self.distinct, self.missing, self.need_all = conn, distinct, missing, need_all
        self.stop_keys = stop
        self.done = False
        self.values: list[str] | None = None
        """Keys whose values the reply carries (saves each watcher a round trip)."""

    def ready(self) -> bool:
        return not self.missing if self.need_all else len(self.missing) < self.distinct


class BadRequest(ValueError):
    pass


def _str(req: dict[str, Any], field: str, *, key: bool = False, none: bool = False) -> Any:
    value = req.get(field)
    if value is None and none and field in req:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{field!r} must be a string")
    if key and not 0 < len(value) <= MAX_KEY_CHARS:
        raise BadRequest(f"{field!r} must be 1 to {MAX_KEY_CHARS} characters")
    return value


def _keys(req: dict[str, Any], field: str, *, required: bool = True) -> list[str]:
    keys = req.get(field, None if required else [])
    if not isinstance(keys, list) or (required and not keys) or len(keys) > 1 << 16:
        raise BadRequest(f"{field!r} must be a list of {int(required)} to 65536 keys")
    if not all(isinstance(k, str) and 0 < len(k) <= MAX_KEY_CHARS for k in keys):
        raise BadRequest(f"every key in {field!r} must be a string of 1 to 1024 characters")
    return keys


class StoreServer:
    """Serves the store on ``port`` on every interface (IPv4 and IPv6 where available), to
    the addresses ``admits`` accepts and the clients that prove they hold ``secret``."""

    def __init__(
        self,
        port: int,
        host_label: str = "this host",
        on_lost: Callable[[StoreServer, str, str], None] | None = None,
        *,
        secret: bytes,
        admits: Callable[[str], bool] = lambda address: True,
        hosts: Sequence[str] | None = None,
        heartbeat_timeout_s: float | None = None,
    ) -> None:
        """``on_lost(server, host, why)`` runs (on the server's thread) when the watcher
        connection of ``host`` closes, or its next request is ``heartbeat_timeout_s`` late.
        ``hosts``: the names a ``hello`` may claim (None: any)."""
        self._on_lost = on_lost
        self._secret = secret
        self._admits = admits
        self._hosts = frozenset(hosts) if hosts is not None else None
        self._hb_timeout = heartbeat_timeout_s
        self._data: dict[str, str] = {}
        self._waiters: dict[str, set[_Waiter]] = {}
        self._timers: list[tuple[float, int, _Waiter]] = []
        self._seq = 0
        self._conns: dict[socket.socket, _Conn] = {}
        self._unauthenticated: dict[socket.socket, _Conn] = {}
        self._resume: list[_Conn] = []  # answered waits: read on, after the current request
        self._identified: dict[str, _Conn] = {}
        self._refused: dict[tuple[str, str], int] = {}
        self._lock = threading.RLock()
        self._closing = False
        self._accepting = True
        self._next_sweep = 0.0
        try:
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=4096
                )
            else:
                sock = socket.create_server(("", port), backlog=4096)
        except OSError as exc:
            raise RendezvousFailed(
                f"cannot listen on rendezvous port {port} on {host_label}: "
                f"{exc.strerror or exc} (choose another with --rdzv-port)"
            ) from exc
        sock.setblocking(False)
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="smdist-store", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                    timeout = self._next_deadline() - time.monotonic()
                events = self._sel.select(max(0.0, timeout))
                with self._lock:
                    for key, mask in events:
                        if key.fileobj is self._sock:
                            self._accept()
                        elif key.fileobj is self._wake_r:
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(64)
                        else:
                            self._io(key.data, mask)
                    self._expire(time.monotonic())
                    while self._resume:
                        resume, self._resume = self._resume, []
                        for conn in resume:
                            self._process(conn)
        finally:
            with self._lock:
                for conn in list(self._conns.values()):
                    self._drop(conn, silent=True)
                self._sel.close()
                self._sock.close()
                self._wake_r.close()
                self._wake_w.close()

    def _next_deadline(self) -> float:
        deadline = time.monotonic() + 1.0
        if self._timers:
            deadline = min(deadline, self._timers[0][0])
        return min(deadline, self._next_sweep) if self._next_sweep else deadline

    def _expire(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, waiter = heapq.heappop(self._timers)
            if not waiter.done:
                self._finish(waiter, ok=False)
        if now >= self._next_sweep:
            self._next_sweep = now + 0.25
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close connections stuck before authenticating; declare silent watchers lost."""
        for conn in list(self._unauthenticated.values()):
            if now - conn.opened > HANDSHAKE_TIMEOUT_S:
                why = f"no authentication within {HANDSHAKE_TIMEOUT_S:.0f} s"
                self._refuse(conn.address, "slow", why)
                self._drop(conn, silent=True)
        if self._hb_timeout is None:
            return
        for host, conn in list(self._identified.items()):
            if now > conn.expect_by and conn.waiting is None:
                late = now - conn.expect_by + self._hb_timeout
                self._identified.pop(host, None)
                conn.who = None  # lost once; its later close says nothing more
                self._lost(host, f"no heartbeat for {late:.1f} s")

    def _lost(self, host: str, why: str) -> None:
        if self._on_lost is not None and not self._closing:
            try:
                self._on_lost(self, host, why)
            except Exception:  # the store must outlive a bug in a callback
                log.exception("store: on_lost(%s) failed", host)

    def _accept(self) -> None:
        while True:
            if len(self._unauthenticated) >= MAX_UNAUTHENTICATED:
                self._sel.unregister(self._sock)  # resumed as handshakes finish
                self._accepting = False
                return
            try:
                sock, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: say so once per burst, keep serving
                log.warning("store: cannot accept a connection: %s", exc.strerror or exc)
                return
            peer = _strip_mapped(str(addr[0]))
            if not self._admits(peer):
                self._refuse(peer, "address", "not one of the job's hosts' addresses")
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer, int(addr[1]))
            self._conns[sock] = conn
            self._unauthenticated[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._send(conn, _frame(MAGIC + conn.nonce))

    def _resume_accepting(self) -> None:
        if not self._accepting and len(self._unauthenticated) < MAX_UNAUTHENTICATED:
            self._accepting = True
            self._sel.register(self._sock, selectors.EVENT_READ, None)

    def _refuse(self, address: str, kind: str, why: str) -> None:
        """One line per address and kind of refusal at the 1st, 10th, 100th, ... time:
        visible, never a flood (a scanner, a fuzzer, a misconfigured host)."""
        n = self._refused.get((address, kind), 0) + 1
        self._refused[(address, kind)] = n
        if str(n).rstrip("0") == "1":
            hint = "; SMDIST_STORE_ALLOW widens the list" if kind == "address" else ""
            log.warning("store: refused %s: %s (%d time%s%s)",
                        address, why, n, "" if n == 1 else "s", hint)  # fmt: skip

    def refused_secret(self) -> str:
        """Who was refused for not proving the job's secret ("" if nobody): a host whose
        secret differs is told at once, but the master only sees a refusal."""
        with self._lock:
            seen = sorted(a for (a, kind) in self._refused if kind == "secret")
        return ", ".join(seen)

    def _io(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.sock in self._conns:
            try:
                chunk = conn.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._drop(conn)
                return
            conn.rbuf += chunk
            self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle whole frames while the connection has no wait pending and no unsent reply
        (one request at a time per connection; a client that never reads stalls alone)."""
        while conn.sock in self._conns and conn.waiting is None and not conn.wbuf:
            if len(conn.rbuf) < _HEADER.size:
                return
            (size,) = _HEADER.unpack_from(conn.rbuf)
            limit = MAX_REQUEST_BYTES if conn.authed else NONCE_BYTES + 32
            if size > limit and not conn.authed:
                self._refuse(conn.address, "size", f"a {size}-byte message before authenticating")
                self._drop(conn, silent=True)
                return
            if size > limit:
                log.warning("store: closed %s: a %d-byte request (at most %d)",
                            conn.name(), size, limit)  # fmt: skip
                self._drop(conn)
                return
            if len(conn.rbuf) < _HEADER.size + size:
                return
            payload = bytes(conn.rbuf[_HEADER.size : _HEADER.size + size])
            del conn.rbuf[: _HEADER.size + size]
            if conn.authed:
                self._request(conn, payload)
            else:
                self._handshake(conn, payload)

    def _handshake(self, conn: _Conn, payload: bytes) -> None:
        client_nonce, proof = payload[:NONCE_BYTES], payload[NONCE_BYTES:]
        expected = _mac(self._secret, b"client", conn.nonce, client_nonce)
        if len(client_nonce) != NONCE_BYTES or not hmac.compare_digest(proof, expected):
            self._refuse(conn.address, "secret", "it did not prove it holds the job's secret")
            self._drop(conn, silent=True)
            return
        conn.authed = True
        del self._unauthenticated[conn.sock]
        self._resume_accepting()
        self._send(conn, _frame(_mac(self._secret, b"server", conn.nonce, client_nonce)))

    def _request(self, conn: _Conn, payload: bytes) -> None:
        if conn.expect_by != math.inf and self._hb_timeout is not None:
            conn.expect_by = time.monotonic() + self._hb_timeout
        try:
            if payload == conn.last_payload:
                req = conn.last_request  # a repeated wait (the watcher's beat): parsed once
            else:
                try:
                    req = json.loads(payload)
                except (ValueError, RecursionError):
                    raise BadRequest("not JSON") from None
                if not isinstance(req, dict):
                    raise BadRequest("not a JSON object")
                if req.get("op") == "wait":
                    conn.last_payload, conn.last_request = payload, req
            reply = self._handle(conn, req)
        except BadRequest as exc:
            conn.bad += 1
            if conn.bad <= BAD_REQUESTS_LOGGED:
                more = "; further bad requests from it are not logged"
                log.warning(
                    "store: bad request from %s: %s%s",
                    conn.name(),
                    exc,
                    more if conn.bad == BAD_REQUESTS_LOGGED else "",
                )
            reply = {"error": str(exc)}
        if reply is not None:
            self._reply(conn, reply)

    def _reply(self, conn: _Conn, reply: dict[str, Any]) -> None:
        self._send(conn, _frame(json.dumps(reply, separators=(",", ":")).encode()))

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.wbuf:
            conn.wbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):
            conn.wbuf += data[sent:]
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        del conn.wbuf[:sent]
        if not conn.wbuf:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            self._process(conn)  # requests that arrived while the reply was queued

    def _drop(self, conn: _Conn, silent: bool = False) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        self._unauthenticated.pop(conn.sock, None)
        self._resume_accepting()
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        if conn.waiting is not None:
            self._unwait(conn.waiting)
        who = conn.who
        if who is not None and self._identified.get(who) is conn:
            del self._identified[who]
            if not silent:
                self._lost(who, "its agent's connection closed")

    # -- requests ---------------------------------------------------------------------------

    def _handle(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any] | None:
        op = req.get("op")
        if op == "hello":
            host = _str(req, "host", key=True)
            if conn.who is not None:
                raise BadRequest(f"this connection already said hello as {conn.who}")
            if self._hosts is not None and host not in self._hosts:
                raise BadRequest(f"{host!r} is not one of the job's hosts")
            if host in self._identified:
                raise BadRequest(f"{host} is already connected")
            conn.who = host
            self._identified[host] = conn
            return {"ok": True}
        if op == "set":
            self._set(_str(req, "key", key=True), _str(req, "value"))
            return {"ok": True}
        if op == "get":
            return {"value": self._data.get(_str(req, "key", key=True))}
        if op == "add":
            key, amount = _str(req, "key", key=True), req.get("amount")
            if not isinstance(amount, int) or isinstance(amount, bool) or abs(amount) > 1 << 53:
                raise BadRequest("'amount' must be an integer")
            try:
                value = int(self._data.get(key, "0")) + amount
            except ValueError:
                raise BadRequest(f"{key!r} does not hold an integer") from None
            self._set(key, str(value))
            return {"value": value}
        if op == "compare_set":
            key = _str(req, "key", key=True)
            expected = _str(req, "expected", none=True)
            return {"value": self.local_compare_set(key, expected, _str(req, "desired"))}
        if op == "prefix":
            p = _str(req, "prefix")
            return {"items": {k: v for k, v in self._data.items() if k.startswith(p)}}
        if op == "wait":
            return self._wait(conn, req)
        if op == "missing":
            return {"keys": [k for k in _keys(req, "keys") if k not in self._data]}
        raise BadRequest(f"unknown op {str(op)[:40]!r}")

    def _wait(self, conn: _Conn, req: dict[str, Any]) -> dict[str, Any] | None:
        """Until ``keys`` (all, or any) exist, or any of the ``or`` keys does (the job's
        abort ending a wait for something else), or ``timeout``; ok: the keys are there."""
        keys, need_all, timeout = _keys(req, "keys"), req.get("all", True), req.get("timeout")
        stop = set(_keys(req, "or", required=False))
        values = req.get("values", False)
        if not isinstance(values, bool) or (values and len(keys) + len(stop) > 64):
            raise BadRequest("'values' must be true or false, and true only for up to 64 keys")
        if not isinstance(need_all, bool):
            raise BadRequest("'all' must be true or false")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise BadRequest("'timeout' must be a number of seconds")
        if not 0 <= timeout <= MAX_WAIT_S:
            raise BadRequest(f"'timeout' must be 0 to {MAX_WAIT_S:.0f} s")
        waiter = _Waiter(conn, len(set(keys)), {k for k in keys if k not in self._data},
                         need_all, stop)  # fmt: skip
        if values:
            waiter.values = [*keys, *stop]
        if waiter.ready() or timeout == 0 or any(k in self._data for k in stop):
            return self._outcome(waiter)
        for k in waiter.missing | stop:
            self._waiters.setdefault(k, set()).add(waiter)
        conn.waiting = waiter
        deadline = time.monotonic() + timeout
        if conn.who is not None and self._hb_timeout is not None:
            conn.expect_by = deadline + self._hb_timeout
        self._seq += 1
        heapq.heappush(self._timers, (deadline, self._seq, waiter))
        return None

    def _outcome(self, waiter: _Waiter) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": waiter.ready()}
        if waiter.values is not None:
            data = self._data
            reply["values"] = {k: data[k] for k in waiter.values if k in data}
        return reply

    def _set(self, key: str, value: str) -> None:
        self._data[key] = value
        waiters = self._waiters.pop(key, None)
        for waiter in waiters or ():
            waiter.missing.discard(key)
            if not waiter.done and (key in waiter.stop_keys or waiter.ready()):
                self._finish(waiter, ok=waiter.ready())

    def _unwait(self, waiter: _Waiter) -> None:
        waiter.done = True
        waiter.conn.waiting = None
        for k in waiter.missing | waiter.stop_keys:
            group = self._waiters.get(k)
            if group is not None:
                group.discard(waiter)
                if not group:
                    del self._waiters[k]

    def _finish(self, waiter: _Waiter, ok: bool) -> None:
        conn = waiter.conn
        self._unwait(waiter)
        if conn.sock not in self._conns:
            return
        if conn.expect_by != math.inf and self._hb_timeout is not None:
            conn.expect_by = time.monotonic() + self._hb_timeout
        self._reply(conn, self._outcome(waiter))
        # Not here: this may run inside another connection's request (its ``set``).
        self._resume.append(conn)

    # Server-side access for ``on_lost`` (same semantics as the client's ops).
    def local_get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def local_compare_set(self, key: str, expected: str | None, desired: str) -> str | None:
        with self._lock:
            current = self._data.get(key)
            if current == expected:
                self._set(key, desired)
                return desired
            return current


def _strip_mapped(address: str) -> str:
    return address.removeprefix("::ffff:")


class StoreClient:
    """One authenticated connection to the store; safe to share between threads (one
    request at a time)."""

    def __init__(
        self,
        address: str,
        port: int,
        connect_timeout_s: float,
        what: str,
        identity: str | None = None,
        *,
        secret: bytes,
        reply_timeout_s: float = 30.0,
        source: str | None = None,
    ) -> None:
        """``identity``: this agent's host, so the server notices when this connection
        drops without the host having left. A reply later than ``reply_timeout_s`` (beyond
        a wait's own time) means the master is frozen or cut off: ``StoreUnavailable``.
        ``source``: the local address to connect from (default: the kernel's choice)."""
        self.address, self.port = address, port
        self._lock = threading.Lock()
        self._what = what
        self._secret = secret
        self._reply_timeout_s = reply_timeout_s
        self._sock = _connect(address, port, connect_timeout_s, what, source)
        try:
            self._authenticate(secret)
        except BaseException:
            self.close()
            raise
        if identity is not None:
            self._call(op="hello", host=identity)

    def reopen(self, connect_timeout_s: float) -> StoreClient:
        """A fresh connection to the same store, with the same secret (not identified)."""
        return StoreClient(
            self.address,
            self.port,
            connect_timeout_s,
            self._what,
            secret=self._secret,
            reply_timeout_s=self._reply_timeout_s,
        )

    def _where(self) -> str:
        return f"the rendezvous store of {self._what} at {self.address}:{self.port}"

    def _authenticate(self, secret: bytes) -> None:
        self._sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            challenge = self._recv_frame(len(MAGIC) + NONCE_BYTES)
        except (StoreUnavailable, OSError) as exc:
            raise StoreRefused(
                f"{self._where()} closed the connection before authenticating ({exc}): the "
                "master does not admit this host's address (SMDIST_STORE_ALLOW on the master "
                "widens it; docs/security.md)"
            ) from None
        if not challenge.startswith(MAGIC) or len(challenge) != len(MAGIC) + NONCE_BYTES:
            raise StoreRefused(f"{self._where()} is not an smdist store (bad greeting)")
        server_nonce = challenge[len(MAGIC) :]
        client_nonce = os.urandom(NONCE_BYTES)
        proof = _mac(secret, b"client", server_nonce, client_nonce)
        try:
            self._sock.sendall(_frame(client_nonce + proof))
            answer = self._recv_frame(64)
        except (StoreUnavailable, OSError):
            raise StoreRefused(
                f"{self._where()} refused this host's proof of the job secret: the hosts "
                "hold different secrets (SMDIST_JOB_SECRET differs, or, when derived, the "
                "hosts, job name, hyperparameters.json or inputdataconfig.json differ)"
            ) from None
        if not hmac.compare_digest(answer, _mac(secret, b"server", server_nonce, client_nonce)):
            raise StoreRefused(
                f"{self._where()} did not prove it holds the job's secret: another job's "
                "master, or not smdist's; not following it"
            )

    def close(self) -> None:
        # shutdown first: a thread blocked in a wait on this connection wakes up, and the
        # server sees the close at once.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise StoreUnavailable(f"lost {self._where()}: connection closed")
            buf += chunk
        return bytes(buf)

    def _recv_frame(self, limit: int) -> bytes:
        (size,) = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if size > limit:
            raise StoreUnavailable(f"lost {self._where()}: a {size}-byte reply")
        return self._recv_exact(size)

    def _call(self, wait_s: float = 0.0, **req: Any) -> dict[str, Any]:
        payload = json.dumps(req, separators=(",", ":")).encode()
        with self._lock:
            try:
                self._sock.settimeout(self._reply_timeout_s + wait_s)
                self._sock.sendall(_frame(payload))
                data = self._recv_frame(MAX_REPLY_BYTES)
            except TimeoutError:
                self.close()
                raise StoreUnavailable(
                    f"lost {self._where()}: no reply within {self._reply_timeout_s:.0f} s"
                ) from None
            except OSError as exc:
                self.close()
                raise StoreUnavailable(f"lost {self._where()}: {exc.strerror or exc}") from exc
        reply: dict[str, Any] = json.loads(data)
        if "error" in reply:
            raise RendezvousFailed(f"{self._where()} refused {req.get('op')}: {reply['error']}")
        return reply

    def set(self, key: str, value: str) -> None:
        self._call(op="set", key=key, value=value)

    def get(self, key: str) -> str | None:
        value: str | None = self._call(op="get", key=key)["value"]
        return value

    def add(self, key: str, amount: int = 1) -> int:
        return int(self._call(op="add", key=key, amount=amount)["value"])

    def compare_set(self, key: str, expected: str | None, desired: str) -> str | None:
        """Set ``key`` to ``desired`` if it holds ``expected`` (None: absent); return its value."""
        value: str | None = self._call(
            op="compare_set", key=key, expected=expected, desired=desired
        )["value"]
        return value

    def prefix(self, prefix: str) -> dict[str, str]:
        items: dict[str, str] = self._call(op="prefix", prefix=prefix)["items"]
        return items

    def wait(
        self,
        keys: Iterable[str],
        timeout_s: float,
        *,
        all_keys: bool = True,
        or_keys: Sequence[str] = (),
    ) -> bool:
        """Block (server-side) until the keys exist; False when ``timeout_s`` passed first,
        or when one of ``or_keys`` appeared first (e.g. the job's abort)."""
        keys = list(keys)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:  # the server bounds one wait at MAX_WAIT_S; a longer one is several
            chunk = min(max(0.0, deadline - time.monotonic()), MAX_WAIT_S)
            reply = self._call(
                chunk, op="wait", keys=keys, all=all_keys, timeout=chunk, **{"or": list(or_keys)}
            )
            if reply["ok"]:
                return True
            if time.monotonic() >= deadline or or_keys:
                return False

    def wait_values(self, keys: Sequence[str], timeout_s: float) -> dict[str, str] | None:
        """Wait until any of ``keys`` exists (at most ``timeout_s``); return the values of
        those present then, in the same reply, or None when none came."""
        reply = self._call(
            timeout_s, op="wait", keys=list(keys), all=False, timeout=timeout_s, values=True
        )
        values: dict[str, str] = reply.get("values", {})
        return values if reply["ok"] else None

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Those of ``keys`` the store does not hold (without fetching any value)."""
        absent: list[str] = self._call(op="missing", keys=list(keys))["keys"]
        return absent


EARLY_RETRY_S = 0.02
EARLY_PHASE_S = 2.0
MAX_RETRY_S = 2.0


def _backoff() -> Callable[[float], float]:
    """The pause after a refused try, given the seconds so far: ``EARLY_RETRY_S`` (plus up
    to as much again at random) for the first ``EARLY_PHASE_S``, then doubling up to
    ``MAX_RETRY_S``. Hosts started together meet within a few tens of milliseconds of the
    master's store listening, not after an exponential backoff's overshoot, and a master
    that is late by minutes is not flooded. A plain function: tenacity (with typing,
    dataclasses and inspect) is not worth its import on every host's way to the rendezvous."""
    delay = EARLY_RETRY_S

    def pause(elapsed_s: float) -> float:
        nonlocal delay
        import random  # only when the master is not up yet

        if elapsed_s >= EARLY_PHASE_S:
            delay = min(MAX_RETRY_S, delay * 2)
        return delay + random.uniform(0, EARLY_RETRY_S)

    return pause


def _connect(
    address: str, port: int, timeout_s: float, what: str, source: str | None = None
) -> socket.socket:
    """Connect, retrying while the master's store is not up yet (a master that starts a
    moment later is normal: said every 5 s, not per try), on ``_backoff``'s schedule."""
    noted = 0.0

    def waiting(exc: OSError, elapsed_s: float) -> None:
        nonlocal noted
        if elapsed_s - noted >= 5.0:
            noted = elapsed_s
            log.info(
                "waiting for the rendezvous store of %s at %s:%d (%.0f s of %.0f s): %s",
                what,
                address,
                port,
                elapsed_s,
                timeout_s,
                exc,
            )

    try:
        sock = contract.connect_when_listening(
            address,
            port,
            timeout_s,
            _backoff(),
            attempt_timeout_s=5.0,
            source=source,
            on_wait=waiting,
        )
    except OSError as exc:
        raise RendezvousFailed(
            f"cannot reach the rendezvous store of {what} at {address}:{port} "
            f"after {timeout_s:.0f} s: {exc.strerror or exc}"
        ) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
