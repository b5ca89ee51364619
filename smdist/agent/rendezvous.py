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
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from smdist.agent.model_dir import decode_inventory, encode_inventory
from smdist.agent.stages import Stopped, StopRequested
from smdist.agent.topology import Layout, build_layout, master_host, sorted_hosts
from smdist.errors import JobAborted, RendezvousFailed, SmdistError
from smdist.log import log

if TYPE_CHECKING:
    from smdist.agent.report.failure import WorkerFailure
    from smdist.agent.store import StoreClient, StoreServer, StoreUnavailable

ABORT = "abort"
ALL_DONE = "alldone"
FINISHED_ALL = "finishedall"
FINISHED = "done/"
INVENTORY = "inventory/"
INVENTORIED_ALL = "inventoriedall"
PUBLISHED = "pub/"  # keys of Coordinator.publish, apart from the coordinator's own
STOP_NOTICE_S = 1.0
"""How long a host stopped at the rendezvous spends telling the others (bounded: a stop
must end the agent within a second or two)."""

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
class RendezvousSettings:
    port: int = 29400
    timeout_s: float = 600.0
    master_port: int | None = None
    heartbeat_interval_s: float = 1.0
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

    def publish(self, key: str, value: str) -> None:
        """Share ``key`` with every host's agent (e.g. a backend's readiness)."""

    def wait_for(
        self, keys: Sequence[str], timeout_s: float, *, or_abort: bool = False
    ) -> list[str]:
        """Wait up to ``timeout_s`` for published ``keys``; return those still missing.
        ``or_abort``: return early when the job's abort event appears (then ``event()``)."""

    def published(self, prefix: str) -> dict[str, str]:
        """Every published key under ``prefix`` (keys as given to ``publish``)."""

    def close(self, failures: Sequence[WorkerFailure] = ()) -> dict[str, list[WorkerFailure]]:
        """Leave the job, handing over this host's failures; the master gets every other
        host's back, so its report covers every rank."""

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

    def publish(self, key: str, value: str) -> None:
        self._published[key] = value

    def wait_for(
        self, keys: Sequence[str], timeout_s: float, *, or_abort: bool = False
    ) -> list[str]:
        return [k for k in keys if k not in self._published]  # no one else could publish

    def published(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self._published.items() if k.startswith(prefix)}

    def close(self, failures: Sequence[WorkerFailure] = ()) -> dict[str, list[WorkerFailure]]:
        return {}

    def stop_before_workers(self, event: JobEvent) -> None:
        self.report(event)


def _import_store() -> None:
    """The store (its sockets, threads, retries and authentication) is imported only when
    there are other hosts to meet: a one-host job's agent never pays for it (issue 18)."""
    global StoreClient, StoreServer, StoreUnavailable
    from smdist.agent.store import StoreClient, StoreServer, StoreUnavailable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


def check_port_free(port: int, what: str, host: str) -> None:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as exc:
            raise RendezvousFailed(
                f"{what} {port} on {host} is already in use: {exc.strerror or exc}"
            ) from exc


def _wait_logged(
    client: StoreClient, keys: Sequence[str], timeout_s: float, what: str, where: str
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
                f"missing {', '.join(m.removeprefix('host/') for m in missing)}"
            )
        if now >= next_note:
            log.info(
                "waiting for %s at the rendezvous on %s: %d/%d present, missing %s "
                "(%.0f s of %.0f s)",
                what,
                where,
                len(keys) - len(missing),
                len(keys),
                ", ".join(m.removeprefix("host/") for m in missing[:8])
                + (" ..." if len(missing) > 8 else ""),
                now - start,
                timeout_s,
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
) -> None:
    """Tell the hosts at the rendezvous that this one was stopped (a job-wide stop).

    A fresh connection: the stop may have cut a request on the old one in half. The master
    keeps its store up a moment (bounded) so the hosts that joined read why it ends."""
    _import_store()
    try:
        client = StoreClient(address, settings.port, STOP_NOTICE_S, master, secret=secret)
    except RendezvousFailed:
        return  # the store is not up (yet, or any more): nobody to tell
    try:
        client.compare_set(ABORT, None, stop_event(stop, current_host).to_json())
        _leave_early(client, current_host, master, hosts)
    except StoreUnavailable:
        pass
    finally:
        client.close()


def _leave_early(client: StoreClient, current_host: str, master: str, hosts: Sequence[str]) -> None:
    """Leave a rendezvous the job's ``abort`` ends: the master waits (bounded) for the hosts
    that joined to read why before its store goes; the others say they left."""
    if current_host == master:
        joined = client.prefix("host/")
        keys = [f"left/{h}" for h in hosts if h != master and f"host/{h}" in joined]
        if keys:
            client.wait(keys, STOP_NOTICE_S)
    else:
        client.set(f"left/{current_host}", "1")


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
    """Meet the other hosts' agents; return the job's plan and its coordinator.

    ``take_inventory``: this host's model-dir inventory, taken once every host's workers
    finished; ``check_outputs`` (the master's) judges them all. ``token``: this host's
    random token, handed to every host in the plan. ``master``: the host that hosts the
    store and the workers' MASTER_ADDR (default the first host; a heterogeneous job's is
    the first host of its distribution). ``secret``: the job's (smdist.agent.access), which
    every agent and the master's store prove they hold; needed when there is more than one
    host."""
    ordered = sorted_hosts(hosts)
    master = master or master_host(ordered)
    if len(ordered) == 1:
        port = settings.master_port
        if port is None:
            port = free_port()
        else:
            check_port_free(port, "worker MASTER_PORT", current_host)
        return (
            JobPlan(build_layout({current_host: nproc}), "127.0.0.1", port),
            LocalCoordinator(take_inventory),
        )
    _import_store()
    master_addr = addresses[master]
    where = f"{master} ({master_addr}:{settings.port})"
    server: StoreServer | None = None
    ctl: StoreClient | None = None
    if current_host == master:
        from smdist.agent.access import allow_list

        allow = allow_list(addresses.values())
        log.info("rendezvous store admits %s (%s)", allow.describe(), allow.source)
        server = StoreServer(
            settings.port,
            current_host,
            on_lost=_host_gone,
            secret=secret,
            admits=allow.admits,
            hosts=ordered,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
        )
        connect_to = "127.0.0.1"
    else:
        connect_to = master_addr
    try:
        ctl = StoreClient(
            connect_to,
            settings.port,
            settings.timeout_s,
            master,
            secret=secret,
            reply_timeout_s=max(settings.heartbeat_timeout_s, 30.0),
        )
        ctl.set(
            f"host/{current_host}",
            json.dumps({"nproc": nproc, "hosts": list(ordered), "token": token}),
        )
        host_keys = [f"host/{h}" for h in ordered]
        log.info(
            "joined the rendezvous on %s; waiting for %s",
            where,
            "every host" if server is not None else "the plan",
        )
        if server is not None:
            _wait_logged(ctl, host_keys, settings.timeout_s, "hosts", where)
            joined = ctl.prefix("host/")
            nprocs: dict[str, int] = {}
            tokens: dict[str, str] = {}
            for h in ordered:
                info = json.loads(joined[f"host/{h}"])
                if tuple(info["hosts"]) != ordered:
                    raise RendezvousFailed(
                        f"hosts differ between {master} {list(ordered)} and {h} {info['hosts']}: "
                        "every host's resourceconfig.json must list the same hosts"
                    )
                nprocs[h] = int(info["nproc"])
                tokens[h] = str(info.get("token", ""))
            port = settings.master_port
            if port is None:
                port = free_port()
            else:
                check_port_free(port, "worker MASTER_PORT", current_host)
            ctl.set("plan", json.dumps({"nproc": nprocs, "master_port": port, "tokens": tokens}))
        else:
            _wait_logged(ctl, ["plan"], settings.timeout_s, f"the plan of {master}", where)
        plan = json.loads(ctl.get("plan") or "{}")
        # Identified: if this agent dies, the master's store sees the connection drop.
        watch = StoreClient(
            connect_to,
            settings.port,
            settings.timeout_s,
            master,
            identity=current_host,
            secret=secret,
            reply_timeout_s=settings.heartbeat_timeout_s,
        )
    except StopRequested as stop:
        if ctl is not None or server is not None:  # the store is up: the others learn of it
            if ctl is not None:
                ctl.close()
            _announce_stop(stop, current_host, connect_to, settings, master, ordered, secret)
        if server is not None:
            server.close()
        raise
    except JobAborted:
        if ctl is not None:
            with contextlib.suppress(StoreUnavailable):
                _leave_early(ctl, current_host, master, ordered)
            ctl.close()
        if server is not None:
            server.close()
        raise
    except BaseException:
        if server is not None:
            server.close()
        raise
    layout = build_layout(plan["nproc"])
    coordinator = StoreCoordinator(
        current_host, layout, ctl, watch, server, settings, check_outputs, take_inventory
    )
    plan_ = JobPlan(
        layout, master_addr, int(plan["master_port"]), dict(addresses), plan.get("tokens", {})
    )
    return plan_, coordinator


def _host_gone(server: StoreServer, host: str, why: str) -> None:
    """The master's store saw ``host``'s agent drop its connection without leaving (the
    container was killed or the agent died) or miss its heartbeats (frozen, cut off).
    Declared at once, as the job's abort (unless the job already has one or is done), so it
    wins over its victims' collective errors."""
    if server.local_get("plan") is None or server.local_get(f"left/{host}") is not None:
        return
    if server.local_get(ALL_DONE) is not None:
        return
    event = JobEvent.lost(host, why)
    server.local_compare_set(ABORT, None, event.to_json())


class StoreCoordinator:
    """Job-wide events through the master's store; a watcher thread heartbeats."""

    def __init__(
        self,
        host: str,
        layout: Layout,
        ctl: StoreClient,
        watch: StoreClient,
        server: StoreServer | None,
        settings: RendezvousSettings,
        check_outputs: CheckOutputs | None = None,
        take_inventory: Callable[[], Inventory] | None = None,
    ) -> None:
        _import_store()  # its exceptions are caught by name below
        self.host = host
        self.layout = layout
        self._ctl = ctl
        self._watch = watch
        self._server = server
        self._settings = settings
        self._event: JobEvent | None = None
        self._all_done = False
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._check_outputs = check_outputs
        self._take_inventory = take_inventory

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
                if self._server is not None and not verdict_given:
                    keys.append(INVENTORIED_ALL)
                # Each wait is also this host's heartbeat: the master's store declares a
                # host lost whose next one is late, so no agent reads every other's.
                # The reply carries the keys' values: an abort reaches a watcher in one trip.
                got = self._watch.wait_values(keys, s.heartbeat_interval_s)
                if got is not None:
                    ended = got.get(ABORT) is not None or got.get(ALL_DONE)
                    if not ended and not inventoried and got.get(FINISHED_ALL):
                        inventoried = True  # hashing may take a while: the beats go on
                        threading.Thread(
                            target=self._publish_inventory, name="smdist-inventory", daemon=True
                        ).start()
                        continue
                    if (
                        not ended
                        and self._server is not None
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

    def close(self, failures: Sequence[WorkerFailure] = ()) -> dict[str, list[WorkerFailure]]:
        """Leave: the master keeps its store up until the others have read the outcome."""
        self._closing.set()
        from smdist.agent.report.failure import WorkerFailure

        reports: dict[str, list[WorkerFailure]] = {}
        try:
            if self._server is None:
                if failures:
                    text = json.dumps([f.to_dict() for f in failures])
                    self._ctl.set(f"failures/{self.host}", text)
                self._ctl.set(f"left/{self.host}", "1")
            else:
                self._ctl.set(f"left/{self.host}", "1")  # its own connections close next
                event = self.event()
                lost = event.host if event is not None and event.kind == "lost" else None
                keys = [f"left/{h}" for h in self.layout.hosts if h not in (self.host, lost)]
                if keys and not self._ctl.wait(keys, self._settings.leave_timeout_s):
                    gone = self._ctl.prefix("left/")
                    late = [k.removeprefix("left/") for k in keys if k not in gone]
                    log.info(
                        "closing the rendezvous store; %s had not left after %.0f s",
                        ", ".join(late),
                        self._settings.leave_timeout_s,
                    )
                items = self._ctl.prefix("failures/")
                reports = {
                    k.removeprefix("failures/"): [WorkerFailure.from_dict(d) for d in json.loads(v)]
                    for k, v in items.items()
                }
        except StoreUnavailable:
            pass
        finally:
            self._ctl.close()
            self._watch.close()
            if self._server is not None:
                self._server.close()
        return reports

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
