"""The agent finds its hosts through a real DNS server (tests/dns_server.py) on loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.dns_server import DnsServer
from tests.helpers import start_hosts, write_script

SCRIPT = """
import json, os
with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "seen.json"), "w") as f:
    json.dump({k: os.environ[k] for k in ("RANK", "MASTER_ADDR", "SM_CURRENT_HOST")}, f)
"""


def _start(
    tmp_path: Path, hosts: list[str], dns: DnsServer, script: Path, *flags: str, only: int = 0
) -> dict[str, subprocess.Popen[str]]:
    """One agent per host (the first ``only`` hosts) asking ``dns``."""
    ns = "{}:{}".format(*dns.endpoint)
    started = hosts[: only or len(hosts)]
    return start_hosts(
        tmp_path, hosts, script, "--nameserver", ns, *flags, started=started, resolve="dns"
    )


def test_agents_resolve_each_other_and_master_addr_is_the_resolved_ip(tmp_path: Path) -> None:
    script = write_script(tmp_path / "s.py", SCRIPT)
    with DnsServer() as dns:
        dns.add("algo-1", a="127.0.0.1")
        dns.add("algo-2", a="127.0.0.1")
        agents = _start(tmp_path, ["algo-1", "algo-2"], dns, script)
        errs = {h: a.communicate(timeout=60)[1] for h, a in agents.items()}
    assert {h: a.returncode for h, a in agents.items()} == {"algo-1": 0, "algo-2": 0}, errs
    seen = json.loads((tmp_path / "algo-2" / "output" / "data" / "seen.json").read_text())
    assert seen == {"RANK": "1", "MASTER_ADDR": "127.0.0.1", "SM_CURRENT_HOST": "algo-2"}


def test_a_host_that_never_resolves_fails_every_agent_with_its_name(tmp_path: Path) -> None:
    script = write_script(tmp_path / "s.py", SCRIPT)
    with DnsServer() as dns:
        dns.add("algo-1", a="127.0.0.1")
        dns.add("algo-2", a="127.0.0.1")
        # algo-3 has no container and no record
        hosts = ["algo-1", "algo-2", "algo-3"]
        agents = _start(tmp_path, hosts, dns, script, "--dns-timeout", "3", only=2)
        errs = {h: a.communicate(timeout=60)[1] for h, a in agents.items()}
    for h, a in agents.items():
        assert a.returncode == 1, errs[h]
        first = (tmp_path / h / "output" / "failure").read_text().splitlines()[0]
        assert first.startswith("HostResolutionFailed: 1 of 3 hosts did not resolve"), first
        assert "algo-3 NXDOMAIN" in first
        assert not (tmp_path / h / "output" / "data" / "seen.json").exists()
