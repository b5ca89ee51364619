"""Who may talk to the master's store: the job's secret, and the addresses it admits.

Both are decided once per agent, before the rendezvous, and logged with their source
(docs/security.md says what each protects against and what it does not).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from smdist.config import JobConfig
from smdist.errors import ConfigError
from smdist.records import dataclass

TYPE_CHECKING = False  # not typing's: every host's agent imports this on its way to the rendezvous
if TYPE_CHECKING:
    from typing import Any

SECRET_ENV = "SMDIST_JOB_SECRET"
SECRET_FILE_ENV = "SMDIST_JOB_SECRET_FILE"
ALLOW_ENV = "SMDIST_STORE_ALLOW"
MIN_SECRET_BYTES = 16

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class JobSecret:
    key: bytes
    source: str
    """Where it came from, for the log line (never the secret itself)."""


def job_secret(config: JobConfig, environ: Mapping[str, str] | None = None) -> JobSecret:
    """``SMDIST_JOB_SECRET``, else the file ``SMDIST_JOB_SECRET_FILE`` names, else one derived
    from what every host of the job is given and an outsider is not: the hyperparameters,
    the input channels, the host list and SageMaker's job name/ARN."""
    env = os.environ if environ is None else environ
    if env.get(SECRET_ENV):
        return JobSecret(_checked(env[SECRET_ENV].encode(), SECRET_ENV), SECRET_ENV)
    if env.get(SECRET_FILE_ENV):
        path = Path(env[SECRET_FILE_ENV])
        try:
            text = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"{SECRET_FILE_ENV}={path}: cannot read the job secret: {exc.strerror or exc}"
            ) from exc
        return JobSecret(_checked(text, f"{SECRET_FILE_ENV}={path}"), f"{SECRET_FILE_ENV}={path}")
    shared: dict[str, Any] = {
        "hosts": sorted(config.resource.hosts),
        "hyperparameters": _json_or_empty(config.paths.hyperparameters_file),
        "channels": _json_or_empty(config.paths.input_data_config_file),
        "job": [env.get("TRAINING_JOB_ARN", ""), env.get("TRAINING_JOB_NAME", "")],
    }
    canonical = json.dumps(shared, sort_keys=True, separators=(",", ":")).encode()
    key = hashlib.sha256(b"smdist job secret v1\0" + canonical).digest()
    return JobSecret(key, "derived from the job's hyperparameters, channels, hosts and job name")


def _checked(secret: bytes, where: str) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where}: the job secret is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return secret


def _json_or_empty(path: Path) -> Any:
    # Parsed, so formatting differences between hosts' copies do not matter; config.load
    # has already rejected a file that is not JSON.
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class AllowList:
    """The peer addresses the store answers; everything else is closed at accept."""

    networks: tuple[IPNetwork, ...]
    any_address: bool = False
    source: str = "the job's hosts"

    def admits(self, address: str) -> bool:
        if self.any_address:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self.networks)

    def describe(self) -> str:
        if self.any_address:
            return "any address"
        shown = [str(n).removesuffix("/32").removesuffix("/128") for n in self.networks]
        more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        return ", ".join(shown[:8]) + more


def allow_list(addresses: Iterable[str], environ: Mapping[str, str] | None = None) -> AllowList:
    """The job's hosts' addresses and this host's loopback, widened by ``SMDIST_STORE_ALLOW``
    (comma-separated addresses or CIDR networks, or ``any``)."""
    env = os.environ if environ is None else environ
    nets: list[IPNetwork] = [ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("::1")]
    for a in addresses:
        try:
            nets.append(ipaddress.ip_network(a))
        except ValueError:
            continue  # a name the agent could not resolve is no address to admit
    extra = env.get(ALLOW_ENV, "").strip()
    if not extra:
        return AllowList(tuple(dict.fromkeys(nets)))
    if extra.lower() in ("any", "*"):
        return AllowList((), any_address=True, source=f"{ALLOW_ENV}={extra}")
    for item in extra.split(","):
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{ALLOW_ENV}: {item.strip()!r} is not an address or CIDR network "
                "(e.g. 10.0.0.0/16,fd00::/8, or any)"
            ) from None
    return AllowList(tuple(dict.fromkeys(nets)), source=f"the job's hosts + {ALLOW_ENV}")
