"""One host's agent: config -> topology -> discovery -> rendezvous -> launch -> supervise
-> report. It never trains; it coordinates, and it always leaves an exit code and, on
failure, a failure file."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from smdist import config as cfg
from smdist import timeline
from smdist.agent import (
    backends,
    distribution,
    hang,
    model_dir,
    network_env,
    restart,
    sm_env,
    stages,
    topology,
)
from smdist.agent import entry as entries
from smdist.agent.backends.base import Backend, Launch
from smdist.agent.rendezvous import (
    Coordinator,
    Departure,
    Inventory,
    JobEvent,
    JobPlan,
    Rendezvous,
    RendezvousSettings,
    stop_event,
)
from smdist.agent.report import write
from smdist.agent.report.memory import MemoryStats, memory_snapshot
from smdist.agent.supervisor import Outcome, Supervisor
from smdist.errors import JobAborted, SmdistError
from smdist.log import log, setup
from smdist.records import asdict, dataclass, field

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from smdist.agent.code import Install
    from smdist.agent.report.failure import WorkerFailure


@dataclass(frozen=True)
class AgentOptions:
    entry: list[str]
    opt_ml: str | None = None
    entry_base_dir: Path | None = None
    """Relative entry paths are relative to this (the ``train`` entry: /opt/ml/code)."""
    nproc_per_host: str = "auto"
    backend: str | None = None
    """torch or mpi; None: mpi when the sagemaker_mpi_enabled hyperparameter is true."""
    rdzv: RendezvousSettings = field(default_factory=RendezvousSettings)
    dns_timeout_s: float = 900.0
    nameserver: str | None = None
    host_addresses: Mapping[str, str] | None = None
    """Static host -> address map (the local simulation); skips DNS."""
    grace_s: float = 90.0
    abort_grace_s: float = 5.0
    hyperparameter_args: bool = True
    install_timeout_s: float = 1800.0
    """How long pip may take to install the code dir's requirements (or package)."""
    nproc_given: bool = False
    """``nproc_per_host`` came from the flag or SMDIST_NPROC_PER_HOST, not the default."""
    settings_line: str = ""
    """Which settings came from a flag or an SMDIST_* variable (logged once at start)."""
    max_restarts: int = 0
    """Job-wide restarts after a failure a new attempt may fix (restart.py)."""
    hang_timeout_s: float | None = None
    """A rank without progress this long is a hang (hang.py); None: off."""
    hang_startup_s: float = 120.0
    """A rank that counted no step is still starting this long (hang.py)."""
    restart_pause_s: float | None = None
    """The pause before the first restart (doubling, at most 30 s); None: the default."""


def run(opts: AgentOptions) -> int:
    """Run this host's part of the job; return the exit code for the container."""
    stages.install()  # cli.main did already; a caller that did not gets it here
    paths = cfg.resolve_root(opts.opt_ml)
    setup("-")
    started = time.monotonic()
    host = "-"
    whole_job = True  # until the config names the master: then only the master's report is
    try:
        stages.enter("reading the job's config")
        # A failure file present at the end must be the user's own (smdist.fail).
        write.clear_failure_files(paths)
        paths.success_file.unlink(missing_ok=True)  # only this run's success counts
        config = cfg.load(paths)
        timeline.mark("config loaded")
        host = config.resource.current_host
        whole_job = _is_master(config)
        write.clear_failure_files(paths, host)
        setup(host)
        if opts.settings_line:
            log.info("settings: %s", opts.settings_line)
        return _run(opts, config, started)
    except SmdistError as exc:
        log.error("%s", exc.headline())
        if host == "-" and exc.where is None:
            exc.where = ""  # the config itself is what failed: no host to name
        diagnosis = write.report(
            paths, [], current_host=host, smdist_error=exc, whole_job=whole_job
        )
        return diagnosis.exit_code
    except stages.StopRequested as stop:
        return _stopped(paths, host, stop, whole_job)
    except KeyboardInterrupt:
        log.error("interrupted before the workers started")
        return 130
    except Exception as exc:  # a bug in smdist: still leave a reason SageMaker can show
        log.exception("smdist internal error")
        write.write_failure_file(paths, f"InternalError: {type(exc).__name__}: {exc}\n")
        return 1


def _stopped(paths: cfg.Paths, host: str, stop: stages.StopRequested, whole_job: bool) -> int:
    """A stop before the workers ran: say at which stage, in the log and the failure file."""
    stages.enter("the report", interruptible=False)
    log.error("%s: stopping", stop.describe(host))
    error = stages.Stopped(stop.describe(host), stop.exit_code)
    write.report(paths, [], current_host=host, smdist_error=error, whole_job=whole_job)
    return stop.exit_code


def _is_master(config: cfg.JobConfig) -> bool:
    """Whether this host writes the whole job's report (the master's covers every host)."""
    hosts = topology.sorted_hosts(config.resource.hosts)
    return config.resource.current_host == topology.master_host(hosts)


def resolve_addresses(
    hosts: Sequence[str],
    *,
    given: Mapping[str, str] | None,
    nameserver: str | None,
    timeout_s: float,
) -> dict[str, str]:
    """The job's host -> address, as the agent and ``--check`` find them: one host is this
    machine; ``--host-addresses`` win; else DNS (``--nameserver`` or SMDIST_NAMESERVER)."""
    if len(hosts) == 1:
        return {hosts[0]: "127.0.0.1"}
    if given is not None:
        missing = [h for h in hosts if h not in given]
        if missing:
            raise SmdistError(f"no address given for {', '.join(missing)}")
        return {h: given[h] for h in hosts}
    from smdist.agent import discovery  # dnspython: only when there is DNS to ask

    server = nameserver or os.environ.get(discovery.NAMESERVER_ENV)
    policy = discovery.DnsPolicy(
        timeout_s=timeout_s,
        nameserver=discovery.parse_nameserver(server) if server else None,
    )
    return discovery.resolve_hosts(hosts, policy, log)


def _log_plan(opts: AgentOptions, backend: str, plan: JobPlan, entry: str) -> None:
    r = opts.rdzv
    log.info(
        "job: %d host(s), world size %d, backend %s, entry %s",
        len(plan.layout.slots),
        plan.layout.world_size,
        backend,
        entry,
    )
    for line in plan.layout.describe():
        log.info("rank map: %s", line)
    log.info(
        "workers: MASTER_ADDR=%s MASTER_PORT=%d; rendezvous port %d; timeouts: dns %.0f s, "
        "rendezvous %.0f s, heartbeat %.0f s, stop grace %.0f s, abort grace %.0f s",
        plan.master_addr,
        plan.master_port,
        r.port,
        opts.dns_timeout_s,
        r.timeout_s,
        r.heartbeat_timeout_s,
        opts.grace_s,
        opts.abort_grace_s,
    )


def _run(opts: AgentOptions, config: cfg.JobConfig, started: float) -> int:
    res = config.resource
    if not res.from_file:
        log.info("no %s: running as one host, algo-1", config.paths.resource_config_file)
    dist = distribution.read(config)
    if config.hyperparameters.get("sagemaker_submit_directory"):
        stages.enter("the code fetch")
        from smdist.agent import code

        code.fetch(config.paths, config.hyperparameters)
    stages.enter("the preflight checks")
    entry = entries.resolve(opts.entry, opts.entry_base_dir, config.paths.code_dir)
    install = _dependencies(config, entry)
    _preflight(config, entry)
    timeline.mark("entry found, preflight checked")
    if opts.hyperparameter_args:
        entry = entry.with_args(sm_env.hyperparameter_args(config.user_hyperparameters))
    gpus = topology.visible_gpus()
    backend: Backend
    if res.current_host not in dist.world_hosts:
        from smdist.agent.backends.plain import RULE, PlainBackend

        backend = PlainBackend(config)
        nproc = 0  # no ranks in the world
        log.info("processes per host: 1 plain process (%s)", RULE)
    else:
        backend = backends.select(opts.backend, config)
        rule = dist.nproc_rule(opts.nproc_per_host, opts.nproc_given)
        if rule is not None:
            nproc, source = 1, rule
        else:
            nproc, source = backend.processes_per_host(opts.nproc_per_host, gpus)
            if dist.key is not None and not opts.nproc_given:
                source = f"{dist.key}; {source}"
        log.info("processes per host: %d (%s)", nproc, source)
    timeline.mark("backend chosen")
    stages.enter("the DNS wait")
    addresses = resolve_addresses(
        config.resource.hosts,
        given=opts.host_addresses,
        nameserver=opts.nameserver,
        timeout_s=opts.dns_timeout_s,
    )
    secret = b""
    if len(res.hosts) > 1:
        from smdist.agent.access import job_secret

        job = job_secret(config)
        log.info("rendezvous secret: %s", job.source)
        secret = job.key
    stages.enter("the rendezvous wait")
    model = model_dir.ModelDir(config.paths, res.current_host, res.hosts)
    model.mark()  # before joining: every host's marker exists once the plan is out
    meeting = Rendezvous(
        res.current_host,
        res.hosts,
        addresses,
        opts.rdzv,
        check_outputs=_check_model_dirs,
        take_inventory=model.finish,
        token=model.token,
        master=topology.master_host(dist.world_hosts),
        secret=secret,
    )
    run_dir = _run_dir()
    try:
        agent_job = _Job(opts, config, backend, entry, nproc, gpus, meeting, model, run_dir)
        return agent_job.run(started, install)
    finally:
        backend.close()  # e.g. the MPI backend's job sshd and its key
        meeting.close()
        model.unmark()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def _run_dir() -> Path:
    """A new private folder for the workers' error and control files (``tempfile.mkdtemp``
    without importing tempfile and random on the way to the first worker)."""
    base = Path(os.environ.get("TMPDIR") or "/tmp")
    for attempt in range(100):
        path = base / f"smdist-{os.getpid()}-{time.monotonic_ns()}-{attempt}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path
    raise SmdistError(f"could not create a private folder under {base}")


@dataclass
class _Job:
    """One host's part of the job: attempt after attempt, until one ends it."""

    opts: AgentOptions
    config: cfg.JobConfig
    backend: Backend
    entry: entries.Entry
    nproc: int
    gpus: int
    meeting: Rendezvous
    model: model_dir.ModelDir
    run_dir: Path
    attempts: list[restart.Attempt] = field(default_factory=list)

    @property
    def budget(self) -> int:
        """How many restarts the job may make (--max-restarts)."""
        return self.opts.max_restarts

    def run(self, started: float, install: Install | None) -> int:
        k = 0
        while True:
            try:
                outcome, departure, memory = self._attempt(k, install if k == 0 else None)
            except SmdistError as exc:
                if not self.attempts:
                    raise  # before any attempt ran: reported as any early failure
                return self._ended_between_attempts(exc, started)
            if outcome.exit_code == 0:
                if k:
                    log.info("attempt %d of the job succeeded (%d restart(s))", k + 1, k)
                return _report(self.config, outcome, started, memory, departure)
            event = outcome.event
            record = restart.attempt_record(k, event, outcome.exit_code, time.time())
            self.attempts.append(record)
            why = restart.why_not_restart(record, event.kind if event else None, k, self.budget)
            if why or outcome.stopped:
                if self.budget and why:
                    log.info("not restarting: %s", why)
                return _report(
                    self.config, outcome, started, memory, departure, self.attempts, self.budget
                )
            k += 1

    def _ended_between_attempts(self, exc: SmdistError, started: float) -> int:
        """The pause or the next meeting failed (a host lost there): the report still lists
        every attempt made, as when the budget runs out."""
        log.error("%s", exc.headline())
        diagnosis = write.report(
            self.config.paths,
            [],
            current_host=self.config.resource.current_host,
            smdist_error=exc,
            extra={
                "elapsed_s": round(time.monotonic() - started, 3),
                "attempts": [a.to_dict() for a in self.attempts],
            },
            whole_job=_is_master(self.config),
            headline_note=f"; {len(self.attempts)} attempt(s) made, --max-restarts {self.budget}",
        )
        return diagnosis.exit_code

    def _attempt(self, k: int, install: Install | None) -> tuple[Outcome, Departure, MemoryStats]:
        """Meet, start this host's workers, supervise them, leave: one attempt."""
        res = self.config.resource
        if k:
            self._pause(k)
        plan, coordinator = self.meeting.meet(self.nproc, k)
        try:
            if k == 0:
                self.model.detect(plan.tokens)
                timeline.mark("rendezvous done")
                _log_plan(self.opts, self.backend.name, plan, self.entry.target)
                stages.enter("the dependency install")
                try:
                    _prepare_hosts(self.opts, self.config, plan, coordinator, install)
                except stages.StopRequested:
                    raise
                except BaseException:
                    coordinator.close()
                    raise
            else:
                log.info("attempt %d: MASTER_PORT=%d", k + 1, plan.master_port)
            stages.enter("starting the workers")
            return self._launch(k, plan, coordinator)
        except stages.StopRequested as stop:
            coordinator.stop_before_workers(stop_event(stop, res.current_host))
            raise

    def _pause(self, k: int) -> None:
        """Before restart ``k``: a stop ends the pause, and the job, at once (the hosts at
        the next meeting are told)."""
        first = self.opts.restart_pause_s or restart.BACKOFF_FIRST_S
        pause = restart.backoff_s(k, first)
        log.info(
            "attempt %d failed (%s): restart %d of %d on every host in %.3g s",
            k, self.attempts[-1].headline, k, self.budget, pause,
        )  # fmt: skip
        self.model.remove_unfinished_writes()
        stage = f"the pause before attempt {k + 1}"
        stages.enter(stage)
        try:
            if pending := stages.take_pending():  # a stop while the last attempt reported
                raise stages.StopRequested(pending[0], stage)
            self.meeting.pause(k, pause)  # the heartbeats go on: a lost host ends it
        except stages.StopRequested as stop:
            self.meeting.announce_stop(stop, k)
            raise
        stages.enter(f"the rendezvous wait of attempt {k + 1}")

    def _launch(
        self, k: int, plan: JobPlan, coordinator: Coordinator
    ) -> tuple[Outcome, Departure, MemoryStats]:
        """After the meeting: start this host's workers, supervise them, leave."""
        config = self.config
        for d in (config.paths.model_dir, config.paths.output_data_dir):
            d.mkdir(parents=True, exist_ok=True)
        env_sm = sm_env.sm_environment(
            config,
            entry_point=_entry_point_name(config, self.entry),
            num_gpus=self.gpus,
            num_cpus=os.cpu_count() or 1,
        )
        net = network_env.network_environment(config, os.environ)
        env_sm.update(net.variables)  # the backends never override a variable the user set
        if k == 0:
            log.info("network environment for the workers: %s", net.describe())
        memory_at_start = memory_snapshot()
        attempt_dir = self.run_dir / f"attempt-{k}"
        attempt_dir.mkdir()
        timeline.mark("environment for SageMaker built")
        base_env = dict(os.environ, **restart.worker_env(k, self.budget))
        launch = Launch(self.entry, base_env, env_sm, attempt_dir, k, self.budget)
        try:
            specs = self.backend.worker_specs(launch, plan, coordinator)
        except stages.StopRequested:
            raise
        except BaseException:
            coordinator.close()  # the other hosts hear the abort it published, then this leaves
            raise
        timeline.mark("worker environments built")
        supervisor = Supervisor(
            config.resource.current_host,
            specs,
            coordinator,
            grace_s=self.opts.grace_s,
            abort_grace_s=self.opts.abort_grace_s,
            identify=self.backend.identify,
            hang_timeout_s=self.opts.hang_timeout_s,
            hang_startup_s=self.opts.hang_startup_s,
            watched=launch.watch,
            relayed=launch.relayed[0] if launch.relayed else None,
        )
        outcome: Outcome | None = None
        # The supervisor owns the signals while the workers run (it takes over a stop that
        # arrives before its handlers are in); after it, a stop lets the report finish.
        stages.enter("the workers' run", interruptible=False)
        try:
            outcome = supervisor.run()
        finally:
            stages.enter("the report", interruptible=False)
            departure = coordinator.close(
                outcome.failures if outcome else (),
                outcome.step_rates if outcome else None,
                _leave_within_s(outcome, self.opts),
            )
        _log_step_rates(departure.step_rates)
        return outcome, departure, memory_at_start


LEAVE_MARGIN_S = 5.0
"""Beyond the grace that applies: the other hosts' agents report once their ranks are gone."""


def _leave_within_s(outcome: Outcome | None, opts: AgentOptions) -> float:
    """How long the master waits for the other hosts' reports when the job ended early:
    until their ranks may have stopped (the event's time plus the grace that applies),
    never less than the margin. A successful job's hosts left together at the barrier."""
    if outcome is None or outcome.event is None:
        return LEAVE_MARGIN_S
    grace_s = opts.grace_s if outcome.stopped else opts.abort_grace_s
    since_s = max(0.0, time.time() - outcome.event.time) if outcome.event.time else 0.0
    return max(LEAVE_MARGIN_S, grace_s + LEAVE_MARGIN_S - since_s)


def _log_step_rates(rates: Mapping[int, float]) -> None:
    """Each rank's steps per second (every rank's on the master); a straggler by name."""
    if not rates:
        return
    log.info(
        "step rates (steps/s): %s",
        ", ".join(f"rank {r} {v:.3g}" for r, v in sorted(rates.items())),
    )
    for rank, rate, median in hang.stragglers(rates):
        log.warning(
            "straggler: rank %d ran %.3g steps/s, %.2fx the median %.3g", rank, rate, rate / median,
            median,
        )  # fmt: skip


def _code_dir(config: cfg.JobConfig, entry: entries.Entry) -> Path | None:
    """Where requirements.txt is looked for: /opt/ml/code when the entry lives there (or is
    a module), else the entry script's own directory."""
    code_dir = config.paths.code_dir
    if entry.kind == "module":
        return code_dir if code_dir.is_dir() else None
    target = Path(entry.target)
    if target.is_relative_to(code_dir.resolve()):
        return code_dir
    return target.parent if entry.kind == "script" else None


def _dependencies(config: cfg.JobConfig, entry: entries.Entry) -> Install | None:
    code_dir = _code_dir(config, entry)
    if code_dir is None:
        return None
    from smdist.agent import code

    return code.plan_install(code_dir, packages=code_dir == config.paths.code_dir)


def _prepare_hosts(
    opts: AgentOptions,
    config: cfg.JobConfig,
    plan: JobPlan,
    coordinator: Coordinator,
    install: Install | None,
) -> None:
    """Dependencies installed on every host before any worker starts anywhere."""
    hosts = plan.layout.hosts
    if install is None and len(hosts) == 1:
        return
    from smdist.agent import code

    run_install = None
    if install is not None:
        to_install = install

        def run_install() -> None:
            code.run_install(to_install, sys.executable, opts.install_timeout_s)

    code.prepare_hosts(
        coordinator,
        config.resource.current_host,
        hosts,
        run_install,
        f"installing {install.what}" if install else "",
        opts.install_timeout_s + opts.rdzv.timeout_s,
    )


def _entry_point_name(config: cfg.JobConfig, entry: entries.Entry) -> str:
    """SM_USER_ENTRY_POINT as the toolkit gives it: ``sagemaker_program`` when the job names
    one, else the entry relative to /opt/ml/code when it lives there, else as given."""
    program = config.framework_parameters.get("sagemaker_program")
    if isinstance(program, str) and program:
        return program
    if entry.kind != "module":
        try:
            return str(Path(entry.target).relative_to(config.paths.code_dir.resolve()))
        except ValueError:
            pass
    return entry.name


def _check_model_dirs(inventories: Mapping[str, Inventory]) -> JobEvent | None:
    """Master, at the exit barrier: two hosts must not write the same path in the model dir
    (SageMaker's model.tar.gz would keep only one of them, silently). A failing clash raises
    ``ModelDirClash``, which the coordinator makes the job's event."""
    warnings = model_dir.check_clashes(inventories)
    for clash in warnings:
        log.warning(
            "model dir: %s is on hosts %s with the same content; model.tar.gz keeps one copy",
            clash.path,
            ", ".join(clash.hosts),
        )
    return None


def _preflight(config: cfg.JobConfig, entry: entries.Entry) -> None:
    """The checks that cost well under a second, before anything is spawned."""
    from smdist.agent import preflight

    argv = ["-m", entry.target] if entry.kind == "module" else [entry.target]
    checks = preflight.quick_checks(config, argv)
    for check in checks:
        if check.status == "warn":
            log.warning("preflight: %s: %s", check.name, check.detail)
    failed = preflight.first_failure(checks)
    if failed is not None:
        raise failed.as_error()


def _write_success_file(paths: cfg.Paths) -> None:
    """``/opt/ml/output/success``, as the toolkit leaves it when training succeeded."""
    try:
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        paths.success_file.touch()
    except OSError as exc:
        log.warning("cannot write %s: %s", paths.success_file, exc.strerror or exc)


def _report(
    config: cfg.JobConfig,
    outcome: Outcome,
    started: float,
    memory: MemoryStats,
    departure: Departure,
    attempts: Sequence[restart.Attempt] = (),
    max_restarts: int = 0,
) -> int:
    elapsed = time.monotonic() - started
    if outcome.exit_code == 0:
        how = "stopped cleanly" if outcome.stopped else "finished"
        log.info("job %s on this host after %.1f s (exit 0)", how, elapsed)
        _write_success_file(config.paths)
        return 0
    event = outcome.event
    root: WorkerFailure | None = None
    remote: SmdistError | None = None
    if event is not None and event.kind == "failure" and event.failure is not None:
        from smdist.agent.report.failure import WorkerFailure

        root = WorkerFailure.from_dict(event.failure)
        # Prefer this host's own record of it (same object as in outcome.failures).
        root = next(
            (
                f
                for f in outcome.failures
                if (f.host, f.rank) == (root.host, root.rank) and not f.peer_stopped
            ),
            root,
        )
    elif event is not None and event.kind != "stop":
        remote = JobAborted(event.headline, event.exit_code or 1)
    # The master also holds every other host's failures: its report covers every rank.
    everyone = list(outcome.failures)
    for theirs in departure.failures.values():
        everyone += theirs
    diagnosis = write.report(
        config.paths,
        everyone,
        current_host=config.resource.current_host,
        root_cause=root,
        smdist_error=remote,
        memory_at_start=memory,
        extra={
            "elapsed_s": round(elapsed, 3),
            "job_event": asdict(event) if event else None,
            "attempts": [a.to_dict() for a in attempts],
            "step_rates": {str(r): round(v, 4) for r, v in sorted(departure.step_rates.items())},
        },
        whole_job=_is_master(config),
        headline_note=(
            f"; {len(attempts)} attempt(s) made, --max-restarts {max_restarts}"
            if max_restarts
            else ""
        ),
    )
    log.error("%s", diagnosis.headline)
    if diagnosis.user_failure_text is not None:
        log.info("kept the failure file the job wrote itself")
    log.info("exit %d after %.1f s", outcome.exit_code, elapsed)
    return outcome.exit_code
