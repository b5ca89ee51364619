"""Every ``smdist-run`` setting, in one table: flag, ``SMDIST_<FLAG>`` variable, default.

``docker run IMAGE train`` has no command line, so every flag can also be set by its
variable: the flag wins over the variable, the variable over the default. The table drives
the argument parser, the environment parsing, the start-of-job log line that says where each
setting came from, and the README's table (a test keeps the two equal). A new flag is one
row here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence

from smdist.errors import ConfigError
from smdist.records import dataclass

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Any

PREFIX = "SMDIST_"


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {text!r}")
    return int(text)


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def nproc(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f'expected "auto" or a positive integer, got {text!r}')
    return text


def host_map(text: str) -> dict[str, str]:
    pairs = {}
    for item in text.split(","):
        host, sep, addr = item.partition("=")
        if not sep or not host or not addr:
            raise argparse.ArgumentTypeError(
                f"expected HOST=ADDRESS[,HOST=ADDRESS...], got {text!r}"
            )
        pairs[host] = addr
    return pairs


def choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {text!r}")
        return text

    return parse


def text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def switch(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected 1/true/yes or 0/false/no, got {value!r}")


@dataclass(frozen=True)
class Setting:
    flag: str
    parse: Callable[[str], Any] | None
    """None: a switch (``--flag`` alone; the variable takes 1/true/yes or 0/false/no)."""
    default: Any
    meaning: str
    metavar: str | None = None
    shown_default: str | None = None
    """The README's default column, when the default is not a plain value."""
    example: str | None = None
    """A valid value for the variable (tests set every variable to its example)."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def variable(self) -> str:
        return PREFIX + self.dest.upper()

    @property
    def default_text(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if self.parse is None or self.default is None:
            return ""
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)

    def example_value(self) -> str:
        if self.example is not None:
            return self.example
        return _EXAMPLES.get(getattr(self.parse, "__name__", "switch"), "x")

    def from_env(self, value: str) -> Any:
        try:
            return switch(value) if self.parse is None else self.parse(value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"environment variable {self.variable}: {exc}") from exc


_EXAMPLES = {"seconds": "7.5", "port": "4242", "nproc": "3", "host_map": "algo-1=10.0.0.1",
             "switch": "true", "text": "x", "count": "2"}  # fmt: skip

TABLE: tuple[Setting, ...] = (
    Setting("--opt-ml", text, None, "the /opt/ml root", "DIR", "`/opt/ml`"),
    Setting(
        "--nproc-per-host",
        nproc,
        "auto",
        "workers per host; `auto`: one per GPU (1 on CPU), and one per host in script mode "
        "without a distribution setting",
        "auto|N",
    ),
    Setting(
        "--backend",
        choice("torch", "mpi"),
        None,
        "how workers are started",
        "torch|mpi",
        "`torch` (`mpi` when `sagemaker_mpi_enabled`)",
        example="mpi",
    ),
    Setting(
        "--simulate", text, None, "local simulation: H hosts x P processes on this machine", "HxP"
    ),
    Setting("--work-dir", text, None, "with `--simulate`: where the hosts' trees go", "DIR"),
    Setting(
        "--rdzv-port", port, 29400, "the master agent's rendezvous port (same on every host)", "N"
    ),
    Setting("--master-port", port, None, "the workers' `MASTER_PORT`", "N", "a free port"),
    Setting(
        "--rdzv-timeout", seconds, 600.0, "how long hosts may take to join the rendezvous", "S"
    ),
    Setting("--dns-timeout", seconds, 900.0, "how long host names may take to resolve", "S"),
    Setting("--nameserver", text, None, "DNS server to ask", "HOST[:PORT]", "from resolv.conf"),
    Setting("--host-addresses", host_map, None, "static addresses, no DNS", "H=ADDR,..."),
    Setting("--heartbeat-timeout", seconds, 10.0, "a host silent this long is declared lost", "S"),
    Setting(
        "--grace", seconds, 90.0, "after SIGTERM, before SIGKILL (SageMaker kills at 120 s)", "S"
    ),
    Setting("--abort-grace", seconds, 5.0, "after a failure elsewhere, before SIGKILL", "S"),
    Setting(
        "--install-timeout",
        seconds,
        1800.0,
        "how long pip may take to install the code dir's requirements",
        "S",
    ),
    Setting(
        "--max-restarts",
        count,
        0,
        "restart every host's workers up to N times after a failure a retry may fix "
        "([restarts.md](docs/restarts.md))",
        "N",
    ),
    Setting(
        "--restart-pause",
        seconds,
        0.1,
        "the pause before the first restart; it doubles with each restart, to at most 30 s",
        "S",
    ),
    Setting(
        "--hang-timeout",
        seconds,
        None,
        "a rank without progress for S seconds is a `Hang` (try 1800, or a few times the "
        "slowest step)",
        "S",
        "off",
    ),
    Setting(
        "--hang-startup",
        seconds,
        120.0,
        "with `--hang-timeout`: a rank that has counted no step is still starting for S "
        "seconds, then judged by its output",
        "S",
    ),
    Setting(
        "--no-hyperparameter-args",
        None,
        False,
        "don't append hyperparameters to the script's arguments",
    ),
    Setting("--check", None, False, "preflight only: report what would fail, train nothing"),
)
BY_DEST = {s.dest: s for s in TABLE}

SIMULATION_CHOOSES = frozenset(
    {"opt_ml", "nproc_per_host", "simulate", "work_dir", "rdzv_port", "master_port",
     "dns_timeout", "nameserver", "host_addresses", "check"}
)  # fmt: skip
"""What ``--simulate`` chooses for each simulated host's agent; every other row is passed on
(a new row reaches the simulated agents without anyone remembering to pass it)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument per row; every default is None so that a given flag can be told apart
    from a default (``resolve`` fills in the variable or the default)."""
    for s in TABLE:
        help_text = f"{s.meaning} (env {s.variable}; default {s.default_text or 'none'})"
        help_text = help_text.replace("`", "").replace("%", "%%")
        if s.parse is None:
            parser.add_argument(s.flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                s.flag, type=s.parse, default=None, metavar=s.metavar, help=help_text
            )


@dataclass(frozen=True)
class Resolved:
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    """dest -> the flag, the variable, or "default"."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def describe(self) -> str:
        """One line: each setting not at its default, with where it came from."""
        parts = []
        for s in TABLE:
            source = self.sources[s.dest]
            if source != "default":
                value = self.values[s.dest]
                shown = (
                    ",".join(f"{k}={v}" for k, v in value.items())
                    if isinstance(value, Mapping)
                    else value
                )
                parts.append(f"{s.flag.removeprefix('--')}={shown} ({source})")
        if not parts:
            return "all defaults (no flags, no SMDIST_* variables)"
        return ", ".join(parts) + "; the rest default"


def resolve(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Resolved:
    """Flag > ``SMDIST_<FLAG>`` > default, for every row. Raises ConfigError naming the
    variable when a variable's value is bad."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in TABLE:
        given = getattr(ns, s.dest, None)
        if given is not None:
            values[s.dest], sources[s.dest] = given, s.flag
        elif env.get(s.variable) is not None:
            values[s.dest], sources[s.dest] = s.from_env(env[s.variable]), s.variable
        else:
            values[s.dest], sources[s.dest] = s.default, "default"
    return Resolved(values, sources)


def flags_for(resolved: Resolved, names: Sequence[str]) -> list[str]:
    """The command-line flags that reproduce ``names``' values (for a child agent)."""
    argv: list[str] = []
    for name in names:
        s, value = BY_DEST[name], resolved.values[name]
        if s.parse is None:
            if value:
                argv.append(s.flag)
        elif value is not None:
            shown = (
                ",".join(f"{k}={v}" for k, v in value.items())
                if isinstance(value, Mapping)
                else str(value)
            )
            argv += [s.flag, shown]
    return argv


def readme_rows() -> list[str]:
    """The README's settings table, row by row (``tests/test_settings.py`` compares)."""
    rows = []
    for s in TABLE:
        flag = f"`{s.flag}`" if s.metavar is None else f"`{s.flag} {s.metavar}`"
        default = s.default_text
        if default and s.shown_default is None:
            default = f"`{default}`"
        cells = [flag, f"`{s.variable}`", default, s.meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows
