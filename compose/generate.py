"""Write an N-host docker-compose job: one service per SageMaker host, ``algo-1 .. algo-N``.

``python -m compose.generate --hosts 4 --out DIR [--nproc-per-host N] [SCRIPT [ARGS...]]``
writes ``DIR/docker-compose.yml`` and, per host, ``DIR/hosts/<host>/`` holding what SageMaker
gives that host: ``input/config/resourceconfig.json`` (its own ``current_host``), and the
``model/``, ``output/`` and ``checkpoints/`` directories bind-mounted at /opt/ml/model,
/opt/ml/output and /opt/ml/checkpoints, so whatever a container writes there can be read on
the machine that ran it.

The YAML is plain (version "2.4", no extensions) so ``docker compose`` (v2) and
``docker-compose`` (v1, Debian's) both run it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_IMAGE = "smdist-compose:latest"
NETWORK = "smdist"
HOSTS_DIR = "hosts"
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def host_names(count: int) -> list[str]:
    """SageMaker's host names for a job of ``count`` instances."""
    if count < 1:
        raise ValueError(f"hosts: expected at least 1, got {count}")
    return [f"algo-{i}" for i in range(1, count + 1)]


def _check_hosts(hosts: Sequence[str]) -> None:
    if not hosts:
        raise ValueError("hosts: expected at least one host")
    for host in hosts:
        if not _HOST_RE.match(host):
            raise ValueError(f"host {host!r}: expected a DNS label (a-z, 0-9, '-')")


def _q(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: no escaping rules of our own.
    return json.dumps(value)


def render(
    hosts: Sequence[str],
    command: Sequence[str],
    *,
    image: str = DEFAULT_IMAGE,
    environment: Mapping[str, str] | None = None,
    header: str = "",
) -> str:
    """The compose file text for ``hosts`` (paths relative to the file's directory)."""
    _check_hosts(hosts)
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += ['version: "2.4"', "services:"]
    for host in hosts:
        base = f"./{HOSTS_DIR}/{host}"
        lines += [
            f"  {host}:",
            f"    image: {_q(image)}",
            f"    hostname: {_q(host)}",
            f"    command: [{', '.join(_q(c) for c in command)}]",
        ]
        if environment:
            lines.append("    environment:")
            lines += [f"      {_q(k)}: {_q(v)}" for k, v in sorted(environment.items())]
        lines += [
            "    volumes:",
            f"      - {_q(base + '/input/config:/opt/ml/input/config:ro')}",
            f"      - {_q(base + '/model:/opt/ml/model')}",
            f"      - {_q(base + '/output:/opt/ml/output')}",
            f"      - {_q(base + '/checkpoints:/opt/ml/checkpoints')}",
            # torch's shared-memory users (DataLoader workers) outgrow Docker's 64 MB default.
            '    shm_size: "1gb"',
            f"    networks: [{NETWORK}]",
            # Names outside the job go to a resolver that is not there (the container's own
            # loopback), so Docker's embedded DNS never forwards a query off the machine.
            '    dns: ["127.0.0.1"]',
            '    dns_search: ["."]',
        ]
    lines += [
        "networks:",
        f"  {NETWORK}:",
        # Internal: hosts see each other and nothing else; an unknown name is never
        # forwarded to a resolver outside the job.
        "    internal: true",
    ]
    return "\n".join(lines) + "\n"


def resource_config(current_host: str, hosts: Sequence[str]) -> dict[str, object]:
    """resourceconfig.json as SageMaker writes it for ``current_host``."""
    return {
        "current_host": current_host,
        "current_instance_type": "local",
        "current_group_name": "homogeneousCluster",
        "hosts": list(hosts),
        "instance_groups": [
            {
                "instance_group_name": "homogeneousCluster",
                "instance_type": "local",
                "hosts": list(hosts),
            }
        ],
        "network_interface_name": "eth0",
    }


def write_job(
    out_dir: Path,
    hosts: Sequence[str],
    command: Sequence[str],
    *,
    image: str = DEFAULT_IMAGE,
    resource_hosts: Sequence[str] | None = None,
    environment: Mapping[str, str] | None = None,
    hyperparameters: Mapping[str, object] | None = None,
    header: str = "",
) -> Path:
    """Write the compose file and every host's directories; return the compose file.

    ``resource_hosts`` is the host list every resourceconfig.json names (default: ``hosts``);
    naming a host with no container simulates one that never comes up.
    """
    _check_hosts(hosts)
    listed = list(resource_hosts) if resource_hosts is not None else list(hosts)
    missing = [h for h in hosts if h not in listed]
    if missing:
        raise ValueError(f"resource_hosts: must list every container's host, missing {missing}")
    for host in hosts:
        host_dir = out_dir / HOSTS_DIR / host
        config_dir = host_dir / "input" / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (host_dir / "model").mkdir(exist_ok=True)
        (host_dir / "output").mkdir(exist_ok=True)
        (host_dir / "checkpoints").mkdir(exist_ok=True)
        doc = resource_config(host, listed)
        (config_dir / "resourceconfig.json").write_text(json.dumps(doc, indent=2) + "\n")
        if hyperparameters is not None:
            # SageMaker writes every hyperparameter value as a JSON-encoded string.
            encoded = {
                k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()
            }
            (config_dir / "hyperparameters.json").write_text(json.dumps(encoded, indent=2) + "\n")
    compose_file = out_dir / "docker-compose.yml"
    compose_file.write_text(
        render(hosts, command, image=image, environment=environment, header=header)
    )
    return compose_file


def job_command(script: str, args: Sequence[str], nproc_per_host: str | None) -> list[str]:
    """``smdist-run [--nproc-per-host N] SCRIPT ARGS`` (or SageMaker's ``train`` if no script)."""
    if not script:
        return ["train"]
    command = ["smdist-run"]
    if nproc_per_host:
        command += ["--nproc-per-host", nproc_per_host]
    return [*command, script, *args]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose.generate", description=__doc__)
    parser.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    parser.add_argument("--out", type=Path, default=Path("compose"), help="output directory")
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument("--nproc-per-host", default=None, help="auto or N (smdist-run's flag)")
    parser.add_argument("script", nargs="?", default="", help="entry script (default: train)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    ns = parser.parse_args(argv)
    try:
        hosts = host_names(ns.hosts)
    except ValueError as exc:
        parser.error(str(exc))
    command = job_command(ns.script, ns.args, ns.nproc_per_host)
    header = (
        f"Generated by `python -m compose.generate --hosts {ns.hosts}`: {len(hosts)} SageMaker\n"
        "hosts, each with its own resourceconfig.json, model/output/checkpoints dirs in ./hosts/.\n"
        "Build the image first: `python -m compose.harness build` (see docs/compose.md)."
    )
    environment = {} if ns.script else {"SAGEMAKER_PROGRAM": "ddp.py"}
    path = write_job(ns.out, hosts, command, image=ns.image, environment=environment, header=header)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
