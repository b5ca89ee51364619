"""A real DNS server on loopback for tests, built on dnslib, changeable while it runs.

It listens on a real UDP socket (a thread per query, like a real server under load),
answers A and AAAA from a table the test edits at run time, and can be told to answer
SERVFAIL for a name, to drop a name's queries, or to drop every query. It counts the
queries it gets per name and the most it had in flight at once.

Also runnable for manual tries: ``python -m tests.dns_server --port 5353 algo-1=10.0.0.1``.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False  # on UDP it would let two servers share a port silently
    dns: DnsServer


class _Handler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns._answer(data)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class DnsServer:
    """``with DnsServer() as dns: dns.add("algo-1", a="10.0.0.1")``; ``dns.endpoint``."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0, delay_s: float = 0.0):
        self.delay_s = delay_s
        """How long each answer takes (to see queries overlap)."""
        self.drop_all = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._a: dict[str, list[str]] = {}
        self._aaaa: dict[str, list[str]] = {}
        self._servfail: set[str] = set()
        self._drop: set[str] = set()
        self._queries: Counter[str] = Counter()
        self._in_flight = 0
        self.max_in_flight = 0
        server_class = type(
            "_Server",
            (_UDPServer,),
            {"address_family": socket.AF_INET6 if ":" in address else socket.AF_INET},
        )
        self._server = server_class((address, port), _Handler)
        self._server.dns = self
        self.address = address
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.address, self.port)

    def start(self) -> DnsServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="dns-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the test changes ---

    def add(self, name: str, a: str | Sequence[str] = (), aaaa: str | Sequence[str] = ()) -> None:
        """Add a name with its A and/or AAAA records (replacing any it had)."""
        with self._lock:
            self._a[_key(name)] = [a] if isinstance(a, str) else list(a)
            self._aaaa[_key(name)] = [aaaa] if isinstance(aaaa, str) else list(aaaa)

    def remove(self, name: str) -> None:
        with self._lock:
            self._a.pop(_key(name), None)
            self._aaaa.pop(_key(name), None)

    def servfail(self, name: str, on: bool = True) -> None:
        with self._lock:
            (self._servfail.add if on else self._servfail.discard)(_key(name))

    def drop(self, name: str, on: bool = True) -> None:
        with self._lock:
            (self._drop.add if on else self._drop.discard)(_key(name))

    # --- what the test observes ---

    def queries(self, name: str) -> int:
        """How many queries (any type) arrived for ``name``."""
        with self._lock:
            return self._queries[_key(name)]

    def total_queries(self) -> int:
        with self._lock:
            return sum(self._queries.values())

    def wait_for_queries(self, name: str, count: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._queries[_key(name)] >= count, timeout)

    # --- the server side ---

    def _answer(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # a real server ignores garbage; so does this one
            return None
        name = _key(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self._changed:
            self._queries[name] += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._changed.notify_all()
            dropped = self.drop_all or name in self._drop
            servfail = name in self._servfail
            exists = name in self._a
            records = {"A": self._a, "AAAA": self._aaaa}.get(qtype, {}).get(name, [])
        try:
            if self.delay_s:
                time.sleep(self.delay_s)  # a slow server, so that overlapping queries show
            if dropped:
                return None
            reply = request.reply()
            if servfail:
                reply.header.rcode = RCODE.SERVFAIL
            elif not exists:
                reply.header.rcode = RCODE.NXDOMAIN
            for address in records:
                rdata: Any = AAAA(address) if qtype == "AAAA" else A(address)
                reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=0))
            packed: bytes = reply.pack()
            return packed
        finally:
            with self._lock:
                self._in_flight -= 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5353)
    parser.add_argument("records", nargs="*", metavar="NAME=ADDRESS")
    args = parser.parse_args()
    server = DnsServer(args.address, args.port)
    for record in args.records:
        name, _, address = record.partition("=")
        family = ipaddress.ip_address(address).version
        server.add(name, a=address if family == 4 else [], aaaa=address if family == 6 else [])
    print(f"serving DNS on {args.address}:{server.port}", flush=True)
    server.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
