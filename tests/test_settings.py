"""Every smdist-run flag has an SMDIST_<FLAG> variable: flag > variable > default, a bad
value is a ConfigError naming the variable, and the README's table is the code's table."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

from smdist.agent import cli, settings
from smdist.errors import ConfigError
from tests.helpers import REPO, TRAIN, env, make_tree, run, write_script


def _ns(args: list[str], environ: dict[str, str]) -> settings.Resolved:
    ns = cli._parser("smdist-run", with_entry=True).parse_args([*args, "train.py"])
    return settings.resolve(ns, environ)


def _bad_value(s: settings.Setting) -> str:
    for candidate in ("", "-1", "abc", "maybe"):
        try:
            s.from_env(candidate)
        except ConfigError:
            return candidate
    raise AssertionError(f"{s.variable} accepts anything")


@pytest.mark.parametrize("s", settings.TABLE, ids=lambda s: s.variable)
def test_every_flag_has_a_variable_flag_wins_bad_value_names_the_variable(
    s: settings.Setting,
) -> None:
    example = s.example_value()
    from_var = _ns([], {s.variable: example})
    assert from_var.sources[s.dest] == s.variable
    assert from_var.values[s.dest] == s.from_env(example) != s.default
    assert f"({s.variable})" in from_var.describe()

    defaults = _ns([], {})
    assert defaults.sources[s.dest] == "default" and defaults.values[s.dest] == s.default

    if s.parse is None:
        flag_args = [s.flag]
        from_flag = _ns(flag_args, {s.variable: "false"})
        assert from_flag.values[s.dest] is True
    else:
        from_flag = _ns([s.flag, example], {s.variable: _bad_value(s) or "x"})
        assert from_flag.values[s.dest] == s.parse(example)  # the bad variable is not read
    assert from_flag.sources[s.dest] == s.flag

    bad = _bad_value(s)
    with pytest.raises(ConfigError, match=f"^environment variable {s.variable}: expected"):
        _ns([], {s.variable: bad})


def test_readme_table_is_the_code_table() -> None:
    readme = (REPO / "README.md").read_text()
    header = "| flag | variable | default | meaning |\n|---|---|---|---|\n"
    assert header in readme
    block = readme.split(header, 1)[1].split("\n\n", 1)[0]
    assert block.splitlines() == settings.readme_rows()


def test_no_two_settings_share_a_variable_and_names_follow_the_flags() -> None:
    variables = [s.variable for s in settings.TABLE]
    assert len(set(variables)) == len(variables)
    for s in settings.TABLE:
        assert s.variable == "SMDIST_" + s.flag[2:].upper().replace("-", "_")


NPROC_SCRIPT = """
import json, os
out = os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], f"rank-{os.environ['RANK']}.json")
with open(out, "w") as f:
    json.dump({"world": os.environ["WORLD_SIZE"], "argv": __import__("sys").argv[1:]}, f)
"""


def test_variables_reach_a_real_agent_and_are_logged_with_their_source(tmp_path: Path) -> None:
    script = write_script(tmp_path / "train.py", NPROC_SCRIPT)
    root = make_tree(tmp_path / "opt_ml", hyperparameters={"lr": "0.1"})
    r = run(
        ["--opt-ml", str(root), "--grace", "30", str(script)],
        SMDIST_NPROC_PER_HOST="2",
        SMDIST_NO_HYPERPARAMETER_ARGS="yes",
        SMDIST_GRACE="abc",  # the flag wins: never read
    )
    assert r.returncode == 0, r.stderr
    data = root / "output" / "data"
    reports = [json.loads((data / f"rank-{i}.json").read_text()) for i in range(2)]
    assert all(rep == {"world": "2", "argv": []} for rep in reports)
    line = next(x for x in r.stderr.splitlines() if "settings: " in x)
    assert "nproc-per-host=2 (SMDIST_NPROC_PER_HOST)" in line
    assert "no-hyperparameter-args=True (SMDIST_NO_HYPERPARAMETER_ARGS)" in line
    assert "grace=30.0 (--grace)" in line and "the rest default" in line


def test_a_bad_variable_under_train_is_a_config_error_with_a_failure_file(
    tmp_path: Path,
) -> None:
    root = make_tree(tmp_path / "opt_ml", hyperparameters={"sagemaker_program": '"train.py"'})
    r = subprocess.run(
        [*TRAIN, "--opt-ml", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(SMDIST_HEARTBEAT_TIMEOUT="ten"),
    )
    assert r.returncode == 2
    expected = (
        "ConfigError: environment variable SMDIST_HEARTBEAT_TIMEOUT: expected a positive "
        "number of seconds, got 'ten'"
    )
    assert (root / "output" / "failure").read_text().splitlines()[0] == expected
    assert "Traceback" not in r.stderr


def test_simulate_from_variables_does_not_recurse(tmp_path: Path) -> None:
    script = write_script(tmp_path / "train.py", NPROC_SCRIPT)
    work = tmp_path / "work"
    r = run([str(script)], SMDIST_SIMULATE="2x1", SMDIST_WORK_DIR=str(work))
    assert r.returncode == 0, r.stderr
    assert sorted(p.parent.parent.parent.name for p in work.glob("*/output/data/rank-*")) == [
        "algo-1",
        "algo-2",
    ]
    assert re.search(r"simulating 2 host\(s\) x 1 process", r.stderr)


def test_parser_defaults_are_none_so_a_given_flag_is_told_apart() -> None:
    ns = cli._parser("smdist-run", True).parse_args(["train.py"])
    assert all(getattr(ns, s.dest) is None for s in settings.TABLE)
    assert isinstance(ns, argparse.Namespace)


def test_simulated_agents_get_every_setting_the_simulation_does_not_choose() -> None:
    """``--simulate`` hands each host's agent this command's settings: every row not chosen
    by the simulation itself arrives with its value (a new row needs no extra code)."""
    passed = [s for s in settings.TABLE if s.dest not in settings.SIMULATION_CHOOSES]
    assert {"max_restarts", "hang_timeout", "grace", "backend"} <= {s.dest for s in passed}
    args = ["--simulate", "2x1"]
    for s in passed:
        args += [s.flag] if s.parse is None else [s.flag, s.example_value()]
    parsed = cli._parse("smdist-run", True, [*args, "train.py"])
    assert isinstance(parsed, argparse.Namespace)
    handed = cli._agent_flags(parsed)
    child = _ns(handed, {})
    for s in passed:
        assert child.values[s.dest] == getattr(parsed, s.dest), s.flag
        assert child.sources[s.dest] == s.flag, s.flag


def test_every_setting_is_either_passed_to_simulated_agents_or_chosen_by_the_simulation() -> None:
    """Given every flag, the simulated agents get exactly the rows the simulation does not
    choose: none is dropped unless listed in SIMULATION_CHOOSES, none listed is passed."""
    rows = {s.dest for s in settings.TABLE}
    assert not settings.SIMULATION_CHOOSES - rows, "stale names in SIMULATION_CHOOSES"
    args: list[str] = []
    for s in settings.TABLE:
        args += [s.flag] if s.parse is None else [s.flag, s.example_value()]
    parsed = cli._parse("smdist-run", True, [*args, "train.py"])
    assert isinstance(parsed, argparse.Namespace)
    handed = set(cli._agent_flags(parsed))
    for s in settings.TABLE:
        assert (s.flag in handed) != (s.dest in settings.SIMULATION_CHOOSES), s.flag
