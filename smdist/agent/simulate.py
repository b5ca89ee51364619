"""``--simulate HxP``: H host agents on this machine, each with its own /opt/ml tree.

Hosts ``algo-1..algo-H`` are mapped to loopback (no DNS), the agents talk real TCP, and
the workers run real torch.distributed. The parent only starts the agents (forks of
itself, each running ``smdist-run`` for its host), forwards SIGTERM to all of them (as
StopTrainingJob stops every container) and collects exit codes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from smdist import contract
from smdist.agent import standby
from smdist.agent.rendezvous import free_port
from smdist.config import Paths
from smdist.errors import ConfigError
from smdist.log import log, setup


def parse_spec(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f'--simulate: expected HOSTSxPROCESSES such as 2x2, got "{text}"')
    return int(m.group(1)), int(m.group(2))


def prepare_host(work: Path, host: str, hosts: list[str], base: Paths | None) -> Paths:
    """A fresh /opt/ml tree for one simulated host (model and output emptied)."""
    paths = Paths(work / host)
    for d in (paths.model_dir, paths.output_dir):
        shutil.rmtree(d, ignore_errors=True)
    paths.input_config_dir.mkdir(parents=True, exist_ok=True)
    paths.model_dir.mkdir(parents=True)
    paths.output_data_dir.mkdir(parents=True)
    resource = {"current_host": host, "hosts": hosts, "network_interface_name": "lo"}
    paths.resource_config_file.write_text(json.dumps(resource), encoding="utf-8")
    if base is not None:
        for src in (base.hyperparameters_file, base.input_data_config_file):
            if src.exists():
                shutil.copyfile(src, paths.input_config_dir / src.name)
        data = paths.input_data_dir
        if base.input_data_dir.is_dir() and not data.exists():
            data.symlink_to(base.input_data_dir.resolve(), target_is_directory=True)
    return paths


def _import_agent() -> None:
    """What every host's agent imports on its way to its workers, imported once here: the
    agents are forked from this process (below), so on a machine where they share the
    cores with the ranks' own start-up none of them pays for an interpreter and its imports
    again (about 0.1 s of CPU each, issue 18's 4x1 time-to-ready)."""
    from smdist.agent import access, preflight, run, store, supervisor  # noqa: F401


def _fork_agent(
    agent: Callable[[list[str]], int], argv: list[str], env: dict[str, str], parent: int
) -> int:
    """Start one host's agent (``agent(ARGV)``, smdist-run's main, with ``env``) as a fork of
    this process, which has no thread yet; it dies with ``parent``. Returns its pid."""
    dying = contract.exec_dying_with(parent)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        dying()
        os.environ.clear()
        os.environ.update(env)
        # As on a real host: its first rank's interpreter starts while its agent plans and
        # meets the others (smdist-run's launch does this for a host's own agent).
        standby.start(argv)
        code = agent(argv)
    except SystemExit as exc:  # argparse's, or sys.exit in the agent: the same as a process
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            standby.discard()  # none left behind by an agent that ended before its ranks
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run(
    spec: str,
    work_dir: str | None,
    entry: list[str],
    agent_flags: list[str],
    base: str | None,
    agent: Callable[[list[str]], int],
) -> int:
    """``agent``: smdist-run's main, which each forked host runs with its own arguments."""
    setup("simulate")
    try:
        n_hosts, nproc = parse_spec(spec)
    except ConfigError as exc:
        log.error("%s", exc.headline())
        return exc.exit_code
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="smdist-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    hosts = [f"algo-{i}" for i in range(1, n_hosts + 1)]
    base_paths = Paths(Path(base)) if base else None
    trees = [prepare_host(work, h, hosts, base_paths) for h in hosts]
    if entry and entry[0] != "-m" and os.path.exists(entry[0]):
        entry = [os.path.abspath(entry[0]), *entry[1:]]
    port = free_port()
    addresses = ",".join(f"{h}=127.0.0.1" for h in hosts)
    log.info(
        "simulating %d host(s) x %d process(es) under %s (rendezvous port %d)",
        n_hosts,
        nproc,
        work,
        port,
    )
    me = os.getpid()
    # The simulation's own settings must not make each host's agent simulate again.
    child_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SMDIST_SIMULATE", "SMDIST_WORK_DIR", "SMDIST_CHECK")
    }
    # One secret per simulated job: its agents alone share it (unless the user gave one).
    child_env.setdefault("SMDIST_JOB_SECRET", secrets.token_hex(32))
    _import_agent()
    agents = []
    for tree in trees:
        argv = [
            "--opt-ml", str(tree.root),
            "--nproc-per-host", str(nproc),
            "--rdzv-port", str(port),
            "--host-addresses", addresses,
            *agent_flags, "--", *entry,
        ]  # fmt: skip
        agents.append(_fork_agent(agent, argv, child_env, me))

    def forward(signum: int, _frame: object) -> None:
        for pid in agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # SIGINT from a terminal already reaches every agent (same process group).
    old_term = signal.signal(signal.SIGTERM, forward)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in agents]
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    codes = [contract.exit_code(c) for c in codes]
    for host, tree, code in zip(hosts, trees, codes, strict=True):
        files = sorted(
            str(p.relative_to(tree.model_dir)) for p in tree.model_dir.rglob("*") if p.is_file()
        )
        log.info(
            "%s exited %d; model dir %s: %s",
            host,
            code,
            tree.model_dir,
            ", ".join(files) or "empty",
        )
        if code and tree.failure_file.exists():
            log.info("%s failure: %s", host, tree.failure_file.read_text().splitlines()[0])
    return next((c for c in codes if c), 0)
