"""Agents meet, agree on the rank map, and share job-wide events.

Single host: nothing to meet, a ``LocalCoordinator``. Several hosts: the master's agent
hosts a store (``smdist.agent.store``), every agent joins it, publishes its process count and
reads the plan. The same store then carries the job's one ``abort`` event (the first
failure, a stop request, or a lost host: first writer wins, so it is the root cause),
heartbeats, and the exit barrier.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from smdist.agent.model_dir import decode_inventory, encode_inventory
from smdist.agent.stages import Stopped, StopRequested
from smdist.agent.topology import Layout, build_layout, master_host, sorted_hosts
from smdist.errors import JobAborted, RendezvousFailed, SmdistError
from smdist.log import log
from smdist.records import asdict, dataclass, field

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any, Protocol

    from smdist.agent.report.failure import WorkerFailure
    from smdist.agent.store import StoreClient, StoreServer, StoreUnavailable
else:
    Protocol = object  # the structural type exists for mypy only

ABORT = "abort"
ALL_DONE = "alldone"
FINISHED_ALL = "finishedall"
FINISHED = "done/"
INVENTORY = "inventory/"
INVENTORIED_ALL = "inventoriedall"
WAY_OUT = "hang/wayout"
"""How many hosts have every rank on its way out (``Coordinator.on_way_out``): a counter,
one key, so that a host waiting on its own finished ranks reads one value per look."""
PUBLISHED = "pub/"  # keys of Coordinator.publish, apart from the coordinator's own
STOP_NOTICE_S = 1.0
"""How long a host stopped at the rendezvous spends telling the others (bounded: a stop
must end the agent within a second or two)."""
STACKS = "stacks"  # a hang check was asked for: every host reports its ranks' stacks
STACKS_OF = "stacks/"

Inventory = Mapping[str, tuple[int, str]]
"""A host's model dir: relative path -> (size, sha256)."""
CheckOutputs = Callable[[Mapping[str, Inventory]], "JobEvent | None"]
"""The master's check of every host's inventory at the exit barrier: an event fails the job."""


@dataclass(frozen=True)
class JobEvent:
    """Why the job must end early: ``failure`` of a worker, ``stop`` asked, ``lost`` host."""

    kind: str
    host: str
    headline: str
    exit_code: int
    rank: int | None = None
    time: float = 0.0
    failure: dict[str, Any] | None = None
    """The root-cause worker's ``WorkerFailure.to_dict()``, so every host can classify it."""

    @staticmethod
    def lost(host: str, why: str) -> JobEvent:
        """``host`` stopped responding (its container was killed, its agent died)."""
        headline = f"HostLost: host {host} stopped responding ({why})"
        return JobEvent(kind="lost", host=host, headline=headline, exit_code=1, time=time.time())

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> JobEvent:
        return JobEvent(**json.loads(text))


@dataclass(frozen=True)
class Departure:
    """What an attempt's hosts handed over as they left (everyone's on the master)."""

    failures: dict[str, list[WorkerFailure]]
    """Other hosts' failed workers, by host."""
    step_rates: dict[int, float]
    """Steps per second by rank (this host's; every host's on the master)."""


@dataclass(frozen=True)
class RendezvousSettings:
    port: int = 29400
    timeout_s: float = 600.0
    master_port: int | None = None
    heartbeat_interval_s: float = 2.0
    """A watcher's wait: its heartbeat. The timeout, not this, decides when a host is lost
    (its next wait late by more than it); every wait wakes at once on the abort."""
    heartbeat_timeout_s: float = 10.0
    leave_timeout_s: float = 5.0


@dataclass(frozen=True)
class JobPlan:
    layout: Layout
    master_addr: str
    master_port: int
    addresses: Mapping[str, str] = field(default_factory=dict)
    """Every host's address as this agent resolved it (the MPI backend's mpirun uses them)."""
    tokens: Mapping[str, str] = field(default_factory=dict)
    """Each host's random token for this job (the name of its model-dir marker)."""


class Coordinator(Protocol):
    def report(self, event: JobEvent) -> JobEvent:
        """Publish ``event`` unless one exists; return the job's event (the first)."""

    def event(self) -> JobEvent | None: ...

    def start_watch(self, notify: Callable[[], None]) -> None: ...

    def finished(self) -> None:
        """This host's workers all exited 0: enter the exit barrier. Once every host is
        there, each takes its model-dir inventory (the rendezvous' ``take_inventory``),
        checked for clashes between hosts before the job may succeed."""

    def all_done(self) -> bool: ...

    def unfinished(self) -> list[str]:
        """Hosts whose workers are still running (for the exit barrier's progress line)."""

    def on_way_out(self) -> bool:
        """Every rank of this host finished its work (said once per attempt, by hosts that
        watch for hangs; a host without ranks too); True when that makes every host's."""

    def all_on_way_out(self) -> bool:
        """Whether every host's ranks finished their work (one read)."""

    def publish(self, key: str, value: str) -> None:
        """Share ``key`` with every host's agent (e.g. a backend's readiness)."""

    def wait_for(
        self, keys: Sequence[str], timeout_s: float, *, or_abort: bool = False
    ) -> list[str]:
        """Wait up to ``timeout_s`` for published ``keys``; return those still missing.
        ``or_abort``: return early when the job's abort event appears (then ``event()``)."""

    def published(self, prefix: str) -> dict[str, str]:
        """Every published key under ``prefix`` (keys as given to ``publish``)."""

    def request_stacks(self) -> None:
        """A hang: ask every host for its ranks' stacks and progress."""

    def stacks_requested(self) -> bool: ...

    def put_stacks(self, ranks: Sequence[Mapping[str, Any]]) -> None:
        """This host's answer to a hang check (``hang.rank_report`` per rank)."""

    def stacks(self) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
        """The hang check's answers by host, and the hosts that have not answered yet."""

    def close(
        self,
        failures: Sequence[WorkerFailure] = (),
        step_rates: Mapping[int, float] | None = None,
        leave_within_s: float | None = None,
    ) -> Departure:
        """Leave the attempt, handing over this host's failures and step rates; the master
        gets every other host's back (waiting at most ``leave_within_s``, default the
        settings' ``leave_timeout_s``), so its report covers every rank."""

    def stop_before_workers(self, event: JobEvent) -> None:
        """A stop reached this host after the rendezvous but before its workers ran (a
        request may have been cut in half): publish it job-wide, on a fresh connection,
        and leave."""


class LocalCoordinator:
    """One host: events stay in this process."""

    def __init__(self, take_inventory: Callable[[], Inventory] | None = None) -> None:
        self._take_inventory = take_inventory
        self._event: JobEvent | None = None
        self._done = False
        self._published: dict[str, str] = {}
        self._way_out = False
        self._stacks_requested = False
        self._stacks: list[dict[str, Any]] | None = None

    def report(self, event: JobEvent) -> JobEvent:
        if self._event is None:
            self._event = event
        return self._event

    def event(self) -> JobEvent | None:
        return self._event

    def start_watch(self, notify: Callable[[], None]) -> None:
        pass

    def finished(self) -> None:
        if self._take_inventory is not None:
            self._take_inventory()  # its clean-up: nobody to compare the inventory with
        self._done = True

    def all_done(self) -> bool:
        return self._done

    def unfinished(self) -> list[str]:
        return []

    def on_way_out(self) -> bool:
        self._way_out = True
        return True

    def all_on_way_out(self) -> bool:
        return self._way_out

    def publish(self, key: str, value: str) -> None:
        self._published[key] = value

    def wait_for(
        self, keys: Sequence[str], timeout_s: float, *, or_abort: bool = False
    ) -> list[str]:
        return [k for k in keys if k not in self._published]  # no one else could publish

    def published(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self._published.items() if k.startswith(prefix)}

    def request_stacks(self) -> None:
        self._stacks_requested = True

    def stacks_requested(self) -> bool:
        return self._stacks_requested

    def put_stacks(self, ranks: Sequence[Mapping[str, Any]]) -> None:
        self._stacks = [dict(r) for r in ranks]

    def stacks(self) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
        return ({"this host": self._stacks} if self._stacks is not None else {}), []

    def close(
        self,
        failures: Sequence[WorkerFailure] = (),
        step_rates: Mapping[int, float] | None = None,
        leave_within_s: float | None = None,
    ) -> Departure:
        return Departure({}, dict(step_rates or {}))

    def stop_before_workers(self, event: JobEvent) -> None:
        self.report(event)


def _hosts_shown(hosts: Sequence[str]) -> str:
    if len(hosts) <= 4:
        return f"{len(hosts)} hosts: " + ", ".join(hosts)
    return f"{len(hosts)} hosts: {', '.join(hosts[:2])}, ..., {hosts[-1]}"


def _hosts_summary(hosts: Sequence[str]) -> dict[str, str]:
    """What a host says of its host list when it joins: a digest and a short form, not the
    list (at 1024 hosts the lists alone were 10 MB for the master to read and parse)."""
    import hashlib  # loaded already by the store's authentication

    digest = hashlib.sha256("\n".join(hosts).encode()).hexdigest()[:32]
    return {"sha256": digest, "shown": _hosts_shown(hosts)}


def _import_store() -> None:
    """The store (its sockets, threads, retries and authentication) is imported only when
    there are other hosts to meet: a one-host job's agent never pays for it (issue 18)."""
    global StoreClient, StoreServer, StoreUnavailable
    from smdist.agent.store import StoreClient, StoreServer, StoreUnavailable


def _bound(port: int) -> int:
    """Bind a TCP socket to ``port`` (0: any free one) and close it; return the port.
    ``_socket``, not ``socket``: its enums cost a one-host job's start-up a few ms."""
    import _socket

    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.bind(("", port))
        bound: int = s.getsockname()[1]
        return bound
    finally:
        s.close()


def free_port() -> int:
    return _bound(0)


def check_port_free(port: int, what: str, host: str) -> None:
    try:
        _bound(port)
    except OSError as exc:
        raise RendezvousFailed(
            f"{what} {port} on {host} is already in use: {exc.strerror or exc}"
        ) from exc


def _wait_logged(
    client: Scoped,
    keys: Sequence[str],
    timeout_s: float,
    what: str,
    where: str,
    hint: Callable[[], str] = str,
) -> None:
    """Wait for ``keys`` with a progress line every 10 s and a deadline.

    The wait ends when every key is there, or when the job's ``abort`` appears (another host
    was stopped, or failed, before the workers ran): then this host leaves the rendezvous too.
    """
    start = time.monotonic()
    next_note = start + 10.0
    while True:
        # One wait for all of them (or the abort): with a thousand hosts, the master is woken
        # once, not per arrival, and nobody fetches the whole store.
        left = timeout_s - (time.monotonic() - start)
        wait_s = max(0.0, min(next_note - time.monotonic(), left))
        arrived = client.wait(keys, wait_s, or_keys=[ABORT])
        abort = client.get(ABORT)
        if abort is not None:
            event = JobEvent.from_json(abort)
            raise JobAborted(event.headline, event.exit_code or 1)
        if arrived:
            return
        missing = client.missing(keys)
        if not missing:
            return
        now = time.monotonic()
        left = timeout_s - (now - start)
        if left <= 0:
            raise RendezvousFailed(
                f"{what} did not arrive at the rendezvous on {where} within {timeout_s:.0f} s: "
                f"missing {', '.join(m.removeprefix('host/') for m in missing)}{hint()}"
            )
        if now >= next_note:
            log.info(
                "waiting for %s at the rendezvous on %s: %d/%d present, missing %s "
                "(%.0f s of %.0f s)%s",
                what,
                where,
                len(keys) - len(missing),
                len(keys),
                ", ".join(m.removeprefix("host/") for m in missing[:8])
                + (" ..." if len(missing) > 8 else ""),
                now - start,
                timeout_s,
                hint(),
            )
            next_note = now + 10.0


def stop_event(stop: StopRequested, host: str) -> JobEvent:
    """The job-wide event of a stop that reached ``host`` before its workers ran."""
    return JobEvent(
        kind="stop",
        host=host,
        headline=f"{Stopped.category}: {stop.describe(host)}",
        exit_code=stop.exit_code,
        time=time.time(),
    )


def _announce_stop(
    stop: StopRequested,
    current_host: str,
    address: str,
    settings: RendezvousSettings,
    master: str,
    hosts: Sequence[str],
    secret: bytes,
    scope: str,
) -> None:
    """Tell the hosts at the rendezvous that this one was stopped (a job-wide stop).

    A fresh connection: the stop may have cut a request on the old one in half. The master
    keeps its store up a moment (bounded) so the hosts that joined read why it ends."""
    _import_store()
    try:
        client = Scoped(
            StoreClient(address, settings.port, STOP_NOTICE_S, master, secret=secret), scope
        )
    except RendezvousFailed:
        return  # the store is not up (yet, or any more): nobody to tell
    try:
        client.compare_set(ABORT, None, stop_event(stop, current_host).to_json())
        _leave_early(client, current_host, master, hosts)
    except StoreUnavailable:
        pass
    finally:
        client.close()


def _leave_early(client: Scoped, current_host: str, master: str, hosts: Sequence[str]) -> None:
    """Leave a rendezvous the job's ``abort`` ends: the master waits (bounded) for the hosts
    that joined to read why before its store goes; the others say they left."""
    if current_host == master:
        joined = client.prefix("host/")
        keys = [f"left/{h}" for h in hosts if h != master and f"host/{h}" in joined]
        if keys:
            client.wait(keys, STOP_NOTICE_S)
    else:
        client.set(f"left/{current_host}", "1")


class Scoped:
    """A store client whose keys live under one attempt's prefix (``attempt/3/plan``), so
    attempts of a restarted job never read each other's plan, events or barrier."""

    def __init__(self, client: StoreClient, prefix: str) -> None:
        self.client, self.p = client, prefix

    def set(self, key: str, value: str) -> None:
        self.client.set(self.p + key, value)

    def get(self, key: str) -> str | None:
        return self.client.get(self.p + key)

    def add(self, key: str, amount: int = 1) -> int:
        return self.client.add(self.p + key, amount)

    def compare_set(self, key: str, expected: str | None, desired: str) -> str | None:
        return self.client.compare_set(self.p + key, expected, desired)

    def prefix(self, prefix: str) -> dict[str, str]:
        items = self.client.prefix(self.p + prefix)
        return {k.removeprefix(self.p): v for k, v in items.items()}

    def wait(
        self,
        keys: Sequence[str],
        timeout_s: float,
        *,
        all_keys: bool = True,
        or_keys: Sequence[str] = (),
    ) -> bool:
        return self.client.wait(
            [self.p + k for k in keys],
            timeout_s,
            all_keys=all_keys,
            or_keys=[self.p + k for k in or_keys],
        )

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k.removeprefix(self.p) for k in self.client.missing([self.p + k for k in keys])]

    def wait_values(self, keys: Sequence[str], timeout_s: float) -> dict[str, str] | None:
        got = self.client.wait_values([self.p + k for k in keys], timeout_s)
        return None if got is None else {k.removeprefix(self.p): v for k, v in got.items()}

    def reopen(self, connect_timeout_s: float) -> Scoped:
        return Scoped(self.client.reopen(connect_timeout_s), self.p)

    def close(self) -> None:
        self.client.close()


def attempt_prefix(attempt: int) -> str:
    return f"attempt/{attempt}/"


BEAT = "job/beat"
"""A key nobody sets: the heartbeat's waits on it are only heartbeats."""


class Heartbeat:
    """This host's heartbeat to the master's store for the whole job, across attempts.

    An identified connection (``hello``): the store declares the host lost when it closes
    without the host having left, or when its next wait is late by the heartbeat timeout.
    It starts at the first meeting and ends with the job, so a host that dies in the pause
    between attempts, or at the next meeting, is found as fast as one that dies while its
    workers train. Between attempts it also watches one key (the next meeting's abort) and
    notices the master's store going; either sets ``changed``.
    """

    def __init__(self, client: StoreClient, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self.changed = threading.Event()
        self.lost: str | None = None
        """Why the master's store is gone (the master's host is lost), once it is."""
        self._watch: str | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="smdist-heartbeat", daemon=True)
        self._thread.start()

    def watch(self, key: str | None) -> None:
        """Wake ``changed`` when ``key`` appears (None: watch nothing, only beat)."""
        self._watch = key
        if self.lost is None:
            self.changed.clear()

    def _loop(self) -> None:
        while not self._closing.is_set():
            key = self._watch or BEAT
            try:
                got = self.client.wait_values([key], self.interval_s)
            except RendezvousFailed as exc:  # StoreUnavailable among them
                if not self._closing.is_set():
                    self.lost = str(exc)
                    self.changed.set()
                return
            if got is not None and key == self._watch:
                self._watch = None
                self.changed.set()

    def close(self) -> None:
        self._closing.set()
        self.client.close()  # wakes the thread's wait
        self._thread.join(timeout=5.0)


class Rendezvous:
    """The job's meeting point, for every attempt of it.

    Several hosts: the master's agent hosts the store for the whole job (a restarted job
    meets again on the same port); each attempt meets under its own key prefix with fresh
    connections, agrees on a fresh plan and ``MASTER_PORT``, and leaves through
    ``Coordinator.close``. One host: nothing to meet, a ``LocalCoordinator`` per attempt.
    """

    def __init__(
        self,
        current_host: str,
        hosts: Sequence[str],
        addresses: Mapping[str, str],
        settings: RendezvousSettings,
        check_outputs: CheckOutputs | None = None,
        take_inventory: Callable[[], Inventory] | None = None,
        token: str = "",
        master: str | None = None,
        *,
        secret: bytes = b"",
    ) -> None:
        """``secret``: the job's (smdist.agent.access), which every agent and the master's
        store prove they hold; needed when there is more than one host. ``take_inventory``:
        this host's model-dir inventory, taken once every host's workers finished;
        ``check_outputs`` (the master's) judges them all. ``token``: this host's random
        token, handed to every host in the plan. ``master``: the host that hosts the store
        and the workers' MASTER_ADDR (default the first host; a heterogeneous job's is the
        first host of its distribution)."""
        self.host = current_host
        self.hosts = sorted_hosts(hosts)
        self.master = master or master_host(self.hosts)
        self.addresses = dict(addresses)
        self.settings = settings
        self.check_outputs = check_outputs
        self.take_inventory = take_inventory
        self.token = token
        self.secret = secret
        self.attempt = 0
        self.beat: Heartbeat | None = None
        """This host's heartbeat for the whole job (several hosts; from the first meeting)."""
        self.server: StoreServer | None = None
        if len(self.hosts) > 1:
            _import_store()  # only with other hosts to meet (a one-host job never pays)
        if len(self.hosts) > 1 and current_host == self.master:
            from smdist.agent.access import allow_list

            allow = allow_list(self.addresses.values())
            log.info("rendezvous store admits %s (%s)", allow.describe(), allow.source)
            self.server = StoreServer(
                settings.port,
                current_host,
                on_lost=self._host_gone,
                secret=secret,
                admits=allow.admits,
                hosts=self.hosts,
                heartbeat_timeout_s=settings.heartbeat_timeout_s,
            )

    def close(self) -> None:
        """The job is over on this host (the master's store goes with it)."""
        if self.beat is not None:
            self.beat.close()
        if self.server is not None:
            self.server.close()

    def pause(self, attempt: int, seconds: float) -> None:
        """The pause before ``attempt``'s meeting, the heartbeat going on. Ends early when
        the job ends meanwhile: ``attempt``'s abort appeared (a host lost or stopped; the
        meeting that follows reads it and leaves as for any abort, so the master's store
        stays up until the others have read it), or the master's store is gone
        (``JobAborted``, ``HostLost``)."""
        beat = self.beat
        if beat is None:
            time.sleep(seconds)
            return
        beat.watch(attempt_prefix(attempt) + ABORT)
        try:
            if beat.changed.wait(seconds):
                self._raise_if_master_gone(None)
        finally:
            beat.watch(None)

    def _raise_if_master_gone(self, cause: BaseException | None) -> None:
        """Between attempts: the master's store went (its heartbeat connection broke, or
        ``cause`` says it cannot be reached): its host is lost."""
        beat = self.beat
        if beat is None or self.server is not None:
            return
        why = beat.lost or (str(cause) if cause is not None else None)
        if why is not None:
            event = JobEvent.lost(self.master, why)
            raise JobAborted(event.headline, event.exit_code) from cause

    def meet(self, nproc: int, attempt: int = 0) -> tuple[JobPlan, Coordinator]:
        """Meet the other hosts' agents for ``attempt``; return its plan and coordinator."""
        self.attempt = attempt
        if len(self.hosts) == 1:
            layout = build_layout({self.host: nproc})
            plan = JobPlan(layout, "127.0.0.1", self._port(attempt))
            return plan, LocalCoordinator(self.take_inventory)
        s = self.settings
        master_addr = self.addresses[self.master]
        where = f"{self.master} ({master_addr}:{s.port})"
        connect_to = self._connect_to()
        scope = attempt_prefix(attempt)
        # A restart meets at a store that has been up all along: one that does not answer
        # within the heartbeat timeout is gone with its host.
        connect_s = s.timeout_s if self.beat is None else s.heartbeat_timeout_s
        ctl: Scoped | None = None
        try:
            self._raise_if_master_gone(None)
            ctl = Scoped(
                StoreClient(
                    connect_to, s.port, connect_s, self.master, secret=self.secret,
                    reply_timeout_s=max(s.heartbeat_timeout_s, 30.0),
                ),
                scope,
            )  # fmt: skip
            nprocs = self._agree(ctl, nproc, attempt, where)
            watch = StoreClient(
                connect_to, s.port, connect_s, self.master, secret=self.secret,
                reply_timeout_s=s.heartbeat_timeout_s,
            )  # fmt: skip
            if self.beat is None:
                # Identified: if this agent dies, the master's store sees the connection
                # drop; its waits are this host's heartbeats, for the rest of the job.
                beat = StoreClient(
                    connect_to, s.port, connect_s, self.master, identity=self.host,
                    secret=self.secret, reply_timeout_s=s.heartbeat_timeout_s,
                )  # fmt: skip
                self.beat = Heartbeat(beat, s.heartbeat_interval_s)
        except RendezvousFailed as exc:
            if ctl is not None:
                ctl.close()
            if ctl is None or isinstance(exc, StoreUnavailable):
                # At a restart's meeting, the master's store (up all along) is gone.
                self._raise_if_master_gone(exc)
            raise
        except StopRequested as stop:
            if ctl is not None or self.server is not None:  # the store is up: tell the others
                if ctl is not None:
                    ctl.close()
                self.announce_stop(stop, attempt)
            raise
        except JobAborted:  # another host was stopped (or failed) before the workers ran
            if ctl is not None:
                with contextlib.suppress(StoreUnavailable):
                    _leave_early(ctl, self.host, self.master, self.hosts)
                ctl.close()
            raise
        except BaseException:
            if ctl is not None:
                ctl.close()
            raise
        plan = json.loads(ctl.get("plan") or "{}")
        layout = build_layout(nprocs)
        coordinator = StoreCoordinator(
            self.host, layout, ctl, Scoped(watch, scope), self.server is not None, s,
            self.check_outputs, self.take_inventory,
        )  # fmt: skip
        port = int(plan["master_port"])
        return JobPlan(layout, master_addr, port, self.addresses, plan.get("tokens", {})), (
            coordinator
        )

    def _connect_to(self) -> str:
        return "127.0.0.1" if self.server is not None else self.addresses[self.master]

    def announce_stop(self, stop: StopRequested, attempt: int) -> None:
        """A stop reached this host at (or on its way to) ``attempt``'s meeting: tell the
        hosts there, so none of them waits out the rendezvous timeout."""
        if len(self.hosts) > 1:
            _announce_stop(
                stop, self.host, self._connect_to(), self.settings, self.master, self.hosts,
                self.secret, attempt_prefix(attempt),
            )  # fmt: skip

    def _agree(self, ctl: Scoped, nproc: int, attempt: int, where: str) -> dict[str, int]:
        """Publish this host's process count; the master publishes the plan; read it."""
        timeout_s, ordered = self.settings.timeout_s, self.hosts
        info = {"nproc": nproc, "hosts": _hosts_summary(ordered), "token": self.token}
        ctl.set(f"host/{self.host}", json.dumps(info))
        waiting = "every host" if self.server is not None else "the plan"
        log.info("joined the rendezvous on %s; waiting for %s", where, waiting)
        if self.server is not None:
            server = self.server

            def refused() -> str:
                who = server.refused_secret()
                return (
                    f" (refused for a different secret: {who}; see that host's log)" if who else ""
                )

            _wait_logged(ctl, [f"host/{h}" for h in ordered], timeout_s, "hosts", where, refused)
            joined = ctl.prefix("host/")
            nprocs: dict[str, int] = {}
            tokens: dict[str, str] = {}
            mine = _hosts_summary(ordered)  # once, not once per host (N hashes of N names)
            for h in ordered:
                info = json.loads(joined[f"host/{h}"])
                if info["hosts"] != mine:
                    raise RendezvousFailed(
                        f"hosts differ between {self.master} ({_hosts_shown(ordered)}) and "
                        f"{h} ({info['hosts'].get('shown', '?')}): every host's "
                        "resourceconfig.json must list the same hosts"
                    )
                nprocs[h] = int(info["nproc"])
                tokens[h] = str(info.get("token", ""))
            port = self._port(attempt)
            ctl.set("plan", json.dumps({"nproc": nprocs, "master_port": port, "tokens": tokens}))
        else:
            _wait_logged(ctl, ["plan"], timeout_s, f"the plan of {self.master}", where)
        agreed: dict[str, int] = json.loads(ctl.get("plan") or "{}")["nproc"]
        return agreed

    def _port(self, attempt: int) -> int:
        """The workers' MASTER_PORT: a free one for each attempt, unless one was asked for."""
        port = self.settings.master_port
        if port is None:
            return free_port()
        if attempt == 0:  # a restart reuses it: the last attempt's ranks may leave TIME_WAITs
            check_port_free(port, "worker MASTER_PORT", self.host)
        return port

    def _host_gone(self, server: StoreServer, host: str, why: str) -> None:
        """The master's store saw ``host``'s agent drop its connection without leaving (the
        container was killed or the agent died) or miss its heartbeats (frozen, cut off).
        Declared at once, as the attempt's abort (unless it already has one or is done), so
        it wins over its victims' collective errors. Between attempts (it left the last one;
        the next one's meeting may be under way) it is the next attempt's abort: the hosts
        at that meeting, or pausing before it, end the job at once."""
        k = self.attempt
        scope = attempt_prefix(k)
        if server.local_get(scope + ALL_DONE) is not None:
            return  # the job finished: its hosts are leaving
        if server.local_get(scope + "plan") is None:
            if k == 0:
                return  # nobody beats before the first plan
        elif server.local_get(f"{scope}left/{host}") is not None:
            scope = attempt_prefix(k + 1)  # it left attempt k: the pause before k + 1
        event = JobEvent.lost(host, why)
        server.local_compare_set(scope + ABORT, None, event.to_json())


def rendezvous(
    current_host: str,
    hosts: Sequence[str],
    nproc: int,
    addresses: Mapping[str, str],
    settings: RendezvousSettings,
    check_outputs: CheckOutputs | None = None,
    take_inventory: Callable[[], Inventory] | None = None,
    token: str = "",
    master: str | None = None,
    *,
    secret: bytes = b"",
) -> tuple[JobPlan, Coordinator]:
    """One meeting for a job that is not restarted: closing its coordinator also closes the
    master's store. ``master``, ``secret``: see ``Rendezvous``."""
    meeting = Rendezvous(
        current_host, hosts, addresses, settings, check_outputs, take_inventory, token, master,
        secret=secret,
    )  # fmt: skip
    try:
        plan, coordinator = meeting.meet(nproc)
    except BaseException:
        meeting.close()
        raise
    if isinstance(coordinator, StoreCoordinator):
        coordinator.after_close = meeting.close
    return plan, coordinator


class StoreCoordinator:
    """Job-wide events through the master's store; a watcher thread heartbeats."""

    def __init__(
        self,
        host: str,
        layout: Layout,
        ctl: Scoped,
        watch: Scoped,
        master: bool,
        settings: RendezvousSettings,
        check_outputs: CheckOutputs | None = None,
        take_inventory: Callable[[], Inventory] | None = None,
    ) -> None:
        _import_store()  # its exceptions are caught by name below
        self.host = host
        self.layout = layout
        self._ctl = ctl
        self._watch = watch
        self._master = master
        self._settings = settings
        self._event: JobEvent | None = None
        self._all_done = False
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._check_outputs = check_outputs
        self._take_inventory = take_inventory
        self._stacks_requested = False
        self.after_close: Callable[[], None] | None = None
        """Run once this host has left (``rendezvous()``: close the store with it)."""

    def _set_event(self, event: JobEvent) -> JobEvent:
        with self._lock:
            if self._event is None:
                self._event = event
            return self._event

    def report(self, event: JobEvent) -> JobEvent:
        try:
            winner = self._ctl.compare_set(ABORT, None, event.to_json())
        except StoreUnavailable:
            return self._set_event(event)
        return self._set_event(JobEvent.from_json(winner) if winner else event)

    def event(self) -> JobEvent | None:
        with self._lock:
            return self._event

    def all_done(self) -> bool:
        with self._lock:
            return self._all_done

    def unfinished(self) -> list[str]:
        try:
            done = self._ctl.prefix(FINISHED)
        except StoreUnavailable:
            return []
        return [h for h in self.layout.hosts if FINISHED + h not in done]

    def finished(self) -> None:
        try:
            self._ctl.set(FINISHED + self.host, "1")
            if self._ctl.add("finished", 1) == len(self.layout.slots):
                self._ctl.set(FINISHED_ALL, "1")
        except StoreUnavailable as exc:
            self._lost(self.layout.master, str(exc))

    def on_way_out(self) -> bool:
        try:
            return self._ctl.add(WAY_OUT, 1) >= len(self.layout.slots)
        except StoreUnavailable:
            return False  # the watcher reports the master's store gone

    def all_on_way_out(self) -> bool:
        try:
            return int(self._ctl.get(WAY_OUT) or 0) >= len(self.layout.slots)
        except (StoreUnavailable, ValueError):
            return False

    def _publish_inventory(self) -> None:
        """Every host's workers finished (none writes any more, here, on a host sharing this
        model dir, or under mpirun): take this host's inventory, hand it to the master."""
        inventory: Inventory = {}
        if self._take_inventory is not None:
            try:
                inventory = self._take_inventory()
            except Exception as exc:  # an unreadable file must not hang the barrier
                log.warning("model dir: no inventory from this host (%s)", exc)
        try:
            self._ctl.set(INVENTORY + self.host, encode_inventory(inventory).decode())
            if self._ctl.add("inventoried", 1) == len(self.layout.slots):
                self._ctl.set(INVENTORIED_ALL, "1")
        except StoreUnavailable:
            pass  # the watcher notices the master's store is gone

    def _verdict(self) -> None:
        """Master only, once every host's inventory is in: check them, then release all."""
        items = self._watch.prefix(INVENTORY)
        try:
            inventories = {
                (h := k.removeprefix(INVENTORY)): decode_inventory(v.encode(), h)
                for k, v in items.items()
            }
            event = self._check_outputs(inventories) if self._check_outputs else None
        except SmdistError as exc:
            log.error("%s", exc.headline())
            event = JobEvent(
                kind="failure", host="", headline=exc.headline(), exit_code=exc.exit_code
            )
        if event is not None:
            self.report(event)
        else:
            self._watch.set(ALL_DONE, "1")

    def publish(self, key: str, value: str) -> None:
        self._ctl.set(PUBLISHED + key, value)

    def wait_for(
        self, keys: Sequence[str], timeout_s: float, *, or_abort: bool = False
    ) -> list[str]:
        full = [PUBLISHED + k for k in keys]
        if not or_abort:
            if self._ctl.wait(full, timeout_s):
                return []
            have = self._ctl.prefix(PUBLISHED)
            return [k for k in keys if PUBLISHED + k not in have]
        # Wakes when every key or the abort is there: no polling, one wake-up.
        self._ctl.wait(full, timeout_s, or_keys=[ABORT])
        abort = self._ctl.get(ABORT)
        if abort is not None:
            self._set_event(JobEvent.from_json(abort))
        return [k.removeprefix(PUBLISHED) for k in self._ctl.missing(full)]

    def published(self, prefix: str) -> dict[str, str]:
        items = self._ctl.prefix(PUBLISHED + prefix)
        return {k.removeprefix(PUBLISHED): v for k, v in items.items()}

    def request_stacks(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            self._ctl.compare_set(STACKS, None, self.host)
        with self._lock:
            self._stacks_requested = True

    def stacks_requested(self) -> bool:
        with self._lock:
            return self._stacks_requested

    def put_stacks(self, ranks: Sequence[Mapping[str, Any]]) -> None:
        with contextlib.suppress(StoreUnavailable):
            self._ctl.set(STACKS_OF + self.host, json.dumps(list(ranks)))

    def stacks(self) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
        try:
            items = self._ctl.prefix(STACKS_OF)
        except StoreUnavailable:
            return {}, []
        reports = {k.removeprefix(STACKS_OF): json.loads(v) for k, v in items.items()}
        return reports, [h for h in self.layout.hosts if h not in reports]

    def start_watch(self, notify: Callable[[], None]) -> None:
        thread = threading.Thread(
            target=self._watch_loop, args=(notify,), name="smdist-watch", daemon=True
        )
        thread.start()

    def _lost(self, host: str, why: str) -> JobEvent:
        event = JobEvent.lost(host, why)
        if host == self.layout.master:
            return self._set_event(event)  # its store went with it
        return self.report(event)

    def _watch_loop(self, notify: Callable[[], None]) -> None:
        s = self._settings
        inventoried = False
        verdict_given = False
        while not self._closing.is_set():
            try:
                keys = [ABORT, ALL_DONE]
                if not inventoried:
                    keys.append(FINISHED_ALL)
                if self._master and not verdict_given:
                    keys.append(INVENTORIED_ALL)
                # (This host's heartbeat is ``Heartbeat``'s, on its own connection for the
                # whole job: the master's store declares a host lost whose next one is late,
                # so no agent reads every other's.)
                if not self.stacks_requested():
                    keys.append(STACKS)
                # The reply carries the keys' values: an abort reaches a watcher in one trip.
                got = self._watch.wait_values(keys, s.heartbeat_interval_s)
                if got is not None:
                    ended = got.get(ABORT) is not None or got.get(ALL_DONE)
                    if not ended and STACKS in keys and got.get(STACKS) is not None:
                        with self._lock:
                            self._stacks_requested = True  # a hang check: the supervisor
                        notify()  # dumps this host's stacks
                        continue
                    if not ended and not inventoried and got.get(FINISHED_ALL):
                        inventoried = True  # hashing may take a while: the beats go on
                        threading.Thread(
                            target=self._publish_inventory, name="smdist-inventory", daemon=True
                        ).start()
                        continue
                    if (
                        not ended
                        and self._master
                        and not verdict_given
                        and got.get(INVENTORIED_ALL)
                    ):
                        verdict_given = True
                        self._verdict()
                        continue
                    abort = got.get(ABORT)
                    if abort is not None:
                        self._set_event(JobEvent.from_json(abort))
                    else:
                        with self._lock:
                            self._all_done = True
                    notify()
                    return
            except StoreUnavailable as exc:
                if not self._closing.is_set():
                    self._lost(self.layout.master, str(exc))
                    notify()
                return

    def close(
        self,
        failures: Sequence[WorkerFailure] = (),
        step_rates: Mapping[int, float] | None = None,
        leave_within_s: float | None = None,
    ) -> Departure:
        """Leave the attempt: the master waits (bounded) until the others have read the
        outcome; its store stays up for the next attempt until ``Rendezvous.close``."""
        bound_s = self._settings.leave_timeout_s if leave_within_s is None else leave_within_s
        self._closing.set()
        from smdist.agent.report.failure import WorkerFailure

        reports: dict[str, list[WorkerFailure]] = {}
        rates = dict(step_rates or {})
        try:
            if not self._master:
                if failures or rates:
                    text = json.dumps(
                        {"failures": [f.to_dict() for f in failures], "step_rates": rates}
                    )
                    self._ctl.set(f"departure/{self.host}", text)
                self._ctl.set(f"left/{self.host}", "1")
            else:
                self._ctl.set(f"left/{self.host}", "1")  # its own connections close next
                event = self.event()
                lost = event.host if event is not None and event.kind == "lost" else None
                keys = [f"left/{h}" for h in self.layout.hosts if h not in (self.host, lost)]
                if keys and not self._ctl.wait(keys, bound_s):
                    gone = self._ctl.prefix("left/")
                    late = [k.removeprefix("left/") for k in keys if k not in gone]
                    log.info(
                        "closing the rendezvous store; %s had not left after %.0f s",
                        ", ".join(late),
                        bound_s,
                    )
                for key, text in self._ctl.prefix("departure/").items():
                    data = json.loads(text)
                    theirs = [WorkerFailure.from_dict(d) for d in data["failures"]]
                    reports[key.removeprefix("departure/")] = theirs
                    rates.update({int(r): float(v) for r, v in data["step_rates"].items()})
        except StoreUnavailable:
            pass
        finally:
            self._ctl.close()
            self._watch.close()
            if self.after_close is not None:
                self.after_close()
        return Departure(reports, rates)

    def stop_before_workers(self, event: JobEvent) -> None:
        old = self._ctl
        old.close()
        try:
            self._ctl = old.reopen(STOP_NOTICE_S)
        except RendezvousFailed:
            self._set_event(event)  # the master's store is gone: nobody left to tell
        else:
            self.report(event)
        self.close()
