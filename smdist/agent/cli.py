"""``smdist-run`` and ``train`` (SageMaker's ``docker run IMAGE train``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from smdist import __version__, timeline
from smdist import config as cfg
from smdist.agent import settings, stages
from smdist.agent.rendezvous import RendezvousSettings
from smdist.errors import ConfigError, EntryPointNotFound, SmdistError
from smdist.log import log, setup

ENTRY_ENV = ("SMDIST_ENTRY", "SAGEMAKER_PROGRAM")


def _parser(prog: str, with_entry: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a training script on every host of a SageMaker-style job. Every "
        "option can also be set by its SMDIST_<OPTION> environment variable (the option wins).",
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"smdist {__version__}")
    settings.add_arguments(p)
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module, like python -m")
    if with_entry:
        p.add_argument("entry", nargs=argparse.REMAINDER, help="SCRIPT.py|PROGRAM [ARGS...]")
    return p


def _parse(prog: str, with_entry: bool, args: list[str]) -> argparse.Namespace | int:
    """Flags, then SMDIST_* variables, then defaults; a bad variable is a ConfigError with
    a failure file (``docker run IMAGE train`` has no other way to say it)."""
    ns = _parser(prog, with_entry).parse_args(args)
    try:
        resolved = settings.resolve(ns)
    except ConfigError as exc:
        setup("-")
        log.error("%s", exc.headline())
        from smdist.agent.report import write

        write.write_failure_file(cfg.resolve_root(ns.opt_ml), exc.headline() + "\n")
        return exc.exit_code
    merged = argparse.Namespace(**{**vars(ns), **resolved.values})
    merged.settings_line = resolved.describe()
    merged.settings_sources = resolved.sources
    return merged


def _strip_sagemaker_train(args: list[str]) -> list[str]:
    """SageMaker appends ``train`` to the image's ENTRYPOINT: never pass it to the script.

    The last argument is dropped when it is the bare word ``train`` and the argument before
    it is not an option (``--mode train`` stays).
    """
    if args and args[-1] == "train" and (len(args) == 1 or not args[-2].startswith("-")):
        log.info("dropping the trailing 'train' argument SageMaker appends to the entrypoint")
        return args[:-1]
    return args


def _options(ns: argparse.Namespace, entry: list[str], base_dir: Path | None):  # type: ignore[no-untyped-def]
    from smdist.agent.run import AgentOptions

    return AgentOptions(
        entry=entry,
        opt_ml=ns.opt_ml,
        entry_base_dir=base_dir,
        nproc_per_host=ns.nproc_per_host,
        backend=ns.backend,
        rdzv=RendezvousSettings(
            port=ns.rdzv_port,
            timeout_s=ns.rdzv_timeout,
            master_port=ns.master_port,
            heartbeat_timeout_s=ns.heartbeat_timeout,
        ),
        dns_timeout_s=ns.dns_timeout,
        nameserver=ns.nameserver,
        host_addresses=ns.host_addresses,
        grace_s=ns.grace,
        abort_grace_s=ns.abort_grace,
        hyperparameter_args=not ns.no_hyperparameter_args,
        install_timeout_s=ns.install_timeout,
        settings_line=ns.settings_line,
        nproc_given=ns.settings_sources["nproc_per_host"] != "default",
        max_restarts=ns.max_restarts,
        hang_timeout_s=ns.hang_timeout,
        hang_startup_s=ns.hang_startup,
        restart_pause_s=ns.restart_pause,
    )


def _check(ns: argparse.Namespace, entry: list[str], base_dir: Path | None) -> int:
    """``--check``: every preflight check as a table; the exit code the job would have."""
    from smdist.agent import preflight
    from smdist.agent.run import resolve_addresses

    paths = cfg.resolve_root(ns.opt_ml)
    if base_dir is not None and entry and entry[0] != "-m" and not Path(entry[0]).is_absolute():
        entry = [str(base_dir / entry[0]), *entry[1:]]

    def resolve(hosts: Sequence[str]) -> object:
        # A check waits at most 30 s for DNS: it reports, the job would wait longer.
        timeout_s = min(ns.dns_timeout, 30.0)
        given, server = ns.host_addresses, ns.nameserver
        return resolve_addresses(hosts, given=given, nameserver=server, timeout_s=timeout_s)

    setup("check")
    checks = preflight.run_checks(paths, entry, resolve_hosts=resolve)
    print(preflight.format_table(checks))
    return preflight.exit_code(checks)


def _launch(ns: argparse.Namespace, entry: list[str], base_dir: Path | None) -> int:
    try:
        code = _dispatch(ns, entry, base_dir)
    except stages.StopRequested as stop:  # --check, --simulate (the agent reports its own)
        log.error("%s: stopping", stop.describe("-"))
        code = stop.exit_code
    if stages.stop_received() is not None:
        # Stopped before the workers ran, report written: leave now. The interpreter's exit
        # would wait for an abandoned DNS lookup thread (up to its attempt timeout).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(ns: argparse.Namespace, entry: list[str], base_dir: Path | None) -> int:
    if ns.check:
        return _check(ns, entry, base_dir)
    if ns.simulate:
        from smdist.agent import simulate

        return simulate.run(ns.simulate, ns.work_dir, entry, _agent_flags(ns), ns.opt_ml, main)
    from smdist.agent import run as agent

    timeline.mark("arguments parsed, agent imported")
    return agent.run(_options(ns, entry, base_dir))


def _agent_flags(ns: argparse.Namespace) -> list[str]:
    """The flags each simulated host's agent gets: every setting the simulation does not
    choose itself, with this command's value (flag, variable or default)."""
    names = [s.dest for s in settings.TABLE if s.dest not in settings.SIMULATION_CHOOSES]
    values = {name: getattr(ns, name) for name in names}
    return settings.flags_for(settings.Resolved(values, ns.settings_sources), names)


def _begin(prog: str, takes_entry: bool, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """What both entry points do first: signals handled, then the arguments parsed."""
    stages.install()  # first: as PID 1, a signal without a handler is dropped
    timeline.mark("agent modules imported")
    return _parse(prog, takes_entry, list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``smdist-run [OPTIONS] SCRIPT.py|-m MODULE|PROGRAM [ARGS...]``."""
    ns = _begin("smdist-run", True, argv)
    if isinstance(ns, int):
        return ns
    entry: list[str] = list(ns.entry)
    if entry and entry[0] == "--":
        entry = entry[1:]
    if ns.module:
        entry = ["-m", ns.module, *entry]
    if not entry:
        _parser("smdist-run", True).error("give the training script (or -m MODULE, or a program)")
    entry = (
        [entry[0], *_strip_sagemaker_train(entry[1:])]
        if entry[0] != "-m"
        else [
            "-m",
            entry[1],
            *_strip_sagemaker_train(entry[2:]),
        ]
    )
    return _launch(ns, entry, None)


def _entry_from_job(paths: cfg.Paths) -> str:
    for name in ENTRY_ENV:
        value = os.environ.get(name)
        if value:
            return value
    try:
        hps = cfg.load_hyperparameters(paths.hyperparameters_file)
    except ConfigError:
        hps = {}
    program = hps.get("sagemaker_program")
    if isinstance(program, str) and program:
        return program
    raise EntryPointNotFound(
        "no entry script: set SMDIST_ENTRY or SAGEMAKER_PROGRAM, or the sagemaker_program "
        f"hyperparameter in {paths.hyperparameters_file}"
    )


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train``: what SageMaker runs. The entry comes from the job, relative to /opt/ml/code."""
    ns = _begin("train", False, argv)
    if isinstance(ns, int):
        return ns
    paths = cfg.resolve_root(ns.opt_ml)
    try:
        target = _entry_from_job(paths)
    except SmdistError as exc:
        setup("-")
        log.error("%s", exc.headline())
        from smdist.agent.report import write

        write.write_failure_file(paths, exc.headline() + "\n")
        return exc.exit_code
    return _launch(ns, [target], paths.code_dir)


if __name__ == "__main__":
    raise SystemExit(main())
