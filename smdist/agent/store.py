"""The rendezvous store: a small key-value server the master agent hosts, over TCP.

Why not torch's TCPStore: importing torch costs the agent about 2 s on a small host, and
the agent must not sit between a job and its first step. This store is a few hundred
lines of standard library: newline-delimited JSON requests, one thread per connection,
and server-side blocking waits (so waiting on a key costs no polling).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from smdist.errors import RendezvousFailed

log = logging.getLogger("smdist")


class StoreUnavailable(RendezvousFailed):
    """The connection to the master's store broke (its host is gone)."""


class StoreServer:
    """Serves the store on ``port`` on every interface (IPv4 and IPv6 where available)."""

    def __init__(
        self,
        port: int,
        host_label: str = "this host",
        on_disconnect: Callable[[StoreServer, str], None] | None = None,
    ) -> None:
        """``on_disconnect(server, host)`` runs when a client that said ``hello`` as
        ``host`` drops its connection (its agent died or its container was killed)."""
        self._on_disconnect = on_disconnect
        self._data: dict[str, str] = {}
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        try:
            if socket.has_dualstack_ipv6():
                self._sock = socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=False
                )
            else:
                self._sock = socket.create_server(("", port))
        except OSError as exc:
            raise RendezvousFailed(
                f"cannot listen on rendezvous port {port} on {host_label}: "
                f"{exc.strerror or exc} (choose another with --rdzv-port)"
            ) from exc
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="smdist-store", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._cond:
            for conn in list(self._conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._cond.notify_all()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        who: str | None = None
        try:
            with conn, conn.makefile("rb") as rfile:
                for line in rfile:
                    req = json.loads(line)
                    if req.get("op") == "hello":
                        who = str(req["host"])
                        reply: dict[str, Any] = {"ok": True}
                    else:
                        reply = self._handle(req)
                    conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._conns.discard(conn)
            if who is not None and self._on_disconnect and not self._closing.is_set():
                self._on_disconnect(self, who)

    # Server-side access for ``on_disconnect`` (same semantics as the client's ops).
    def local_get(self, key: str) -> str | None:
        with self._cond:
            return self._data.get(key)

    def local_compare_set(self, key: str, expected: str | None, desired: str) -> str | None:
        reply = self._handle(
            {"op": "compare_set", "key": key, "expected": expected, "desired": desired}
        )
        value: str | None = reply["value"]
        return value

    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        with self._cond:
            data = self._data
            if op == "set":
                data[req["key"]] = req["value"]
                self._cond.notify_all()
                return {"ok": True}
            if op == "get":
                return {"value": data.get(req["key"])}
            if op == "add":
                value = int(data.get(req["key"], "0")) + int(req["amount"])
                data[req["key"]] = str(value)
                self._cond.notify_all()
                return {"value": value}
            if op == "compare_set":
                current = data.get(req["key"])
                if current == req["expected"]:
                    data[req["key"]] = req["desired"]
                    self._cond.notify_all()
                    return {"value": req["desired"]}
                return {"value": current}
            if op == "prefix":
                p = req["prefix"]
                return {"items": {k: v for k, v in data.items() if k.startswith(p)}}
            if op == "wait":
                keys, need_all = req["keys"], req["all"]

                def ready() -> bool:
                    found = [k in data for k in keys]
                    return all(found) if need_all else any(found)

                ok = self._cond.wait_for(
                    lambda: ready() or self._closing.is_set(), timeout=req["timeout"]
                )
                return {"ok": bool(ok) and ready()}
        return {"error": f"unknown op {op!r}"}


class StoreClient:
    """One connection to the store; safe to share between threads (one request at a time)."""

    def __init__(
        self,
        address: str,
        port: int,
        connect_timeout_s: float,
        what: str,
        identity: str | None = None,
    ) -> None:
        """``identity``: this agent's host, so the server notices when this connection
        drops without the host having left."""
        self.address, self.port = address, port
        self._lock = threading.Lock()

        last_note = [0.0]

        def note(state: Any) -> None:
            # A master that starts a moment later is normal: say so every 5 s, not per try.
            if state.seconds_since_start - last_note[0] < 5.0:
                return
            last_note[0] = state.seconds_since_start
            log.info(
                "waiting for the rendezvous store of %s at %s:%d (%.0f s of %.0f s): %s",
                what,
                address,
                port,
                state.seconds_since_start,
                connect_timeout_s,
                state.outcome.exception(),
            )

        policy = Retrying(
            stop=stop_after_delay(connect_timeout_s),
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
            retry=retry_if_exception_type(OSError),
            before_sleep=note,
            reraise=True,
        )
        try:
            self._sock = policy(socket.create_connection, (address, port), timeout=5.0)
        except OSError as exc:
            raise RendezvousFailed(
                f"cannot reach the rendezvous store of {what} at {address}:{port} "
                f"after {connect_timeout_s:.0f} s: {exc.strerror or exc}"
            ) from exc
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rfile = self._sock.makefile("rb")
        self._what = what
        if identity is not None:
            self._call(op="hello", host=identity)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _call(self, **req: Any) -> dict[str, Any]:
        with self._lock:
            try:
                self._sock.sendall(json.dumps(req).encode() + b"\n")
                line = self._rfile.readline()
            except OSError as exc:
                raise StoreUnavailable(
                    f"lost the rendezvous store of {self._what} at {self.address}:{self.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
        if not line:
            raise StoreUnavailable(
                f"lost the rendezvous store of {self._what} at {self.address}:{self.port}: "
                "connection closed"
            )
        reply: dict[str, Any] = json.loads(line)
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

    def wait(self, keys: Iterable[str], timeout_s: float, *, all_keys: bool = True) -> bool:
        """Block (server-side) until the keys exist; False when ``timeout_s`` passed first."""
        return bool(self._call(op="wait", keys=list(keys), all=all_keys, timeout=timeout_s)["ok"])
