"""Preflight: what would fail, found before any worker starts (``smdist-run --check``).

Each check says ok, warn or fail, and a failure carries the category the failure file
would have used, so ``--check`` and a failed job speak the same words. Nothing here runs
the user's code: imports are found by reading the script's syntax tree.
"""

from __future__ import annotations

import _ast as ast  # the node classes without ast.py's own imports (issue 18: 18 M instructions)
import errno
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from smdist import config as config_mod
from smdist.agent import entry as entries
from smdist.agent.report.memory import format_bytes
from smdist.agent.topology import gpu_count
from smdist.config import JobConfig, Paths
from smdist.contract import Category
from smdist.errors import ConfigError, SmdistError
from smdist.records import dataclass

TYPE_CHECKING = False  # not typing's: the agent's start-up does without it (issue 18)
if TYPE_CHECKING:
    from typing import Literal

    Status = Literal["ok", "warn", "fail"]
else:
    Status = str
HostResolver = Callable[[Sequence[str]], object]
"""Resolves every host or raises (HostResolutionFailed); discovery.py provides one."""

LOW_DISK_BYTES = 1 << 30
FULL_DISK_BYTES = 64 << 20
SMALL_SHM_BYTES = 1 << 30
_MAX_SCANNED_FILES = 200


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    category: str | None = None
    """For a failure: the failure file's category (MissingDependency, ConfigError, ...)."""

    def as_error(self) -> PreflightFailed:
        return PreflightFailed(self)


class PreflightFailed(SmdistError):
    """A failed check, to hand to ``write.report(smdist_error=...)``."""

    def __init__(self, check: Check) -> None:
        super().__init__(check.detail)
        self.check = check
        self.category = check.category or "PreflightFailed"
        self.exit_code = 2 if self.category in _USAGE_CATEGORIES else 1


_USAGE_CATEGORIES = (Category.CONFIG_ERROR, Category.ENTRY_POINT_NOT_FOUND)


# --- the entry point and its imports --------------------------------------------------


@dataclass(frozen=True)
class ImportSite:
    """One ``import`` statement: the top-level module it needs and where it is."""

    module: str
    file: Path
    line: int
    conditional: bool
    """Inside a function, class or ``if``: it may never run."""

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def where(self, base: Path | None = None) -> str:
        path = self.file
        if base is not None and self.file.is_relative_to(base):
            path = self.file.relative_to(base)
        return f"{path}:{self.line}"


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        if handler.type is None:
            return True
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        for n in names:
            if isinstance(n, ast.Name) and n.id in (
                "ImportError",
                "ModuleNotFoundError",
                "Exception",
                "BaseException",
            ):
                return True
    return False


def _is_main_guard(node: ast.If) -> bool:
    t = node.test
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators)
    )


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk_imports(
    body: Sequence[ast.stmt], conditional: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, conditional
        elif isinstance(node, ast.Try):
            if not _catches_import_error(node):  # a guarded import is optional by design
                yield from _walk_imports(node.body, conditional)
            for h in node.handlers:
                yield from _walk_imports(h.body, True)
            yield from _walk_imports(node.orelse, conditional)
            yield from _walk_imports(node.finalbody, conditional)
        elif isinstance(node, ast.If):
            if _is_type_checking(node):
                continue
            inner = conditional if _is_main_guard(node) else True
            yield from _walk_imports(node.body, inner)
            yield from _walk_imports(node.orelse, True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _walk_imports(node.body, True)
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While)):
            yield from _walk_imports(node.body, conditional)
            yield from _walk_imports(getattr(node, "orelse", []), True)


def _local_module_files(base: Path, module: str) -> list[Path]:
    """The files of ``module`` if it lives under ``base`` (the script's own code)."""
    parts = module.split(".")
    out: list[Path] = []
    d = base
    for i, part in enumerate(parts):
        if (d / f"{part}.py").is_file():
            out.append(d / f"{part}.py")
            break
        if not (d / part).is_dir():
            break
        d = d / part
        if (d / "__init__.py").is_file():
            out.append(d / "__init__.py")
        if i == len(parts) - 1 and (d / "__main__.py").is_file():
            out.append(d / "__main__.py")
    return out


class _Local:
    """Which top-level names are the script's own modules under ``base``: one directory
    listing for the whole scan, not a stat (and two globs) per import (issue 18: this scan
    runs before every first rank)."""

    def __init__(self, base: Path) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        try:
            with os.scandir(base) as entries:
                for e in entries:
                    if e.is_dir():
                        self.dirs.add(e.name)
                    elif e.is_file():
                        self.files.add(e.name)
        except OSError:
            pass
        # top.so, top.cpython-311-x86_64-linux-gnu.so: extension modules
        self.extensions = {n.split(".", 1)[0] for n in self.files if n.endswith(".so")}

    def __contains__(self, top: str) -> bool:
        return f"{top}.py" in self.files or top in self.dirs or top in self.extensions


def _parse(source: bytes, filename: str) -> ast.Module:
    """``ast.parse(source, filename)``: the syntax tree, nothing run."""
    tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
    assert isinstance(tree, ast.Module)
    return tree


def scan_imports(script: Path, local_root: Path | None = None) -> list[ImportSite]:
    """The non-local modules ``script`` and its local modules import (static: nothing runs).

    ``local_root``: where the worker's own modules live (first on its sys.path): the
    script's directory, or the working directory for ``-m``. Raises SyntaxError for a
    file that does not parse.
    """
    base = (local_root or script.parent).resolve()
    local = _Local(base)
    sites: list[ImportSite] = []
    queue = [script.resolve()]
    seen: set[Path] = set()
    while queue and len(seen) < _MAX_SCANNED_FILES:
        path = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        tree = _parse(path.read_bytes(), str(path))
        for node, cond in _walk_imports(tree.body, False):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                pkg = path.parent
                for _ in range(node.level - 1):
                    pkg = pkg.parent
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    queue += _local_module_files(pkg, name or "")
                    if node.module:  # `from .pkg import sub`: sub may be a module file
                        queue += _local_module_files(pkg, f"{node.module}.{node.names[0].name}")[
                            -1:
                        ]
                continue
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                top = module.split(".")[0]
                if not top or top == "__future__":
                    continue
                if top in local:
                    queue += _local_module_files(base, module)
                    if isinstance(node, ast.ImportFrom):
                        for a in node.names:
                            queue += _local_module_files(base, f"{module}.{a.name}")[-1:]
                    continue
                sites.append(ImportSite(module, path, node.lineno, cond))
    return sites


def is_installed(top: str, search_path: Sequence[str] | None = None) -> bool:
    """Whether a top-level module can be found, without importing (running) it."""
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return True
    if search_path is not None:
        return importlib.machinery.PathFinder.find_spec(top, list(search_path)) is not None
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _requirements(base: Path) -> set[str]:
    try:
        text = (base / "requirements.txt").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    names = set()
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m:
            names.add(m.group(1).lower().replace("-", "_"))
    return names


def _has_python_shebang(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def _module_file(name: str, search: list[str]) -> Path | None:
    spec = None
    locations: list[str] | None = search
    for part in name.split("."):
        if locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(part, locations)
        if spec is None:
            return None
        locations = (
            list(spec.submodule_search_locations) if spec.submodule_search_locations else None
        )
    if spec is None:
        return None
    if spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "__main__.py").is_file():
                return Path(loc) / "__main__.py"
        return None
    return Path(spec.origin) if spec.origin and spec.has_location else None


def check_entry(entry: Sequence[str], paths: Paths | None = None) -> tuple[Check, Path | None]:
    """The entry as the agent resolves it (``entry.resolve``); the Python file whose imports
    to check, if any (a ``-m`` module's file, a script, a program with a python shebang)."""
    try:
        found = entries.resolve(entry, code_dir=paths.code_dir if paths else None)
    except SmdistError as exc:
        return Check("entry point", "fail", str(exc), exc.category), None
    if found.kind == "module":
        file = _module_file(found.target, [os.getcwd(), *sys.path])
        if file is None:
            detail = (
                f"module {found.target!r} not found on sys.path (working directory {os.getcwd()})"
            )
            return Check("entry point", "fail", detail, Category.ENTRY_POINT_NOT_FOUND), None
        return Check("entry point", "ok", f"{file}"), file
    path = Path(found.target)
    if found.kind == "program" and not _has_python_shebang(path):
        return Check("entry point", "ok", f"{path} (a program; imports not checked)"), None
    return Check("entry point", "ok", f"{path}"), path


def check_imports(script: Path, local_root: Path | None = None) -> Check:
    """Every module the script (and its local modules) imports is installed."""
    try:
        sites = scan_imports(script, local_root)
    except SyntaxError as exc:
        where = f"{Path(exc.filename or script).name}:{exc.lineno}"
        return Check(
            "imports",
            "fail",
            f"SyntaxError: {exc.msg} at {where}",
            Category.USER_SCRIPT_ERROR,
        )
    except OSError as exc:
        return Check("imports", "fail", f"{script}: cannot be read: {exc.strerror}", None)
    base = (local_root or script.parent).resolve()
    missing: dict[str, list[ImportSite]] = {}
    checked: set[str] = set()
    for site in sites:
        if site.top in checked or site.top in missing:
            if site.top in missing:
                missing[site.top].append(site)
            continue
        if is_installed(site.top):
            checked.add(site.top)
        else:
            missing[site.top] = [site]
    if not missing:
        return Check("imports", "ok", f"{len(checked)} modules imported, all installed")
    listed = _requirements(base)
    hard = {m: s for m, s in missing.items() if any(not x.conditional for x in s)}
    pending = {m for m in hard if m.lower() in listed}
    hard = {m: s for m, s in hard.items() if m not in pending}

    def names(group: Mapping[str, list[ImportSite]]) -> str:
        return ", ".join(f"{m} ({s[0].where(base)})" for m, s in group.items())

    # An install runs before the workers: it may provide a module under another name
    # (import cv2 <- opencv-python, yaml <- PyYAML), and if it fails, pip's own error is
    # the truth (a typo in requirements.txt), not "add it to requirements.txt".
    from smdist.agent.code import plan_install

    install = plan_install(base) if hard else None
    if hard and install is None:
        return Check(
            "imports",
            "fail",
            f"not installed: {names(hard)}; add to requirements.txt or the image",
            Category.MISSING_DEPENDENCY,
        )
    soft = {m: s for m, s in missing.items() if m not in pending and m not in hard}
    parts = []
    if pending:
        parts.append(f"not installed yet, listed in requirements.txt: {', '.join(sorted(pending))}")
    if hard and install is not None:
        parts.append(
            f"not installed yet, may come with the {install.what} installed first: {names(hard)}"
        )
    if soft:
        parts.append(f"not installed, imported only conditionally: {names(soft)}")
    return Check("imports", "warn", "; ".join(parts), None)


# --- the machine ----------------------------------------------------------------------


def check_writable(directory: Path, name: str) -> Check:
    """Create the directory if needed and write a probe file: the only honest test as root.

    The probe's name cannot collide: a directory shared between containers (local mode's
    one model dir, EFS, FSx) has several agents that are all PID 1 probing it at once.
    """
    probe = directory / f".smdist-probe-{os.uname().nodename}-{os.getpid()}-{os.urandom(8).hex()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Check(name, "fail", f"{directory}: no space left on device", Category.DISK_FULL)
        user = _user_name()
        return Check(
            name,
            "fail",
            f"{directory}: cannot write as user {user}: {exc.strerror}",
            Category.PERMISSION_DENIED,
        )
    return Check(name, "ok", f"{directory} writable")


def _user_name() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_gpus(n: int, how: str) -> Check:
    if n == 0:
        return Check("GPUs", "ok", f"none visible ({how}): workers train on CPU")
    return Check("GPUs", "ok", f"{n} visible ({how})")


def _free(path: Path) -> tuple[int, int] | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check_disk(paths: Paths, *, low: int = LOW_DISK_BYTES, full: int = FULL_DISK_BYTES) -> Check:
    """Free space where the job writes: the model, output and checkpoint directories."""
    worst: tuple[int, Path] | None = None
    for d in (paths.model_dir, paths.output_dir, paths.checkpoints_dir):
        got = _free(d)
        if got is not None and (worst is None or got[0] < worst[0]):
            worst = (got[0], d)
    if worst is None:
        return Check("disk", "warn", f"cannot stat {paths.root}", None)
    free, where = worst
    detail = f"{format_bytes(free)} free at {where}"
    if free < full:
        return Check("disk", "fail", detail, Category.DISK_FULL)
    if free < low:
        return Check("disk", "warn", detail + f" (under {format_bytes(low)})", None)
    return Check("disk", "ok", detail)


def check_shm(gpus: int, shm: Path = Path("/dev/shm")) -> Check:
    got = _free(shm)
    if got is None:
        return Check("shared memory", "warn", f"{shm} not found: DataLoader workers need it")
    _, total = got
    detail = f"{shm}: {format_bytes(total)}"
    if total < SMALL_SHM_BYTES and gpus > 0:
        return Check(
            "shared memory",
            "warn",
            detail + ": DataLoader workers may die of SIGBUS; raise the container's shm size",
        )
    return Check("shared memory", "ok", detail)


# --- putting it together --------------------------------------------------------------


def _load(config: JobConfig | Paths) -> tuple[JobConfig | None, Paths, Check]:
    if isinstance(config, JobConfig):
        cfg = config
    else:
        try:
            cfg = config_mod.load(config)
        except ConfigError as exc:
            return None, config, Check("config", "fail", str(exc), Category.CONFIG_ERROR)
    r = cfg.resource
    hosts = ", ".join(r.hosts) if len(r.hosts) <= 4 else f"{r.hosts[0]} ... {r.hosts[-1]}"
    source = "" if r.from_file else " (no resourceconfig.json: one host)"
    channels = ", ".join(cfg.channels) or "none"
    detail = (
        f"{len(r.hosts)} host(s) [{hosts}], current {r.current_host}{source}; channels: {channels}"
    )
    return cfg, cfg.paths, Check("config", "ok", detail)


def quick_checks(config: JobConfig | Paths, entry: Sequence[str]) -> list[Check]:
    """The checks that cost well under a second: the agent runs them before every start."""
    paths = config if isinstance(config, Paths) else config.paths
    checks: list[Check] = []
    entry_check, python_file = check_entry(entry, paths)
    checks.append(entry_check)
    if python_file is not None:
        module = bool(entry) and entry[0] == "-m"
        root = Path.cwd() if module else None  # as `python -m` puts it first
        checks.append(check_imports(python_file, root))
    checks.append(check_writable(paths.model_dir, "model dir"))
    checks.append(check_writable(paths.output_dir, "output dir"))
    return checks


def run_checks(
    config: JobConfig | Paths,
    entry: Sequence[str],
    *,
    resolve_hosts: HostResolver | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Check]:
    """Everything ``smdist-run --check`` reports, in the order a job would meet it.

    ``config`` may be the /opt/ml paths: a config that does not load is then a failed
    check, not an exception. ``resolve_hosts`` (from discovery) adds the DNS check.
    """
    cfg, paths, config_check = _load(config)
    checks = [config_check]
    if cfg is not None and resolve_hosts is not None:
        checks.append(_check_hosts(cfg.resource.hosts, resolve_hosts))
    checks += quick_checks(paths, entry)
    n, how = gpu_count(environ)
    checks.append(check_gpus(n, how))
    checks.append(check_disk(paths))
    checks.append(check_shm(n))
    return checks


def _check_hosts(hosts: Sequence[str], resolve: HostResolver) -> Check:
    try:
        resolve(hosts)
    except SmdistError as exc:
        return Check("hosts", "fail", str(exc), exc.category)
    except Exception as exc:  # a resolver bug still must not hide the table
        return Check("hosts", "fail", f"{type(exc).__name__}: {exc}", "HostResolutionFailed")
    return Check("hosts", "ok", f"{len(hosts)} resolved")


def first_failure(checks: Sequence[Check]) -> Check | None:
    return next((c for c in checks if c.status == "fail"), None)


def exit_code(checks: Sequence[Check]) -> int:
    """0 when nothing fails; else the exit code the job would have failed with."""
    failed = first_failure(checks)
    return 0 if failed is None else failed.as_error().exit_code


def format_table(checks: Sequence[Check]) -> str:
    """The ``--check`` table: one row per check, then a one-line verdict."""
    label = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}
    width = max([len(c.name) for c in checks] + [5])
    rows = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for c in checks:
        detail = f"{c.category}: {c.detail}" if c.status == "fail" and c.category else c.detail
        rows.append(f"{label[c.status]:<6}  {c.name:<{width}}  {detail}")
    failed = [c for c in checks if c.status == "fail"]
    warned = sum(1 for c in checks if c.status == "warn")
    if failed:
        cats = ", ".join(dict.fromkeys(c.category or c.name for c in failed))
        rows.append(f"{len(failed)} check(s) failed ({cats}): the job would fail.")
    else:
        rows.append(
            f"ready: {len(checks)} checks passed" + (f", {warned} warning(s)" if warned else "")
        )
    return "\n".join(rows)
