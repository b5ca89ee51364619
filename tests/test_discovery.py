"""Host discovery against a real DNS server on loopback (tests/dns_server.py), real sockets.

No resolver is patched: dnspython sends real UDP queries to the server the test runs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from smdist.agent.discovery import DnsPolicy, parse_nameserver, resolve_hosts, wait_reachable
from smdist.errors import ConfigError, HostResolutionFailed, RendezvousFailed

# tests/ is not a package: make the helper importable however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dns_server import DnsServer

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")

# Short deadlines keep the failing cases fast; the defaults are for real jobs.
FAST = DnsPolicy(attempt_timeout_s=0.5, initial_backoff_s=0.05, max_backoff_s=0.2)


class LogWatch(logging.Handler):
    """Collects a logger's lines and lets a test await one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records]

    def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        rx = re.compile(pattern)

        def found() -> str | None:
            return next((r.getMessage() for r in self.records if rx.search(r.getMessage())), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no log line matched {pattern!r}; got {self.lines}")
            line = found()
            assert line is not None
            return line


@pytest.fixture
def log(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, LogWatch]]:
    logger = logging.getLogger(f"smdist.test.{request.node.name}")
    logger.setLevel(logging.DEBUG)
    watch = LogWatch()
    logger.addHandler(watch)
    yield logger, watch
    logger.removeHandler(watch)
    # Whatever happened, an expected retry never logs a traceback.
    assert not [r for r in watch.records if r.exc_info and r.levelno > logging.DEBUG]


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def policy(server: DnsServer, timeout_s: float = 20.0, **kw: Any) -> DnsPolicy:
    return replace(FAST, timeout_s=timeout_s, nameserver=server.endpoint, **kw)


def in_background(fn: Callable[[], T]) -> Future[T]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


def test_all_hosts_resolve(dns: DnsServer, log: tuple[logging.Logger, LogWatch]) -> None:
    for i in range(1, 5):
        dns.add(f"algo-{i}", a=f"10.0.0.{i}")
    got = resolve_hosts(["algo-1", "algo-2", "algo-3", "algo-4"], policy(dns), log[0])
    assert got == {f"algo-{i}": f"10.0.0.{i}" for i in range(1, 5)}
    assert any(line.startswith("resolved 4 hosts in") for line in log[1].lines)


def test_ipv4_preferred_and_an_ipv6_only_host_works(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    dns.add("algo-1", a="10.0.0.1", aaaa="fd00::1")
    dns.add("algo-2", aaaa="fd00::2")
    got = resolve_hosts(["algo-1", "algo-2"], policy(dns), log[0])
    assert got == {"algo-1": "10.0.0.1", "algo-2": "fd00::2"}


def test_host_whose_record_appears_later_is_waited_for(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    logger, watch = log
    dns.add("algo-1", a="10.0.0.1")
    dns.add("algo-2", a="10.0.0.2")
    future = in_background(
        lambda: resolve_hosts(["algo-1", "algo-2", "algo-3"], policy(dns), logger)
    )
    line = watch.wait_for(r"algo-3 NXDOMAIN")
    assert re.match(r"waiting for 1/3 hosts: algo-3 NXDOMAIN \(attempt \d+, [\d.]+ s\)", line)
    assert not future.done()
    dns.add("algo-3", a="10.0.0.3")
    assert future.result(timeout=20) == {
        "algo-1": "10.0.0.1",
        "algo-2": "10.0.0.2",
        "algo-3": "10.0.0.3",
    }


def test_host_that_never_appears_fails_at_the_deadline(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    dns.add("algo-1", a="10.0.0.1")
    with pytest.raises(HostResolutionFailed) as err:
        resolve_hosts(["algo-1", "algo-2"], policy(dns, timeout_s=1.5), log[0])
    text = err.value.headline()
    assert text.startswith("HostResolutionFailed: 1 of 2 hosts did not resolve after ")
    assert f"asked nameserver 127.0.0.1:{dns.port}" in text
    assert "deadline 1.5 s" in text
    assert text.endswith(": algo-2 NXDOMAIN")
    assert "\n" not in text
    waited = float(re.search(r"after ([\d.]+) s", text).group(1))  # type: ignore[union-attr]
    assert waited >= 1.5
    assert dns.queries("algo-2") >= 2  # retried, not given up after one miss
    assert any(line.startswith("waiting for 1/2 hosts: algo-2 NXDOMAIN") for line in log[1].lines)


def test_an_answer_had_is_not_replaced_by_a_later_attempt_timing_out(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    # algo-2 is answered NXDOMAIN, then the server goes silent for it (as a loaded machine's
    # last short attempt does): the user is told the name does not exist, not "timeout".
    logger, watch = log
    dns.add("algo-1", a="10.0.0.1")
    future = in_background(
        lambda: resolve_hosts(["algo-1", "algo-2"], policy(dns, timeout_s=3.0), logger)
    )
    watch.wait_for(r"waiting for 1/2 hosts: algo-2 NXDOMAIN")
    asked = dns.queries("algo-2")
    dns.drop("algo-2")
    with pytest.raises(HostResolutionFailed) as err:
        future.result(timeout=20)
    assert dns.queries("algo-2") > asked  # asked again after the answer, and not answered
    assert str(err.value).endswith(": algo-2 NXDOMAIN")


def test_servfail_is_retried_until_the_server_recovers(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    logger, watch = log
    dns.add("algo-1", a="10.0.0.1")
    dns.servfail("algo-1")
    future = in_background(lambda: resolve_hosts(["algo-1"], policy(dns), logger))
    watch.wait_for(r"waiting for 1/1 hosts: algo-1 SERVFAIL")
    dns.servfail("algo-1", on=False)
    assert future.result(timeout=20) == {"algo-1": "10.0.0.1"}


def test_servfail_and_a_silent_server_are_reported(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    dns.add("algo-1", a="10.0.0.1")
    dns.add("algo-2", a="10.0.0.2")
    dns.add("algo-3", a="10.0.0.3")
    dns.servfail("algo-2")
    dns.drop("algo-3")
    with pytest.raises(HostResolutionFailed) as err:
        resolve_hosts(["algo-1", "algo-2", "algo-3"], policy(dns, timeout_s=2.0), log[0])
    assert str(err.value).endswith(": algo-2 SERVFAIL; algo-3 timeout")
    assert dns.queries("algo-2") >= 2
    assert dns.queries("algo-3") >= 2
    assert any("algo-3 timeout (attempt" in line for line in log[1].lines)


def test_a_server_that_never_answers_times_out_every_host(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    dns.drop_all = True
    hosts = [f"algo-{i}" for i in range(1, 9)]
    with pytest.raises(HostResolutionFailed) as err:
        resolve_hosts(hosts, policy(dns, timeout_s=1.5, attempt_timeout_s=0.3), log[0])
    assert "8 of 8 hosts" in str(err.value)
    assert str(err.value).endswith(": algo-1..algo-8 timeout")
    assert all(dns.queries(h) >= 2 for h in hosts)


def test_many_unresolved_hosts_fit_the_failure_file(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch]
) -> None:
    hosts = [f"algo-{i}" for i in range(1, 301)] + ["param-server"]
    dns.add("algo-7", a="10.0.0.7")
    with pytest.raises(HostResolutionFailed) as err:
        # The deadline leaves every host time for at least one answer even on a loaded
        # machine; a host that never got one would be reported as a timeout instead.
        resolve_hosts(hosts, policy(dns, timeout_s=6.0), log[0])
    text = err.value.headline()
    assert len(text) <= 1024
    # Every host is named, runs of numbered hosts compacted; the summary comes first.
    assert text.endswith(": algo-1..algo-6, algo-8..algo-300, param-server NXDOMAIN")
    assert "300 of 301 hosts did not resolve" in text
    # The progress line names a few hosts and counts the rest, never all 300.
    line = next(x for x in log[1].lines if x.startswith("waiting for 300/301 hosts"))
    assert "... and 292 more" in line


def test_256_hosts_resolve_concurrently(
    log: tuple[logging.Logger, LogWatch], capsys: pytest.CaptureFixture[str]
) -> None:
    # Each answer takes 50 ms, so queries asked one after another could never overlap.
    with DnsServer(delay_s=0.05) as dns:
        hosts = [f"algo-{i}" for i in range(1, 257)]
        for i, host in enumerate(hosts):
            dns.add(host, a=f"10.1.{i // 200}.{i % 200 + 1}")
        start = time.monotonic()
        got = resolve_hosts(hosts, policy(dns), log[0])
        took = time.monotonic() - start
        assert len(got) == 256
        assert got["algo-256"] == "10.1.1.56"
        assert dns.max_in_flight >= 16
        assert dns.total_queries() == 256  # one A query each: nothing asked twice
    with capsys.disabled():
        print(f"\n256 hosts resolved in {took:.2f} s, {dns.max_in_flight} queries in flight")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("algo 1", "character ' ' is not allowed"),
        ("", "it is empty"),
        ("algo..1", "empty label"),
        ("-algo", "starts or ends with '-'"),
        ("a" * 64, "longer than 63 characters"),
        ("algö-1", "character 'ö' is not allowed"),
    ],
)
def test_a_malformed_name_fails_at_once(
    dns: DnsServer, log: tuple[logging.Logger, LogWatch], name: str, why: str
) -> None:
    dns.add("algo-1", a="10.0.0.1")
    with pytest.raises(ConfigError) as err:
        # The default 15-minute deadline: only an immediate error passes the timeout.
        resolve_hosts(["algo-1", name], DnsPolicy(nameserver=dns.endpoint), log[0])
    assert str(err.value).startswith(f"host {name!r} is not a valid host name: ")
    assert why in str(err.value)
    assert dns.total_queries() == 0


def test_an_address_is_taken_as_it_is(dns: DnsServer, log: tuple[logging.Logger, LogWatch]) -> None:
    dns.add("algo-1", a="10.0.0.1")
    got = resolve_hosts(["algo-1", "10.9.8.7", "fd00::7"], policy(dns), log[0])
    assert got == {"algo-1": "10.0.0.1", "10.9.8.7": "10.9.8.7", "fd00::7": "fd00::7"}
    assert dns.total_queries() == 1


def test_resolv_conf_without_nameserver_falls_back_to_the_system_resolver(
    tmp_path: Path, log: tuple[logging.Logger, LogWatch]
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# no nameserver here\nsearch example.invalid\noptions ndots:1\n")
    got = resolve_hosts(["localhost"], replace(FAST, resolv_conf=str(conf)), log[0])
    assert got == {"localhost": "127.0.0.1"}
    assert f"the system resolver (no nameserver in {conf})" in log[1].lines[0]


def test_resolv_conf_nameserver_and_search_list_are_used(
    tmp_path: Path, log: tuple[logging.Logger, LogWatch]
) -> None:
    # resolv.conf has no port: the server must own port 53, on an address of its own.
    address = f"127.53.{os.getpid() >> 8 & 255}.{os.getpid() & 255 or 1}"
    try:
        server = DnsServer(address, 53)
    except PermissionError:
        pytest.skip("binding port 53 needs root (resolv.conf cannot name another port)")
    with server:
        server.add("algo-1.cluster.test", a="10.0.0.1")
        server.add("algo-2", a="10.0.0.2")  # only as an absolute name
        conf = tmp_path / "resolv.conf"
        conf.write_text(f"search cluster.test\nnameserver {address}\n")
        got = resolve_hosts(["algo-1", "algo-2"], DnsPolicy(resolv_conf=str(conf)), log[0])
        assert got == {"algo-1": "10.0.0.1", "algo-2": "10.0.0.2"}
        assert f"nameserver {address}:53 from {conf}" in log[1].lines[0]


def test_nameserver_by_ipv6_address_and_by_name(log: tuple[logging.Logger, LogWatch]) -> None:
    try:
        server6 = DnsServer("::1")
    except OSError:
        pytest.skip("this machine has no IPv6 loopback (::1)")
    with server6 as dns:
        dns.add("algo-1", a="10.0.0.1")
        ns = parse_nameserver(f"[::1]:{dns.port}")
        assert resolve_hosts(["algo-1"], DnsPolicy(nameserver=ns), log[0]) == {"algo-1": "10.0.0.1"}
    with DnsServer() as dns:
        dns.add("algo-1", a="10.0.0.1")
        ns = parse_nameserver(f"localhost:{dns.port}")
        assert resolve_hosts(["algo-1"], DnsPolicy(nameserver=ns), log[0]) == {"algo-1": "10.0.0.1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("10.0.0.2:5353", ("10.0.0.2", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("fd00::53", ("fd00::53", 53)),
        (" dns.internal:53 ", ("dns.internal", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected HOST[:PORT], got nothing"),
        ("10.0.0.2:0", "port must be a number 1-65535, got '0'"),
        ("10.0.0.2:70000", "port must be a number 1-65535"),
        ("10.0.0.2:", "port must be a number 1-65535, got ''"),
        ("10.0.0.2:dns", "got 'dns'"),
        ("[::1", "missing ']'"),
        ("[::1]5353", "expected ':PORT' after ']'"),
        ("[10.0.0.2]:53", "is not an IPv6 address"),
        ("fd00::zz", "not an IPv6 address"),
        ("bad host:53", "is not an address or host name"),
    ],
)
def test_parse_nameserver_rejects_bad_input(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_nameserver(text)
    message = str(err.value)
    assert message.startswith(f"nameserver {text!r} (--nameserver / SMDIST_NAMESERVER): ")
    assert why in message
    assert "\n" not in message


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(
        ConfigError,
        match=r"timeout_s \(--dns-timeout\) must be a positive number of seconds, got 0",
    ):
        DnsPolicy(timeout_s=0)
    with pytest.raises(ConfigError, match="max_backoff_s"):
        DnsPolicy(initial_backoff_s=3, max_backoff_s=1)


def test_wait_reachable_connects_to_a_listening_port(log: tuple[logging.Logger, LogWatch]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        wait_reachable("algo-1", "127.0.0.1", port, 10.0, log[0])
        conn, _ = listener.accept()  # the check really connected
        conn.close()


def test_wait_reachable_waits_for_a_late_listener(log: tuple[logging.Logger, LogWatch]) -> None:
    logger, watch = log
    # Bound but not listening: connections are refused until listen(), and no one can take
    # the port in between.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        done = in_background(lambda: wait_reachable("algo-1", "127.0.0.1", port, 20, logger))
        watch.wait_for(
            rf"waiting for algo-1 at 127.0.0.1:{port} to accept connections: "
            r"connection refused \(attempt 1, "
        )
        sock.listen()
        done.result(timeout=20)
        sock.settimeout(5)
        sock.accept()[0].close()  # the connection that succeeded is really there
    finally:
        sock.close()


def test_wait_reachable_names_host_address_and_port_when_closed(
    log: tuple[logging.Logger, LogWatch],
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # never listens: refused
    port = sock.getsockname()[1]
    try:
        with pytest.raises(RendezvousFailed) as err:
            wait_reachable("algo-1", "127.0.0.1", port, 1.0, log[0])
    finally:
        sock.close()
    text = err.value.headline()
    assert text.startswith(
        f"RendezvousFailed: cannot connect to host algo-1 at 127.0.0.1:{port}: connection refused"
    )
    assert re.search(r"\(waited [\d.]+ s, \d+ attempts\)$", text)


def test_wait_reachable_rejects_a_bad_port(log: tuple[logging.Logger, LogWatch]) -> None:
    with pytest.raises(ConfigError, match="port of host algo-1: must be 1-65535, got 0"):
        wait_reachable("algo-1", "127.0.0.1", 0, 1.0, log[0])
