"""Host discovery: every host of the job to an IP address, bounded and explained.

Hosts are asked of the nameservers in /etc/resolv.conf with dnspython (never /etc/hosts,
which on SageMaker may name the container itself wrongly); the system resolver is used
only when resolv.conf names no nameserver. All hosts are looked up concurrently, and the
whole set is retried under one declared tenacity policy, so each backoff step gives at
most one progress line. IPv4 is preferred; an IPv6-only host works. No reverse lookups.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from smdist import contract
from smdist.errors import ConfigError, HostResolutionFailed, RendezvousFailed

if TYPE_CHECKING:
    import dns.exception
    import dns.resolver

    from smdist.log import Log

NAMESERVER_ENV = "SMDIST_NAMESERVER"
DNS_PORT = 53
# Enough threads that 256 hosts are one burst, few enough to stay cheap for the agent.
_MAX_THREADS = 64
# The last attempt before the deadline still gets a useful moment to run.
_MIN_ATTEMPT_S = 0.2
# A stuck system resolver call is abandoned this long after the attempt's own timeout.
_GRACE_S = 0.5
_CONNECT_ATTEMPT_S = 2.0
_LIST_IN_LOG = 8
_MESSAGE_LIMIT = 1000  # the failure file keeps 1024 characters, headline prefix included
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class DnsPolicy:
    """How long and how hard to look for the job's hosts."""

    timeout_s: float = 900.0
    """Overall deadline (``--dns-timeout``), the SageMaker toolkit's 15 minutes."""
    attempt_timeout_s: float = 2.0
    """One lookup of one host."""
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    nameserver: tuple[str, int] | None = None
    """``(host, port)`` asked instead of resolv.conf's nameservers; None = resolv.conf."""
    resolv_conf: str = "/etc/resolv.conf"

    def __post_init__(self) -> None:
        for name in ("timeout_s", "attempt_timeout_s", "initial_backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                flag = " (--dns-timeout)" if name == "timeout_s" else ""
                raise ConfigError(
                    f"DNS policy: {name}{flag} must be a positive number of seconds, got {value!r}"
                )
        if self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError(
                f"DNS policy: max_backoff_s ({self.max_backoff_s}) is below "
                f"initial_backoff_s ({self.initial_backoff_s})"
            )


class _Miss(Exception):
    """One host not found this attempt; ``str()`` is the short reason for the log."""


class _Pending(Exception):
    """Some hosts are still unresolved after an attempt (the retried condition)."""


@dataclass
class _Host:
    name: str
    attempts: int = 0
    error: str = "not asked yet"
    address: str | None = None
    inflight: Future[str] | None = field(default=None, repr=False)


# --- input validation -----------------------------------------------------------------


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a DNS host name, or None when it can."""
    if not name:
        return "it is empty"
    bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "-_."))), None)
    if bad is not None:
        return f"character {bad!r} is not allowed"
    body = name[:-1] if name.endswith(".") else name
    if len(body) > 253:
        return "it is longer than 253 characters"
    for label in body.split("."):
        if not label:
            return "it has an empty label (a leading dot or two dots in a row)"
        if len(label) > 63:
            return f"label {label[:20]!r}... is longer than 63 characters"
        if not _LABEL.fullmatch(label):
            return f"label {label!r} starts or ends with '-'"
    return None


def _ip_literal(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_nameserver(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` of ``--nameserver`` / ``SMDIST_NAMESERVER``; IPv6 as ``[::1]:5353``."""
    where = f"nameserver {text!r} (--nameserver / {NAMESERVER_ENV})"
    spec = text.strip()
    port_text: str | None = None
    if not spec:
        raise ConfigError(f"{where}: expected HOST[:PORT], got nothing")
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ConfigError(f"{where}: missing ']' after the IPv6 address")
        host, rest = spec[1:end], spec[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{where}: expected ':PORT' after ']', got {rest!r}")
        port_text = rest[1:] if rest else None
        if ":" not in host or _ip_literal(host) is None:
            raise ConfigError(f"{where}: {host!r} in brackets is not an IPv6 address")
    elif spec.count(":") > 1:
        host = spec
        if _ip_literal(host) is None:
            raise ConfigError(f"{where}: not an IPv6 address (write [ADDRESS]:PORT for a port)")
    else:
        host, colon, after = spec.partition(":")
        port_text = after if colon else None
        problem = None if _ip_literal(host) else _name_problem(host)
        if problem:
            raise ConfigError(f"{where}: {host!r} is not an address or host name: {problem}")
    port = DNS_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"{where}: port must be a number 1-65535, got {port_text!r}")
        port = int(port_text)
    return _ip_literal(host) or host, port


# --- one lookup of one host -----------------------------------------------------------


def _dns_reason(exc: dns.exception.DNSException) -> str:
    import dns.resolver

    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no A/AAAA record"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        # Each entry is (server, tcp, port, error, response); error is an rcode's text
        # ("SERVFAIL", "REFUSED") or the exception that took the server out.
        reasons: list[str] = []
        for entry in exc.kwargs.get("errors") or []:
            err = entry[3]
            why = err if isinstance(err, str) else _os_reason(err)
            if why not in reasons:
                reasons.append(why)
        return "/".join(reasons) or "no nameserver answered"
    return type(exc).__name__


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _DnsLookup:
    """Ask dnspython: A first, AAAA only when the name has no A record."""

    def __init__(self, resolver: dns.resolver.Resolver, search: bool, described: str) -> None:
        self.resolver = resolver
        self.search = search
        self.described = described

    def __call__(self, host: str, lifetime: float) -> str:
        import dns.exception
        import dns.resolver

        deadline = time.monotonic() + lifetime
        try:
            try:
                answer = self.resolver.resolve(host, "A", lifetime=lifetime, search=self.search)
            except dns.resolver.NoAnswer:
                left = max(deadline - time.monotonic(), _MIN_ATTEMPT_S)
                answer = self.resolver.resolve(host, "AAAA", lifetime=left, search=self.search)
        except dns.exception.DNSException as exc:
            raise _Miss(_dns_reason(exc)) from exc
        return str(answer[0].address)


class _SystemLookup:
    """``getaddrinfo`` for a container whose resolv.conf names no nameserver."""

    def __init__(self, described: str) -> None:
        self.described = described

    def __call__(self, host: str, lifetime: float) -> str:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _Miss(_gai_reason(exc)) from exc
        addresses = [str(info[4][0]) for info in infos]
        ipv4 = [a for a in addresses if ":" not in a]
        if not addresses:
            raise _Miss("no address")
        return (ipv4 or addresses)[0]


def _gai_reason(exc: socket.gaierror) -> str:
    names: dict[int | None, str] = {
        socket.EAI_NONAME: "not found",
        socket.EAI_AGAIN: "temporary failure",
    }
    nodata = getattr(socket, "EAI_NODATA", None)
    if nodata is not None:
        names[nodata] = "no address"
    return names.get(exc.errno, "") or exc.strerror or str(exc)


def _nameserver_address(host: str) -> str:
    literal = _ip_literal(host)
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, DNS_PORT, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise HostResolutionFailed(
            f"nameserver {host!r} (--nameserver / {NAMESERVER_ENV}) does not resolve: "
            f"{_gai_reason(exc)}"
        ) from None
    addresses = [str(info[4][0]) for info in infos]
    return next((a for a in addresses if ":" not in a), addresses[0])


def _make_lookup(policy: DnsPolicy) -> _DnsLookup | _SystemLookup:
    # Imported here: a single-host job and --simulate never pay for dnspython.
    import dns.exception
    import dns.resolver

    if policy.nameserver is not None:
        host, port = policy.nameserver
        address = _nameserver_address(host)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [address]
        resolver.port = port
        resolver.timeout = policy.attempt_timeout_s
        named = f" ({host})" if host != address else ""
        # An explicit server is asked for exactly the names given: no search list.
        return _DnsLookup(resolver, False, f"nameserver {_endpoint(address, port)}{named}")
    try:
        resolver = dns.resolver.Resolver(filename=policy.resolv_conf)
    except dns.resolver.NoResolverConfiguration as exc:
        why = "no nameserver" if "no nameservers" in str(exc) else "cannot read"
        return _SystemLookup(f"the system resolver ({why} in {policy.resolv_conf})")
    except (ValueError, dns.exception.DNSException) as exc:
        raise ConfigError(f"{policy.resolv_conf}: cannot be used: {exc}") from None
    servers = [_endpoint(str(ns), resolver.port) for ns in resolver.nameservers]
    # Share one attempt among the servers, so a dead first server leaves time for the next.
    resolver.timeout = policy.attempt_timeout_s / max(1, len(servers))
    which = "nameserver" if len(servers) == 1 else "nameservers"
    # The search list applies, as it would for glibc: "algo-1" may live under a domain.
    return _DnsLookup(resolver, True, f"{which} {', '.join(servers)} from {policy.resolv_conf}")


# --- the policy -----------------------------------------------------------------------


def _backoff(
    initial_s: float, max_s: float, deadline_s: float
) -> Callable[[RetryCallState], float]:
    """Exponential backoff with jitter, never sleeping past the deadline."""
    step = wait_exponential(multiplier=initial_s, max=max_s) + wait_random(0, initial_s)

    def wait(state: RetryCallState) -> float:
        left = deadline_s - (state.seconds_since_start or 0.0)
        return max(0.0, min(float(step(state)), left))

    return wait


def _compact(hosts: Sequence[str]) -> str:
    """``algo-2, algo-3, algo-4, algo-7`` -> ``algo-2..algo-4, algo-7`` (runs of 3 or more)."""
    parts: list[str] = []
    run: list[tuple[str, int, str]] = []

    def flush() -> None:
        if len(run) >= 3:
            parts.append(f"{run[0][2]}..{run[-1][2]}")
        else:
            parts.extend(h for _, _, h in run)
        run.clear()

    for host in hosts:
        m = re.fullmatch(r"(.*?)(\d+)", host)
        key = (m.group(1), int(m.group(2)), host) if m else None
        if key and run and run[-1][0] == key[0] and run[-1][1] + 1 == key[1]:
            run.append(key)
            continue
        flush()
        if key:
            run.append(key)
        else:
            parts.append(host)
    flush()
    return ", ".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _host_order(name: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"(.*?)(\d+)", name)
    return (m.group(1), int(m.group(2)), name) if m else (name, -1, name)


def _failure_message(
    missing: list[_Host],
    total: int,
    waited: float,
    policy: DnsPolicy,
    attempts: int,
    described: str,
) -> str:
    by_error: dict[str, list[str]] = {}
    for h in sorted(missing, key=lambda h: _host_order(h.name)):
        by_error.setdefault(h.error, []).append(h.name)
    head = (
        f"{len(missing)} of {total} hosts did not resolve after {waited:.1f} s "
        f"(deadline {policy.timeout_s:g} s, {_plural(attempts, 'attempt')}, asked {described}): "
    )
    body = "; ".join(f"{_compact(names)} {error}" for error, names in by_error.items())
    room = _MESSAGE_LIMIT - len(HostResolutionFailed.category) - 2 - len(head)
    if len(body) > room:
        body = body[: max(0, room - 20)].rsplit(",", 1)[0] + ", ... (more)"
    return head + body


def _latest(had: str, now: str) -> str:
    """What to say about a host still missing: an answer already had (NXDOMAIN, SERVFAIL)
    says more than a later attempt that timed out (a loaded machine's last short attempt
    must not turn "no such host" into "timeout"); a host never answered is a timeout."""
    return had if now == "timeout" and had not in ("not asked yet", "timeout") else now


def resolve_hosts(hosts: Sequence[str], policy: DnsPolicy, log: Log) -> dict[str, str]:
    """host -> IP address string (IPv4 preferred).

    Raises ConfigError at once for a malformed name, HostResolutionFailed at the deadline.
    """
    states: dict[str, _Host] = {}
    result: dict[str, str] = {}
    for host in hosts:
        if not isinstance(host, str):
            raise ConfigError(f"host {host!r}: expected a host name (string)")
        literal = _ip_literal(host)
        if literal is not None:
            result[host] = literal  # an address needs no lookup
            continue
        problem = _name_problem(host)
        if problem:
            raise ConfigError(f"host {host!r} is not a valid host name: {problem}")
        states.setdefault(host, _Host(host))
    if not states:
        return {h: result[h] for h in hosts}

    lookup = _make_lookup(policy)
    log.info(
        "resolving %d host%s with %s (giving up after %g s)",
        len(states),
        "" if len(states) == 1 else "s",
        lookup.described,
        policy.timeout_s,
    )
    start = time.monotonic()
    pool = ThreadPoolExecutor(
        min(_MAX_THREADS, len(states)), thread_name_prefix=contract.DNS_THREAD_PREFIX
    )

    def attempt() -> None:
        pending = [s for s in states.values() if s.address is None]
        left = policy.timeout_s - (time.monotonic() - start)
        lifetime = min(policy.attempt_timeout_s, max(left, _MIN_ATTEMPT_S))
        for s in pending:
            s.attempts += 1
            # A system-resolver call that outlived its attempt is waited on, not doubled.
            if s.inflight is None:
                s.inflight = pool.submit(lookup, s.name, lifetime)
        wait_futures([s.inflight for s in pending if s.inflight], timeout=lifetime + _GRACE_S)
        for s in pending:
            future = s.inflight
            if future is None or not future.done():
                s.error = _latest(s.error, "timeout")
                continue
            s.inflight = None
            exc = future.exception()
            if exc is None:
                s.address = future.result()
            elif isinstance(exc, _Miss):
                s.error = _latest(s.error, str(exc))
            else:
                log.debug("looking up %s failed unexpectedly", s.name, exc_info=exc)
                s.error = f"{type(exc).__name__}: {exc}"
        if any(s.address is None for s in states.values()):
            raise _Pending

    def progress(state: RetryCallState) -> None:
        missing = [s for s in states.values() if s.address is None]
        elapsed = time.monotonic() - start
        shown = ", ".join(
            f"{s.name} {s.error} (attempt {s.attempts}, {elapsed:.1f} s)"
            for s in missing[:_LIST_IN_LOG]
        )
        more = (
            f", ... and {len(missing) - _LIST_IN_LOG} more" if len(missing) > _LIST_IN_LOG else ""
        )
        log.info(
            "waiting for %d/%d hosts: %s%s; next try in %.1f s",
            len(missing),
            len(states),
            shown,
            more,
            state.next_action.sleep if state.next_action else 0.0,
        )

    retrying = Retrying(
        stop=stop_after_delay(policy.timeout_s),
        wait=_backoff(policy.initial_backoff_s, policy.max_backoff_s, policy.timeout_s),
        retry=retry_if_exception_type(_Pending),
        before_sleep=progress,
    )
    try:
        retrying(attempt)
    except RetryError as exc:
        missing = [s for s in states.values() if s.address is None]
        message = _failure_message(
            missing,
            len(states),
            time.monotonic() - start,
            policy,
            exc.last_attempt.attempt_number,
            lookup.described,
        )
        raise HostResolutionFailed(message) from None
    finally:
        # Never wait here for a stuck getaddrinfo: its thread ends on its own.
        pool.shutdown(wait=False, cancel_futures=True)

    found = {s.name: s.address for s in states.values() if s.address is not None}
    listed = ", ".join(f"{h}={a}" for h, a in list(found.items())[:_LIST_IN_LOG])
    more = f", ... and {len(found) - _LIST_IN_LOG} more" if len(found) > _LIST_IN_LOG else ""
    log.info(
        "resolved %d host%s in %.2f s: %s%s",
        len(found),
        "" if len(found) == 1 else "s",
        time.monotonic() - start,
        listed,
        more,
    )
    result.update(found)
    return {h: result[h] for h in hosts}


# --- reachability ---------------------------------------------------------------------


def wait_reachable(host: str, address: str, port: int, timeout_s: float, log: Log) -> None:
    """Wait until ``address:port`` accepts a TCP connection, or raise RendezvousFailed."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"port of host {host}: must be 1-65535, got {port!r}")
    if not timeout_s > 0:
        raise ConfigError(f"reachability timeout for host {host}: must be > 0, got {timeout_s!r}")
    target = _endpoint(address, port)
    start = time.monotonic()

    def attempt() -> None:
        left = timeout_s - (time.monotonic() - start)
        limit = min(_CONNECT_ATTEMPT_S, max(left, _MIN_ATTEMPT_S))
        with socket.create_connection((address, port), timeout=limit):
            pass

    def progress(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.info(
            "waiting for %s at %s to accept connections: %s (attempt %d, %.1f s)",
            host,
            target,
            _os_reason(exc) if exc else "?",
            state.attempt_number,
            time.monotonic() - start,
        )

    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=_backoff(0.05, 2.0, timeout_s),
        retry=retry_if_exception_type(OSError),
        before_sleep=progress,
    )
    try:
        retrying(attempt)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise RendezvousFailed(
            f"cannot connect to host {host} at {target}: {_os_reason(last) if last else '?'} "
            f"(waited {time.monotonic() - start:.1f} s, "
            f"{_plural(exc.last_attempt.attempt_number, 'attempt')})"
        ) from None
    log.info("host %s at %s accepts connections", host, target)
