"""The model dir at the exit barrier: temp files a killed writer left, and the clash check.

SageMaker tars every host's /opt/ml/model into one ``model.tar.gz``; two hosts holding the
same relative path with different content means one file silently wins. Once every host's
workers are done, each host's agent publishes an inventory (relative path, size, sha256);
the master's agent checks them before the job may succeed.

A model dir *shared* between hosts (local mode mounts one directory into every container;
EFS and FSx volumes do the same) is one directory, not several. Before joining the
rendezvous each host writes a marker named with a random token into its model dir; the
tokens travel in the rendezvous plan, and a host that finds another host's marker (by exact
name: a fresh lookup, even on NFS) shares its model dir with that host. A marker from an
earlier job cannot fool it: its token is not in this job's plan. The hosts sharing a
directory report it once. Markers are removed when the agent leaves and never count as
model files.

Clean-up: an atomic write's temp file names the host that owns it; each host removes only
its own, and only after every host's workers finished, so no save in flight on another host
(or on this one, under mpirun) is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

from smdist import contract
from smdist.config import Paths
from smdist.contract import Category
from smdist.errors import SmdistError
from smdist.log import log
from smdist.records import dataclass

_HASH_CHUNK = 1 << 20
MARKER_PREFIX = ".smdist-marker-"


class ModelDirClash(SmdistError):
    """Two hosts hold the same path in /opt/ml/model with different content."""

    category = Category.MODEL_DIR_CLASH

    def __init__(self, clashes: list[Clash]) -> None:
        self.clashes = list(clashes)
        shown = "; ".join(str(c) for c in self.clashes[:5])
        more = f"; and {len(self.clashes) - 5} more" if len(self.clashes) > 5 else ""
        super().__init__(
            f"{len(self.clashes)} path(s) in the model dir differ between hosts and would "
            f"overwrite each other in model.tar.gz: {shown}{more} "
            '(write with smdist.save(..., scope="leader") or scope="host")'
        )


def _walk(directory: Path) -> Iterator[Path]:
    """Every file name under ``directory`` (symlinked directories are not entered)."""
    if not directory.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(directory):
        for fname in filenames:
            yield Path(dirpath, fname)


def remove_temp_files(directory: Path, owner: str | None = None) -> list[Path]:
    """Delete the temp files of writes that never finished (a killed writer); with
    ``owner``, only that host's (a directory may be shared between hosts).

    Call only when none of the owner's workers is writing: the agent does, after every
    host's workers exited.
    """
    removed = [
        p
        for p in _walk(directory)
        if contract.is_temp_file(p) and (owner is None or contract.temp_owner(p) == owner)
    ]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


Inventory = dict[str, tuple[int, str]]


def _sha256(path: Path) -> str:
    import hashlib  # only once the workers are done: never on the way to the first one

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def inventory(model_dir: Path) -> Inventory:
    """Relative path -> (size, sha256) of every regular file under ``model_dir``.

    Temp files of atomic writes and the agents' markers are skipped; symlinks to files count
    as the file (tar follows them the same way as a reader would); symlinked dirs are not
    entered.
    """
    result: Inventory = {}
    for p in _walk(model_dir):
        if contract.is_temp_file(p) or p.name.startswith(MARKER_PREFIX):
            continue
        try:
            if not p.is_file():
                continue
            size = p.stat().st_size
            digest = _sha256(p)
        except FileNotFoundError:  # renamed or removed while we walked
            continue
        result[p.relative_to(model_dir).as_posix()] = (size, digest)
    return result


def encode_inventory(inv: Mapping[str, tuple[int, str]]) -> bytes:
    """The inventory as the bytes an agent puts into the rendezvous store."""
    return json.dumps({k: [size, digest] for k, (size, digest) in inv.items()}).encode()


def decode_inventory(data: bytes, host: str) -> Inventory:
    """The inverse of :func:`encode_inventory`; ``host`` names the sender in errors."""
    try:
        raw = json.loads(data)
        return {str(k): (int(v[0]), str(v[1])) for k, v in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise SmdistError(f"model dir inventory from host {host}: malformed ({exc})") from None


@dataclass(frozen=True)
class Clash:
    """One path of model.tar.gz that more than one host would put there."""

    path: str
    hosts: tuple[str, ...]
    identical: bool
    """Same size and hash on every host: harmless duplicate, a warning."""
    detail: str = ""

    def __str__(self) -> str:
        what = "same content" if self.identical else self.detail or "different content"
        return f"{self.path} on hosts {', '.join(self.hosts)} ({what})"


def find_clashes(
    inventories: Mapping[str, Mapping[str, tuple[int, str]]],
) -> tuple[list[Clash], list[Clash]]:
    """(failing clashes, warnings) across the hosts' inventories, sorted by path."""
    holders: dict[str, list[str]] = {}
    for host in sorted(inventories):
        for path in inventories[host]:
            holders.setdefault(path, []).append(host)
    failing: list[Clash] = []
    warnings: list[Clash] = []
    for path in sorted(holders):
        hosts = holders[path]
        if len(hosts) < 2:
            continue
        contents = {tuple(inventories[h][path]) for h in hosts}
        if len(contents) == 1:
            warnings.append(Clash(path, tuple(hosts), identical=True))
        else:
            failing.append(Clash(path, tuple(hosts), identical=False))
    # A file on one host where another has a directory of that name: tar keeps only one.
    dir_holders: dict[str, set[str]] = {}
    for path, hosts in holders.items():
        for parent in PurePosixPath(path).parents:
            if parent.as_posix() in holders:
                dir_holders.setdefault(parent.as_posix(), set()).update(hosts)
    for key in sorted(dir_holders):
        file_hosts = holders[key]
        dir_hosts = sorted(dir_holders[key] - set(file_hosts))
        if dir_hosts:
            failing.append(
                Clash(
                    key,
                    tuple(sorted({*file_hosts, *dir_hosts})),
                    identical=False,
                    detail=f"a file on {', '.join(file_hosts)}, "
                    f"a directory on {', '.join(dir_hosts)}",
                )
            )
    failing.sort(key=lambda c: c.path)
    return failing, warnings


def check_clashes(inventories: Mapping[str, Mapping[str, tuple[int, str]]]) -> list[Clash]:
    """Raise :class:`ModelDirClash` on a failing clash; return the warnings otherwise."""
    failing, warnings = find_clashes(inventories)
    if failing:
        raise ModelDirClash(failing)
    return warnings


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


class ModelDir:
    """This host's /opt/ml/model (and checkpoint dir) in a job of ``hosts``."""

    def __init__(self, paths: Paths, host: str, hosts: Sequence[str]) -> None:
        self.paths = paths
        self.host = host
        self.hosts = tuple(hosts)
        self.token = os.urandom(8).hex()  # secrets.token_hex's bytes, without importing it
        self.marker = paths.model_dir / f"{MARKER_PREFIX}{host}-{self.token}"
        self.sharing: tuple[str, ...] = (host,)
        """The hosts whose model dir is this very directory (this one included), sorted."""

    def mark(self) -> None:
        """Leave this host's marker (before joining the rendezvous: every host's marker
        exists once the plan is out)."""
        if len(self.hosts) == 1:
            return
        try:
            self.paths.model_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_markers()
            self.marker.write_text(self.host, encoding="utf-8")
        except OSError as exc:  # the preflight check names an unwritable dir; not fatal here
            log.warning("model dir: cannot write %s (%s)", self.marker, exc.strerror or exc)

    def _remove_stale_markers(self) -> None:
        """This host's markers from an earlier job whose agent was killed before it could
        remove them: they would end up in the model archive. Other hosts' are theirs."""
        prefix = f"{MARKER_PREFIX}{self.host}-"
        for p in self.paths.model_dir.iterdir():
            token = p.name.removeprefix(prefix)
            if p.name.startswith(prefix) and len(token) == 16 and _is_hex(token):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    log.info("model dir: removed %s, left by an earlier agent on this host", p)

    def unmark(self) -> None:
        with contextlib.suppress(OSError):
            self.marker.unlink(missing_ok=True)

    def detect(self, tokens: Mapping[str, str]) -> None:
        """Which hosts' markers (``tokens`` from the plan) are in this host's model dir."""
        seen = [
            h
            for h, token in tokens.items()
            if h != self.host
            and token
            and (self.paths.model_dir / f"{MARKER_PREFIX}{h}-{token}").is_file()
        ]
        self.sharing = tuple(sorted({self.host, *seen}))
        if seen:
            log.info(
                "model dir %s is shared with %s: one directory, reported once (by %s)",
                self.paths.model_dir,
                ", ".join(sorted(seen)),
                self.sharing[0],
            )

    def remove_unfinished_writes(self) -> None:
        """This host's temp files of writes its killed workers never finished (never a
        checkpoint to resume from, never in model.tar.gz). Only while none of them runs."""
        for d in (self.paths.model_dir, self.paths.checkpoints_dir):
            for path in remove_temp_files(d, owner=self.host):
                log.info("removed %s, left by a write that never finished", path)

    def finish(self) -> Inventory:
        """After every host's workers finished: remove this host's abandoned temp files and
        return the inventory for the clash check (empty when another host reports it)."""
        self.remove_unfinished_writes()
        if len(self.hosts) == 1 or self.sharing[0] != self.host:
            return {}  # nothing to clash with, or the same files reported by another host
        return inventory(self.paths.model_dir)
