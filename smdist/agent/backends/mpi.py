"""The MPI backend: the master's agent runs Open MPI's ``mpirun`` over ssh; the others keep
sshd up and wait for the master's word through the rendezvous store.

Every host's agent writes ``host.json`` (the environment a worker on that host gets: the
container's variables, this host's SM_*, MASTER_ADDR/PORT) into one job directory whose path
is the same on every host. mpirun forwards only that path (and what it needs to start
Python); each rank's wrapper (``smdist.worker.mpi_rank``) loads its own host's file, so
SM_CURRENT_HOST and friends are never the master's.

The master's one worker is ``python -m smdist.agent.backends.mpi``: it runs mpirun, relays each
rank's output as ``[host/rank]``, and when mpirun fails it names the rank that failed first
(from mpirun's own report) and writes that rank's error record as its error file.

ssh trust is per job: the master makes a fresh key pair in its private run dir, hands the
public key to the other hosts through the authenticated store (never the private key: only
the master's mpirun uses it), and each of them starts an sshd of its own for the job that
accepts that key and nothing else (``AuthorizedKeysFile`` = the job's file). A key baked
into the image, or in ``~/.ssh/authorized_keys``, does not open a job's hosts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from smdist import contract, records
from smdist.agent.backends.base import Launch, nproc_from_flag
from smdist.agent.hang import OutputTimes, RelayedRanks, open_counter
from smdist.agent.rendezvous import Coordinator, JobEvent, JobPlan
from smdist.agent.report.failure import WorkerFailure
from smdist.agent.supervisor import PIPE_BYTES, READ_BYTES, WorkerSpec
from smdist.config import JobConfig
from smdist.contract import MPI_FORWARDED_ENV as FORWARDED_ENV
from smdist.contract import MPI_HOSTS_ENV as HOSTS_ENV
from smdist.contract import MPI_JOB_DIR_ENV as JOB_DIR_ENV
from smdist.contract import parse_mpi_hosts, place
from smdist.errors import ConfigError, JobAborted, RendezvousFailed, SmdistError
from smdist.log import log
from smdist.records import dataclass
from smdist.torchrun_env import host_variables, run_id

SSH_PORT_ENV = "SMDIST_SSH_PORT"
SSH_ARGS_ENV = "SMDIST_SSH_ARGS"
"""Extra ssh options for mpirun's ssh (e.g. ``-i /path/to/key``)."""
SSH_JOB_KEY_ENV = "SMDIST_SSH_JOB_KEY"
"""``0``: no per-job key (the opt-out): any sshd on the port, the image's or the user's keys."""
SSH_KEY_KEY = "mpi/ssh-key"
"""The master's word on ssh trust: ``{"public_key": "ssh-ed25519 ..."}`` or null (opt-out)."""
SSHD_READY_KEY = "mpi/sshd/"
SSHD_WAIT_S = 300.0
SSHD_START_S = 30.0
# Open MPI's own variables must never travel from one host's agent to another's ranks.
MPI_PREFIXES = ("OMPI_", "PMIX_", "OPAL_", "PRTE_", "ORTE_", "HYDRA_", "PMI_")
# Needed before host.json can be read: where Python and smdist are.
LAUNCH_VARIABLES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")
NPROC_HP = "sagemaker_mpi_num_of_processes_per_host"
CUSTOM_HP = "sagemaker_mpi_custom_mpi_options"
TAIL_LINES = 60


def ssh_port(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    text = env.get(SSH_PORT_ENV, "22")
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{SSH_PORT_ENV}: expected a TCP port (1-65535), got {text!r}")
    return int(text)


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class MpiOptions:
    nproc_per_host: int | None
    """``sagemaker_mpi_num_of_processes_per_host``; None: the agent's count."""
    custom: tuple[str, ...]
    """``sagemaker_mpi_custom_mpi_options``, split like a shell would, never run by one."""


def mpi_options(config: JobConfig) -> MpiOptions:
    hp = config.framework_parameters
    where = f"{config.paths.hyperparameters_file}: {{}}"
    nproc = hp.get(NPROC_HP)
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise ConfigError(where.format(f"{NPROC_HP}: expected a positive integer, got {nproc!r}"))
    custom = hp.get(CUSTOM_HP, "")
    if not isinstance(custom, str):
        raise ConfigError(where.format(f"{CUSTOM_HP}: expected a string, got {custom!r}"))
    try:
        parts = tuple(shlex.split(custom))
    except ValueError as exc:
        raise ConfigError(where.format(f"{CUSTOM_HP}: cannot split {custom!r}: {exc}")) from exc
    for param in user_mca(parts):
        refused = None
        if param.name in RSH_ARGS_MCA:
            refused = port_refusal(param.value, f"{param.flag} {param.name} {param.value!r}")
        elif param.name in RSH_AGENT_MCA and not _is_ssh(param.value):
            refused = (
                f"{param.flag} {param.name} {param.value!r}: smdist starts the ranks over its "
                f"own ssh (the job's key, {SSH_PORT_ENV}): leave the agent out (or name an ssh "
                f"binary) and add ssh options with --mca plm_rsh_args or {SSH_ARGS_ENV}"
            )
        if refused:
            raise ConfigError(where.format(f"{CUSTOM_HP}: {refused}"))
    return MpiOptions(nproc, parts)


def ssh_extra_args(environ: Mapping[str, str]) -> str:
    """``SMDIST_SSH_ARGS``: ssh options added after smdist's own; never the port."""
    text = environ.get(SSH_ARGS_ENV, "")
    if refused := port_refusal(text, f"{SSH_ARGS_ENV}={text!r}"):
        raise ConfigError(refused)
    return text


def port_refusal(ssh_args: str, what: str) -> str | None:
    """Why ssh options the user added to smdist's may not set the port, or None if they don't.

    smdist's ``-p SMDIST_SSH_PORT`` comes first and ssh keeps an option's first value; the
    job's sshd on every host listens on that port."""
    if not _names_a_port(ssh_args.split()):
        return None
    return (
        f"{what} sets the ssh port, which ssh would ignore (smdist's -p comes first): "
        f"set {SSH_PORT_ENV} instead"
    )


MCA_FLAGS = ("--mca", "-mca", "--gmca", "-gmca", "--prtemca", "-prtemca", "--pmixmca", "-pmixmca")
"""How an MCA parameter is set on mpirun's command line, ``FLAG NAME VALUE``: Open MPI 4's
flags and Open MPI 5's for its runtime's (PRRTE's) and PMIx's parameters."""
RSH_ARGS_MCA = ("plm_rsh_args", "plm_ssh_args")  # Open MPI 4's name, Open MPI 5's
RSH_AGENT_MCA = ("plm_rsh_agent", "plm_ssh_agent", "orte_rsh_agent", "pls_rsh_agent")
"""Open MPI 4's name, Open MPI 5's, and Open MPI 4's older synonyms for it."""


@dataclass(frozen=True)
class Mca:
    """One MCA parameter in the user's options, as they wrote it."""

    flag: str
    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.flag} {self.name} {shlex.quote(self.value)}"


SMDIST_MCA = (
    ("orte_abort_on_non_zero_status", "1"),
    ("plm_rsh_no_tree_spawn", "1"),
    ("pml", "ob1"),
    ("btl", "^openib"),
)
"""smdist's MCA parameters besides the ssh ones and the interface's: a user's replaces one."""
INTERFACE_MCA = ("btl_tcp_if_include", "oob_tcp_if_include")


def _walk(custom: Sequence[str]) -> Iterator[str | Mca]:
    """The user's options one by one, an MCA parameter as one ``Mca``."""
    i = 0
    while i < len(custom):
        if custom[i] in MCA_FLAGS and i + 2 < len(custom):
            yield Mca(custom[i], custom[i + 1], custom[i + 2])
            i += 3
        else:
            yield custom[i]
            i += 1


def user_mca(custom: Sequence[str]) -> list[Mca]:
    """The MCA parameters in the user's options, in their order."""
    return [p for p in _walk(custom) if isinstance(p, Mca)]


def split_mca(custom: Sequence[str], names: Sequence[str]) -> tuple[list[str], list[Mca]]:
    """The user's options without their MCA parameters named ``names``, and those.

    smdist merges the ssh ones into its own (``plm_rsh_args``, ``plm_rsh_agent``) instead of
    dropping its own for them: Open MPI takes one value, and smdist's carries the port and
    the per-job key."""
    rest: list[str] = []
    taken: list[Mca] = []
    for p in _walk(custom):
        if isinstance(p, str):
            rest.append(p)
        elif p.name in names:
            taken.append(p)
        else:
            rest += [p.flag, p.name, p.value]
    return rest, taken


def describe_custom(custom: Sequence[str]) -> str:
    """The user's options for the log, each MCA parameter with what it does to smdist's."""
    defaults = dict(SMDIST_MCA)
    said = []
    for p in _walk(custom):
        if isinstance(p, str):
            said.append(shlex.quote(p))
        elif p.name in RSH_ARGS_MCA:
            said.append(f"{p} (after smdist's ssh arguments)")
        elif p.name in RSH_AGENT_MCA:
            said.append(f"{p} (with smdist's ssh arguments)")
        elif (name := _open_mpi_4_name(p.name)) in defaults:
            said.append(f"{p} (in place of smdist's {defaults[name]})")
        elif p.name in INTERFACE_MCA:
            said.append(f"{p} (in place of network_interface_name's)")
        else:
            said.append(str(p))
    return " ".join(said)


def _open_mpi_4_name(name: str) -> str:
    """Open MPI 5 calls the ``plm_rsh_*`` parameters ``plm_ssh_*``: one parameter, two names."""
    return "plm_rsh_" + name.removeprefix("plm_ssh_") if name.startswith("plm_ssh_") else name


def _is_ssh(agent: str) -> bool:
    """Whether ``plm_rsh_agent``'s value is one ssh binary (``ssh``, ``/usr/bin/ssh``)."""
    words = agent.split()
    return len(words) == 1 and os.path.basename(words[0]) == "ssh"


def _names_a_port(ssh_args: Sequence[str]) -> bool:
    """Whether ssh options set the port (``-p N``, ``-pN``, ``-o Port=N``, ``-oPort N``)."""
    for i, arg in enumerate(ssh_args):
        if arg.startswith("-p"):
            return True
        option = arg[2:] if arg.startswith("-o") else None
        if option == "" and i + 1 < len(ssh_args):
            option = ssh_args[i + 1]
        if option is not None and re.match(r"port\b", option.strip(), re.IGNORECASE):
            return True
    return False


def forwarded_names(custom: Sequence[str]) -> list[str]:
    """The variables named by ``-x NAME[=VALUE]`` in the user's mpirun options."""
    names = []
    for flag, value in itertools.pairwise(custom):
        if flag == "-x":
            names.append(value.split("=", 1)[0])
    return names


def mpirun_argv(
    hosts: Sequence[tuple[str, int]],
    rank_argv: Sequence[str],
    *,
    interface: str | None,
    port: int,
    ssh_extra: str = "",
    custom: Sequence[str] = (),
    forward: Sequence[str] = (),
    as_root: bool = False,
    mpirun: str = "mpirun",
) -> list[str]:
    """The mpirun command: every host with its slots, one rank per slot, over ssh.

    ``interface`` None: one host, no network options (the ranks talk over shared memory).
    """
    ssh_args = (
        f"-p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "-o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=30"
    )
    custom, user_ssh = split_mca(custom, RSH_ARGS_MCA)
    custom, agents = split_mca(custom, RSH_AGENT_MCA)  # an ssh of the user's (mpi_options)
    for extra in (ssh_extra, *(p.value for p in user_ssh)):  # ssh keeps an option's first value
        if extra.strip():
            ssh_args += " " + " ".join(extra.split())
    user_set = {_open_mpi_4_name(p.name) for p in user_mca(custom)}
    user_flags = set(custom)
    argv = [mpirun]
    if as_root:
        argv.append("--allow-run-as-root")
    argv += ["-np", str(sum(n for _, n in hosts)), "-H", ",".join(f"{h}:{n}" for h, n in hosts)]
    # Ranks bind their own GPU; MPI's core binding starves data loaders.
    for flag, value in (("--bind-to", "none"), ("--map-by", "slot")):
        if flag not in user_flags and flag[1:] not in user_flags:  # -map-by works too
            argv += [flag, value]
    argv.append("--tag-output")
    mca = [
        ("plm_rsh_agent", agents[-1].value if agents else "ssh"),
        ("plm_rsh_args", ssh_args),
        *SMDIST_MCA,
    ]
    if interface is not None:
        mca += [(name, interface) for name in INTERFACE_MCA]
    for name, value in mca:
        if name not in user_set:  # Open MPI refuses a parameter given twice: the user's wins
            argv += ["--mca", name, value]
    for name in forward:
        argv += ["-x", name]
    argv += list(custom)
    argv += list(rank_argv)
    return argv


# --- the agent's side -------------------------------------------------------------------


def job_dir(plan: JobPlan) -> Path:
    """The job's directory: the same path on every host, unique to this job on a machine.

    It holds one link per host to that host agent's run dir (removed with it when the agent
    ends): one on each machine of a real job, several when hosts share a machine.
    """
    tag = re.sub(r"[^A-Za-z0-9.-]", "_", plan.master_addr)
    return Path("/tmp") / f"smdist-mpi-{tag}-{plan.master_port}"


def _prune_job_dirs(parent: Path, keep: Path) -> None:
    """Remove earlier jobs' directories whose agents have all ended (only dead links left)."""
    for d in parent.glob("smdist-mpi-*"):
        if d == keep or not d.is_dir() or d.is_symlink():
            continue
        try:
            entries = list(d.iterdir())
            if entries and all(e.is_symlink() and not e.exists() for e in entries):
                for e in entries:
                    e.unlink()
                d.rmdir()
        except OSError:
            continue  # another agent's, or a race with one: leave it


def _link_host_dir(job: Path, host: str, target: Path) -> None:
    _prune_job_dirs(job.parent, job)
    job.mkdir(mode=0o700, exist_ok=True)
    link = job / host
    tmp = job / f".{host}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def host_environment(
    base_env: Mapping[str, str],
    sm_env: Mapping[str, str],
    plan: JobPlan,
    config: JobConfig,
    nproc: int,
    restart_count: int = 0,
    max_restarts: int = 0,
) -> dict[str, str]:
    """What every rank on this host starts from: as a torch-backend worker here would."""
    env = {k: v for k, v in base_env.items() if not k.startswith(MPI_PREFIXES)}
    for name, value in sm_env.items():
        env.setdefault(name, value)  # a variable the user set is never clobbered
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(
        {
            "MASTER_ADDR": plan.master_addr,
            "MASTER_PORT": str(plan.master_port),
            **contract.agent_variables(config.paths.root),
        }
    )
    job_id, _ = run_id(base_env, config.hyperparameters, plan.master_addr, plan.layout.hosts)
    node_rank = plan.layout.slot(config.resource.current_host).node_rank
    n = len(plan.layout.hosts)
    env.update(
        host_variables(
            base_env,
            run_id=job_id,
            node_rank=node_rank,
            num_hosts=n,
            restart_count=restart_count,
            max_restarts=max_restarts,
        )
    )
    return env


def write_host_file(run_dir: Path, host: str, node_rank: int, env: Mapping[str, str]) -> None:
    body = json.dumps({"host": host, "node_rank": node_rank, "env": dict(env)})
    contract.atomic_write(contract.RunDir(run_dir).host_file, body, perms=0o600)  # the env


def _ssh_banner(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def sshd_pid_file(port: int) -> Path:
    return Path("/run") / f"smdist-sshd-{port}.pid"


def sshd_job_dir(port: int) -> Path:
    """The job sshd's own files on a host: its config and the job's ``authorized_keys``.

    Under /run (root's, not world-writable): sshd's StrictModes refuses a key file below a
    world-writable directory such as /tmp. One sshd per port, so one job per port."""
    return Path("/run") / f"smdist-ssh-{port}"


# --- the job's ssh key --------------------------------------------------------------------


@dataclass(frozen=True)
class JobKey:
    """The master's key pair for one job: the private half never leaves ``private``'s dir."""

    private: Path
    public: str
    """One ``authorized_keys`` line: ``ssh-ed25519 AAAA... smdist-job``."""


_PUBLIC_KEY = re.compile(r"ssh-ed25519 [A-Za-z0-9+/]+={0,2}(?: [\w.@-]+)?")


def _job_key(environ: Mapping[str, str]) -> bool:
    text = environ.get(SSH_JOB_KEY_ENV, "1").strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{SSH_JOB_KEY_ENV}: expected 1 or 0, got {text!r}")


def make_job_key(parent: Path, path: str | None = None, timeout_s: float = 30.0) -> JobKey:
    """A fresh ed25519 key pair in a new 0700 dir under ``parent`` (the agent's private run
    dir, removed when the agent ends). ``path``: where to look for ssh-keygen (PATH)."""
    keygen = shutil.which("ssh-keygen", path=path)
    where = f"PATH={path if path is not None else os.environ.get('PATH', '')}"
    what = "the MPI backend's per-job ssh key"
    if keygen is None:
        raise ConfigError(
            f"{what}: ssh-keygen not found ({where}): install openssh-client in the image "
            f"(launchers/install-mpi.sh), or set {SSH_JOB_KEY_ENV}=0 to use your own keys"
        )
    d = parent / "ssh"
    d.mkdir(mode=0o700)
    private = d / "id_ed25519"
    argv = [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "smdist-job", "-f", str(private)]
    try:
        r = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s
        )
        why = " ".join((r.stderr or r.stdout).split())[:300] or f"exit {r.returncode}"
        failed = r.returncode != 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        why, failed = " ".join(str(exc).split())[:300], True
    public = ""
    if not failed:
        try:
            public = " ".join(private.with_name("id_ed25519.pub").read_text().split())
        except OSError as exc:
            why, failed = f"no public key: {exc.strerror or exc}", True
    if not failed and not _PUBLIC_KEY.fullmatch(public):
        why, failed = "its public key is not one ed25519 key line", True
    if failed or not private.is_file():
        shutil.rmtree(d, ignore_errors=True)
        raise ConfigError(f"{what}: {keygen} failed in {d}: {why or 'no private key written'}")
    return JobKey(private, public)


def ssh_key_args(key: JobKey) -> str:
    """mpirun's ssh uses the job's key and no other (not an agent's, not ~/.ssh's)."""
    return f"-i {key.private} -o IdentitiesOnly=yes"


def parse_ssh_key_word(text: str) -> str | None:
    """The master's word (``SSH_KEY_KEY``): the job's public key, or None (opt-out)."""
    try:
        word = json.loads(text)
        public = word["public_key"]
    except (ValueError, TypeError, KeyError) as exc:
        raise RendezvousFailed(f"{SSH_KEY_KEY}: the master's ssh key word is malformed") from exc
    if public is None:
        return None
    if not isinstance(public, str) or not _PUBLIC_KEY.fullmatch(public):
        raise RendezvousFailed(f"{SSH_KEY_KEY}: the master's public key is not an ed25519 key")
    return public


def install_job_key(port: int, public: str) -> Path:
    """This host's ``authorized_keys`` for the job: the one key, 0600 in a 0700 dir.

    ``restrict``: no pty, no forwarding of any kind; mpirun needs only to run a command."""
    d = sshd_job_dir(port)
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)  # an earlier run's dir with other modes: sshd's StrictModes
    path = d / "authorized_keys"
    contract.atomic_write(path, f"restrict {public}\n", perms=0o600)
    return path


def _pid_alive_with(pid_file: Path, marker: str) -> bool:
    """Whether ``pid_file`` names a live process whose command line contains ``marker``."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return False
    return marker in cmdline


def _sshd_config(port: int, authorized_keys: Path) -> str:
    """The job sshd's whole config (``-f``): nothing from /etc/ssh/sshd_config applies, so
    no ``AuthorizedKeysFile``, ``Match`` block or password login of the image's own."""
    host_keys = sorted(str(k) for k in Path("/etc/ssh").glob("ssh_host_*_key"))
    lines = [
        f"Port {port}",
        *(f"HostKey {k}" for k in host_keys),
        f"PidFile {sshd_pid_file(port)}",
        f"AuthorizedKeysFile {authorized_keys}",
        "AuthorizedKeysCommand none",
        "AuthorizedPrincipalsFile none",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "PermitRootLogin prohibit-password",  # SageMaker containers run as root
        "StrictModes yes",
        "UseDNS no",
        "PrintMotd no",
    ]
    return "\n".join(lines) + "\n"


def ensure_sshd(
    port: int | None = None,
    timeout_s: float = SSHD_START_S,
    *,
    authorized_keys: Path | None = None,
) -> str:
    """Make sure an sshd answers on this host; start one if not. Returns what was done.

    ``authorized_keys``: the job's key file. Then the sshd must be the job's own (started
    here with its own config, accepting that file only); an sshd someone else started on
    the port is refused, as it would accept other keys. None: the opt-out, any sshd."""
    port = ssh_port() if port is None else port
    pid_file = sshd_pid_file(port)
    marker = str(sshd_job_dir(port) / "sshd_config")
    if _ssh_banner("127.0.0.1", port):
        if authorized_keys is None:
            return f"sshd already answering on port {port}"
        if _pid_alive_with(pid_file, marker):
            return f"the job's sshd already answering on port {port}"
        raise ConfigError(
            f"port {port}: an sshd that smdist did not start already answers there, and it "
            f"would accept keys other than the job's: stop it, or set {SSH_PORT_ENV} to a free "
            f"port (the same on every host), or {SSH_JOB_KEY_ENV}=0 to use it with your own keys"
        )
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd):
        raise ConfigError(
            "the MPI backend needs sshd on every host: install openssh-server in the image "
            "(launchers/install-mpi.sh) and run launchers/sshd-setup.sh"
        )
    os.makedirs("/run/sshd", exist_ok=True)
    if not any(Path("/etc/ssh").glob("ssh_host_*_key")):
        subprocess.run(["ssh-keygen", "-A"], check=True, capture_output=True)
    # sshd forks into the background itself; its exit status says whether it could.
    if authorized_keys is None:
        argv = [sshd, "-p", str(port), "-o", f"PidFile={pid_file}"]
    else:
        config = Path(marker)
        contract.atomic_write(config, _sshd_config(port, authorized_keys), perms=0o600)
        argv = [sshd, "-f", str(config)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        why = " ".join(r.stderr.split())[:300] or f"exit {r.returncode}"
        raise ConfigError(f"cannot start sshd on port {port}: {why}")
    deadline = time.monotonic() + timeout_s
    while not _ssh_banner("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise ConfigError(f"sshd started but did not answer on port {port} in {timeout_s} s")
        time.sleep(0.1)
    if authorized_keys is None:
        return f"started sshd on port {port}"
    return f"started the job's sshd on port {port} (the job's key only)"


def stop_job_sshd(port: int) -> bool:
    """Job end: stop the job's sshd (if this agent's job started it) and remove its key
    file and config. Returns whether there was one to stop."""
    pid_file = sshd_pid_file(port)
    job = sshd_job_dir(port)
    stopped = False
    if _pid_alive_with(pid_file, str(job / "sshd_config")):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            stopped = True
        with contextlib.suppress(OSError):
            pid_file.unlink()
    shutil.rmtree(job, ignore_errors=True)
    return stopped


def _wait_sshd_ready(
    coordinator: Coordinator | None,
    hosts: Sequence[str],
    addresses: Mapping[str, str],
    port: int,
    timeout_s: float,
) -> None:
    """Master: bounded, logged wait until every other host says its sshd is up."""
    if not hosts:
        return
    start = time.monotonic()
    keys = [SSHD_READY_KEY + h for h in hosts]
    missing = list(keys)
    logged = start
    while True:
        left = timeout_s - (time.monotonic() - start)
        if coordinator is not None:
            missing = coordinator.wait_for(missing, max(0.0, min(10.0, left)), or_abort=True)
            _raise_if_aborted(coordinator)
        else:  # no store to hear from: ask the hosts' sshd directly
            missing = [
                k
                for k in missing
                if not _ssh_banner(addresses.get(h := k.removeprefix(SSHD_READY_KEY), h), port)
            ]
            if missing and left > 0:
                time.sleep(min(1.0, left))
        names = [k.removeprefix(SSHD_READY_KEY) for k in missing]
        if not missing:
            log.info("sshd ready on %s", ", ".join(hosts))
            return
        if time.monotonic() - start >= timeout_s:
            raise RendezvousFailed(
                f"sshd did not become ready within {timeout_s:.0f} s on {', '.join(names)} "
                "(mpirun needs it on every host)"
            )
        if time.monotonic() - logged >= 10.0:  # a line every 10 s, not every probe
            logged = time.monotonic()
            log.info(
                "waiting for sshd on %s (%.0f s of %.0f s)",
                ", ".join(names),
                logged - start,
                timeout_s,
            )


def _raise_if_aborted(coordinator: Coordinator) -> None:
    event = coordinator.event()
    if event is not None:
        raise JobAborted(event.headline, event.exit_code or 1)


def _fail_job_wide(coordinator: Coordinator, host: str, exc: SmdistError) -> None:
    """Publish ``exc`` as the job's abort, so every host stops with its headline."""
    headline = exc.headline() if exc.where == "" else f"{exc.headline()} (host {host})"
    coordinator.report(JobEvent("failure", host, headline, exc.exit_code, time=time.time()))


def _wait_ssh_key(coordinator: Coordinator, master: str, timeout_s: float) -> str | None:
    """Not the master: bounded, logged wait for the master's word on the job's ssh key."""
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        missing = coordinator.wait_for([SSH_KEY_KEY], max(0.0, min(10.0, left)), or_abort=True)
        _raise_if_aborted(coordinator)
        if not missing:
            return parse_ssh_key_word(coordinator.published(SSH_KEY_KEY)[SSH_KEY_KEY])
        if time.monotonic() - start >= timeout_s:
            raise RendezvousFailed(
                f"no ssh key from {master} within {timeout_s:.0f} s (the MPI backend's "
                "per-job key; is the master's agent running with --backend mpi?)"
            )
        log.info(
            "waiting for the job's ssh key from %s (%.0f s of %.0f s)",
            master,
            time.monotonic() - start,
            timeout_s,
        )


class MpiBackend:
    """Open MPI's mpirun on the master starts every host's ranks over ssh."""

    name = "mpi"

    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.options = mpi_options(config)  # parsed once; a bad value fails before the rendezvous
        ssh_extra_args(os.environ)  # the same for SMDIST_SSH_ARGS, on every host
        ssh_port(os.environ)  # and SMDIST_SSH_PORT, not only where mpirun is built
        self.sshd_port: int | None = None
        """The port of the job sshd this agent started or keyed (stopped by ``close``)."""

    def close(self) -> None:
        """Job end: this host's job sshd stops and its key file goes (the master's private
        key is in the agent's run dir, removed with it)."""
        if self.sshd_port is not None and stop_job_sshd(self.sshd_port):
            log.info("MPI: stopped the job's sshd on port %d, removed its key", self.sshd_port)
        self.sshd_port = None

    def processes_per_host(self, flag: str, gpus: int) -> tuple[int, str]:
        if flag == "auto" and self.options.nproc_per_host is not None:
            return self.options.nproc_per_host, NPROC_HP
        return nproc_from_flag(flag, gpus)

    def identify(self, failure: WorkerFailure) -> WorkerFailure:
        """The launcher's error file names the rank that failed first: that rank failed."""
        rec = failure.error_record()
        if rec is None or rec.get("reported_by") != "mpirun":
            return failure
        return records.replace(
            failure,
            host=str(rec.get("host") or failure.host),
            rank=int(rec.get("rank") or 0),
            local_rank=int(rec.get("local_rank") or 0),
        )

    def worker_specs(
        self, launch: Launch, plan: JobPlan, coordinator: Coordinator
    ) -> list[WorkerSpec]:
        """Master: one spec, the mpirun launcher. Other hosts: none (sshd up, readiness told)."""
        return _worker_specs(launch, plan, self, coordinator)


def _worker_specs(
    launch: Launch, plan: JobPlan, backend: MpiBackend, coordinator: Coordinator
) -> list[WorkerSpec]:
    config, opts = backend.config, backend.options
    entry, base_env, sm_env, run_dir = launch.entry, launch.base_env, launch.sm_env, launch.run_dir
    host = config.resource.current_host
    layout = plan.layout
    nprocs = {s.host: s.nproc for s in layout.slots}  # as the rendezvous agreed
    world = [s.host for s in layout.slots if s.nproc]  # not hosts outside the distribution
    slot = layout.slot(host)
    env = host_environment(
        base_env, sm_env, plan, config, nprocs[host], launch.restart_count, launch.max_restarts
    )
    write_host_file(run_dir, host, slot.node_rank, env)
    if host in world:  # the step counters of the ranks mpirun will start on this host
        first = sum(nprocs[h] for h in world[: world.index(host)])
        launch.watch.extend(open_counter(run_dir, first + i, i) for i in range(nprocs[host]))
    link = job_dir(plan)
    _link_host_dir(link, host, run_dir)
    port = ssh_port(base_env)
    others = [h for h in world if h != host and plan.addresses.get(h, h) != plan.master_addr]
    if host != layout.master:
        mine, master = plan.addresses.get(host), plan.addresses.get(layout.master)
        if mine is not None and mine == master:  # one machine (--simulate): no ssh at all
            done = f"same address as {layout.master}, no ssh needed"
        else:
            public = _wait_ssh_key(coordinator, layout.master, SSHD_WAIT_S)
            try:
                keys = None if public is None else install_job_key(port, public)
                if keys is not None:
                    backend.sshd_port = port  # from now on, close() cleans up
                done = ensure_sshd(port, authorized_keys=keys)
            except SmdistError as exc:
                _fail_job_wide(coordinator, host, exc)
                raise
            except OSError as exc:
                where = exc.filename or sshd_job_dir(port)
                err = ConfigError(f"the job's ssh key on {host}: {where}: {exc.strerror or exc}")
                _fail_job_wide(coordinator, host, err)
                raise err from exc
        log.info("MPI: %s; mpirun on %s starts this host's ranks", done, layout.master)
        coordinator.publish(SSHD_READY_KEY + host, "1")
        return []
    ssh_extra = ssh_extra_args(base_env)
    if others:
        try:
            key = make_job_key(run_dir, base_env.get("PATH")) if _job_key(base_env) else None
        except SmdistError as exc:
            _fail_job_wide(coordinator, host, exc)
            raise
        if key is None:
            log.info(
                "MPI: no per-job ssh key (%s=0): the hosts' own sshd and keys", SSH_JOB_KEY_ENV
            )
        else:
            log.info("MPI: a new ssh key for this job, to %s through the store", ", ".join(others))
            ssh_extra = f"{ssh_key_args(key)} {ssh_extra}"
        word = {"public_key": key.public if key else None}
        coordinator.publish(SSH_KEY_KEY, json.dumps(word))
    _wait_sshd_ready(coordinator, others, plan.addresses, port, SSHD_WAIT_S)
    mpirun = shutil.which("mpirun", path=base_env.get("PATH"))
    if mpirun is None:
        raise ConfigError(
            "--backend mpi: mpirun not found on PATH: install Open MPI (openmpi-bin; "
            "launchers/install-mpi.sh)"
        )
    single = len(world) == 1
    # The addresses the agent resolved (with its retry policy), so mpirun looks up nothing.
    hosts = [("localhost" if single else plan.addresses.get(h, h), nprocs[h]) for h in world]
    forwarded = forwarded_names(opts.custom)
    launch_env = {k: v for k, v in base_env.items() if not k.startswith(MPI_PREFIXES)}
    launch_env[JOB_DIR_ENV] = str(link)
    launch_env[FORWARDED_ENV] = ",".join(forwarded)
    layout_arg = ",".join(f"{h}:{nprocs[h]}" for h in world)
    launch_env[HOSTS_ENV] = layout_arg
    if os.geteuid() == 0:  # SageMaker containers run as root; Open MPI refuses without these
        launch_env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        launch_env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    forward = [
        JOB_DIR_ENV,
        FORWARDED_ENV,
        HOSTS_ENV,
        *(n for n in LAUNCH_VARIABLES if n in launch_env),
    ]
    rank_argv = [sys.executable, "-m", "smdist.worker.mpi_rank", *entry.argv()]
    argv = mpirun_argv(
        hosts,
        rank_argv,
        interface=None if single else config.resource.network_interface_name,
        port=port,
        ssh_extra=ssh_extra,
        custom=opts.custom,
        forward=forward,
        as_root=os.geteuid() == 0,
        mpirun=mpirun,
    )
    if opts.custom:
        log.info("MPI: from %s: %s", CUSTOM_HP, describe_custom(opts.custom))
    log.info("mpirun: %s", shlex.join(argv))
    error_file = contract.RunDir(run_dir).launcher_error_file
    # Each rank's last output time, stamped by the launcher: the master's hang watch judges
    # a rank that counted no step by it (its own host sees its steps, not its output).
    rank_hosts = [h for h in world for _ in range(nprocs[h])]
    output = OutputTimes.create(contract.RunDir(run_dir).output_times_file, len(rank_hosts))
    launch.relayed.append(RelayedRanks(output, rank_hosts))
    launcher = [
        sys.executable, "-m", "smdist.agent.backends.mpi",
        "--error-file", str(error_file),
        "--job-dir", str(link),
        "--hosts", layout_arg,
        "--output-times", str(output.path),
        "--", *argv,
    ]  # fmt: skip
    return [
        WorkerSpec(
            rank=0,
            local_rank=0,
            argv=launcher,
            env=launch_env,
            python=False,  # the user's Python runs under mpirun, not as this process
            error_file=error_file,
            control_file=contract.RunDir(run_dir).launcher_control_file,
            prefix=False,  # the launcher prefixes every rank's lines itself
        )
    ]


# --- the launcher: mpirun, its output, its verdict --------------------------------------

# --tag-output marks every fragment a rank wrote (unbuffered Python writes many per line).
_TAG = re.compile(rb"\[\d+,(\d+)\]<(stdout|stderr|stddiag)>:")
# Open MPI 4: "Process name: [[48367,1],1]"; PRRTE (Open MPI 5): "[prterun-h-123@1,1]".
_PROCESS = re.compile(r"Process name:\s*\[(?:\[[^\]]*\]|[^,\]]+),(\d+)\]")
_EXIT = re.compile(r"Exit code:\s*(-?\d+)")
_ABORTED = re.compile(
    r"MPI_ABORT was invoked on rank (\d+) in communicator \S+.*?errorcode:?\s*(-?\d+)",
    re.DOTALL | re.IGNORECASE,
)
_SIGNALLED = re.compile(
    r"noticed that process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)"
)


@dataclass(frozen=True)
class RootCause:
    """The rank mpirun reports as the first to fail."""

    rank: int
    host: str
    local_rank: int
    exit_code: int
    signal: int | None = None

    def describe(self) -> str:
        how = f"killed by signal {self.signal}" if self.signal else f"exit {self.exit_code}"
        return f"rank {self.rank} on {self.host} failed first ({how})"


def parse_root_cause(lines: Sequence[str], hosts: Sequence[tuple[str, int]]) -> RootCause | None:
    """mpirun's report of the first rank that failed, in its Open MPI 4 or 5 wording."""
    text = "\n".join(lines)
    a = _ABORTED.search(text)
    if a:  # an uncaught exception under mpi4py: the rank called MPI_Abort
        rank = int(a.group(1))
        host, local = place(hosts, rank)
        return RootCause(rank, host, local, int(a.group(2)) or 1)
    m = _PROCESS.search(text)
    if m:
        rank = int(m.group(1))
        code = _EXIT.search(text, m.end())
        host, local = place(hosts, rank)
        return RootCause(rank, host, local, int(code.group(1)) if code else 1)
    s = _SIGNALLED.search(text)
    if s:
        rank, sig = int(s.group(1)), int(s.group(3))
        host, local = place(hosts, rank)  # mpirun names the machine, not the job's host
        return RootCause(rank, host, local, contract.signal_exit_code(sig), sig)
    return None


class _Relay:
    """mpirun's output back into whole lines per rank, each as ``[host/rank] line``.

    Open MPI tags each fragment of a rank's output, so one rank's line may arrive in pieces,
    between pieces of other ranks' lines: the text after a tag belongs to that tag's rank
    and the newline ends the line of the last tag before it.
    """

    def __init__(self, hosts: Sequence[tuple[str, int]], output: OutputTimes | None = None) -> None:
        self.hosts = hosts
        self.output = output
        """Where each rank's last output time goes (read by the master's hang watch)."""
        self.rank_tails: dict[int, collections.deque[str]] = {}
        self.mpirun_tail: collections.deque[str] = collections.deque(maxlen=200)
        self.lock = threading.Lock()
        self.first_failure: RootCause | None = None
        """The first rank that said it failed (``contract.rank_failed_line``)."""

    def _line(self, rank: int | None, stream: bytes, text: bytes) -> bytes:
        decoded = text.decode("utf-8", "replace")[:1000]
        with self.lock:
            if rank is None:
                self.mpirun_tail.append(decoded)
                return text + b"\n"
            if stream != b"stdout":
                tail = self.rank_tails.setdefault(rank, collections.deque(maxlen=TAIL_LINES))
                tail.append(decoded)
                said = contract.parse_rank_failed_line(decoded)
                if said and self.first_failure is None and said[0] == rank:
                    _, local = place(self.hosts, rank)
                    self.first_failure = RootCause(rank, said[1], local, said[2] or 1)
        host, _ = place(self.hosts, rank)
        return b"[%s/%d] %s\n" % (host.encode(), rank, text)

    def run(self, src: IO[bytes], dst: IO[bytes]) -> None:
        """Relay ``src`` (one of mpirun's pipes) to ``dst``: what a read brings, every line
        it ends, goes out in one write (mpirun's last line without a newline at the end)."""
        fd = src.fileno()
        with contextlib.suppress(OSError):  # as the supervisor's relay: fewer, bigger reads
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        pending: dict[tuple[int, bytes], bytes] = {}
        rest = b""
        while True:
            try:
                chunk = os.read(fd, READ_BYTES)
            except OSError:
                chunk = b""
            if not chunk:
                break
            rest += chunk
            cut = rest.rfind(b"\n")
            if cut >= 0:
                seen: set[int] = set()
                self._write(dst, self._lines(rest[:cut].split(b"\n"), pending, seen))
                rest = rest[cut + 1 :]
                if self.output is not None and seen:
                    now = time.monotonic()  # once a read, for the ranks it brought
                    cells = self.output.cell
                    for rank in seen:
                        if rank < len(cells):
                            cells[rank] = now
        out = self._lines([rest], pending) if rest else []
        out += [self._line(rank, stream, text) for (rank, stream), text in pending.items() if text]
        self._write(dst, out)

    def _lines(
        self,
        lines: Sequence[bytes],
        pending: dict[tuple[int, bytes], bytes],
        seen: set[int] | None = None,
    ) -> list[bytes]:
        """mpirun's ``lines`` as whole rank lines: a rank's text without its newline yet
        waits in ``pending``. ``seen``: gets each rank that wrote a line."""
        out = []
        for line in lines:
            parts = _TAG.split(line)
            if parts[0]:  # before any tag: mpirun's own words
                out.append(self._line(None, b"", parts[0]))
            last: tuple[int, bytes] | None = None
            for i in range(1, len(parts), 3):
                last = (int(parts[i]), parts[i + 1])
                pending[last] = pending.get(last, b"") + parts[i + 2]
            if last is not None:
                if seen is not None:
                    seen.add(last[0])
                out.append(self._line(last[0], last[1], pending.pop(last)))
        return out

    @staticmethod
    def _write(dst: IO[bytes], out: Sequence[bytes]) -> None:
        if out:
            with contextlib.suppress(OSError, ValueError):
                dst.write(b"".join(out))
                dst.flush()


def _root_record(root: RootCause, job: Path, tail: Sequence[str]) -> dict[str, Any] | None:
    """The failing rank's error record: its own file where it ran here, else its stderr."""
    from smdist.agent.report.stderr import parse_stderr_traceback

    here = contract.RunDir(job / root.host).error_file(root.rank)  # if it ran here
    record = contract.read_error_record(here)
    if record is None:
        record = parse_stderr_traceback(list(tail))
    if record is None:
        return None
    record.update(host=root.host, rank=root.rank, local_rank=root.local_rank, reported_by="mpirun")
    return record


def launch(
    argv: Sequence[str],
    hosts: Sequence[tuple[str, int]],
    job: Path,
    error: Path,
    output_times: Path | None = None,
) -> int:
    """Run mpirun; on failure write the root cause's record to ``error``; return its code.
    ``output_times``: the file (``hang.OutputTimes``) to stamp each rank's last output in."""
    # SIGTERM reaches mpirun through the process group and mpirun stops the ranks; this
    # process stays to report. A handler (not SIG_IGN) so mpirun starts with the default.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=contract.exec_dying_with(os.getpid()),  # die with this launcher
    )
    output = None
    if output_times is not None:
        output = OutputTimes(output_times, sum(n for _, n in hosts))
    relay = _Relay(hosts, output)
    assert proc.stdout is not None and proc.stderr is not None
    threads = [
        threading.Thread(target=relay.run, args=(proc.stdout, sys.stdout.buffer), daemon=True),
        threading.Thread(target=relay.run, args=(proc.stderr, sys.stderr.buffer), daemon=True),
    ]
    for t in threads:
        t.start()
    code = proc.wait()
    for t in threads:
        t.join(timeout=10)
    if code == 0:
        return 0
    root = parse_root_cause(list(relay.mpirun_tail), hosts) or relay.first_failure
    if root is None:
        sys.stderr.write(f"smdist: mpirun exited with code {code}; no failing rank reported\n")
        return contract.exit_code(code)
    sys.stderr.write(f"smdist: mpirun: {root.describe()}\n")
    with relay.lock:
        tail = list(relay.rank_tails.get(root.rank, ()))
    record = _root_record(root, job, tail)
    if record is not None:
        contract.write_error_record(record, error)
    elif root.signal:
        # No traceback to keep, but who it was: the agent names this rank, not the launcher.
        identity = {
            "kind": "signal",
            "signal": signal.Signals(root.signal).name,
            "host": root.host,
            "rank": root.rank,
            "local_rank": root.local_rank,
            "reported_by": "mpirun",
            "time": time.time(),
        }
        contract.write_error_record(identity, error)
        sys.stdout.flush()
        sys.stderr.flush()
        # Die as the rank died, so the agent classifies the signal (OOM kill, segfault).
        signal.signal(root.signal, signal.SIG_DFL)
        os.kill(os.getpid(), root.signal)
    return root.exit_code


def main(args: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smdist.agent.backends.mpi")
    p.add_argument("--error-file", required=True, type=Path)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--hosts", required=True)
    p.add_argument("--output-times", type=Path)
    p.add_argument("mpirun", nargs=argparse.REMAINDER)
    ns = p.parse_args(args)
    argv = ns.mpirun[1:] if ns.mpirun[:1] == ["--"] else ns.mpirun
    if not argv:
        p.error("no mpirun command after --")
    try:
        hosts = parse_mpi_hosts(ns.hosts)
    except ValueError as exc:
        p.error(str(exc))
    try:
        return launch(argv, hosts, ns.job_dir, ns.error_file, ns.output_times)
    except (OSError, SmdistError) as exc:
        sys.stderr.write(f"smdist: cannot run mpirun: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
